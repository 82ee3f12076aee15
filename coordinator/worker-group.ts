/**
 * One group of workers as the coordinator sees it: a ROUTER socket they connect to, the local processes it
 * spawned (if any), heartbeats both ways, and commands broadcast to every rank with all replies awaited.
 *
 * The first fault (a process exit, a pid gone, a silent rank, a rank that restarted, an error reply) fails the
 * group: every pending and later call rejects with an error naming the rank. `reform()` then rebuilds it: every
 * rank is stopped (spawned ones are killed and spawned again; supervised ones, under pm2, are told to exit and
 * their supervisor starts them again), all ranks must say hello again, and the caller sends `init` again.
 *
 * Workers authenticate with the group's shared secret in their hello (compared in constant time); until a rank
 * has said a valid hello nothing else it sends is read. The secret travels only over the coordinator's own
 * socket, which binds to loopback unless told otherwise.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, createHash, timingSafeEqual } from 'node:crypto';
import { hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, SendQueue, decode, encode } from '../core/wire.ts';
import { WeftError, type WeftErrorCode } from '../core/errors.ts';
import { parseWorkerMessage, type CoordinatorMessage, type InitCommand, type StepBatch, type StepResult } from '../core/worker-protocol.ts';

export interface WorkerGroupOptions {
  readonly world: number;
  /** spawn the workers as child processes of this one (else wait for `weft worker` processes to join) */
  readonly spawnLocal: boolean;
  /** host the ROUTER binds. Defaults to 127.0.0.1. */
  readonly bindHost?: string;
  /** port the ROUTER binds; 0 picks a free one. Defaults to 0. */
  readonly port?: number;
  /** a rank silent this long is declared dead. Defaults to 30000 ms. */
  readonly heartbeatTimeoutMs?: number;
  /** all ranks must have said hello within this. Defaults to 60000 ms. */
  readonly joinTimeoutMs?: number;
  /** shared secret workers must present in hello. Defaults to a random one for spawned workers, none otherwise. */
  readonly secret?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
  /** called once per fault, with the error that failed the group */
  readonly onFailure?: (err: WeftError) => void;
  /** what errors call this group's processes, so a fault names the group as well as the rank. Defaults to 'worker'. */
  readonly label?: string;
  /**
   * CUDA device of each rank. Defaults to the rank itself for spawned workers (one GPU per rank on this host),
   * and to 0 for external ones (pm2 gives each its GPU through CUDA_VISIBLE_DEVICES).
   */
  readonly devices?: readonly number[];
}

interface PendingCall {
  readonly replies: Map<number, unknown>;
  resolve(results: Map<number, unknown>): void;
  reject(err: Error): void;
}

interface RankState {
  pid: number | null;
  /** the worker runs on this host, so its pid can be watched and killed */
  local: boolean;
  lastSeen: number;
  collectiveEndpoint: string | null;
  child: ChildProcess | null;
  /** last lines the process wrote to stderr, quoted when it dies */
  stderrTail: string[];
  bytesRead: number;
  bytesTotal: number;
}

export interface RankStatus {
  readonly rank: number;
  readonly pid: number | null;
  readonly joined: boolean;
  readonly bytesRead: number;
  readonly bytesTotal: number;
}

const weftBin = fileURLToPath(new URL('../bin/weft.js', import.meta.url));
const PING_MS = 1000;
/** The env var spawned workers read their secret from (never on the command line, where `ps` shows it). */
export const WORKER_SECRET_ENV = 'WEFT_WORKER_SECRET';

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();
export function secretsEqual(given: string | undefined, expected: string): boolean {
  return given !== undefined && timingSafeEqual(digest(given), digest(expected));
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class WorkerGroup {
  private get label(): string {
    return this.options.label ?? 'worker';
  }
  private readonly router: zmq.Router;
  private readonly outbox: SendQueue;
  private readonly ranks: RankState[];
  private readonly pending = new Map<number, PendingCall>();
  private readonly secret: string | null;
  /** names this coordinator instance in pings: a worker that sees another one exits (and is restarted) */
  private readonly session = randomBytes(8).toString('hex');
  private nextId = 1;
  private failure: WeftError | null = null;
  private closing = false;
  private readonly timer: NodeJS.Timeout;
  private joinWaiter: (() => void) | null = null;
  /** children this group stopped on purpose (re-forming): their exit is not a fault */
  private readonly stopped = new WeakSet<ChildProcess>();

  private constructor(
    private readonly options: WorkerGroupOptions,
    readonly endpoint: string,
    router: zmq.Router,
  ) {
    this.router = router;
    this.outbox = new SendQueue(router);
    this.secret = options.secret ?? (options.spawnLocal ? randomBytes(24).toString('hex') : null);
    this.ranks = Array.from({ length: options.world }, () => ({
      pid: null,
      local: false,
      lastSeen: 0,
      collectiveEndpoint: null,
      child: null,
      stderrTail: [],
      bytesRead: 0,
      bytesTotal: 0,
    }));
    this.timer = setInterval(() => this.watch(), PING_MS);
    void this.receiveLoop();
  }

  /** Bind, start (or await) every rank, and wait for all of them to say hello. */
  static async start(options: WorkerGroupOptions): Promise<WorkerGroup> {
    const group = await WorkerGroup.bind(options);
    try {
      await group.join();
    } catch (err) {
      await group.close();
      throw err;
    }
    return group;
  }

  /** Bind the socket and spawn the local ranks; `join()` waits for their hello. */
  static async bind(options: WorkerGroupOptions): Promise<WorkerGroup> {
    const router = new zmq.Router({ handover: true, mandatory: true, linger: 0, maxMessageSize: 64 << 20, sendTimeout: 5000 });
    await router.bind(`tcp://${options.bindHost ?? '127.0.0.1'}:${options.port || '*'}`);
    const group = new WorkerGroup(options, router.lastEndpoint ?? '', router);
    if (options.spawnLocal) for (let rank = 0; rank < options.world; rank++) group.spawnRank(rank);
    return group;
  }

  /** Wait until every rank has said hello (rejects on a fault or after joinTimeoutMs). */
  async join(): Promise<void> {
    const joinTimeoutMs = this.options.joinTimeoutMs ?? 60_000;
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
            reject(new WeftError('WEFT_TIMEOUT', `ranks ${missing.join(', ')} did not join ${this.endpoint} within ${joinTimeoutMs} ms`));
          }, joinTimeoutMs);
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

  private spawnRank(rank: number): void {
    const args = [weftBin, 'worker', '--coordinator', this.endpoint, '--rank', String(rank), '--world', String(this.options.world), '--parent-pid', String(process.pid)];
    const child = spawn(process.execPath, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, ...this.options.env, NCCL_NVLS_ENABLE: '0', ...(this.secret !== null && { [WORKER_SECRET_ENV]: this.secret }) },
    });
    const state = this.ranks[rank]!;
    state.child = child;
    state.stderrTail = [];
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      if (process.env.WEFT_WORKER_STDERR === 'inherit') process.stderr.write(chunk);
      state.stderrTail.push(...chunk.split('\n').filter((line) => line.trim()));
      state.stderrTail.splice(0, Math.max(0, state.stderrTail.length - 5));
    });
    child.on('error', (err) => this.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} could not start: ${err.message}`));
    child.on('exit', (code, signal) => {
      if (state.child === child) state.child = null;
      if (this.closing || this.stopped.has(child)) return;
      const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      const last = state.stderrTail.at(-1);
      this.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} (pid ${child.pid}) ${how}${last ? `: ${last}` : ''}`);
    });
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const [identity, frame, ...extra] of this.router) {
        let message;
        try {
          if (extra.length > 0) throw new WeftError('WEFT_PROTOCOL', `expected one frame, got ${1 + extra.length}`);
          message = parseWorkerMessage(decode(frame ?? Buffer.alloc(0)));
        } catch (err) {
          process.stderr.write(`weft: dropped a message from a worker connection: ${(err as Error).message}\n`);
          continue;
        }
        const state = this.ranks[message.rank];
        if (!state || String(identity) !== `rank-${message.rank}`) continue; // a peer claiming a rank it does not own
        if (message.type === 'hello') {
          this.hello(message, state);
          continue;
        }
        if (state.pid === null) continue; // not authenticated (no valid hello yet)
        state.lastSeen = Date.now();
        switch (message.type) {
          case 'progress':
            state.bytesRead = message.bytesRead;
            state.bytesTotal = message.bytesTotal;
            this.options.onProgress?.(message.rank, message.bytesRead, message.bytesTotal);
            break;
          case 'reply': {
            const call = this.pending.get(message.id);
            if (!call) break;
            if (!message.ok) {
              const code = (message.error.code.startsWith('WEFT_') ? message.error.code : 'WEFT_WORKER_ERROR') as WeftErrorCode;
              this.fail(code, `${this.label} rank ${message.rank}: ${message.error.message}`);
              break;
            }
            call.replies.set(message.rank, message.result);
            if (call.replies.size === this.options.world) {
              this.pending.delete(message.id);
              call.resolve(call.replies);
            }
            break;
          }
          case 'heartbeat':
            break;
        }
      }
    } catch (err) {
      if (!this.closing) this.fail('WEFT_PROTOCOL', `coordinator socket failed: ${(err as Error).message}`);
    }
  }

  private hello(message: Extract<ReturnType<typeof parseWorkerMessage>, { type: 'hello' }>, state: RankState): void {
    const { rank } = message;
    if (this.secret !== null && !secretsEqual(message.secret, this.secret)) {
      process.stderr.write(`weft: refused a hello for rank ${rank} (pid ${message.pid}): wrong or missing worker secret\n`);
      return;
    }
    if (message.world !== this.options.world) {
      this.fail('WEFT_PROTOCOL', `${this.label} rank ${rank} was started for ${message.world} ranks, the group has ${this.options.world}`);
      return;
    }
    const previous = state.pid;
    state.pid = message.pid;
    state.local = message.hostname === hostname() || state.child?.pid === message.pid;
    state.collectiveEndpoint = message.collectiveEndpoint;
    state.lastSeen = Date.now();
    state.bytesRead = 0;
    state.bytesTotal = 0;
    // a rank that says hello again while the group runs has restarted and lost its weights and KV cache
    if (previous !== null && previous !== message.pid && !this.joinWaiter) {
      this.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} restarted (pid ${previous} is gone, pid ${message.pid} took its place)`);
      return;
    }
    if (this.allJoined()) this.joinWaiter?.();
  }

  /** Ping every rank and declare silent or vanished ones dead. */
  private watch(): void {
    if (this.failure || this.closing) return;
    const now = Date.now();
    const timeoutMs = this.options.heartbeatTimeoutMs ?? 30_000;
    this.ranks.forEach((state, rank) => {
      if (state.pid === null) return;
      if (state.local && state.child === null && !alive(state.pid)) this.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} (pid ${state.pid}) is gone`);
      else if (now - state.lastSeen > timeoutMs) this.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} (pid ${state.pid}) sent no heartbeat for ${now - state.lastSeen} ms`);
      else this.post(rank, { v: PROTOCOL_VERSION, type: 'ping', session: this.session });
    });
  }

  private post(rank: number, message: CoordinatorMessage): Promise<void> {
    return this.outbox.send([`rank-${rank}`, encode(message)]);
  }

  private fail(code: WeftErrorCode, message: string): void {
    if (this.failure) return;
    this.failure = new WeftError(code, message);
    for (const call of this.pending.values()) call.reject(this.failure);
    this.pending.clear();
    const listeners = this.failedListeners.splice(0);
    listeners.forEach((listener) => listener(this.failure!));
    if (!this.closing) this.options.onFailure?.(this.failure);
  }

  private readonly failedListeners: Array<(err: WeftError) => void> = [];
  /** Rejects when the group fails. */
  failed(): Promise<never> {
    return new Promise((_, reject) => {
      if (this.failure) reject(this.failure);
      else this.failedListeners.push(reject);
    });
  }

  get error(): WeftError | null {
    return this.failure;
  }

  /**
   * Rebuild a failed group: stop every rank (survivors too: their collectives point at the dead peer), start
   * them again (spawned: here; supervised: their supervisor restarts them after they exit), and wait for every
   * hello. The caller then sends `init` again.
   */
  async reform(graceMs = 3000): Promise<void> {
    if (this.closing) throw new WeftError('WEFT_CLOSED', 'the worker group is closed');
    if (!this.failure) this.fail('WEFT_WORKER_DIED', 'the group is being re-formed');
    const old = this.ranks.map((r) => r.pid);
    await Promise.all(this.ranks.map((_, rank) => this.post(rank, { v: PROTOCOL_VERSION, type: 'shutdown' }).catch(() => undefined)));
    // wait for the old processes to be gone; kill the ones that do not listen (a hung worker)
    await Promise.all(this.ranks.map((state) => this.stopProcess(state, graceMs)));
    this.ranks.forEach((state, rank) => {
      if (state.pid === null || state.pid === old[rank]) {
        state.pid = null;
        state.collectiveEndpoint = null;
      }
    });
    this.failure = null;
    if (this.options.spawnLocal) for (let rank = 0; rank < this.options.world; rank++) this.spawnRank(rank);
    await this.join();
  }

  private async stopProcess(state: RankState, graceMs: number): Promise<void> {
    const child = state.child;
    if (child) {
      this.stopped.add(child);
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        const kill = setTimeout(() => child.kill('SIGKILL'), graceMs);
        await exited;
        clearTimeout(kill);
      }
      state.child = null;
      return;
    }
    const pid = state.pid;
    if (pid === null || !state.local) return;
    const deadline = Date.now() + graceMs;
    while (alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    if (alive(pid)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
  }

  /** Send one command to every rank (built per rank) and wait for all replies. */
  private async broadcast(build: (rank: number, id: number) => CoordinatorMessage): Promise<Map<number, unknown>> {
    if (this.closing) throw new WeftError('WEFT_CLOSED', 'the worker group is closed');
    if (this.failure) throw this.failure;
    const id = this.nextId++;
    const replies = new Promise<Map<number, unknown>>((resolve, reject) => this.pending.set(id, { replies: new Map(), resolve, reject }));
    try {
      for (let rank = 0; rank < this.options.world; rank++) await this.post(rank, build(rank, id));
    } catch (err) {
      this.fail('WEFT_WORKER_DIED', `could not reach a worker: ${(err as Error).message}`);
    }
    return replies;
  }

  async init(command: Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot' | 'ncclId' | 'deviceIndex'>): Promise<void> {
    const collectiveRoot = this.ranks[0]?.collectiveEndpoint ?? '';
    // A GPU group forms a new NCCL communicator each time it (re)forms: a fresh unique id every init.
    const ncclId = command.device === 'cuda' && this.options.world > 1 ? (await import('../worker/collectives/nccl.ts')).loadNccl().getUniqueId() : undefined;
    const deviceIndex = (rank: number): number => this.options.devices?.[rank] ?? (this.options.spawnLocal ? rank : 0);
    await this.broadcast((rank, id) => ({ ...command, v: PROTOCOL_VERSION, type: 'init', id, collectiveRoot, deviceIndex: deviceIndex(rank), ...(ncclId && { ncclId }) }));
  }

  async step(batch: StepBatch): Promise<StepResult> {
    const replies = await this.broadcast((_, id) => ({ v: PROTOCOL_VERSION, type: 'step', id, batch }));
    return replies.get(0) as StepResult;
  }

  pids(): number[] {
    return this.ranks.map((r) => r.child?.pid ?? r.pid ?? -1);
  }

  status(): RankStatus[] {
    return this.ranks.map((r, rank) => ({ rank, pid: r.pid, joined: r.pid !== null, bytesRead: r.bytesRead, bytesTotal: r.bytesTotal }));
  }

  /** Ask every rank to stop, then kill whatever is still running after a grace period. */
  async close(graceMs = 3000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    clearInterval(this.timer);
    if (!this.failure) this.fail('WEFT_CLOSED', 'the worker group was closed');
    await Promise.all(this.ranks.map((_, rank) => this.post(rank, { v: PROTOCOL_VERSION, type: 'shutdown' }).catch(() => undefined)));
    const children = this.ranks.flatMap((r) => (r.child && r.child.exitCode === null && r.child.signalCode === null ? [r.child] : []));
    await Promise.all(
      children.map(
        (child) =>
          new Promise<void>((resolve) => {
            const kill = setTimeout(() => child.kill('SIGKILL'), graceMs);
            child.once('exit', () => {
              clearTimeout(kill);
              resolve();
            });
          }),
      ),
    );
    this.router.close();
  }
}
