/**
 * Hugging Face `config.json` → `ModelSpec`: the model's shape as weft needs it, plain JSON data that travels to
 * workers. Llama 2/3/3.1, Mistral and Mixtral; anything else is refused by name before a byte of weights is read.
 */
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { WeftError } from './errors.ts';
import { readPackedInt4Config } from './packed-int4.ts';
import { peekStoredDType } from './safetensors.ts';
import { GROUP_SIZES, groupProblems, workingGroupSizes, type WeightDType, type WeightQuantization } from './weight-format.ts';

export type { WeightDType };
export type RopeScaling =
  | { type: 'llama3'; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number }
  | { type: 'linear'; factor: number };
export type ModelFamilyName = 'llama' | 'mixtral';
export interface ModelSpec {
  readonly family: ModelFamilyName; // Mistral uses 'llama'; worker/models/registry.ts maps the architecture to its module
  readonly architecture: string; // HF name, e.g. 'LlamaForCausalLM'
  readonly hidden: number; readonly nLayers: number; readonly nHeads: number; readonly nKvHeads: number;
  readonly headDim: number; readonly ffnDim: number; readonly vocabSize: number;
  readonly maxContext: number; readonly rmsEps: number; readonly ropeTheta: number;
  readonly ropeScaling: RopeScaling | null; readonly tieWordEmbeddings: boolean;
  readonly dtype: WeightDType; // the checkpoint's declared dtype; each tensor's format is the family layout's (WeightFormat)
  readonly nExperts: number; // 0 for dense models
  readonly nExpertsPerToken: number; // 0 for dense models
  readonly bosTokenId: number | null; readonly eosTokenIds: readonly number[];
  /** Weight-only int8/int4 projections (config.json's `quantization` block, or `--quantize`); absent or null: dense */
  readonly quantization?: WeightQuantization | null;
}

/**
 * What config.json means per architecture: the family that runs it, HF class defaults for fields a config may
 * leave out (LlamaConfig, MistralConfig, MixtralConfig), and which optional parts it reads. The config half of a
 * family; the compute half (weight layout, builder, feed-forward) is its module in worker/models/.
 */
interface ArchitectureEntry {
  readonly family: ModelFamilyName;
  readonly modelType: string;
  readonly ropeTheta: number;
  readonly rmsEps: number;
  readonly slidingWindow: boolean; // reads sliding_window (context capped to it)
  readonly experts: boolean; // reads num_local_experts and num_experts_per_tok
}
const ARCHITECTURES = {
  LlamaForCausalLM: { family: 'llama', modelType: 'llama', ropeTheta: 10000, rmsEps: 1e-6, slidingWindow: false, experts: false },
  MistralForCausalLM: { family: 'llama', modelType: 'mistral', ropeTheta: 10000, rmsEps: 1e-6, slidingWindow: true, experts: false },
  MixtralForCausalLM: { family: 'mixtral', modelType: 'mixtral', ropeTheta: 1e6, rmsEps: 1e-5, slidingWindow: true, experts: true },
} as const satisfies Record<string, ArchitectureEntry>;
type Architecture = keyof typeof ARCHITECTURES;
export const SUPPORTED_ARCHITECTURES: readonly string[] = Object.keys(ARCHITECTURES);

const TORCH_DTYPES: Record<string, WeightDType> = { float32: 'f32', float16: 'f16', bfloat16: 'bf16' };
const STORED_DTYPES: Record<string, WeightDType> = { F32: 'f32', F16: 'f16', BF16: 'bf16' };
const SUPPORTED_ROPE_TYPES = ['default', 'linear', 'llama3'];

export interface ReadModelSpecOptions {
  /** Called with each adjustment weft makes to what config.json says (e.g. a sliding window capping the context). */
  readonly onNote?: (note: string) => void;
}

/**
 * Reads `<dir>/config.json`. Throws WEFT_BAD_MODEL (missing or malformed) or WEFT_UNSUPPORTED_MODEL (a model or
 * feature weft does not implement), naming the file and field.
 * @example const spec = readModelSpec('/models/Llama-3.1-8B'); // spec.nKvHeads === 8
 */
export function readModelSpec(dir: string, options: ReadModelSpecOptions = {}): ModelSpec {
  const file = path.join(dir, 'config.json');
  if (!isDirectory(dir)) throw new WeftError('WEFT_BAD_MODEL', `model directory ${dir} does not exist or is not a directory`);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new WeftError('WEFT_BAD_MODEL', `${file}: cannot read the model's config.json (${(err as Error).message})`, { cause: err });
  }
  let config: unknown;
  try {
    config = JSON.parse(text);
  } catch (err) {
    throw new WeftError('WEFT_BAD_MODEL', `${file}: not valid JSON (${(err as Error).message})`, { cause: err });
  }
  // Without dtype/torch_dtype, HF's dtype="auto" takes the checkpoint's own dtype: do the same.
  const storedDType = () => {
    const stored = peekStoredDType(dir);
    return stored === undefined ? undefined : STORED_DTYPES[stored];
  };
  return parseModelConfig(config, file, { ...options, storedDType });
}

/** Pure part of `readModelSpec`: a parsed config.json object → ModelSpec. `source` names the file in messages. */
export function parseModelConfig(
  config: unknown,
  source: string,
  options: ReadModelSpecOptions & { readonly storedDType?: () => WeightDType | undefined } = {},
): ModelSpec {
  if (typeof config !== 'object' || config === null || Array.isArray(config)) {
    throw new WeftError('WEFT_BAD_MODEL', `${source}: expected a JSON object, got ${describe(config)}`);
  }
  const cfg = config as Record<string, unknown>;
  const f = new Fields(cfg, source);
  const architecture = readArchitecture(cfg, source);
  const arch: ArchitectureEntry = ARCHITECTURES[architecture];
  refuseUnsupportedFeatures(f, architecture);

  const hidden = f.int('hidden_size');
  const nHeads = f.int('num_attention_heads');
  const nKvHeads = f.optional('num_key_value_heads') === undefined ? nHeads : f.int('num_key_value_heads');
  if (nHeads % nKvHeads !== 0) {
    throw new WeftError('WEFT_BAD_MODEL', `${source}: num_attention_heads ${nHeads} is not a multiple of num_key_value_heads ${nKvHeads}`);
  }
  let headDim: number;
  if (f.optional('head_dim') === undefined) {
    if (hidden % nHeads !== 0) {
      throw new WeftError('WEFT_BAD_MODEL', `${source}: head_dim is absent and hidden_size ${hidden} is not a multiple of num_attention_heads ${nHeads}`);
    }
    headDim = hidden / nHeads;
  } else {
    headDim = f.int('head_dim');
  }
  if (headDim % 2 !== 0) throw new WeftError('WEFT_BAD_MODEL', `${source}: head_dim ${headDim} must be even for rotary embeddings`);

  const maxPositions = f.int('max_position_embeddings');
  let maxContext = maxPositions;
  const slidingWindow = arch.slidingWindow ? f.optional('sliding_window') : undefined;
  if (slidingWindow !== undefined) {
    const window = f.int('sliding_window');
    if (window < maxPositions) {
      // Within the window, sliding-window attention equals full attention, so capping the context keeps it exact.
      maxContext = window;
      options.onNote?.(`${source}: sliding_window ${window} < max_position_embeddings ${maxPositions}: context capped at ${window} tokens (full attention is exact within the window)`);
    }
  }

  const nExperts = arch.experts ? f.int('num_local_experts') : 0;
  const nExpertsPerToken = arch.experts ? f.int('num_experts_per_tok') : 0;
  if (nExpertsPerToken > nExperts) {
    throw new WeftError('WEFT_BAD_MODEL', `${source}: num_experts_per_tok ${nExpertsPerToken} exceeds num_local_experts ${nExperts}`);
  }

  const { ropeTheta, ropeScaling } = readRope(f, arch.ropeTheta);
  const spec: ModelSpec = {
    family: arch.family,
    architecture,
    hidden,
    nLayers: f.int('num_hidden_layers'),
    nHeads,
    nKvHeads,
    headDim,
    ffnDim: f.int('intermediate_size'),
    vocabSize: f.int('vocab_size'),
    maxContext,
    rmsEps: f.optional('rms_norm_eps') === undefined ? arch.rmsEps : f.positive('rms_norm_eps'),
    ropeTheta,
    ropeScaling,
    tieWordEmbeddings: f.optional('tie_word_embeddings') === undefined ? false : f.bool('tie_word_embeddings'),
    dtype: readDType(f, options.storedDType),
    nExperts,
    nExpertsPerToken,
    bosTokenId: f.optional('bos_token_id') === undefined ? null : f.int('bos_token_id', 0),
    eosTokenIds: readEos(f),
  };
  // absent for a dense checkpoint (the spec of every model weft read before quantization is unchanged)
  const quantization = readQuantization(f, projectionWidths(spec), spec.tieWordEmbeddings);
  if (quantization !== null) return { ...spec, quantization };
  return spec;
}

function readArchitecture(cfg: Record<string, unknown>, source: string): Architecture {
  const supported = SUPPORTED_ARCHITECTURES.join(', ');
  const archs = cfg['architectures'];
  if (archs === undefined || archs === null) {
    // Some configs omit `architectures`; model_type then names the family unambiguously.
    const byType = Object.entries(ARCHITECTURES).find(([, a]) => a.modelType === cfg['model_type']);
    if (byType) return byType[0] as Architecture;
    throw new WeftError('WEFT_BAD_MODEL', `${source}: field "architectures" is missing and model_type ${describe(cfg['model_type'])} names no supported model (supported: ${supported})`);
  }
  if (!Array.isArray(archs) || archs.length === 0 || !archs.every((a) => typeof a === 'string')) {
    throw new WeftError('WEFT_BAD_MODEL', `${source}: field "architectures" must be a non-empty list of strings, got ${describe(archs)}`);
  }
  const found = archs.find((a): a is Architecture => a in ARCHITECTURES);
  if (found === undefined) {
    throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${source}: architecture ${archs.join(', ')} is not supported; weft runs ${supported}`);
  }
  return found;
}

function refuseUnsupportedFeatures(f: Fields, architecture: string): void {
  const act = f.optional('hidden_act') ?? 'silu';
  if (act !== 'silu' && act !== 'swish') {
    f.unsupported(`hidden_act ${describe(act)} is not supported (${architecture} in weft uses silu)`);
  }
  for (const key of ['attention_bias', 'mlp_bias']) {
    if (f.optional(key) !== undefined && f.bool(key)) f.unsupported(`${key}: true is not supported (weft's projections have no bias)`);
  }
  const partial = f.optional('partial_rotary_factor');
  if (partial !== undefined && partial !== 1) f.unsupported(`partial_rotary_factor ${describe(partial)} is not supported (only 1)`);
  const quant = f.optional('quantization_config');
  if (quant !== undefined) {
    const method = (quant as { quant_method?: unknown } | null)?.quant_method;
    if (method !== 'gptq' && method !== 'awq') {
      f.unsupported(`quantized checkpoints are not supported (quantization_config.quant_method ${describe(method)}); weft reads 4-bit gptq and awq ones, and f32, f16 or bf16 weights`);
    }
  }
}

/** Classic layout: top-level rope_theta + rope_scaling; newer: rope_parameters {rope_theta, rope_type, ...}. */
function readRope(f: Fields, defaultTheta: number): { ropeTheta: number; ropeScaling: RopeScaling | null } {
  const newer = f.optional('rope_parameters') !== undefined;
  const key = newer ? 'rope_parameters' : 'rope_scaling';
  const params = f.optional(key);
  let ropeTheta = f.optional('rope_theta') === undefined ? defaultTheta : f.positive('rope_theta');
  if (params === undefined) return { ropeTheta, ropeScaling: null };
  if (typeof params !== 'object' || Array.isArray(params)) f.bad(`field "${key}" must be an object or null, got ${describe(params)}`);
  const p = new Fields(params as Record<string, unknown>, f.source, `${key}.`);
  if (p.optional('rope_theta') !== undefined) ropeTheta = p.positive('rope_theta');
  const type = p.optional('rope_type') ?? p.optional('type') ?? 'default';
  if (typeof type !== 'string' || !SUPPORTED_ROPE_TYPES.includes(type)) {
    f.unsupported(`${key}.rope_type ${describe(type)} is not supported; weft supports ${SUPPORTED_ROPE_TYPES.join(', ')}`);
  }
  if (type === 'default') return { ropeTheta, ropeScaling: null };
  const factor = p.positive('factor');
  if (type === 'linear') return { ropeTheta, ropeScaling: { type: 'linear', factor } };
  const lowFreqFactor = p.positive('low_freq_factor');
  const highFreqFactor = p.positive('high_freq_factor');
  if (highFreqFactor <= lowFreqFactor) {
    f.bad(`${key}.high_freq_factor ${highFreqFactor} must be greater than low_freq_factor ${lowFreqFactor}`);
  }
  const originalMaxPositions = p.int('original_max_position_embeddings');
  return { ropeTheta, ropeScaling: { type: 'llama3', factor, lowFreqFactor, highFreqFactor, originalMaxPositions } };
}

function readDType(f: Fields, stored: (() => WeightDType | undefined) | undefined): WeightDType {
  const key = f.optional('dtype') !== undefined ? 'dtype' : 'torch_dtype';
  const value = f.optional(key);
  if (value === undefined) {
    const fromWeights = stored?.();
    if (fromWeights !== undefined) return fromWeights;
    f.bad(`neither "dtype" nor "torch_dtype" is set, and no safetensors weights were found to take the dtype from`);
  }
  const dtype = typeof value === 'string' ? TORCH_DTYPES[value.replace(/^torch\./, '')] : undefined;
  if (dtype === undefined) {
    f.unsupported(`${key} ${describe(value)} is not supported; weft loads ${Object.keys(TORCH_DTYPES).join(', ')}`);
  }
  return dtype;
}

/**
 * The `quantization` block weft writes (`weft quantize`): {"format": "int8" | "int4", "bits": 8 | 4, "group_size":
 * 32 | 64 | 128 | 256, or -1 for one scale per output channel, "scales_dtype": "bfloat16", "lm_head": true when the LM
 * head is quantized too (optional)}. Null when absent. `widths` are the projections' input widths, which the group
 * size must divide.
 */
function readQuantization(f: Fields, widths: Record<string, number>, tied: boolean): WeightQuantization | null {
  const block = f.optional('quantization');
  const packedBlock = f.optional('quantization_config');
  if (packedBlock !== undefined) {
    if (block !== undefined) f.bad('both "quantization" (weft\'s) and "quantization_config" (gptq/awq) are set');
    // GPTQ/AWQ: converted as each rank loads its projections (worker/weights/read-packed.ts), int4 where symmetric
    const packed = readPackedInt4Config(packedBlock, f.source);
    const quantization: WeightQuantization = { kind: packed.symmetric ? 'int4' : 'int8', groupSize: packed.groupSize, atLoad: false, packed };
    const problem = quantizationProblem(quantization, widths);
    if (problem !== null) f.bad(`quantization_config: ${problem}`);
    return quantization;
  }
  if (block === undefined) return null;
  if (typeof block !== 'object' || Array.isArray(block)) f.bad(`field "quantization" must be an object, got ${describe(block)}`);
  const q = new Fields(block as Record<string, unknown>, f.source, 'quantization.');
  const format = q.optional('format');
  if (format !== 'int8' && format !== 'int4') q.bad(`field "quantization.format" must be "int8" or "int4", got ${describe(format)}`);
  const kind = format as 'int8' | 'int4';
  const bits = q.int('bits');
  if (bits !== (format === 'int8' ? 8 : 4)) q.bad(`field "quantization.bits" is ${bits} but format ${format} has ${format === 'int8' ? 8 : 4}`);
  const group = q.optional('group_size');
  if (group !== -1 && !(Number.isSafeInteger(group) && (group as number) >= 2 && (group as number) % 2 === 0)) {
    q.bad(`field "quantization.group_size" must be an even group size (${GROUP_SIZES.join(', ')} are usual) or -1 (per output channel), got ${describe(group)}`);
  }
  const scales = q.optional('scales_dtype') ?? 'bfloat16';
  if (scales !== 'bfloat16') q.unsupported(`field "quantization.scales_dtype" ${describe(scales)} is not supported (bfloat16 only)`);
  const lmHead = q.optional('lm_head') === undefined ? false : q.bool('lm_head');
  // a quantized head is a tensor of its own (lm_head.weight and its scales): weft quantize unties it
  if (lmHead && tied) q.bad('field "quantization.lm_head" is true but tie_word_embeddings is true: a quantized LM head is stored as lm_head.weight, untied');
  const quantization: WeightQuantization = { kind, groupSize: group === -1 ? 'channel' : (group as number), atLoad: false, ...(lmHead ? { lmHead } : {}) };
  const problem = quantizationProblem(quantization, widths);
  if (problem !== null) q.bad(problem);
  return quantization;
}

/** The input widths of a model's projections, unsplit (each must hold whole groups). */
function projectionWidths(spec: Pick<ModelSpec, 'hidden' | 'nHeads' | 'headDim' | 'ffnDim'>): Record<string, number> {
  return { hidden: spec.hidden, attention_output: spec.nHeads * spec.headDim, mlp_down: spec.ffnDim };
}

function quantizationProblem(q: Pick<WeightQuantization, 'kind' | 'groupSize'>, widths: Record<string, number>): string | null {
  const problems = groupProblems(q, widths);
  return problems.length === 0 ? null : `${q.kind} quantization does not fit the model: ${problems.join('; ')} (group sizes that fit: ${workingGroupSizes(q.kind, widths)})`;
}

/**
 * The spec of a dense checkpoint whose projections (and, with `lmHead`, its LM head) each rank quantizes as it loads
 * them (`--quantize`, `--quantize-lm-head`); `kind` undefined leaves it as it is. Refused (WEFT_BAD_MODEL) for a
 * checkpoint already quantized, a group size the projections' widths do not divide, or `lmHead` alone.
 */
export function withQuantizeAtLoad(spec: ModelSpec, kind: WeightQuantization['kind'] | undefined, groupSize: string | number = kind === 'int4' ? 128 : 'channel', lmHead = false): ModelSpec {
  if (kind === undefined) {
    if (lmHead) throw new WeftError('WEFT_BAD_MODEL', '--quantize-lm-head quantizes the LM head in the format --quantize int8|int4 gives the projections; --quantize is not set');
    return spec;
  }
  if (spec.quantization) throw new WeftError('WEFT_BAD_MODEL', `--quantize ${kind}: the checkpoint is already quantized (${spec.quantization.kind}); load it without --quantize`);
  // the head's K is the hidden size, which projectionWidths already holds to the group size
  const quantization: WeightQuantization = { kind, groupSize: groupSize === 'channel' ? 'channel' : Number(groupSize), atLoad: true, ...(lmHead ? { lmHead } : {}) };
  const problem = quantizationProblem(quantization, projectionWidths(spec));
  if (problem !== null) throw new WeftError('WEFT_BAD_MODEL', `--quantize ${kind} --group-size ${groupSize}: ${problem}`);
  return { ...spec, quantization };
}

function readEos(f: Fields): number[] {
  const eos = f.optional('eos_token_id');
  if (eos === undefined) return [];
  const ids = Array.isArray(eos) ? eos : [eos];
  if (!ids.every((id) => Number.isSafeInteger(id) && (id as number) >= 0)) {
    f.bad(`field "eos_token_id" must be a token id or a list of them, got ${describe(eos)}`);
  }
  return ids as number[];
}

/** Typed reads of one JSON object's fields; every message names the file and the field. */
class Fields {
  constructor(
    private readonly obj: Record<string, unknown>,
    readonly source: string,
    private readonly prefix = '',
  ) {}

  /** The value, or undefined when absent or null (HF treats both as "use the default"). */
  optional(key: string): unknown {
    const v = this.obj[key];
    return v === null ? undefined : v;
  }

  int(key: string, min = 1): number {
    const v = this.required(key);
    if (!Number.isSafeInteger(v) || (v as number) < min) this.bad(`field "${this.prefix}${key}" must be an integer >= ${min}, got ${describe(v)}`);
    return v as number;
  }

  positive(key: string): number {
    const v = this.required(key);
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) this.bad(`field "${this.prefix}${key}" must be a positive number, got ${describe(v)}`);
    return v;
  }

  bool(key: string): boolean {
    const v = this.required(key);
    if (typeof v !== 'boolean') this.bad(`field "${this.prefix}${key}" must be true or false, got ${describe(v)}`);
    return v;
  }

  bad(message: string): never {
    throw new WeftError('WEFT_BAD_MODEL', `${this.source}: ${message}`);
  }

  unsupported(message: string): never {
    throw new WeftError('WEFT_UNSUPPORTED_MODEL', `${this.source}: ${message}`);
  }

  private required(key: string): unknown {
    const v = this.optional(key);
    if (v === undefined) this.bad(`field "${this.prefix}${key}" is missing`);
    return v;
  }
}

function describe(v: unknown): string {
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 80 ? `${s.slice(0, 77)}...` : s;
}

function isDirectory(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/**
 * RoPE inverse frequencies [headDim / 2] f32, computed as HF transformers does in float32
 * (`_compute_default_rope_parameters`, then `_compute_linear_scaling_rope_parameters` or
 * `_compute_llama3_parameters`): each intermediate is rounded to f32 where torch rounds it.
 * torch's `x / tensor` is `tensor.reciprocal() * x`, hence the reciprocals. Only `pow` may differ by one f32 ulp
 * from torch's vectorised powf.
 */
export function ropeInvFreq(spec: ModelSpec): Float32Array {
  const f = Math.fround;
  const d = spec.headDim;
  const inv = new Float32Array(d / 2);
  for (let i = 0; i < d / 2; i++) {
    // 1.0 / (base ** (arange(0, d, 2).float() / d))
    inv[i] = f(1 / f(Math.pow(f(spec.ropeTheta), f((2 * i) / d))));
  }
  const s = spec.ropeScaling;
  if (s === null) return inv;
  if (s.type === 'linear') return inv.map((x) => f(x / f(s.factor)));

  const factor = f(s.factor);
  const lowFreqWavelen = f(s.originalMaxPositions / s.lowFreqFactor);
  const highFreqWavelen = f(s.originalMaxPositions / s.highFreqFactor);
  return inv.map((x) => {
    const wavelen = f(f(1 / x) * f(2 * Math.PI)); // 2 * math.pi / inv_freq
    if (wavelen < highFreqWavelen) return x; // high frequency: kept
    if (wavelen > lowFreqWavelen) return f(x / factor); // low frequency: scaled down by factor
    // medium: smooth = (old_context_len / wavelen - low) / (high - low); (1 - smooth) * x / factor + smooth * x
    const smooth = f(f(f(f(1 / wavelen) * f(s.originalMaxPositions)) - f(s.lowFreqFactor)) / f(s.highFreqFactor - s.lowFreqFactor));
    return f(f(f(f(1 - smooth) * x) / factor) + f(smooth * x));
  });
}
