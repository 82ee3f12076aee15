/**
 * The OpenAI surface of `weft serve` as OpenAI and vLLM answer it, with plain fetch (no client library): a model
 * retrieved by id, chat without max_tokens running to the context's end, unknown fields refused by name, OPTIONS
 * on every route, and `x-request-id` on every answer and in the log line of a failed request.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { HttpGateway } from '../../coordinator/api/http.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { loadTokenizer } from '../../coordinator/tokenizer.ts';
import { WeftClient } from '../../coordinator/api/client.ts';
import { MAX_CONTEXT, MODEL, startChatServer, type ChatServer } from './openai-helpers.ts';

const reference = readReference('llama-tiny');
const ALLOWED_ORIGIN = 'http://app.example';
const JSON_TYPE = { 'content-type': 'application/json' };
/** The deadline of every request: the failing request below outlives it while its worker is stopped. */
const REQUEST_TIMEOUT_MS = 3000;

interface OpenAiError {
  error: { message: string; type: string; param: string | null; code: string | null };
}
interface Completion {
  choices: { index: number; text?: string; message?: { role: string; content: string }; finish_reason: string }[];
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
}

describe('weft serve: the OpenAI surface over plain HTTP', () => {
  let chat: ChatServer;
  let http: string;
  const post = (path: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> =>
    fetch(`${http}${path}`, { method: 'POST', headers: { ...JSON_TYPE, ...headers }, body: JSON.stringify(body) });
  before(async () => {
    chat = await startChatServer(['--cors-origins', ALLOWED_ORIGIN, '--request-timeout', String(REQUEST_TIMEOUT_MS)]);
    http = chat.server.http;
  });
  after(async () => {
    const { code, leftover } = await chat.stop();
    assert.equal(code, 0, chat.server.stderr());
    assert.deepEqual(leftover, []);
  });

  test('GET /v1/models/{id}: the model object for the served id, 404 in the OpenAI error shape for another', async () => {
    const list = (await (await fetch(`${http}/v1/models`)).json()) as { data: unknown[] };
    const one = await fetch(`${http}/v1/models/${MODEL}`);
    assert.equal(one.status, 200);
    const model = (await one.json()) as { id: string; object: string; max_model_len: number };
    assert.deepEqual(model, list.data[0]);
    assert.deepEqual([model.id, model.object, model.max_model_len], [MODEL, 'model', MAX_CONTEXT]);
    const other = await fetch(`${http}/v1/models/gpt-4o`);
    assert.equal(other.status, 404);
    const { error } = (await other.json()) as OpenAiError;
    assert.deepEqual([error.type, error.param, error.code], ['invalid_request_error', 'model', 'model_not_found']);
    assert.match(error.message, /"gpt-4o" is not served here/);
    assert.equal((await fetch(`${http}/v1/models/${encodeURIComponent('org/a model')}`)).status, 404, 'an encoded id is read decoded');
  });

  test('/tokenize and /detokenize as vLLM answers them: the ids with their count and the context; the text of ids, special tokens kept (RPC detokenize alike); a bad id is a 400 naming tokens', async () => {
    const tokenizer = loadTokenizer(fixtureDir(MODEL));
    const text = 'the state of the union';
    const tokenized = (await (await post('/tokenize', { prompt: text })).json()) as { count: number; max_model_len: number; tokens: number[] };
    assert.deepEqual(tokenized, { count: tokenized.tokens.length, max_model_len: MAX_CONTEXT, tokens: tokenizer.encode(text) });
    const bare = (await (await post('/tokenize', { prompt: text, add_special_tokens: false })).json()) as { tokens: number[] };
    assert.deepEqual(bare.tokens, tokenizer.encode(text, { addBos: false }));
    assert.notDeepEqual(bare.tokens, tokenized.tokens, 'the fixture adds a BOS by default');
    // a chat's messages, rendered by the model's template as the chat route does: the prompt_tokens it reports
    const messages = [{ role: 'user', content: 'hello there' }];
    const chatTokens = (await (await post('/tokenize', { messages })).json()) as { count: number };
    const answered = (await (await post('/v1/chat/completions', { messages, max_tokens: 1 })).json()) as Completion;
    assert.equal(chatTokens.count, answered.usage.prompt_tokens);
    for (const odd of [{}, { prompt: 'a', messages }])
      assert.equal(((await (await post('/tokenize', odd)).json()) as OpenAiError).error.message, 'give either prompt or messages');
    const ids = [tokenizer.bosTokenId!, ...tokenized.tokens.slice(1), tokenizer.eosTokenIds[0]!];
    const detokenized = await post('/detokenize', { tokens: ids });
    assert.equal(detokenized.status, 200);
    assert.deepEqual(await detokenized.json(), { prompt: tokenizer.decode(ids, { skipSpecial: false }) });
    assert.notEqual(tokenizer.decode(ids, { skipSpecial: false }), tokenizer.decode(ids), 'the fixture has special tokens to keep');
    const client = await WeftClient.connect({ endpoint: chat.server.rpc, timeoutMs: 30_000 });
    try {
      assert.deepEqual(await client.detokenize(ids), { text: tokenizer.decode(ids, { skipSpecial: false }) }, 'over RPC alike');
      await assert.rejects(client.detokenize([1, tokenizer.vocabSize]), (err: Error & { code?: string }) => err.code === 'WEFT_BAD_REQUEST' && err.message.includes(`token id at index 1 must be an integer in [0, ${tokenizer.vocabSize})`));
    } finally {
      await client.close();
    }
    for (const [tokens, message] of [
      [[1, tokenizer.vocabSize], `tokens.1: must be a token id in [0, ${tokenizer.vocabSize})`],
      [[1, 2.5], 'tokens.1: '],
      ['hi', 'tokens: '],
      [Array(MAX_CONTEXT + 1).fill(1), `tokens: holds more than the context of ${MAX_CONTEXT} tokens`],
    ] as const) {
      const refused = await post('/detokenize', { tokens });
      assert.equal(refused.status, 400);
      const { error } = (await refused.json()) as OpenAiError;
      assert.equal(error.param, error.message.startsWith('tokens.1') ? 'tokens.1' : 'tokens');
      assert.ok(error.message.startsWith(message), error.message);
    }
  });

  test('n samples and lists of prompts: one choice each in OpenAI order, each what its own request gives; streamed chunks carry their index', async () => {
    const complete = async (body: Record<string, unknown>): Promise<Completion> => {
      const res = await post('/v1/completions', { max_tokens: 8, ignore_eos: true, ...body });
      const json = (await res.json()) as Completion;
      assert.equal(res.status, 200, JSON.stringify(json));
      return json;
    };
    const [p0, p1] = [reference.prompts[0]!, reference.prompts[1]!];
    // n = 3 with a seed: sample j draws from seed + j, so each equals a request of its own with that seed
    const three = await complete({ prompt: p0, n: 3, temperature: 0.9, seed: 5 });
    assert.deepEqual(three.choices.map((c) => c.index), [0, 1, 2]);
    for (let j = 0; j < 3; j++) assert.equal(three.choices[j]!.text, (await complete({ prompt: p0, temperature: 0.9, seed: 5 + j })).choices[0]!.text, `sample ${j}`);
    assert.ok(new Set(three.choices.map((c) => c.text)).size > 1, 'the samples differ');
    assert.deepEqual(three.usage, { prompt_tokens: p0.length, completion_tokens: 24, total_tokens: p0.length + 24 }, 'the prompt counted once');
    // two prompts x n = 2, greedy: index = prompt * n + sample
    const four = await complete({ prompt: [p0, p1], n: 2, temperature: 0 });
    const alone = [(await complete({ prompt: p0, temperature: 0 })).choices[0]!.text, (await complete({ prompt: p1, temperature: 0 })).choices[0]!.text];
    assert.deepEqual(four.choices.map((c) => [c.index, c.text]), [[0, alone[0]], [1, alone[0]], [2, alone[1]], [3, alone[1]]]);
    assert.equal(four.usage.prompt_tokens, p0.length + p1.length);
    // streamed: every chunk names its choice; each choice's pieces add up to its text and it ends with a finish_reason
    const res = await post('/v1/completions', { prompt: p0, n: 3, temperature: 0.9, seed: 5, max_tokens: 8, ignore_eos: true, stream: true });
    const events = (await res.text()).split('\n\n').filter(Boolean);
    assert.equal(events.at(-1), 'data: [DONE]');
    const texts = ['', '', ''];
    const finished: string[] = [];
    for (const event of events.slice(0, -1)) {
      const chunk = JSON.parse(event.slice('data: '.length)) as { choices: { index: number; text: string; finish_reason: string | null }[] };
      for (const c of chunk.choices) {
        texts[c.index] += c.text;
        if (c.finish_reason) finished[c.index] = c.finish_reason;
      }
    }
    assert.deepEqual(texts, three.choices.map((c) => c.text));
    assert.deepEqual(finished, ['length', 'length', 'length']);
  });

  test('logit_bias: +100 makes every token the biased id, -100 bans the token Hugging Face\'s greedy decoding picks; streamed alike', async () => {
    const tokenizer = loadTokenizer(fixtureDir(MODEL));
    const greedy = reference.greedy[0]!.slice(0, 4); // transformers' greedy continuation of prompt 0
    const body = { prompt: reference.prompts[0], max_tokens: 4, temperature: 0, ignore_eos: true };
    const text = async (extra: Record<string, unknown>): Promise<string> => ((await (await post('/v1/completions', { ...body, ...extra })).json()) as Completion).choices[0]!.text!;
    assert.equal(await text({}), tokenizer.decode(greedy), 'unbiased: the oracle\'s tokens');
    const forcedId = 7;
    assert.equal(await text({ logit_bias: { [forcedId]: 100 } }), tokenizer.decode([forcedId, forcedId, forcedId, forcedId]));
    // the ids themselves, over RPC (its camelCase spelling): the banned one never comes
    const client = await WeftClient.connect({ endpoint: chat.server.rpc, timeoutMs: 30_000 });
    try {
      const [done] = await client.generateN({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 4, ignoreEos: true, logitBias: { [greedy[0]!]: -100 } } }, 1);
      assert.notEqual(done!.tokens[0], greedy[0]);
      assert.ok(!done!.tokens.includes(greedy[0]!), `${greedy[0]} never comes: ${done!.tokens}`);
    } finally {
      await client.close();
    }
    // penalties (their arithmetic is checked token by token in test/unit/penalties.test.ts): served over HTTP, and
    // with the biased id penalised each time it comes, the forced run gives way once the penalty passes the bias
    const penalised = await text({ logit_bias: { [forcedId]: 100 }, frequency_penalty: 2, max_tokens: 60 });
    assert.notEqual(penalised, tokenizer.decode(Array(60).fill(forcedId)));
    const stream = await post('/v1/completions', { ...body, logit_bias: { [forcedId]: 100 }, stream: true });
    const streamed = (await stream.text()).split('\n').filter((l) => l.startsWith('data: {')).map((l) => (JSON.parse(l.slice(6)) as Completion).choices[0]?.text ?? '').join('');
    assert.equal(streamed, tokenizer.decode([forcedId, forcedId, forcedId, forcedId]));
  });

  test('chat without max_tokens runs to the end of the context; a completion stops after 16 tokens', async () => {
    const messages = [{ role: 'user', content: 'hello there' }];
    const res = await post('/v1/chat/completions', { messages, temperature: 0, ignore_eos: true });
    const answer = (await res.json()) as Completion;
    assert.equal(res.status, 200, JSON.stringify(answer));
    assert.equal(answer.choices[0]!.finish_reason, 'length');
    assert.ok(answer.usage.prompt_tokens > 0);
    assert.equal(answer.usage.completion_tokens, MAX_CONTEXT - answer.usage.prompt_tokens);
    const capped = (await (await post('/v1/chat/completions', { messages, temperature: 0, ignore_eos: true, max_completion_tokens: 3 })).json()) as Completion;
    assert.equal(capped.usage.completion_tokens, 3);
    const completion = (await (await post('/v1/completions', { prompt: reference.prompts[0], temperature: 0, ignore_eos: true })).json()) as Completion;
    assert.equal(completion.usage.completion_tokens, 16);
    const full = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x'.repeat(MAX_CONTEXT * 4) }] });
    const { error } = (await full.json()) as OpenAiError;
    assert.equal(full.status, 400, error.message);
  });

  test('fields weft does not implement, and values it refuses, are a 400 naming them; its vLLM extras and `user` are accepted', async () => {
    const refused = await post('/v1/completions', { prompt: 'hi', max_tokens: 1, repetition_penalty: 1.1, min_p: 0.05 });
    assert.equal(refused.status, 400);
    const { error } = (await refused.json()) as OpenAiError;
    assert.deepEqual([error.type, error.param, error.code], ['invalid_request_error', 'repetition_penalty', 'unsupported_parameter']);
    assert.match(error.message, /repetition_penalty, min_p/);
    const cases: [string, Record<string, unknown>, string][] = [
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], temprature: 0 }, 'temprature'],
      ['/v1/completions', { prompt: 'hi', stream: true, stream_options: { include_usage: true, continuous_usage_stats: true } }, 'stream_options.continuous_usage_stats'],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, echo: true }, 'echo'],
    ];
    for (const [path, body, param] of cases) {
      const res = await post(path, body);
      const answer = (await res.json()) as OpenAiError;
      assert.equal(res.status, 400, `${param}: ${answer.error.message}`);
      assert.equal(answer.error.param, param);
      assert.match(answer.error.message, new RegExp(param.replace('.', '\\.')));
    }
    // values the sampling parameters refuse: named as the body spells them, in the message and in param
    const values: [string, Record<string, unknown>, string][] = [
      ['/v1/completions', { prompt: 'hi', top_p: 0 }, 'top_p'],
      ['/v1/completions', { prompt: 'hi', max_tokens: MAX_CONTEXT }, 'max_tokens'],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_completion_tokens: MAX_CONTEXT }, 'max_completion_tokens'],
      ['/v1/completions', { prompt: [1, 1_000_000], max_tokens: 2 }, 'prompt'],
      ['/v1/completions', { prompt: 'hi', max_tokens: 2, stop_token_ids: [-1] }, 'stop_token_ids'],
      ['/v1/completions', { prompt: 'hi', max_tokens: 2, logit_bias: { '7': 101 } }, 'logit_bias'],
      ['/v1/completions', { prompt: 'hi', max_tokens: 2, presence_penalty: 3 }, 'presence_penalty'],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, frequency_penalty: 'high' }, 'frequency_penalty'],
      ['/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, logit_bias: { '100000': 1 } }, 'logit_bias'],
    ];
    for (const [path, body, param] of values) {
      const res = await post(path, body);
      const answer = (await res.json()) as OpenAiError;
      assert.equal(res.status, 400, `${param}: ${answer.error.message}`);
      assert.deepEqual([answer.error.type, answer.error.param], ['invalid_request_error', param], answer.error.message);
      assert.match(answer.error.message, new RegExp(param === 'prompt' ? 'prompt token id' : param));
    }
    const off = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, n: 1, logprobs: false, presence_penalty: 0, logit_bias: {}, response_format: { type: 'text' }, tool_choice: 'none', store: false });
    assert.equal(off.status, 200, 'fields set to "off" are accepted');
    const on = await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, response_format: { type: 'json_object' } });
    assert.equal(on.status, 400);
    assert.equal(((await on.json()) as OpenAiError).error.param, 'response_format');
    const extras = { prompt: reference.prompts[0], max_tokens: 6, temperature: 0, top_k: 5, ignore_eos: true, stop_token_ids: [], seed: 3, user: 'alice', safety_identifier: 'h-1' };
    const accepted = await post('/v1/completions', extras);
    const body = (await accepted.json()) as Completion;
    assert.equal(accepted.status, 200, JSON.stringify(body));
    assert.equal(body.usage.completion_tokens, 6, 'ignore_eos ran past any end-of-text');
  });

  test('OPTIONS on every route (and *) is 204 with Allow; an allowed Origin gets the preflight headers', async () => {
    for (const route of HttpGateway.routes()) {
      const [method, path] = route.split(' ') as [string, string];
      const res = await fetch(`${http}${path.replace('{model}', MODEL)}`, { method: 'OPTIONS' });
      assert.equal(res.status, 204, route);
      assert.equal(res.headers.get('allow'), `${method}, OPTIONS`, route);
    }
    const server = await fetch(`${http}/v1/models/${MODEL}`, { method: 'OPTIONS', headers: { origin: ALLOWED_ORIGIN, 'access-control-request-method': 'GET' } });
    assert.equal(server.status, 204);
    assert.equal(server.headers.get('access-control-allow-origin'), ALLOWED_ORIGIN);
    assert.equal(server.headers.get('access-control-allow-methods'), 'GET, OPTIONS');
    assert.match(String(server.headers.get('access-control-expose-headers')), /x-request-id/);
    const star = await rawRequest(http, 'OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
    assert.match(star, /^HTTP\/1\.1 204 /);
    assert.match(star, /\r\nallow: GET, POST, OPTIONS\r\n/i);
    assert.equal((await fetch(`${http}/nowhere`, { method: 'OPTIONS' })).status, 404);
  });

  test('x-request-id: echoed when sane, else fresh, on every answer; a failed request logs it', async () => {
    const given = { 'x-request-id': 'client-req-42' };
    const answers = [
      await fetch(`${http}/v1/models`, { headers: given }),
      await post('/v1/completions', { prompt: reference.prompts[0], max_tokens: 2 }, given),
      await post('/v1/completions', { prompt: 'x', bogus: 1 }, given),
      await fetch(`${http}/v1/models/other`, { headers: given }),
      await fetch(`${http}/v1/completions`, { headers: given }), // 405
      await fetch(`${http}/v1/models`, { method: 'OPTIONS', headers: given }),
    ];
    assert.deepEqual(answers.map((a) => a.status), [200, 200, 400, 404, 405, 204]);
    for (const a of answers) assert.equal(a.headers.get('x-request-id'), 'client-req-42', `status ${a.status}`);
    const fresh = await Promise.all([fetch(`${http}/live`), fetch(`${http}/live`), fetch(`${http}/live`, { headers: { 'x-request-id': 'x'.repeat(200) } }), fetch(`${http}/live`, { headers: { 'x-request-id': 'has space' } })]);
    const ids = fresh.map((a) => a.headers.get('x-request-id') ?? '');
    for (const id of ids) assert.match(id, /^[0-9a-f-]{36}$/, 'a fresh UUID');
    assert.equal(new Set(ids).size, 4);
    const tooLarge = await rawRequest(http, `GET /live HTTP/1.1\r\nHost: localhost\r\nx-big: ${'a'.repeat(20_000)}\r\n\r\n`);
    assert.match(tooLarge, /^HTTP\/1\.1 431 [^]*\r\nx-request-id: [0-9a-f-]{36}\r\n/, 'a parser refusal carries one too');

    // a request that fails on the server's side (its deadline passes while the worker is stopped) is logged with its id
    const worker = ((await (await fetch(`${http}/health`)).json()) as { ranks: { pid: number }[] }).ranks[0]!.pid;
    process.kill(worker, 'SIGSTOP');
    try {
      const failed = await post('/v1/completions', { prompt: reference.prompts[0], max_tokens: 4 }, { 'x-request-id': 'slow-req-7' });
      const { error } = (await failed.json()) as OpenAiError;
      assert.equal(failed.status, 504, error.message);
      assert.equal(failed.headers.get('x-request-id'), 'slow-req-7');
    } finally {
      process.kill(worker, 'SIGCONT');
    }
    assert.match(chat.server.stderr(), /weft: HTTP 504 POST \/v1\/completions x-request-id=slow-req-7: WEFT_TIMEOUT/);
  });
});

/** Send `head` on a raw socket and return everything read until the server closes (fetch cannot send `OPTIONS *`). */
async function rawRequest(http: string, head: string): Promise<string> {
  const { connect } = await import('node:net');
  const { hostname, port } = new URL(http);
  return new Promise((resolve, reject) => {
    const socket = connect(Number(port), hostname);
    let answer = '';
    socket.setEncoding('utf8').on('data', (d: string) => {
      answer += d;
      if (/\r\n\r\n/.test(answer) && /^HTTP\/1\.1 204 /.test(answer)) socket.end(); // a 204 has no body
    });
    socket.on('error', (err) => (answer ? resolve(answer) : reject(err)));
    socket.on('close', () => resolve(answer));
    socket.write(head);
  });
}
