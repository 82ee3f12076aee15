/**
 * `weft serve` through the official `openai` npm client (a devDependency): models list and retrieve, completions
 * and chat (plain, and streamed with a usage chunk), stop strings, seeded sampling, abort, a full queue (503 with
 * retry-after) and unknown fields refused by name. Skips, saying so, when the package is not installed. Runs with
 * openai 4 and 6.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WeftClient } from '../../coordinator/api/client.ts';
import { readReference } from '../helpers/fixtures.ts';
import { MAX_CONTEXT, MODEL, startChatServer, type ChatServer } from './openai-helpers.ts';

const reference = readReference('llama-tiny');

// The parts of the client's API used here (its own types are not needed to typecheck without the package).
interface ApiError extends Error {
  status?: number;
  param?: string | null;
  code?: string | null;
  type?: string;
  /** a plain record in openai 4, a Headers in 5 and later */
  headers?: Record<string, string> | Headers;
}
const headerOf = (err: ApiError, name: string): string | null | undefined => (err.headers instanceof Headers ? err.headers.get(name) : err.headers?.[name]);
interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}
interface TextChoice {
  text: string;
  finish_reason: string | null;
}
interface ChatChoice {
  message: { role: string; content: string | null };
  finish_reason: string | null;
}
interface ChunkChoice {
  text?: string;
  delta?: { role?: string; content?: string };
  finish_reason: string | null;
}
interface Stream<T> extends AsyncIterable<T> {
  controller: AbortController;
}
interface Returned<T> extends Promise<T> {
  withResponse(): Promise<{ data: T; response: Response }>;
}
type Params = Record<string, unknown>;
type Options = { signal?: AbortSignal };
interface Client {
  models: { list(): Promise<{ data: { id: string; object: string }[] }>; retrieve(id: string): Promise<{ id: string; object: string; owned_by: string }> };
  completions: { create(body: Params, options?: Options): Returned<{ id: string; choices: TextChoice[]; usage?: Usage; _request_id?: string | null } & Stream<{ choices: ChunkChoice[]; usage?: Usage | null }>> };
  chat: { completions: { create(body: Params, options?: Options): Returned<{ choices: ChatChoice[]; usage?: Usage } & Stream<{ choices: ChunkChoice[]; usage?: Usage | null }>> } };
}
interface OpenAiModule {
  default: new (options: { baseURL: string; apiKey: string; maxRetries: number; timeout: number }) => Client;
  NotFoundError: new (...args: never[]) => ApiError;
  BadRequestError: new (...args: never[]) => ApiError;
  APIUserAbortError: new (...args: never[]) => Error;
  APIError: new (...args: never[]) => ApiError;
}

const specifier = 'openai'; // a variable: the module may be absent, and tsc must not look for it
const openai = (await import(specifier).catch(() => null)) as OpenAiModule | null;
const skip = openai === null ? 'the openai package is not installed (npm install --save-dev openai)' : false;

async function collect<T>(stream: AsyncIterable<T>): Promise<T[]> {
  const chunks: T[] = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

type Stats = Awaited<ReturnType<WeftClient['stats']>>;
/** [running, waiting] once `ok` holds, or after 5 s. */
async function statsWhen(rpc: WeftClient, ok: (s: Stats) => boolean): Promise<[number, number]> {
  const deadline = Date.now() + 30_000; // a wait for a state, not a measure: wide for a loaded machine
  let stats = await rpc.stats();
  while (!ok(stats) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
    stats = await rpc.stats();
  }
  return [stats.running, stats.waiting];
}

describe('weft serve through the openai npm client', { skip }, () => {
  let chat: ChatServer;
  let client: Client;
  let rpc: WeftClient;
  const lib = openai!;
  before(async () => {
    chat = await startChatServer(['--kv-slots', '1', '--max-queue', '1']);
    client = new lib.default({ baseURL: `${chat.server.http}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
    rpc = await WeftClient.connect({ endpoint: chat.server.rpc });
  });
  after(async () => {
    await rpc?.close();
    const { code, leftover } = await chat.stop();
    assert.equal(code, 0, chat.server.stderr());
    assert.deepEqual(leftover, []);
  });

  test('models.list and models.retrieve; another id is NotFoundError', async () => {
    const list = await client.models.list();
    assert.deepEqual(list.data.map((m) => m.id), [MODEL]);
    const model = await client.models.retrieve(MODEL);
    assert.deepEqual([model.id, model.object, model.owned_by], [MODEL, 'model', 'weft']);
    await assert.rejects(client.models.retrieve('gpt-4o'), (err: ApiError) => err instanceof lib.NotFoundError && err.status === 404 && err.param === 'model' && err.code === 'model_not_found');
  });

  test('completions: plain, streamed with a usage chunk (same text), the request id readable', async () => {
    const body = { model: MODEL, prompt: reference.prompts[0], max_tokens: 8, temperature: 0, ignore_eos: true };
    const { data: plain, response } = await client.completions.create(body).withResponse();
    assert.equal(plain.choices[0]!.finish_reason, 'length');
    assert.deepEqual([plain.usage!.prompt_tokens, plain.usage!.completion_tokens], [reference.prompts[0]!.length, 8]);
    assert.match(String(response.headers.get('x-request-id')), /^[0-9a-f-]{36}$/);
    const chunks = await collect(await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } }));
    assert.equal(chunks.map((c) => c.choices[0]?.text ?? '').join(''), plain.choices[0]!.text);
    assert.equal(chunks.at(-2)!.choices[0]!.finish_reason, 'length');
    assert.deepEqual(chunks.at(-1)!.choices, []);
    assert.equal(chunks.at(-1)!.usage!.completion_tokens, 8);
  });

  test('chat: plain and streamed give the same answer; without max_tokens it runs to the end of the context', async () => {
    const body = { model: MODEL, messages: [{ role: 'user', content: 'hello' }], max_tokens: 6, temperature: 0, ignore_eos: true };
    const plain = await client.chat.completions.create(body);
    assert.equal(plain.choices[0]!.message.role, 'assistant');
    assert.equal(plain.usage!.completion_tokens, 6);
    const chunks = await collect(await client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } }));
    assert.equal(chunks[0]!.choices[0]!.delta!.role, 'assistant');
    assert.equal(chunks.map((c) => c.choices[0]?.delta?.content ?? '').join(''), plain.choices[0]!.message.content);
    assert.equal(chunks.at(-1)!.usage!.completion_tokens, 6);
    const { max_tokens: _, ...unbounded } = body;
    const long = await client.chat.completions.create(unbounded);
    assert.equal(long.usage!.completion_tokens, MAX_CONTEXT - long.usage!.prompt_tokens);
  });

  test('a stop string ends the text before it (finish_reason stop); a seed repeats a sampled answer', async () => {
    const body = { model: MODEL, prompt: reference.prompts[1], max_tokens: 12, temperature: 0, ignore_eos: true };
    const text = (await client.completions.create(body)).choices[0]!.text;
    assert.ok(text.length >= 4, `the greedy text is long enough to cut: ${JSON.stringify(text)}`);
    const stop = text.slice(Math.floor(text.length / 2), Math.floor(text.length / 2) + 2);
    const stopped = await client.completions.create({ ...body, stop: [stop] });
    assert.equal(stopped.choices[0]!.finish_reason, 'stop');
    assert.equal(stopped.choices[0]!.text, text.slice(0, text.indexOf(stop)));

    const sampled = { model: MODEL, prompt: reference.prompts[2], max_tokens: 10, temperature: 1, ignore_eos: true };
    const first = await client.completions.create({ ...sampled, seed: 7 });
    const again = await client.completions.create({ ...sampled, seed: 7 });
    const other = await client.completions.create({ ...sampled, seed: 8 });
    assert.equal(again.choices[0]!.text, first.choices[0]!.text);
    assert.notEqual(other.choices[0]!.text, first.choices[0]!.text);
  });

  test('a full queue is a 503 with retry-after; AbortController ends a stream and frees its slot', async () => {
    // the tiny model decodes its context in well under a second: to hold the one slot for sure, its worker is
    // stopped (SIGSTOP) once the first chunk is in, and continued at the end (the heartbeat timeout is 30 s)
    const worker = ((await (await fetch(`${chat.server.http}/health`)).json()) as { ranks: { pid: number }[] }).ranks[0]!.pid;
    const first = new AbortController();
    const stream = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'go on' }], ignore_eos: true, stream: true }, { signal: first.signal });
    const iterator = stream[Symbol.asyncIterator]();
    assert.equal((await iterator.next()).done, false);
    process.kill(worker, 'SIGSTOP');
    try {
      const queuedAbort = new AbortController();
      const queued = client.completions.create({ model: MODEL, prompt: 'x', max_tokens: 1 }, { signal: queuedAbort.signal });
      queued.catch(() => undefined);
      assert.deepEqual(await statsWhen(rpc, (s) => s.waiting === 1), [1, 1]);
      await assert.rejects(client.completions.create({ model: MODEL, prompt: 'x', max_tokens: 1 }), (err: ApiError) => err instanceof lib.APIError && err.status === 503 && headerOf(err, 'retry-after') === '1');
      first.abort();
      // the client's stream ends quietly on abort (it swallows the AbortError); no chunk after it finishes the answer
      const rest: ChunkChoice[] = [];
      for (let next = await iterator.next(); !next.done; next = await iterator.next()) rest.push(...next.value.choices);
      assert.ok(rest.every((c) => c.finish_reason === null), 'the aborted stream never finished');
      // still stopped, so only the cancellations can free anything: the queued request takes the freed slot
      assert.deepEqual(await statsWhen(rpc, (s) => s.waiting === 0), [1, 0], 'the aborted stream freed its slot');
      queuedAbort.abort();
      await assert.rejects(queued, (err: Error) => err instanceof lib.APIUserAbortError);
      assert.deepEqual(await statsWhen(rpc, (s) => s.running === 0), [0, 0], 'the aborted queued request left too');
    } finally {
      process.kill(worker, 'SIGCONT');
    }
    assert.equal((await client.completions.create({ model: MODEL, prompt: reference.prompts[0], max_tokens: 2, ignore_eos: true })).usage!.completion_tokens, 2);
  });

  test('unknown fields are refused by name (BadRequestError, param and message)', async () => {
    const extra = { repetition_penalty: 1.1, min_p: 0.05 };
    await assert.rejects(client.completions.create({ model: MODEL, prompt: 'hi', max_tokens: 1, ...extra }), (err: ApiError) => {
      assert.ok(err instanceof lib.BadRequestError, String(err));
      assert.deepEqual([err.status, err.param, err.code, err.type], [400, 'repetition_penalty', 'unsupported_parameter', 'invalid_request_error']);
      assert.match(err.message, /repetition_penalty, min_p/);
      return true;
    });
    await assert.rejects(client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], temprature: 0 }), (err: ApiError) => err instanceof lib.BadRequestError && err.param === 'temprature');
  });
});
