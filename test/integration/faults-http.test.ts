/**
 * G7's slow-client flood against a real `weft serve`: 200 slowloris connections (100 trickling their headers one
 * byte at a time, 100 sending complete headers and a body they never finish) while a client streams. /health and
 * a completion keep being answered, the stream keeps its pace, and every slow connection is answered 408 and closed
 * within the client deadline (10 s; asserted at twice that, a loaded 2-core machine). Measured figures are printed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
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
