/**
 * The native surface of weft: declares every export of `native/build/weft.node` and loads it.
 * Nothing else imports the `.node`; the rest of weft goes through {@link createEngine} and {@link nativeInfo}.
 *
 * Tensors are opaque handles owned by an engine; ops take handles and plain numbers and return new tensors
 * unless they say "in place": made outside a step, freed when garbage-collected; made inside one, freed by the
 * step rule (`beginStep`, `releaseLayer`). Every native failure is thrown as an `Error`
 * with `code: 'WEFT_NATIVE'` and `op`, its message naming the op, the parameter and the shapes, e.g.
 * `matmul: x [3, 64] f32 and w [128, 32] bf16 do not match (expected w [N, 64])`; an argument of the wrong
 * JS type (a plain object where a tensor is expected) is a `TypeError` with the same `code`.
 *
 * @example
 * const engine = createEngine({ backend: 'cpu' });
 * const x = engine.upload(new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer), 'f32', [2, 2]);
 * engine.download(engine.matmul(x, x)); // Float32Array [5, 11, 11, 25]
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CudaReport } from '../core/host-probe.ts';

export type DType = 'f32' | 'f16' | 'bf16' | 'i32' | 'fp8' | 'i8'; // fp8, i8: KV caches only (zeros)

/** An opaque native tensor handle. `dtype` and `shape` are read-only copies of the native values. */
export interface Tensor {
  readonly dtype: DType | 'i8' | 'i4'; // i8, i4: a quantized weight (uploadQuantized)
  readonly shape: readonly number[];
  /**
   * Frees the storage now. Without it the storage is freed after garbage collection, and Node runs the
   * native finalizers only once the current synchronous JS has returned: a forward pass that runs
   * synchronously holds all of its intermediates until it ends. Passing a disposed tensor to an op throws
   * (`x [3, 64] f32 was disposed`); disposing twice is a no-op.
   */
  dispose(): void;
}

export interface EngineOptions {
  /** Which backend runs the ops. 'cuda' needs a build with `WEFT_CUDA=1`. */
  backend: 'cpu' | 'cuda';
  /** CUDA device ordinal. Ignored by the CPU backend. Defaults to 0. */
  device?: number;
  /** CPU backend: threads for matmul and attention, the calling thread included (1 to 1024). Defaults to the number of hardware threads. */
  threads?: number;
  /**
   * CUDA backend: bytes of the step arena, one device buffer that every tensor made between `beginStep()` and
   * `endStep()` is bumped out of (allocated at the first `beginStep()`). Ignored by the CPU backend.
   * Defaults to 4 GiB.
   */
  arenaBytes?: number;
  /** CUDA backend, for tests: fill every new tensor with 0xff bytes (NaN in f32) so unwritten outputs show. Defaults to false. */
  poison?: boolean;
}

/** A captured CUDA graph (`captureEnd()`); freed when garbage-collected or disposed. */
export interface Graph {
  /** Frees the graph now; replaying it afterwards throws. */
  dispose(): void;
}

/**
 * Shapes: T tokens, H hidden, K/N matmul in/out features, hd head dimension, R rows, V vocabulary columns.
 * The KV cache is a pool of blocks, caches [nBlocks, nKv, B, hd] f32, or bf16 (written rounded to nearest even,
 * read into f32 arithmetic; k and v caches of one dtype), B positions per block, addressed
 * through tokenSeq [T] i32 (each token's row of the table) and kvBlockTable [S, maxBlocksPerSeq] i32
 * (physical block ids; block j of a sequence holds its positions [j B, (j + 1) B)): token t's position p
 * lives in block kvBlockTable[tokenSeq[t]][p / B], row p % B. One block per sequence (B = maxContext) is
 * the case maxBlocksPerSeq = 1. CPU checks: tokenSeq < S, position < maxBlocksPerSeq * B, and each table entry
 * an op reaches < nBlocks (entries no token reaches are not read); CUDA reports them on the device. All arithmetic is fp32; f16/bf16 weights are converted as read.
 */
export interface Engine {
  readonly backend: 'cpu' | 'cuda';
  /** Little-endian raw bytes; `bytes.length` must equal numel * element size. */
  upload(bytes: Uint8Array, dtype: DType, shape: number[]): Tensor;
  /**
   * A quantized weight for matmul, siluMulMatmul and the expert matmuls: w [N, K] or [El, N, K] as int8 values
   * ('i8', numel bytes) or int4 codes value + 8 two per byte along K, the even column in the low nibble ('i4',
   * numel / 2 bytes), and `scales` [..., N, K / group] bf16 (uploaded before): w = q * scale of its column's group.
   */
  uploadQuantized(bytes: Uint8Array, dtype: 'i8' | 'i4', shape: number[], scales: Tensor): Tensor;
  /** A copy: f32/f16/bf16 as Float32Array (converted), i32 as Int32Array. */
  download(t: Tensor): Float32Array | Int32Array;
  /**
   * download without waiting: the copy is queued behind the work queued so far and the promise resolves when it
   * has landed, so the caller may queue the next step meanwhile (cuda; the cpu backend copies at once). Device-side
   * index errors reject it as they would fail download.
   */
  downloadAsync(t: Tensor): Promise<Float32Array | Int32Array>;
  zeros(dtype: DType, shape: number[]): Tensor;
  /** table [Vr, H] f32|f16|bf16, ids [T] i32 -> [T, H] f32; ids outside [vocabStart, vocabStart + Vr) give zero rows (vocab-parallel). */
  embedding(table: Tensor, ids: Tensor, vocabStart: number): Tensor;
  /** x [T, H] f32, weight [H] f32|f16|bf16 -> [T, H] f32 = x / sqrt(mean(x^2) + eps) * weight (HF LlamaRMSNorm, all fp32). */
  rmsNorm(x: Tensor, weight: Tensor, eps: number): Tensor;
  /** x [T, K] f32, w [N, K] f32|f16|bf16 or quantized (uploadQuantized) -> [T, N] f32 = x @ w^T. */
  matmul(x: Tensor, w: Tensor): Tensor;
  /** a, b: same shape, f32. */
  add(a: Tensor, b: Tensor): Tensor;
  /** x [T, nHeads * headDim] f32, positions [T] i32 (>= 0), invFreq [headDim / 2] f32 -> rotated x (HF rotate_half per head). */
  rope(x: Tensor, positions: Tensor, invFreq: Tensor, headDim: number): Tensor;
  /**
   * In place: the cache row of (tokenSeq[t], positions[t]), kv head h = k[t, h*hd:(h+1)*hd], likewise vCache
   * from v. Caches [nBlocks, nKv, B, hd] f32; k, v [T, nKv * hd] f32; tokenSeq, positions [T] i32;
   * kvBlockTable [S, maxBlocksPerSeq] i32.
   */
  writeKv(kCache: Tensor, vCache: Tensor, k: Tensor, v: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor): void;
  /**
   * q [T, nHeads * hd] f32 -> [T, nHeads * hd] f32. Query t, head h attends over kv head h / (nHeads / nKv) of
   * its sequence (row tokenSeq[t] of kvBlockTable), positions 0..positions[t] inclusive, each row read through
   * the table; softmax(q.k * scale) in fp32. nKv, B, hd come from the cache shape; nHeads % nKv must be 0.
   * decodeRows (0..T, default 0): the first rows are each their sequence's only row (a mixed step's decode rows,
   * StepIndex.decodeRows): cuda runs them as a decode batch and the rest as a prefill. Speed only: any value gives
   * every row the same result.
   */
  attention(q: Tensor, kCache: Tensor, vCache: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor, nHeads: number, scale: number, decodeRows?: number): Tensor;
  /**
   * Bifurcated decode attention: equals `attention` with the same arguments, but tokens whose sequences share
   * their leading KV blocks (the samples of one prompt) read them once for the whole group. tokenGroup [T] i32:
   * token t's prefix group, -1 for none; groupShared [G] i32: group g's members share positions
   * [0, groupShared[g]) (0: an unused slot), read through the table row of its first member; each member then
   * attends over its own positions groupShared[g]..positions[t]. Needs groupShared[g] <= positions[t] + 1 for
   * each member and the members' rows holding the same blocks there (checked on the CPU). hd <= 256.
   */
  attentionBifurcated(q: Tensor, kCache: Tensor, vCache: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor, tokenGroup: Tensor, groupShared: Tensor, nHeads: number, scale: number): Tensor;
  /**
   * Fused residual add and RMSNorm, one kernel: x, y [T, H] f32, weight [H] f32|f16|bf16 ->
   * `{ sum: x + y, normed: rmsNorm(x + y, weight, eps) }`, both [T, H] f32, equal to `add` then `rmsNorm`.
   */
  addRmsNorm(x: Tensor, y: Tensor, weight: Tensor, eps: number): { sum: Tensor; normed: Tensor };
  /**
   * Fused rope and KV write, one kernel, out of a fused q/k/v projection: qkv [T, (nHeads + 2 nKv) hd] f32
   * (nHeads q heads, then nKv k heads, then nKv v heads), positions [T] i32, invFreq [hd / 2] f32, caches
   * [nBlocks, nKv, B, hd] f32, tokenSeq [T] i32, kvBlockTable [S, maxBlocksPerSeq] i32 -> q [T, nHeads * hd]
   * f32 = rope(q heads). In place: the cache rows of (tokenSeq[t], positions[t]) get rope(k heads) and the v
   * heads. Equals `sliceCols` x 3, `rope` of q and k, then `writeKv`; nKv, B and hd come from the cache
   * shape, and the same index checks apply.
   */
  qkvRope(qkv: Tensor, positions: Tensor, invFreq: Tensor, kCache: Tensor, vCache: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, nHeads: number): Tensor;
  /**
   * SparQ's state update, after `qkvRope` wrote the step's rows: kT [nBlocks, nKv, hd, B] (the caches' dtype) gets
   * each token's K row transposed within its block; vSum [nBlocks, nKv, hd] f32 gets a block's V row sum when the
   * block's last row is written. Same index checks as `writeKv`. Capturable.
   */
  sparqAppend(kT: Tensor, vSum: Tensor, kCache: Tensor, vCache: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor): void;
  /**
   * SparQ approximate attention, as `attention` but per token t with sparqR [T] i32 columns (1..hd) and sparqK [T]
   * i32 rows (>= 1): the r largest |q| components (summed over the GQA group) score every position, the k best
   * positions get exact attention, blended with the mean of V by the approximate mass they hold. A token of length
   * <= its k gets the exact attention. Algorithm: native/src/cuda/attention-sparq.cuh.
   */
  sparqAttention(q: Tensor, kCache: Tensor, vCache: Tensor, kT: Tensor, vSum: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor, sparqR: Tensor, sparqK: Tensor, nHeads: number, scale: number): Tensor;
  /**
   * SageAttention-style quantized prefill attention (--prefill-attention): as `attention`, with Q and the K rows
   * (less their mean per sequence and kv head) in int8 per block of 64 rows, and P V in f16 (pv 'f16') or e4m3
   * (pv 'fp8'). Decode is untouched: the first decodeRows rows (as `attention`'s) get `attention` itself, and so
   * do steps where at most 64 rows follow them and decode batches (one token per sequence); the rows after them are
   * quantized as a step of their own (a decode row whose sequence has rows after it is refused, or on cuda reported
   * at the next sync). cuda: head dims 64 and 128. Algorithm: native/src/cuda/attention-sage.cuh. sageState: the
   * layer's slots and the step's use of them, [header, means, blocks, slots] (native/src/sage-state.h,
   * worker/models/sage-state.ts): a prompt's blocks quantized once across its steps; a short step still empties the
   * slots it starts afresh. Two rows naming one slot are refused on the CPU and must not be given on CUDA (the
   * directory never does).
   */
  sageAttention(q: Tensor, kCache: Tensor, vCache: Tensor, tokenSeq: Tensor, kvBlockTable: Tensor, positions: Tensor, nHeads: number, scale: number, pv: 'f16' | 'fp8', sageState?: readonly [Tensor, Tensor, Tensor, Tensor], decodeRows?: number): Tensor;
  /** In place: dst = src, same dtype and shape (e.g. a graph's result into a persistent tensor). Capturable. */
  copy(dst: Tensor, src: Tensor): void;
  /**
   * In place: ids[i] = from[i] < 0 ? ids[i] : src[from[i]]; ids, from [N] i32, src [M] i32. A step's tokens taken
   * from those the previous step sampled, on the device. Capturable; from[i] >= M is an error (cuda: at the next sync).
   */
  feedTokens(ids: Tensor, from: Tensor, src: Tensor): void;
  /** gateUp [T, 2F] f32 -> [T, F] f32 = silu(gateUp[:, :F]) * gateUp[:, F:]. */
  siluMul(gateUp: Tensor): Tensor;
  /**
   * gateUp [T, 2K] f32, w [N, K] f32|f16|bf16 -> [T, N] f32 = `matmul(siluMul(gateUp), w)`, equal to the two ops.
   * On CUDA up to 8 tokens it is one GEMV that forms silu(gate) * up as it loads x: no intermediate tensor.
   */
  siluMulMatmul(gateUp: Tensor, w: Tensor): Tensor;
  /**
   * x [T, K] f32, w [2F, K] (gate rows, then up rows; any matmul weight) -> [T, F] f32 = `siluMul(matmul(x, w))`,
   * SwiGLU's two products and their product. On CUDA one token is one GEMV whose warps each sum a gate row and its
   * up row and store silu(gate) * up: the down projection then reads a finished input.
   */
  matmulSiluMul(x: Tensor, w: Tensor): Tensor;
  /** x [T, N] (any dtype) -> [T, end - start] copy, same dtype. */
  sliceCols(x: Tensor, start: number, end: number): Tensor;
  /** xs[i] [T, Ni], all one dtype (f32 in models) -> [T, sum Ni]. */
  concatCols(xs: Tensor[]): Tensor;
  /** x [T, N] (any dtype), rows [R] i32 (each < T) -> [R, N]. */
  gatherRows(x: Tensor, rows: Tensor): Tensor;
  /**
   * Mixtral's router: logits [T, E] f32 -> experts [T, k] i32 and weights [T, k] f32. Per token: softmax over all
   * E in fp32, the k most probable experts (highest first, ties to the lower index), their probabilities
   * divided by their sum (Hugging Face's rule). 1 <= k <= E. Runs on the device and can be captured.
   * rowsInUse ([1] i32, a graph step's real rows): the rows at and past its value only pad the step to its bucket,
   * and their k pairs choose no expert (ids -1 .. -k, weights 0), so no expert GEMV reads weights for them.
   */
  routeTopK(logits: Tensor, k: number, rowsInUse?: Tensor): { experts: Tensor; weights: Tensor };
  /**
   * x [X, K] f32, w [El, N, K] f32|f16|bf16 (experts expertStart .. expertStart + El - 1, stacked), experts
   * [T, k] i32 -> [T * k, N] f32. Row p = t * k + j is x row t (X = T) or x row p (X = T * k) times the weights of
   * expert experts[t, j], or zeros when w does not hold that expert (expert parallelism). Each expert's weights
   * are read once for all of its rows, and experts nobody chose are not read. A token's k experts must be
   * distinct. Up to 8 tokens the routing stays on the device (capturable); more tokens are grouped by expert on
   * the host (cuda: one synchronisation, not capturable).
   */
  expertMatmul(x: Tensor, w: Tensor, experts: Tensor, expertStart: number): Tensor;
  /** `expertMatmul(siluMul(gateUp), w, experts, expertStart)` with gateUp [X, 2K]; fused into the expert GEMV up to 8 tokens on CUDA. */
  siluMulExpertMatmul(gateUp: Tensor, w: Tensor, experts: Tensor, expertStart: number): Tensor;
  /** y [T * k, N] f32, weights [T, k] f32 -> [T, N] f32: out[t] = sum over j of weights[t, j] * y[t * k + j]. */
  combineExperts(y: Tensor, weights: Tensor): Tensor;
  /** logits [R, V] f32 -> [R, V] f32 log-softmax per row (max subtracted). */
  logSoftmax(logits: Tensor): Tensor;
  /** logits [R, V] f32, ids [R] (each < V) -> [R] log_softmax(logits[r])[ids[r]]. */
  logprobs(logits: Tensor, ids: Int32Array): Float32Array;
  /**
   * logits [R, V] f32, rows [Q] i32 (each < R), ids [R] i32, 0 <= k <= 20 -> [Q, 1 + 2k] f32: for logit row
   * r = rows[q], log_softmax(logits[r])[ids[r]], then the k most likely ids (as floats, exact), then their
   * log-probs; highest first, ties to the lower id (id -1 and -Infinity past a row's numbers). The raw logits'
   * log-softmax (no temperature, top-k or top-p). On the device, so `ids` may be sampleTensor's draw; capturable.
   */
  topLogprobs(logits: Tensor, rows: Tensor, ids: Tensor, k: number): Tensor;
  /**
   * logits [R, V] f32 (no NaN) and per-row arrays of length R -> [R] token ids. Per row: temperature <= 0 is
   * argmax (lowest index on ties). Otherwise z = logits / temperature; candidates sorted by z descending, ties
   * by lower index; topK > 0 keeps the first topK; p = softmax over kept (double, max subtracted); topP < 1
   * keeps the shortest prefix with cumulative p >= topP (at least one); the result is the first candidate
   * whose cumulative p exceeds uniform * (sum of kept p), else the last kept. topK >= 0, topP and uniform in [0, 1].
   */
  sample(logits: Tensor, temperature: Float32Array, topK: Int32Array, topP: Float32Array, uniform: Float32Array): Int32Array;
  /**
   * {@link Engine.sample} with every argument a tensor (temperature [R] f32, topK [R] i32, topP [R] f32,
   * uniform [R] f32) and the result a tensor [R] i32, so that it runs on the device and can be captured.
   * Greedy rows (temperature <= 0) equal `sample` exactly; other rows sample the same distribution, though
   * the CUDA kernel may pick among equal candidates in another order. Value errors (topP outside [0, 1], NaN
   * logits) throw at once on the CPU and at the next synchronising call on CUDA.
   */
  sampleTensor(logits: Tensor, temperature: Tensor, topK: Tensor, topP: Tensor, uniform: Tensor): Tensor;
  /**
   * A persistent tensor of uniform values in [-scale, scale) made on the device from a counter-based hash
   * of (seed, index), for real-shaped benchmark weights without host uploads. f32 values are the same on
   * both backends; f16/bf16 round toward zero.
   */
  randomUniform(dtype: 'f32' | 'f16' | 'bf16', shape: number[], seed: number, scale: number): Tensor;
  /** Overwrites t's contents (bytes.length must equal its size), ordered after queued work: a later `replay` sees the new values. */
  write(t: Tensor, bytes: Uint8Array): void;

  /**
   * Starts a step: from here until `endStep()` every new tensor is step memory (CUDA: the step arena; CPU: the
   * heap), and tensors of earlier steps become stale: their memory is freed or reused now, whatever handles remain,
   * and passing one to an op throws `tensor from an earlier step`. Step memory is not reported to V8 as external
   * memory (its lifetime is the rule's, not the collector's).
   */
  beginStep(): void;
  /** Ends the step: new tensors are persistent again. This step's tensors stay usable until the next `beginStep()`. */
  endStep(): void;
  /** Marks the step memory made so far, before the first layer: what `releaseLayer` frees down to (outside a step, nothing). */
  layerMark(): number;
  /**
   * At a layer's end: frees the step memory made since `mark` except `keep`, which comes back moved down to it (new
   * handles, same values); any other tensor made since the mark then throws `released at the end of its layer`.
   * The mark stays open (marks made after it close), so each layer releases to the same mark, freeing what the
   * layer before kept: a long step holds one layer's intermediates and one residual. Inside a capture, and on
   * CUDA for steps of at most 16 rows (small intermediates; the next GEMV takes their held norm), it frees
   * nothing and returns `keep`; outside a step too (persistent tensors go with their last handle).
   */
  releaseLayer(mark: number, keep: Tensor[]): Tensor[];
  /**
   * Starts capturing a CUDA graph on the engine stream (inside a step). Ops record instead of run; host
   * copies (`upload`, `download`, `write`, `sample`, `logprobs`) throw. The graph may read persistent tensors
   * and tensors made during the capture, never step tensors made before it. CPU: throws "graphs need the cuda backend".
   */
  captureBegin(): void;
  /** Ends the capture. Tensors made during it keep their memory (the graph's) as long as they or the graph live. */
  captureEnd(): Graph;
  /** Launches a captured graph on the engine stream; it reads the current contents of its input tensors. */
  replay(graph: Graph): void;

  /** CUDA: the tensor's device address, for NCCL calls through koffi. CPU: throws. */
  devicePointer(t: Tensor): bigint;
  /** CUDA: the engine's cudaStream_t (all ops run on it). CPU: throws. */
  streamHandle(): bigint;
  /** Waits until the engine's queued work is done; device-side errors (indices out of range) are reported here. */
  synchronize(): void;
  /** Bytes free and total: device memory (CUDA) or physical memory (CPU). */
  memoryInfo(): { free: number; total: number };
  /** CUDA: read-only streaming bandwidth in GB/s over `bytes`, best of `iterations`. CPU: throws. */
  measureBandwidth(bytes: number, iterations: number): number;
  /**
   * Benchmarks: CUDA, wait for the queued work, then start (true) or stop (false) a profiler's collection, so that
   * `ncu --profile-from-start off` times only the kernels in between (bench/kernels/profile-step.sh). CPU: no-op.
   */
  profileRange(on: boolean): void;
}

/** What the loaded binary was built with. */
export interface NativeInfo {
  /** true when this build has a CUDA backend. */
  cuda: boolean;
  /** package.json's version at build time. */
  version: string;
}

/** Where a shared-GPU group's exchange regions live: device memory shared through CUDA IPC, or a /dev/shm file. */
export type SharedGpuMemory = 'device-ipc' | 'host-shm';

/**
 * One rank of a group of processes sharing one GPU (native/src/shared-gpu.h; worker/collectives/shared-gpu.ts
 * drives it). Device addresses and the stream are an engine's `devicePointer` and `streamHandle`; every call
 * queues kernels on that stream (capturable) and returns at once. CUDA builds only: elsewhere the constructor throws.
 */
export interface SharedGpuGroup {
  /** This rank's exchange region for its peers: a CUDA IPC handle (64 bytes) or a /dev/shm file name. */
  handle(): Uint8Array;
  /** Maps the peers' regions (every rank's handle, in rank order). Throws naming the CUDA call that refused. */
  connect(handles: Uint8Array[]): void;
  /** Every rank has connected: this rank's handle may go (a /dev/shm file is unlinked, so a killed process leaves none). */
  peersConnected(): void;
  /** In place: x [count] f32 = the sum over the ranks, added in rank order. */
  allReduce(x: bigint, count: number, stream: bigint): void;
  /** x [rows, widths[rank]] f32 -> out [rows, sum(widths)] f32 (out made by the caller). */
  allGatherCols(x: bigint, out: bigint, rows: number, widths: Int32Array, stream: bigint): void;
  /** The group's first failure as the device recorded it: a peer that did not arrive within the timeout. */
  status(): { failed: boolean; peer: number; collective: number; op: 'allReduce' | 'allGatherCols' | '' };
  /** Waits for the device, unmaps the peers' regions and frees this rank's; later calls throw. */
  close(): void;
}

interface NativeAddon {
  Engine: new (options: EngineOptions) => Engine;
  nativeInfo(): NativeInfo;
  cudaReport(): CudaReport;
  SharedGpuGroup: new (device: number, rank: number, world: number, dataBytes: number, timeoutMs: number, memory: SharedGpuMemory) => SharedGpuGroup;
  cudaDeviceCount(): number;
}

/** Relative to this file: worker/native.ts in the source tree, dist/worker/native.js when compiled. */
const CANDIDATES = ['../native/build/weft.node', '../../native/build/weft.node'];

let addon: NativeAddon | undefined;

function likelyFix(message: string): string {
  if (/libcudart|libcublas|libnccl|libcuda\b|libcuda\.so/.test(message)) {
    return 'the CUDA libraries were not found: install the CUDA runtime and cuBLAS, or add their directory to LD_LIBRARY_PATH (or rebuild CPU-only with `npm run build:native`)';
  }
  if (/GLIBC|GLIBCXX|CXXABI/.test(message)) {
    return 'the binary was built on a host with a newer C/C++ runtime: run `npm run build:native` on this host';
  }
  if (/invalid ELF|wrong ELF class|not a mach-o|slice is not valid|exec format/i.test(message)) {
    return 'the binary was built for another platform or architecture: run `npm run build:native` on this host';
  }
  return 'run `npm run build:native` (needs cmake and a C++ compiler)';
}

function load(): NativeAddon {
  if (addon) return addon;
  const here = path.dirname(fileURLToPath(import.meta.url));
  const tried = CANDIDATES.map((c) => path.resolve(here, c));
  const found = tried.find((p) => existsSync(p));
  let cause: unknown;
  let detail: string;
  if (found) {
    try {
      addon = createRequire(import.meta.url)(found) as NativeAddon;
      return addon;
    } catch (err) {
      cause = err;
      detail = `loading ${found} failed: ${err instanceof Error ? err.message : String(err)}`;
    }
  } else {
    detail = 'no such file';
  }
  const error = new Error(
    `weft: cannot load the native addon weft.node (tried ${tried.join(', ')}): ${detail}. Likely fix: ${likelyFix(detail)}`,
    { cause },
  ) as Error & { code: string };
  error.code = 'WEFT_NATIVE';
  throw error;
}

/**
 * Creates an engine on the chosen backend. The addon is loaded on first use, so importing this module never
 * fails; a missing or broken build throws here with the paths tried and the likely fix.
 * `backend: 'cuda'` on a CPU-only build throws "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a
 * host with nvcc and cuBLAS)".
 */
export function createEngine(options: EngineOptions): Engine {
  return new (load().Engine)(options);
}

/** Build facts of the native addon (loads it if needed). */
export function nativeInfo(): NativeInfo {
  return load().nativeInfo();
}

/** The CUDA runtime's versions and devices as this build sees them (loads the addon if needed). */
export function cudaReport(): CudaReport {
  return load().cudaReport();
}

/** Opens rank `rank` of a shared-GPU group on CUDA device `device`; its data area holds `dataBytes` (larger collectives run in chunks). */
export function openSharedGpuGroup(options: { device: number; rank: number; world: number; dataBytes: number; timeoutMs: number; memory: SharedGpuMemory }): SharedGpuGroup {
  const { device, rank, world, dataBytes, timeoutMs, memory } = options;
  return new (load().SharedGpuGroup)(device, rank, world, dataBytes, timeoutMs, memory);
}

/** The CUDA devices this process sees; 0 on a build without CUDA or a host without a GPU. */
export function cudaDeviceCount(): number {
  return load().cudaDeviceCount();
}
