/**
 * Worker process entry: connect to the coordinator, say hello, then serve commands in order until told to
 * shut down. Heartbeats go out while commands run; the worker exits on its own when the coordinator stops
 * pinging or its parent process is gone, so a dead coordinator never leaves workers behind.
 */
import * as zmq from 'zeromq';
import { hostname } from 'node:os';
import { PROTOCOL_VERSION, SendQueue, decode, encode } from '../core/wire.ts';
import { isWeftError } from '../core/errors.ts';
import { parseCoordinatorMessage, type ReplyBody, type WorkerMessage } from '../core/worker-protocol.ts';
import { bindCollectiveHub } from './collectives/cpu.ts';
import { loadNccl } from './collectives/nccl.ts';
import { WorkerState } from './worker.ts';

export interface WorkerOptions {
  coordinator: string; // tcp://host:port
  rank: number;
  world: number;
  /** exit when this process is no longer our parent (local workers) */
  parentPid?: number;
  /** where rank 0 binds its collective hub */
  collectiveHost: string;
  /** exit when the coordinator is silent this long */
  coordinatorTimeoutMs: number;
  /** the group's shared secret, sent in hello (spawned workers get it in WEFT_WORKER_SECRET) */
  secret?: string;
  /** the NCCL shared library cuda groups of several ranks load */
  ncclLibrary: string;
}

const HEARTBEAT_MS = 500;

export async function runWorker(options: WorkerOptions): Promise<number> {
  const { rank, world } = options;
  const socket = new zmq.Dealer({ routingId: `rank-${rank}`, linger: 0, maxMessageSize: 1 << 30 });
  socket.connect(options.coordinator);
  const outbox = new SendQueue(socket);
  const post = (message: WorkerMessage): void => {
    outbox.send([encode(message)]).catch(() => undefined); // the coordinator may be gone; the watchdog handles that
  };
  const hub = rank === 0 && world > 1 ? await bindCollectiveHub(options.collectiveHost) : null;
  const state = new WorkerState(rank, world, hub?.socket ?? null, options.ncclLibrary, (bytesRead, bytesTotal) =>
    post({ v: PROTOCOL_VERSION, type: 'progress', rank, bytesRead, bytesTotal }),
  );

  let lastHeard = Date.now();
  let exitCode: number | null = null;
  const stop = (code: number, why?: string): void => {
    if (exitCode !== null) return;
    if (why) process.stderr.write(`weft worker rank ${rank}: ${why}\n`);
    exitCode = code;
    socket.close();
  };
  const timer = setInterval(() => {
    post({ v: PROTOCOL_VERSION, type: 'heartbeat', rank });
    if (Date.now() - lastHeard > options.coordinatorTimeoutMs) stop(1, `coordinator ${options.coordinator} silent for ${options.coordinatorTimeoutMs} ms, exiting`);
    if (options.parentPid !== undefined && process.ppid !== options.parentPid) stop(1, `parent process ${options.parentPid} is gone, exiting`);
    // a collective that failed asynchronously leaves this rank unable to step: exit, so the group re-forms
    const collectiveError = state.collectiveError();
    if (collectiveError) stop(1, `NCCL reported an asynchronous error: ${collectiveError}`);
  }, HEARTBEAT_MS);
  process.once('SIGTERM', () => stop(0));
  process.once('SIGINT', () => stop(0));

  post({
    v: PROTOCOL_VERSION,
    type: 'hello',
    rank,
    world,
    pid: process.pid,
    collectiveEndpoint: hub?.endpoint ?? null,
    hostname: hostname(),
    ...(options.secret !== undefined && { secret: options.secret }),
  });
  // A worker serves one coordinator instance. When another one pings (the coordinator restarted), this process
  // exits so that its supervisor (pm2) starts it fresh and it joins the new coordinator with a new hello.
  let session: string | null = null;

  // Commands run strictly in order; pings are answered at once, even while a command is running.
  let commands: Promise<void> = Promise.resolve();
  const serve = (id: number, run: () => Promise<ReplyBody>): void => {
    commands = commands.then(async () => {
      try {
        post({ v: PROTOCOL_VERSION, type: 'reply', rank, id, ...(await run()) });
      } catch (err) {
        const code = isWeftError(err) ? err.code : 'WEFT_NATIVE';
        post({ v: PROTOCOL_VERSION, type: 'error', rank, id, error: { code, message: (err as Error).message } });
      }
    });
  };

  try {
    for await (const [frame] of socket) {
      lastHeard = Date.now();
      let message;
      try {
        message = parseCoordinatorMessage(decode(frame ?? Buffer.alloc(0)));
      } catch (err) {
        process.stderr.write(`weft worker rank ${rank}: dropped ${(err as Error).message}\n`);
        continue;
      }
      if (message.type === 'init') serve(message.id, async () => ({ command: 'init', result: await state.init(message) }));
      else if (message.type === 'step') serve(message.id, async () => ({ command: 'step', result: await state.step(message.batch) }));
      // rank 0 makes its group's NCCL id: the coordinator never loads NCCL, and a missing library fails here, named
      else if (message.type === 'ncclId') serve(message.id, async () => ({ command: 'ncclId', result: { ncclId: loadNccl(options.ncclLibrary).getUniqueId() } }));
      else if (message.type === 'shutdown') stop(0);
      else if (message.type === 'ping' && message.session !== undefined) {
        session ??= message.session;
        if (session !== message.session) stop(1, `coordinator ${options.coordinator} restarted (new session), exiting to rejoin it`);
      }
    }
  } catch (err) {
    if (exitCode === null) throw err;
  } finally {
    clearInterval(timer);
    state.close();
    hub?.socket.close();
  }
  return exitCode ?? 0;
}
