/**
 * Collectives for several ranks, each a worker process of its own, on one GPU (NCCL refuses two ranks on one
 * device). Each rank owns an exchange region that its peers map (native/src/shared-gpu.h): device memory shared
 * through CUDA IPC, or, where the host refuses CUDA IPC, a /dev/shm file every process maps and registers with
 * CUDA. A collective is kernels on the engine's stream (copy in, barrier, sum or gather from every region,
 * barrier), so it is captured into CUDA graphs like any op; the barrier counts on the device and waits on each
 * peer at most `peerTimeoutMs`, after which the group is failed (asyncError, and every later call throws) instead
 * of hanging. Not for speed: it lets every tensor-parallel CUDA path run on a one-GPU host.
 *
 * The regions' handles are traded once, at create(), through `exchange` (the workers use rank 0's collective
 * hub: exchangeOverHub).
 */
import { openSharedGpuGroup, type Engine, type SharedGpuGroup, type SharedGpuMemory, type Tensor } from '../native.ts';
import { preparedWidths, type CollectivePlan, type Collectives } from './collectives.ts';
import { WeftError } from '../../core/errors.ts';

/** Every rank's bytes, in rank order, on every rank: how the ranks trade their handles (once, at create()). */
export type HandleExchange = (mine: Uint8Array) => Promise<Uint8Array[]>;

export interface SharedGpuOptions {
  /** How long a barrier waits for a peer before failing the group. Defaults to 15 s: ranks run the same work between collectives, and a barrier that waits spins a kernel on the shared GPU. */
  readonly peerTimeoutMs?: number;
  /** Where the regions live; 'auto' (the default): device IPC, else /dev/shm when any rank cannot map its peers' device memory. */
  readonly memory?: SharedGpuMemory | 'auto';
  /** Bytes of each rank's data area; larger collectives run in chunks. Defaults to 4 MiB (a container's /dev/shm may hold 64 MiB in all). */
  readonly dataBytes?: number;
  /** Where a fallback to /dev/shm is reported (the worker's stderr). */
  readonly log?: (line: string) => void;
}

const DEFAULT_PEER_TIMEOUT_MS = 15_000;
const DEFAULT_DATA_BYTES = 4 << 20;

/** A rank's answer in a round of the set-up: its bytes, or why it failed. */
interface Outcome {
  readonly ok: boolean;
  readonly bytes: Uint8Array;
}

function encodeOutcome(outcome: Outcome): Uint8Array {
  return Uint8Array.from([outcome.ok ? 1 : 0, ...outcome.bytes]);
}

function decodeOutcome(bytes: Uint8Array): Outcome {
  return { ok: bytes[0] === 1, bytes: bytes.subarray(1) };
}

/** One round: every rank's outcome; the first failure (rank and message) if any rank failed. */
async function round(exchange: HandleExchange, mine: Outcome): Promise<{ all: Outcome[]; failure: string | null }> {
  const all = (await exchange(encodeOutcome(mine))).map(decodeOutcome);
  const failed = all.findIndex((o) => !o.ok);
  return { all, failure: failed < 0 ? null : `rank ${failed}: ${Buffer.from(all[failed]!.bytes).toString()}` };
}

export class SharedGpuCollectives implements Collectives {
  private plan: CollectivePlan | null = null;
  private closed = false;

  private constructor(
    private readonly engine: Engine,
    private readonly group: SharedGpuGroup,
    readonly rank: number,
    readonly world: number,
    readonly memory: SharedGpuMemory,
    private readonly peerTimeoutMs: number,
  ) {}

  /**
   * Make this rank's region, trade handles with the peers through `exchange` and map theirs. Every rank calls it
   * at once (each round of `exchange` waits for all). With memory 'auto', device IPC first; when any rank cannot
   * map its peers' device memory, every rank moves to /dev/shm together.
   */
  static async create(engine: Engine, device: number, rank: number, world: number, exchange: HandleExchange, options: SharedGpuOptions = {}): Promise<SharedGpuCollectives> {
    const peerTimeoutMs = options.peerTimeoutMs ?? DEFAULT_PEER_TIMEOUT_MS;
    const memory = options.memory ?? 'auto';
    const attempt = async (kind: SharedGpuMemory): Promise<SharedGpuCollectives | string> => {
      let group: SharedGpuGroup | null = null;
      let mine: Outcome;
      try {
        group = openSharedGpuGroup({ device, rank, world, dataBytes: options.dataBytes ?? DEFAULT_DATA_BYTES, timeoutMs: peerTimeoutMs, memory: kind });
        mine = { ok: true, bytes: group.handle() };
      } catch (err) {
        mine = { ok: false, bytes: Buffer.from((err as Error).message) };
      }
      const handles = await round(exchange, mine);
      let connected: Outcome = { ok: true, bytes: new Uint8Array() };
      if (handles.failure === null) {
        try {
          group!.connect(handles.all.map((o) => o.bytes));
        } catch (err) {
          connected = { ok: false, bytes: Buffer.from((err as Error).message) };
        }
      }
      // every rank learns whether every rank could map its peers, so that all of them move on together
      const failure = handles.failure ?? (await round(exchange, connected)).failure;
      if (failure === null) {
        group!.peersConnected();
        return new SharedGpuCollectives(engine, group!, rank, world, kind, peerTimeoutMs);
      }
      group?.close();
      return failure;
    };
    const first = memory === 'host-shm' ? 'host-shm' : 'device-ipc';
    const made = await attempt(first);
    if (typeof made !== 'string') return made;
    if (memory !== 'auto') throw new WeftError('WEFT_NATIVE', `rank ${rank}: shared-GPU collectives over ${first} memory failed: ${made}`);
    options.log?.(`shared-GPU collectives: CUDA IPC is unavailable (${made}); using /dev/shm host memory instead`);
    const fallback = await attempt('host-shm');
    if (typeof fallback !== 'string') return fallback;
    throw new WeftError('WEFT_NATIVE', `rank ${rank}: shared-GPU collectives failed over device IPC (${made}) and over /dev/shm host memory (${fallback})`);
  }

  prepare(plan: CollectivePlan): void {
    this.plan = plan;
  }

  /** In place, as NCCL's: x is a fresh output of the op before it, owned by this step. */
  async allReduce(x: Tensor): Promise<Tensor> {
    this.throwIfFailed('allReduce');
    this.group.allReduce(this.engine.devicePointer(x), numel(x), this.engine.streamHandle());
    return x;
  }

  async allGatherCols(x: Tensor): Promise<Tensor> {
    const [rows = 1] = x.shape;
    const widths = preparedWidths(this.plan, this.rank, this.world, x) ?? this.unpreparedWidths(x);
    this.throwIfFailed('allGatherCols');
    const gathered = this.engine.zeros('f32', [rows, widths.reduce((a, b) => a + b, 0)]);
    this.group.allGatherCols(this.engine.devicePointer(x), this.engine.devicePointer(gathered), rows, Int32Array.from(widths), this.engine.streamHandle());
    return gathered;
  }

  /** Without prepare() only a group of one knows every width. */
  private unpreparedWidths(x: Tensor): readonly number[] {
    if (this.world === 1) return [x.shape[1] ?? 0];
    throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank}: allGatherCols over ${this.world} ranks needs prepare() first (the columns of every rank)`);
  }

  private throwIfFailed(what: string): void {
    if (this.closed) throw new WeftError('WEFT_PROTOCOL', `rank ${this.rank}: ${what}: the shared-GPU collectives were closed`);
    const failure = this.asyncError();
    if (failure !== null) throw new WeftError('WEFT_WORKER_DIED', `rank ${this.rank}: ${what}: the group already failed (${failure})`);
  }

  /** A barrier that timed out, as the device recorded it (mapped host memory: no sync); null while healthy or once closed. */
  asyncError(): string | null {
    if (this.closed) return null;
    const status = this.group.status();
    if (!status.failed) return null;
    return `rank ${this.rank}: ${status.op} #${status.collective}: no answer from rank ${status.peer} within ${this.peerTimeoutMs} ms (gone or stalled)`;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.group.close();
  }
}

function numel(t: Tensor): number {
  return t.shape.reduce((a, b) => a * b, 1);
}

/** Bytes one rank may send in an exchange over the hub (a CUDA IPC handle is 64, a /dev/shm name about 40). */
const EXCHANGE_BYTES = 1024;

/**
 * A HandleExchange over another Collectives (the workers' CPU hub, on a CPU engine): each rank's bytes, with
 * their length first, travel as one row of f32 byte values (exact), gathered in rank order.
 */
export function exchangeOver(comm: Collectives, engine: Engine): HandleExchange {
  comm.prepare({ gatherWidths: Array.from({ length: comm.world }, () => EXCHANGE_BYTES) });
  return async (mine) => {
    const row = new Float32Array(EXCHANGE_BYTES);
    const length = Math.min(mine.byteLength, EXCHANGE_BYTES - 2);
    row[0] = length >> 8;
    row[1] = length & 0xff;
    row.set(mine.subarray(0, length), 2);
    const gathered = engine.download(await comm.allGatherCols(engine.upload(new Uint8Array(row.buffer), 'f32', [1, EXCHANGE_BYTES])));
    return Array.from({ length: comm.world }, (_, r) => {
      const piece = gathered.subarray(r * EXCHANGE_BYTES, (r + 1) * EXCHANGE_BYTES);
      return Uint8Array.from(piece.subarray(2, 2 + piece[0]! * 256 + piece[1]!));
    });
  };
}
