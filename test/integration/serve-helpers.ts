/** Start `weft serve` as a real child process on free ports, wait for /health 200, and stop it cleanly. */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { WEFT_BIN, processesMentioning, waitFor } from '../helpers/fixtures.ts';

export interface ServeProcess {
  readonly child: ChildProcess;
  readonly rpc: string;
  readonly http: string;
  readonly stderr: () => string;
  /** the JSON lines it printed on stdout so far (config, listening, state, ...) */
  readonly events: () => Record<string, unknown>[];
  /** SIGTERM, wait for exit; returns the exit code and the worker processes still alive (should be none) */
  stop(): Promise<{ code: number | null; leftover: number[] }>;
}

export async function startServe(args: string[], env: NodeJS.ProcessEnv = {}): Promise<ServeProcess> {
  const child = spawn(process.execPath, [WEFT_BIN, 'serve', '--rpc-port', '0', '--http-port', '0', '--threads', '1', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let stderr = '';
  const events: Record<string, unknown>[] = [];
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const listening = await new Promise<{ rpc: string; http: string }>((resolve, reject) => {
    // one that does not come up is killed: left running, it would keep the test process alive
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`weft serve did not listen within 60 s: ${stderr}`));
    }, 60_000);
    void exited.then((code) => reject(new Error(`weft serve exited with ${code}: ${stderr}`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const event = JSON.parse(line) as { event: string; rpc: string; http: string };
      events.push(event);
      if (event.event === 'listening') {
        clearTimeout(timer);
        resolve(event);
      }
    });
  });
  const deadline = Date.now() + 60_000;
  for (;;) {
    const res = await fetch(`${listening.http}/health`).catch(() => null);
    if (res?.status === 200) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`not ready within 60 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    child,
    ...listening,
    stderr: () => stderr,
    events: () => events,
    async stop() {
      const marker = `--parent-pid\0${child.pid}\0`;
      child.kill('SIGTERM');
      // one that does not exit is killed with its workers, and the test fails naming it, rather than hanging
      let timer: NodeJS.Timeout | undefined;
      const code = await Promise.race([exited, new Promise<'hung'>((resolve) => (timer = setTimeout(() => resolve('hung'), 60_000)))]);
      clearTimeout(timer);
      if (code === 'hung') {
        for (const pid of [child.pid!, ...processesMentioning(marker)]) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone meanwhile
          }
        }
        throw new Error(`weft serve did not exit within 60 s of SIGTERM: ${stderr}`);
      }
      await waitFor(() => processesMentioning(marker).length === 0, 20_000);
      return { code, leftover: processesMentioning(marker) };
    },
  };
}

/** Parse a text/event-stream body into its `data:` payloads. */
export async function readSse(res: Response): Promise<string[]> {
  const text = await res.text();
  return text
    .split('\n\n')
    .filter((block) => block.trim())
    .map((block) => {
      const line = block.split('\n').find((l) => l.startsWith('data: '));
      if (!line) throw new Error(`SSE block without data: ${JSON.stringify(block)}`);
      return line.slice('data: '.length);
    });
}

/** SIGTERM the server: it exits 0 and leaves no worker behind. */
export async function stopCleanly(server: ServeProcess): Promise<void> {
  const { code, leftover } = await server.stop();
  assert.equal(code, 0, `exit code; stderr: ${server.stderr()}`);
  assert.deepEqual(leftover, [], 'no worker left behind after SIGTERM');
}
