/**
 * NCCL collectives through koffi, enqueued on the engine's CUDA stream so that they are captured into CUDA
 * graphs together with the kernels. Device addresses and the stream cross into NCCL here and nowhere else.
 * Errors carry ncclGetErrorString, the rank and the operation. NVLink multicast (NVLS) must be off in the
 * worker's environment (NCCL_NVLS_ENABLE=0, set by the process that spawns it: NCCL reads it at init).
 */
import koffi from 'koffi';
import { promisify } from 'node:util';
import type { Engine, Tensor } from '../native.ts';
import { preparedWidths, type CollectivePlan, type Collectives } from './collectives.ts';
import { WeftError } from '../../core/errors.ts';

const NCCL_UNIQUE_ID_BYTES = 128;
const ncclFloat32 = 7;
const ncclSum = 0;

interface NcclLibrary {
  getUniqueId(): Uint8Array;
  initRank(nRanks: number, id: Uint8Array, rank: number): Promise<unknown>;
  allReduce(send: bigint, recv: bigint, count: number, comm: unknown, stream: bigint): number;
  allGather(send: bigint, recv: bigint, count: number, comm: unknown, stream: bigint): number;
  broadcast(send: bigint, recv: bigint, count: number, root: number, comm: unknown, stream: bigint): number;
  groupStart(): number;
  groupEnd(): number;
  asyncError(comm: unknown): number;
  abort(comm: unknown): number;
  errorString(code: number): string;
  version(): number;
}

export const DEFAULT_NCCL_LIBRARY = 'libnccl.so.2';

const libraries = new Map<string, NcclLibrary>();
let typesDeclared = false;

/** koffi's configuration and the NCCL types, once per process (koffi refuses a type name declared twice). */
function declareTypes(): void {
  if (typesDeclared) return;
  typesDeclared = true;
  // NCCL's init runs deep (CUDA driver init, its own threads) on koffi's call stacks, which default to
  // 128 KiB for async calls and 2 MiB for sync ones: too small, and an overflow is a segmentation fault.
  koffi.config({ ...koffi.config(), sync_stack_size: 16 << 20, async_stack_size: 16 << 20, resident_async_pools: 2 });
  // A char array would be decoded as a string and cut at the first zero byte: the id is 128 raw bytes.
  koffi.struct('weft_ncclUniqueId', { internal: koffi.array('uint8_t', NCCL_UNIQUE_ID_BYTES, 'Typed') });
  // ncclComm_t is itself a pointer (to an opaque struct): by value in collectives, `_Out_ ncclComm_t *` in init.
  koffi.pointer('weft_ncclComm', koffi.opaque());
}

/** Load the NCCL library at `path` once (the configuration supplies it); a clear error when it is missing. */
export function loadNccl(path = DEFAULT_NCCL_LIBRARY): NcclLibrary {
  const loaded = libraries.get(path);
  if (loaded) return loaded;
  declareTypes();
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load(path);
  } catch (err) {
    throw new WeftError('WEFT_NATIVE', `cannot load ${path} (install NCCL or add its directory to LD_LIBRARY_PATH): ${(err as Error).message}`);
  }
  const getUniqueId = lib.func('int ncclGetUniqueId(_Out_ weft_ncclUniqueId *id)');
  const commInitRank = lib.func('int ncclCommInitRank(_Out_ weft_ncclComm *comm, int nranks, weft_ncclUniqueId id, int rank)');
  const allReduce = lib.func('int ncclAllReduce(uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int op, weft_ncclComm comm, uintptr_t stream)');
  const allGather = lib.func('int ncclAllGather(uintptr_t sendbuff, uintptr_t recvbuff, size_t sendcount, int datatype, weft_ncclComm comm, uintptr_t stream)');
  const broadcast = lib.func('int ncclBroadcast(uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int root, weft_ncclComm comm, uintptr_t stream)');
  const groupStart = lib.func('int ncclGroupStart()');
  const groupEnd = lib.func('int ncclGroupEnd()');
  const getAsyncError = lib.func('int ncclCommGetAsyncError(weft_ncclComm comm, _Out_ int *asyncError)');
  const commAbort = lib.func('int ncclCommAbort(weft_ncclComm comm)');
  const getErrorString = lib.func('const char *ncclGetErrorString(int result)');
  const getVersion = lib.func('int ncclGetVersion(_Out_ int *version)');

  const check = (code: number, what: string): void => {
    if (code !== 0) throw new WeftError('WEFT_NATIVE', `${what}: NCCL error ${code}: ${getErrorString(code) as string}`);
  };
  const library: NcclLibrary = {
    getUniqueId() {
      const id = { internal: new Uint8Array(NCCL_UNIQUE_ID_BYTES) };
      check(getUniqueId(id) as number, 'ncclGetUniqueId');
      return Uint8Array.from(id.internal);
    },
    async initRank(nRanks, id, rank) {
      if (id.byteLength !== NCCL_UNIQUE_ID_BYTES) throw new WeftError('WEFT_PROTOCOL', `NCCL unique id must be ${NCCL_UNIQUE_ID_BYTES} bytes, got ${id.byteLength}`);
      const out: [unknown] = [null];
      // ncclCommInitRank blocks until every rank has joined: run it off the event loop so heartbeats go on.
      const code = (await promisify(commInitRank.async)(out, nRanks, { internal: Uint8Array.from(id) }, rank)) as number;
      check(code, `ncclCommInitRank (rank ${rank} of ${nRanks})`);
      return out[0];
    },
    allReduce: (send, recv, count, comm, stream) => allReduce(send, recv, count, ncclFloat32, ncclSum, comm, stream) as number,
    allGather: (send, recv, count, comm, stream) => allGather(send, recv, count, ncclFloat32, comm, stream) as number,
    broadcast: (send, recv, count, root, comm, stream) => broadcast(send, recv, count, ncclFloat32, root, comm, stream) as number,
    groupStart: () => groupStart() as number,
    groupEnd: () => groupEnd() as number,
    asyncError(comm) {
      const out = [0];
      getAsyncError(comm, out);
      return out[0]!;
    },
    abort: (comm) => commAbort(comm) as number,
    errorString: (code) => getErrorString(code) as string,
    version() {
      const out = [0];
      check(getVersion(out) as number, 'ncclGetVersion');
      return out[0]!;
    },
  };
  libraries.set(path, library);
  return library;
}

export interface NcclOptions {
  /** the NCCL shared library to load; defaults to libnccl.so.2 (found through LD_LIBRARY_PATH) */
  readonly library?: string;
}

export class NcclCollectives implements Collectives {
  private aborted = false;
  private plan: CollectivePlan | null = null;

  private constructor(
    private readonly engine: Engine,
    private readonly nccl: NcclLibrary,
    private readonly comm: unknown,
    readonly rank: number,
    readonly world: number,
  ) {}

  /** Join the communicator named by `uniqueId` (made by the coordinator with `loadNccl().getUniqueId()`). */
  static async create(engine: Engine, rank: number, world: number, uniqueId: Uint8Array, options: NcclOptions = {}): Promise<NcclCollectives> {
    const nccl = loadNccl(options.library);
    const comm = await nccl.initRank(world, uniqueId, rank);
    return new NcclCollectives(engine, nccl, comm, rank, world);
  }

  private check(code: number, what: string, x: Tensor): void {
    if (code !== 0) throw new WeftError('WEFT_NATIVE', `rank ${this.rank}: ${what} of [${x.shape.join(', ')}] failed: NCCL error ${code}: ${this.nccl.errorString(code)}`);
  }

  /** Nothing to allocate: every gather sizes its buffers from the widths, for any row count. */
  prepare(plan: CollectivePlan): void {
    this.plan = plan;
  }

  // No shortcut for a group of one: TP=1 uses soloCollectives, and a one-rank communicator is how the
  // bindings are tested on a single GPU.
  async allReduce(x: Tensor): Promise<Tensor> {
    const pointer = this.engine.devicePointer(x);
    // In place: x is a fresh output of the op before it, owned by this step.
    this.check(this.nccl.allReduce(pointer, pointer, numel(x), this.comm, this.engine.streamHandle()), 'ncclAllReduce', x);
    return x;
  }

  /**
   * One row of equal widths (a decode step of one sequence): NCCL's rank-major all-gather is already
   * [1, ΣNr]. Otherwise each rank's [T, Nr] is broadcast from its rank into a tensor of that shape on every
   * rank, the broadcasts grouped so that NCCL runs them together, and the pieces are set side by side: any T,
   * any widths, no index tensors (so nothing to upload, and the whole of it can be captured in a graph).
   */
  async allGatherCols(x: Tensor): Promise<Tensor> {
    const [rows = 1, width = 0] = x.shape;
    const widths = preparedWidths(this.plan, this.rank, this.world, x) ?? this.unpreparedWidths(x);
    const stream = this.engine.streamHandle();
    if (rows === 1 && widths.every((w) => w === width)) {
      const gathered = this.engine.zeros('f32', [1, width * this.world]);
      this.check(this.nccl.allGather(this.engine.devicePointer(x), this.engine.devicePointer(gathered), width, this.comm, stream), 'ncclAllGather', x);
      return gathered;
    }
    const pieces = widths.map((w, root) => (root === this.rank ? x : this.engine.zeros('f32', [rows, w])));
    this.check(this.nccl.groupStart(), 'ncclGroupStart', x);
    let code = 0;
    try {
      for (let root = 0; root < this.world && code === 0; root++) {
        const pointer = this.engine.devicePointer(pieces[root]!);
        code = this.nccl.broadcast(pointer, pointer, rows * widths[root]!, root, this.comm, stream);
      }
    } finally {
      const end = this.nccl.groupEnd(); // always closes the group, even after a failed enqueue
      code ||= end;
    }
    this.check(code, 'ncclBroadcast (all-gather)', x);
    return this.engine.concatCols(pieces);
  }

  /** Without prepare() only a group of one knows every width. */
  private unpreparedWidths(x: Tensor): readonly number[] {
    if (this.world === 1) return [x.shape[1] ?? 0];
    throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank}: allGatherCols over ${this.world} ranks needs prepare() first (the columns of every rank)`);
  }

  /** Poll from the heartbeat: a peer failure shows here as an asynchronous NCCL error. */
  asyncError(): string | null {
    if (this.aborted) return null; // the communicator is gone
    const code = this.nccl.asyncError(this.comm);
    return code === 0 ? null : `rank ${this.rank}: ${this.nccl.errorString(code)}`;
  }

  close(): void {
    if (this.aborted) return;
    this.aborted = true;
    // Abort, not destroy: destroy can block forever when a peer is gone.
    this.nccl.abort(this.comm);
  }
}

function numel(t: Tensor): number {
  return t.shape.reduce((a, b) => a * b, 1);
}
