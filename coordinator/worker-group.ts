/**
 * One group of workers as the coordinator sees it: a ROUTER socket they connect to, the local processes it
 * spawned (if any), heartbeats both ways, and commands broadcast to every rank with all replies awaited.
 * The first fault (a process exit, a silent rank, an error reply) fails the whole group: every pending and
 * later call rejects with an error naming the rank, and close() leaves no process behind.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, SendQueue, decode, encode } from './wire.ts';
import { WeftError, type WeftErrorCode } from './errors.ts';
import { parseWorkerMessage, type CoordinatorMessage, type InitCommand, type StepBatch, type StepResult } from '../worker/protocol.ts';

export interface WorkerGroupOptions {
  readonly world: number;
  /** spawn the workers as child processes of this one (else wait for `weft worker` processes to join) */
  readonly spawnLocal: boolean;
  /** host:port the ROUTER binds; port 0 picks a free one. Defaults to 127.0.0.1:0. */
  readonly bindHost?: string;
  readonly port?: number;
  /** a rank silent this long is declared dead. Defaults to 30000 ms. */
  readonly heartbeatTimeoutMs?: number;
  /** all ranks must have said hello within this. Defaults to 60000 ms. */
  readonly joinTimeoutMs?: number;
  readonly env?: NodeJS.ProcessEnv;
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
}

interface PendingCall {
  readonly replies: Map<number, unknown>;
  resolve(results: Map<number, unknown>): void;
  reject(err: Error): void;
}

interface RankState {
  pid: number | null;
  lastSeen: number;
  collectiveEndpoint: string | null;
  child: ChildProcess | null;
  /** last lines the process wrote to stderr, quoted when it dies */
  stderrTail: string[];
}

const weftBin = fileURLToPath(new URL('../bin/weft.js', import.meta.url));
const PING_MS = 1000;

export class WorkerGroup {
  private readonly router: zmq.Router;
  private readonly outbox: SendQueue;
  private readonly ranks: RankState[];
  private readonly pending = new Map<number, PendingCall>();
  private nextId = 1;
  private failure: WeftError | null = null;
  private closing = false;
  private readonly timer: NodeJS.Timeout;
  private joined!: () => void;
  private readonly allJoined = new Promise<void>((resolve) => (this.joined = resolve));

  private constructor(
    private readonly options: WorkerGroupOptions,
    readonly endpoint: string,
    router: zmq.Router,
  ) {
    this.router = router;
    this.outbox = new SendQueue(router);
    this.ranks = Array.from({ length: options.world }, () => ({ pid: null, lastSeen: 0, collectiveEndpoint: null, child: null, stderrTail: [] }));
    this.timer = setInterval(() => this.watch(), PING_MS);
    void this.receiveLoop();
  }

  /** Bind, start (or await) every rank, and wait for all of them to say hello. */
  static async start(options: WorkerGroupOptions): Promise<WorkerGroup> {
    const router = new zmq.Router({ handover: true, mandatory: true, linger: 0, maxMessageSize: 64 << 20 });
    await router.bind(`tcp://${options.bindHost ?? '127.0.0.1'}:${options.port || '*'}`);
    const group = new WorkerGroup(options, router.lastEndpoint ?? '', router);
    if (options.spawnLocal) for (let rank = 0; rank < options.world; rank++) group.spawnRank(rank);
    const joinTimeoutMs = options.joinTimeoutMs ?? 60_000;
    let timeout: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        group.allJoined,
        group.failed(),
        new Promise((_, reject) => {
          timeout = setTimeout(() => {
            const missing = group.ranks.flatMap((r, i) => (r.pid === null ? [i] : []));
            reject(new WeftError('WEFT_TIMEOUT', `ranks ${missing.join(', ')} did not join ${group.endpoint} within ${joinTimeoutMs} ms`));
          }, joinTimeoutMs);
        }),
      ]);
    } catch (err) {
      await group.close();
      throw err;
    } finally {
      clearTimeout(timeout);
    }
    return group;
  }

  private spawnRank(rank: number): void {
    const args = [weftBin, 'worker', '--coordinator', this.endpoint, '--rank', String(rank), '--world', String(this.options.world), '--parent-pid', String(process.pid)];
    const child = spawn(process.execPath, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, ...this.options.env, NCCL_NVLS_ENABLE: '0' },
    });
    const state = this.ranks[rank]!;
    state.child = child;
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      if (process.env.WEFT_WORKER_STDERR === 'inherit') process.stderr.write(chunk);
      state.stderrTail.push(...chunk.split('\n').filter((line) => line.trim()));
      state.stderrTail.splice(0, Math.max(0, state.stderrTail.length - 5));
    });
    child.on('error', (err) => this.fail('WEFT_WORKER_DIED', `worker rank ${rank} could not start: ${err.message}`));
    child.on('exit', (code, signal) => {
      state.child = null;
      if (this.closing) return;
      const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      const last = state.stderrTail.at(-1);
      this.fail('WEFT_WORKER_DIED', `worker rank ${rank} (pid ${child.pid}) ${how}${last ? `: ${last}` : ''}`);
    });
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const [identity, frame] of this.router) {
        let message;
        try {
          message = parseWorkerMessage(decode(frame ?? Buffer.alloc(0)));
        } catch (err) {
          process.stderr.write(`weft: dropped a message from ${String(identity)}: ${(err as Error).message}\n`);
          continue;
        }
        const state = this.ranks[message.rank];
        if (!state || String(identity) !== `rank-${message.rank}`) continue; // a peer claiming a rank it does not own
        state.lastSeen = Date.now();
        switch (message.type) {
          case 'hello':
            if (message.world !== this.options.world) {
              this.fail('WEFT_PROTOCOL', `worker rank ${message.rank} was started for ${message.world} ranks, the group has ${this.options.world}`);
              break;
            }
            state.pid = message.pid;
            state.collectiveEndpoint = message.collectiveEndpoint;
            if (this.ranks.every((r) => r.pid !== null)) this.joined();
            break;
          case 'progress':
            this.options.onProgress?.(message.rank, message.bytesRead, message.bytesTotal);
            break;
          case 'reply': {
            const call = this.pending.get(message.id);
            if (!call) break;
            if (!message.ok) {
              const code = (message.error.code.startsWith('WEFT_') ? message.error.code : 'WEFT_WORKER_ERROR') as WeftErrorCode;
              this.fail(code, `worker rank ${message.rank}: ${message.error.message}`);
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

  /** Ping every rank and declare silent ones dead. */
  private watch(): void {
    if (this.failure || this.closing) return;
    const now = Date.now();
    const timeoutMs = this.options.heartbeatTimeoutMs ?? 30_000;
    this.ranks.forEach((state, rank) => {
      if (state.pid === null) return;
      if (now - state.lastSeen > timeoutMs) this.fail('WEFT_WORKER_DIED', `worker rank ${rank} (pid ${state.pid}) sent no heartbeat for ${now - state.lastSeen} ms`);
      else this.post(rank, { v: PROTOCOL_VERSION, type: 'ping' });
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
    this.failedListeners.forEach((listener) => listener(this.failure!));
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

  async init(command: Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot'>): Promise<void> {
    const collectiveRoot = this.ranks[0]?.collectiveEndpoint ?? '';
    await this.broadcast((_, id) => ({ ...command, v: PROTOCOL_VERSION, type: 'init', id, collectiveRoot }));
  }

  async step(batch: StepBatch): Promise<StepResult> {
    const replies = await this.broadcast((_, id) => ({ v: PROTOCOL_VERSION, type: 'step', id, batch }));
    return replies.get(0) as StepResult;
  }

  pids(): number[] {
    return this.ranks.map((r) => r.child?.pid ?? r.pid ?? -1);
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
