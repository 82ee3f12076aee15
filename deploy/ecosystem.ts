/**
 * The pm2 ecosystem of one weft cluster (ecosystem.md 4.1): a coordinator (`weft serve --workers external`)
 * and one worker app per rank, each pinned to its GPU with CUDA_VISIBLE_DEVICES, in fork mode, with its own log
 * files and a restart policy. One `namespace` per cluster, so deleting the namespace stops exactly this cluster.
 * Pure: builds the object; launch.ts writes and starts it.
 */
import { join } from 'node:path';
import { EXIT_CONFIG } from '../core/errors.ts';

export interface EcosystemConfig {
  /** cluster name: apps are weft-<name>-coordinator and weft-<name>-rank-<r> */
  readonly name: string;
  /** absolute model directory */
  readonly modelDir: string;
  readonly tp: number;
  readonly device: 'cpu' | 'cuda';
  /** GPU index per rank (CUDA_VISIBLE_DEVICES), or null on the CPU */
  readonly gpus: readonly number[] | null;
  readonly host: string;
  readonly rpcPort: number;
  readonly httpPort: number;
  /** where the coordinator's worker socket listens (127.0.0.1) */
  readonly workerPort: number;
  /** the cluster's directory: logs/, worker.secret */
  readonly dir: string;
  /** node binary and bin/weft.js, absolute */
  readonly node: string;
  readonly weftBin: string;
  readonly threads?: number;
  readonly kvSlots?: number;
  readonly maxContext?: number;
  readonly maxQueue?: number;
  /**
   * Speculative decoding: the draft model and the GPU of each draft rank. The coordinator spawns the draft
   * workers as its own children (a dead draft turns speculation off; the cluster keeps serving).
   */
  readonly draft?: { readonly modelDir: string; readonly gpus: readonly number[] | null; readonly tp: number };
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
  const optional = (flag: string, value: number | undefined): string[] => (value === undefined ? [] : [flag, String(value)]);
  const coordinator = shared(
    'coordinator',
    [
      'serve',
      ...['--model', config.modelDir, '--tp', String(config.tp), '--device', config.device],
      ...['--host', config.host, '--rpc-port', String(config.rpcPort), '--http-port', String(config.httpPort)],
      ...['--workers', 'external', '--worker-port', String(config.workerPort), '--worker-secret-file', secretFile],
      ...optional('--kv-slots', config.kvSlots),
      ...optional('--max-context', config.maxContext),
      ...optional('--max-queue', config.maxQueue),
      ...optional('--threads', config.threads),
      ...(config.draft ? ['--draft', config.draft.modelDir, '--draft-tp', String(config.draft.tp)] : []),
      ...(config.draft?.gpus ? ['--draft-gpus', config.draft.gpus.join(',')] : []),
    ],
    {},
  );
  const workers = Array.from({ length: config.tp }, (_, rank) =>
    shared(
      `rank-${rank}`,
      ['worker', '--coordinator', `tcp://127.0.0.1:${config.workerPort}`, '--rank', String(rank), '--world', String(config.tp), '--secret-file', secretFile],
      {
        WEFT_RANK: String(rank),
        ...(config.gpus ? { CUDA_VISIBLE_DEVICES: String(config.gpus[rank]), NCCL_DEBUG: 'WARN', NCCL_NVLS_ENABLE: '0' } : { CUDA_VISIBLE_DEVICES: '' }),
      },
    ),
  );
  return { apps: [coordinator, ...workers] };
}
