/**
 * What the OpenAI routes accept, field by field, and how a body becomes sampling parameters.
 *
 * Every field a body may carry is declared below; any other one (a typo such as `temprature`, or a field weft
 * does not implement such as `repetition_penalty` or `min_p`) is a 400 naming it, never silently ignored. Of the
 * declared ones: most are implemented (`n` and a list of prompts too: independent sequences, see choicesOf;
 * `logprobs`, `top_logprobs`, `echo` and `best_of`: see logprobRequestOf); vLLM's extras `top_k`, `ignore_eos` and
 * `stop_token_ids` are implemented, and so are `logit_bias`, `presence_penalty` and `frequency_penalty`; `user`
 * and `safety_identifier` (end-user tags for OpenAI's abuse monitoring) are accepted and change nothing; the rest
 * (`response_format`, `tools`, `store`, `suffix`, a request-supplied chat template) are accepted only with the value
 * that means "off", else a 400 naming them (refuseUnsupported).
 */
import { z } from 'zod';
import { HttpError } from './http-guards.ts';
import { MAX_TOP_LOGPROBS } from '../../core/step-batch.ts';

/** Completions without `max_tokens` generate this many tokens, as OpenAI's and vLLM's /v1/completions do. */
export const COMPLETION_DEFAULT_MAX_TOKENS = 16;

const tokenIds = z.array(z.number().int().nonnegative()).min(1);
const common = {
  model: z.string().optional(),
  max_tokens: z.number().int().min(1).nullish(),
  max_completion_tokens: z.number().int().min(1).nullish(),
  temperature: z.number().nullish(),
  top_p: z.number().nullish(),
  seed: z.number().int().nullish(),
  stop: z.union([z.string(), z.array(z.string()).max(8)]).nullish(),
  stream: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().nullish() }).strict().nullish(),
  // vLLM's extras that weft implements
  top_k: z.number().int().nullish(),
  ignore_eos: z.boolean().nullish(),
  stop_token_ids: z.array(z.number().int()).nullish(),
  // weft's extension: { mode: 'dense' | 'sparq', r?, k? }, checked with the sampling parameters (sampling-params.ts)
  attention: z.unknown().optional(),
  // accepted, change nothing: tags OpenAI uses for abuse monitoring
  user: z.string().nullish(),
  safety_identifier: z.string().nullish(),
  n: z.number().int().min(1).nullish(),
  // completions: an integer in [0, 5]; chat: a boolean (logprobRequestOf)
  logprobs: z.union([z.boolean(), z.number()]).nullish(),
  // token id -> bias, and the penalties: checked with the sampling parameters (sampling-params.ts)
  logit_bias: z.unknown().optional(),
  presence_penalty: z.unknown().optional(),
  frequency_penalty: z.unknown().optional(),
};
export const completionSchema = z
  .object({
    ...common,
    prompt: z.union([z.string(), tokenIds, z.array(z.string()).min(1), z.array(tokenIds).min(1)]),
    best_of: z.number().int().nullish(),
    echo: z.boolean().nullish(),
    suffix: z.string().nullish(),
  })
  .strict();
const contentPart = z.object({ type: z.literal('text'), text: z.string() }).loose();
/** A chat's messages (text content, or text content parts). */
export const messagesSchema = z.array(z.object({ role: z.string(), content: z.union([z.string(), z.array(contentPart), z.null()]) }).loose()).min(1);
export const chatSchema = z
  .object({
    ...common,
    messages: messagesSchema,
    top_logprobs: z.number().nullish(),
    response_format: z.unknown().optional(),
    tools: z.unknown().optional(),
    tool_choice: z.unknown().optional(),
    store: z.boolean().nullish(),
    chat_template: z.unknown().optional(),
    chat_template_kwargs: z.unknown().optional(),
  })
  .strict();
export type CompletionBody = z.infer<typeof completionSchema>;
export type ChatBody = z.infer<typeof chatSchema>;
export type CommonBody = CompletionBody | ChatBody;

/** The messages as the chat template reads them: each content one string (text parts joined). */
export function chatMessagesOf(messages: z.infer<typeof messagesSchema>): { role: string; content: string }[] {
  return messages.map((m) => ({ role: m.role, content: typeof m.content === 'string' ? m.content : (m.content ?? []).map((p) => p.text).join('') }));
}

/** The body as `schema` reads it; fields it does not declare are refused all at once, by name. */
export function parseBody<T>(schema: z.ZodType<T>, value: unknown): T {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const unknown = parsed.error.issues.flatMap((i) => (i.code === 'unrecognized_keys' ? i.keys.map((k) => [...i.path, k].join('.')) : []));
  if (unknown.length > 0)
    throw new HttpError(400, 'unsupported_parameter', `unrecognized request field${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}: weft does not implement ${unknown.length > 1 ? 'them' : 'it'} (README, "Serving", lists the fields it accepts)`, unknown[0]!);
  const issue = parsed.error.issues[0];
  const param = issue?.path.join('.') || null;
  throw new HttpError(400, 'invalid_request', `${param ?? 'body'}: ${issue?.message ?? 'invalid'}`, param);
}

const isSet = (value: unknown): boolean => value !== undefined && value !== null;

/** Declared fields weft does not implement are refused by name unless they hold the value that means "off". */
export function refuseUnsupported(body: CommonBody): void {
  const refuse = (param: string, why: string): never => {
    throw new HttpError(400, 'unsupported_value', `${param}: ${why}`, param);
  };
  if ('prompt' in body) {
    if (body.suffix) refuse('suffix', 'is not supported');
    return;
  }
  const format = body.response_format as { type?: unknown } | null | undefined;
  if (isSet(format) && format!.type !== 'text') refuse('response_format', 'structured output is not supported yet (only {"type": "text"})');
  if (isSet(body.tools) && !(Array.isArray(body.tools) && body.tools.length === 0)) refuse('tools', 'tool calling is not supported');
  if (isSet(body.tool_choice) && body.tool_choice !== 'none' && body.tool_choice !== 'auto') refuse('tool_choice', 'tool calling is not supported');
  if (body.store) refuse('store', 'weft stores no completions');
  if (body.chat_template !== undefined || body.chat_template_kwargs !== undefined) refuse('chat_template', 'templates come from the model directory, never from requests');
}

/**
 * The sampling parameters of a body. Without `max_tokens` (or `max_completion_tokens`) a chat runs to the end of
 * the context (`maxContext` minus the prompt), as OpenAI and vLLM do; a completion stops after 16 tokens.
 */
export function samplingOf(body: CommonBody, chatPromptLength: number | null, maxContext: number, logprobs: LogprobRequest = logprobRequestOf(body)): Record<string, unknown> {
  let maxNewTokens = body.max_completion_tokens ?? body.max_tokens ?? COMPLETION_DEFAULT_MAX_TOKENS;
  if (chatPromptLength !== null && !isSet(body.max_completion_tokens) && !isSet(body.max_tokens)) {
    maxNewTokens = maxContext - chatPromptLength;
    if (maxNewTokens < 1)
      throw new HttpError(400, 'context_length_exceeded', `the messages are ${chatPromptLength} tokens, which fill the context of ${maxContext} tokens (--max-context): no room for an answer`, 'messages');
  }
  // Keys spelled as the body spells them (the sampling parameters take the OpenAI names too), so that a refusal
  // names the field the client sent, in its message and in the error's `param`.
  const maxTokensName = isSet(body.max_completion_tokens) ? 'max_completion_tokens' : 'max_tokens';
  return {
    [maxTokensName]: maxNewTokens,
    temperature: body.temperature ?? 1,
    top_p: body.top_p ?? 1,
    ...(isSet(body.top_k) && { top_k: Math.max(0, body.top_k!) }),
    ...(isSet(body.seed) && { seed: body.seed! >>> 0 }),
    ...(body.stop_token_ids && { stop_token_ids: body.stop_token_ids }),
    ...(body.ignore_eos && { ignore_eos: true }),
    ...(logprobs.samplingLogprobs !== null && { logprobs: logprobs.samplingLogprobs }),
    ...(body.attention !== undefined && { attention: body.attention }),
    ...(isSet(body.logit_bias) && { logit_bias: body.logit_bias }),
    ...(isSet(body.presence_penalty) && { presence_penalty: body.presence_penalty }),
    ...(isSet(body.frequency_penalty) && { frequency_penalty: body.frequency_penalty }),
  };
}

/** Completions' `logprobs` at most (OpenAI's legacy limit); chat's `top_logprobs` goes to MAX_TOP_LOGPROBS. */
export const MAX_COMPLETION_LOGPROBS = 5;

/** What a body asks of log-probs. */
export interface LogprobRequest {
  /** alternatives per token to answer with; null: no log-probs in the answer */
  readonly top: number | null;
  /** completions' `echo`: the prompt comes back before the text (with its log-probs when `top` is set) */
  readonly echo: boolean;
  /** samples drawn per prompt: `best_of` (the `n` with the highest cumulative log-prob are answered), else `n` */
  readonly samples: number;
  /** SamplingParams.logprobs: `top`, or 0 when only best_of's ranking needs them; null: none */
  readonly samplingLogprobs: number | null;
}

/**
 * The log-prob fields of a body, checked: completions' `logprobs` an integer in [0, 5], `echo`, `best_of` >= n
 * (not with `stream`, as OpenAI refuses); chat's `logprobs` a boolean and `top_logprobs` in [0, 20] (only with
 * `logprobs: true`). A bad value is a 400 naming its field.
 */
export function logprobRequestOf(body: CommonBody): LogprobRequest {
  const refuse = (param: string, why: string): never => {
    throw new HttpError(400, 'invalid_value', `${param}: ${why}`, param);
  };
  const n = body.n ?? 1;
  if ('prompt' in body) {
    const k = body.logprobs;
    if (isSet(k) && (typeof k !== 'number' || !Number.isInteger(k) || k < 0 || k > MAX_COMPLETION_LOGPROBS))
      refuse('logprobs', `must be an integer in [0, ${MAX_COMPLETION_LOGPROBS}] for completions (the number of alternatives per token), got ${JSON.stringify(k)}`);
    const samples = body.best_of ?? n;
    if (!Number.isInteger(samples) || samples < n) refuse('best_of', `must be an integer >= n (${n}), got ${samples}`);
    if (samples > n && body.stream) refuse('best_of', `cannot be streamed (best_of ${samples} > n ${n} ranks whole samples); set stream to false`);
    const top = isSet(k) ? (k as number) : null;
    return { top, echo: body.echo === true, samples, samplingLogprobs: top ?? (samples > n ? 0 : null) };
  }
  if (isSet(body.logprobs) && typeof body.logprobs !== 'boolean') refuse('logprobs', `must be a boolean for chat completions (top_logprobs sets the alternatives), got ${JSON.stringify(body.logprobs)}`);
  const top = body.top_logprobs;
  if (isSet(top) && (!Number.isInteger(top) || top! < 0 || top! > MAX_TOP_LOGPROBS)) refuse('top_logprobs', `must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${top}`);
  if (isSet(top) && top! > 0 && body.logprobs !== true) refuse('top_logprobs', 'needs logprobs: true');
  const k = body.logprobs === true ? (top ?? 0) : null;
  return { top: k, echo: false, samples: n, samplingLogprobs: k };
}

/** The stop strings of a body (empty ones dropped). */
export function stopsOf(body: CommonBody): string[] {
  const stops = !isSet(body.stop) ? [] : typeof body.stop === 'string' ? [body.stop] : body.stop!;
  return stops.filter((s) => s.length > 0);
}

/** The most choices one request may ask for (n times the prompts): each is a sequence of its own in the scheduler. */
export const MAX_CHOICES = 64;

/** One choice of a request: the prompt it continues and its sampling (a seed of its own when the request has one). */
export interface Choice {
  readonly index: number;
  /** which of its prompt's n samples it is (0: the first) */
  readonly sample: number;
  readonly request: { prompt: string } | { promptIds: number[] };
  readonly sampling: Record<string, unknown>;
}

/**
 * The choices of a request, in OpenAI's order: for each prompt, `n` samples (index = prompt * n + sample). Each is
 * an independent sequence; with a `seed`, sample j of every prompt draws from seed + j, so that the n samples differ
 * and a repeated request gives the same choices. A list of one prompt is that prompt.
 */
export function choicesOf(prompts: readonly ({ prompt: string } | { promptIds: number[] })[], n: number, sampling: Record<string, unknown>): Choice[] {
  const count = prompts.length * n;
  if (count > MAX_CHOICES)
    throw new HttpError(400, 'invalid_request', `${prompts.length} prompt${prompts.length > 1 ? 's' : ''} x n = ${n} asks for ${count} choices; at most ${MAX_CHOICES} per request`, prompts.length > 1 ? 'prompt' : 'n');
  return prompts.flatMap((request, p) =>
    Array.from({ length: n }, (_, j) => ({
      index: p * n + j,
      sample: j,
      request,
      sampling: typeof sampling.seed === 'number' ? { ...sampling, seed: (sampling.seed + j) >>> 0 } : sampling,
    })),
  );
}

/** The prompts of a completions body: a text, token ids, or a list of either. */
export function promptsOf(body: CompletionBody): ({ prompt: string } | { promptIds: number[] })[] {
  const prompt = body.prompt;
  if (typeof prompt === 'string') return [{ prompt }];
  if (typeof prompt[0] === 'number') return [{ promptIds: prompt as number[] }];
  return (prompt as (string | number[])[]).map((p) => (typeof p === 'string' ? { prompt: p } : { promptIds: p }));
}
