/**
 * Worker process entry: connect to the coordinator, prove the group secret (worker/coordinator-link.ts), then
 * serve commands in order until told to shut down. Heartbeats go out while commands run; the worker exits on its
 * own when the coordinator stops pinging, its authenticated connection drops (a new one would have to prove itself
 * again, and this process's state belongs to the old one) or its parent process is gone, so a dead coordinator
 * never leaves workers behind.
 */
import * as zmq from 'zeromq';
import { hostname } from 'node:os';
import { PROTOCOL_VERSION } from '../core/wire.ts';
import { isWeftError } from '../core/errors.ts';
import { requireSecret } from '../core/frame-auth.ts';
import { WORKER_CURVE_OPTION, curveClient, type WorkerCurveKeys } from '../core/transport.ts';
import { ResponsiveClock } from '../core/loop-clock.ts';
import type { InitCommand, ReplyBody, StepBatch, WorkerMessage } from '../core/worker-protocol.ts';
import { CoordinatorLink } from './coordinator-link.ts';
import { bindCollectiveHub } from './collectives/cpu.ts';
import { loadNccl } from './collectives/nccl.ts';
import { WorkerState } from './worker.ts';

/** What a worker on this host would load (`weft doctor` loads this entry to ask). */
export { probeHost } from './host-probe.ts';

export interface WorkerOptions {
  coordinator: string; // tcp://host:port or ipc:///path
  rank: number;
  world: number;
  /** exit when this process is no longer our parent (local workers) */
  parentPid?: number;
  /** where rank 0 binds its collective hub */
  collectiveHost: string;
  /** exit when the coordinator is silent this long */
  coordinatorTimeoutMs: number;
  /** the group's shared secret, proven on connecting and authenticating every message (spawned workers get it in WEFT_WORKER_SECRET); required */
  secret?: string;
  /** the group's CURVE keys (WEFT_WORKER_CURVE, --worker-curve-file): required for a tcp:// coordinator that is not loopback */
  curve?: WorkerCurveKeys;
  /** the NCCL shared library cuda groups of several ranks load */
  ncclLibrary: string;
}

const HEARTBEAT_MS = 500;

export async function runWorker(options: WorkerOptions): Promise<number> {
  const { rank, world } = options;
  const secret = requireSecret(options.secret, `weft worker rank ${rank}`);
  // no routing id: the coordinator's ROUTER assigns one; what makes this connection rank `rank` is the handshake
  const socket = new zmq.Dealer({ linger: 0, maxMessageSize: 1 << 30, ...curveClient(options.coordinator, options.curve, options.curve?.serverKey, WORKER_CURVE_OPTION) });
  socket.connect(options.coordinator);
  const log = (line: string): void => void process.stderr.write(`weft worker rank ${rank}: ${line}\n`);
  const bindHub = (): Promise<{ socket: zmq.Router; endpoint: string }> | null =>
    rank === 0 && world > 1 ? bindCollectiveHub(options.collectiveHost, { coordinator: options.coordinator, ...(options.curve && { curve: options.curve }) }) : null;
  let hub = await bindHub();
  const link = new CoordinatorLink(socket, secret, { rank, world, pid: process.pid, collectiveEndpoint: hub?.endpoint ?? null, hostname: hostname() }, log);
  const post = (message: WorkerMessage): void => link.post(message);
  const state = new WorkerState(rank, world, hub?.socket ?? null, options.ncclLibrary, (bytesRead, bytesTotal) =>
    post({ v: PROTOCOL_VERSION, type: 'progress', rank, bytesRead, bytesTotal }), secret, options.curve,
  );

  // the backend of the last init: a CUDA rank leaves a re-forming group by exiting (its communicator's abort
  // waits for the decode graphs that hold it), a CPU rank rejoins it in this process
  let device: InitCommand['device'] | null = null;

  // the coordinator's silence is measured on a clock that stops while this process stalls (a long step)
  const clock = new ResponsiveClock(HEARTBEAT_MS);
  let lastHeard = clock.now();
  let exitCode: number | null = null;
  const stop = (code: number, why?: string): void => {
    if (exitCode !== null) return;
    if (why) log(why);
    exitCode = code;
    socket.close();
  };
  const timer = setInterval(() => {
    clock.probe();
    post({ v: PROTOCOL_VERSION, type: 'heartbeat', rank });
    if (clock.now() - lastHeard > options.coordinatorTimeoutMs) stop(1, `coordinator ${options.coordinator} silent for ${options.coordinatorTimeoutMs} ms, exiting`);
    if (options.parentPid !== undefined && process.ppid !== options.parentPid) stop(1, `parent process ${options.parentPid} is gone, exiting`);
    // CUDA collectives (NCCL, shared-gpu) that failed asynchronously leave this rank unable to step: exit, so the group re-forms
    // (a CPU collective's failure fails the step that met it, and the group re-forms around this process)
    const collectiveError = device === 'cuda' ? state.collectiveError() : null;
    if (collectiveError) stop(1, `the collectives reported an asynchronous error: ${collectiveError}`);
  }, HEARTBEAT_MS);
  process.once('SIGTERM', () => stop(0));
  process.once('SIGINT', () => stop(0));
  socket.events.on('disconnect', () => {
    if (link.established) stop(1, `lost its authenticated connection to coordinator ${options.coordinator}, exiting (a restarted coordinator is joined by a fresh process)`);
  });

  /**
   * Leave the broken group at once, not behind the running command: a collective waiting on the dead peer fails
   * now, which ends that command. In order after it: leave again (an init that was running, a fault while loading,
   * may have set up what the first left), bind rank 0's new hub, and reply with it.
   */
  const rejoin = (id: number): void => {
    if (device === 'cuda') return stop(0, 'leaving the re-forming group: a CUDA rank rejoins as a new process');
    state.leave(null);
    serve(id, async () => {
      state.leave(null);
      hub?.socket.close(); // closed with the collectives too, unless the group never initialised
      hub = null;
      try {
        hub = await bindHub();
      } catch (err) {
        stop(1, `could not bind a new collective hub to rejoin the group: ${(err as Error).message}`);
        throw err;
      }
      state.leave(hub?.socket ?? null);
      return { command: 'rejoin', result: { collectiveEndpoint: hub?.endpoint ?? null } };
    });
  };

  // A worker serves one coordinator instance: its connection is authenticated for that one (a restarted coordinator
  // drops the connection, and the worker exits above). A ping naming another session ends it the same way.
  let session: string | null = null;

  // Commands start strictly in order; pings are answered at once, even while a command is running. A step's
  // command is done once it is queued on the device: the next step is queued behind it while it runs, and its
  // reply goes out when its answer is back (`answer`).
  let commands: Promise<void> = Promise.resolve();
  const reply = async (id: number, answer: () => Promise<ReplyBody>): Promise<void> => {
    try {
      post({ v: PROTOCOL_VERSION, type: 'reply', rank, id, ...(await answer()) });
    } catch (err) {
      const code = isWeftError(err) ? err.code : 'WEFT_NATIVE';
      post({ v: PROTOCOL_VERSION, type: 'error', rank, id, error: { code, message: (err as Error).message } });
    }
  };
  const serve = (id: number, run: () => Promise<ReplyBody>): void => {
    commands = commands.then(() => reply(id, run));
  };
  const serveStep = (id: number, batch: StepBatch): void => {
    commands = commands.then(async () => {
      let launched: Promise<ReplyBody>;
      try {
        const { result } = await state.launch(batch);
        launched = result.then((answer) => ({ command: 'step', result: answer }));
      } catch (err) {
        launched = Promise.reject(err);
      }
      void reply(id, () => launched);
    });
  };

  try {
    for await (const frames of socket) {
      const message = link.receive(frames);
      if (message === null) continue;
      lastHeard = clock.now();
      if (message.type === 'init') {
        device = message.device;
        serve(message.id, async () => ({ command: 'init', result: await state.init(message) }));
      } else if (message.type === 'rejoin') rejoin(message.id);
      else if (message.type === 'step') serveStep(message.id, message.batch);
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
