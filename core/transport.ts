/**
 * How weft's peer links (coordinator ↔ worker control, rank 0's collective hub ↔ its peers) are carried, so that
 * what crosses them (step batches: users' token ids and sampling values; activations) is confidential as well as
 * authenticated (core/frame-auth.ts authenticates every message on either transport):
 * - on one host: `ipc://` sockets in a directory only this user can open (mode 0700); another local user can
 *   neither connect nor read, and the directory is removed when its cluster closes;
 * - across hosts: `tcp://` with CURVE (encryption; the coordinator is the CURVE server). The workers of a group
 *   share one key pair and know the coordinator's public key; rank 0's hub serves with the workers' pair.
 * A tcp:// link to or on a host that is not loopback refuses to start without CURVE keys.
 */
import { chmodSync, lstatSync, mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { WeftError } from './errors.ts';

/** A worker's CURVE keys (Z85 text, 40 characters each): the coordinator's public key and the workers' key pair. */
export interface WorkerCurveKeys {
  /** the coordinator's public key, which the workers' control sockets expect */
  readonly serverKey: string;
  readonly publicKey: string;
  readonly secretKey: string;
}

/** CURVE options of a socket that connects (the constructor options of a zmq.Dealer). */
export interface CurveClientOptions {
  readonly curveServerKey: string;
  readonly curvePublicKey: string;
  readonly curveSecretKey: string;
}

/** CURVE options of a socket that binds (the constructor options of a zmq.Router). */
export interface CurveServerOptions {
  readonly curveServer: true;
  readonly curveSecretKey: string;
}

/** How a worker is given its CURVE keys, as errors name it. */
export const WORKER_CURVE_OPTION = '--worker-curve-file PATH or WEFT_WORKER_CURVE';

const Z85_KEY = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;
/** sun_path holds 108 bytes with its terminating NUL: a longer ipc:// path cannot be bound. */
const MAX_IPC_PATH_BYTES = 107;

export function isLoopbackHost(host: string): boolean {
  return host === 'localhost' || host === '::1' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** The host of a tcp:// endpoint (null for any other transport). */
function tcpHost(endpoint: string): string | null {
  const match = /^tcp:\/\/(.+):(\d+|\*)$/.exec(endpoint);
  return match ? match[1]! : null;
}

/** Whether traffic on `endpoint` may leave this host: tcp:// to (or on) a host that is not loopback. */
export function leavesHost(endpoint: string): boolean {
  const host = tcpHost(endpoint);
  return host !== null && !isLoopbackHost(host);
}

/** The directory of an ipc:// endpoint (null for any other transport). */
export function ipcDirOf(endpoint: string): string | null {
  return endpoint.startsWith('ipc://') ? dirname(endpoint.slice('ipc://'.length)) : null;
}

/** The ipc:// endpoint of socket `name` in `dir`, refused when the path is too long to bind. */
export function ipcEndpoint(dir: string, name: string): string {
  const path = join(dir, name);
  if (Buffer.byteLength(path) > MAX_IPC_PATH_BYTES)
    throw new WeftError('WEFT_BAD_CONFIG', `the socket path ${path} has ${Buffer.byteLength(path)} bytes; ipc:// sockets allow ${MAX_IPC_PATH_BYTES}: choose a shorter socket directory`);
  return `ipc://${path}`;
}

/** Where a cluster's socket directory is made: $XDG_RUNTIME_DIR (a per-user tmpfs) when set, else the temp dir. */
function runtimeRoot(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  try {
    if (runtime && lstatSync(runtime).isDirectory()) return runtime;
  } catch {
    // not there: the temp dir
  }
  return tmpdir();
}

/** A fresh socket directory, weft-XXXXXX, mode 0700 (a random name: one a dead cluster left is never reused). */
export function makeSocketDir(): string {
  const dir = mkdtempSync(join(runtimeRoot(), 'weft-'));
  chmodSync(dir, 0o700);
  return dir;
}

/**
 * Use `dir` as a private directory (sockets, keys): made (mode 0700) when missing; an existing one must be a
 * directory of this user that no one else can open, since its permissions are all that keeps other local users
 * off what it holds.
 */
export function ensurePrivateDir(dir: string, option: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const stat = lstatSync(dir);
  const uid = process.getuid?.();
  if (!stat.isDirectory()) throw new WeftError('WEFT_BAD_CONFIG', `${option} ${dir} is not a directory`);
  if (uid !== undefined && stat.uid !== uid) throw new WeftError('WEFT_BAD_CONFIG', `${option} ${dir} belongs to uid ${stat.uid}, not to this user (${uid})`);
  if ((stat.mode & 0o077) !== 0)
    throw new WeftError('WEFT_BAD_CONFIG', `${option} ${dir} has mode ${(stat.mode & 0o777).toString(8)}: other users could reach its sockets; chmod 700 it`);
}

/** A worker's CURVE keys from their JSON text ({serverKey, publicKey, secretKey}), checked. */
export function parseWorkerCurveKeys(text: string, from: string): WorkerCurveKeys {
  let keys: Partial<Record<keyof WorkerCurveKeys, unknown>>;
  try {
    keys = JSON.parse(text) as typeof keys;
  } catch (err) {
    throw new WeftError('WEFT_BAD_CONFIG', `${from} is not JSON: ${(err as Error).message}`);
  }
  const fields = ['serverKey', 'publicKey', 'secretKey'] as const;
  const bad = fields.filter((field) => typeof keys?.[field] !== 'string' || !Z85_KEY.test(keys[field] as string));
  if (bad.length > 0) throw new WeftError('WEFT_BAD_CONFIG', `${from} must hold {serverKey, publicKey, secretKey} as 40-character Z85 keys; ${bad.join(', ')} ${bad.length === 1 ? 'is' : 'are'} missing or malformed`);
  return { serverKey: keys.serverKey as string, publicKey: keys.publicKey as string, secretKey: keys.secretKey as string };
}

/**
 * The CURVE options of a socket that connects to `endpoint` (expecting `serverKey`): CURVE on every tcp:// link
 * when keys are given, none on ipc://; a link that leaves the host without keys is refused (`option` says how to
 * give them).
 */
export function curveClient(endpoint: string, keys: WorkerCurveKeys | undefined, serverKey: string | undefined, option: string): CurveClientOptions | Record<string, never> {
  if (tcpHost(endpoint) === null) return {};
  if (!keys || serverKey === undefined) {
    if (leavesHost(endpoint)) throw new WeftError('WEFT_BAD_CONFIG', `${endpoint} is not loopback: its traffic is encrypted with CURVE, and no keys were given (${option})`);
    return {};
  }
  return { curveServerKey: serverKey, curvePublicKey: keys.publicKey, curveSecretKey: keys.secretKey };
}

/** The CURVE options of a socket that binds `endpoint` with `secretKey` (see curveClient for when CURVE applies). */
export function curveServer(endpoint: string, secretKey: string | undefined, option: string): CurveServerOptions | Record<string, never> {
  if (tcpHost(endpoint) === null) return {};
  if (secretKey === undefined) {
    if (leavesHost(endpoint)) throw new WeftError('WEFT_BAD_CONFIG', `binding ${endpoint} (not loopback) needs CURVE keys so that its traffic is encrypted (${option})`);
    return {};
  }
  return { curveServer: true, curveSecretKey: secretKey };
}
