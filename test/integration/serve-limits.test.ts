/**
 * `weft serve` at its limits, real processes on loopback: one KV slot and a queue of one (a full queue is
 * refused at once, over RPC and HTTP; cancelling frees the slot for the queued request), a bearer token on every
 * route but /health and /live, a model with a chat template (a copy of the fixture with one added), and the
 * refusal to bind beyond loopback without credentials.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WeftClient } from '../../coordinator/api/client.ts';
import { HttpGateway, PUBLIC_ROUTES } from '../../coordinator/api/http.ts';
import { ChatTemplate } from '../../coordinator/chat-template.ts';
import { loadTokenizer } from '../../coordinator/tokenizer.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { runWeft } from '../helpers/cli.ts';
import { startServe, readSse, type ServeProcess } from './serve-helpers.ts';

const reference = readReference('llama-tiny');
const TEMPLATE = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";
const TOKEN = 'test-token-123';

describe('weft serve with 1 KV slot, a queue of 1, a bearer token and a chat template', () => {
  let dir: string;
  let server: ServeProcess;
  let client: WeftClient;
  const auth = { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' };
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'weft-chat-'));
    cpSync(fixtureDir('llama-tiny'), dir, { recursive: true });
    const config = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...config, chat_template: TEMPLATE }));
    server = await startServe(['--model', dir, '--tp', '1', '--kv-slots', '1', '--max-queue', '1', '--heartbeat-timeout', '30000'], { WEFT_API_KEY: TOKEN });
    client = await WeftClient.connect({ endpoint: server.rpc });
  });
  after(async () => {
    await client?.close();
    const { code, leftover } = await server.stop();
    assert.equal(code, 0);
    assert.deepEqual(leftover, []);
    rmSync(dir, { recursive: true, force: true });
  });

  test('its first log line is the settings its flags and WEFT_* variables gave, the token shown only as set', () => {
    const config = server.events()[0]!;
    assert.equal(config.event, 'config');
    const given = { modelDir: dir, tp: '1', kvSlots: '1', maxQueue: '1', heartbeatTimeoutMs: '30000', threads: '1', rpcPort: '0', httpPort: '0', apiKey: '(set)' };
    const settings = config.settings as Record<string, string>;
    assert.deepEqual(Object.fromEntries(Object.keys(given).map((k) => [k, settings[k]])), given);
    assert.equal(settings.maxContext, undefined, 'an option left to its default is not listed');
    assert.ok(!JSON.stringify(server.events()).includes(TOKEN), 'the token never printed');
  });

  test("/health's ready detail names what is served and what the KV pool holds (as vLLM prints its blocks and concurrency)", async () => {
    const { status, detail } = (await (await fetch(`${server.http}/health`)).json()) as { status: string; detail: string };
    assert.equal(status, 'ready');
    const m = /^serving weft-chat-\w+ on 1 rank; KV cache (\d+) positions \((\d+) blocks of 16, f32\): (\d+) sequences at the full context of (\d+)$/.exec(detail);
    assert.ok(m, detail);
    const [positions, blocks, sequences, context] = m.slice(1).map(Number) as [number, number, number, number];
    assert.equal(positions, blocks * 16);
    assert.equal(sequences, 4, 'the default pool: four full contexts (--kv-cache-tokens), whatever --kv-slots is');
    assert.equal(positions, sequences * context);
  });

  test('every route but the public ones needs the token', async () => {
    for (const route of HttpGateway.routes()) {
      const [method, path] = route.split(' ') as [string, string];
      const res = await fetch(`${server.http}${path}`, { method, ...(method === 'POST' && { body: '{}' }) });
      await res.arrayBuffer();
      if (PUBLIC_ROUTES.includes(route)) assert.equal(res.status, 200, route);
      else assert.equal(res.status, 401, route);
      const wrong = await fetch(`${server.http}${path}`, { method, headers: { authorization: `Bearer ${TOKEN}x` }, ...(method === 'POST' && { body: '{}' }) });
      await wrong.arrayBuffer();
      if (!PUBLIC_ROUTES.includes(route)) assert.equal(wrong.status, 401, `${route} with a wrong token`);
    }
    assert.equal((await fetch(`${server.http}/v1/models`, { headers: auth })).status, 200);
  });

  test('a full queue is refused at once (RPC: WEFT_BUSY, HTTP: 503 + retry-after); cancel frees the slot for the queued one', async () => {
    // the tiny model decodes its whole context in well under a second: to hold the slot for sure, the worker is
    // stopped (SIGSTOP) while the first request runs, and continued at the end (the heartbeat timeout is 30 s)
    const worker = ((await (await fetch(`${server.http}/health`)).json()) as { ranks: { pid: number }[] }).ranks[0]!.pid;
    const first = new AbortController();
    const running = client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 400, ignoreEos: true } }, { signal: first.signal });
    assert.equal((await running.next()).done, false);
    process.kill(worker, 'SIGSTOP');
    try {
      const queued = client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 3, ignoreEos: true } });
      const queuedFirst = queued.next(); // sends the request; it waits for the slot
      const deadline = Date.now() + 30_000; // a wait for a state, not a measure: wide for a loaded machine
      while ((await client.stats()).waiting !== 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      assert.deepEqual(await client.stats().then((s) => [s.running, s.waiting, s.kvSlots]), [1, 1, 1]);
      const third = client.generate({ promptIds: [1, 2], sampling: { maxNewTokens: 1 } }).next();
      await assert.rejects(
        third,
        (err: unknown) => isWeftError(err) && err.code === 'WEFT_BUSY' && /queue holds 1/.test(err.message),
      );
      const res = await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: auth, body: JSON.stringify({ prompt: 'x', max_tokens: 1 }) });
      assert.equal(res.status, 503);
      assert.equal(res.headers.get('retry-after'), '1');
      assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'WEFT_BUSY');
      first.abort();
      await assert.rejects(running.next(), (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED');
      const stats = await client.stats();
      assert.deepEqual([stats.running, stats.waiting], [1, 0], 'the queued request took the freed slot');
      process.kill(worker, 'SIGCONT');
      const events = [(await queuedFirst).value];
      for await (const e of queued) events.push(e);
      assert.deepEqual(events.flatMap((e) => (e?.type === 'token' ? [e.token] : [])), reference.greedy[0]!.slice(0, 3));
    } finally {
      process.kill(worker, 'SIGCONT');
    }
  });

  test('/v1/chat/completions renders the model template and streams chat chunks', async () => {
    const messages = [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: [{ type: 'text', text: 'hello' }] },
    ];
    const res = await fetch(`${server.http}/v1/chat/completions`, {
      method: 'POST',
      headers: auth,
      body: JSON.stringify({ messages, max_tokens: 4, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
    });
    assert.equal(res.status, 200);
    const events = await readSse(res);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { object: string; choices: { delta: { role?: string; content?: string }; finish_reason: string | null }[]; usage?: { prompt_tokens: number } });
    assert.equal(chunks[0]!.object, 'chat.completion.chunk');
    assert.equal(chunks[0]!.choices[0]!.delta.role, 'assistant');
    assert.equal(chunks.at(-2)!.choices[0]!.finish_reason, 'length');
    const rendered = ChatTemplate.load(dir)!.render([{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hello' }]);
    assert.equal(rendered, '<|system|>be brief</s><|user|>hello</s><|assistant|>');
    assert.equal(chunks.at(-1)!.usage!.prompt_tokens, loadTokenizer(dir).encode(rendered, { addBos: false }).length);
    const refused = await fetch(`${server.http}/v1/chat/completions`, { method: 'POST', headers: auth, body: JSON.stringify({ messages, chat_template: '{{ 7 }}' }) });
    assert.equal(refused.status, 400);
    assert.match(((await refused.json()) as { error: { message: string } }).error.message, /never from requests/);
  });
});

test('serving beyond loopback without CURVE keys and a token is refused before any worker starts', async () => {
  const result = await runWeft(['serve', '--model', fixtureDir('llama-tiny'), '--host', '0.0.0.0', '--rpc-port', '0', '--http-port', '0'], { timeoutMs: 30_000 });
  assert.equal(result.code, 78);
  assert.match(result.stderr, /^weft: WEFT_BAD_CONFIG: serving on 0\.0\.0\.0 \(not loopback\) needs CURVE keys/);
  assert.deepEqual(result.leftover, []);
});
