/**
 * The coordinator's connection to the ranks of one worker group: the ROUTER socket they connect to, their hello
 * (proven with the group's shared secret), heartbeats both ways, and commands sent to one rank with its typed
 * reply awaited. It neither starts nor stops processes: coordinator/worker-group.ts does, through this.
 *
 * The first fault (a pid gone, a silent rank, a rank that restarted, an error reply, an invalid message from a
 * rank that proved itself) fails the client: every pending and later request rejects with an error naming the
 * rank, until the group re-forms and calls `reset`.
 *
 * The socket is ipc:// in a private directory for workers on this host, tcp:// with CURVE across hosts
 * (coordinator/worker-transport.ts), so what crosses it is confidential. Every message is authenticated
 * (coordinator/worker-peers.ts): a rank is its connection that proved the group secret, never a routing id;
 * commands (step batches among them) go only to such a connection. A second proven connection for a rank whose
 * process is alive is refused and logged. Silence is measured on a clock that stops
 * while this process's event loop stalls (core/loop-clock.ts), so a stall here is never blamed on a worker.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import type * as zmq from 'zeromq';
import { PROTOCOL_VERSION } from '../core/wire.ts';
import { WeftError, type WeftErrorCode } from '../core/errors.ts';
import { requireSecret } from '../core/frame-auth.ts';
import { ResponsiveClock } from '../core/loop-clock.ts';
import type { Command, CommandBody, CommandResult, CoordinatorMessage, WorkerMessage } from '../core/worker-protocol.ts';
import { WorkerPeers, type ProvenConnection } from './worker-peers.ts';
import { bindWorkerSocket, type GroupCurveKeys } from './worker-transport.ts';

export interface WorkerClientOptions {
  readonly world: number;
  /** host the ROUTER binds (loopback with port 0: an ipc:// socket, coordinator/worker-transport.ts) */
  readonly bindHost: string;
  /** port the ROUTER binds; 0 picks a free one (or ipc:// on loopback) */
  readonly port: number;
  /** the directory of the ipc:// socket; default: a fresh one of mode 0700, removed on close */
  readonly socketDir?: string;
  /** the group's CURVE keys: required when bindHost is not loopback */
  readonly curve?: GroupCurveKeys;
  /** a rank silent this long is declared dead */
  readonly heartbeatTimeoutMs: number;
  /** the group's shared secret, which every worker proves on connecting and every message is authenticated with */
  readonly secret: string;
  /** what errors call these processes ('worker', 'draft worker') */
  readonly label: string;
  /** the largest message a worker may send (coordinator/worker-transport.ts) */
  readonly maxMessageBytes?: number;
  /** pid of the child process this coordinator spawned for a rank, if it is running: its exit is watched there */
  readonly childPid: (rank: number) => number | undefined;
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
  /** called once per fault, with the error that failed the client (not once closing) */
  readonly onFailure?: (err: WeftError) => void;
}

export interface RankStatus {
  readonly rank: number;
  readonly pid: number | null;
  readonly joined: boolean;
  readonly bytesRead: number;
  readonly bytesTotal: number;
}

interface RankConnection {
  /** set when a connection proved itself for this rank: until then nothing from this rank is read */
  pid: number | null;
  /** the worker runs on this host, so its pid can be watched and killed */
  local: boolean;
  /** on `clock`: when the rank was last heard from */
  lastSeen: number;
  /** a local worker computing on the host: its process CPU time (clock ticks) when last read, and when (on `clock`) it was last seen to grow */
  cpuTicks: number | null;
  lastBusy: number;
  collectiveEndpoint: string | null;
  bytesRead: number;
  bytesTotal: number;
}

interface PendingRequest {
  readonly rank: number;
  readonly command: Command;
  resolve(result: unknown): void;
  reject(err: Error): void;
}

/** How often silences are checked: detection comes at most this late after a rank's deadline. */
const WATCH_MS = 250;
/** Ranks are pinged every this many checks (once a second). */
const PING_EVERY = 4;
/**
 * How long a failure a worker's death may have caused (a send to it, a peer's report that it lost it) waits for
 * that death to be seen here, when the dead worker may be on this host (failSoon).
 */
const DEATH_GRACE_MS = 500;
/** The receive loop reads for at most about this long before it lets the event loop turn. */
const RECEIVE_SLICE_MS = 5;

/**
 * Whether process `pid` exists and has not exited (EPERM: it exists, owned by someone else). A zombie (exited, not
 * yet reaped by its parent: a SIGKILLed worker until pm2 waits on it) has closed its sockets and counts as gone.
 */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  const state = procStat(pid)?.[0];
  return state !== 'Z' && state !== 'X';
}

/** The fields of /proc/`pid`/stat after the command name (state, ppid, ...); null where there is none to read. */
function procStat(pid: number): string[] | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' '); // the name is in parentheses and may hold spaces
  } catch {
    return null;
  }
}

/** The CPU time (user + system, in clock ticks) of process `pid` so far, from /proc; null where there is none to read. */
function cpuTicks(pid: number): number | null {
  const fields = procStat(pid);
  if (!fields) return null;
  const ticks = Number(fields[11]) + Number(fields[12]); // utime and stime: the 12th and 13th fields after the name
  return Number.isFinite(ticks) ? ticks : null;
}

export class WorkerClient {
  private readonly peers: WorkerPeers;
  private readonly ranks: RankConnection[];
  /** time this process's event loop was responsive: silences are measured on it */
  private readonly clock = new ResponsiveClock(WATCH_MS);
  private watchTicks = 0;
  private readonly pending = new Map<number, PendingRequest>();
  /** names this coordinator instance in pings: a worker that sees another one exits (and is restarted) */
  private readonly session = randomBytes(8).toString('hex');
  private nextId = 1;
  private failure: WeftError | null = null;
  /** counts reset()s: each re-formed group is a new formation */
  private formation = 0;
  private readonly failedListeners: Array<(err: WeftError) => void> = [];
  private closing = false;
  /** the ranks compute on the host (device cpu, set at init): a local one whose CPU time grows is not silent (lastCpuGrowth) */
  computesOnHost = false;
  private readonly timer: NodeJS.Timeout;
  private joinWaiter: (() => void) | null = null;

  private constructor(
    private readonly options: WorkerClientOptions,
    private readonly router: zmq.Router,
    /** where the workers connect */
    readonly endpoint: string,
    /** removes the socket's file and directory once the router closed */
    private readonly release: () => void,
  ) {
    this.peers = new WorkerPeers(router, options.world, options.secret, options.label);
    this.ranks = Array.from({ length: options.world }, () => ({ pid: null, local: false, lastSeen: 0, cpuTicks: null, lastBusy: 0, collectiveEndpoint: null, bytesRead: 0, bytesTotal: 0 }));
    this.timer = setInterval(() => this.watch(), WATCH_MS);
    void this.receiveLoop();
  }

  static async bind(options: WorkerClientOptions): Promise<WorkerClient> {
    requireSecret(options.secret, `the ${options.label} group`); // before anything is bound
    const { router, endpoint, release } = await bindWorkerSocket(options);
    return new WorkerClient(options, router, endpoint, release);
  }

  /** Wait until every rank has said hello (rejects on a fault or after `timeoutMs`). */
  async join(timeoutMs: number): Promise<void> {
    let timeout: NodeJS.Timeout | undefined;
    const joined = new Promise<void>((resolve) => {
      if (this.allJoined()) resolve();
      else this.joinWaiter = resolve;
    });
    try {
      await Promise.race([
        joined,
        this.failed(),
        new Promise((_, reject) => {
          timeout = setTimeout(() => {
            const missing = this.ranks.flatMap((r, i) => (r.pid === null ? [i] : []));
            reject(new WeftError('WEFT_TIMEOUT', `ranks ${missing.join(', ')} did not join ${this.endpoint} within ${timeoutMs} ms`));
          }, timeoutMs);
        }),
      ]);
    } finally {
      clearTimeout(timeout);
      this.joinWaiter = null;
    }
  }

  private allJoined(): boolean {
    return this.ranks.every((r) => r.pid !== null);
  }

  /**
   * Send one command to one rank and wait for its reply, checked against the command's result schema. Not the send:
   * one to a peer that just died can wait out the socket's send timeout, while the client's failure (the rank's
   * death seen) rejects the reply at once.
   */
  async request<B extends CommandBody>(rank: number, body: B): Promise<CommandResult<B['type']>> {
    if (this.closing) throw new WeftError('WEFT_CLOSED', `the ${this.options.label} group is closed`);
    if (this.failure) throw this.failure;
    const id = this.nextId++;
    const reply = new Promise<CommandResult<B['type']>>((resolve, reject) =>
      this.pending.set(id, { rank, command: body.type, resolve: resolve as (result: unknown) => void, reject }),
    );
    const formation = this.formation;
    this.post(rank, { ...body, v: PROTOCOL_VERSION, id } as CoordinatorMessage).catch((err: unknown) => this.unreachable(rank, err as Error, formation));
    return reply;
  }

  private async receiveLoop(): Promise<void> {
    let slice = performance.now();
    try {
      for await (const [routingId, ...frames] of this.router) {
        // a burst of queued messages is read without leaving the microtask queue: past a slice, let timers and
        // other sockets run (a stranger flooding this socket must not delay the rest of the coordinator)
        if (performance.now() - slice > RECEIVE_SLICE_MS) {
          await new Promise((resolve) => setImmediate(resolve));
          slice = performance.now();
        }
        const arrival = this.peers.receive(routingId!, frames);
        if (arrival === null) continue;
        if (arrival.kind === 'proven') {
          this.admit(arrival.connection);
          continue;
        }
        const state = this.ranks[arrival.rank]!;
        if (arrival.kind === 'invalid') {
          this.fail('WEFT_PROTOCOL', `${this.options.label} rank ${arrival.rank}: ${arrival.error.message}`);
          continue;
        }
        const { message } = arrival;
        state.lastSeen = this.clock.now();
        if (message.type === 'progress') {
          state.bytesRead = message.bytesRead;
          state.bytesTotal = message.bytesTotal;
          this.options.onProgress?.(message.rank, message.bytesRead, message.bytesTotal);
        } else if (message.type === 'reply' || message.type === 'error') {
          this.settle(message);
        }
      }
    } catch (err) {
      if (!this.closing) this.fail('WEFT_PROTOCOL', `coordinator socket failed: ${(err as Error).message}`);
    }
  }

  /** Settle the request a reply answers: resolve it, or fail the client (an error reply, a mismatched one). */
  private settle(message: Extract<WorkerMessage, { type: 'reply' | 'error' }>): void {
    const { rank, id } = message;
    const { label } = this.options;
    const call = this.pending.get(id);
    if (!call) {
      // ids below nextId were abandoned when the client failed: their late replies are expected
      if (id >= this.nextId) process.stderr.write(`weft: dropped a reply from ${label} rank ${rank} to request ${id}, which was never sent\n`);
      return;
    }
    const command = message.type === 'reply' ? message.command : call.command;
    if (call.rank !== rank || command !== call.command) {
      this.fail('WEFT_PROTOCOL', `${label} rank ${rank} answered request ${id} (${call.command} to rank ${call.rank}) with a ${command} reply`);
    } else if (message.type === 'error') {
      const code = (message.error.code.startsWith('WEFT_') ? message.error.code : 'WEFT_WORKER_ERROR') as WeftErrorCode;
      const reported = `${label} rank ${rank}: ${message.error.message}`;
      // WEFT_WORKER_DIED from a rank: it lost a peer (a collective could not reach it), which is the peer's death
      if (code === 'WEFT_WORKER_DIED') this.failSoon(code, () => this.firstGoneProcess() ?? reported, this.ranks.some((r, i) => i !== rank && r.local));
      else this.fail(code, reported);
    } else {
      this.pending.delete(id);
      call.resolve(message.result);
    }
  }

  /**
   * A connection proved the secret for `hello.rank`: it becomes that rank, unless the rank is held by another
   * process that is alive while the group runs (then it is refused and logged). A proven claim for a rank whose
   * process is gone is the rank restarted (pm2): while the group runs that is a fault, the group re-forms.
   */
  private admit(connection: ProvenConnection): void {
    const { hello } = connection;
    const { rank } = hello;
    const { label, world } = this.options;
    const state = this.ranks[rank]!;
    const previous = state.pid;
    if (previous !== null && previous !== hello.pid && this.failure === null && this.holderAlive(rank)) {
      this.peers.refuse(connection.routingId, `refused a second connection for ${label} rank ${rank} (pid ${hello.pid}): the rank is held by pid ${previous}, which ${state.local ? 'is alive' : 'runs on another host (presumed alive until its heartbeats stop)'}`);
      return;
    }
    if (hello.world !== world) {
      this.fail('WEFT_PROTOCOL', `${label} rank ${rank} was started for ${hello.world} ranks, the group has ${world}`);
      return;
    }
    this.peers.bind(rank, connection);
    Object.assign(state, { pid: hello.pid, collectiveEndpoint: hello.collectiveEndpoint, lastSeen: this.clock.now(), cpuTicks: null, lastBusy: 0, bytesRead: 0, bytesTotal: 0 });
    state.local = hello.hostname === hostname() || this.options.childPid(rank) === hello.pid;
    // the coordinator's first authenticated message: the worker learns that this end knows the secret too
    this.ping(rank);
    // a rank that says hello again while the group runs has restarted and lost its weights and KV cache
    if (previous !== null && previous !== hello.pid && !this.joinWaiter) {
      this.fail('WEFT_WORKER_DIED', `${label} rank ${rank} restarted (pid ${previous} is gone, pid ${hello.pid} took its place)`);
      return;
    }
    if (this.allJoined()) this.joinWaiter?.();
  }

  /** Whether the process holding a rank may still be running (a remote one cannot be checked: assumed so). */
  private holderAlive(rank: number): boolean {
    const state = this.ranks[rank]!;
    return state.pid !== null && (!state.local || alive(state.pid));
  }

  /** A send of formation `formation` to `rank` failed: its death, if it died, else the socket's error. */
  private unreachable(rank: number, err: Error, formation: number): void {
    this.failSoon('WEFT_WORKER_DIED', () => this.goneProcess(rank) ?? this.firstGoneProcess() ?? `could not reach ${this.options.label} rank ${rank}: ${err.message}`, this.ranks[rank]!.local, formation);
  }

  /**
   * Fail with `why()` for a fault a worker's death may have caused: a killed worker's sockets close before its death
   * is seen here (its exit event, its pid gone), and what they break (a send to it, a peer's collective) fails first.
   * Unless a death is already known, or `mayWait` is false (no suspect on this host to watch), the failure waits
   * DEATH_GRACE_MS for that death, the cause worth reporting (the first failure wins: the watch or the group's exit
   * handler names it meanwhile). A group re-formed since `formation` (reset) is not failed by it.
   */
  private failSoon(code: WeftErrorCode, why: () => string, mayWait: boolean, formation = this.formation): void {
    const report = (): void => {
      if (formation === this.formation) this.fail(code, why());
    };
    if (!mayWait || this.firstGoneProcess() !== null) report();
    else setTimeout(report, DEATH_GRACE_MS).unref();
  }

  /** goneProcess of the first rank that has one, else null. */
  private firstGoneProcess(): string | null {
    for (let rank = 0; rank < this.ranks.length; rank++) {
      const gone = this.goneProcess(rank);
      if (gone) return gone;
    }
    return null;
  }

  /** Why rank `rank` is dead when its process, on this host and not a child (a child's exit is reported by its group), is gone; else null. */
  private goneProcess(rank: number): string | null {
    const { pid, local } = this.ranks[rank]!;
    if (pid === null || !local || this.options.childPid(rank) !== undefined || alive(pid)) return null;
    return `${this.options.label} rank ${rank} (pid ${pid}) is gone`;
  }

  private ping(rank: number): void {
    this.post(rank, { v: PROTOCOL_VERSION, type: 'ping', session: this.session }).catch(() => undefined);
  }

  /** Ping every rank and declare silent or vanished ones dead. */
  private watch(): void {
    this.clock.probe(); // first: a stall that just ended is not silence of the workers (their messages are still unread)
    if (this.failure || this.closing) return;
    const now = this.clock.now();
    const { label, heartbeatTimeoutMs } = this.options;
    const pingNow = this.watchTicks++ % PING_EVERY === 0;
    this.ranks.forEach((state, rank) => {
      if (state.pid === null) return;
      const watchesCpu = this.computesOnHost && state.local;
      const busyAt = watchesCpu ? this.lastCpuGrowth(state, now) : 0;
      const silent = Math.round(now - Math.max(state.lastSeen, busyAt));
      const gone = this.goneProcess(rank);
      if (gone) this.fail('WEFT_WORKER_DIED', gone);
      else if (silent > heartbeatTimeoutMs) this.fail('WEFT_WORKER_DIED', `${label} rank ${rank} (pid ${state.pid}) sent no heartbeat ${watchesCpu ? 'and used no CPU time ' : ''}for ${silent} ms while this coordinator was responsive`);
      else if (pingNow) this.ping(rank);
    });
  }

  /**
   * When (on `clock`) a local worker's CPU time was last seen to grow (0: never, or no /proc). A worker computing a
   * step on the host blocks its event loop until the step ends, heartbeats included (one 8192-token step of a
   * 2-layer model takes ~12 s on 2 cores); while its CPU time grows it is computing, not hung (one looping forever
   * would pass too: the rule trades that case for long steps). Only for CPU workers: a CUDA worker's host thread
   * waiting on the device, or on a dead NCCL peer, spins.
   */
  private lastCpuGrowth(state: RankConnection, now: number): number {
    const ticks = cpuTicks(state.pid!);
    if (ticks !== null && state.cpuTicks !== null && ticks > state.cpuTicks) state.lastBusy = now;
    state.cpuTicks = ticks;
    return state.lastBusy;
  }

  /** Send to a rank's authenticated connection (rejects when it has none). */
  private post(rank: number, message: CoordinatorMessage): Promise<void> {
    return this.peers.send(rank, message);
  }

  /** Fail the client (the first fault wins): pending and later requests reject with this error. */
  fail(code: WeftErrorCode, message: string): void {
    if (this.failure) return;
    const failure = new WeftError(code, message);
    this.failure = failure;
    for (const call of this.pending.values()) call.reject(failure);
    this.pending.clear();
    this.failedListeners.splice(0).forEach((listener) => listener(failure));
    if (!this.closing) this.options.onFailure?.(failure);
  }

  /** Rejects when the client fails. */
  failed(): Promise<never> {
    return new Promise((_, reject) => {
      if (this.failure) reject(this.failure);
      else this.failedListeners.push(reject);
    });
  }

  /** Ask every rank to exit (closing), or those of `ranks` (re-forming); unreachable ones are left to the caller. */
  async shutdownAll(ranks: readonly number[] = this.ranks.map((_, rank) => rank)): Promise<void> {
    await Promise.all(ranks.map((rank) => (this.peers.isBound(rank) ? this.post(rank, { v: PROTOCOL_VERSION, type: 'shutdown' }).catch(() => undefined) : undefined)));
  }

  /**
   * The group re-forms after a fault (the client has failed): ask every rank whose process runs to rejoin it in
   * that process (it leaves the broken group: collectives closed, model dropped; rank 0 binds a new collective
   * hub). Resolves, by rank, whether it answered within `timeoutMs`; a rank that is gone, hung, or exits instead
   * (a CUDA rank) did not, and is the group's to restart.
   */
  rejoinAll(timeoutMs: number): Promise<boolean[]> {
    return Promise.all(this.ranks.map((_, rank) => this.rejoin(rank, timeoutMs)));
  }

  private async rejoin(rank: number, timeoutMs: number): Promise<boolean> {
    const state = this.ranks[rank]!;
    const { pid } = state;
    if (pid === null || !this.peers.isBound(rank) || (state.local && !alive(pid))) return false;
    const id = this.nextId++;
    let watch: NodeJS.Timeout | undefined;
    const answered = new Promise<boolean>((resolve) => {
      const accept = (result: unknown): void => {
        state.collectiveEndpoint = (result as CommandResult<'rejoin'>).collectiveEndpoint;
        resolve(true);
      };
      // a failed client rejects nothing more, so this entry is settled by the reply or the watch alone
      this.pending.set(id, { rank, command: 'rejoin', resolve: accept, reject: () => resolve(false) });
      const deadline = Date.now() + timeoutMs;
      watch = setInterval(() => {
        if (Date.now() > deadline || state.pid !== pid || (state.local && !alive(pid))) resolve(false);
      }, 50);
    });
    this.post(rank, { v: PROTOCOL_VERSION, type: 'rejoin', id }).catch(() => undefined); // unreachable: the watch ends it
    try {
      return await answered;
    } finally {
      clearInterval(watch);
      this.pending.delete(id);
    }
  }

  /**
   * After the group stopped its processes: forget the ranks still holding a pid from `stalePids` (a supervised
   * rank that already said hello again keeps its new one, a rank that rejoined has null there and keeps its
   * process) and clear the failure, ready for a new `join`.
   */
  reset(stalePids: readonly (number | null)[]): void {
    this.ranks.forEach((state, rank) => {
      if (state.pid !== null && state.pid !== stalePids[rank]) return;
      Object.assign(state, { pid: null, collectiveEndpoint: null });
      this.peers.release(rank);
    });
    this.failure = null;
    this.formation++;
  }

  pid(rank: number): number | null {
    return this.ranks[rank]?.pid ?? null;
  }

  /** Whether a rank's process runs on this host (so its pid can be watched and killed). */
  isLocal(rank: number): boolean {
    return this.ranks[rank]?.local ?? false;
  }

  collectiveEndpoint(rank: number): string | null {
    return this.ranks[rank]?.collectiveEndpoint ?? null;
  }

  status(): RankStatus[] {
    return this.ranks.map((r, rank) => ({ rank, pid: r.pid, joined: r.pid !== null, bytesRead: r.bytesRead, bytesTotal: r.bytesTotal }));
  }

  /**
   * Close: pending and later requests reject with WEFT_CLOSED and every rank is told to exit; `drain` (the group
   * waiting for its processes) runs before the socket closes, which drops whatever it has not sent.
   */
  async close(drain: () => Promise<void>): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.timer);
    this.fail('WEFT_CLOSED', `the ${this.options.label} group was closed`);
    await this.shutdownAll();
    await drain();
    this.router.close();
    this.release();
  }
}
