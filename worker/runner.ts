/**
 * A Step command → the model's forward over the ragged batch → sampled tokens or log-probs. Every rank runs
 * the forward (the collectives need all of them); only rank 0 turns logits into the answer.
 *
 * On the CUDA backend, decode steps (one sampled token per sequence, up to the largest bucket the layout's
 * kvSlots need, 256 at most) run as CUDA graphs: one graph per batch bucket (GRAPH_BUCKETS in step-sizes.ts,
 * with the arena's sizes and the chunking of long steps), captured the first
 * time that bucket is needed and replayed after writing the step's inputs (the step index, sampling parameters)
 * into the graph's persistent input tensors. Kernels read positions from device memory, so the graph stays valid
 * as sequences grow. Rows that pad a batch up to its bucket are sequences of their own in the layout's padding
 * block. Above 8 rows the projections run on the cuBLAS GEMM (its workspace is fixed at creation, and the warm-up
 * run before each capture sizes its buffers, so nothing is allocated while capturing). A decode step whose
 * sequences share leading KV blocks (prefix groups: the samples of one prompt, prefix-groups.ts) runs a graph of
 * its own per bucket, whose attention is bifurcated and whose group descriptors are inputs too.
 *
 * The KV cache's sizes come explicitly (KvCacheLayout, derived from the init command); the wire batch's block
 * table becomes the native ops' index tensors in one function, `stepIndexArrays`.
 *
 * Steps are launched, not waited for: `launch` queues a step on the device and returns; its result settles when
 * the answer is back on the host. A decode graph step leaves the tokens it drew in `sampled` on the device, and
 * the next step's tokens can come from there (StepBatch.feed) without a trip through the host, so the worker can
 * queue step k + 1 while step k still runs. Every rank samples (the logits are gathered on every rank, and the
 * sampling inputs are the same), so every rank can feed its own next step.
 */
import type { StepBatch, StepResult } from '../core/worker-protocol.ts';
import { logprobAsks, readTokenLogprobs, type LogprobAsks } from './token-logprobs.ts';
import { checkKvPositions } from '../core/step-batch.ts';
import { maxBlocksPerSequence, type KvCacheLayout } from '../core/kv-block-table.ts';
import type { Collectives } from './collectives/collectives.ts';
import { forward } from './models/llama.ts';
import { groupSlots, prefixGroupArrays, prefixGroupTensors, withPrefixGroups, writePrefixGroups } from './prefix-groups.ts';
import type { RankModel } from './models/registry.ts';
import { float32Tensor, int32Tensor, leadingDecodeRows, type Ops, type StepIndex, type Tensor } from './models/ops.ts';
import type { Graph } from './native.ts';
import { WeftError } from '../core/errors.ts';
import { DENSE_TOKEN, type SparqSetting } from '../core/sparq.ts';
import { arenaTokens, chunkRanges, DEFAULT_ARENA_BYTES, graphArenaTokens, graphBucketFor, keptStepTokens, maxGraphBatch, maxStepTokens } from './step-sizes.ts';

/** The index tensors every step has (prefix groups are added to decode steps that have them: prefix-groups.ts; Sage slots to prompt chunks: sage-state.ts). */
type IndexKey = Exclude<keyof StepIndex, 'prefixGroups' | 'sparqExact' | 'keepLayers' | 'sageSlots' | 'decodeRows' | 'rowsInUse'>;

/** One index tensor's host values and shape. */
interface HostIndex {
  readonly values: Int32Array;
  readonly shape: number[];
}

/**
 * The wire batch as the step index the native ops read: the one place this conversion happens (eager steps,
 * chunks and graph inputs all come through here). The ragged table rows are padded to a fixed width,
 * maxBlocksPerSequence, so a graph's table tensor keeps its shape; padded entries lie past every position
 * a token of that row reaches, and no kernel reads them.
 */
export function stepIndexArrays(batch: StepBatch, kv: KvCacheLayout, sparq: SparqSetting = DENSE_TOKEN): Record<IndexKey, HostIndex> {
  const width = maxBlocksPerSequence(kv);
  const table = new Int32Array(batch.kvBlockTable.length * width).fill(kv.paddingBlock ?? 0);
  batch.kvBlockTable.forEach((blocks, s) => table.set(blocks, s * width));
  const vector = (values: readonly number[]): HostIndex => ({ values: Int32Array.from(values), shape: [values.length] });
  return {
    tokenIds: vector(batch.tokens),
    positions: vector(batch.positions),
    tokenSeq: vector(batch.tokenSeq),
    kvBlockTable: { values: table, shape: [batch.kvBlockTable.length, width] },
    logitRows: vector(batch.logitRows),
    // SparQ per token: the batch's, else the cluster's setting (a model without SparQ state never reads them)
    sparqR: vector(batch.sparq?.r.map((r) => r || sparq.r) ?? batch.tokens.map(() => sparq.r)),
    sparqK: vector(tokenSparqK(batch, sparq)),
  };
}

/** Each token's SparQ k: the batch's, else (0 or absent) the cluster's setting. */
function tokenSparqK(batch: StepBatch, sparq: SparqSetting): number[] {
  return batch.sparq?.k.map((k) => k || sparq.k) ?? batch.tokens.map(() => sparq.k);
}

/** stepIndexArrays' arrays as the step's index tensors on `ops`. */
export function uploadIndex(ops: Ops, arrays: Record<IndexKey, HostIndex>): StepIndex {
  const entries = Object.entries(arrays).map(([key, { values, shape }]) => [key, int32Tensor(ops, values, shape)]);
  return Object.fromEntries(entries) as unknown as StepIndex;
}

/** feedTokens' `from` that copies the first `rows` of a draw into a tensor of `size` tokens: [0, 1, .., rows - 1, -1, ..]. */
const keepFirst = (rows: number, size: number): number[] => Array.from({ length: size }, (_, i) => (i < rows ? i : -1));

const bytesOf = (values: Int32Array | Float32Array): Uint8Array => new Uint8Array(values.buffer, values.byteOffset, values.byteLength);

interface DecodeGraph {
  readonly bucket: number;
  readonly graph: Graph;
  /**
   * the graph's persistent inputs, rewritten before each replay; feedFrom [bucket] i32 is StepBatch.feed (-1: tokenIds),
   * rowsInUse [1] i32 the batch's rows (the rest pad it to the bucket)
   */
  readonly inputs: StepIndex & { rowsInUse: Tensor; feedFrom: Tensor; temperature: Tensor; topK: Tensor; topP: Tensor; uniform: Tensor };
  /** [max bucket] i32: row i of the draw goes to sampled[i] for i < bucket (-1 beyond) */
  readonly keepRows: Tensor;
  /** graph-owned outputs of the captured run, rewritten by each replay: logits [bucket, vocab] f32, the draw [bucket] i32 */
  readonly logits: Tensor;
  readonly drawn: Tensor;
}

/** A launched step: queued on the device; `result` settles once its answer is on the host. */
export interface LaunchedStep {
  readonly result: Promise<StepResult>;
}

/**
 * Where the tokens the last sampled step drew are, for the tokens fed from them: on the host (eager steps, which
 * wait for their answer anyway) or the first `rows` entries of the runner's `sampled` tensor (graph steps).
 */
type LastSampled = { readonly where: 'host'; readonly tokens: readonly number[] } | { readonly where: 'device'; readonly rows: number } | null;

export interface RunnerOptions {
  /** capture decode steps into CUDA graphs (cuda backend only). Defaults to true on cuda. */
  readonly graphs?: boolean;
  /** the engine's step arena in bytes (cuda), to size prefill chunks. Defaults to DEFAULT_ARENA_BYTES, the engine's default. */
  readonly arenaBytes?: number;
  /**
   * the most tokens of one chunk of a long eager step, under what the arena holds (cuda; unlimited on cpu): SparQ's
   * kernels' 64, tests, or a caller with a large arena that wants the product's step size (`--max-num-batched-tokens`,
   * 1024 by default). Near-equal chunks of 1185 tokens left the prefill kernel's third round of blocks 30% full and
   * took Llama-2-7B's 32000-token prompt 2751 ms on H200, chunks of 1000 2376 ms (bench/RESULTS.md, session 20, before
   * that kernel split its key range).
   */
  readonly maxStepTokens?: number;
}

export class StepRunner {
  private readonly graphs = new Map<number, DecodeGraph>();
  /** decode graphs of steps with prefix groups: their attention is bifurcated (prefix-groups.ts), one per bucket and
   * count of group slots (groupSlots), keyed `${bucket}/${slots}` */
  private readonly groupedGraphs = new Map<string, DecodeGraph>();
  private readonly useGraphs: boolean;
  /** the largest decode batch that runs as a graph (0 without graphs) */
  readonly maxGraphBatch: number;
  /** [max(max bucket, kvSlots)] i32, persistent: the last step that drew on the device left its tokens here */
  private readonly sampled: Tensor;
  private last: LastSampled = null;
  /** eager steps longer than this run in chunks (the step arena holds one chunk's intermediates) */
  readonly maxStepTokens: number;
  /** the same for a step whose every token is attended exactly: the arena's own bound, past a SparQ cap (eagerIndex) */
  readonly exactStepTokens: number;
  /** eager steps of at most these tokens keep every layer's intermediates (they fit the arena), longer ones release each */
  private readonly keptStepTokens: number;

  /** `kv`: the sizes the model's KV cache was allocated with (per layer k/v [kvBlocks, nKv, kvBlockSize, hd]) */
  constructor(
    private readonly ops: Ops,
    private readonly comm: Collectives,
    private readonly rankModel: RankModel,
    readonly kv: KvCacheLayout,
    options: RunnerOptions = {},
  ) {
    const { spec, plan } = rankModel.model;
    const shape = rankModel.model.kvCache[0]?.k.shape ?? [];
    if (shape[0] !== kv.kvBlocks || shape[2] !== kv.kvBlockSize)
      throw new WeftError('WEFT_BAD_REQUEST', `the model's KV cache is [${shape.join(', ')}], the layout says ${kv.kvBlocks} blocks of ${kv.kvBlockSize} positions`);
    this.useGraphs = ops.backend === 'cuda' && (options.graphs ?? true);
    if (this.useGraphs && kv.paddingBlock === null) throw new WeftError('WEFT_BAD_REQUEST', 'CUDA graph steps need a KV padding block for the rows that pad a batch; the layout has none');
    const arenaBytes = options.arenaBytes ?? DEFAULT_ARENA_BYTES;
    // a step cap (SparQ's kernels take 64 tokens: a bucket) bounds the graphs too
    const graphRows = Math.min(kv.kvSlots, options.maxStepTokens ?? Infinity);
    this.maxGraphBatch = this.useGraphs ? maxGraphBatch(spec, graphRows, arenaTokens(spec, plan, arenaBytes)) : 0;
    const graphTokens = graphArenaTokens(this.maxGraphBatch);
    const arenaStepTokens = ops.backend === 'cuda' ? maxStepTokens(spec, plan, arenaBytes, graphTokens) : Number.MAX_SAFE_INTEGER;
    this.maxStepTokens = Math.min(arenaStepTokens, options.maxStepTokens ?? Infinity);
    this.exactStepTokens = Math.max(this.maxStepTokens, arenaStepTokens);
    // on the CPU, whose memory is not an arena, every step releases its layers: the suite then exercises it
    this.keptStepTokens = ops.backend === 'cuda' ? keptStepTokens(spec, plan, arenaBytes, graphTokens) : 0;
    // one draw per sequence of a step (a verify step's several rows per sequence may not fit: those wait); 8 at least, as before
    this.sampled = ops.zeros('i32', [Math.max(8, this.maxGraphBatch, kv.kvSlots)]);
  }

  /** Run one step and wait for its answer. */
  async step(batch: StepBatch): Promise<StepResult> {
    return (await this.launch(batch)).result;
  }

  /**
   * Queue one step. Launches must not overlap (the caller awaits each before the next: a forward awaits its
   * collectives); results may be awaited in any order later. Rank 0 answers with what the batch asked for,
   * the other ranks with {} once their step is done.
   */
  async launch(batch: StepBatch): Promise<LaunchedStep> {
    this.check(batch);
    const bucket = this.graphBucket(batch);
    if (bucket !== null) return this.replayDecode(batch, bucket);
    if (this.drawsOnDevice(batch)) {
      const { tokens, feedFrom } = this.splitFeed(batch);
      const { feed: _feed, ...rest } = batch;
      return this.eagerAhead({ ...rest, tokens }, feedFrom);
    }
    const onHost = this.feedOnHost(batch);
    const ranges = this.stepRanges(onHost);
    const result = ranges.length <= 1 ? await this.eager(onHost) : await this.chunked(onHost, ranges);
    this.last = onHost.sample && result.tokens ? { where: 'host', tokens: result.tokens } : null;
    if (this.comm.rank !== 0) return { result: Promise.resolve({}) };
    return { result: Promise.resolve(result) };
  }

  /** An eager step that only samples, in one piece, its draw small enough for `sampled`: it need not be waited for. */
  private drawsOnDevice(batch: StepBatch): boolean {
    return !!batch.sample && !batch.scoreIds && !batch.fullLogprobs && this.stepRanges(batch).length <= 1 && batch.logitRows.length <= this.sampled.shape[0]!;
  }

  /**
   * The eager step of drawsOnDevice: fed tokens taken on the device, the draw left in `sampled` for the next step
   * and its download queued, so the step is queued without a wait (as a graph step is).
   */
  private async eagerAhead(batch: StepBatch, feedFrom: readonly number[]): Promise<LaunchedStep> {
    const { ops, sampled } = this;
    ops.beginStep();
    try {
      const step = this.eagerIndex(batch);
      if (feedFrom.some((from) => from >= 0)) ops.feedTokens(step.tokenIds, int32Tensor(ops, feedFrom), sampled);
      const logits = await forward(ops, this.comm, this.rankModel.model, this.rankModel.feedForward, step); // [R, vocab]
      const { temperature, topK, topP, uniform } = batch.sample!;
      const drawn = ops.sampleTensor(this.biased(batch, logits), float32Tensor(ops, temperature), int32Tensor(ops, topK), float32Tensor(ops, topP), float32Tensor(ops, uniform));
      const rows = batch.logitRows.length;
      ops.feedTokens(sampled, int32Tensor(ops, keepFirst(rows, sampled.shape[0]!)), drawn);
      this.last = { where: 'device', rows };
      return this.answer(ops.downloadAsync(drawn), rows, this.queueLogprobs(batch, logits, drawn));
    } finally {
      ops.endStep();
    }
  }

  /**
   * Rank 0's log-probs of the rows that ask (StepBatch.topLogprobs) of `logits` [R, vocab] at `ids` [R] i32 (a draw
   * on the device), downloaded behind the step; null when no row asks or on the other ranks. Inside a step.
   */
  private queueLogprobs(batch: StepBatch, logits: Tensor, ids: Tensor): { asks: LogprobAsks; values: Promise<Float32Array | Int32Array> } | null {
    const asks = this.comm.rank === 0 ? logprobAsks(batch) : null;
    if (!asks) return null;
    return { asks, values: this.ops.downloadAsync(this.ops.topLogprobs(logits, int32Tensor(this.ops, asks.rows), ids, asks.k)) };
  }

  /**
   * Rank 0 answers with the first `rows` tokens of a queued download (and the log-probs asked for); the other
   * ranks with {} once it landed.
   */
  private answer(drawn: Promise<Float32Array | Int32Array>, rows: number, logprobs: ReturnType<StepRunner['queueLogprobs']> = null): LaunchedStep {
    if (this.comm.rank !== 0) return { result: drawn.then(() => ({})) };
    const tokens = drawn.then((values) => Array.from(values.subarray(0, rows)));
    if (!logprobs) return { result: tokens.then((t) => ({ tokens: t })) };
    return { result: Promise.all([tokens, logprobs.values]).then(([t, values]) => ({ tokens: t, tokenLogprobs: readTokenLogprobs(values as Float32Array, logprobs.asks, rows) })) };
  }

  /**
   * The batch's tokens and where each comes from: a token fed from a draw left on the device stays there
   * (`feedFrom` >= 0, its token a placeholder); one fed from a draw on the host is filled in here.
   */
  private splitFeed(batch: StepBatch): { tokens: number[]; feedFrom: number[] } {
    const tokens = [...batch.tokens];
    const feedFrom = batch.tokens.map(() => -1);
    batch.feed?.forEach((from, t) => {
      if (from < 0) return;
      const last = this.last;
      const rows = last === null ? 0 : last.where === 'host' ? last.tokens.length : last.rows;
      if (from >= rows) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${t} is fed from logit row ${from} of the previous step, which drew ${rows} token${rows === 1 ? '' : 's'}`);
      if (last!.where === 'host') tokens[t] = last!.tokens[from]!;
      else feedFrom[t] = from;
    });
    return { tokens, feedFrom };
  }

  /** The batch with every fed token filled in on the host (eager steps): a draw left on the device is downloaded. */
  private feedOnHost(batch: StepBatch): StepBatch {
    if (!batch.feed) return batch;
    const { feed: _feed, ...rest } = batch;
    const { tokens, feedFrom } = this.splitFeed(batch);
    if (feedFrom.some((from) => from >= 0)) {
      const drawn = this.ops.download(this.sampled);
      feedFrom.forEach((from, t) => from >= 0 && (tokens[t] = drawn[from]!));
    }
    return { ...rest, tokens };
  }

  /**
   * A step too large for the step arena (a long prefill), or one whose tokens SparQ attends in two ways (stepRanges),
   * runs as consecutive chunks of tokens. Exact: each chunk writes its keys and values before the next chunk's
   * queries read them, as in one step.
   */
  private async chunked(batch: StepBatch, ranges: readonly { start: number; end: number }[]): Promise<StepResult> {
    const vocab = this.rankModel.model.spec.vocabSize;
    // What each logit row (by its index in batch.logitRows) produced, filled chunk by chunk.
    const tokens: number[] = [];
    const logprobs: number[] = [];
    const tokenLogprobs: StepResult['tokenLogprobs'] & {} = batch.topLogprobs ? batch.logitRows.map(() => null) : [];
    const full = new Float32Array(batch.fullLogprobs && this.comm.rank === 0 ? batch.logitRows.length * vocab : 0);
    for (const { start, end } of ranges) {
      const mine = batch.logitRows.flatMap((row, i) => (row >= start && row < end ? [i] : []));
      const take = <T>(values: readonly T[]): T[] => mine.map((i) => values[i]!);
      // A chunk nobody wants logits from still runs (its keys and values are needed): it asks for its last row's
      // logits and draws, scores and downloads nothing, so that the next chunk is queued behind it without a wait
      // (the wait left the GPU idle 0.9-2.9 ms at each chunk boundary of a 16384-token prompt: bench/RESULTS.md,
      // session 41).
      const asks: Partial<StepBatch> = !mine.length ? {} : {
        ...(batch.sample && {
          sample: { temperature: take(batch.sample.temperature), topK: take(batch.sample.topK), topP: take(batch.sample.topP), uniform: take(batch.sample.uniform) },
        }),
        ...(batch.scoreIds && { scoreIds: take(batch.scoreIds) }),
        ...(batch.fullLogprobs && { fullLogprobs: true }),
        ...(batch.topLogprobs && { topLogprobs: take(batch.topLogprobs) }),
        ...chunkBias(batch.logitBias, mine),
      };
      const chunk: StepBatch = {
        tokens: batch.tokens.slice(start, end),
        positions: batch.positions.slice(start, end),
        tokenSeq: batch.tokenSeq.slice(start, end),
        kvBlockTable: batch.kvBlockTable,
        logitRows: mine.length ? mine.map((i) => batch.logitRows[i]! - start) : [end - 1 - start],
        ...asks,
        ...(batch.sparq && { sparq: { r: batch.sparq.r.slice(start, end), k: batch.sparq.k.slice(start, end) } }),
      };
      const result = await this.eager(chunk);
      if (!mine.length) continue;
      const rowsFull = result.fullLogprobs ? new Float32Array(result.fullLogprobs.slice().buffer) : null;
      mine.forEach((i, k) => {
        if (result.tokens) tokens[i] = result.tokens[k]!;
        if (result.logprobs) logprobs[i] = result.logprobs[k]!;
        if (result.tokenLogprobs) tokenLogprobs[i] = result.tokenLogprobs[k]!;
        if (rowsFull) full.set(rowsFull.subarray(k * vocab, (k + 1) * vocab), i * vocab);
      });
    }
    return {
      ...(tokens.length && { tokens }),
      ...(logprobs.length && { logprobs }),
      ...(tokenLogprobs.length && this.comm.rank === 0 && { tokenLogprobs }),
      ...(full.length && { fullLogprobs: new Uint8Array(full.buffer) }),
    };
  }

  /** Benchmarks: the GPU time of one decode graph replay (no host work), in ms, over `iterations`; slots: the
   * bucket's graph for steps with that many prefix-group slots (bifurcated attention). */
  timeGraphReplay(bucket: number, iterations: number, slots = 0): number {
    const graph = slots ? this.groupedGraphs.get(`${bucket}/${slots}`) : this.graphs.get(bucket);
    if (!graph) throw new WeftError('WEFT_BAD_REQUEST', `no ${slots ? `prefix-group (${slots} slots) ` : ''}decode graph for batch bucket ${bucket} yet`);
    this.ops.synchronize();
    const started = performance.now();
    for (let i = 0; i < iterations; i++) this.ops.replay(graph.graph);
    this.ops.synchronize();
    return (performance.now() - started) / iterations;
  }

  private check(batch: StepBatch): void {
    const { kvBlocks, paddingBlock, maxContext, kvBlockSize } = this.kv;
    batch.kvBlockTable.forEach((blocks, s) => {
      const bad = blocks.find((b) => b >= kvBlocks || b === paddingBlock);
      if (bad !== undefined)
        throw new WeftError('WEFT_BAD_REQUEST', `batch sequence ${s}: KV block ${bad} is ${bad === paddingBlock ? 'the padding block' : `outside the ${kvBlocks} blocks`}`);
    });
    const badPosition = batch.positions.findIndex((p) => p >= maxContext);
    if (badPosition >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badPosition}: position ${batch.positions[badPosition]} is past the context of ${maxContext}`);
    checkKvPositions(batch, kvBlockSize);
    const vocab = this.rankModel.model.spec.vocabSize;
    const badBias = batch.logitBias?.ids.findIndex((id) => id >= vocab) ?? -1;
    if (badBias >= 0) throw new WeftError('WEFT_BAD_REQUEST', `logit bias ${badBias}: id ${batch.logitBias!.ids[badBias]} is outside the vocabulary of ${vocab}`);
    const badToken = batch.tokens.findIndex((t) => t >= vocab);
    if (badToken >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badToken}: id ${batch.tokens[badToken]} is outside the vocabulary of ${vocab}`);
  }

  /**
   * A decode batch a graph can run: one token per sequence, in order, every row sampled, nothing else asked (no
   * logit bias: its rows and ids change from step to step), small enough for a bucket.
   */
  private graphBucket(batch: StepBatch): number | null {
    if (!this.useGraphs || !batch.sample || batch.scoreIds || batch.fullLogprobs || batch.logitBias) return null;
    const n = batch.tokens.length;
    if (batch.logitRows.length !== n || batch.logitRows.some((r, i) => r !== i)) return null;
    if (batch.kvBlockTable.length !== n || batch.tokenSeq.some((s, i) => s !== i)) return null;
    return graphBucketFor(n, this.maxGraphBatch);
  }

  /**
   * An eager step's index. With SparQ's state, a step whose every token is attended exactly (its length at most its
   * k: a prompt sent dense) takes the dense kernels: SparQ's exact path gives the same attention a token at a time,
   * which a long prompt cannot afford. Graph steps never do, so that a captured step keeps one path.
   */
  private eagerIndex(batch: StepBatch): StepIndex {
    const indexed = withPrefixGroups(this.ops, uploadIndex(this.ops, stepIndexArrays(batch, this.kv, this.rankModel.model.sparq?.setting)), batch, this.kv);
    // a prompt chunk's Sage state slot (sage-state.ts): every eager step passes the directory, which watches its writes
    const sageSlots = this.rankModel.model.sage?.directory.assign(batch);
    const step = sageSlots ? { ...indexed, sageSlots: int32Tensor(this.ops, sageSlots, [batch.kvBlockTable.length, 3]) } : indexed;
    const exact = this.exactTokens(batch);
    const decodeRows = leadingDecodeRows(batch.tokenSeq);
    const mixed = decodeRows > 0 ? { ...step, decodeRows } : step;
    const kept = batch.tokens.length <= this.keptStepTokens ? { ...mixed, keepLayers: true } : mixed;
    return exact?.every((e) => e) ? { ...kept, sparqExact: true } : kept;
  }

  /** With SparQ's state, each token's class: attended exactly (its length at most its k) or not. */
  private exactTokens(batch: StepBatch): boolean[] | null {
    const setting = this.rankModel.model.sparq?.setting;
    if (setting === undefined) return null;
    const k = tokenSparqK(batch, setting);
    return batch.positions.map((p, i) => p + 1 <= k[i]!);
  }

  /**
   * The chunks an eager step runs as: within maxStepTokens; with SparQ's state, runs of one class (a prompt chunk
   * sent exact beside decode tokens, or a sequence crossing its k), the exact ones in chunks as large as a dense
   * cluster's, so that exact tokens take the dense kernels and no SparQ step passes its kernel's cap.
   */
  private stepRanges(batch: StepBatch): { start: number; end: number }[] {
    const exact = this.exactTokens(batch);
    if (!exact) return chunkRanges(batch.tokens.length, this.maxStepTokens);
    const ranges: { start: number; end: number }[] = [];
    for (let start = 0; start < exact.length; ) {
      let end = start + 1;
      while (end < exact.length && exact[end] === exact[start]) end++;
      for (const r of chunkRanges(end - start, exact[start] ? this.exactStepTokens : this.maxStepTokens)) ranges.push({ start: start + r.start, end: start + r.end });
      start = end;
    }
    return ranges;
  }

  /**
   * What the batch's rows are drawn from: `logits` [R, vocab], plus its logit bias where it has one (a dense [R, vocab]
   * of the biases, added). Their log-probs are the model's, from `logits` itself.
   */
  private biased(batch: StepBatch, logits: Tensor): Tensor {
    const bias = batch.logitBias;
    if (!bias) return logits;
    const [rows, vocab] = logits.shape as [number, number];
    const dense = new Float32Array(rows * vocab);
    bias.rows.forEach((row, j) => (dense[row * vocab + bias.ids[j]!]! += bias.values[j]!));
    return this.ops.add(logits, float32Tensor(this.ops, dense, [rows, vocab]));
  }

  private async eager(batch: StepBatch): Promise<StepResult> {
    const { ops } = this;
    ops.beginStep();
    try {
      const step = this.eagerIndex(batch);
      const logits = await forward(ops, this.comm, this.rankModel.model, this.rankModel.feedForward, step); // [R, vocab]
      const result: StepResult = {};
      // every rank draws (the same tokens: the same gathered logits and uniforms), so every rank can feed its next step
      if (batch.sample) {
        const { temperature, topK, topP, uniform } = batch.sample;
        result.tokens = Array.from(ops.sample(this.biased(batch, logits), Float32Array.from(temperature), Int32Array.from(topK), Float32Array.from(topP), Float32Array.from(uniform)));
      }
      if (this.comm.rank !== 0) return result;
      if (batch.scoreIds) result.logprobs = Array.from(ops.logprobs(logits, Int32Array.from(batch.scoreIds)));
      const asks = logprobAsks(batch);
      if (asks) {
        const ids = int32Tensor(ops, result.tokens ?? batch.scoreIds!);
        const values = ops.download(ops.topLogprobs(logits, int32Tensor(ops, asks.rows), ids, asks.k)) as Float32Array;
        result.tokenLogprobs = readTokenLogprobs(values, asks, batch.logitRows.length);
      }
      if (batch.fullLogprobs) {
        const rows = ops.download(ops.logSoftmax(logits)) as Float32Array;
        result.fullLogprobs = new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength);
      }
      return result;
    } finally {
      ops.endStep();
    }
  }

  /**
   * The decode batch padded to `bucket` rows: each padding row is a sequence of its own whose one block is the
   * padding block, at position 0, sampled greedily.
   */
  private padToBucket(batch: StepBatch, bucket: number): StepBatch & { sample: NonNullable<StepBatch['sample']> } {
    const n = batch.tokens.length;
    const pad = <T>(values: readonly T[], filler: (i: number) => T): T[] => [...values, ...Array.from({ length: bucket - n }, (_, i) => filler(n + i))];
    const sample = batch.sample ?? { temperature: [], topK: [], topP: [], uniform: [] };
    return {
      tokens: pad(batch.tokens, () => 0),
      positions: pad(batch.positions, () => 0),
      tokenSeq: pad(batch.tokenSeq, (i) => i),
      kvBlockTable: pad(batch.kvBlockTable, () => [this.kv.paddingBlock!]),
      logitRows: pad(batch.logitRows, (i) => i),
      sample: { temperature: pad(sample.temperature, () => 0), topK: pad(sample.topK, () => 0), topP: pad(sample.topP, () => 1), uniform: pad(sample.uniform, () => 0) },
      ...(batch.sparq && { sparq: { r: pad(batch.sparq.r, () => DENSE_TOKEN.r), k: pad(batch.sparq.k, () => DENSE_TOKEN.k) } }),
    };
  }

  private async replayDecode(batch: StepBatch, bucket: number): Promise<LaunchedStep> {
    this.rankModel.model.sage?.directory.observe(batch); // its writes, for the Sage state's slots
    const groups = prefixGroupArrays(batch, this.kv);
    const slots = groups ? groupSlots(groups.groupShared.length, bucket) : 0;
    const graph = (slots ? this.groupedGraphs.get(`${bucket}/${slots}`) : this.graphs.get(bucket)) ?? (await this.capture(bucket, slots));
    const { ops } = this;
    const n = batch.tokens.length;
    const { tokens, feedFrom } = this.splitFeed(batch);
    const padded = this.padToBucket({ ...batch, tokens }, bucket);
    const index = stepIndexArrays(padded, this.kv, this.rankModel.model.sparq?.setting);
    // logitRows stay the graph's own (every row, in order: graphBucket admits nothing else)
    for (const key of Object.keys(index) as IndexKey[]) if (key !== 'logitRows') ops.write(graph.inputs[key], bytesOf(index[key].values));
    ops.write(graph.inputs.feedFrom, bytesOf(Int32Array.from({ length: bucket }, (_, i) => feedFrom[i] ?? -1)));
    ops.write(graph.inputs.rowsInUse, bytesOf(Int32Array.of(n)));
    const { temperature, topK, topP, uniform } = padded.sample;
    ops.write(graph.inputs.temperature, bytesOf(Float32Array.from(temperature)));
    ops.write(graph.inputs.topK, bytesOf(Int32Array.from(topK)));
    ops.write(graph.inputs.topP, bytesOf(Float32Array.from(topP)));
    ops.write(graph.inputs.uniform, bytesOf(Float32Array.from(uniform)));
    if (groups && graph.inputs.prefixGroups) writePrefixGroups(ops, graph.inputs.prefixGroups, groups);
    ops.replay(graph.graph);
    this.last = { where: 'device', rows: n };
    // queued behind the replay: the copy holds this step's draw even after the next step overwrites `sampled`
    const draw = ops.downloadAsync(this.sampled);
    // log-probs, when a row asks, run after the replay on its graph-owned logits and draw (the next replay comes later on the stream)
    if (!batch.topLogprobs?.some((k) => k >= 0)) return this.answer(draw, n);
    ops.beginStep();
    try {
      return this.answer(draw, n, this.queueLogprobs(batch, graph.logits, graph.drawn));
    } finally {
      ops.endStep();
    }
  }

  /**
   * Capture the decode graph of one bucket: a warm-up run first (first-use work stays out of the graph). The graph
   * begins by taking its fed tokens from `sampled` and ends by storing its draw there.
   */
  private async capture(bucket: number, slots = 0): Promise<DecodeGraph> {
    const { ops, sampled } = this;
    // the warm-up overwrites `sampled`: a draw still waiting there to be fed comes to the host first
    if (this.last?.where === 'device') this.last = { where: 'host', tokens: Array.from(ops.download(sampled).subarray(0, this.last.rows)) };
    // every row a padding row until the first replay writes the real ones
    const padded = this.padToBucket({ tokens: [], positions: [], tokenSeq: [], kvBlockTable: [], logitRows: [] }, bucket);
    const inputs = {
      ...uploadIndex(ops, stepIndexArrays(padded, this.kv, this.rankModel.model.sparq?.setting)),
      ...(slots > 0 && { prefixGroups: prefixGroupTensors(ops, bucket, slots) }),
      feedFrom: int32Tensor(ops, Array(bucket).fill(-1)),
      rowsInUse: int32Tensor(ops, [0]),
      temperature: float32Tensor(ops, padded.sample.temperature),
      topK: int32Tensor(ops, padded.sample.topK),
      topP: float32Tensor(ops, padded.sample.topP),
      uniform: float32Tensor(ops, padded.sample.uniform),
    };
    // sampled[i] = the draw of row i, for the bucket's rows
    const keepRows = int32Tensor(ops, keepFirst(bucket, sampled.shape[0]!));
    const run = async (): Promise<{ logits: Tensor; drawn: Tensor }> => {
      ops.feedTokens(inputs.tokenIds, inputs.feedFrom, sampled);
      const logits = await forward(ops, this.comm, this.rankModel.model, this.rankModel.feedForward, inputs);
      const drawn = ops.sampleTensor(logits, inputs.temperature, inputs.topK, inputs.topP, inputs.uniform);
      ops.feedTokens(sampled, keepRows, drawn);
      return { logits, drawn };
    };
    ops.beginStep();
    try {
      await run(); // warm-up, eager
    } finally {
      ops.endStep();
    }
    ops.beginStep();
    let graph: Graph;
    let outputs: { logits: Tensor; drawn: Tensor };
    try {
      ops.captureBegin();
      try {
        outputs = await run();
      } finally {
        graph = ops.captureEnd();
      }
    } finally {
      ops.endStep();
    }
    const decodeGraph = { bucket, graph, inputs, keepRows, ...outputs! };
    if (slots) this.groupedGraphs.set(`${bucket}/${slots}`, decodeGraph);
    else this.graphs.set(bucket, decodeGraph);
    return decodeGraph;
  }
}

/** The logit bias of a chunk whose logit rows are the batch's rows `mine` (by index), renumbered as the chunk's; {} for none. */
function chunkBias(bias: StepBatch['logitBias'], mine: readonly number[]): Pick<StepBatch, 'logitBias'> {
  const at = new Map(mine.map((i, k) => [i, k]));
  const kept = bias?.rows.flatMap((row, j) => (at.has(row) ? [j] : [])) ?? [];
  if (!bias || kept.length === 0) return {};
  return { logitBias: { rows: kept.map((j) => at.get(bias.rows[j]!)!), ids: kept.map((j) => bias.ids[j]!), values: kept.map((j) => bias.values[j]!) } };
}
