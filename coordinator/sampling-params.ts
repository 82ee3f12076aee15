/**
 * Sampling parameters of a generation request, validated with zod. Every failure is a WeftError
 * WEFT_BAD_REQUEST whose message names the field (as the caller spelled it) and the offending value.
 *
 * Field names: the camelCase names of {@link SamplingParams}, or their snake_case spellings
 * (`top_k`, `top_p`, `max_new_tokens`, `ignore_eos`, `stop_token_ids`, `top_logprobs`; `max_tokens` and
 * `max_completion_tokens` too, the OpenAI and vLLM names); giving two spellings of one field is an error, and so
 * is any other key. A field that is `undefined` or `null` takes its default. A failure about one field carries its
 * name as the caller spelled it in `param` (the HTTP gateway's error `param`).
 */
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { WeftError } from '../core/errors.ts';
import { MAX_TOP_LOGPROBS } from '../core/step-batch.ts';
import { checkSparqSetting, type SparqSetting } from '../core/sparq.ts';
import type { ModelSpec } from '../core/model-spec.ts';

export interface SamplingParams {
  /** softmax temperature; 0 means greedy (argmax). Default **0 (greedy)**. Finite, in [0, 100]. */
  temperature: number;
  /** keep only the k most likely tokens; 0 turns top-k off. Default 0. Integer in [0, vocabSize]. */
  topK: number;
  /** nucleus sampling: keep the smallest set of tokens whose probability reaches topP. Default 1 (off). In (0, 1]. */
  topP: number;
  /** seed of the request's random stream (`SeededRng`, coordinator/rng.ts). Default: a random 32-bit value. Integer in [0, 2^32). */
  seed: number;
  /** tokens to generate at most. Default 16. Integer >= 1, and prompt length + maxNewTokens <= the model's context. */
  maxNewTokens: number;
  /** keep generating past the model's EOS tokens. Default false. */
  ignoreEos: boolean;
  /** extra ids that end generation (the id is emitted, then generation stops). Default []. Integers in [0, vocabSize). */
  stopTokenIds: number[];
  /**
   * return each sampled token's log-prob and this many most likely alternatives (GeneratedToken.logprobs): the
   * log-softmax of the model's raw logits, before temperature, top-k and top-p. Default: absent (none). Integer in [0, 20].
   */
  logprobs?: number;
  /** decode attention of this request (an extension): absent, the cluster's; see {@link AttentionRequest}. */
  attention?: AttentionRequest;
  /**
   * [token id, bias] pairs, ascending by id, added to the logits before the draw (OpenAI's logit_bias: given as an
   * object from id to bias). Default: absent. At most MAX_LOGIT_BIAS ids in [0, vocabSize), biases in [-100, 100].
   */
  logitBias?: readonly (readonly [number, number])[];
  /**
   * OpenAI's penalties on the tokens generated so far, subtracted from their logits before each draw: presence once
   * for a token that came, frequency times the number of times it came (SequenceState.nextLogitBias). Default:
   * absent (0). In [-2, 2]. A step holding a penalised sequence is built once the step before has answered.
   */
  presencePenalty?: number;
  frequencyPenalty?: number;
}

/** The most ids one request may bias (OpenAI's limit). */
export const MAX_LOGIT_BIAS = 300;

// ---- SparQ per request (core/sparq.ts): `attention: { mode: 'sparq', r?, k? }` or `{ mode: 'dense' }`
/** 'dense': exact attention; 'sparq': r and k (each defaulting to the cluster's --sparq-r / --sparq-k). */
export type AttentionRequest = { readonly mode: 'dense' } | ({ readonly mode: 'sparq' } & SparqSetting);
/** What a cluster serves: its SparQ setting when it keeps SparQ's state (--attention sparq), else null. */
export interface AttentionLimits {
  readonly sparq: SparqSetting | null;
  readonly spec: Pick<ModelSpec, 'headDim' | 'nHeads' | 'nKvHeads'>;
  readonly device: 'cpu' | 'cuda';
}
const attentionSchema = z.strictObject({
  mode: z.enum(['dense', 'sparq'], { error: "mode must be 'dense' or 'sparq'" }),
  r: z.number().int({ error: 'r must be an integer' }).optional(),
  k: z.number().int({ error: 'k must be an integer' }).optional(),
});
/** The request's attention against what the cluster serves: refused (WEFT_BAD_REQUEST, naming `what`) when it cannot. */
function resolveAttention(given: z.infer<typeof attentionSchema>, limits: AttentionLimits | undefined, what = 'sampling parameter attention'): AttentionRequest {
  if (given.mode === 'dense') {
    if (given.r !== undefined || given.k !== undefined) throw bad(`${what}: r and k apply to mode sparq only`, 'attention');
    return { mode: 'dense' };
  }
  if (!limits?.sparq) throw bad(`${what}: this cluster attends densely; SparQ requests need a cluster started with --attention sparq`, 'attention');
  const setting = { r: given.r ?? limits.sparq.r, k: given.k ?? limits.sparq.k };
  checkSparqSetting(setting, limits.spec, limits.device);
  return { mode: 'sparq', ...setting };
}
/** A score request's `attention` (the sampling parameter's form), checked as generate's is. */
export function parseScoreAttention(input: unknown, limits: AttentionLimits): AttentionRequest {
  const parsed = attentionSchema.safeParse(input);
  if (!parsed.success) throw bad(`score: attention ${parsed.error.issues.map((i) => i.message).join('; ')} (got ${JSON.stringify(input)})`);
  return resolveAttention(parsed.data, limits, 'score: attention');
}
// ---- end SparQ per request

export interface SamplingLimits {
  /** the context length (prompt + generated tokens): the model's own, or the --max-context cap when smaller */
  maxContext: number;
  /** how messages name that limit (contextName); default: the model's context */
  contextName?: string;
  /** tokens in the prompt, BOS included; must be >= 1 */
  promptLength: number;
  /** width of the logits (the model's vocab_size) */
  vocabSize: number;
  /** what attention the cluster serves; absent: dense only */
  attention?: AttentionLimits;
}

export const SAMPLING_DEFAULTS = Object.freeze({
  temperature: 0,
  topK: 0,
  topP: 1,
  maxNewTokens: 16,
  ignoreEos: false,
  stopTokenIds: [] as readonly number[],
});

/** canonical name → accepted spellings (camelCase first, used in messages when the field was not given) */
const SPELLINGS = {
  temperature: ['temperature'],
  topK: ['topK', 'top_k'],
  topP: ['topP', 'top_p'],
  seed: ['seed'],
  maxNewTokens: ['maxNewTokens', 'max_new_tokens', 'max_tokens', 'max_completion_tokens'],
  ignoreEos: ['ignoreEos', 'ignore_eos'],
  stopTokenIds: ['stopTokenIds', 'stop_token_ids'],
  logprobs: ['logprobs', 'top_logprobs'],
  attention: ['attention'],
  logitBias: ['logitBias', 'logit_bias'],
  presencePenalty: ['presencePenalty', 'presence_penalty'],
  frequencyPenalty: ['frequencyPenalty', 'frequency_penalty'],
} as const satisfies Record<keyof SamplingParams, readonly string[]>;
type Field = keyof typeof SPELLINGS;

const ALIAS = new Map<string, Field>(
  (Object.entries(SPELLINGS) as [Field, readonly string[]][]).flatMap(([field, names]) => names.map((n) => [n, field] as const)),
);

const number = (what: string) => z.number({ error: 'must be a finite number' + what });
const integer = (what: string) => z.number({ error: 'must be an integer' + what }).int({ error: 'must be an integer' + what });

/** logit_bias's keys: token ids as JSON object keys, in decimal without leading zeros */
const tokenIdKey = z.string().regex(/^(0|[1-9]\d*)$/);
const penalty = number(' in [-2, 2]').min(-2, { error: 'must be in [-2, 2]' }).max(2, { error: 'must be in [-2, 2]' });

const schema = z.strictObject({
  temperature: number(' in [0, 100]').min(0, { error: 'must be >= 0' }).max(100, { error: 'must be <= 100' }).optional(),
  topK: integer(' >= 0 (0 = off)').min(0, { error: 'must be >= 0 (0 = off)' }).optional(),
  topP: number(' in (0, 1]').gt(0, { error: 'must be > 0 (and <= 1)' }).max(1, { error: 'must be <= 1' }).optional(),
  seed: integer(' in [0, 2^32)').min(0, { error: 'must be in [0, 2^32)' }).lt(2 ** 32, { error: 'must be in [0, 2^32)' }).optional(),
  maxNewTokens: integer(' >= 1').min(1, { error: 'must be >= 1' }).optional(),
  ignoreEos: z.boolean({ error: 'must be a boolean' }).optional(),
  stopTokenIds: z.array(integer(''), { error: 'must be an array of token ids' }).optional(),
  logprobs: integer(' in [0, 20]').min(0, { error: 'must be in [0, 20]' }).max(MAX_TOP_LOGPROBS, { error: 'must be in [0, 20]' }).optional(),
  attention: attentionSchema.optional(),
  logitBias: z
    .record(tokenIdKey, number(' in [-100, 100]').min(-100, { error: 'must be in [-100, 100]' }).max(100, { error: 'must be in [-100, 100]' }), {
      error: (issue) => (issue.code === 'invalid_key' ? 'must be keyed by a token id (an integer >= 0)' : 'must be an object from token id to bias'),
    })
    .refine((bias) => Object.keys(bias).length <= MAX_LOGIT_BIAS, { error: `must hold at most ${MAX_LOGIT_BIAS} token ids` })
    .optional(),
  presencePenalty: penalty.optional(),
  frequencyPenalty: penalty.optional(),
});

function show(value: unknown): string {
  if (typeof value === 'number' || typeof value === 'boolean' || value === undefined) return String(value);
  if (typeof value === 'bigint') return `${value}n`;
  try {
    const json = JSON.stringify(value);
    if (json !== undefined) return json.length > 80 ? `${json.slice(0, 77)}...` : json;
  } catch {
    // fall through
  }
  return Object.prototype.toString.call(value);
}

function bad(message: string, param?: string): WeftError {
  return new WeftError('WEFT_BAD_REQUEST', message, param === undefined ? undefined : { param });
}

function randomSeed(): number {
  return randomBytes(4).readUInt32LE(0);
}

/**
 * Validates `input` (an object of sampling fields, or undefined/null for all defaults) against the model
 * and prompt in `limits`, filling defaults: temperature 0 (greedy), topK 0 (off), topP 1, seed random,
 * maxNewTokens 16, ignoreEos false, stopTokenIds [], no logprobs. Throws WeftError WEFT_BAD_REQUEST.
 */
export function parseSamplingParams(input: unknown, limits: SamplingLimits): SamplingParams {
  if (input !== undefined && input !== null && (typeof input !== 'object' || Array.isArray(input)))
    throw bad(`sampling parameters must be an object, got ${show(input)}`);

  // resolve spellings: canonical field → the name the caller used
  const given = new Map<Field, string>();
  const canonical: Record<string, unknown> = {};
  const unknown: string[] = [];
  for (const [key, value] of Object.entries((input ?? {}) as Record<string, unknown>)) {
    const field = ALIAS.get(key);
    if (field === undefined) {
      unknown.push(key);
      continue;
    }
    const previous = given.get(field);
    if (previous !== undefined) throw bad(`sampling parameters ${previous} and ${key} are the same field; give one`);
    given.set(field, key);
    if (value !== undefined && value !== null) canonical[field] = value;
  }
  if (unknown.length > 0)
    throw bad(`unknown sampling parameter${unknown.length > 1 ? 's' : ''} ${unknown.map((k) => JSON.stringify(k)).join(', ')} (known: ${[...ALIAS.keys()].join(', ')})`);

  const nameOf = (field: Field): string => given.get(field) ?? SPELLINGS[field][0];

  const result = schema.safeParse(canonical);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const field = issue.path[0] as Field;
    let value: unknown = canonical[field];
    let name = nameOf(field);
    const index = issue.path[1];
    if (typeof index === 'number' || typeof index === 'string') {
      name += `[${JSON.stringify(index)}]`;
      value = (value as Record<PropertyKey, unknown>)[index];
    }
    throw bad(`sampling parameter ${name} ${issue.message}, got ${show(value)}`, nameOf(field));
  }
  const p = result.data;

  const params: SamplingParams = {
    temperature: p.temperature ?? SAMPLING_DEFAULTS.temperature,
    topK: p.topK ?? SAMPLING_DEFAULTS.topK,
    topP: p.topP ?? SAMPLING_DEFAULTS.topP,
    seed: p.seed ?? randomSeed(),
    maxNewTokens: p.maxNewTokens ?? SAMPLING_DEFAULTS.maxNewTokens,
    ignoreEos: p.ignoreEos ?? SAMPLING_DEFAULTS.ignoreEos,
    stopTokenIds: p.stopTokenIds ?? [...SAMPLING_DEFAULTS.stopTokenIds],
    ...(p.logprobs !== undefined && { logprobs: p.logprobs }),
    ...(p.attention && { attention: resolveAttention(p.attention, limits.attention) }),
    ...(p.presencePenalty && { presencePenalty: p.presencePenalty }),
    ...(p.frequencyPenalty && { frequencyPenalty: p.frequencyPenalty }),
    ...(p.logitBias && Object.keys(p.logitBias).length > 0 && {
      logitBias: Object.entries(p.logitBias).map(([id, bias]) => [Number(id), bias] as const).sort((a, b) => a[0] - b[0]),
    }),
  };

  const { maxContext, promptLength, vocabSize, contextName: limitName = contextName(maxContext, false) } = limits;
  if (params.topK > vocabSize)
    throw bad(`sampling parameter ${nameOf('topK')} must be <= the vocabulary size ${vocabSize} (0 = off), got ${params.topK}`, nameOf('topK'));
  params.stopTokenIds.forEach((id, i) => {
    if (id < 0 || id >= vocabSize)
      throw bad(`sampling parameter ${nameOf('stopTokenIds')}[${i}] must be a token id in [0, ${vocabSize}), got ${id}`, nameOf('stopTokenIds'));
  });
  const outside = params.logitBias?.find(([id]) => id >= vocabSize);
  if (outside) throw bad(`sampling parameter ${nameOf('logitBias')}["${outside[0]}"] must be keyed by a token id in [0, ${vocabSize})`, nameOf('logitBias'));
  if (!Number.isInteger(promptLength) || promptLength < 1)
    throw bad(`the prompt must hold at least one token, got ${show(promptLength)}`, 'prompt');
  if (promptLength + params.maxNewTokens > maxContext)
    throw bad(
      `prompt of ${promptLength} tokens plus ${nameOf('maxNewTokens')} ${params.maxNewTokens} exceeds ${limitName}`,
      nameOf('maxNewTokens'),
    );
  return params;
}

/**
 * How a message names the context limit: the operator's --max-context cap (`maxContext` in startCluster) when
 * that is what binds, else the model's own context, so that a refused prompt says which to change.
 */
export function contextName(maxContext: number, capped: boolean): string {
  return capped ? `the --max-context cap of ${maxContext} tokens` : `the model's context of ${maxContext} tokens`;
}

/**
 * Checks a prompt given as token ids: a non-empty array of integers in [0, vocabSize), at most
 * `maxContext` long (named by `limitName`). Returns a copy; throws WeftError WEFT_BAD_REQUEST naming the first bad index.
 */
export function validatePromptIds(ids: unknown, vocabSize: number, maxContext: number, limitName = contextName(maxContext, false)): number[] {
  if (!Array.isArray(ids)) throw bad(`prompt token ids must be an array, got ${show(ids)}`, 'prompt');
  if (ids.length === 0) throw bad('prompt token ids must not be empty', 'prompt');
  if (ids.length > maxContext) throw bad(`prompt of ${ids.length} tokens exceeds ${limitName}`, 'prompt');
  const out = new Array<number>(ids.length);
  for (let i = 0; i < ids.length; i++) {
    const id: unknown = ids[i];
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= vocabSize)
      throw bad(`prompt token id at index ${i} must be an integer in [0, ${vocabSize}), got ${show(id)}`, 'prompt');
    out[i] = id;
  }
  return out;
}
