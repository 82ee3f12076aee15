/**
 * Log-probs through `weft serve` and the official `openai` npm client: completions `logprobs` (greedy, checked
 * against `weft score` of the same tokens over RPC and against transformers' log-probs in the fixture), `echo`
 * (the prompt's log-probs, again against transformers), `n` with log-probs, streamed and not, chat `logprobs` +
 * `top_logprobs`, `best_of` (the answer is the best of the n samples by cumulative log-prob), refusals naming
 * their field, and the RPC surface (streamed token log-probs, score with alternatives). Skips without `openai`.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { WeftClient } from '../../coordinator/api/client.ts';
import { readReference, referenceLogprobs } from '../helpers/fixtures.ts';
import { MODEL, startChatServer, type ChatServer } from './openai-helpers.ts';

const reference = readReference('llama-tiny');

interface Legacy {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}
interface ChatLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}
interface TextChoice {
  index: number;
  text: string;
  logprobs: Legacy | null;
}
type Params = Record<string, unknown>;
interface Client {
  completions: { create(body: Params): Promise<{ choices: TextChoice[] } & AsyncIterable<{ choices: TextChoice[] }>> };
  chat: { completions: { create(body: Params): Promise<{ choices: { message: { content: string }; logprobs: { content: ChatLogprob[] } | null }[]; usage: { completion_tokens: number } }> } };
}
interface ApiError extends Error {
  status?: number;
  param?: string | null;
}
interface OpenAiModule {
  default: new (options: { baseURL: string; apiKey: string; maxRetries: number; timeout: number }) => Client;
}

const specifier = 'openai'; // a variable: the module may be absent, and tsc must not look for it
const openai = (await import(specifier).catch(() => null)) as OpenAiModule | null;
const skip = openai === null ? 'the openai package is not installed (npm install --save-dev openai)' : false;

const close = (got: number, want: number, tol: number, what: string): void => assert.ok(Math.abs(got - want) <= tol, `${what}: ${got} vs ${want}`);
const broken = (token: string): boolean => token.includes('\uFFFD');
const sum = (values: readonly (number | null)[]): number => values.reduce<number>((s, v) => s + (v ?? 0), 0);

describe('log-probs through weft serve and the openai npm client', { skip }, () => {
  let chat: ChatServer;
  let client: Client;
  let rpc: WeftClient;
  before(async () => {
    chat = await startChatServer();
    client = new openai!.default({ baseURL: `${chat.server.http}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 30_000 });
    rpc = await WeftClient.connect({ endpoint: chat.server.rpc });
  });
  after(async () => {
    await rpc?.close();
    const { code } = await chat.stop();
    assert.equal(code, 0, chat.server.stderr());
  });

  test('completions logprobs: greedy tokens rated as weft score and transformers rate them; streamed the same', async () => {
    const prompt = reference.prompts[1]!;
    const steps = 5;
    const body = { model: MODEL, prompt, max_tokens: steps, temperature: 0, ignore_eos: true, logprobs: 3 };
    const answer = (await client.completions.create(body)).choices[0]!;
    const lp = answer.logprobs!;
    assert.equal(lp.tokens.length, steps);
    // a token that is part of a UTF-8 character decodes alone to U+FFFD: then its text is not a piece of the answer's
    if (!lp.tokens.some(broken)) assert.equal(lp.tokens.join(''), answer.text);
    assert.deepEqual(lp.text_offset, lp.tokens.map((_, i) => lp.tokens.slice(0, i).join('').length));
    // weft's greedy tokens are transformers' (the fixture), so weft score of prompt + them is an outside check
    const drawn = reference.greedy[1]!.slice(0, steps);
    const scored = await rpc.score([...prompt, ...drawn]);
    const hf = await referenceLogprobs('llama-tiny', 1); // [prompt position][vocab]: the first drawn token only
    lp.token_logprobs.forEach((value, i) => close(value!, scored.logprobs[prompt.length + i]!, 1e-4, `token ${i} vs weft score`));
    close(lp.token_logprobs[0]!, hf[prompt.length - 1]![drawn[0]!]!, 1e-3, 'token 0 vs transformers');
    lp.top_logprobs.forEach((top, i) => {
      const values = Object.values(top!);
      assert.ok(values.length >= 1 && values.length <= 3, `token ${i}: ${values.length} alternatives`);
      // greedy: the drawn token is the most likely one
      close(Math.max(...values), lp.token_logprobs[i]!, 1e-6, `token ${i}: the best alternative is the token`);
      assert.ok(values.reduce((s, v) => s + Math.exp(v), 0) <= 1 + 1e-5);
    });
    const chunks: TextChoice[] = [];
    for await (const chunk of await client.completions.create({ ...body, stream: true })) chunks.push(...chunk.choices);
    const streamed = chunks.filter((c) => c.logprobs).flatMap((c) => c.logprobs!.token_logprobs);
    assert.deepEqual(streamed, lp.token_logprobs);
    assert.deepEqual(chunks.filter((c) => c.logprobs).flatMap((c) => c.logprobs!.text_offset), lp.text_offset);
  });

  test('echo: the prompt comes back first, its log-probs those transformers gives (the first token null)', async () => {
    const prompt = reference.prompts[0]!;
    const answer = (await client.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0, ignore_eos: true, echo: true, logprobs: 1 })).choices[0]!;
    const lp = answer.logprobs!;
    assert.equal(lp.tokens.length, prompt.length + 2);
    assert.equal(lp.token_logprobs[0], null);
    assert.equal(lp.top_logprobs[0], null);
    const hf = await referenceLogprobs('llama-tiny', 0);
    for (let i = 1; i < prompt.length; i++) close(lp.token_logprobs[i]!, hf[i - 1]![prompt[i]!]!, 1e-3, `prompt token ${i} vs transformers`);
    const scored = await rpc.score(prompt);
    for (let i = 1; i < prompt.length; i++) close(lp.token_logprobs[i]!, scored.logprobs[i]!, 1e-5, `prompt token ${i} vs weft score`);
    // a score's own attention travels over RPC: dense is this cluster's, SparQ is refused by name
    assert.deepEqual((await rpc.score(prompt, { attention: { mode: 'dense' } })).logprobs, scored.logprobs);
    await assert.rejects(rpc.score(prompt, { attention: { mode: 'sparq' } }), /score: attention: this cluster attends densely/);
    const plain = (await client.completions.create({ model: MODEL, prompt, max_tokens: 2, temperature: 0, ignore_eos: true })).choices[0]!;
    assert.ok(answer.text.endsWith(plain.text) && answer.text.length > plain.text.length, `echoed: ${JSON.stringify(answer.text)}`);
  });

  test('n with logprobs: every choice rated; best_of answers the n = 3 sample of highest cumulative log-prob', async () => {
    const body = { model: MODEL, prompt: reference.prompts[2], max_tokens: 6, temperature: 1, ignore_eos: true, seed: 11, logprobs: 0 };
    const three = (await client.completions.create({ ...body, n: 3 })).choices;
    assert.deepEqual(three.map((c) => c.index), [0, 1, 2]);
    for (const c of three) {
      assert.equal(c.logprobs!.token_logprobs.length, 6);
      assert.ok(c.logprobs!.token_logprobs.every((v) => v! <= 0));
    }
    assert.ok(new Set(three.map((c) => c.text)).size > 1, 'the samples differ');
    const best = [...three].sort((a, b) => sum(b.logprobs!.token_logprobs) - sum(a.logprobs!.token_logprobs))[0]!;
    const { logprobs: _, ...unrated } = body;
    const chosen = (await client.completions.create({ ...unrated, n: 1, best_of: 3 })).choices;
    assert.equal(chosen.length, 1);
    assert.equal(chosen[0]!.index, 0);
    assert.equal(chosen[0]!.text, best.text);
    assert.equal(chosen[0]!.logprobs, null, 'best_of ranks by log-probs without answering them');
  });

  test('chat logprobs and top_logprobs: one entry per token, the greedy token the best of its alternatives', async () => {
    const answer = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hello' }], max_tokens: 4, temperature: 0, ignore_eos: true, logprobs: true, top_logprobs: 2 });
    const content = answer.choices[0]!.logprobs!.content;
    assert.equal(content.length, answer.usage.completion_tokens);
    if (!content.some((c) => broken(c.token))) assert.equal(content.map((c) => c.token).join(''), answer.choices[0]!.message.content);
    for (const entry of content) {
      assert.equal(entry.top_logprobs.length, 2);
      close(entry.top_logprobs[0]!.logprob, entry.logprob, 1e-6, 'greedy token vs its best alternative');
      assert.ok(entry.top_logprobs[0]!.logprob >= entry.top_logprobs[1]!.logprob);
      assert.deepEqual(entry.bytes, [...Buffer.from(entry.token, 'utf8')]);
    }
    const off = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hello' }], max_tokens: 2, logprobs: false });
    assert.equal(off.choices[0]!.logprobs, null);
  });

  test('bad log-prob values are a 400 naming the field', async () => {
    const text = { model: MODEL, prompt: 'hi', max_tokens: 1 };
    const talk = { model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: 1 };
    const cases: [() => Promise<unknown>, string][] = [
      [() => client.completions.create({ ...text, logprobs: 6 }), 'logprobs'],
      [() => client.completions.create({ ...text, logprobs: true }), 'logprobs'],
      [() => client.completions.create({ ...text, n: 2, best_of: 1 }), 'best_of'],
      [() => client.completions.create({ ...text, best_of: 2, stream: true }), 'best_of'],
      [() => client.chat.completions.create({ ...talk, logprobs: true, top_logprobs: 21 }), 'top_logprobs'],
      [() => client.chat.completions.create({ ...talk, top_logprobs: 2 }), 'top_logprobs'],
      [() => client.chat.completions.create({ ...talk, logprobs: 2 }), 'logprobs'],
    ];
    for (const [call, param] of cases) await assert.rejects(call(), (err: ApiError) => err.status === 400 && err.param === param && err.message.includes(param), param);
  });

  test('RPC: streamed tokens carry log-probs and alternatives; score answers alternatives too', async () => {
    const prompt = reference.prompts[0]!;
    const events = [];
    for await (const event of rpc.generate({ promptIds: prompt, sampling: { maxNewTokens: 3, temperature: 0, ignoreEos: true, logprobs: 2 } })) events.push(event);
    const tokens = events.filter((e) => e.type === 'token');
    assert.equal(tokens.length, 3);
    const done = events.at(-1)!;
    assert.equal(done.type, 'done');
    if (done.type !== 'done') return;
    assert.deepEqual(done.logprobs, tokens.map((t) => t.logprobs));
    const scored = await rpc.score([...prompt, ...done.tokens], { topLogprobs: 2 });
    assert.equal(scored.top![0], null);
    tokens.forEach((t, i) => {
      const want = scored.top![prompt.length + i]!;
      close(t.logprobs!.logprob, want.logprob, 1e-4, `token ${i}`);
      assert.deepEqual(t.logprobs!.top.map((a) => a.token), want.top.map((a) => a.token));
      assert.equal(t.logprobs!.top[0]!.token, t.token, 'greedy: the token is the most likely');
    });
    const samples = await rpc.generateN({ promptIds: prompt, sampling: { maxNewTokens: 4, temperature: 1, seed: 5, ignoreEos: true, logprobs: 0 } }, 2);
    assert.equal(samples.length, 2);
    assert.notDeepEqual(samples[0]!.tokens, samples[1]!.tokens);
    assert.ok(samples.every((s) => s.logprobs!.length === 4 && s.logprobs!.every((l) => l.top.length === 0)));
  });
});
