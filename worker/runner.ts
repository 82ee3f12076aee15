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
import type { StepBatch, StepResult } from './protocol.ts';
import type { Collectives } from './collectives/collectives.ts';
import { forward } from './models/llama.ts';
import type { RankModel } from './models/registry.ts';
import { float32Tensor, int32Tensor, type Ops, type StepIndex, type Tensor } from './models/ops.ts';
import type { Graph } from './native.ts';
import { WeftError } from '../coordinator/errors.ts';

export const GRAPH_BUCKETS = [1, 2, 4, 8] as const;

interface DecodeGraph {
  readonly bucket: number;
  readonly graph: Graph;
  readonly inputs: StepIndex & { temperature: Tensor; topK: Tensor; topP: Tensor; uniform: Tensor };
  readonly tokens: Tensor; // [bucket] i32, persistent: the graph's last node copies the sampled ids here
}

export interface RunnerOptions {
  /** capture decode steps into CUDA graphs (cuda backend only). Defaults to true on cuda. */
  readonly graphs?: boolean;
}

export class StepRunner {
  private readonly graphs = new Map<number, DecodeGraph>();
  private readonly useGraphs: boolean;
  readonly kvSlots: number;
  readonly maxContext: number;
  /** the KV slot padding rows write to; never given to a sequence */
  readonly paddingSlot: number;

  constructor(
    private readonly ops: Ops,
    private readonly comm: Collectives,
    private readonly rankModel: RankModel,
    options: RunnerOptions = {},
  ) {
    const [slots = 0, , maxContext = 0] = rankModel.model.kvCache[0]?.k.shape ?? [];
    // Mixtral routes tokens to experts on the host (the router's choice decides which weights are read),
    // which a graph cannot capture: it runs eagerly until routing moves onto the device.
    this.useGraphs = ops.backend === 'cuda' && rankModel.model.spec.family !== 'mixtral' && (options.graphs ?? true);
    // With graphs the model was built with one extra slot for padding rows.
    this.kvSlots = this.useGraphs ? slots - 1 : slots;
    this.paddingSlot = slots - 1;
    this.maxContext = maxContext;
  }

  async step(batch: StepBatch): Promise<StepResult> {
    this.check(batch);
    const bucket = this.graphBucket(batch);
    if (bucket !== null) return this.replayDecode(batch, bucket);
    return this.eager(batch);
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
        slots: int32Tensor(ops, batch.slots),
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
    writeInt(graph.inputs.slots, pad(batch.slots, this.paddingSlot));
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
      slots: int32Tensor(ops, rows.map(() => this.paddingSlot)),
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
