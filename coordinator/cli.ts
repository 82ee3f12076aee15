/**
 * `weft` command line: generate, score, serve, launch and its companions, worker. Each command's flags are
 * the options config.ts declares for it. Every failure ends in a non-zero exit and one line on stderr
 * (`weft: CODE: message`); results go to stdout (`--json`: one JSON object).
 */
import { Command, Option } from 'commander';
import { startCluster, type Cluster, type ClusterOptions } from './cluster.ts';
import type { SpeculationStats } from './speculative.ts';
import { WeftError, exitCodeFor, isWeftError } from '../core/errors.ts';
import { LoadProgress } from './load-progress.ts';
import { PACKAGE_JSON } from './package-layout.ts';
import { WORKER_ENTRY, clusterOptionsOf, commandConfig, declarationsOf, describeDefault, givenSettings, processEnvironment, useNcclEnvironment, workerStartOf, type CommandLineValues, type CommandName, type ConfigOf, type WorkerStart } from './config.ts';
import { DEFAULT_MODEL_DIR } from './config/options.ts';

const DESCRIPTIONS: Readonly<Record<CommandName, string>> = {
  generate: 'generate text from a prompt',
  score: 'log-probability of each token given the ones before it',
  serve: 'serve the model over RPC (ZeroMQ) and HTTP (OpenAI-compatible) until SIGTERM/SIGINT',
  launch: 'start a cluster under pm2: a coordinator and one worker per GPU; waits until it serves',
  status: 'processes of a launched cluster and its health',
  logs: 'last lines of every process log of a launched cluster',
  stop: 'stop a launched cluster: no process left behind',
  keygen: 'write CURVE keys for the RPC socket: server.json, client.json, clients.txt (mode 0600)',
  worker: 'run one worker rank (started by the coordinator, or by hand to join one)',
  quantize: 'write a weight-only int8 or int4 copy of a dense checkpoint, or convert a GPTQ/AWQ one (safetensors and config.json)',
  doctor: 'check that this host can run the model as asked: Node.js, the addon, CUDA, NCCL, ZeroMQ, the model, then one token; exit 1 if a check fails',
};


/**
 * A command whose flags are its declared options; `run` gets them checked, with the environment and defaults,
 * and the flags as given (to tell a flag left out from one given at its default).
 */
function command<C extends CommandName>(program: Command, name: C, run: (config: ConfigOf<C>, flags: CommandLineValues) => Promise<void>): void {
  const cmd = program.command(name).description(DESCRIPTIONS[name]);
  const flagged: [string, Option][] = [];
  const aliased: [string, string, Option, Option][] = [];  // key, alias flag, its option (hidden: the main flag's help names it), the main one
  for (const [key, decl] of declarationsOf(name)) {
    if (decl.flag === undefined) continue;
    const fallback = describeDefault(decl, name);
    const notes = [decl.required && 'required', fallback !== undefined && `default: ${fallback}`, decl.env !== undefined && `env ${decl.env}`, decl.aliases && `also ${decl.aliases.join(', ')}`].filter(Boolean);
    const spelling = (flag: string): string => (decl.arg ? `${flag} <${decl.arg}>` : flag);
    const option = new Option(spelling(decl.flag), decl.help + (notes.length ? ` (${notes.join('; ')})` : ''));
    cmd.addOption(option);
    flagged.push([key, option]);
    for (const alias of decl.aliases ?? []) {
      const hidden = new Option(spelling(alias)).hideHelp();
      cmd.addOption(hidden);
      aliased.push([key, alias, hidden, option]);
    }
  }
  cmd.action(async () => {
    const valueOf = (option: Option) => cmd.getOptionValue(option.attributeName()) as string | true | undefined;
    const flags: Record<string, string | true | undefined> = Object.fromEntries(flagged.map(([key, option]) => [key, valueOf(option)]));
    const spelled: Record<string, string> = {};
    let config: ConfigOf<C>;
    try {
      for (const [key, alias, option, main] of aliased) {
        const value = valueOf(option);
        if (value === undefined) continue;
        if (flags[key] !== undefined || spelled[key] !== undefined)
          throw new WeftError('WEFT_BAD_CONFIG', `${spelled[key] ?? main.long} and ${alias} are the same option; give one`);
        flags[key] = value;
        spelled[key] = alias;
      }
      processEnvironment(); // a bad WEFT_* variable fails here, before anything starts
      config = commandConfig(name, flags as CommandLineValues, process.env, spelled);
    } catch (err) {
      throw asConfigError(err);
    }
    if ((config as { modelDir?: string }).modelDir === DEFAULT_MODEL_DIR && flags.modelDir === undefined)
      process.stderr.write(`weft: no --model given: using the built-in State of the Union model (${DEFAULT_MODEL_DIR})\n`);
    await run(config, flags);
  });
}

/**
 * A flag or WEFT_* variable that does not fit is the operator's configuration, not a client's request: it
 * exits with EXIT_CONFIG so that pm2 does not restart a process that would fail the same way.
 */
function asConfigError(err: unknown): unknown {
  return isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' ? new WeftError('WEFT_BAD_CONFIG', err.message, { cause: err }) : err;
}

/** startCluster's onProgress, drawn on stderr (a bar on a terminal, plain lines in a log); done() when the load ends. */
function loadProgress(config: ConfigOf<'generate' | 'score' | 'serve'>): { progress: LoadProgress; onProgress: NonNullable<ClusterOptions['onProgress']> } {
  const progress = new LoadProgress(process.stderr, config.tp);
  return { progress, onProgress: (rank, bytesRead, bytesTotal) => progress.update(rank, bytesRead, bytesTotal) };
}

async function withCluster<T>(config: ConfigOf<'generate' | 'score'>, run: (cluster: Cluster) => Promise<T>): Promise<T> {
  const { progress, onProgress } = loadProgress(config);
  const cluster = await startCluster({ ...(clusterOptionsOf(config) as unknown as ClusterOptions), onProgress }).finally(() => progress.done());
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

async function generate(config: ConfigOf<'generate'>): Promise<void> {
  await withCluster(config, async (cluster) => {
    const { maxNewTokens, temperature, topK, topP, ignoreEos, seed } = config;
    const sampling = { maxNewTokens, temperature, topK, topP, ignoreEos, ...(seed !== undefined && { seed }) };
    const request = config.promptIds ? { promptIds: config.promptIds, sampling } : { prompt: config.prompt!, sampling };
    for await (const event of cluster.generate(request)) {
      if (event.type === 'token' && !config.json) process.stdout.write(event.text);
      if (event.type === 'done') {
        const speculation = cluster.speculationStats();
        if (config.json) process.stdout.write(JSON.stringify({ ...event, type: undefined, ...(speculation && { speculation: speculationSummary(speculation) }) }) + '\n');
        else process.stdout.write('\n');
      }
    }
  });
}

async function score(config: ConfigOf<'score'>): Promise<void> {
  await withCluster(config, async (cluster) => {
    const { logprobs } = await cluster.score(config.ids);
    process.stdout.write(config.json ? JSON.stringify({ logprobs }) + '\n' : logprobs.map((l) => (l === null ? '-' : l.toFixed(6))).join('\n') + '\n');
  });
}

async function serveCommand(config: ConfigOf<'serve'>, flags: CommandLineValues): Promise<void> {
  const { serve, readCurveDir } = await import('./serve.ts');
  const emit = (event: Record<string, unknown>): void => void process.stdout.write(JSON.stringify(event) + '\n');
  const { host, rpcPort, httpPort, apiKey, curveDir, allowedHosts, corsOrigins, clientTimeoutMs, logIntervalSeconds, logFormat } = config;
  // as vLLM logs its non-default arguments: what the flags and WEFT_* variables set, before anything starts
  emit({ event: 'config', settings: givenSettings('serve', config, flags) });
  const { progress, onProgress } = loadProgress(config);
  const server = await serve({
    ...(clusterOptionsOf(config) as unknown as ClusterOptions),
    host,
    rpcPort,
    httpPort,
    clientTimeoutMs,
    logIntervalSeconds,
    logFormat,
    ...(apiKey !== undefined && { apiKey }),
    ...(curveDir !== undefined && { curve: readCurveDir(curveDir) }),
    ...(allowedHosts !== undefined && { allowedHosts }),
    ...(corsOrigins !== undefined && { corsOrigins }),
    onProgress,
    onStateChange: (state, detail) => {
      if (state !== 'loading' && state !== 'recovering') progress.done();
      emit({ event: 'state', state, detail });
    },
  }).finally(() => progress.done());
  emit({ event: 'listening', rpc: server.rpcEndpoint, http: server.httpUrl, model: server.cluster.info().name, tp: config.tp });
  // null: stopped by a signal; else the fault that ends the server (main prints it and picks the exit code)
  const fault = await new Promise<unknown>((resolve) => {
    process.once('SIGINT', () => resolve(null));
    process.once('SIGTERM', () => resolve(null));
    server.cluster.ready.catch((err: unknown) => resolve(err));
    const watch = setInterval(() => server.cluster.state === 'failed' && resolve(new WeftError('WEFT_WORKER_DIED', server.cluster.stats().detail)), 500);
    watch.unref();
  });
  emit({ event: 'stopping', exitCode: fault === null ? 0 : exitCodeFor(fault) });
  await server.close();
  if (fault !== null) throw fault;
}

/** What the worker entry module exports; loaded by path, the way a coordinator spawns it, never imported. */
interface WorkerEntry {
  runWorker(options: WorkerStart): Promise<number>;
}

function buildProgram(): Command {
  const program = new Command('weft').description('tensor-parallel LLM inference').version(PACKAGE_JSON.version, '-V, --version', 'print the version').exitOverride().showHelpAfterError(false);
  program.configureOutput({ writeErr: (text) => process.stderr.write(text.startsWith('error:') ? `weft: ${text}` : text) });
  command(program, 'generate', generate);
  command(program, 'score', score);
  command(program, 'serve', serveCommand);
  command(program, 'launch', async (config) => {
    const { launch } = await import('../deploy/launch.ts');
    const record = await launch(config);
    process.stdout.write(JSON.stringify({ event: 'ready', name: record.name, http: record.http, rpc: record.rpc, ecosystem: record.ecosystem }) + '\n');
  });
  command(program, 'status', async (config, flags) => {
    const { status, onlyRunningCluster } = await import('../deploy/launch.ts');
    // without --name: the one cluster running, whatever its name
    const name = flags.name === undefined ? await onlyRunningCluster(config.home) : config.name;
    const result = await status({ ...config, name });
    if (config.json) return void process.stdout.write(JSON.stringify({ name, ...result }) + '\n');
    process.stdout.write(`cluster ${name}\n`);
    for (const app of result.apps) process.stdout.write(`${app.name.padEnd(32)} ${app.status.padEnd(10)} pid ${String(app.pid).padEnd(8)} restarts ${app.restarts}  up ${app.uptimeS}s\n`);
    process.stdout.write(`health: ${JSON.stringify(result.health)}\n`);
  });
  command(program, 'logs', async (config) => {
    const { logs } = await import('../deploy/launch.ts');
    process.stdout.write(logs(config, config.lines));
  });
  command(program, 'stop', async (config) => {
    const { stop } = await import('../deploy/launch.ts');
    process.stdout.write(JSON.stringify(await stop(config)) + '\n');
  });
  command(program, 'keygen', async (config) => {
    const { writeCurveDir } = await import('./serve.ts');
    process.stdout.write(JSON.stringify(writeCurveDir(config.out)) + '\n');
  });
  command(program, 'quantize', async (config) => {
    const { quantizeCheckpoint } = await import('./quantize.ts');
    process.stdout.write(JSON.stringify(await quantizeCheckpoint(config)) + '\n');
  });
  command(program, 'doctor', async (config) => {
    const { runDoctor, formatDoctorReport } = await import('./doctor.ts');
    const { modelDir, tp, device, collectives, ncclLibrary } = config;
    const report = await runDoctor({ modelDir, tp, device, collectives, ncclLibrary });
    process.stdout.write(config.json ? JSON.stringify(report) + '\n' : formatDoctorReport(report));
    if (!report.ok) process.exitCode = 1;
  });
  command(program, 'worker', async (config) => {
    useNcclEnvironment();
    const { runWorker } = (await import(WORKER_ENTRY)) as WorkerEntry;
    process.exitCode = await runWorker(workerStartOf(config));
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
