/** Run the real `weft` command as a child process and collect what it prints. */
import { spawn } from 'node:child_process';
import { WEFT_BIN, processesMentioning } from './fixtures.ts';

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
