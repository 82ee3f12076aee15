/**
 * `weft` command line: generate, score, worker. Every failure ends in a non-zero exit and one line on
 * stderr (`weft: CODE: message`); results go to stdout (`--json`: one JSON object).
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { startCluster, type Cluster } from './cluster.ts';
import type { SpeculationStats } from './speculative.ts';
import { WeftError, exitCodeFor, isWeftError } from '../core/errors.ts';
import { runWorker } from '../worker/main.ts';
import { WORKER_SECRET_ENV } from './worker-group.ts';
import { readFileSync } from 'node:fs';

/** The worker's shared secret: from --secret-file, else the environment (spawned workers); never from argv. */
function workerSecret(file: string | undefined): { secret?: string } {
  if (file !== undefined) {
    try {
      return { secret: readFileSync(file, 'utf8').trim() };
    } catch (err) {
      throw new WeftError('WEFT_BAD_REQUEST', `cannot read --secret-file ${file}: ${(err as Error).message}`);
    }
  }
  const secret = process.env[WORKER_SECRET_ENV];
  return secret ? { secret } : {};
}

function integer(name: string, min: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}, got "${value}"`);
    return n;
  };
}

function finite(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError(`${name} must be a number, got "${value}"`);
    return n;
  };
}

function idList(value: string): number[] {
  const ids = value.split(',').map((s) => s.trim());
  const bad = ids.findIndex((s) => !/^\d+$/.test(s));
  if (bad >= 0) throw new InvalidArgumentError(`token ids must be comma-separated non-negative integers; entry ${bad} is "${ids[bad]}"`);
  return ids.map(Number);
}

interface ClusterFlags {
  model: string;
  tp: number;
  device: 'cpu' | 'cuda';
  maxContext?: number;
  kvSlots?: number;
  threads?: number;
  expertParallel?: boolean;
  draft?: string;
  draftTp?: number;
  draftGpus?: number[];
  speculateK?: number;
}

/** The cluster options the flags shared by generate, score and serve give. */
function clusterFlags(flags: ClusterFlags) {
  return {
    modelDir: flags.model,
    tp: flags.tp,
    device: flags.device,
    ...(flags.maxContext !== undefined && { maxContext: flags.maxContext }),
    ...(flags.kvSlots !== undefined && { kvSlots: flags.kvSlots }),
    ...(flags.threads !== undefined && { threads: flags.threads }),
    ...(flags.expertParallel && { expertParallel: true }),
    ...(flags.draft !== undefined && {
      draft: { modelDir: flags.draft, tp: flags.draftTp ?? flags.draftGpus?.length ?? 1, k: flags.speculateK ?? 4, ...(flags.draftGpus && { gpus: flags.draftGpus }) },
    }),
  };
}

function clusterOptions(command: Command): Command {
  return command
    .requiredOption('--model <dir>', 'Hugging Face model directory')
    .option('--tp <n>', 'tensor-parallel degree (worker processes)', integer('--tp', 1), 1)
    .addOption(new Option('--device <device>', 'compute backend').choices(['cpu', 'cuda']).default('cpu'))
    .option('--max-context <n>', 'cap on the context length (KV cache per sequence)', integer('--max-context', 1))
    .option('--kv-slots <n>', 'sequences with a KV cache at once', integer('--kv-slots', 1))
    .option('--threads <n>', 'CPU threads per worker', integer('--threads', 1))
    .option('--expert-parallel', 'Mixtral: whole experts per rank instead of every expert cut across ranks')
    .option('--draft <dir>', 'draft model (same vocabulary) for speculative decoding')
    .option('--draft-tp <n>', "the draft model's tensor-parallel degree", integer('--draft-tp', 1))
    .option('--draft-gpus <list>', "GPU of each draft rank (default: the target's first GPUs)", idList)
    .option('--speculate-k <k>', 'draft tokens proposed per round', integer('--speculate-k', 1));
}

async function withCluster<T>(flags: ClusterFlags, run: (cluster: Cluster) => Promise<T>): Promise<T> {
  const cluster = await startCluster(clusterFlags(flags));
  const stop = (): void => void cluster.close().finally(() => process.exit(130));
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    return await run(cluster);
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await cluster.close();
  }
}

/** Acceptance rate, tokens per target step and time in each model, for one run. */
function speculationSummary(stats: SpeculationStats) {
  return {
    rounds: stats.rounds,
    proposed: stats.proposed,
    accepted: stats.accepted,
    acceptanceRate: stats.proposed ? stats.accepted / stats.proposed : 0,
    tokensPerTargetStep: stats.rounds ? stats.emitted / stats.rounds : 0,
    draftSeconds: stats.draftSeconds,
    targetSeconds: stats.targetSeconds,
  };
}

function buildProgram(): Command {
  const program = new Command('weft').description('tensor-parallel LLM inference').exitOverride().showHelpAfterError(false);
  program.configureOutput({ writeErr: (text) => process.stderr.write(text.startsWith('error:') ? `weft: ${text}` : text) });

  clusterOptions(program.command('generate').description('generate text from a prompt'))
    .option('--prompt <text>', 'text prompt (encoded with the model tokenizer, BOS added)')
    .option('--prompt-ids <ids>', 'comma-separated prompt token ids', idList)
    .option('--max-new-tokens <n>', 'tokens to generate at most', integer('--max-new-tokens', 1), 16)
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', finite('--temperature'), 0)
    .option('--top-k <k>', 'keep the k most likely tokens (0: off)', integer('--top-k', 0), 0)
    .option('--top-p <p>', 'nucleus sampling threshold', finite('--top-p'), 1)
    .option('--seed <s>', 'random seed (same seed, same tokens)', integer('--seed', 0))
    .option('--ignore-eos', 'keep generating past EOS', false)
    .option('--json', 'print one JSON object instead of streaming text', false)
    .action(async (flags) => {
      if (flags.prompt === undefined && flags.promptIds === undefined) throw new WeftError('WEFT_BAD_REQUEST', 'give --prompt or --prompt-ids');
      await withCluster(flags as ClusterFlags, async (cluster) => {
        const sampling = {
          maxNewTokens: flags.maxNewTokens,
          temperature: flags.temperature,
          topK: flags.topK,
          topP: flags.topP,
          ignoreEos: flags.ignoreEos,
          ...(flags.seed !== undefined && { seed: flags.seed }),
        };
        const request = flags.promptIds ? { promptIds: flags.promptIds as number[], sampling } : { prompt: flags.prompt as string, sampling };
        for await (const event of cluster.generate(request)) {
          if (event.type === 'token' && !flags.json) process.stdout.write(event.text);
          if (event.type === 'done') {
            const speculation = cluster.speculationStats();
            if (flags.json) process.stdout.write(JSON.stringify({ ...event, type: undefined, ...(speculation && { speculation: speculationSummary(speculation) }) }) + '\n');
            else process.stdout.write('\n');
          }
        }
      });
    });

  clusterOptions(program.command('score').description('log-probability of each token given the ones before it'))
    .requiredOption('--ids <ids>', 'comma-separated token ids', idList)
    .option('--json', 'print {"logprobs": [...]}', false)
    .action(async (flags) => {
      await withCluster(flags as ClusterFlags, async (cluster) => {
        const { logprobs } = await cluster.score(flags.ids as number[]);
        process.stdout.write(flags.json ? JSON.stringify({ logprobs }) + '\n' : logprobs.map((l) => (l === null ? '-' : l.toFixed(6))).join('\n') + '\n');
      });
    });

  clusterOptions(program.command('serve').description('serve the model over RPC (ZeroMQ) and HTTP (OpenAI-compatible) until SIGTERM/SIGINT'))
    .option('--host <host>', 'interface RPC and HTTP bind (non-loopback needs --curve-dir and --api-key)', '127.0.0.1')
    .option('--rpc-port <port>', 'RPC (ZeroMQ ROUTER) port; 0 picks a free one', integer('--rpc-port', 0), 5555)
    .option('--http-port <port>', 'HTTP port; 0 picks a free one', integer('--http-port', 0), 8000)
    .addOption(new Option('--api-key <token>', 'bearer token HTTP clients must send').env('WEFT_API_KEY'))
    .option('--curve-dir <dir>', 'CURVE keys for the RPC socket (server.json, clients.txt; see weft keygen)')
    .addOption(new Option('--workers <mode>', 'spawn the workers, or wait for external ones (pm2)').choices(['spawn', 'external']).default('spawn'))
    .option('--worker-port <port>', 'port external workers connect to (127.0.0.1)', integer('--worker-port', 0), 0)
    .option('--worker-secret-file <path>', 'shared secret external workers present')
    .option('--max-queue <n>', 'requests waiting for a KV slot at most; more get "busy"', integer('--max-queue', 0), 64)
    .option('--request-timeout <ms>', 'deadline of every request (0: none)', integer('--request-timeout', 0), 0)
    .option('--heartbeat-timeout <ms>', 'a worker silent this long is declared dead', integer('--heartbeat-timeout', 100), 5000)
    .action(async (flags) => {
      if (flags.workers === 'external' && !flags.workerPort) throw new WeftError('WEFT_BAD_REQUEST', '--workers external needs a fixed --worker-port');
      const { serve, readCurveDir } = await import('./serve.ts');
      const emit = (event: Record<string, unknown>): void => void process.stdout.write(JSON.stringify(event) + '\n');
      const server = await serve({
        ...clusterFlags(flags as ClusterFlags),
        host: flags.host,
        rpcPort: flags.rpcPort,
        httpPort: flags.httpPort,
        ...(flags.apiKey !== undefined && { apiKey: flags.apiKey as string }),
        ...(flags.curveDir !== undefined && { curve: readCurveDir(flags.curveDir as string) }),
        workers: flags.workers,
        ...(flags.workerPort && { workerPort: flags.workerPort }),
        ...(flags.workerSecretFile !== undefined && workerSecret(flags.workerSecretFile as string).secret !== undefined && { workerSecret: workerSecret(flags.workerSecretFile as string).secret! }),
        maxQueue: flags.maxQueue,
        requestTimeoutMs: flags.requestTimeout,
        heartbeatTimeoutMs: flags.heartbeatTimeout,
        joinTimeoutMs: flags.workers === 'external' ? 120_000 : 60_000,
        onProgress: () => undefined,
        onStateChange: (state, detail) => emit({ event: 'state', state, detail }),
      });
      emit({ event: 'listening', rpc: server.rpcEndpoint, http: server.httpUrl, model: server.cluster.info().name, tp: flags.tp });
      const exitCode = await new Promise<number>((resolve) => {
        process.once('SIGINT', () => resolve(0));
        process.once('SIGTERM', () => resolve(0));
        server.cluster.ready.catch(() => resolve(1));
        const watch = setInterval(() => server.cluster.state === 'failed' && resolve(1), 500);
        watch.unref();
      });
      emit({ event: 'stopping', exitCode });
      await server.close();
      process.exitCode = exitCode;
    });

  const nameOption = (c: Command): Command => c.option('--name <name>', 'cluster name (pm2 namespace weft-<name>)', 'default');
  nameOption(program.command('launch').description('start a cluster under pm2: a coordinator and one worker per GPU; waits until it serves'))
    .requiredOption('--model <dir>', 'Hugging Face model directory')
    .option('--tp <n>', 'tensor-parallel degree (worker processes)', integer('--tp', 1))
    .option('--gpus <list>', 'GPU index per rank, e.g. 0,1,2,3', idList)
    .addOption(new Option('--device <device>', 'compute backend').choices(['cpu', 'cuda']).default('cuda'))
    .option('--draft <dir>', 'draft model for speculative decoding')
    .option('--draft-gpus <list>', 'GPUs of the draft model', idList)
    .option('--host <host>', 'interface RPC and HTTP bind', '127.0.0.1')
    .option('--rpc-port <port>', 'RPC port (0: a free one)', integer('--rpc-port', 0), 5555)
    .option('--http-port <port>', 'HTTP port (0: a free one)', integer('--http-port', 0), 8000)
    .option('--worker-port <port>', 'port workers connect to (0: a free one)', integer('--worker-port', 0), 0)
    .option('--max-context <n>', 'cap on the context length', integer('--max-context', 1))
    .option('--kv-slots <n>', 'sequences with a KV cache at once', integer('--kv-slots', 1))
    .option('--max-queue <n>', 'requests waiting for a KV slot at most', integer('--max-queue', 0))
    .option('--threads <n>', 'CPU threads per worker', integer('--threads', 1))
    .option('--wait-timeout <ms>', 'give up waiting for readiness after this', integer('--wait-timeout', 1), 600_000)
    .action(async (flags) => {
      const { launch } = await import('../deploy/launch.ts');
      const tp = (flags.tp as number | undefined) ?? (flags.gpus as number[] | undefined)?.length ?? 1;
      const record = await launch({
        name: flags.name,
        model: flags.model,
        tp,
        device: flags.device,
        ...(flags.gpus !== undefined && { gpus: flags.gpus as number[] }),
        ...(flags.draft !== undefined && { draft: flags.draft as string }),
        ...(flags.draftGpus !== undefined && { draftGpus: flags.draftGpus as number[] }),
        host: flags.host,
        rpcPort: flags.rpcPort,
        httpPort: flags.httpPort,
        workerPort: flags.workerPort,
        ...(flags.threads !== undefined && { threads: flags.threads }),
        ...(flags.kvSlots !== undefined && { kvSlots: flags.kvSlots }),
        ...(flags.maxContext !== undefined && { maxContext: flags.maxContext }),
        ...(flags.maxQueue !== undefined && { maxQueue: flags.maxQueue }),
        waitTimeoutMs: flags.waitTimeout,
      });
      process.stdout.write(JSON.stringify({ event: 'ready', name: record.name, http: record.http, rpc: record.rpc, ecosystem: record.ecosystem }) + '\n');
    });

  nameOption(program.command('status').description('processes of a launched cluster and its health'))
    .option('--json', 'print one JSON object', false)
    .action(async (flags) => {
      const { status } = await import('../deploy/launch.ts');
      const result = await status(flags.name);
      if (flags.json) return void process.stdout.write(JSON.stringify(result) + '\n');
      for (const app of result.apps) process.stdout.write(`${app.name.padEnd(32)} ${app.status.padEnd(10)} pid ${String(app.pid).padEnd(8)} restarts ${app.restarts}  up ${app.uptimeS}s\n`);
      process.stdout.write(`health: ${JSON.stringify(result.health)}\n`);
    });

  nameOption(program.command('logs').description('last lines of every process log of a launched cluster'))
    .option('--lines <n>', 'lines per process', integer('--lines', 1), 50)
    .action(async (flags) => {
      const { logs } = await import('../deploy/launch.ts');
      process.stdout.write(logs(flags.name, flags.lines));
    });

  nameOption(program.command('stop').description('stop a launched cluster: no process left behind'))
    .action(async (flags) => {
      const { stop } = await import('../deploy/launch.ts');
      process.stdout.write(JSON.stringify(await stop(flags.name)) + '\n');
    });

  program
    .command('keygen')
    .description('write CURVE keys for the RPC socket: server.json, client.json, clients.txt (mode 0600)')
    .requiredOption('--out <dir>', 'directory to write')
    .action(async (flags) => {
      const { writeCurveDir } = await import('./serve.ts');
      const written = writeCurveDir(flags.out as string);
      process.stdout.write(JSON.stringify(written) + '\n');
    });

  program
    .command('worker')
    .description('run one worker rank (started by the coordinator, or by hand to join one)')
    .requiredOption('--coordinator <endpoint>', 'coordinator endpoint, tcp://HOST:PORT')
    .requiredOption('--rank <r>', 'this worker rank', integer('--rank', 0))
    .requiredOption('--world <n>', 'ranks in the group', integer('--world', 1))
    .option('--parent-pid <pid>', 'exit when this process is gone', integer('--parent-pid', 1))
    .option('--collective-host <host>', 'interface the rank-0 collective hub binds', '127.0.0.1')
    .option('--secret-file <path>', `file holding the group's shared secret (else $${WORKER_SECRET_ENV})`)
    .option('--coordinator-timeout <ms>', 'exit when the coordinator is silent this long', integer('--coordinator-timeout', 1), 15000)
    .action(async (flags) => {
      if (flags.rank >= flags.world) throw new WeftError('WEFT_BAD_REQUEST', `--rank ${flags.rank} must be below --world ${flags.world}`);
      process.exitCode = await runWorker({
        coordinator: flags.coordinator,
        rank: flags.rank,
        world: flags.world,
        collectiveHost: flags.collectiveHost,
        coordinatorTimeoutMs: flags.coordinatorTimeout,
        ...workerSecret(flags.secretFile as string | undefined),
        ...(flags.parentPid !== undefined && { parentPid: flags.parentPid }),
      });
    });
  return program;
}

/** Run the CLI; resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    const commanderCode = (err as { code?: string }).code ?? '';
    if (commanderCode === 'commander.helpDisplayed' || commanderCode === 'commander.version') return 0;
    if (commanderCode.startsWith('commander.')) return 2; // commander already printed its one line
    const message = isWeftError(err) ? `${err.code}: ${err.message}` : (err as Error).message ?? String(err);
    process.stderr.write(`weft: ${message.split('\n')[0]}\n`);
    return exitCodeFor(err);
  }
}
