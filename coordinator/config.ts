/**
 * weft's configuration: the only reader of flags and environment variables. Options are declared once
 * (config/options.ts); this module checks each value where it enters (a flag's text, an environment variable,
 * an option given in code), applies the defaults and returns a frozen object. It also writes values back: the
 * argv of a worker or coordinator process, and the environment a spawned worker gets.
 */
import { readFileSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { WeftError } from '../core/errors.ts';
import { OPTIONS, type CommandName, type Context, type OptionDeclaration } from './config/options.ts';
import { InvalidValue, type ValueType } from './config/values.ts';
import { parseWorkerCurveKeys, type WorkerCurveKeys } from '../core/transport.ts';
import { PACKAGE_ROOT, moduleUrl } from './package-layout.ts';

export { OPTIONS, type CommandName, type Context } from './config/options.ts';

type Declarations = typeof OPTIONS;
export type OptionKey = keyof Declarations;
type ValueOf<K extends OptionKey> = Declarations[K]['type'] extends ValueType<infer T> ? T : never;
type AlwaysSet<K extends OptionKey> = Declarations[K] extends { needs: string } ? false : Declarations[K] extends { default: unknown } | { required: true } ? true : false;
type UsedIn<C extends Context> = { [K in OptionKey]: C extends Declarations[K]['uses'][number] ? K : never }[OptionKey];
/** The resolved options of one command or API entry point: a value (or undefined where none is set) for each. */
export type ConfigOf<C extends Context> = { readonly [K in UsedIn<C>]: AlwaysSet<K> extends true ? ValueOf<K> : ValueOf<K> | undefined };

type Declaration = OptionDeclaration<unknown>;
const declarations = Object.entries(OPTIONS) as [OptionKey, Declaration][];
export const declarationsOf = (context: Context): [OptionKey, Declaration][] => declarations.filter(([, d]) => d.uses.includes(context));

/** bin/weft.js: what a coordinator spawns (`weft worker`) and what pm2 runs. */
export const WEFT_BIN = fileURLToPath(new URL('bin/weft.js', PACKAGE_ROOT));
/** The worker process's entry module, loaded by `weft worker`: the one edge from the coordinator into worker/. */
export const WORKER_ENTRY = moduleUrl('../worker/main');
/** The variable a spawned worker reads its secret from (never argv, where `ps` shows it). */
export const WORKER_SECRET_ENV = OPTIONS.workerSecret.env;
/** The variable a spawned worker reads its CURVE keys from (JSON: the coordinator's public key, the workers' pair). */
export const WORKER_CURVE_ENV = OPTIONS.workerCurve.env;
/** Set for every process that may use NCCL: NVLink multicast (NVLS) stays off in weft. */
export const NCCL_ENVIRONMENT: Readonly<Record<string, string>> = Object.freeze({ NCCL_NVLS_ENABLE: '0' });

/** A value as given: where it came from (a flag, a variable, a field) and whether it is text to parse. */
interface Given {
  readonly value: unknown;
  readonly from: string;
  readonly isText: boolean;
}

function checked(decl: Declaration, given: Given): unknown {
  try {
    return given.isText ? decl.type.fromText(given.value as string) : decl.type.check(given.value);
  } catch (err) {
    if (!(err instanceof InvalidValue)) throw err;
    const shown = given.isText ? `"${String(given.value)}"` : JSON.stringify(given.value) ?? String(given.value);
    throw new WeftError('WEFT_BAD_REQUEST', `${given.from} must be ${decl.type.expected}, got ${shown}${err.message ? ` (${err.message})` : ''}`);
  }
}

/** How messages name an option: its flag on the command line, its variable, or its field in code. */
function nameIn(key: OptionKey, decl: Declaration, context: Context): string {
  if (context === 'cluster' || context === 'server') return decl.field ?? key;
  return decl.flag ?? decl.env ?? key;
}

function defaultIn(decl: Declaration, context: Context): unknown {
  return decl.defaultIn && context in decl.defaultIn ? decl.defaultIn[context] : decl.default;
}

/** The default a context shows in help and the README (a derived one is described in words). */
export function describeDefault(decl: Declaration, context?: Context): string | undefined {
  if (decl.defaultHelp !== undefined && (context === undefined || typeof defaultIn(decl, context) === 'function')) return decl.defaultHelp;
  const value = context === undefined ? decl.default : defaultIn(decl, context);
  return value === undefined || typeof value === 'function' || value === false ? undefined : decl.type.toText(value);
}

/** Checks that involve more than one option, by where they apply. */
const CROSS_CHECKS: readonly { readonly uses: readonly Context[]; problem(c: Record<string, unknown>): string | null }[] = [
  { uses: ['generate'], problem: (c) => (c.prompt === undefined && c.promptIds === undefined ? 'give --prompt or --prompt-ids' : null) },
  { uses: ['generate'], problem: (c) => (c.prompt !== undefined && c.promptIds !== undefined ? '--prompt and --prompt-ids were both given: give one of them' : null) },
  { uses: ['serve'], problem: (c) => (c.workers === 'external' && !c.workerPort && c.workerSocketDir === undefined ? '--workers external needs a fixed --worker-port or --worker-socket-dir' : null) },
  { uses: ['worker'], problem: (c) => ((c.rank as number) >= (c.world as number) ? `--rank ${c.rank} must be below --world ${c.world}` : null) },
  {
    uses: ['generate', 'serve', 'cluster'],
    problem: (c) => {
      const gpus = c.draftGpus as readonly number[] | undefined;
      return gpus && gpus.length !== c.draftTp ? `the draft lists ${gpus.length} GPUs for a draft TP degree of ${c.draftTp}: give one GPU per draft rank` : null;
    },
  },
  {
    uses: ['launch'],
    problem: (c) => {
      const gpus = c.gpus as readonly number[] | undefined;
      return c.device === 'cuda' && gpus && gpus.length !== c.tp ? `--gpus lists ${gpus.length} GPUs for --tp ${c.tp}: give one GPU per rank` : null;
    },
  },
];

/** Check what was given, apply the defaults in table order (a derived default sees the options before it), freeze. */
function resolve(context: Context, read: (key: OptionKey, decl: Declaration) => Given | undefined): Record<string, unknown> {
  const config: Record<string, unknown> = {};
  const options = declarationsOf(context);
  for (const [key, decl] of options) {
    const given = read(key, decl);
    if (given !== undefined) config[key] = checked(decl, given);
  }
  for (const [key, decl] of options) {
    if (decl.needs !== undefined && config[decl.needs] === undefined) {
      if (config[key] !== undefined) throw new WeftError('WEFT_BAD_REQUEST', `${nameIn(key, decl, context)} is only used with ${nameIn(decl.needs as OptionKey, OPTIONS[decl.needs as OptionKey], context)}`);
      continue;
    }
    if (config[key] !== undefined) continue;
    const fallback = defaultIn(decl, context);
    if (fallback !== undefined) config[key] = typeof fallback === 'function' ? (fallback as (c: Record<string, unknown>) => unknown)(config) : fallback;
    else if (decl.required) {
      const named = nameIn(key, decl, context);
      throw new WeftError('WEFT_BAD_REQUEST', `${named === decl.flag && decl.arg ? `${named} ${decl.arg}` : named} is required`);
    }
  }
  for (const check of CROSS_CHECKS) {
    const problem = check.uses.includes(context) ? check.problem(config) : null;
    if (problem) throw new WeftError('WEFT_BAD_REQUEST', problem);
  }
  return Object.freeze(config);
}

/** The raw values commander parsed, by option key: strings, or `true` for a switch that was given. */
export type CommandLineValues = Readonly<Partial<Record<OptionKey, string | true>>>;

/** Options whose value a file flag (or that flag's variable) gives instead, read here: the file wins over the option's variable. */
const FROM_FILE: Partial<Record<OptionKey, { readonly key: OptionKey; readonly flag: string; readonly privateFile: boolean }>> = {
  workerSecret: { key: 'workerSecretFile', flag: OPTIONS.workerSecretFile.flag, privateFile: false },
  workerCurve: { key: 'workerCurveFile', flag: OPTIONS.workerCurveFile.flag, privateFile: true },
};

/**
 * A command's configuration from its flags and the environment: a flag wins over its variable, and a variable
 * over the default. `--worker-secret-file` (or WEFT_WORKER_SECRET_FILE) wins over WEFT_WORKER_SECRET and
 * `--worker-curve-file` over WEFT_WORKER_CURVE; both files are read here.
 */
export function commandConfig<C extends CommandName>(command: C, flags: CommandLineValues, env: NodeJS.ProcessEnv = process.env, spelled: Readonly<Partial<Record<OptionKey, string>>> = {}): ConfigOf<C> {
  return resolve(command, (key, decl) => {
    const fromFile = FROM_FILE[key];
    const file = fromFile && (flags[fromFile.key] ?? given(OPTIONS[fromFile.key], env));
    if (fromFile && typeof file === 'string') return { value: readOptionFile(file, fromFile.flag, fromFile.privateFile), from: `the file ${file}`, isText: true };
    const flagged = flags[key];
    const from = spelled[key as OptionKey] ?? decl.flag;  // the flag's alias where the command line used one
    if (from !== undefined && flagged !== undefined) return flagged === true ? { value: true, from, isText: false } : { value: flagged, from, isText: true };
    const variable = given(decl, env);
    return variable === undefined ? undefined : { value: variable, from: decl.env!, isText: true };
  }) as ConfigOf<C>;
}

/** The value of an option's environment mirror; an empty variable is unset. */
function given(decl: Declaration, env: NodeJS.ProcessEnv): string | undefined {
  const variable = decl.env === undefined ? undefined : env[decl.env];
  return variable === '' ? undefined : variable;
}

/** A file option's text; a private one (keys) must not be readable by other users. */
function readOptionFile(path: string, flagName: string, privateFile: boolean): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw new WeftError('WEFT_BAD_REQUEST', `cannot read ${flagName} ${path}: ${(err as Error).message}`);
  }
  const mode = statSync(path).mode & 0o777;
  if (privateFile && (mode & 0o077) !== 0) throw new WeftError('WEFT_BAD_CONFIG', `${flagName} ${path} has mode ${mode.toString(8)}: other users can read its keys; chmod 600 it`);
  return text;
}

/** Options given in code (startCluster, serve()), each checked against its declaration; the environment is not read. */
export function apiConfig<C extends 'cluster' | 'server'>(context: C, options: object): ConfigOf<C> {
  return resolve(context, (key, decl) => {
    const value = fieldOf(options, decl.field ?? key);
    return value === undefined ? undefined : { value, from: decl.field ?? key, isText: false };
  }) as ConfigOf<C>;
}

function fieldOf(options: object, path: string): unknown {
  return path.split('.').reduce<unknown>((at, part) => (at === null || typeof at !== 'object' ? undefined : (at as Record<string, unknown>)[part]), options);
}

/**
 * The startCluster options a command's configuration gives: every option `cluster` uses, the draft's nested
 * under `draft` as ClusterOptions has them.
 */
export function clusterOptionsOf(config: object): Record<string, unknown> {
  const options: Record<string, unknown> = {};
  for (const [key, decl] of declarationsOf('cluster')) {
    const value = (config as Record<string, unknown>)[key];
    if (value === undefined) continue;
    const [outer, inner] = (decl.field ?? key).split('.') as [string, string | undefined];
    if (inner === undefined) options[outer] = value;
    else options[outer] = { ...(options[outer] as object | undefined), [inner]: value };
  }
  return options;
}

/**
 * The argv that gives `command` these values (after the command name): options at their default are left out,
 * so the process resolves them itself.
 */
export function argvFor<C extends CommandName>(command: C, values: Partial<ConfigOf<C>>): string[] {
  const argv: string[] = [command];
  for (const [key, decl] of declarationsOf(command)) {
    const value = (values as Record<string, unknown>)[key];
    if (value === undefined || decl.flag === undefined || atDefault(decl, command, value)) continue;
    if (decl.arg !== undefined) argv.push(decl.flag, decl.type.toText(value));
    else if (value === true) argv.push(decl.flag); // a switch: given or not
  }
  return argv;
}

/** Whether `value` is the option's fixed default in this context (a derived default is never taken as given). */
function atDefault(decl: Declaration, context: Context, value: unknown): boolean {
  const fallback = defaultIn(decl, context);
  return typeof fallback !== 'function' && fallback !== undefined && decl.type.toText(fallback) === decl.type.toText(value);
}

/**
 * The options a command's flags and WEFT_* variables set (not those left to their defaults), by key, as their
 * resolved text, for the command's log; a credential shows as `(set)`.
 */
export function givenSettings<C extends CommandName>(command: C, config: ConfigOf<C>, flags: CommandLineValues, env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const settings: Record<string, string> = {};
  for (const [key, decl] of declarationsOf(command)) {
    const value = (config as Record<string, unknown>)[key];
    if (value === undefined || (flags[key as OptionKey] === undefined && given(decl, env) === undefined)) continue;
    settings[key] = decl.secret ? '(set)' : decl.type.toText(value);
  }
  return settings;
}

/** The environment mirrors of these options' flags (WEFT_TP for tp, ...): an option without a flag or a mirror has none. */
export function flagMirrors(keys: Iterable<string>): string[] {
  const mirrors = new Set<string>();
  for (const key of keys) {
    const decl = (OPTIONS as Record<string, Declaration>)[key];
    if (decl?.flag !== undefined && decl.env !== undefined) mirrors.add(decl.env);
  }
  return [...mirrors];
}

/** The options read only from the environment (no flag), for this process. */
export type ProcessEnvironment = Readonly<{ workerStderr: 'tail' | 'inherit'; ncclLibrary: string; home: string; workerSecret: string | undefined }>;

export function readEnvironment(env: NodeJS.ProcessEnv): ProcessEnvironment {
  const config: Record<string, unknown> = {};
  for (const [key, decl] of declarations) {
    if (decl.flag !== undefined || decl.env === undefined) continue;
    const variable = env[decl.env];
    const value = variable === undefined || variable === '' ? defaultIn(decl, 'cluster') : checked(decl, { value: variable, from: decl.env, isText: true });
    config[key] = typeof value === 'function' ? (value as () => unknown)() : value;
  }
  return Object.freeze(config) as ProcessEnvironment;
}

let processEnvironmentValue: ProcessEnvironment | null = null;
/** This process's environment options, read and checked once. */
export function processEnvironment(): ProcessEnvironment {
  return (processEnvironmentValue ??= readEnvironment(process.env));
}

/** Turn NVLS off in this process too (a worker started by hand, not through workerEnvironment). */
export function useNcclEnvironment(): void {
  Object.assign(process.env, NCCL_ENVIRONMENT);
}

/** The environment of a spawned worker: this process's, NVLS off, the group's secret and CURVE keys (never on argv). */
export function workerEnvironment(secret: string | null, curve?: WorkerCurveKeys): NodeJS.ProcessEnv {
  return {
    ...process.env,
    ...NCCL_ENVIRONMENT,
    ...(secret !== null && { [WORKER_SECRET_ENV]: secret }),
    // undefined: a variable this process has is not passed on (spawn leaves it out)
    [WORKER_CURVE_ENV]: curve !== undefined ? JSON.stringify(curve) : undefined,
  };
}

/** What `weft worker` hands the worker entry's runWorker (worker/main.ts WorkerOptions, checked in a test). */
export interface WorkerStart {
  readonly coordinator: string;
  readonly rank: number;
  readonly world: number;
  readonly parentPid?: number;
  readonly collectiveHost: string;
  readonly coordinatorTimeoutMs: number;
  readonly secret?: string;
  readonly curve?: WorkerCurveKeys;
  readonly ncclLibrary: string;
}

export function workerStartOf(config: ConfigOf<'worker'>): WorkerStart {
  const { coordinator, rank, world, collectiveHost, coordinatorTimeoutMs, ncclLibrary, parentPid, workerSecret, workerCurve } = config;
  return {
    coordinator, rank, world, collectiveHost, coordinatorTimeoutMs, ncclLibrary,
    ...(parentPid !== undefined && { parentPid }),
    ...(workerSecret !== undefined && { secret: workerSecret }),
    ...(workerCurve !== undefined && { curve: parseWorkerCurveKeys(workerCurve, `the worker's CURVE keys (--worker-curve-file or ${WORKER_CURVE_ENV})`) }),
  };
}
