/**
 * The socket a worker group connects to, bound the way core/transport.ts says: `ipc://` in a socket directory of
 * mode 0700 for workers on this host (the default: loopback and no fixed port), else `tcp://` with CURVE (required
 * when the host is not loopback). Also the group's CURVE keys (`--worker-curve-dir`): the coordinator's pair and
 * the workers' pair, kept in files of mode 0600 so that a restarted coordinator keeps the key its workers expect.
 */
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { WeftError } from '../core/errors.ts';
import { WORKER_MESSAGE_MAX_BYTES } from '../core/worker-protocol.ts';
import { curveServer, ensurePrivateDir, ipcEndpoint, isLoopbackHost, makeSocketDir, parseWorkerCurveKeys, type WorkerCurveKeys } from '../core/transport.ts';

/** A worker group's CURVE keys as its coordinator holds them: its own pair, and what its workers get. */
export interface GroupCurveKeys {
  readonly publicKey: string;
  readonly secretKey: string;
  /** what each worker of the group is given (WEFT_WORKER_CURVE or --worker-curve-file): the coordinator's public key and the workers' pair */
  readonly worker: WorkerCurveKeys;
}

/** How to name the CURVE option in errors, for both ways of giving it. */
export const CURVE_OPTION = '--worker-curve-dir DIR, or workerCurveDir in startCluster';
const SOCKET_DIR_OPTION = '--worker-socket-dir';

/** Fresh keys for a group, made at start (zmq.curveKeyPair). */
export function makeGroupCurveKeys(): GroupCurveKeys {
  const coordinator = zmq.curveKeyPair();
  const worker = zmq.curveKeyPair();
  return { ...coordinator, worker: { serverKey: coordinator.publicKey, ...worker } };
}

/**
 * A group's CURVE keys from `dir`: coordinator.json ({publicKey, secretKey}) and worker.json (the file workers
 * are given with --worker-curve-file). Both are made, mode 0600, when the directory has neither.
 */
export function readWorkerCurveDir(dir: string): GroupCurveKeys {
  ensurePrivateDir(dir, '--worker-curve-dir');
  const coordinatorFile = join(dir, 'coordinator.json');
  const workerFile = join(dir, 'worker.json');
  if (!existsSync(coordinatorFile) && !existsSync(workerFile)) {
    const keys = makeGroupCurveKeys();
    writeFileSync(coordinatorFile, JSON.stringify({ publicKey: keys.publicKey, secretKey: keys.secretKey }, null, 2) + '\n', { mode: 0o600 });
    writeFileSync(workerFile, JSON.stringify(keys.worker, null, 2) + '\n', { mode: 0o600 });
    return keys;
  }
  let coordinator: { publicKey?: unknown; secretKey?: unknown };
  let workerText: string;
  try {
    coordinator = JSON.parse(readFileSync(coordinatorFile, 'utf8')) as typeof coordinator;
    workerText = readFileSync(workerFile, 'utf8');
  } catch (err) {
    throw new WeftError('WEFT_BAD_CONFIG', `cannot read the worker CURVE keys in ${dir} (coordinator.json and worker.json): ${(err as Error).message}`);
  }
  const worker = parseWorkerCurveKeys(workerText, workerFile);
  // the coordinator's pair is checked through the shape workers read: its public key must be the one they expect
  const own = parseWorkerCurveKeys(JSON.stringify({ ...coordinator, serverKey: coordinator.publicKey }), coordinatorFile);
  if (own.publicKey !== worker.serverKey) throw new WeftError('WEFT_BAD_CONFIG', `${workerFile} expects server key ${worker.serverKey}, but ${coordinatorFile} holds ${own.publicKey}`);
  return { publicKey: own.publicKey, secretKey: own.secretKey, worker };
}

/** The ipc:// endpoint of group `label`'s socket in socket directory `dir` (what `weft launch` hands its workers). */
export function workerEndpointIn(dir: string, label = 'worker'): string {
  return ipcEndpoint(dir, `${label.replace(/\W+/g, '-')}.sock`);
}

export interface WorkerSocketOptions {
  /** host the socket binds: loopback with no fixed port means ipc:// */
  readonly bindHost: string;
  /** a fixed port means tcp:// (0: a free port, or ipc:// on loopback) */
  readonly port: number;
  /** the directory of the ipc:// socket (made, mode 0700, when missing; kept on close); default: a fresh one, removed on close */
  readonly socketDir?: string;
  /** CURVE keys; required when bindHost is not loopback */
  readonly curve?: GroupCurveKeys;
  /** the group's label, which names its socket file ('worker', 'draft worker') */
  readonly label: string;
  /** the largest message a worker may send (core/worker-protocol.ts workerMessageLimit); default WORKER_MESSAGE_MAX_BYTES */
  readonly maxMessageBytes?: number;
}

export interface WorkerSocket {
  readonly router: zmq.Router;
  /** where the workers connect */
  readonly endpoint: string;
  /** after the router closed: remove its socket file and the directory this made */
  release(): void;
}

export async function bindWorkerSocket(options: WorkerSocketOptions): Promise<WorkerSocket> {
  const { bindHost, port, label } = options;
  // no handover: a connection that asks for a routing id already in use is ignored, never given the other's messages
  const routerOptions = { mandatory: true, linger: 0, maxMessageSize: options.maxMessageBytes ?? WORKER_MESSAGE_MAX_BYTES, sendTimeout: 5000 } as const;
  if (port !== 0 || !isLoopbackHost(bindHost)) {
    const address = `tcp://${bindHost.includes(':') ? `[${bindHost}]` : bindHost}:${port || '*'}`;
    const curve = curveServer(address, options.curve?.secretKey, CURVE_OPTION);
    // a context of its own under CURVE: a ZAP handler of the RPC socket (api/server.ts) would judge every CURVE client of its context
    const router = new zmq.Router({ ...routerOptions, ...curve, ...('curveServer' in curve && { context: new zmq.Context() }) });
    await router.bind(address);
    return { router, endpoint: router.lastEndpoint ?? address, release: () => undefined };
  }
  const given = options.socketDir;
  if (given !== undefined) ensurePrivateDir(given, SOCKET_DIR_OPTION);
  const dir = given ?? makeSocketDir();
  const router = new zmq.Router(routerOptions);
  let endpoint: string;
  try {
    endpoint = workerEndpointIn(dir, label);
    await router.bind(endpoint);
  } catch (err) {
    router.close();
    if (given === undefined) rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  // a directory this made goes with the socket; one it was given stays (its maker removes it: weft stop)
  const release = (): void => rmSync(given === undefined ? dir : endpoint.slice('ipc://'.length), { recursive: true, force: true });
  return { router, endpoint, release };
}
