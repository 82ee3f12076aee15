/**
 * The pm2 ecosystem of one weft cluster (ecosystem.md 4.1): a coordinator (`weft serve --workers external`),
 * reached over an ipc:// socket in the cluster's private socket directory, and one worker app per rank, each
 * pinned to its GPU with CUDA_VISIBLE_DEVICES, in fork mode, with its own log files and a restart policy. One
 * `namespace` per cluster, so deleting the namespace stops exactly this cluster. Every process's argv is
 * written from its options by config.ts (argvFor), the flags they were declared with. Pure: builds the object;
 * launch.ts writes and starts it.
 */
import { join } from 'node:path';
import { EXIT_CONFIG, WeftError } from '../core/errors.ts';
import { NCCL_ENVIRONMENT, argvFor, declarationsOf, flagMirrors, type ConfigOf } from '../coordinator/config.ts';
import { workerEndpointIn } from '../coordinator/worker-transport.ts';

export interface EcosystemConfig {
  /** cluster name: apps are weft-<name>-coordinator and weft-<name>-rank-<r> */
  readonly name: string;
  /** the cluster's directory: logs/, worker.secret */
  readonly dir: string;
  /** node binary and bin/weft.js, absolute */
  readonly node: string;
  readonly weftBin: string;
  /** GPU index per rank (CUDA_VISIBLE_DEVICES), or null on the CPU */
  readonly gpus: readonly number[] | null;
  /**
   * The coordinator's `weft serve` options (absolute model paths); it waits for the workers on an ipc:// socket in
   * `socketDir`, or on tcp://127.0.0.1:`workerPort` when `socketDir` is null. A draft's workers are the
   * coordinator's own children (a dead draft group re-forms in the background).
   */
  readonly serve: Partial<ConfigOf<'serve'>> & Pick<ConfigOf<'serve'>, 'modelDir' | 'tp'>;
  /** the directory (mode 0700) of the workers' ipc:// socket, which launch made and stop removes; null: tcp:// on workerPort */
  readonly socketDir: string | null;
}

export interface Pm2App {
  name: string;
  namespace: string;
  script: string;
  args: string[];
  interpreter: 'none';
  exec_mode: 'fork';
  autorestart: boolean;
  max_restarts: number;
  min_uptime: number;
  exp_backoff_restart_delay: number;
  stop_exit_codes: number[];
  kill_timeout: number;
  out_file: string;
  error_file: string;
  time: boolean;
  merge_logs: boolean;
  env: Record<string, string>;
}

/** exit code weft reserves for configuration errors: pm2 does not restart a process that exits with it */
export const CONFIG_EXIT_CODE = EXIT_CONFIG;

export function buildEcosystem(config: EcosystemConfig): { apps: Pm2App[] } {
  const namespace = `weft-${config.name}`;
  const logs = join(config.dir, 'logs');
  const secretFile = join(config.dir, 'worker.secret');
  const shared = (name: string, args: string[], env: Record<string, string>): Pm2App => ({
    name: `${namespace}-${name}`,
    namespace,
    // run node directly (no pm2 wrapper): bin/weft.js registers tsx itself
    script: config.node,
    args: [config.weftBin, ...args],
    interpreter: 'none',
    exec_mode: 'fork',
    autorestart: true,
    // restarts within min_uptime count as a crash loop; it must exceed a normal weight load
    max_restarts: 10,
    min_uptime: 60_000,
    exp_backoff_restart_delay: 200,
    stop_exit_codes: [CONFIG_EXIT_CODE],
    // covers closing the group (and, on GPUs, NCCL abort and freeing device memory)
    kill_timeout: 15_000,
    out_file: join(logs, `${name}.out.log`),
    error_file: join(logs, `${name}.err.log`),
    time: true,
    merge_logs: true,
    env: { WEFT_CLUSTER: config.name, NODE_ENV: 'production', ...env },
  });
  const { tp, workerPort } = config.serve;
  const { socketDir } = config;
  if (socketDir === null && !workerPort) throw new WeftError('WEFT_BAD_REQUEST', 'an ecosystem needs a socket directory or a fixed worker port');
  const endpoint = socketDir !== null ? workerEndpointIn(socketDir) : `tcp://127.0.0.1:${workerPort}`;
  const serve = { ...config.serve, workers: 'external' as const, workerSecretFile: secretFile, ...(socketDir !== null && { workerSocketDir: socketDir }) };
  // launch resolved these options, and the worker socket (pm2 hands the coordinator launch's environment): their
  // mirrors must not override the argv, which leaves values at their default out
  const resolved = flagMirrors([...declarationsOf('launch').map(([key]) => key), ...Object.keys(serve), 'workerSocketDir']);
  const coordinator = shared('coordinator', argvFor('serve', serve), Object.fromEntries(resolved.map((variable) => [variable, ''])));
  const workers = Array.from({ length: tp }, (_, rank) =>
    shared(`rank-${rank}`, argvFor('worker', { coordinator: endpoint, rank, world: tp, workerSecretFile: secretFile }), {
      WEFT_RANK: String(rank),
      ...(config.gpus ? { CUDA_VISIBLE_DEVICES: String(config.gpus[rank]), NCCL_DEBUG: 'WARN', ...NCCL_ENVIRONMENT } : { CUDA_VISIBLE_DEVICES: '' }),
    }),
  );
  return { apps: [coordinator, ...workers] };
}
