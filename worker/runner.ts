/**
 * A Step command → the model's forward over the ragged batch → sampled tokens or log-probs. Every rank runs
 * the forward (the collectives need all of them); only rank 0 turns logits into the answer.
 *
 * On the CUDA backend, decode steps (one sampled token per sequence, up to `maxGraphBatch` sequences) run as
 * CUDA graphs: one graph per batch bucket (1, 2, 4, 8), captured the first time that bucket is needed and
 * replayed after writing the step's inputs (tokens, slots, positions, sampling parameters) into the
 * graph's persistent input tensors. Kernels read positions from device memory, so the graph stays valid as
 * sequences grow. Rows that pad a batch up to its bucket use a KV slot reserved for padding.
 */
import type { StepBatch, StepResult } from '../core/worker-protocol.ts';
import type { Collectives } from './collectives/collectives.ts';
import { forward } from './models/llama.ts';
import type { RankModel } from './models/registry.ts';
import { float32Tensor, int32Tensor, type Ops, type StepIndex, type Tensor } from './models/ops.ts';
import type { Graph } from './native.ts';
import { WeftError } from '../core/errors.ts';

export const GRAPH_BUCKETS = [1, 2, 4, 8] as const;

/** Today's cache layout, one block per slot: token t is its own sequence row, whose one block is its slot. */
function oneBlockPerSlot(ops: Ops, slots: readonly number[]): Pick<StepIndex, 'tokenSeq' | 'kvBlockTable'> {
  return { tokenSeq: int32Tensor(ops, slots.map((_, t) => t)), kvBlockTable: int32Tensor(ops, slots, [slots.length, 1]) };
}

interface DecodeGraph {
  readonly bucket: number;
  readonly graph: Graph;
  readonly inputs: StepIndex & { temperature: Tensor; topK: Tensor; topP: Tensor; uniform: Tensor };
  readonly tokens: Tensor; // [bucket] i32, persistent: the graph's last node copies the sampled ids here
}

export interface RunnerOptions {
  /** capture decode steps into CUDA graphs (cuda backend only). Defaults to true on cuda. */
  readonly graphs?: boolean;
  /** the engine's step arena in bytes (cuda), to size prefill chunks. Defaults to 4 GiB, the engine's default. */
  readonly arenaBytes?: number;
  /** override the chunk size of long eager steps (tests). Defaults to what the arena holds (cuda), unlimited on cpu. */
  readonly maxStepTokens?: number;
}

/**
 * Tokens one eager step may hold so that its intermediates fit the step arena: a generous count of the
 * fp32 activations one token leaves per layer (norms, residuals, fused q/k/v and its parts, attention,
 * gate/up and their product; with experts, that for each of its k pairs plus the rows grouped by expert),
 * plus one logits row per token.
 */
export function maxStepTokens(spec: { nLayers: number; hidden: number; headDim: number; vocabSize: number; nExpertsPerToken: number }, plan: { nHeadsPerRank: number; nKvHeadsPerRank: number; ffnPerRank: number }, arenaBytes: number): number {
  const qkvWidth = (plan.nHeadsPerRank + 2 * plan.nKvHeadsPerRank) * spec.headDim;
  const ffnWidth = spec.nExpertsPerToken > 0 ? spec.nExpertsPerToken * (6 * plan.ffnPerRank + 3 * spec.hidden) : 3 * plan.ffnPerRank;
  const perTokenPerLayer = 4 * (10 * spec.hidden + 3 * qkvWidth + ffnWidth);
  const perToken = spec.nLayers * perTokenPerLayer + 2 * 4 * spec.vocabSize;
  return Math.max(1, Math.floor((0.8 * arenaBytes) / perToken));
}

export class StepRunner {
  private readonly graphs = new Map<number, DecodeGraph>();
  private readonly useGraphs: boolean;
  readonly kvSlots: number;
  readonly maxContext: number;
  /** the KV slot padding rows write to; never given to a sequence */
  readonly paddingSlot: number;
  /** eager steps longer than this run in chunks (the step arena holds one chunk's intermediates) */
  readonly maxStepTokens: number;

  constructor(
    private readonly ops: Ops,
    private readonly comm: Collectives,
    private readonly rankModel: RankModel,
    options: RunnerOptions = {},
  ) {
    const [slots = 0, , maxContext = 0] = rankModel.model.kvCache[0]?.k.shape ?? [];
    this.useGraphs = ops.backend === 'cuda' && (options.graphs ?? true);
    // With graphs the model was built with one extra slot for padding rows.
    this.kvSlots = this.useGraphs ? slots - 1 : slots;
    this.paddingSlot = slots - 1;
    this.maxContext = maxContext;
    const { spec, plan } = rankModel.model;
    this.maxStepTokens = options.maxStepTokens ?? (ops.backend === 'cuda' ? maxStepTokens(spec, plan, options.arenaBytes ?? 4 * 2 ** 30) : Number.MAX_SAFE_INTEGER);
  }

  async step(batch: StepBatch): Promise<StepResult> {
    this.check(batch);
    const bucket = this.graphBucket(batch);
    if (bucket !== null) return this.replayDecode(batch, bucket);
    if (batch.tokens.length <= this.maxStepTokens) return this.eager(batch);
    return this.chunked(batch);
  }

  /**
   * A step too large for the step arena (a long prefill) runs as consecutive chunks of tokens. Exact: each
   * chunk writes its keys and values before the next chunk's queries read them, as in one step.
   */
  private async chunked(batch: StepBatch): Promise<StepResult> {
    const vocab = this.rankModel.model.spec.vocabSize;
    // What each logit row (by its index in batch.logitRows) produced, filled chunk by chunk.
    const tokens: number[] = [];
    const logprobs: number[] = [];
    const full = new Float32Array(batch.fullLogprobs && this.comm.rank === 0 ? batch.logitRows.length * vocab : 0);
    for (let start = 0; start < batch.tokens.length; start += this.maxStepTokens) {
      const end = Math.min(start + this.maxStepTokens, batch.tokens.length);
      const mine = batch.logitRows.flatMap((row, i) => (row >= start && row < end ? [i] : []));
      // A chunk nobody wants logits from still runs (its keys and values are needed); it asks for its last row.
      const rows = mine.length ? mine : [-1];
      const take = <T>(values: readonly T[]): T[] => rows.map((i) => values[Math.max(i, 0)]!);
      const chunk: StepBatch = {
        tokens: batch.tokens.slice(start, end),
        slots: batch.slots.slice(start, end),
        positions: batch.positions.slice(start, end),
        logitRows: rows.map((i) => (i < 0 ? end - 1 : batch.logitRows[i]!) - start),
        ...(batch.sample && {
          sample: { temperature: take(batch.sample.temperature), topK: take(batch.sample.topK), topP: take(batch.sample.topP), uniform: take(batch.sample.uniform) },
        }),
        ...(batch.scoreIds && { scoreIds: take(batch.scoreIds) }),
        ...(batch.fullLogprobs && { fullLogprobs: true }),
      };
      const result = await this.eager(chunk);
      if (!mine.length) continue;
      const rowsFull = result.fullLogprobs ? new Float32Array(result.fullLogprobs.slice().buffer) : null;
      mine.forEach((i, k) => {
        if (result.tokens) tokens[i] = result.tokens[k]!;
        if (result.logprobs) logprobs[i] = result.logprobs[k]!;
        if (rowsFull) full.set(rowsFull.subarray(k * vocab, (k + 1) * vocab), i * vocab);
      });
    }
    return {
      ...(tokens.length && { tokens }),
      ...(logprobs.length && { logprobs }),
      ...(full.length && { fullLogprobs: new Uint8Array(full.buffer) }),
    };
  }

  /** Benchmarks: the GPU time of one decode graph replay (no host work), in ms, over `iterations`. */
  timeGraphReplay(bucket: number, iterations: number): number {
    const graph = this.graphs.get(bucket);
    if (!graph) throw new WeftError('WEFT_BAD_REQUEST', `no decode graph for batch bucket ${bucket} yet`);
    this.ops.synchronize();
    const started = performance.now();
    for (let i = 0; i < iterations; i++) this.ops.replay(graph.graph);
    this.ops.synchronize();
    return (performance.now() - started) / iterations;
  }

  private check(batch: StepBatch): void {
    const badSlot = batch.slots.findIndex((s) => s >= this.kvSlots);
    if (badSlot >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badSlot}: KV slot ${batch.slots[badSlot]} is outside the ${this.kvSlots} slots`);
    const badPosition = batch.positions.findIndex((p) => p >= this.maxContext);
    if (badPosition >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badPosition}: position ${batch.positions[badPosition]} is past the context of ${this.maxContext}`);
    const vocab = this.rankModel.model.spec.vocabSize;
    const badToken = batch.tokens.findIndex((t) => t >= vocab);
    if (badToken >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badToken}: id ${batch.tokens[badToken]} is outside the vocabulary of ${vocab}`);
  }

  /** A decode batch a graph can run: every row sampled, nothing else asked, small enough for a bucket. */
  private graphBucket(batch: StepBatch): number | null {
    if (!this.useGraphs || !batch.sample || batch.scoreIds || batch.fullLogprobs) return null;
    const n = batch.tokens.length;
    if (batch.logitRows.length !== n || batch.logitRows.some((r, i) => r !== i)) return null;
    return GRAPH_BUCKETS.find((b) => b >= n) ?? null;
  }

  private async eager(batch: StepBatch): Promise<StepResult> {
    const { ops } = this;
    ops.beginStep();
    try {
      const step: StepIndex = {
        tokenIds: int32Tensor(ops, batch.tokens),
        ...oneBlockPerSlot(ops, batch.slots),
        positions: int32Tensor(ops, batch.positions),
        logitRows: int32Tensor(ops, batch.logitRows),
      };
      const logits = await forward(ops, this.comm, this.rankModel.model, this.rankModel.feedForward, step); // [R, vocab]
      if (this.comm.rank !== 0) return {};
      const result: StepResult = {};
      if (batch.sample) {
        const { temperature, topK, topP, uniform } = batch.sample;
        result.tokens = Array.from(ops.sample(logits, Float32Array.from(temperature), Int32Array.from(topK), Float32Array.from(topP), Float32Array.from(uniform)));
      }
      if (batch.scoreIds) result.logprobs = Array.from(ops.logprobs(logits, Int32Array.from(batch.scoreIds)));
      if (batch.fullLogprobs) {
        const rows = ops.download(ops.logSoftmax(logits)) as Float32Array;
        result.fullLogprobs = new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength);
      }
      return result;
    } finally {
      ops.endStep();
    }
  }

  private async replayDecode(batch: StepBatch, bucket: number): Promise<StepResult> {
    const graph = this.graphs.get(bucket) ?? (await this.capture(bucket));
    const { ops } = this;
    const n = batch.tokens.length;
    const pad = <T extends number>(values: readonly T[], filler: T): T[] => [...values, ...Array<T>(bucket - n).fill(filler)];
    const sample = batch.sample!;
    const writeInt = (t: Tensor, values: number[]): void => ops.write(t, new Uint8Array(Int32Array.from(values).buffer));
    const writeFloat = (t: Tensor, values: number[]): void => ops.write(t, new Uint8Array(Float32Array.from(values).buffer));
    writeInt(graph.inputs.tokenIds, pad(batch.tokens, 0));
    writeInt(graph.inputs.kvBlockTable, pad(batch.slots, this.paddingSlot)); // [bucket, 1]; tokenSeq stays 0..bucket-1
    writeInt(graph.inputs.positions, pad(batch.positions, 0));
    writeFloat(graph.inputs.temperature, pad(sample.temperature, 0));
    writeInt(graph.inputs.topK, pad(sample.topK, 0));
    writeFloat(graph.inputs.topP, pad(sample.topP, 1));
    writeFloat(graph.inputs.uniform, pad(sample.uniform, 0));
    ops.replay(graph.graph);
    if (this.comm.rank !== 0) {
      ops.synchronize();
      return {};
    }
    return { tokens: Array.from(ops.download(graph.tokens)).slice(0, n) };
  }

  /** Capture the decode graph of one bucket: a warm-up run first (first-use work stays out of the graph). */
  private async capture(bucket: number): Promise<DecodeGraph> {
    const { ops } = this;
    const rows = Array.from({ length: bucket }, (_, i) => i);
    const inputs = {
      tokenIds: int32Tensor(ops, rows.map(() => 0)),
      ...oneBlockPerSlot(ops, rows.map(() => this.paddingSlot)),
      positions: int32Tensor(ops, rows.map(() => 0)),
      logitRows: int32Tensor(ops, rows),
      temperature: float32Tensor(ops, rows.map(() => 0)),
      topK: int32Tensor(ops, rows.map(() => 0)),
      topP: float32Tensor(ops, rows.map(() => 1)),
      uniform: float32Tensor(ops, rows.map(() => 0)),
    };
    const tokens = ops.zeros('i32', [bucket]);
    const run = async (): Promise<void> => {
      const logits = await forward(ops, this.comm, this.rankModel.model, this.rankModel.feedForward, inputs);
      ops.copy(tokens, ops.sampleTensor(logits, inputs.temperature, inputs.topK, inputs.topP, inputs.uniform));
    };
    ops.beginStep();
    try {
      await run(); // warm-up, eager
    } finally {
      ops.endStep();
    }
    ops.beginStep();
    let graph: Graph;
    try {
      ops.captureBegin();
      try {
        await run();
      } finally {
        graph = ops.captureEnd();
      }
    } finally {
      ops.endStep();
    }
    const decodeGraph = { bucket, graph, inputs, tokens };
    this.graphs.set(bucket, decodeGraph);
    return decodeGraph;
  }
}
