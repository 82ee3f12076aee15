/**
 * reliability.md G13, the config.json half (safetensors-fuzz.test.ts is the weights' half): 1,000 mutated
 * config.json files (fields set to negative, fractional, huge, non-numeric or missing values, sizes that do not
 * divide, byte flips and non-UTF-8 bytes) each either read as a spec whose sizes are positive safe integers, or fail
 * with WEFT_BAD_MODEL / WEFT_UNSUPPORTED_MODEL naming the file. Nothing else may escape (no TypeError, RangeError).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readModelSpec } from '../../core/model-spec.ts';
import { isWeftError } from '../../core/errors.ts';
import { FIXTURES } from '../helpers/fixtures.ts';
import { prng } from '../helpers/random.ts';

const original = readFileSync(join(FIXTURES, 'llama-tiny', 'config.json'));
const FIELDS = ['hidden_size', 'num_attention_heads', 'num_key_value_heads', 'head_dim', 'intermediate_size', 'num_hidden_layers', 'vocab_size', 'max_position_embeddings', 'rms_norm_eps', 'rope_theta', 'rope_scaling', 'architectures', 'torch_dtype', 'tie_word_embeddings', 'sliding_window', 'model_type'];
const VALUES: unknown[] = [-1, 0, 1, 3, 1.5, 2 ** 31, 2 ** 53, 2 ** 60, 1e308, -1e308, '64', '', null, true, [], {}, [64], { type: 'linear', factor: -2 }, ['NopeForCausalLM'], 'float64'];

function structural(rand: () => number): Buffer {
  const config = JSON.parse(original.toString('utf8')) as Record<string, unknown>;
  const edits = 1 + Math.floor(rand() * 3);
  for (let i = 0; i < edits; i++) {
    const field = FIELDS[Math.floor(rand() * FIELDS.length)]!;
    if (rand() < 0.15) delete config[field];
    else config[field] = VALUES[Math.floor(rand() * VALUES.length)];
  }
  return Buffer.from(JSON.stringify(config));
}

function byteFlips(rand: () => number): Buffer {
  const bytes = Buffer.from(original);
  const flips = 1 + Math.floor(rand() * 4);
  for (let i = 0; i < flips; i++) bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
  return bytes;
}

test('G13: 1,000 mutated config.json files: a spec of positive safe-integer sizes, or WEFT_BAD_MODEL / WEFT_UNSUPPORTED_MODEL naming the file', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'weft-config-fuzz-'));
  const file = join(dir, 'config.json');
  const rand = prng(13);
  let accepted = 0;
  try {
    for (let i = 0; i < 1000; i++) {
      const bytes = i % 4 === 3 ? byteFlips(rand) : structural(rand);
      writeFileSync(file, bytes);
      try {
        const spec = readModelSpec(dir);
        for (const size of [spec.hidden, spec.nHeads, spec.nKvHeads, spec.headDim, spec.ffnDim, spec.nLayers, spec.vocabSize, spec.maxContext])
          assert.ok(Number.isSafeInteger(size) && size > 0, `mutation ${i} read as a spec with a size of ${size}: ${bytes.toString('utf8')}`);
        accepted++;
      } catch (err) {
        if (err instanceof assert.AssertionError) throw err;
        assert.ok(isWeftError(err) && (err.code === 'WEFT_BAD_MODEL' || err.code === 'WEFT_UNSUPPORTED_MODEL'), `mutation ${i}: ${(err as Error).stack}\n${bytes.toString('utf8')}`);
        assert.ok(err.message.includes(file), `mutation ${i}'s error names the file: ${err.message}`);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  t.diagnostic(`G13 measured: ${accepted} of 1,000 mutated config.json files read as a valid spec, ${1000 - accepted} refused naming the file`);
  assert.ok(accepted < 900, 'most mutations are refused');
});
