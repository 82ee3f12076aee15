/**
 * The product path as users run it, for bench/product.ts: the real `weft` command as a child process
 * (`weft generate --json`, `weft serve` on free ports), and concurrent streaming completions against the server
 * from node's fetch, timed per streamed chunk.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const WEFT_BIN = fileURLToPath(new URL('../bin/weft.js', import.meta.url));

/** The first line a command prints, or null when it fails. */
function firstLine(file: string, args: readonly string[]): string | null {
  const result = spawnSync(file, args, { encoding: 'utf8' });
  return result.status === 0 ? result.stdout.trim().split('\n')[0]! : null;
}

/** What a result row names its run by: the GPU (or cpu) and the commit (WEFT_COMMIT where the tree has no .git). */
export function runIdentity(device: 'cpu' | 'cuda'): { gpu: string; commit: string } {
  return {
    gpu: device === 'cuda' ? (firstLine('nvidia-smi', ['--query-gpu=name', '--format=csv,noheader']) ?? 'unknown GPU') : 'cpu',
    commit: process.env.WEFT_COMMIT ?? firstLine('git', ['rev-parse', 'HEAD']) ?? 'unknown',
  };
}

/** Keeps the last `limit` characters of a stream (for error messages). */
function tail(stream: NodeJS.ReadableStream, limit = 4000): () => string {
  let text = '';
  stream.setEncoding('utf8');
  stream.on('data', (d: string) => (text = (text + d).slice(-limit)));
  return () => text;
}

export interface GenerateFigures {
  /** seconds from the request to the first sampled token, as weft generate reports it */
  readonly timeToFirstTokenS: number;
  /** decode tokens per second after the first token, as weft generate reports it */
  readonly decodeTokensPerS: number;
  readonly tokens: number;
  /** the whole process: start, weight load, generation, shutdown */
  readonly processS: number;
}

/** One `weft generate --json` run, as a user would type it. */
export async function runGenerate(args: readonly string[], timeoutMs: number): Promise<GenerateFigures> {
  const started = performance.now();
  const child = spawn(process.execPath, [WEFT_BIN, 'generate', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const stdout = tail(child.stdout!, 1 << 20);
  const stderr = tail(child.stderr!);
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  clearTimeout(timer);
  if (code !== 0) throw new Error(`weft generate ${args.join(' ')} exited ${code ?? signal}${signal === 'SIGKILL' ? ` (killed after ${timeoutMs} ms)` : ''}: ${stderr().trim()}`);
  const result = JSON.parse(stdout().trim().split('\n').at(-1)!) as { tokens: number[]; timeToFirstTokenS: number; decodeTokensPerS: number };
  return { timeToFirstTokenS: result.timeToFirstTokenS, decodeTokensPerS: result.decodeTokensPerS, tokens: result.tokens.length, processS: (performance.now() - started) / 1000 };
}

export interface ServeProcess {
  readonly url: string;
  /** seconds from the start to /health 200 (weights loaded) */
  readonly readyS: number;
  /** SIGTERM, wait for the exit, then make sure no process of its group is left (leftover: some were, now killed) */
  stop(): Promise<{ exitCode: number | null; leftover: boolean }>;
}

/** `weft serve` on free ports, in a process group of its own (its workers join it), ready to answer. */
export async function startServe(args: readonly string[], timeoutMs: number): Promise<ServeProcess> {
  const started = performance.now();
  const child: ChildProcess = spawn(process.execPath, [WEFT_BIN, 'serve', ...args, '--http-port', '0', '--rpc-port', '0'], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  const stderr = tail(child.stderr!);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let running = true;
  void exited.then(() => (running = false));
  const groupAlive = (): boolean => {
    try {
      process.kill(-child.pid!, 0);
      return true;
    } catch {
      return false;
    }
  };
  const stop = async (): Promise<{ exitCode: number | null; leftover: boolean }> => {
    if (running) child.kill('SIGTERM');
    const exitCode = await Promise.race([exited, new Promise<null>((resolve) => setTimeout(() => resolve(null), 30_000).unref())]);
    // workers leave when their coordinator is gone; give them a moment, then end what is left of this group
    for (let i = 0; i < 50 && groupAlive(); i++) await new Promise((resolve) => setTimeout(resolve, 100));
    const leftover = groupAlive();
    if (leftover) process.kill(-child.pid!, 'SIGKILL');
    return { exitCode, leftover };
  };
  try {
    const url = await new Promise<string>((resolve, reject) => {
      let buffered = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        buffered += d;
        for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          const event = JSON.parse(line) as { event: string; http?: string };
          if (event.event === 'listening') resolve(event.http!);
        }
      });
      void exited.then((code) => reject(new Error(`weft serve exited ${code} before listening: ${stderr().trim()}`)));
    });
    for (;;) {
      if (!running) throw new Error(`weft serve exited while loading: ${stderr().trim()}`);
      if (performance.now() - started > timeoutMs) throw new Error(`weft serve was not ready within ${timeoutMs} ms: ${stderr().trim()}`);
      const health = await fetch(`${url}/health`).catch(() => null);
      if (health?.status === 200) break;
      await health?.body?.cancel();
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    return { url, readyS: (performance.now() - started) / 1000, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

export interface StreamTiming {
  /** when the request was sent, and when each chunk with text arrived (performance.now(), ms) */
  readonly sentAt: number;
  readonly chunkAt: readonly number[];
  /** when the stream ended */
  readonly endedAt: number;
  /** completion tokens, from the final usage chunk */
  readonly tokens: number;
}

/**
 * One streaming /v1/completions request of token ids, greedy, EOS ignored; aborted when not done within `timeoutMs`.
 * `onText(at)` is called as each chunk with text arrives.
 */
export async function streamCompletion(url: string, promptIds: readonly number[], maxTokens: number, timeoutMs: number, onText?: (at: number) => void): Promise<StreamTiming> {
  const sentAt = performance.now();
  const response = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    signal: AbortSignal.timeout(timeoutMs),
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: promptIds, max_tokens: maxTokens, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
  });
  if (response.status !== 200) throw new Error(`POST /v1/completions answered ${response.status}: ${await response.text()}`);
  const chunkAt: number[] = [];
  let tokens = -1;
  let buffered = '';
  const decoder = new TextDecoder();
  for await (const bytes of response.body!) {
    const now = performance.now();
    buffered += decoder.decode(bytes as Uint8Array, { stream: true });
    for (let end = buffered.indexOf('\n\n'); end >= 0; end = buffered.indexOf('\n\n')) {
      const data = buffered.slice(0, end).replace(/^data: /, '');
      buffered = buffered.slice(end + 2);
      if (data === '[DONE]') continue;
      const chunk = JSON.parse(data) as { choices: { text: string }[]; usage?: { completion_tokens: number }; error?: { message: string } };
      if (chunk.error) throw new Error(`stream failed: ${chunk.error.message}`);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      if (chunk.choices[0]?.text) {
        chunkAt.push(now);
        onText?.(now);
      }
    }
  }
  if (tokens < 0) throw new Error('the stream ended without a usage chunk');
  return { sentAt, chunkAt, endedAt: performance.now(), tokens };
}

export interface ConcurrentFigures {
  /** generated tokens / wall time from the first request sent to the last stream ended */
  readonly tokensPerS: number;
  /** median and 99th-percentile time to the first streamed text */
  readonly p50TtftMs: number;
  readonly p99TtftMs: number;
  /** chunks per second while every stream was decoding (after the last first token, before the first stream ended) */
  readonly steadyTokensPerS: number;
  readonly tokens: number;
  readonly wallS: number;
}

/** The `q` quantile of ascending `sorted` (nearest rank below). */
export function percentile(sorted: readonly number[], q: number): number {
  return sorted[Math.floor((sorted.length - 1) * q)]!;
}

/**
 * `concurrency` streams at once, each within `timeoutMs`; figures of the whole phase and of its steady part.
 * `promptOf(i)`: stream i's prompt (distinct prompts: no stream finds another's in the prefix cache, and their
 * tokens differ).
 */
export async function concurrentStreams(url: string, promptOf: (stream: number) => readonly number[], maxTokens: number, concurrency: number, timeoutMs: number): Promise<ConcurrentFigures> {
  const started = performance.now();
  const streams = await Promise.all(Array.from({ length: concurrency }, (_, i) => streamCompletion(url, promptOf(i), maxTokens, timeoutMs)));
  const ended = Math.max(...streams.map((s) => s.endedAt));
  const tokens = streams.reduce((sum, s) => sum + s.tokens, 0);
  const ttfts = streams.map((s) => (s.chunkAt[0] ?? NaN) - s.sentAt).sort((a, b) => a - b);
  const steadyFrom = Math.max(...streams.map((s) => s.chunkAt[0] ?? Infinity));
  const steadyTo = Math.min(...streams.map((s) => s.chunkAt.at(-1) ?? -Infinity));
  const steadyChunks = streams.reduce((sum, s) => sum + s.chunkAt.filter((t) => t > steadyFrom && t <= steadyTo).length, 0);
  return {
    tokensPerS: tokens / ((ended - started) / 1000),
    p50TtftMs: percentile(ttfts, 0.5),
    p99TtftMs: percentile(ttfts, 0.99),
    steadyTokensPerS: steadyTo > steadyFrom ? steadyChunks / ((steadyTo - steadyFrom) / 1000) : NaN,
    tokens,
    wallS: (ended - started) / 1000,
  };
}
