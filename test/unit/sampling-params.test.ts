import { test } from 'node:test';
import assert from 'node:assert/strict';
import { contextName, parseSamplingParams, validatePromptIds, type SamplingParams } from '../../coordinator/sampling-params.ts';
import { isWeftError } from '../../core/errors.ts';

const limits = { maxContext: 512, promptLength: 10, vocabSize: 512 };

/** asserts WEFT_BAD_REQUEST and that the message contains every fragment */
function rejects(fn: () => unknown, ...fragments: string[]): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(isWeftError(e), `not a WeftError: ${String(e)}`);
    assert.equal(e.code, 'WEFT_BAD_REQUEST');
    for (const f of fragments) assert.ok(e.message.includes(f), `message ${JSON.stringify(e.message)} lacks ${JSON.stringify(f)}`);
    return true;
  });
}

const parse = (input: unknown, l = limits): SamplingParams => parseSamplingParams(input, l);

test('defaults: greedy, top-k off, top-p 1, 16 new tokens, random 32-bit seed', () => {
  for (const input of [undefined, null, {}]) {
    const p = parse(input);
    assert.deepEqual({ ...p, seed: 0 }, { temperature: 0, topK: 0, topP: 1, seed: 0, maxNewTokens: 16, ignoreEos: false, stopTokenIds: [] });
    assert.ok(Number.isInteger(p.seed) && p.seed >= 0 && p.seed < 2 ** 32);
  }
  const seeds = new Set(Array.from({ length: 20 }, () => parse({}).seed));
  assert.ok(seeds.size > 1, 'absent seeds are random');
  // null means "use the default"
  assert.equal(parse({ temperature: null, top_k: null }).temperature, 0);
  // the stop list is a fresh array each time
  const a = parse({});
  a.stopTokenIds.push(3);
  assert.deepEqual(parse({}).stopTokenIds, []);
});

test('all fields, camelCase and snake_case', () => {
  const want: SamplingParams = { temperature: 0.7, topK: 40, topP: 0.9, seed: 1234, maxNewTokens: 100, ignoreEos: true, stopTokenIds: [5, 511] };
  assert.deepEqual(parse({ ...want }), want);
  assert.deepEqual(
    parse({ temperature: 0.7, top_k: 40, top_p: 0.9, seed: 1234, max_new_tokens: 100, ignore_eos: true, stop_token_ids: [5, 511] }),
    want,
  );
  rejects(() => parse({ maxNewTokens: 4, max_new_tokens: 4 }), 'maxNewTokens', 'max_new_tokens');
});

test('input must be an object', () => {
  rejects(() => parse(3), 'must be an object', '3');
  rejects(() => parse([1]), 'must be an object');
  rejects(() => parse('greedy'), 'must be an object', 'greedy');
});

test('unknown keys are rejected', () => {
  assert.equal(parse({ top_p: 0.5 }).topP, 0.5);
  rejects(() => parse({ temprature: 1 }), '"temprature"');
  rejects(() => parse({ topK: 1, min_p: 0.1 }), '"min_p"');
});

test('temperature: finite, >= 0, <= 100', () => {
  assert.equal(parse({ temperature: 0 }).temperature, 0);
  assert.equal(parse({ temperature: 1.5 }).temperature, 1.5);
  assert.equal(parse({ temperature: 100 }).temperature, 100);
  rejects(() => parse({ temperature: -0.1 }), 'temperature', '-0.1');
  rejects(() => parse({ temperature: 100.5 }), 'temperature', '100.5');
  rejects(() => parse({ temperature: Number.NaN }), 'temperature', 'NaN');
  rejects(() => parse({ temperature: Number.POSITIVE_INFINITY }), 'temperature', 'Infinity');
  rejects(() => parse({ temperature: '0.5' }), 'temperature', '"0.5"');
});

test('topK: integer in [0, vocabSize]', () => {
  assert.equal(parse({ topK: 0 }).topK, 0);
  assert.equal(parse({ topK: 512 }).topK, 512);
  rejects(() => parse({ topK: 513 }), 'topK', '513', '512');
  rejects(() => parse({ top_k: -1 }), 'top_k', '-1');
  rejects(() => parse({ topK: 2.5 }), 'topK', '2.5');
});

test('topP: in (0, 1]', () => {
  assert.equal(parse({ topP: 1 }).topP, 1);
  assert.equal(parse({ topP: 1e-6 }).topP, 1e-6);
  rejects(() => parse({ topP: 0 }), 'topP', '0');
  rejects(() => parse({ top_p: 1.01 }), 'top_p', '1.01');
  rejects(() => parse({ topP: -0.5 }), 'topP', '-0.5');
});

test('seed: integer in [0, 2^32)', () => {
  assert.equal(parse({ seed: 0 }).seed, 0);
  assert.equal(parse({ seed: 2 ** 32 - 1 }).seed, 2 ** 32 - 1);
  rejects(() => parse({ seed: 2 ** 32 }), 'seed', '4294967296');
  rejects(() => parse({ seed: -1 }), 'seed', '-1');
  rejects(() => parse({ seed: 1.5 }), 'seed', '1.5');
  rejects(() => parse({ seed: '7' }), 'seed', '"7"');
});

test('maxNewTokens: integer >= 1', () => {
  assert.equal(parse({ maxNewTokens: 1 }).maxNewTokens, 1);
  rejects(() => parse({ maxNewTokens: 0 }), 'maxNewTokens', '0');
  rejects(() => parse({ max_new_tokens: 3.5 }), 'max_new_tokens', '3.5');
});

test('ignoreEos: boolean', () => {
  assert.equal(parse({ ignoreEos: true }).ignoreEos, true);
  rejects(() => parse({ ignore_eos: 'yes' }), 'ignore_eos', '"yes"');
});

test('promptLength >= 1', () => {
  assert.equal(parse({}, { ...limits, promptLength: 1 }).maxNewTokens, 16);
  rejects(() => parse({}, { ...limits, promptLength: 0 }), 'prompt', 'at least one token');
});

test('promptLength + maxNewTokens <= maxContext', () => {
  assert.equal(parse({ maxNewTokens: 502 }).maxNewTokens, 502); // 10 + 502 = 512
  rejects(() => parse({ maxNewTokens: 503 }), "prompt of 10 tokens plus maxNewTokens 503 exceeds the model's context of 512 tokens");
  rejects(
    () => parse({}, { ...limits, promptLength: 600 }),
    "prompt of 600 tokens plus maxNewTokens 16 exceeds the model's context of 512 tokens",
  );
  rejects(
    () => parse({ max_new_tokens: 16 }, { ...limits, promptLength: 600 }),
    "prompt of 600 tokens plus max_new_tokens 16 exceeds the model's context of 512 tokens",
  );
});

test("a refusal about one field carries its name as the caller spelled it in param; max_tokens and max_completion_tokens spell maxNewTokens", () => {
  const paramOf = (fn: () => unknown): string | undefined => {
    try {
      fn();
    } catch (e) {
      assert.ok(isWeftError(e));
      return e.param;
    }
    assert.fail('not refused');
  };
  assert.equal(paramOf(() => parse({ top_p: 0 })), 'top_p');
  assert.equal(paramOf(() => parse({ topP: 2 })), 'topP');
  assert.equal(paramOf(() => parse({ top_k: 513 })), 'top_k');
  assert.equal(paramOf(() => parse({ stop_token_ids: [512] })), 'stop_token_ids');
  assert.equal(paramOf(() => parse({}, { ...limits, promptLength: 0 })), 'prompt');
  assert.equal(paramOf(() => validatePromptIds([1, 512], 512, 64)), 'prompt');
  assert.equal(parse({ max_tokens: 7 }).maxNewTokens, 7);
  assert.equal(parse({ max_completion_tokens: 9 }).maxNewTokens, 9);
  rejects(() => parse({ max_tokens: 503 }), 'prompt of 10 tokens plus max_tokens 503 exceeds');
  assert.equal(paramOf(() => parse({ max_completion_tokens: 503 })), 'max_completion_tokens');
  rejects(() => parse({ max_tokens: 5, maxNewTokens: 5 }), 'max_tokens and maxNewTokens are the same field');
});

test('a context the --max-context cap limits is named as that cap', () => {
  const capped = { ...limits, maxContext: 64, contextName: contextName(64, true) };
  rejects(() => parse({}, { ...capped, promptLength: 60 }), 'prompt of 60 tokens plus maxNewTokens 16 exceeds the --max-context cap of 64 tokens');
  rejects(() => validatePromptIds(new Array<number>(65).fill(3), 512, 64, contextName(64, true)), 'prompt of 65 tokens exceeds the --max-context cap of 64 tokens');
  rejects(() => validatePromptIds(new Array<number>(65).fill(3), 512, 64), "prompt of 65 tokens exceeds the model's context of 64 tokens");
});

test('stopTokenIds: integers in [0, vocabSize)', () => {
  assert.deepEqual(parse({ stopTokenIds: [0, 511] }).stopTokenIds, [0, 511]);
  rejects(() => parse({ stopTokenIds: [0, 512] }), 'stopTokenIds[1]', '512');
  rejects(() => parse({ stop_token_ids: [3, -1] }), 'stop_token_ids[1]', '-1');
  rejects(() => parse({ stopTokenIds: [1.5] }), 'stopTokenIds[0]', '1.5');
  rejects(() => parse({ stopTokenIds: 7 }), 'stopTokenIds', '7');
});

test('logitBias: an object from token id to a bias in [-100, 100], at most 300 ids in the vocabulary; pairs ascending by id', () => {
  assert.deepEqual(parse({ logit_bias: { '511': -100, '0': 2.5, '7': 100 } }).logitBias, [[0, 2.5], [7, 100], [511, -100]]);
  assert.equal(parse({ logitBias: {} }).logitBias, undefined, 'an empty bias is none');
  assert.equal(parse({}).logitBias, undefined);
  rejects(() => parse({ logit_bias: { '5': 100.5 } }), 'logit_bias["5"] must be in [-100, 100]', '100.5');
  rejects(() => parse({ logitBias: { abc: 1 } }), 'logitBias["abc"] must be keyed by a token id');
  rejects(() => parse({ logitBias: { '-3': 1 } }), 'logitBias["-3"] must be keyed by a token id');
  rejects(() => parse({ logitBias: { '07': 1 } }), 'logitBias["07"] must be keyed by a token id');
  rejects(() => parse({ logit_bias: { '512': 1 } }), 'logit_bias["512"] must be keyed by a token id in [0, 512)');
  rejects(() => parse({ logit_bias: [[1, 2]] }), 'logit_bias must be an object from token id to bias');
  rejects(() => parse({ logit_bias: Object.fromEntries(Array.from({ length: 301 }, (_, i) => [String(i), 1])) }), 'logit_bias must hold at most 300 token ids');
  assert.throws(() => parse({ logit_bias: { '512': 1 } }), (e: unknown) => isWeftError(e) && e.param === 'logit_bias');
});

test('validatePromptIds: non-empty integer array in range, at most maxContext long', () => {
  assert.deepEqual(validatePromptIds([0, 5, 511], 512, 512), [0, 5, 511]);
  const input = [1, 2];
  const out = validatePromptIds(input, 512, 512);
  assert.notEqual(out, input, 'returns a copy');
  assert.equal(validatePromptIds(new Array<number>(512).fill(3), 512, 512).length, 512);
  rejects(() => validatePromptIds([], 512, 512), 'empty');
  rejects(() => validatePromptIds('1 2 3', 512, 512), 'array', '"1 2 3"');
  rejects(() => validatePromptIds(new Array<number>(513).fill(3), 512, 512), '513', '512');
  rejects(() => validatePromptIds([1, 2, 512, -1], 512, 512), 'index 2', '512');
  rejects(() => validatePromptIds([1, -1], 512, 512), 'index 1', '-1');
  rejects(() => validatePromptIds([1, 2, 3.5], 512, 512), 'index 2', '3.5');
  rejects(() => validatePromptIds([1, '2'], 512, 512), 'index 1', '"2"');
  // eslint-disable-next-line no-sparse-arrays
  rejects(() => validatePromptIds([1, , 3], 512, 512), 'index 1');
});
