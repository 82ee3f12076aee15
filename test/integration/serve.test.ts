/**
 * `weft serve` end to end, real processes on loopback: streaming through WeftClient and through the
 * OpenAI-compatible HTTP endpoints, 16 concurrent requests answered exactly as when run alone, cancellation
 * freeing the KV slot, the RPC socket surviving fuzzed frames, and SIGTERM leaving no process behind.
 */
import { readFileSync } from 'node:fs';
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import * as zmq from 'zeromq';
import { pack } from 'msgpackr';
import { WeftClient } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';
import type { GenerationEvent } from '../../coordinator/generate.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { startServe, stopCleanly, readSse, type ServeProcess } from './serve-helpers.ts';

const reference = readReference('llama-tiny');
/** JSON routes need this content type (415 otherwise). */
const JSON_TYPE = { 'content-type': 'application/json' };

async function collect(events: AsyncIterable<GenerationEvent>): Promise<{ tokens: number[]; text: string; done: Extract<GenerationEvent, { type: 'done' }> | null }> {
  const tokens: number[] = [];
  let text = '';
  let done = null;
  for await (const e of events) {
    if (e.type === 'token') {
      tokens.push(e.token);
      text += e.text;
    } else done = e;
  }
  return { tokens, text, done };
}

describe('weft serve (TP=2, 4 KV slots)', () => {
  let server: ServeProcess;
  let client: WeftClient;
  before(async () => {
    server = await startServe(['--model', fixtureDir('llama-tiny'), '--tp', '2', '--kv-slots', '4']);
    client = await WeftClient.connect({ endpoint: server.rpc, timeoutMs: 30_000 });
  });
  after(async () => {
    await client?.close();
    await stopCleanly(server);
  });

  test('WeftClient streams the greedy tokens of Hugging Face; info, health, stats answer', async () => {
    const { tokens, done } = await collect(client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 12, ignoreEos: true } }));
    assert.deepEqual(tokens, reference.greedy[0]!.slice(0, 12));
    assert.equal(done?.finishReason, 'length');
    assert.deepEqual(done?.tokens, tokens);
    const info = await client.info();
    assert.equal(info.name, 'llama-tiny');
    assert.equal(info.tp, 2);
    assert.equal((await client.health()).ready, true);
    assert.equal((await client.stats()).kvSlotsUsed, 0);
  });

  test('16 concurrent requests get the same tokens as when each runs alone', async () => {
    const requests = Array.from({ length: 16 }, (_, i) => ({ promptIds: reference.prompts[i % 3]!, sampling: { maxNewTokens: 4 + (i % 5) * 3, ignoreEos: true, ...(i % 4 === 3 && { temperature: 0.9, seed: i }) } }));
    const alone: number[][] = [];
    for (const r of requests.slice(0, 5)) alone.push((await collect(client.generate(r))).tokens);
    const together = await Promise.all(requests.map((r) => collect(client.generate(r))));
    for (let i = 0; i < 16; i++) {
      const r = requests[i]!;
      if (!('temperature' in r.sampling)) assert.deepEqual(together[i]!.tokens, reference.greedy[i % 3]!.slice(0, r.sampling.maxNewTokens), `request ${i}`);
      if (i < 5) assert.deepEqual(together[i]!.tokens, alone[i], `request ${i} alone vs together`);
    }
    // the sampled ones (seeded) repeat exactly too
    const again = await collect(client.generate(requests[3]!));
    assert.deepEqual(again.tokens, together[3]!.tokens);
  });

  test('aborting a stream cancels it and frees its KV slot; a broken-off HTTP stream does too', async () => {
    const controller = new AbortController();
    const seen: number[] = [];
    await assert.rejects(
      (async () => {
        for await (const e of client.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 200, ignoreEos: true } }, { signal: controller.signal })) {
          if (e.type === 'token') seen.push(e.token);
          if (seen.length === 3) controller.abort();
        }
      })(),
      (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED',
    );
    assert.ok(await pollStats(client, (s) => s.kvSlotsUsed === 0 && s.running === 0), 'the slot came back');

    const http = new AbortController();
    const res = await fetch(`${server.http}/v1/completions`, {
      method: 'POST',
      headers: JSON_TYPE,
      body: JSON.stringify({ prompt: reference.prompts[1], max_tokens: 200, ignore_eos: true, stream: true }),
      signal: http.signal,
    });
    const reader = res.body!.getReader();
    await reader.read();
    assert.equal((await client.stats()).running, 1);
    http.abort();
    assert.ok(await pollStats(client, (s) => s.kvSlotsUsed === 0), 'the HTTP request freed its slot');
  });

  test('/v1/completions streams SSE chunks, usage and [DONE]; same text as the non-streamed answer', async () => {
    const body = { model: 'llama-tiny', prompt: reference.prompts[2], max_tokens: 8, temperature: 0, ignore_eos: true };
    const plain = await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: JSON_TYPE, body: JSON.stringify(body) });
    assert.equal(plain.status, 200);
    const json = (await plain.json()) as { choices: { text: string; finish_reason: string }[]; usage: { prompt_tokens: number; completion_tokens: number } };
    assert.equal(json.choices[0]!.finish_reason, 'length');
    assert.deepEqual(json.usage, { prompt_tokens: 40, completion_tokens: 8, total_tokens: 48 });
    const res = await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: JSON_TYPE, body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }) });
    assert.equal(res.headers.get('content-type'), 'text/event-stream');
    const events = await readSse(res);
    assert.equal(events.at(-1), '[DONE]');
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { choices: { text: string; finish_reason: string | null }[]; usage?: { completion_tokens: number } });
    assert.equal(chunks.map((c) => c.choices[0]?.text ?? '').join(''), json.choices[0]!.text);
    assert.equal(chunks.at(-2)!.choices[0]!.finish_reason, 'length');
    assert.deepEqual(chunks.at(-1)!.choices, []);
    assert.equal(chunks.at(-1)!.usage!.completion_tokens, 8);
    // the model list, and errors in the OpenAI shape
    const models = (await (await fetch(`${server.http}/v1/models`)).json()) as { data: { id: string }[] };
    assert.deepEqual(models.data.map((m) => m.id), ['llama-tiny']);
    for (const [payload, status, pattern] of [
      ['{not json', 400, /not valid JSON/],
      [JSON.stringify({ prompt: 'x', max_tokens: -1 }), 400, /max_tokens/],
      [JSON.stringify({ prompt: 'x', n: 0 }), 400, /^n: /],
      [JSON.stringify({ prompt: ['a', 'b'], n: 40 }), 400, /asks for 80 choices; at most 64/],
      [JSON.stringify({ prompt: 'x', model: 'gpt-4' }), 404, /not served here/],
      [JSON.stringify({ prompt: [999999] }), 400, /token id at index 0 must be an integer in \[0, 512\)/],
    ] as const) {
      const r = await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: JSON_TYPE, body: payload });
      const err = (await r.json()) as { error: { message: string; type: string } };
      assert.equal(r.status, status, err.error.message);
      assert.match(err.error.message, pattern);
    }
    const chat = await fetch(`${server.http}/v1/chat/completions`, { method: 'POST', headers: JSON_TYPE, body: JSON.stringify({ messages: [{ role: 'user', content: 'hi' }] }) });
    assert.equal(chat.status, 400);
    assert.match(((await chat.json()) as { error: { message: string } }).error.message, /no chat_template/);
    const metrics = await (await fetch(`${server.http}/metrics`)).text();
    for (const name of ['weft_num_requests_waiting', 'weft_tokens_per_second', 'weft_time_to_first_token_seconds_bucket', 'weft_spec_decode_draft_acceptance_rate'])
      assert.match(metrics, new RegExp(`^${name}\\{`, 'm'));
  });

  test('fuzzed RPC frames get an error answer or a disconnect; the server keeps serving', async () => {
    const raw = new zmq.Dealer({ linger: 0, receiveTimeout: 5000 });
    raw.connect(server.rpc);
    const frames: Buffer[] = [
      Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff]), // array32 declaring 2^32-1 elements
      Buffer.from(Buffer.alloc(24_000 * 3).map((_, i) => [0xdc, 0x00, 0x01][i % 3]!)), // 24,000 nested array16 headers
      Buffer.alloc(100_000, 0x91), // 100,000-deep fixarray
      Buffer.from([0xd4, 0x72, 0x00]), // ext 0x72 (record definition)
      Buffer.from([0xc7, 0x01, 0x70, 0x00]), // ext 0x70 (structured clone reference)
      Buffer.from([0xdb, 0xff, 0xff, 0xff, 0xff, 0x61]), // str32 past the end
      Buffer.alloc(0),
      pack({ v: 1, type: 'generate', id: 1, promptIds: 'not ids' }),
      pack({ v: 1, type: 'nope', id: 2 }),
      pack({ v: 1, type: 'generate', id: -4, promptIds: [1] }),
      pack({ v: 1, type: 'generate', id: 5, promptIds: [2 ** 40] }),
      pack({ v: 1, type: 'generate', id: 6, promptIds: [1, 2], sampling: { temperature: 'hot' } }),
      pack({ v: 1, type: 'score', id: 7, ids: [] }),
      pack([1, 2, 3]),
      pack('generate'),
      // reliability.md G6: 10,000 frames in all, random bytes and random messages of the right envelope
      ...Array.from({ length: 7_000 }, (_, i) => randomBytes(1 + (i % 64))),
      ...Array.from({ length: 2_985 }, (_, i) => pack({ v: 1, type: ['generate', 'score', 'cancel', 'info'][i % 4], id: i, [`k${i % 97}`]: randomBytes(i % 200) })),
    ];
    assert.equal(frames.length, 10_000);
    const rssKiB = (): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${server.child.pid}/status`, 'utf8'))?.[1] ?? 0);
    const rssBefore = rssKiB();
    for (const frame of frames) {
      await raw.send(frame);
      const [answer] = await raw.receive();
      const message = (await import('msgpackr')).unpack(answer!) as { type: string; code: string };
      assert.equal(message.type, 'error', `frame ${frame.subarray(0, 8).toString('hex')}`);
      assert.match(message.code, /^WEFT_(PROTOCOL|BAD_REQUEST)$/);
    }
    // a frame over the size limit makes ZeroMQ drop that peer; other clients never notice
    const huge = new zmq.Dealer({ linger: 0 });
    huge.connect(server.rpc);
    await huge.send(Buffer.alloc(8 << 20));
    huge.close();
    raw.close();
    const growthMiB = (rssKiB() - rssBefore) / 1024;
    assert.ok(growthMiB <= 64, `coordinator RSS grew ${growthMiB.toFixed(1)} MiB over 10,000 bad frames`);
    const { tokens } = await collect(client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 5, ignoreEos: true } }));
    assert.deepEqual(tokens, reference.greedy[0]!.slice(0, 5));
    assert.equal(server.child.exitCode, null, 'the coordinator is still running');
  });
});

async function pollStats(client: WeftClient, ok: (s: Awaited<ReturnType<WeftClient['stats']>>) => boolean): Promise<boolean> {
  const deadline = Date.now() + 30_000; // a wait for a state, not a measure: wide for a loaded machine
  while (Date.now() < deadline) {
    if (ok(await client.stats())) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}
