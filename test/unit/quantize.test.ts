// Weight-only quantization: the arithmetic (core/weight-quantize.ts), the checkpoint `weft quantize` writes, how
// the loader splits values and scales per rank, and the refusals of bad checkpoints and of splits that cut a group.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { quantizeCheckpoint } from '../../coordinator/quantize.ts';
import { readModelSpec, withQuantizeAtLoad } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { bf16Bits, bf16Value, dequantizeMatrix, quantizeMatrix, toFloat32 } from '../../core/weight-quantize.ts';
import { loadShard } from '../../worker/weights/load-shard.ts';
import { createEngine } from '../../worker/native.ts';
import { presetSpec } from '../../bench/presets.ts';
import { fixtureDir } from '../helpers/fixtures.ts';
import { readTensors, weftError, writeTensors, type RawTensor } from '../helpers/safetensors-files.ts';

const tmp = mkdtempSync(path.join(tmpdir(), 'weft-quantize-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

describe('quantization arithmetic', () => {
  const values = Float32Array.from({ length: 4 * 64 }, (_, i) => Math.sin(i * 0.37) * (1 + (i % 7)));
  for (const [kind, groupSize] of [['int8', 'channel'], ['int8', 16], ['int4', 32], ['int4', 8]] as const) {
    it(`${kind} groups of ${groupSize}: every value within half a step of its group's scale`, () => {
      const format = { kind, groupSize };
      const q = quantizeMatrix(values, 4, 64, format);
      const back = dequantizeMatrix(q, 4, 64, format);
      const group = groupSize === 'channel' ? 64 : groupSize;
      const scales = toFloat32(q.scales, 'bf16');
      assert.equal(scales.length, 4 * (64 / group));
      for (let i = 0; i < values.length; i++) {
        const scale = scales[Math.floor(i / group)]!;
        // rounding error is half a step; clamping the largest value (its scale rounded down to bf16) adds at most 2^-8 of it
        assert.ok(Math.abs(back[i]! - values[i]!) <= scale / 2 + Math.abs(values[i]!) / 256, `${i}: ${values[i]} -> ${back[i]} (scale ${scale})`);
      }
    });
  }

  it('int4 codes are value + 8, two per byte along K, the even column in the low nibble', () => {
    // one group of 4: max |w| 7 gives scale 1, so the codes are the values + 8
    const q = quantizeMatrix(Float32Array.from([-7, 7, 0, -1]), 1, 4, { kind: 'int4', groupSize: 4 });
    assert.deepEqual([...q.data], [0x1 | (0xf << 4), 0x8 | (0x7 << 4)]);
    assert.equal(bf16Value(new Uint16Array(q.scales.buffer)[0]!), 1);
  });

  it('int8 is symmetric, max |w| / 127: -127..127 stored as int8', () => {
    const q = quantizeMatrix(Float32Array.from([-127, 127, 0.4, -63.6]), 1, 4, { kind: 'int8', groupSize: 'channel' });
    assert.deepEqual([...new Int8Array(q.data.buffer)], [-127, 127, 0, -64]);
  });

  it('bf16 rounding is to nearest even', () => {
    assert.equal(bf16Bits(1 + 2 ** -8), 0x3f80); // a tie: down to the even mantissa
    assert.equal(bf16Bits(1 + 3 * 2 ** -8), 0x3f82); // a tie: up to the even mantissa
    assert.equal(bf16Bits(1 + 2 ** -8 + 2 ** -12), 0x3f81);
  });
});

describe('weft quantize and the loader', () => {
  let int4Dir = '';
  let int8Dir = '';
  before(async () => {
    int4Dir = path.join(tmp, 'llama-int4-g4');
    int8Dir = path.join(tmp, 'llama-int8');
    await quantizeCheckpoint({ modelDir: fixtureDir('llama-tiny'), out: int4Dir, format: 'int4', groupSize: 4 });
    await quantizeCheckpoint({ modelDir: fixtureDir('llama-tiny'), out: int8Dir, format: 'int8', groupSize: 'channel' });
  });

  it('writes I8/U8 values with bf16 scales beside every projection, and a quantization block', () => {
    const tensors = new Map(readTensors(path.join(int4Dir, 'model.safetensors')).map((t) => [t.name, t]));
    const down = tensors.get('model.layers.0.mlp.down_proj.weight')!;
    assert.deepEqual([down.dtype, down.shape], ['U8', [64, 88]]);
    assert.deepEqual([tensors.get('model.layers.0.mlp.down_proj.scales')!.dtype, tensors.get('model.layers.0.mlp.down_proj.scales')!.shape], ['BF16', [64, 44]]);
    assert.equal(tensors.get('model.embed_tokens.weight')!.dtype, 'F32'); // not a projection: copied
    assert.equal(tensors.has('model.layers.0.input_layernorm.scales'), false);
    const spec = readModelSpec(int4Dir);
    assert.deepEqual(spec.quantization, { kind: 'int4', groupSize: 4, atLoad: false });
    assert.deepEqual(readModelSpec(int8Dir).quantization, { kind: 'int8', groupSize: 'channel', atLoad: false });
  });

  it('each rank gets its rows of column-parallel projections and whole groups of row-parallel ones; per-channel scales are replicated', async () => {
    const spec = readModelSpec(int4Dir);
    const one = await loadShard(int4Dir, spec, planShards(spec, 1), 0);
    const plan = planShards(spec, 2);
    const rank1 = await loadShard(int4Dir, spec, plan, 1);
    const w2 = one.get('layers.0.w2')!; // [64, 176]: down_proj, K split 88 / 88
    const w2r = rank1.get('layers.0.w2')!;
    assert.deepEqual(w2r.shape, [64, 88]);
    for (let r = 0; r < 64; r++) {
      assert.deepEqual([...w2r.data.subarray(r * 44, (r + 1) * 44)], [...w2.data.subarray(r * 88 + 44, (r + 1) * 88)], `w2 row ${r} codes`);
      assert.deepEqual([...w2r.scales!.subarray(r * 44, (r + 1) * 44)], [...w2.scales!.subarray(r * 88 + 44, (r + 1) * 88)], `w2 row ${r} scales`);
    }
    const spec8 = readModelSpec(int8Dir);
    const wo8 = (await loadShard(int8Dir, spec8, planShards(spec8, 1), 0)).get('layers.0.wo')!;
    const wo8r = (await loadShard(int8Dir, spec8, planShards(spec8, 2), 1)).get('layers.0.wo')!;
    assert.deepEqual([...wo8r.scales!], [...wo8.scales!]); // [64, 1]: every rank scales its partial sums alike
  });

  it('quantizing at load gives the bytes weft quantize writes (grouped, so the split does not change a group)', async () => {
    const spec = withQuantizeAtLoad(readModelSpec(fixtureDir('llama-tiny')), 'int4', 4);
    const atLoad = await loadShard(fixtureDir('llama-tiny'), spec, planShards(spec, 2), 1);
    const offline = readModelSpec(int4Dir);
    const stored = await loadShard(int4Dir, offline, planShards(offline, 2), 1);
    for (const [name, t] of stored) {
      assert.deepEqual(atLoad.get(name)!.format, t.format, name);
      assert.ok(Buffer.from(atLoad.get(name)!.data).equals(Buffer.from(t.data)), `${name} values`);
      assert.ok(t.scales === null || Buffer.from(atLoad.get(name)!.scales!).equals(Buffer.from(t.scales)), `${name} scales`);
    }
  });

  it('the engine multiplies a quantized weight as its dequantized fp32 values', () => {
    const engine = createEngine({ backend: 'cpu', threads: 1 });
    const weights = Float32Array.from({ length: 6 * 8 }, (_, i) => Math.cos(i * 1.3));
    const x = Float32Array.from({ length: 2 * 8 }, (_, i) => (i % 5) - 2);
    for (const format of [{ kind: 'int8', groupSize: 'channel' }, { kind: 'int4', groupSize: 4 }] as const) {
      const q = quantizeMatrix(weights, 6, 8, format);
      const scales = engine.upload(q.scales, 'bf16', [6, format.groupSize === 'channel' ? 1 : 2]);
      const w = engine.uploadQuantized(q.data, format.kind === 'int8' ? 'i8' : 'i4', [6, 8], scales);
      const dense = engine.upload(new Uint8Array(dequantizeMatrix(q, 6, 8, format).buffer), 'f32', [6, 8]);
      const xs = engine.upload(new Uint8Array(x.buffer), 'f32', [2, 8]);
      assert.deepEqual([...engine.download(engine.matmul(xs, w))], [...engine.download(engine.matmul(xs, dense))], format.kind);
      assert.throws(() => engine.download(w), /quantized weight/);
    }
  });
});

describe('the LM head quantized too (--quantize-lm-head)', () => {
  // llama3-tiny ties its LM head to the embedding; llama-tiny stores lm_head.weight
  let tiedDir = '';
  let untiedDir = '';
  before(async () => {
    tiedDir = path.join(tmp, 'llama3-int4-head');
    untiedDir = path.join(tmp, 'llama-int8-head');
    await quantizeCheckpoint({ modelDir: fixtureDir('llama3-tiny'), out: tiedDir, format: 'int4', groupSize: 16, quantizeLmHead: true });
    await quantizeCheckpoint({ modelDir: fixtureDir('llama-tiny'), out: untiedDir, format: 'int8', groupSize: 'channel', quantizeLmHead: true });
  });

  it('weft quantize writes the head as lm_head.weight with scales; a tied one is untied, its embedding kept dense', () => {
    const tied = new Map(readTensors(path.join(tiedDir, 'model.safetensors')).map((t) => [t.name, t]));
    const embed = tied.get('model.embed_tokens.weight')!;
    const [vocab, hidden] = embed.shape as [number, number];
    assert.deepEqual([tied.get('lm_head.weight')!.dtype, tied.get('lm_head.weight')!.shape], ['U8', [vocab, hidden / 2]]);
    assert.deepEqual(tied.get('lm_head.scales')!.shape, [vocab, hidden / 16]);
    assert.notEqual(embed.dtype, 'U8');
    const config = JSON.parse(readFileSync(path.join(tiedDir, 'config.json'), 'utf8')) as { tie_word_embeddings: boolean; quantization: Record<string, unknown> };
    assert.equal(config.tie_word_embeddings, false);
    assert.equal(config.quantization.lm_head, true);
    assert.deepEqual(readModelSpec(tiedDir).quantization, { kind: 'int4', groupSize: 16, atLoad: false, lmHead: true });
    const untied = new Map(readTensors(path.join(untiedDir, 'model.safetensors')).map((t) => [t.name, t]));
    assert.equal(untied.get('lm_head.weight')!.dtype, 'I8');
    assert.deepEqual(untied.get('lm_head.scales')!.shape, [untied.get('lm_head.weight')!.shape[0], 1]);
  });

  it('each rank holds its vocab rows of the quantized head; at load they are the bytes weft quantize writes, tied or not', async () => {
    for (const [source, dir, kind, group] of [['llama3-tiny', tiedDir, 'int4', 16], ['llama-tiny', untiedDir, 'int8', 'channel']] as const) {
      const atLoadSpec = withQuantizeAtLoad(readModelSpec(fixtureDir(source)), kind, group, true);
      const offline = readModelSpec(dir);
      for (const rank of [0, 1]) {
        const atLoad = (await loadShard(fixtureDir(source), atLoadSpec, planShards(atLoadSpec, 2), rank)).get('lmHead')!;
        const stored = (await loadShard(dir, offline, planShards(offline, 2), rank)).get('lmHead')!;
        assert.equal(stored.format.kind, kind, `${source} rank ${rank}`);
        assert.deepEqual(atLoad.format, stored.format);
        assert.ok(Buffer.from(atLoad.data).equals(Buffer.from(stored.data)), `${source} rank ${rank} values`);
        assert.ok(Buffer.from(atLoad.scales!).equals(Buffer.from(stored.scales!)), `${source} rank ${rank} scales`);
      }
    }
  });

  it('refusals: --quantize-lm-head without --quantize, and a checkpoint whose quantized head claims to be tied', () => {
    assert.throws(() => withQuantizeAtLoad(readModelSpec(fixtureDir('llama-tiny')), undefined, undefined, true), weftError('WEFT_BAD_MODEL', /--quantize-lm-head .*--quantize is not set/));
    const dir = path.join(tmp, 'tied-quantized-head');
    mkdirSync(dir);
    const config = JSON.parse(readFileSync(path.join(tiedDir, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, tie_word_embeddings: true }));
    assert.throws(() => readModelSpec(dir), weftError('WEFT_BAD_MODEL', /quantization\.lm_head" is true but tie_word_embeddings is true/));
  });
});

describe('refusals (of the int4 checkpoint written above)', () => {
  const source = () => readTensors(path.join(tmp, 'llama-int4-g4', 'model.safetensors'));
  const config = () => JSON.parse(readFileSync(path.join(tmp, 'llama-int4-g4', 'config.json'), 'utf8')) as Record<string, unknown>;
  /** A copy of the int4 checkpoint with its tensors and config changed. */
  function broken(name: string, tensors: RawTensor[], changes: Record<string, unknown> = {}): string {
    const dir = path.join(tmp, name);
    mkdirSync(dir);
    writeTensors(path.join(dir, 'model.safetensors'), tensors);
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config(), ...changes }));
    return dir;
  }
  const load = async (dir: string, tp = 1) => {
    const spec = readModelSpec(dir);
    return loadShard(dir, spec, planShards(spec, tp), 0);
  };

  it('a missing scales tensor, named', async () => {
    const dir = broken('no-scales', source().filter((t) => t.name !== 'model.layers.1.self_attn.k_proj.scales'));
    await assert.rejects(load(dir), weftError('WEFT_BAD_WEIGHTS', /tensor "model\.layers\.1\.self_attn\.k_proj\.scales" \(for weft's layers\.1\.wqkv\) is missing/));
  });

  it('scales of another group size, named with both shapes', async () => {
    const dir = broken('group-8', source(), { quantization: { format: 'int4', bits: 4, group_size: 8 } });
    await assert.rejects(load(dir), weftError('WEFT_BAD_WEIGHTS', /tensor "model\.layers\.0\.self_attn\.q_proj\.scales" has shape \[64, 16\], expected \[64, 8\] from config\.json \(int4, group size 8\)/));
  });

  it('values of the wrong width or dtype, named', async () => {
    const tensors = source().map((t) => (t.name === 'model.layers.0.mlp.up_proj.weight' ? { ...t, shape: [88, 64] } : t));
    await assert.rejects(load(broken('shape', tensors)), weftError('WEFT_BAD_WEIGHTS', /tensor "model\.layers\.0\.mlp\.up_proj\.weight" has shape \[88, 64\], expected \[176, 32\]/));
    const int8 = source().map((t) => (t.name === 'model.layers.0.mlp.up_proj.weight' ? { ...t, dtype: 'I8' } : t));
    await assert.rejects(load(broken('dtype', int8)), weftError('WEFT_BAD_WEIGHTS', /tensor "model\.layers\.0\.mlp\.up_proj\.weight" is I8 but config\.json's quantization block \(int4\) stores it as U8/));
  });

  it('a quantization block the model cannot take', () => {
    const dir = broken('group-32', source(), { quantization: { format: 'int4', bits: 4, group_size: 32 } });
    assert.throws(() => readModelSpec(dir), weftError('WEFT_BAD_MODEL', /mlp_down has 176 input columns, not a multiple of group size 32/));
    const bits = broken('bits', source(), { quantization: { format: 'int4', bits: 8, group_size: 4 } });
    assert.throws(() => readModelSpec(bits), weftError('WEFT_BAD_MODEL', /quantization\.bits" is 8 but format int4 has 4/));
  });

  it('a split that would cut a group: Llama-2-7B down_proj at tp 8 with groups of 64, naming the group sizes that work', () => {
    const spec = withQuantizeAtLoad(presetSpec('llama-2-7b'), 'int4', 64);
    assert.throws(() => planShards(spec, 8), weftError('WEFT_BAD_SHARD', /down_proj has 1376 input columns, not a multiple of group size 64 \(int4 group sizes that work at tp=8: 32, channel\)/));
    assert.equal(planShards(withQuantizeAtLoad(presetSpec('llama-2-7b'), 'int4', 32), 8).tp, 8);
    assert.equal(planShards(spec, 4).tp, 4);
  });
});
