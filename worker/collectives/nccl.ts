/**
 * NCCL collectives through koffi, enqueued on the engine's CUDA stream so that they are captured into CUDA
 * graphs together with the kernels. Device addresses and the stream cross into NCCL here and nowhere else.
 * Errors carry ncclGetErrorString, the rank and the operation.
 */
import koffi from 'koffi';
import { promisify } from 'node:util';
import type { Engine, Tensor } from '../native.ts';
import type { Collectives } from './collectives.ts';
import { WeftError } from '../../core/errors.ts';

const NCCL_UNIQUE_ID_BYTES = 128;
const ncclFloat32 = 7;
const ncclSum = 0;

interface NcclLibrary {
  getUniqueId(): Uint8Array;
  initRank(nRanks: number, id: Uint8Array, rank: number): Promise<unknown>;
  allReduce(send: bigint, recv: bigint, count: number, comm: unknown, stream: bigint): number;
  allGather(send: bigint, recv: bigint, count: number, comm: unknown, stream: bigint): number;
  asyncError(comm: unknown): number;
  abort(comm: unknown): number;
  errorString(code: number): string;
  version(): number;
}

let library: NcclLibrary | null = null;

/** Load libnccl.so.2 once; a clear error when it is missing. */
export function loadNccl(path = process.env.WEFT_NCCL_LIBRARY ?? 'libnccl.so.2'): NcclLibrary {
  if (library) return library;
  // NVLink multicast (NVLS) stays off in every weft process, this one included (it reads the variable at init).
  process.env.NCCL_NVLS_ENABLE = '0';
  // NCCL's init runs deep (CUDA driver init, its own threads) on koffi's call stacks, which default to
  // 128 KiB for async calls and 2 MiB for sync ones: too small, and an overflow is a segmentation fault.
  koffi.config({ ...koffi.config(), sync_stack_size: 16 << 20, async_stack_size: 16 << 20, resident_async_pools: 2 });
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load(path);
  } catch (err) {
    throw new WeftError('WEFT_NATIVE', `cannot load ${path} (install NCCL or add its directory to LD_LIBRARY_PATH): ${(err as Error).message}`);
  }
  // A char array would be decoded as a string and cut at the first zero byte: the id is 128 raw bytes.
  koffi.struct('weft_ncclUniqueId', { internal: koffi.array('uint8_t', NCCL_UNIQUE_ID_BYTES, 'Typed') });
  // ncclComm_t is itself a pointer (to an opaque struct): by value in collectives, `_Out_ ncclComm_t *` in init.
  const Comm = koffi.pointer('weft_ncclComm', koffi.opaque());
  const getUniqueId = lib.func('int ncclGetUniqueId(_Out_ weft_ncclUniqueId *id)');
  const commInitRank = lib.func('int ncclCommInitRank(_Out_ weft_ncclComm *comm, int nranks, weft_ncclUniqueId id, int rank)');
  const allReduce = lib.func('int ncclAllReduce(uintptr_t sendbuff, uintptr_t recvbuff, size_t count, int datatype, int op, weft_ncclComm comm, uintptr_t stream)');
  const allGather = lib.func('int ncclAllGather(uintptr_t sendbuff, uintptr_t recvbuff, size_t sendcount, int datatype, weft_ncclComm comm, uintptr_t stream)');
  const getAsyncError = lib.func('int ncclCommGetAsyncError(weft_ncclComm comm, _Out_ int *asyncError)');
  const commAbort = lib.func('int ncclCommAbort(weft_ncclComm comm)');
  const getErrorString = lib.func('const char *ncclGetErrorString(int result)');
  const getVersion = lib.func('int ncclGetVersion(_Out_ int *version)');
  void Comm; // both types are used by name in the declarations below

  const check = (code: number, what: string): void => {
    if (code !== 0) throw new WeftError('WEFT_NATIVE', `${what}: NCCL error ${code}: ${getErrorString(code) as string}`);
  };
  library = {
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
  return library;
}

export class NcclCollectives implements Collectives {
  private aborted = false;
  /** per row count T: the rows of each rank in the gathered [rank, T, widest] buffer; made outside any step */
  private readonly rankRowIndex = new Map<number, Tensor[]>();

  private constructor(
    private readonly engine: Engine,
    private readonly nccl: NcclLibrary,
    private readonly comm: unknown,
    readonly rank: number,
    readonly world: number,
  ) {}

  /** Join the communicator named by `uniqueId` (made by the coordinator with `loadNccl().getUniqueId()`). */
  static async create(engine: Engine, rank: number, world: number, uniqueId: Uint8Array): Promise<NcclCollectives> {
    const nccl = loadNccl();
    const comm = await nccl.initRank(world, uniqueId, rank);
    return new NcclCollectives(engine, nccl, comm, rank, world);
  }

  private check(code: number, what: string, x: Tensor): void {
    if (code !== 0) throw new WeftError('WEFT_NATIVE', `rank ${this.rank}: ${what} of [${x.shape.join(', ')}] failed: NCCL error ${code}: ${this.nccl.errorString(code)}`);
  }

  // No shortcut for a group of one: TP=1 uses soloCollectives, and a one-rank communicator is how the
  // bindings are tested on a single GPU.
  async allReduce(x: Tensor): Promise<Tensor> {
    const pointer = this.engine.devicePointer(x);
    // In place: x is a fresh output of the op before it, owned by this step.
    this.check(this.nccl.allReduce(pointer, pointer, numel(x), this.comm, this.engine.streamHandle()), 'ncclAllReduce', x);
    return x;
  }

  /** NCCL gathers equal counts rank-major; pad each piece to the widest, gather, then reorder to [T, ΣNr]. */
  async allGatherCols(x: Tensor, widths?: readonly number[]): Promise<Tensor> {
    const [rows = 1, width = 0] = x.shape;
    const rankWidths = widths ?? Array.from({ length: this.world }, () => width);
    const widest = Math.max(...rankWidths);
    const padded = width === widest ? x : this.engine.concatCols([x, this.engine.zeros('f32', [rows, widest - width])]);
    const gathered = this.engine.zeros('f32', [this.world * rows, widest]); // [rank, T, widest]
    this.check(
      this.nccl.allGather(this.engine.devicePointer(padded), this.engine.devicePointer(gathered), rows * widest, this.comm, this.engine.streamHandle()),
      'ncclAllGather',
      x,
    );
    const rowIndex = this.rankRowIndex.get(rows);
    if (!rowIndex) throw new WeftError('WEFT_NATIVE', `rank ${this.rank}: allGatherCols of ${rows} rows was not prepared (call prepare() outside a step)`);
    const pieces = rankWidths.map((w, r) => {
      const rowsOfRank = this.engine.gatherRows(gathered, rowIndex[r]!);
      return w === widest ? rowsOfRank : this.engine.sliceCols(rowsOfRank, 0, w);
    });
    return this.engine.concatCols(pieces);
  }

  /**
   * Make the index tensors allGatherCols needs for these row counts. Call it outside any step: uploads are
   * not allowed while a CUDA graph is being captured.
   */
  prepare(rowCounts: readonly number[]): void {
    for (const rows of rowCounts) {
      if (this.rankRowIndex.has(rows)) continue;
      this.rankRowIndex.set(
        rows,
        Array.from({ length: this.world }, (_, r) => {
          const index = Int32Array.from({ length: rows }, (_, t) => r * rows + t);
          return this.engine.upload(new Uint8Array(index.buffer), 'i32', [rows]);
        }),
      );
    }
  }

  /** Poll from the heartbeat: a peer failure shows here as an asynchronous NCCL error. */
  asyncError(): string | null {
    if (this.aborted) return null; // the communicator is gone
    const code = this.nccl.asyncError(this.comm);
    return code === 0 ? null : this.nccl.errorString(code);
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
