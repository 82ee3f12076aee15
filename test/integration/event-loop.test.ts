/**
 * The coordinator's event loop under text attacks (issue 15, item 2), real processes on loopback: while four
 * streams decode on a TP=2 CPU cluster, three ~4 MB prompts arrive over HTTP, six 1 MiB prompts over RPC, a
 * 4 MB chat message, and two chat requests whose template cost grows with the message (a minute of rendering
 * each). The big texts are refused before any tokenizer work (400 naming the limit), the slow renders after
 * their time budget (504 naming it), every stream completes, no group re-forms (worker pids unchanged), and
 * `/health` answers with a p99 under 200 ms throughout.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WeftClient } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { startServe, type ServeProcess } from './serve-helpers.ts';

const reference = readReference('llama-tiny');
/** Each message's content, a user's after a loop over (its length)² that prints nothing: instant on short messages, about a minute on 3000 characters. */
const QUADRATIC = "{% for m in messages %}{% if m['role'] == 'user' %}{% for i in range(m['content']|length) %}{% for j in range(m['content']|length) %}{% endfor %}{% endfor %}{% endif %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}";
const BUDGET_MS = 1000;
/** llama-tiny: a context of 512 tokens × 32 characters a token at most (tokenizer.ts, maxTextChars) */
const CHAR_LIMIT = 512 * 32;
const HEALTH_P99_MS = 200;
const json = { 'content-type': 'application/json' };

/**
 * Asks /health every 10 ms from its own process (this one is busy sending the attack), whether or not the
 * previous answer came (so a stall shows in every request it delays, not in one), from its first answer
 * ("polling") until its stdin ends; then prints every latency, in ms, as one JSON line.
 */
const POLLER = `
  const latencies = [];
  const asks = new Set();
  const ask = () => {
    const started = performance.now();
    const asked = fetch(process.env.HEALTH_URL).then(async (res) => {
      await res.arrayBuffer();
      if (res.status !== 200) throw new Error('/health answered ' + res.status);
      if (latencies.push(performance.now() - started) === 1) console.log('polling');
    });
    asks.add(asked);
    void asked.finally(() => asks.delete(asked));
  };
  const timer = setInterval(ask, 10);
  process.stdin.on('end', async () => {
    clearInterval(timer);
    await Promise.all(asks);
    console.log(JSON.stringify(latencies));
  }).resume();
`;

/** Start the poller; resolves once it polls, with a function that stops it and returns the latencies. */
async function pollHealth(url: string): Promise<() => Promise<number[]>> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', POLLER], { env: { ...process.env, HEALTH_URL: url }, stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  assert.equal((await lines.next()).value, 'polling');
  return async () => {
    child.stdin!.end();
    return JSON.parse((await lines.next()).value as string) as number[];
  };
}

interface Answer {
  status: number;
  code: string;
  message: string;
  ms: number;
}

async function post(url: string, body: unknown): Promise<Answer> {
  const started = performance.now();
  const res = await fetch(url, { method: 'POST', headers: json, body: JSON.stringify(body) });
  const answer = (await res.json()) as { error?: { code: string; message: string } };
  return { status: res.status, code: answer.error?.code ?? '', message: answer.error?.message ?? '', ms: performance.now() - started };
}

describe('the event loop while 4 streams decode (TP=2) and text attacks arrive over HTTP and RPC', () => {
  let dir: string;
  let server: ServeProcess;
  let client: WeftClient;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'weft-loop-'));
    cpSync(fixtureDir('llama-tiny'), dir, { recursive: true });
    const config = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...config, chat_template: QUADRATIC }));
    server = await startServe(['--model', dir, '--tp', '2', '--kv-slots', '4', '--text-budget', String(BUDGET_MS)]);
    client = await WeftClient.connect({ endpoint: server.rpc, timeoutMs: 30_000 });
  });
  after(async () => {
    await client?.close();
    const { code, leftover } = await server.stop();
    assert.equal(code, 0, `exit code; stderr: ${server.stderr()}`);
    assert.deepEqual(leftover, [], 'no worker left behind after SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  });

  test(`no stream fails, no group re-forms, /health p99 under ${HEALTH_P99_MS} ms; big texts refused (400) by the limit, slow renders (504) at the budget`, async (t) => {
    const workerPids = async (): Promise<number[]> => {
      const res = await fetch(`${server.http}/health`);
      assert.equal(res.status, 200);
      return ((await res.json()) as { ranks: { pid: number }[] }).ranks.map((r) => r.pid);
    };
    const pidsBefore = await workerPids();
    assert.equal(pidsBefore.length, 2);

    // four streams that run through most of the context; the attack starts once each has its first token
    const firstTokens: Promise<void>[] = [];
    const streams = [0, 1, 2, 3].map(async (i) => {
      const promptIds = reference.prompts[i % reference.prompts.length]!;
      const maxNewTokens = 500 - promptIds.length;
      let tokens = 0;
      let finish = '';
      let first!: () => void;
      firstTokens.push(new Promise<void>((resolve) => (first = resolve)));
      try {
        for await (const e of client.generate({ promptIds, sampling: { maxNewTokens, ignoreEos: true } })) {
          if (e.type === 'token' && ++tokens === 1) first();
          if (e.type === 'done') finish = e.finishReason;
        }
      } finally {
        first();
      }
      return { tokens, expected: maxNewTokens, finish, endedAt: performance.now() };
    });
    await Promise.all(firstTokens);

    const stopPolling = await pollHealth(`${server.http}/health`);

    const big = 'The quick brown fox jumps over the lazy dog. '.repeat(4_000_000 / 45); // ~4 MB, under the 4 MiB body cap
    const mib = 'a'.repeat(1 << 20);
    const attackStarted = performance.now();
    const [httpPrompts, rpcPrompts, [bigChat], slowChats] = await Promise.all([
      Promise.all([0, 1, 2].map(() => post(`${server.http}/v1/completions`, { prompt: big, max_tokens: 4 }))),
      Promise.all(
        Array.from({ length: 6 }, async () => {
          try {
            for await (const _ of client.generate({ prompt: mib, sampling: { maxNewTokens: 4 } }));
            return null;
          } catch (err) {
            return err;
          }
        }),
      ),
      Promise.all([post(`${server.http}/v1/chat/completions`, { messages: [{ role: 'user', content: big }], max_tokens: 4 })]),
      Promise.all([0, 1].map(() => post(`${server.http}/v1/chat/completions`, { messages: [{ role: 'user', content: 'x'.repeat(3000) }], max_tokens: 4 }))),
    ]);
    const attackEndedAt = performance.now();
    const results = await Promise.all(streams);
    const healthMs = await stopPolling();

    for (const answer of httpPrompts) {
      assert.equal(answer.status, 400);
      assert.equal(answer.code, 'WEFT_BAD_REQUEST');
      assert.match(answer.message, new RegExp(`^the prompt is ${big.length} characters long; the limit is ${CHAR_LIMIT} characters`));
    }
    for (const err of rpcPrompts)
      assert.ok(isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && err.message.startsWith(`the prompt is ${mib.length} characters long; the limit is ${CHAR_LIMIT} characters`), String(err));
    assert.equal(bigChat!.status, 400);
    assert.match(bigChat!.message, new RegExp(`^the chat \\(1 messages\\) is ${big.length + 'user'.length} characters long; the limit is ${CHAR_LIMIT} characters`));
    for (const answer of slowChats) {
      assert.equal(answer.status, 504);
      assert.equal(answer.code, 'WEFT_TIMEOUT');
      assert.match(answer.message, new RegExp(`rendering the chat template for 1 messages took longer than the text threads' budget of ${BUDGET_MS} ms`));
      // refused at its budget (the render alone would take about a minute); the two share the two text threads
      assert.ok(answer.ms < BUDGET_MS + 4000, `slow chat answered after ${answer.ms.toFixed(0)} ms`);
    }

    for (const r of results) assert.deepEqual([r.tokens, r.finish], [r.expected, 'length']);
    assert.ok(attackStarted < Math.min(...results.map((r) => r.endedAt)), 'the attack began while every stream decoded');
    assert.deepEqual(await workerPids(), pidsBefore, 'the same worker processes: no group re-formed');
    assert.equal((await client.stats()).reforms, 0);

    const sorted = [...healthMs].sort((a, b) => a - b);
    const p99 = sorted[Math.min(sorted.length - 1, Math.ceil(sorted.length * 0.99) - 1)]!;
    t.diagnostic(
      `attack ${(attackEndedAt - attackStarted).toFixed(0)} ms; /health answered ${sorted.length} times: p50 ${sorted[Math.floor(sorted.length / 2)]!.toFixed(1)} ms, p99 ${p99.toFixed(1)} ms, max ${sorted.at(-1)!.toFixed(1)} ms`,
    );
    assert.ok(sorted.length >= 10, `only ${sorted.length} /health answers during the attack`);
    assert.ok(p99 < HEALTH_P99_MS, `/health p99 ${p99.toFixed(1)} ms (goal: under ${HEALTH_P99_MS} ms)`);
  });
});
