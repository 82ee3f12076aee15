/** Run the real `weft` command as a child process and collect what it prints. */
import { spawn } from 'node:child_process';
import { WEFT_BIN, processesMentioning } from './fixtures.ts';
import { OPTIONS, type CommandLineValues } from '../../coordinator/config.ts';

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** worker processes of this run still alive after it exited */
  leftover: number[];
}

export function runWeft(args: string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [WEFT_BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...options.env } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`weft ${args.join(' ')} did not finish within ${options.timeoutMs ?? 60000} ms; stderr: ${stderr}`));
    }, options.timeoutMs ?? 60_000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      // workers carry their coordinator's pid on their command line
      resolve({ code, signal, stdout, stderr, leftover: processesMentioning(`--parent-pid\0${child.pid}\0`) });
    });
  });
}

/** The option values an argv (after the command name) gives, by declared key, as commander would hand them over. */
export function flagsOf(args: readonly string[]): CommandLineValues {
  const flags: Record<string, string | true> = {};
  for (let i = 0; i < args.length; i++) {
    const key = Object.entries(OPTIONS).find(([, decl]) => 'flag' in decl && decl.flag === args[i])?.[0];
    if (key === undefined) throw new Error(`${args[i]} is not a declared flag`);
    flags[key] = 'arg' in OPTIONS[key as keyof typeof OPTIONS] ? args[++i]! : true;
  }
  return flags;
}
