/**
 * One group of workers as the coordinator sees it: the local processes it spawned (if any), and commands
 * broadcast to every rank with all replies awaited, over its WorkerClient (socket, hello, heartbeats, replies).
 *
 * The first fault (a process exit here, or one the client sees) fails the group: every pending and later call
 * rejects with an error naming the rank. `reform()` then rebuilds it around the survivors: a rank whose process
 * answers keeps it and rejoins (its collectives and model are rebuilt by the next `init`); the dead or hung ones
 * are stopped and started again (spawned ones here; supervised ones, under pm2, by their supervisor), they say
 * hello again, and the caller sends `init` again to every rank.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { WeftError } from '../core/errors.ts';
import { requireSecret } from '../core/frame-auth.ts';
import type { Command, CommandBody, CommandResult, InitCommand, StepBatch, StepResult } from '../core/worker-protocol.ts';
import { WorkerClient, alive, type RankStatus } from './worker-client.ts';
import { WEFT_BIN, argvFor, processEnvironment, workerEnvironment } from './config.ts';
import { readWorkerCurveDir, type GroupCurveKeys } from './worker-transport.ts';

export type { RankStatus } from './worker-client.ts';

export interface WorkerGroupOptions {
  readonly world: number;
  /** spawn the workers as child processes of this one (else wait for `weft worker` processes to join) */
  readonly spawnLocal: boolean;
  /** host the ROUTER binds. Defaults to 127.0.0.1. */
  readonly bindHost?: string;
  /** port the ROUTER binds; 0 picks a free one (on loopback: no port, an ipc:// socket). Defaults to 0. */
  readonly port?: number;
  /** directory of the ipc:// socket (made, mode 0700, when missing). Defaults to a fresh one, removed on close. */
  readonly socketDir?: string;
  /**
   * Directory of the group's CURVE keys (coordinator/worker-transport.ts; made when empty): required when bindHost
   * is not loopback. Spawned workers get their keys in WEFT_WORKER_CURVE.
   */
  readonly curveDir?: string;
  /** a rank silent this long is declared dead. Defaults to 30000 ms. */
  readonly heartbeatTimeoutMs?: number;
  /** all ranks must have said hello within this. Defaults to 60000 ms. */
  readonly joinTimeoutMs?: number;
  /**
   * The group's shared secret: workers prove it on connecting, and every message both ways is authenticated with
   * it. Spawned workers get a random one by default; external workers need one (at least 16 characters).
   */
  readonly secret?: string;
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
  /** called once per fault, with the error that failed the group */
  readonly onFailure?: (err: WeftError) => void;
  /** what errors call this group's processes, so a fault names the group as well as the rank. Defaults to 'worker'. */
  readonly label?: string;
  /** the largest message a worker may send (core/worker-protocol.ts workerMessageLimit); default 64 MiB */
  readonly maxMessageBytes?: number;
  /**
   * CUDA device of each rank. Defaults to the rank itself for spawned workers (one GPU per rank on this host),
   * and to 0 for external ones (pm2 gives each its GPU through CUDA_VISIBLE_DEVICES).
   */
  readonly devices?: readonly number[];
}

/** What `init` needs from the caller; the group adds the collective root, the NCCL id and each rank's device. */
export type InitSettings = Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot' | 'ncclId' | 'deviceIndex'>;


/** A spawned rank: its process and the last lines it wrote to stderr, quoted when it dies. */
interface SpawnedRank {
  readonly child: ChildProcess;
  readonly stderrTail: string[];
}

export class WorkerGroup {
  private readonly spawned: (SpawnedRank | null)[];
  private readonly label: string;
  private readonly secret: string;
  private readonly curve: GroupCurveKeys | undefined;
  private closing = false;
  /** children this group stopped on purpose (re-forming): their exit is not a fault */
  private readonly stopped = new WeakSet<ChildProcess>();
  private client!: WorkerClient;

  private constructor(private readonly options: WorkerGroupOptions) {
    this.spawned = Array.from({ length: options.world }, () => null);
    this.label = options.label ?? 'worker';
    const secret = options.secret ?? (options.spawnLocal ? randomBytes(24).toString('hex') : undefined);
    this.secret = requireSecret(secret, `the ${this.label} group`);
    this.curve = options.curveDir !== undefined ? readWorkerCurveDir(options.curveDir) : undefined;
  }

  /** Bind the socket and spawn the local ranks; `join()` waits for their hello. */
  static async bind(options: WorkerGroupOptions): Promise<WorkerGroup> {
    const group = new WorkerGroup(options);
    group.client = await WorkerClient.bind({
      world: options.world,
      bindHost: options.bindHost ?? '127.0.0.1',
      port: options.port ?? 0,
      ...(options.socketDir !== undefined && { socketDir: options.socketDir }),
      ...(group.curve && { curve: group.curve }),
      heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 30_000,
      secret: group.secret,
      label: group.label,
      ...(options.maxMessageBytes !== undefined && { maxMessageBytes: options.maxMessageBytes }),
      childPid: (rank) => group.spawned[rank]?.child.pid,
      ...(options.onProgress && { onProgress: options.onProgress }),
      ...(options.onFailure && { onFailure: options.onFailure }),
    });
    group.spawnAll();
    return group;
  }

  /** Where the workers connect. */
  get endpoint(): string {
    return this.client.endpoint;
  }

  /** Wait until every rank has said hello (rejects on a fault or after joinTimeoutMs). */
  join(): Promise<void> {
    return this.client.join(this.options.joinTimeoutMs ?? 60_000);
  }

  /** Spawn every local rank not running (all at first; after a re-form, the ones that did not rejoin). */
  private spawnAll(): void {
    if (this.options.spawnLocal) for (let rank = 0; rank < this.options.world; rank++) if (!this.spawned[rank]) this.spawnRank(rank);
  }

  private spawnRank(rank: number): void {
    const args = [WEFT_BIN, ...argvFor('worker', { coordinator: this.endpoint, rank, world: this.options.world, parentPid: process.pid })];
    const child = spawn(process.execPath, args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: workerEnvironment(this.secret, this.curve?.worker),
    });
    const spawned: SpawnedRank = { child, stderrTail: [] };
    this.spawned[rank] = spawned;
    child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
      if (processEnvironment().workerStderr === 'inherit') process.stderr.write(chunk);
      spawned.stderrTail.push(...chunk.split('\n').filter((line) => line.trim()));
      spawned.stderrTail.splice(0, Math.max(0, spawned.stderrTail.length - 5));
    });
    child.on('error', (err) => this.client.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} could not start: ${err.message}`));
    child.on('exit', (code, signal) => {
      if (this.spawned[rank] === spawned) this.spawned[rank] = null;
      if (this.closing || this.stopped.has(child)) return;
      const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      const last = spawned.stderrTail.at(-1);
      this.client.fail('WEFT_WORKER_DIED', `${this.label} rank ${rank} (pid ${child.pid}) ${how}${last ? `: ${last}` : ''}`);
    });
  }

  /**
   * Rebuild a failed group around the ranks that survived it: each rank whose process answers `rejoin` within
   * `graceMs` leaves the broken group and keeps its process; the others (dead, hung, or a CUDA rank, which exits
   * instead) are stopped (killed when they do not listen) and started again (spawned: here; supervised: their
   * supervisor restarts them after they exit). Resolves when every rank has said hello; the caller then sends
   * `init` again, to every rank.
   */
  async reform(graceMs = 3000): Promise<void> {
    if (this.closing) throw new WeftError('WEFT_CLOSED', `the ${this.label} group is closed`);
    this.client.fail('WEFT_WORKER_DIED', 'the group is being re-formed'); // a no-op when it already failed
    const pidsBefore = this.spawned.map((_, rank) => this.client.pid(rank));
    const rejoined = await this.client.rejoinAll(graceMs);
    // a rank whose new process (restarted by its supervisor) proved itself meanwhile is not stopped: it is fresh
    const restarting = rejoined.flatMap((ok, rank) => (ok || this.client.pid(rank) !== pidsBefore[rank] ? [] : [rank]));
    const stalePids = pidsBefore.map((pid, rank) => (restarting.includes(rank) ? pid : null));
    // a rank still running after the grace did not answer it: hung, killed at once (a remote one is only asked)
    await this.client.shutdownAll(restarting);
    await Promise.all(restarting.map((rank) => this.stopRank(rank, 0)));
    // closed while the old ranks stopped: spawning now would leave processes nobody closes
    if (this.closing) throw new WeftError('WEFT_CLOSED', `the ${this.label} group was closed while re-forming`);
    this.client.reset(stalePids);
    this.spawnAll();
    await this.join();
  }

  private async stopRank(rank: number, graceMs: number): Promise<void> {
    const child = this.spawned[rank]?.child;
    if (child) {
      this.stopped.add(child);
      await exited(child, graceMs);
      this.spawned[rank] = null;
      return;
    }
    const pid = this.client.pid(rank);
    if (pid === null || !this.client.isLocal(rank)) return;
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

  /** Send one command to every rank (built per rank) and wait for all replies, by rank. */
  private broadcast<C extends Command>(build: (rank: number) => CommandBody<C>): Promise<CommandResult<C>[]> {
    return Promise.all(this.spawned.map((_, rank) => this.client.request(rank, build(rank))));
  }

  /** Initialise every rank; returns the smallest KV pool (positions) the ranks sized from gpuMemoryFraction, if they did. */
  async init(settings: InitSettings): Promise<number | undefined> {
    const collectiveRoot = this.client.collectiveEndpoint(0) ?? '';
    // A GPU group forms a new NCCL communicator each time it (re)forms: rank 0 makes a fresh unique id every init.
    // shared-gpu, when asked for by name, needs no NCCL (a host may have none); `auto` lets each rank choose, so it gets an id
    const needsNccl = settings.device === 'cuda' && this.options.world > 1 && settings.collectives !== 'shared-gpu';
    const ncclId = needsNccl ? (await this.client.request(0, { type: 'ncclId' })).ncclId : undefined;
    const deviceIndex = (rank: number): number => this.options.devices?.[rank] ?? (this.options.spawnLocal ? rank : 0);
    this.client.computesOnHost = settings.device === 'cpu';
    const replies = await this.broadcast<'init'>((rank) => ({ ...settings, type: 'init', collectiveRoot, deviceIndex: deviceIndex(rank), ...(ncclId && { ncclId }) }));
    const pools = replies.flatMap((reply) => (reply.kvCacheTokens === undefined ? [] : [reply.kvCacheTokens]));
    return pools.length ? Math.min(...pools) : undefined;
  }

  /** One step on every rank; rank 0 answers with the result. */
  async step(batch: StepBatch): Promise<StepResult> {
    const replies = await this.broadcast<'step'>(() => ({ type: 'step', batch }));
    return replies[0]!;
  }

  pids(): number[] {
    return this.spawned.map((s, rank) => s?.child.pid ?? this.client.pid(rank) ?? -1);
  }

  status(): RankStatus[] {
    return this.client.status();
  }

  /** Ask every rank to stop, then kill whatever is still running after a grace period. */
  async close(graceMs = 3000): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const running = this.spawned.flatMap((s) => (s ? [s.child] : []));
    await this.client.close(async () => {
      await Promise.all(running.map((child) => exited(child, graceMs)));
    });
  }
}

/** Wait for `child` to exit, killing it after `graceMs`. */
async function exited(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exit = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const kill = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exit;
  clearTimeout(kill);
}
