/**
 * `/metrics` of a real `weft serve` (llama-tiny on the CPU) after real requests: vLLM's names with the weft_
 * prefix count what happened (a length finish, a stop-string finish counted as stop, a client abort as abort,
 * prompt and generated tokens, the gap before every token after a sequence's first), KV usage from blocks while a
 * request runs, every HTTP 4xx as rejected with its reason, Node's process metrics, and the periodic JSON log line.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { fixtureDir } from '../helpers/fixtures.ts';
import { sample } from '../helpers/prometheus.ts';
import { startServe, stopCleanly, type ServeProcess } from './serve-helpers.ts';

const JSON_TYPE = { 'content-type': 'application/json' };
type Completion = { choices: { text: string; finish_reason: string }[]; usage: { prompt_tokens: number; completion_tokens: number } };

describe('weft serve metrics (TP=1, CPU)', () => {
  let server: ServeProcess;
  const scrape = async (): Promise<string> => (await fetch(`${server.http}/metrics`)).text();
  const complete = async (body: Record<string, unknown>): Promise<Completion> => {
    const res = await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: JSON_TYPE, body: JSON.stringify({ prompt: 'hello world', temperature: 0, ...body }) });
    assert.equal(res.status, 200);
    return (await res.json()) as Completion;
  };
  before(async () => {
    server = await startServe(['--model', fixtureDir('llama-tiny'), '--kv-slots', '2', '--log-interval', '1', '--log-format', 'json']);
  });
  after(async () => {
    await stopCleanly(server);
  });

  test('finished requests, tokens and latencies are counted as vLLM names them; a stop string is a stop', async () => {
    const full = await complete({ max_tokens: 24, ignore_eos: true });
    assert.equal(full.choices[0]!.finish_reason, 'length');
    const text = full.choices[0]!.text;
    // a stop string that first appears in the first half of the greedy text, so the model is still generating there
    const at = Math.floor(text.length / 3);
    const stop = text.slice(at, at + 3);
    assert.ok(stop.trim().length > 0 && text.indexOf(stop) <= at, `a usable stop string in ${JSON.stringify(text)}`);
    const stopped = await complete({ max_tokens: 24, ignore_eos: true, stop });
    assert.equal(stopped.choices[0]!.finish_reason, 'stop');
    assert.ok(stopped.usage.completion_tokens < 24);

    const metrics = await scrape();
    assert.equal(sample(metrics, 'weft_request_success_total', { finished_reason: 'length' }), 1);
    assert.equal(sample(metrics, 'weft_request_success_total', { finished_reason: 'stop' }), 1, 'the stop-string request is a stop, not a cancellation');
    assert.equal(sample(metrics, 'weft_request_success_total', { finished_reason: 'abort' }), 0);
    assert.equal(sample(metrics, 'weft_prompt_tokens_total'), full.usage.prompt_tokens + stopped.usage.prompt_tokens);
    const generated = sample(metrics, 'weft_generation_tokens_total')!;
    // the stopped sequence may have drawn a token past the stop string before the HTTP layer ended it
    assert.ok(generated >= 24 + stopped.usage.completion_tokens && generated <= 48, `generated ${generated}`);
    assert.equal(sample(metrics, 'weft_time_per_output_token_seconds_count'), generated - 2, 'one gap per token after each first token');
    assert.equal(sample(metrics, 'weft_time_to_first_token_seconds_count'), 2);
    assert.equal(sample(metrics, 'weft_e2e_request_latency_seconds_count'), 2);
    assert.equal(sample(metrics, 'weft_kv_cache_usage_perc'), 0, 'no blocks held when idle');
    assert.equal(sample(metrics, 'weft_num_requests_running'), 0);
    for (const name of ['process_cpu_seconds_total', 'process_resident_memory_bytes', 'nodejs_heap_size_used_bytes', 'nodejs_eventloop_lag_p99_seconds'])
      assert.ok(sample(metrics, name) !== undefined, `${name} is exported`);
  });

  test('a running request holds KV blocks; a client that leaves is counted as abort', async () => {
    const abort = new AbortController();
    const res = await fetch(`${server.http}/v1/completions`, {
      method: 'POST',
      headers: JSON_TYPE,
      body: JSON.stringify({ prompt: 'hello world', max_tokens: 480, ignore_eos: true, stream: true }),
      signal: abort.signal,
    });
    const reader = res.body!.getReader();
    await reader.read(); // the first chunk: the request is decoding
    const during = await scrape();
    abort.abort();
    await reader.cancel().catch(() => undefined);
    assert.equal(sample(during, 'weft_num_requests_running'), 1);
    const usage = sample(during, 'weft_kv_cache_usage_perc')!;
    assert.ok(usage > 0 && usage < 1, `KV usage ${usage}`);
    let after = '';
    for (let i = 0; i < 50 && sample(after, 'weft_request_success_total', { finished_reason: 'abort' }) !== 1; i++) {
      await new Promise((r) => setTimeout(r, 100));
      after = await scrape();
    }
    assert.equal(sample(after, 'weft_request_success_total', { finished_reason: 'abort' }), 1);
    assert.equal(sample(after, 'weft_kv_cache_usage_perc'), 0, 'its blocks came back');
  });

  test('every 4xx the API sends is counted as rejected with its reason', async () => {
    const post = (body: string, headers: Record<string, string> = JSON_TYPE): Promise<Response> => fetch(`${server.http}/v1/completions`, { method: 'POST', headers, body });
    const statuses = [
      (await post('{not json')).status,
      (await post(JSON.stringify({ prompt: 'x', max_tokens: -1 }))).status,
      (await post('{}', { 'content-type': 'text/plain' })).status,
      // declared, never sent: a body sent after the refusal could reach the parser as a next request (a 400)
      await rawStatus(server.http, `POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: ${5 << 20}\r\n\r\n`),
      (await fetch(`${server.http}/nowhere`)).status,
      await rawStatus(server.http, `GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nx-big: ${'a'.repeat(20_000)}\r\n\r\n`),
    ];
    assert.deepEqual(statuses, [400, 400, 415, 413, 404, 431]);
    const metrics = await scrape();
    console.log(metrics.split("\n").filter((l) => l.startsWith("weft_requests_rejected")).join("\n"));
    const rejected = (reason: string): number | undefined => sample(metrics, 'weft_requests_rejected_total', { reason });
    assert.equal(rejected('bad_request'), 2);
    assert.equal(rejected('unsupported_media_type'), 1);
    assert.equal(rejected('body_too_large'), 1);
    assert.equal(rejected('not_found'), 1);
    assert.equal(rejected('headers_too_large'), 1);
    assert.equal(rejected('busy'), 0);
  });

  test('the server logs a JSON line with running, waiting, tok/s and KV usage after activity', async () => {
    type Line = { event: string; running: number; waiting: number; generationTokensPerSecond: number; promptTokensPerSecond: number; kvCacheUsagePercent: number };
    const activeLines = (): Line[] =>
      server
        .stderr()
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Line)
        .filter((l) => l.event === 'stats' && l.generationTokensPerSecond > 0);
    for (let i = 0; i < 30 && activeLines().length === 0; i++) await new Promise((r) => setTimeout(r, 100)); // the interval is 1 s
    const active = activeLines();
    assert.ok(active.length > 0, `a stats line after the requests; stderr: ${server.stderr()}`);
    for (const key of ['running', 'waiting', 'promptTokensPerSecond', 'kvCacheUsagePercent'] as const) assert.equal(typeof active[0]![key], 'number');
  });
});

/** Send a raw request (one fetch would not send as it is) and read the status of the answer; then hang up. */
async function rawStatus(url: string, request: string): Promise<number> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), hostname, () => socket.write(request));
    let answer = '';
    const status = (): number => Number(/^HTTP\/1\.1 (\d+)/.exec(answer)?.[1] ?? 0);
    socket.setEncoding('utf8').on('data', (d: string) => {
      answer += d;
      if (status() !== 0) socket.destroy();
    });
    socket.on('error', reject);
    socket.on('close', () => resolve(status()));
  });
}
