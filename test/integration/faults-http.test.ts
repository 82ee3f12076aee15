/**
 * G7 and G10 against a real `weft serve`. G7: 200 slowloris connections (100 trickling their headers one byte at a
 * time, 100 sending complete headers and a body they never finish) while a client streams: /health and a
 * completion keep being answered, the stream keeps its pace, and every slow connection is answered 408 and closed
 * within the client deadline (10 s; asserted at twice that, a loaded 2-core machine); 10,000 malformed bodies get
 * 4xx answers in the OpenAI shape, never a 5xx. G10: a full queue refuses at once with 503 + retry-after, and
 * cancelled streams give their KV blocks back. Measured figures are printed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { Agent, request as httpRequest } from 'node:http';
import { WeftClient } from '../../coordinator/api/client.ts';
import { prng } from '../helpers/random.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { startServe, stopCleanly } from './serve-helpers.ts';

const reference = readReference('llama-tiny');
const SLOW_CONNECTIONS = 200;
const TRICKLE_MS = 1000;

interface SlowClient {
  readonly connected: Promise<void>;
  /** resolves when the server closed the connection: what it answered, and after how long */
  readonly closed: Promise<{ answer: string; closedAfterMs: number }>;
  readonly socket: Socket;
}

/** A connection that writes `head`, then one byte of `trickle` every TRICKLE_MS, and never finishes. */
function slowClient(http: string, head: string, trickle: string): SlowClient {
  const { hostname, port } = new URL(http);
  const socket = connect(Number(port), hostname);
  const started = Date.now();
  let answer = '';
  let sent = 0;
  let timer: NodeJS.Timeout | undefined;
  socket.setEncoding('utf8').on('data', (d: string) => (answer += d));
  socket.on('error', () => undefined); // a reset after the answer is the server closing, which is what is measured
  const connected = new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  const closed = new Promise<{ answer: string; closedAfterMs: number }>((resolve) =>
    socket.once('close', () => {
      clearInterval(timer);
      resolve({ answer, closedAfterMs: Date.now() - started });
    }),
  );
  void connected.then(() => {
    socket.write(head);
    timer = setInterval(() => socket.writable && socket.write(trickle[sent++ % trickle.length]!), TRICKLE_MS);
  });
  return { connected, closed, socket };
}

/** Milliseconds until `url` answers, and its status. */
async function timed(url: string, init?: RequestInit): Promise<{ ms: number; status: number; body: string }> {
  const started = Date.now();
  const res = await fetch(url, init);
  const body = await res.text();
  return { ms: Date.now() - started, status: res.status, body };
}

test('G7: 200 slowloris connections (trickled headers, unfinished bodies) are closed with 408 within 10 s while /health, a completion and a running stream are served', { timeout: 120_000 }, async (t) => {
  const server = await startServe(['--model', fixtureDir('llama-tiny'), '--tp', '1']);
  const slow: SlowClient[] = [];
  try {
    // a stream running through the flood: the largest pause between its chunks is measured
    const streaming = (async () => {
      const res = await fetch(`${server.http}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: reference.prompts[0], max_tokens: 400, temperature: 0, ignore_eos: true, stream: true }),
      });
      assert.equal(res.status, 200);
      let last = Date.now();
      let longestGapMs = 0;
      let text = '';
      for await (const chunk of res.body!) {
        longestGapMs = Math.max(longestGapMs, Date.now() - last);
        last = Date.now();
        text += new TextDecoder().decode(chunk);
      }
      return { longestGapMs, finished: text.includes('"finish_reason":"length"') && text.endsWith('data: [DONE]\n\n') };
    })();
    for (let i = 0; i < SLOW_CONNECTIONS; i++) {
      slow.push(
        i % 2 === 0
          ? slowClient(server.http, 'POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n', `X-Slow-${i}: ${'a'.repeat(64)}`)
          : slowClient(server.http, 'POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"prompt": "', 'a'),
      );
    }
    await Promise.all(slow.map((c) => c.connected));
    const floodStarted = Date.now();
    // while every slow connection is open: /health, and a whole completion
    const health: number[] = [];
    let completionMs = 0;
    while (Date.now() - floodStarted < 6000) {
      const answer = await timed(`${server.http}/health`);
      assert.equal(answer.status, 200, answer.body);
      health.push(answer.ms);
      if (completionMs === 0) {
        const completion = await timed(`${server.http}/v1/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ prompt: reference.prompts[1], max_tokens: 8, temperature: 0 }),
        });
        assert.equal(completion.status, 200, completion.body);
        completionMs = completion.ms;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    const stillOpen = slow.filter((c) => !c.socket.destroyed).length;
    const closures = await Promise.all(slow.map((c) => c.closed));
    const { longestGapMs, finished } = await streaming;
    health.sort((a, b) => a - b);
    const p99 = health[Math.min(health.length - 1, Math.floor(health.length * 0.99))]!;
    const latestClose = Math.max(...closures.map((c) => c.closedAfterMs));
    t.diagnostic(
      `G7 measured: ${stillOpen}/${SLOW_CONNECTIONS} slow connections open 6 s in; /health p99 ${p99} ms, max ${health.at(-1)} ms over ${health.length} calls; ` +
        `a completion in ${completionMs} ms; the stream's longest pause ${longestGapMs} ms; the last slow connection closed after ${latestClose} ms (deadline 10000 ms)`,
    );
    assert.equal(stillOpen, SLOW_CONNECTIONS, 'the flood was in place while the server was measured');
    assert.ok(p99 < 1000, `/health p99 ${p99} ms during the flood`);
    assert.ok(completionMs < 10_000, `a completion took ${completionMs} ms during the flood`);
    assert.ok(finished, 'the stream running through the flood finished');
    assert.ok(longestGapMs < 2000, `the stream paused ${longestGapMs} ms`);
    for (const [i, { answer }] of closures.entries()) assert.match(answer, /^HTTP\/1\.1 408 [^]*"code":"request_timeout"/, `slow connection ${i}`);
    assert.ok(latestClose < 20_000, `every slow connection closed within twice the 10 s deadline: the last after ${latestClose} ms`);
  } finally {
    for (const c of slow) c.socket.destroy();
    await stopCleanly(server);
  }
});


/** One malformed body for `route`: random bytes, a truncated or byte-flipped valid body, wrong types, deep nesting. */
function malformedBody(random: () => number, route: string): string {
  const valid =
    route === '/v1/chat/completions'
      ? { messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 }
      : route === '/tokenize'
        ? { prompt: 'hello' }
        : route === '/detokenize'
          ? { tokens: reference.prompts[0] }
          : { prompt: reference.prompts[0], max_tokens: 1 };
  const text = JSON.stringify(valid);
  const odd = [null, -1, 2 ** 60, 1e308, 'x', '', [], {}, [[[]]], true, -0.5, 'a'.repeat(300)];
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
  switch (Math.floor(random() * 6)) {
    case 0:
      return Array.from({ length: 1 + Math.floor(random() * 200) }, () => String.fromCharCode(Math.floor(random() * 256))).join('');
    case 1:
      return text.slice(0, Math.floor(random() * text.length));
    case 2: {
      const at = Math.floor(random() * text.length);
      return text.slice(0, at) + String.fromCharCode(Math.floor(random() * 128)) + text.slice(at + 1);
    }
    case 3: {
      const fields = ['prompt', 'tokens', 'messages', 'max_tokens', 'temperature', 'top_p', 'top_k', 'stop', 'seed', 'stream', 'n', 'logit_bias', 'model', 'stream_options', 'ignore_eos'];
      return JSON.stringify({ ...valid, [pick(fields)]: pick(odd), [pick(fields)]: pick(odd) });
    }
    case 4:
      return pick(['[', '{"a":']).repeat(1000 + Math.floor(random() * 20_000));
    default:
      return JSON.stringify(pick([[valid], 'string', 12, null, { ...valid, messages: [{ role: pick(odd), content: pick(odd) }] }]));
  }
}

test('G7: 10,000 malformed bodies on the JSON routes: a 4xx in the OpenAI error shape (or a 200 where the mutation is valid), never a 5xx; a body over the cap is a 413 before it is sent', { timeout: 300_000 }, async (t) => {
  const server = await startServe(['--model', fixtureDir('llama-tiny'), '--tp', '1']);
  const agent = new Agent({ keepAlive: true, maxSockets: 8 });
  try {
    const random = prng(7);
    const routes = ['/v1/completions', '/v1/chat/completions', '/tokenize', '/detokenize'];
    const statuses = new Map<number, number>();
    const started = Date.now();
    const send = (route: string, body: string): Promise<{ status: number; text: string }> =>
      new Promise((resolve, reject) => {
        const req = httpRequest(`${server.http}${route}`, { method: 'POST', agent, headers: { 'content-type': 'application/json' } }, (res) => {
          let text = '';
          res.setEncoding('utf8').on('data', (d: string) => (text += d));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
        });
        req.on('error', reject);
        req.end(body);
      });
    const bodies = Array.from({ length: 10_000 }, (_, i) => [routes[i % routes.length]!, malformedBody(random, routes[i % routes.length]!)] as const);
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < bodies.length) {
        const [route, body] = bodies[next++]!;
        const { status, text } = await send(route, body);
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
        assert.ok(status < 500, `${route} ${JSON.stringify(body.slice(0, 80))}: ${status} ${text}`);
        if (status !== 200) {
          const { error } = JSON.parse(text) as { error: { message: string; type: string; code: string } };
          assert.ok(typeof error.message === 'string' && typeof error.type === 'string' && typeof error.code === 'string', `OpenAI error shape: ${text}`);
        }
      }
    };
    await Promise.all(Array.from({ length: 8 }, lane));
    const seconds = (Date.now() - started) / 1000;
    // a declared length over the cap: refused from the header, the body never sent
    const over = await new Promise<string>((resolve) => {
      const { hostname, port } = new URL(server.http);
      const socket = connect(Number(port), hostname);
      let answer = '';
      socket.setEncoding('utf8').on('data', (d: string) => (answer += d));
      socket.on('error', () => undefined);
      socket.on('close', () => resolve(answer));
      socket.write(`POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${64 << 20}\r\n\r\n{`);
      setTimeout(() => socket.end(), 3000);
    });
    t.diagnostic(`G7 measured: 10,000 malformed bodies in ${seconds.toFixed(1)} s, answers by status ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`);
    assert.match(over, /^HTTP\/1\.1 413 /);
    assert.ok(![...statuses.keys()].some((s) => s >= 500));
    // most mutations are refused (the two token routes ignore fields they do not read, so more of theirs are valid)
    assert.ok([...statuses].filter(([s]) => s >= 400).reduce((n, [, c]) => n + c, 0) >= 8_500, 'most mutations are refused');
    const health = await timed(`${server.http}/health`);
    assert.equal(health.status, 200);
    assert.equal(server.child.exitCode, null);
  } finally {
    agent.destroy();
    await stopCleanly(server);
  }
});

test('G10: with the queue full, new requests get 503 with retry-after at once; cancelled streams give back every KV block within a few decode steps', { timeout: 120_000 }, async (t) => {
  const server = await startServe(['--model', fixtureDir('llama-tiny'), '--tp', '2', '--kv-slots', '1', '--max-queue', '1']);
  const client = await WeftClient.connect({ endpoint: server.rpc, timeoutMs: 30_000 });
  const aborts = [new AbortController(), new AbortController()];
  try {
    const gaps: number[] = [];
    const streams = aborts.map(async (abort, i) => {
      try {
        const res = await fetch(`${server.http}/v1/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ prompt: reference.prompts[0], max_tokens: 480, ignore_eos: true, stream: true }),
          signal: abort.signal,
        });
        let last = performance.now();
        for await (const _ of res.body!) {
          if (i === 0) gaps.push(performance.now() - last);
          last = performance.now();
        }
      } catch (err) {
        if (!abort.signal.aborted) throw err;
      }
    });
    // one running, one queued
    for (let i = 0; i < 200; i++) {
      const stats = await client.stats();
      if (stats.running === 1 && stats.waiting === 1 && gaps.length > 5) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const refusals: number[] = [];
    for (let i = 0; i < 50; i++) {
      const answer = await timed(`${server.http}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: reference.prompts[1], max_tokens: 4 }),
      });
      assert.equal(answer.status, 503, answer.body);
      refusals.push(answer.ms);
    }
    const retryAfter = (await fetch(`${server.http}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: reference.prompts[1], max_tokens: 4 }) })).headers.get('retry-after');
    const stats = await client.stats();
    assert.equal(stats.waiting, 1, 'the queue stays at its cap');
    const blocksBusy = stats.kvBlocksUsed;
    const cancelledAt = performance.now();
    for (const abort of aborts) abort.abort();
    let freedMs = -1;
    while (performance.now() - cancelledAt < 10_000) {
      if ((await client.stats()).kvBlocksUsed === 0) {
        freedMs = performance.now() - cancelledAt;
        break;
      }
    }
    await Promise.all(streams);
    refusals.sort((a, b) => a - b);
    gaps.sort((a, b) => a - b);
    const itl = gaps[Math.floor(gaps.length / 2)]!;
    const p90 = refusals[Math.floor(refusals.length * 0.9)]!;
    t.diagnostic(
      `G10 measured: 50 refusals (503, retry-after ${retryAfter}) p50 ${refusals[25]} ms, p90 ${p90} ms, max ${refusals.at(-1)} ms; ` +
        `${blocksBusy} KV blocks freed ${freedMs.toFixed(0)} ms after the cancel (decode step p50 ${itl.toFixed(1)} ms, measured with one stats round trip each)`,
    );
    assert.equal(retryAfter, '1');
    assert.ok(p90 < 100, `refusals within 100 ms at p90 (goal 50 ms): ${p90} ms`);
    assert.ok(blocksBusy > 0, 'the running stream held KV blocks');
    assert.ok(freedMs >= 0 && freedMs < 1000, `every KV block free within 1 s of the cancel: ${freedMs.toFixed(0)} ms`);
  } finally {
    for (const abort of aborts) abort.abort();
    await client.close();
    await stopCleanly(server);
  }
});
