/**
 * The product benchmark's own machinery on the CPU: bench/make-checkpoint.py writes a directory weft loads (its
 * tokenizer has exactly the preset's vocabulary and round-trips text; its shapes are the preset's), and
 * bench/product.ts times the real `weft generate` and `weft serve` processes, writes its rows and leaves no process;
 * bench/serve-under-load.ts does the same with a long prompt sent while streams decode.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixtureDir, processesMentioning } from '../helpers/fixtures.ts';
import { loadTokenizer } from '../../coordinator/tokenizer.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { presetSpec } from '../../bench/presets.ts';

const hasNumpy = spawnSync('python3', ['-c', 'import numpy'], { stdio: 'ignore' }).status === 0;

describe('bench/product', () => {
  test('make-checkpoint.py --tiny: the preset\'s vocabulary, a round-tripping tokenizer, the preset\'s layout', { skip: !hasNumpy && 'python3 with numpy is not installed' }, () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-ckpt-'));
    try {
      const made = spawnSync('python3', ['bench/make-checkpoint.py', dir, '--preset', 'llama-3-8b', '--tiny', '--shard-gb', '0.01'], { encoding: 'utf8' });
      assert.equal(made.status, 0, made.stderr);
      const tokenizer = loadTokenizer(dir);
      assert.equal(tokenizer.vocabSize, 128256);
      assert.equal(tokenizer.bosTokenId, 128000);
      assert.deepEqual(tokenizer.eosTokenIds, [128001]);
      const text = 'The quick brown fox, 42 times. ü€';
      assert.equal(tokenizer.decode(tokenizer.encode(text)), text);
      assert.equal(tokenizer.decode([5000, 128001, 127999]), ' w5000 w127999');
      const tiny = { hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 128, num_hidden_layers: 2, head_dim: 16 };
      assert.deepEqual(readModelSpec(dir), presetSpec('llama-3-8b', tiny));
      assert.ok(JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8')).weight_map['lm_head.weight']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('make-checkpoint.py --max-positions: the context weft reads from it, a non-positive one refused', { skip: !hasNumpy && 'python3 with numpy is not installed' }, () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-ckpt-'));
    try {
      const made = spawnSync('python3', ['bench/make-checkpoint.py', dir, '--preset', 'llama-2-7b', '--tiny', '--max-positions', '32768'], { encoding: 'utf8' });
      assert.equal(made.status, 0, made.stderr);
      assert.equal(readModelSpec(dir).maxContext, 32768);
      const refused = spawnSync('python3', ['bench/make-checkpoint.py', dir, '--tiny', '--max-positions', '0'], { encoding: 'utf8' });
      assert.notEqual(refused.status, 0);
      assert.match(refused.stderr, /--max-positions must be positive \(got 0\)/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('product.ts on the CPU: generate and serve rows, the server stopped with nothing left', () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-product-'));
    try {
      const out = join(dir, 'rows.jsonl');
      const model = join(dir, 'llama-tiny'); // a path of this test alone, to look for processes by
      cpSync(fixtureDir('llama-tiny'), model, { recursive: true });
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'bench/product.ts', '--model', model, '--device', 'cpu', '--new-tokens', '8', '--concurrency', '2', '--bandwidth', '100', '--out', out], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(run.status, 0, run.stderr + run.stdout);
      assert.match(run.stdout, /serve: stopped, exit code 0, no process left/);
      const rows = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
      assert.deepEqual(rows.map((r) => [r.path, r.batch]), [['generate', 1], ['serve', 2]]);
      for (const row of rows) {
        assert.equal(row.model, 'llama-tiny');
        assert.ok((row.tokensPerS as number) > 0 && (row.ttftMs as number) > 0, JSON.stringify(row));
        assert.ok((row.floorMs as number) > 0, 'a floor at the given bandwidth');
        for (const key of ['date', 'gpu', 'commit', 'anchorTokensPerS']) assert.ok(key in row, `${key} in ${JSON.stringify(row)}`);
      }
      assert.deepEqual(processesMentioning(model), [], 'no weft process left');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('product.ts at scale (--serve-prompt-tokens): a prompt of its own per stream, TTFT p99 and the decode step\'s roofline in the row and the table', () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-product-scale-'));
    try {
      const out = join(dir, 'rows.jsonl');
      const model = join(dir, 'llama-tiny');
      cpSync(fixtureDir('llama-tiny'), model, { recursive: true });
      const args = ['--model', model, '--device', 'cpu', '--no-generate', '--serve-prompt-tokens', '24', '--new-tokens', '16', '--concurrency', '2,3', '--bandwidth', '100', '--tensor-tflops', '1', '--out', out];
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'bench/product.ts', ...args], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(run.status, 0, run.stderr + run.stdout);
      assert.match(run.stdout, /serving at scale: prompts of 24 tokens/);
      const rows = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, number>);
      assert.deepEqual(rows.map((r) => [r.path, r.batch, r.promptTokens]), [['serve', 2, 24], ['serve', 3, 24]]);
      for (const row of rows) {
        assert.ok(row.p99TtftMs! >= row.ttftMs!, JSON.stringify(row));
        assert.ok(row.weightBytes! > 0 && row.kvBytes! > 0 && row.flops! > 0, JSON.stringify(row));
        assert.equal(row.memoryFloorMs, ((row.weightBytes! + row.kvBytes!) / 100e9) * 1e3);
        assert.equal(row.computeFloorMs, (row.flops! / 1e12) * 1e3);
        assert.equal(row.floorMs, Math.max(row.memoryFloorMs!, row.computeFloorMs!));
      }
      assert.ok(rows[1]!.kvBytes! > rows[0]!.kvBytes! && rows[1]!.flops! > rows[0]!.flops!, 'a larger batch reads more KV and computes more');
      assert.deepEqual(processesMentioning(model), [], 'no weft process left');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('serve-under-load.ts on the CPU: a long prompt under decoding streams, its TTFT and the streams\' gaps in the row, the server stopped with nothing left', () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-under-load-'));
    try {
      const out = join(dir, 'rows.jsonl');
      const model = join(dir, 'llama-tiny');
      cpSync(fixtureDir('llama-tiny'), model, { recursive: true });
      // 400 prompt tokens in steps of 16: 25 mixed steps, each a token for every stream
      const args = ['--model', model, '--device', 'cpu', '--streams', '3', '--stream-prompt-tokens', '8', '--long-prompt-tokens', '400', '--baseline-chunks', '4', '--prefill-chunk', '16', '--weft-args', '--max-num-batched-tokens 16', '--out', out];
      const run = spawnSync(process.execPath, ['--import', 'tsx', 'bench/serve-under-load.ts', ...args], { encoding: 'utf8', timeout: 120_000 });
      assert.equal(run.status, 0, run.stderr + run.stdout);
      assert.match(run.stdout, /\| llama-tiny --max-num-batched-tokens 16 \| 3 \| 400 \|/);
      const [row, ...more] = readFileSync(out, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, number | string>);
      assert.equal(more.length, 0);
      assert.equal(row!.gpu, 'cpu');
      assert.ok(typeof row!.commit === 'string' && row!.commit.length > 0);
      const n = row as Record<string, number>;
      assert.ok(n.ttftMs! > 0, JSON.stringify(row));
      assert.ok(n.beforeP50Ms! >= 0 && n.beforeP99Ms! >= n.beforeP50Ms!, JSON.stringify(row));
      // a loaded machine's client may read every chunk of the prefill's steps after the prompt's token: no gaps then
      if (n.duringP50Ms === null) assert.ok(n.duringP99Ms === null && n.duringMaxMs === null && n.duringChunksPerS === 0, JSON.stringify(row));
      else {
        assert.ok(n.duringP50Ms! >= 0 && n.duringP99Ms! >= n.duringP50Ms! && n.duringMaxMs! >= n.duringP99Ms!, JSON.stringify(row));
        assert.ok(n.duringChunksPerS! > 0, JSON.stringify(row));
      }
      assert.ok(n.streamsThrough! >= 0 && n.streamsThrough! <= 3, JSON.stringify(row));
      assert.deepEqual(processesMentioning(model), [], 'no weft process left');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('serve-under-load.ts refuses a bad count before it starts a server', () => {
    const run = spawnSync(process.execPath, ['--import', 'tsx', 'bench/serve-under-load.ts', '--model', fixtureDir('llama-tiny'), '--device', 'cpu', '--streams', '0'], { encoding: 'utf8', timeout: 60_000 });
    assert.notEqual(run.status, 0);
    assert.match(run.stderr, /--streams must be a positive integer \(got 0\)/);
  });
});
