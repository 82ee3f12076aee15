/**
 * `weft launch | status | logs | stop`: a cluster under pm2. launch writes the ecosystem file (and a 0600
 * shared secret for the workers) into the cluster's directory, $WEFT_HOME/<name> (default ~/.weft/<name>),
 * starts it through pm2's programmatic API and waits until `/health` answers 200, showing the ranks' load
 * progress meanwhile (coordinator/load-progress.ts). A coordinator that exits during start-up (a bad model, a
 * busy port) ends the wait at once with its own `weft: CODE: message` line, and the cluster's processes are
 * deleted (so too after the timeout). status without a name finds the one cluster running.
 * stop deletes the cluster's pm2 namespace, waits until every process is gone, and stops the
 * pm2 daemon when nothing else runs under it. pm2 is loaded only here, never by WeftClient.
 */
import { mkdirSync, writeFileSync, readFileSync, readdirSync, existsSync, statSync, openSync, readSync, closeSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import pm2 from 'pm2';
import { EXIT_CONFIG, WeftError, type WeftErrorCode } from '../core/errors.ts';
import { buildEcosystem } from './ecosystem.ts';
import { WEFT_BIN, type ConfigOf } from '../coordinator/config.ts';
import { makeSocketDir } from '../core/transport.ts';
import { LoadProgress, type ProgressOut } from '../coordinator/load-progress.ts';

/** A launched cluster: its name and the home its files live under ($WEFT_HOME). */
export type ClusterRef = Pick<ConfigOf<'status'>, 'name' | 'home'>;

interface ClusterRecord {
  name: string;
  namespace: string;
  http: string;
  rpc: string;
  ecosystem: string;
  dir: string;
  /** the workers' socket directory (removed when the cluster is deleted), or null for tcp:// */
  socketDir: string | null;
  apps: { name: string; out: string; err: string }[];
}

export function clusterDir(cluster: ClusterRef): string {
  return join(cluster.home, cluster.name);
}

async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolvePort(port));
    });
  });
}

/** pm2's callback API as promises, connected to the daemon of $PM2_HOME (started if absent). */
async function withPm2<T>(run: (api: typeof pm2) => Promise<T>): Promise<T> {
  await promisify<void>((cb) => pm2.connect((err) => cb(err ?? null)))();
  try {
    return await run(pm2);
  } finally {
    pm2.disconnect();
  }
}
const p2 = <T>(fn: (cb: (err: Error | null, value: T) => void) => void): Promise<T> => new Promise((res, rej) => fn((err, v) => (err ? rej(err) : res(v))));

function readRecord(cluster: ClusterRef): ClusterRecord {
  const path = join(clusterDir(cluster), 'cluster.json');
  if (!existsSync(path)) throw new WeftError('WEFT_BAD_REQUEST', `no cluster named "${cluster.name}" was launched (${path} is missing)`);
  return JSON.parse(readFileSync(path, 'utf8')) as ClusterRecord;
}

export async function launch(
  config: ConfigOf<'launch'>,
  log = (line: string): void => void process.stderr.write(line + '\n'),
  progressOut: ProgressOut = process.stderr,
): Promise<ClusterRecord> {
  const { name, tp } = config;
  const gpus = config.device === 'cuda' ? (config.gpus ?? Array.from({ length: tp }, (_, i) => i)) : null;
  const dir = clusterDir(config);
  mkdirSync(join(dir, 'logs'), { recursive: true, mode: 0o700 });
  writeFileSync(join(dir, 'worker.secret'), randomBytes(24).toString('hex'), { mode: 0o600 });
  const rpcPort = config.rpcPort || (await freePort());
  const httpPort = config.httpPort || (await freePort());
  // the workers reach the coordinator over ipc:// in a fresh private directory (a fixed --worker-port: tcp:// on loopback)
  const { workerPort } = config;
  const socketDir = workerPort ? null : makeSocketDir();
  const { device, host, kvSlots, kvDtype, maxContext, maxQueue, threads, allowedHosts, corsOrigins } = config;
  const ecosystem = buildEcosystem({
    name,
    dir,
    node: process.execPath,
    weftBin: WEFT_BIN,
    gpus,
    socketDir,
    serve: {
      modelDir: resolve(config.modelDir), tp, device, host, rpcPort, httpPort, ...(workerPort && { workerPort }), kvSlots, kvDtype, maxContext, maxQueue, threads,
      ...(allowedHosts && { allowedHosts }), ...(corsOrigins && { corsOrigins }), ...draftOptions(config, gpus), ...servingKnobs(config),
    },
  });
  const ecosystemPath = join(dir, `weft-${name}.ecosystem.config.cjs`);
  writeFileSync(ecosystemPath, `// written by weft launch; start by hand with: pm2 start ${ecosystemPath}\nmodule.exports = ${JSON.stringify(ecosystem, null, 2)};\n`, { mode: 0o600 });
  const loopback = ['127.0.0.1', '0.0.0.0', '::', ''].includes(host) ? '127.0.0.1' : host;
  const record: ClusterRecord = {
    name,
    namespace: `weft-${name}`,
    http: `http://${loopback}:${httpPort}`,
    rpc: `tcp://${loopback}:${rpcPort}`,
    ecosystem: ecosystemPath,
    dir,
    socketDir,
    apps: ecosystem.apps.map((a) => ({ name: a.name, out: a.out_file, err: a.error_file })),
  };
  writeFileSync(join(dir, 'cluster.json'), JSON.stringify(record, null, 2) + '\n', { mode: 0o600 });
  log(`weft: starting ${ecosystem.apps.length} processes under pm2 (namespace ${record.namespace}); ecosystem ${ecosystemPath}`);
  await withPm2(async (api) => {
    const existing = await p2<pm2.ProcessDescription[]>((cb) => api.list(cb));
    if (existing.some((p) => p.name?.startsWith(`${record.namespace}-`))) {
      if (socketDir) rmSync(socketDir, { recursive: true, force: true });
      throw new WeftError('WEFT_BAD_REQUEST', `cluster "${name}" is already running; weft stop --name ${name} first`);
    }
    await p2((cb) => api.start(ecosystem as unknown as pm2.StartOptions, cb));
    // one pm2 connection for the whole launch: pm2's client crashes when it reconnects right after a disconnect
    try {
      await waitReady(record, config.waitTimeoutMs, log, () => coordinatorExit(api, record), progressOut);
    } catch (err) {
      log(`weft: ${name} did not start; deleting its pm2 processes`);
      await deleteCluster(api, record).catch((stopErr: unknown) => log(`weft: could not delete the processes of ${name}: ${(stopErr as Error).message}`));
      throw err;
    }
  });
  return record;
}

/** pm2 states of a process that runs (or is being started); any other one means it exited. */
const RUNNING_STATES: ReadonlySet<string> = new Set(['online', 'launching']);

/**
 * The coordinator's start-up failure, if it has exited: pm2 holds it stopped (exit 78), errored, or has
 * restarted it. The error is its own last `weft: CODE: message` line, read from its pm2 log.
 */
async function coordinatorExit(api: typeof pm2, record: ClusterRecord): Promise<WeftError | null> {
  const name = `${record.namespace}-coordinator`;
  const [app] = await p2<pm2.ProcessDescription[]>((cb) => api.describe(name, cb));
  const env = app?.pm2_env;
  // pm2 7 reports an app it will not restart (a stop exit code) as 'waiting restart' when a restart delay is set
  if (!env || (RUNNING_STATES.has(env.status ?? '') && (env.restart_time ?? 0) === 0)) return null;
  const exitCode = (env as { exit_code?: number }).exit_code;
  const how = `the coordinator of "${record.name}" exited during start-up${exitCode !== undefined ? ` with code ${exitCode}` : ''}`;
  // pm2 writes the log from the process's pipe: the last line can land just after the exit is reported
  const errLog = record.apps.find((a) => a.name === name)!.err;
  for (let tries = 0; tries < 10; tries++) {
    const line = tailLines(errLog, 50).reverse().find((l) => /weft: WEFT_[A-Z_]+: /.test(l));
    const [, code, message] = /weft: (WEFT_[A-Z_]+): (.*)$/.exec(line ?? '') ?? [];
    if (code !== undefined) return new WeftError(code as WeftErrorCode, `${message} (${how})`);
    await new Promise((r) => setTimeout(r, 200));
  }
  const last = tailLines(errLog, 1)[0];
  return new WeftError(exitCode === EXIT_CONFIG ? 'WEFT_BAD_CONFIG' : 'WEFT_WORKER_DIED', `${how}${last ? `; its last line: ${last}` : ''}; see weft logs --name ${record.name}`);
}

/** Poll /health until 200, showing the ranks' load progress; fail if the coordinator exits or the deadline passes. */
async function waitReady(record: ClusterRecord, timeoutMs: number, log: (line: string) => void, exited: () => Promise<WeftError | null>, progressOut: ProgressOut): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const progress = new LoadProgress(progressOut, record.apps.length - 1);
  let listening = true;
  try {
    while (Date.now() < deadline) {
      const failure = await exited();
      if (failure) throw failure;
      try {
        const res = await fetch(`${record.http}/health`, { signal: AbortSignal.timeout(2000) });
        const body = (await res.json()) as { status: string; ranks?: { rank: number; bytesRead: number; bytesTotal: number; joined: boolean }[] };
        if (res.status === 200) {
          progress.done();
          log(`weft: ${record.name} is ready: HTTP ${record.http}, RPC ${record.rpc}`);
          return;
        }
        listening = true;
        for (const r of body.ranks ?? []) if (r.joined) progress.update(r.rank, r.bytesRead, r.bytesTotal);
      } catch {
        if (listening) log('weft: waiting for the coordinator to listen');
        listening = false;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  } finally {
    progress.done();
  }
  throw new WeftError('WEFT_TIMEOUT', `cluster "${record.name}" was not ready within ${timeoutMs} ms; see weft logs --name ${record.name}`);
}

/**
 * The name of the one launched cluster (under `home`) with processes in pm2, for `weft status` without --name;
 * none or several are refused, the latter naming them. pm2 is asked only when some cluster was launched.
 */
export async function onlyRunningCluster(home: string): Promise<string> {
  const launched = existsSync(home) ? readdirSync(home).sort().filter((name) => existsSync(join(home, name, 'cluster.json'))).map((name) => readRecord({ name, home })) : [];
  const running = launched.length === 0 ? [] : await withPm2(async (api) => {
    const names = new Set((await p2<pm2.ProcessDescription[]>((cb) => api.list(cb))).map((p) => p.name));
    return launched.filter((record) => record.apps.some((app) => names.has(app.name))).map((record) => record.name);
  });
  if (running.length === 1) return running[0]!;
  if (running.length === 0) throw new WeftError('WEFT_BAD_REQUEST', `no launched cluster is running (none under pm2 from ${home}); start one with weft launch`);
  throw new WeftError('WEFT_BAD_REQUEST', `${running.length} clusters are running: ${running.join(', ')}; name one with --name`);
}

export interface AppStatus {
  name: string;
  pid: number;
  status: string;
  restarts: number;
  uptimeS: number;
}

export async function status(cluster: ClusterRef): Promise<{ apps: AppStatus[]; health: unknown }> {
  const record = readRecord(cluster);
  const apps = await withPm2(async (api) => {
    const list = await p2<pm2.ProcessDescription[]>((cb) => api.list(cb));
    return list
      .filter((p) => p.name?.startsWith(`${record.namespace}-`))
      .map((p) => ({
        name: p.name ?? '',
        pid: p.pid ?? 0,
        status: p.pm2_env?.status ?? 'unknown',
        restarts: p.pm2_env?.restart_time ?? 0,
        uptimeS: p.pm2_env?.pm_uptime ? Math.round((Date.now() - p.pm2_env.pm_uptime) / 1000) : 0,
      }));
  });
  let health: unknown = null;
  try {
    const res = await fetch(`${record.http}/health`, { signal: AbortSignal.timeout(2000) });
    health = await res.json();
  } catch {
    health = { status: 'unreachable' };
  }
  return { apps, health };
}

/** The last `lines` non-empty lines of a log file (read from its last 256 KiB); none when it is missing. */
function tailLines(path: string, lines: number): string[] {
  if (!existsSync(path)) return [];
  const size = statSync(path).size;
  const length = Math.min(size, 256 * 1024);
  const buffer = Buffer.alloc(length);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, buffer, 0, length, size - length);
  } finally {
    closeSync(fd);
  }
  return buffer.toString('utf8').split('\n').filter(Boolean).slice(-lines);
}

/** The last `lines` lines of each process's logs. */
export function logs(cluster: ClusterRef, lines: number): string {
  const record = readRecord(cluster);
  const tail = (path: string): string => tailLines(path, lines).join('\n');
  return record.apps.map((app) => `==> ${app.name} <==\n${[tail(app.out), tail(app.err)].filter(Boolean).join('\n')}`).join('\n\n') + '\n';
}

/** Stop a launched cluster: its processes deleted and gone, and the pm2 daemon too when it has nothing else. */
export async function stop(cluster: ClusterRef): Promise<{ stopped: string[] }> {
  const record = readRecord(cluster);
  return withPm2((api) => deleteCluster(api, record));
}

/** Delete a cluster's pm2 namespace, wait until its processes are gone, and stop the daemon when it has nothing else. */
async function deleteCluster(api: typeof pm2, record: ClusterRecord): Promise<{ stopped: string[] }> {
  const list = await p2<pm2.ProcessDescription[]>((cb) => api.list(cb));
  const ours = list.filter((p) => p.name?.startsWith(`${record.namespace}-`));
  const pids = ours.map((p) => p.pid ?? 0).filter((pid) => pid > 0);
  if (ours.length > 0) await p2((cb) => api.delete(record.namespace, cb));
  const deadline = Date.now() + 20_000;
  const alive = (pid: number): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  while (pids.some(alive) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  for (const pid of pids.filter(alive)) process.kill(pid, 'SIGKILL');
  if (record.socketDir) rmSync(record.socketDir, { recursive: true, force: true });
  if (list.length === ours.length) {
    await p2((cb) => api.killDaemon(cb as (err: Error | null, v: unknown) => void));
    // pm2's client can keep a socket to the daemon it just killed: never let it hold this process open
    setTimeout(() => process.exit(), 2000).unref();
  }
  return { stopped: ours.map((p) => p.name ?? '') };
}

/** The draft group: its model, and one GPU per draft rank (default: the target's first GPU), or none on the CPU. */
/** The KV pool, step budget and attention options launch takes, passed to the coordinator's serve flags as given. */
export const LAUNCH_SERVING_KNOBS = ['kvCacheTokens', 'gpuMemoryFraction', 'maxNumBatchedTokens', 'attention', 'sparqR', 'sparqK', 'prefillAttention'] as const;
export function servingKnobs(config: Pick<ConfigOf<'launch'>, (typeof LAUNCH_SERVING_KNOBS)[number]>): Partial<Pick<ConfigOf<'launch'>, (typeof LAUNCH_SERVING_KNOBS)[number]>> {
  return Object.fromEntries(LAUNCH_SERVING_KNOBS.flatMap((key) => (config[key] === undefined ? [] : [[key, config[key]]])));
}

function draftOptions(config: ConfigOf<'launch'>, gpus: readonly number[] | null) {
  if (config.draftModelDir === undefined) return {};
  const draftGpus = gpus ? (config.draftGpus ?? [gpus[0]!]) : undefined;
  return { draftModelDir: resolve(config.draftModelDir), draftTp: draftGpus?.length ?? 1, ...(draftGpus && { draftGpus }) };
}
