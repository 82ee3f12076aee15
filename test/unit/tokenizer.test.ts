import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, readdirSync, writeFileSync, copyFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadTokenizer, MIN_CHARS_PER_TOKEN, type WeftTokenizer } from '../../coordinator/tokenizer.ts';
import { isWeftError } from '../../core/errors.ts';

const fixturesDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'hf-tiny');
const models = readdirSync(fixturesDir, { withFileTypes: true })
  .filter((e) => e.isDirectory())
  .map((e) => e.name)
  .sort();

interface Reference {
  text: { text: string; ids: number[] }[];
}

function streamAll(tok: WeftTokenizer, ids: readonly number[], skipSpecial?: boolean): string[] {
  const dec = tok.createStreamDecoder(skipSpecial === undefined ? undefined : { skipSpecial });
  const pieces = ids.map((id) => dec.push(id));
  pieces.push(dec.flush());
  return pieces;
}

function tempModel(files: Record<string, unknown>, copyFrom?: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'weft-tok-'));
  if (copyFrom) for (const f of ['tokenizer.json', 'tokenizer_config.json', 'config.json']) copyFileSync(join(copyFrom, f), join(dir, f));
  for (const [name, content] of Object.entries(files))
    writeFileSync(join(dir, name), typeof content === 'string' ? content : JSON.stringify(content));
  return dir;
}

test('fixture models exist', () => {
  assert.ok(models.length >= 4, `expected the hf-tiny fixtures, found ${models.join(', ')}`);
});

for (const model of models) {
  const dir = join(fixturesDir, model);
  const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8')) as Reference;

  test(`${model}: encode (no BOS) matches Hugging Face ids; decode round-trips`, () => {
    const tok = loadTokenizer(dir);
    assert.ok(ref.text.length > 0);
    for (const { text, ids } of ref.text) {
      assert.deepEqual(tok.encode(text, { addBos: false }), ids, `encode ${JSON.stringify(text)}`);
      assert.equal(tok.decode(ids), text, `decode of ${JSON.stringify(text)}`);
      assert.equal(tok.decode(ids, { skipSpecial: false }), text);
    }
  });

  test(`${model}: BOS / EOS / vocabulary`, () => {
    const tok = loadTokenizer(dir);
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as { bos_token_id: number; eos_token_id: number; vocab_size: number };
    assert.equal(tok.bosTokenId, cfg.bos_token_id);
    assert.deepEqual(tok.eosTokenIds, [cfg.eos_token_id]);
    assert.equal(tok.vocabSize, cfg.vocab_size);
    const first = ref.text[0]!;
    assert.deepEqual(tok.encode(first.text), [cfg.bos_token_id, ...first.ids], 'BOS prepended by default');
    assert.deepEqual(tok.encode(first.text, { addBos: true }), [cfg.bos_token_id, ...first.ids]);
    assert.deepEqual(tok.encode(''), [cfg.bos_token_id]);
    assert.deepEqual(tok.encode('', { addBos: false }), []);
    // special tokens are dropped by default, kept on request
    const withSpecial = [cfg.bos_token_id, ...first.ids, cfg.eos_token_id];
    assert.equal(tok.decode(withSpecial), first.text);
    assert.equal(tok.decode(withSpecial, { skipSpecial: false }), `<s>${first.text}</s>`);
    assert.equal(tok.decode([]), '');
    // a literal special token in the text is the special token, as in HF
    assert.deepEqual(tok.encode('</s>', { addBos: false }), [cfg.eos_token_id]);
  });

  test(`${model}: maxTextChars bounds what a number of tokens can spell (the prompt cap before tokenizing)`, () => {
    const tok = loadTokenizer(dir);
    assert.ok(tok.charsPerToken >= MIN_CHARS_PER_TOKEN);
    assert.equal(tok.maxTextChars(512), 512 * tok.charsPerToken);
    // the worst texts for the bound: each of the longest tokens repeated, and runs of one character
    const spellings = Array.from({ length: tok.vocabSize }, (_, id) => tok.decode([id], { skipSpecial: false }));
    const longest = [...spellings].sort((a, b) => b.length - a.length).slice(0, 20);
    assert.ok(longest[0]!.length <= tok.charsPerToken, `longest token ${JSON.stringify(longest[0])}`);
    const texts = [...ref.text.map((r) => r.text), ...longest.map((t) => t.repeat(50)), ' '.repeat(5000), '\n'.repeat(5000), 'a'.repeat(5000), '🦙'.repeat(500)];
    for (const text of texts) {
      const ids = tok.encode(text, { addBos: false });
      assert.ok(text.length <= tok.maxTextChars(ids.length), `${JSON.stringify(text.slice(0, 40))}: ${text.length} characters in ${ids.length} tokens`);
    }
  });
}

const base = join(fixturesDir, 'llama-tiny');

test('stream decoder: a run of invalid UTF-8 is not held back without end (each push decodes a bounded tail)', () => {
  const tok = loadTokenizer(base);
  const lone = Array.from({ length: tok.vocabSize }, (_, id) => id).find((id) => tok.decode([id]) === '\uFFFD')!;
  assert.notEqual(lone, undefined, 'a token that is one byte of an incomplete UTF-8 sequence');
  const dec = tok.createStreamDecoder();
  const pieces = Array.from({ length: 100 }, () => dec.push(lone));
  let held = 0;
  for (const piece of pieces) {
    held = piece === '' ? held + 1 : 0;
    assert.ok(held <= 8, 'at most 8 ids held back');
  }
  assert.equal((pieces.join('') + dec.flush()).length, tok.decode(Array(100).fill(lone)).length);
});

test('stream decoder: multi-byte characters split across tokens concatenate to the full decode', () => {
  const tok = loadTokenizer(base);
  const text = 'naïve café — über 🦙🚀 emoji, 日本語 and ç\n  end';
  const ids = tok.encode(text, { addBos: false });
  assert.equal(tok.decode(ids), text);
  // the byte-level BPE must really split some characters across tokens, or the test proves nothing
  const single = ids.map((id) => tok.decode([id]));
  assert.ok(single.some((s) => s.includes('\uFFFD')), 'expected some tokens to hold partial UTF-8 sequences');
  const pieces = streamAll(tok, ids);
  assert.equal(pieces.join(''), text);
  for (const p of pieces) assert.ok(!p.includes('\uFFFD'), `piece ${JSON.stringify(p)} holds a replacement character`);
  // text is released as soon as it is final: the emoji's four bytes come out only at its last byte
  const emoji = tok.encode('🦙', { addBos: false });
  assert.ok(emoji.length > 1);
  const dec = tok.createStreamDecoder();
  const out = emoji.map((id) => dec.push(id));
  assert.deepEqual(out, [...emoji.slice(1).map(() => ''), '🦙']);
  assert.equal(dec.flush(), '');
});

test('stream decoder: special tokens, skipSpecial option, and flush of an incomplete sequence', () => {
  const tok = loadTokenizer(base);
  const ids = [0, ...tok.encode('Grüße 👋', { addBos: false }), 1];
  assert.equal(streamAll(tok, ids).join(''), tok.decode(ids));
  assert.equal(streamAll(tok, ids, false).join(''), tok.decode(ids, { skipSpecial: false }));
  assert.equal(streamAll(tok, ids, false).join(''), '<s>Grüße 👋</s>');
  // a truncated emoji: held back until flush, which gives what decode gives
  const partial = tok.encode('a🦙', { addBos: false }).slice(0, -1);
  const dec = tok.createStreamDecoder();
  const pushed = partial.map((id) => dec.push(id)).join('');
  assert.equal(pushed, 'a');
  const rest = dec.flush();
  assert.equal(pushed + rest, tok.decode(partial));
  assert.ok(rest.includes('\uFFFD'));
  // the decoder is reusable after flush
  assert.equal(dec.push(tok.encode('b', { addBos: false })[0]!), 'b');
});

test('stream decoder over a long mixed string, every prefix', () => {
  const tok = loadTokenizer(base);
  const text = 'Ünïcödé ✓ — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " ." , ok ?! don\'t  tabs\tand\nnewlines ';
  const ids = tok.encode(text, { addBos: false });
  for (let n = 1; n <= ids.length; n++) assert.equal(streamAll(tok, ids.slice(0, n)).join(''), tok.decode(ids.slice(0, n)));
  assert.equal(tok.decode(ids), text, 'no clean-up of tokenization spaces');
});

test('decode rejects ids outside the vocabulary', () => {
  const tok = loadTokenizer(base);
  assert.throws(() => tok.decode([5, 512]), (e) => isWeftError(e) && e.code === 'WEFT_BAD_REQUEST' && /512/.test(e.message) && /index 1/.test(e.message));
  assert.throws(() => tok.decode([-1]), (e) => isWeftError(e) && e.code === 'WEFT_BAD_REQUEST');
  assert.throws(() => tok.decode([1.5]), (e) => isWeftError(e) && e.code === 'WEFT_BAD_REQUEST');
});

test('missing or invalid tokenizer.json is WEFT_BAD_MODEL naming the path', () => {
  const empty = mkdtempSync(join(tmpdir(), 'weft-tok-'));
  try {
    assert.throws(() => loadTokenizer(empty), (e) => isWeftError(e) && e.code === 'WEFT_BAD_MODEL' && e.message.includes(join(empty, 'tokenizer.json')));
  } finally {
    rmSync(empty, { recursive: true });
  }
  for (const bad of ['{not json', '[]', JSON.stringify({ version: '1.0', added_tokens: [] }), JSON.stringify({ model: { type: 'Nope' }, added_tokens: [] })]) {
    const dir = tempModel({ 'tokenizer.json': bad });
    try {
      assert.throws(() => loadTokenizer(dir), (e) => isWeftError(e) && e.code === 'WEFT_BAD_MODEL' && e.message.includes(join(dir, 'tokenizer.json')), bad);
    } finally {
      rmSync(dir, { recursive: true });
    }
  }
});

test('BOS/EOS from tokenizer_config ({content}) and config lists; union of EOS; add_bos_token false; no BOS', () => {
  const dir = tempModel(
    {
      'tokenizer_config.json': { bos_token: { content: '<s>', special: true }, eos_token: { content: '</s>' }, add_bos_token: false },
      'config.json': { bos_token_id: 0, eos_token_id: [1, 7] },
      'generation_config.json': { eos_token_id: [9, 1] },
    },
    base,
  );
  try {
    const tok = loadTokenizer(dir);
    assert.equal(tok.bosTokenId, 0);
    assert.deepEqual(tok.eosTokenIds, [1, 7, 9]);
    assert.deepEqual(tok.encode('Hi'), tok.encode('Hi', { addBos: false }), 'add_bos_token false: no BOS by default');
    assert.equal(tok.encode('Hi', { addBos: true })[0], 0);
  } finally {
    rmSync(dir, { recursive: true });
  }

  const noBos = tempModel({ 'tokenizer_config.json': { eos_token: '</s>' }, 'config.json': { eos_token_id: 1 } }, base);
  try {
    const tok = loadTokenizer(noBos);
    assert.equal(tok.bosTokenId, null);
    assert.deepEqual(tok.eosTokenIds, [1]);
    assert.deepEqual(tok.encode('Hi'), tok.encode('Hi', { addBos: false }));
    assert.throws(() => tok.encode('Hi', { addBos: true }), (e) => isWeftError(e) && e.code === 'WEFT_BAD_REQUEST');
  } finally {
    rmSync(noBos, { recursive: true });
  }

  const unknownEos = tempModel({ 'tokenizer_config.json': { eos_token: '<|nope|>' } }, base);
  try {
    assert.throws(() => loadTokenizer(unknownEos), (e) => isWeftError(e) && e.code === 'WEFT_BAD_MODEL' && e.message.includes('<|nope|>'));
  } finally {
    rmSync(unknownEos, { recursive: true });
  }
});
