import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, describe, it } from 'node:test';
import { type ModelSpec, readModelSpec, SUPPORTED_ARCHITECTURES } from '../../core/model-spec.ts';
import { planShards, type RankShard } from '../../core/shard-plan.ts';
import { type HostTensor, loadShard, shardBytes, shardLayout } from '../../worker/weights/load-shard.ts';
import { buildRankModel, FAMILIES, familyOf, hostWeights, uploadWeights } from '../../worker/models/registry.ts';
import type { Ops } from '../../worker/models/ops.ts';
import { createEngine } from '../../worker/native.ts';
import { weftError, readTensors, writeTensors, type RawTensor } from '../helpers/safetensors-files.ts';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/hf-tiny');
const fixture = (name: string) => path.join(FIXTURES, name);
const tmp = mkdtempSync(path.join(tmpdir(), 'weft-load-shard-'));
after(() => rmSync(tmp, { recursive: true, force: true }));



/** A model directory: a fixture's config.json (optionally changed) and the given weights. */
function modelDir(from: string, tensors: RawTensor[] | null, configChanges: Record<string, unknown> = {}): string {
  const dir = mkdtempSync(path.join(tmp, `${from}-`));
  const config = JSON.parse(readFileSync(path.join(fixture(from), 'config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, ...configChanges }));
  if (tensors !== null) writeTensors(path.join(dir, 'model.safetensors'), tensors);
  return dir;
}


const rowsOf = (t: RawTensor, r0: number, r1: number): Buffer => {
  const rowBytes = t.bytes.length / t.shape[0]!;
  return t.bytes.subarray(r0 * rowBytes, r1 * rowBytes);
};
const colsOf = (t: RawTensor, c0: number, c1: number): Buffer => {
  const [rows, cols] = t.shape as [number, number];
  const elem = t.bytes.length / (rows * cols);
  return Buffer.concat(Array.from({ length: rows }, (_, r) => t.bytes.subarray((r * cols + c0) * elem, (r * cols + c1) * elem)));
};
/** Column blocks side by side: the inverse of taking column slices. */
const hconcat = (parts: Buffer[], rows: number): Buffer =>
  Buffer.concat(Array.from({ length: rows }, (_, r) => Buffer.concat(parts.map((p) => p.subarray((r * p.length) / rows, ((r + 1) * p.length) / rows)))));

function assertTensor(got: HostTensor | undefined, dtype: string, shape: number[], bytes: Buffer, what: string): void {
  assert.ok(got, `${what} is missing`);
  assert.deepEqual(got.format, { kind: 'dense', dtype }, `${what} format`);
  assert.deepEqual(got.shape, shape, `${what} shape`);
  assert.ok(Buffer.from(got.data.buffer, got.data.byteOffset, got.data.length).equals(bytes), `${what} bytes`);
}

function expectedNames(spec: ModelSpec): string[] {
  const names = ['embed', 'norm', 'lmHead'];
  for (let i = 0; i < spec.nLayers; i++) {
    names.push(`layers.${i}.attnNorm`, `layers.${i}.ffnNorm`, `layers.${i}.wqkv`, `layers.${i}.wo`);
    if (spec.family === 'mixtral') {
      names.push(`layers.${i}.router`);
      names.push(`layers.${i}.experts.w13`, `layers.${i}.experts.w2`);
    } else {
      names.push(`layers.${i}.w13`, `layers.${i}.w2`);
    }
  }
  return names.sort();
}

const MODELS = ['llama-tiny', 'llama-tiny-bf16', 'llama3-tiny', 'mixtral-tiny'];

describe('loadShard on the hf-tiny fixtures', () => {
  for (const model of MODELS) {
    for (const tp of [1, 2, 4]) {
      it(`${model}, tp ${tp}: each rank's slices match the full tensors and reassemble them`, async () => {
        const dir = fixture(model);
        const spec = readModelSpec(dir);
        const plan = planShards(spec, tp);
        const full = new Map(readTensors(path.join(dir, 'model.safetensors')).map((t) => [t.name, t]));
        const hf = (name: string) => full.get(name) ?? assert.fail(`fixture lacks ${name}`);
        const { hidden, headDim: hd, dtype } = spec;
        const shards: Map<string, HostTensor>[] = [];
        for (const r of plan.ranks) {
          const progress: [number, number][] = [];
          const w = await loadShard(dir, spec, plan, r.rank, (read, total) => progress.push([read, total]));
          shards.push(w);
          assert.deepEqual([...w.keys()].sort(), expectedNames(spec));

          // Only this rank's bytes were read: the reads add up to the shard's size, no more.
          const total = shardBytes(spec, plan, r.rank);
          assert.deepEqual(progress.at(-1), [total, total]);
          assert.equal(new Set([...w.values()]).size, spec.tieWordEmbeddings ? w.size - 1 : w.size);
          assert.equal([...new Set(w.values())].reduce((s, t) => s + t.data.length, 0), total);

          const vocabRows = r.vocab.end - r.vocab.start;
          const embed = hf('model.embed_tokens.weight');
          assertTensor(w.get('embed'), dtype, [vocabRows, hidden], rowsOf(embed, r.vocab.start, r.vocab.end), 'embed');
          assertTensor(w.get('norm'), dtype, [hidden], hf('model.norm.weight').bytes, 'norm');
          const lmHead = spec.tieWordEmbeddings ? embed : hf('lm_head.weight');
          assertTensor(w.get('lmHead'), dtype, [vocabRows, hidden], rowsOf(lmHead, r.vocab.start, r.vocab.end), 'lmHead');
          if (spec.tieWordEmbeddings) assert.equal(w.get('lmHead'), w.get('embed')); // read once, shared

          const [q0, q1] = [r.qHeads.start * hd, r.qHeads.end * hd];
          const [kv0, kv1] = [r.kvHeads.start * hd, r.kvHeads.end * hd];
          for (let i = 0; i < spec.nLayers; i++) {
            const p = `model.layers.${i}.`;
            assertTensor(w.get(`layers.${i}.attnNorm`), dtype, [hidden], hf(`${p}input_layernorm.weight`).bytes, 'attnNorm');
            assertTensor(w.get(`layers.${i}.ffnNorm`), dtype, [hidden], hf(`${p}post_attention_layernorm.weight`).bytes, 'ffnNorm');
            const qkv = [rowsOf(hf(`${p}self_attn.q_proj.weight`), q0, q1), rowsOf(hf(`${p}self_attn.k_proj.weight`), kv0, kv1), rowsOf(hf(`${p}self_attn.v_proj.weight`), kv0, kv1)];
            assertTensor(w.get(`layers.${i}.wqkv`), dtype, [q1 - q0 + 2 * (kv1 - kv0), hidden], Buffer.concat(qkv), `layers.${i}.wqkv`);
            assertTensor(w.get(`layers.${i}.wo`), dtype, [hidden, q1 - q0], colsOf(hf(`${p}self_attn.o_proj.weight`), q0, q1), `layers.${i}.wo`);
            const { start: f0, end: f1 } = r.ffn;
            if (spec.family === 'mixtral') {
              // Held experts stacked in order: each one's gate and up rows, then each one's down columns.
              const held = Array.from({ length: r.experts.end - r.experts.start }, (_, j) => `${p}block_sparse_moe.experts.${r.experts.start + j}.`);
              const { start: e0, end: e1 } = r.expertFfn;
              assertTensor(w.get(`layers.${i}.experts.w13`), dtype, [held.length, 2 * (e1 - e0), hidden], Buffer.concat(held.flatMap((x) => [rowsOf(hf(`${x}w1.weight`), e0, e1), rowsOf(hf(`${x}w3.weight`), e0, e1)])), 'experts.w13');
              assertTensor(w.get(`layers.${i}.experts.w2`), dtype, [held.length, hidden, e1 - e0], Buffer.concat(held.map((x) => colsOf(hf(`${x}w2.weight`), e0, e1))), 'experts.w2');
            } else {
              assertTensor(w.get(`layers.${i}.w13`), dtype, [2 * (f1 - f0), hidden], Buffer.concat([rowsOf(hf(`${p}mlp.gate_proj.weight`), f0, f1), rowsOf(hf(`${p}mlp.up_proj.weight`), f0, f1)]), 'w13');
              assertTensor(w.get(`layers.${i}.w2`), dtype, [hidden, f1 - f0], colsOf(hf(`${p}mlp.down_proj.weight`), f0, f1), 'w2');
            }
            if (spec.family === 'mixtral') {
              assertTensor(w.get(`layers.${i}.router`), dtype, [spec.nExperts, hidden], hf(`${p}block_sparse_moe.gate.weight`).bytes, 'router');
            }
          }
        }

        // Reassemble: rows concatenate over ranks, columns sit side by side, replicated kv heads appear once per head.
        const bytes = (rank: number, name: string) => Buffer.from(shards[rank]!.get(name)!.data);
        const ranks = plan.ranks;
        assert.ok(Buffer.concat(ranks.map((r) => bytes(r.rank, 'embed'))).equals(hf('model.embed_tokens.weight').bytes));
        const rowBytes = hidden * (dtype === 'f32' ? 4 : 2);
        for (let i = 0; i < spec.nLayers; i++) {
          const p = `model.layers.${i}.`;
          const qRows = plan.nHeadsPerRank * hd;
          const kvRows = plan.nKvHeadsPerRank * hd;
          const wqkv = (rank: number) => bytes(rank, `layers.${i}.wqkv`);
          assert.ok(Buffer.concat(ranks.map((r) => wqkv(r.rank).subarray(0, qRows * rowBytes))).equals(hf(`${p}self_attn.q_proj.weight`).bytes), `layer ${i} q`);
          const firstHolder = ranks.filter((r, j) => j === 0 || r.kvHeads.start !== ranks[j - 1]!.kvHeads.start);
          const k = Buffer.concat(firstHolder.map((r) => wqkv(r.rank).subarray(qRows * rowBytes, (qRows + kvRows) * rowBytes)));
          const v = Buffer.concat(firstHolder.map((r) => wqkv(r.rank).subarray((qRows + kvRows) * rowBytes)));
          assert.ok(k.equals(hf(`${p}self_attn.k_proj.weight`).bytes), `layer ${i} k`);
          assert.ok(v.equals(hf(`${p}self_attn.v_proj.weight`).bytes), `layer ${i} v`);
          assert.ok(hconcat(ranks.map((r) => bytes(r.rank, `layers.${i}.wo`)), hidden).equals(hf(`${p}self_attn.o_proj.weight`).bytes), `layer ${i} o`);
          if (spec.family === 'mixtral') {
            // Expert 0's down columns: the first expert of each rank that holds it, side by side.
            const holders = ranks.filter((r) => r.experts.start === 0);
            const firstExpert = (r: RankShard) => {
              const stacked = bytes(r.rank, `layers.${i}.experts.w2`);
              return stacked.subarray(0, stacked.length / (r.experts.end - r.experts.start));
            };
            assert.ok(hconcat(holders.map(firstExpert), hidden).equals(hf(`${p}block_sparse_moe.experts.0.w2.weight`).bytes), `layer ${i} expert 0 w2`);
          } else {
            assert.ok(hconcat(ranks.map((r) => bytes(r.rank, `layers.${i}.w2`)), hidden).equals(hf(`${p}mlp.down_proj.weight`).bytes), `layer ${i} down_proj`);
          }
        }
      });
    }
  }

  it('reads a model sharded through model.safetensors.index.json the same as one file', async () => {
    const tensors = readTensors(path.join(fixture('mixtral-tiny'), 'model.safetensors'));
    const dir = modelDir('mixtral-tiny', null);
    const half = 20;
    writeTensors(path.join(dir, 'model-00001-of-00002.safetensors'), tensors.slice(0, half));
    writeTensors(path.join(dir, 'model-00002-of-00002.safetensors'), tensors.slice(half));
    const weightMap = Object.fromEntries(tensors.map((t, i) => [t.name, `model-0000${i < half ? 1 : 2}-of-00002.safetensors`]));
    writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const spec = readModelSpec(dir);
    const plan = planShards(spec, 2);
    const sharded = await loadShard(dir, spec, plan, 1);
    const single = await loadShard(fixture('mixtral-tiny'), spec, plan, 1);
    assert.deepEqual([...sharded.keys()], [...single.keys()]);
    for (const [name, t] of single) assert.deepEqual(sharded.get(name), t, name);
  });

  it('describes the layout without files', () => {
    const spec = readModelSpec(fixture('llama3-tiny'));
    const layout = shardLayout(spec, planShards(spec, 4), 3);
    const wqkv = layout.find((t) => t.name === 'layers.1.wqkv')!;
    assert.deepEqual(wqkv.shape, [64, 128]); // 2 q heads + k + v of one replicated kv head, hd 16
    assert.deepEqual(wqkv.sources.map((s) => [s.hfName, s.cut, s.range]), [
      ['model.layers.1.self_attn.q_proj.weight', 'rows', { start: 96, end: 128 }],
      ['model.layers.1.self_attn.k_proj.weight', 'rows', { start: 16, end: 32 }],
      ['model.layers.1.self_attn.v_proj.weight', 'rows', { start: 16, end: 32 }],
    ]);
    assert.equal(layout.find((t) => t.name === 'lmHead')!.aliasOf, 'embed');
  });
});

describe('loadShard refusals, before any tensor data is read', () => {
  const llama = () => readTensors(path.join(fixture('llama-tiny'), 'model.safetensors'));

  async function refuses(dir: string, code: string, pattern: RegExp, tp = 2, rank = 0, spec = readModelSpec(dir)): Promise<void> {
    let reads = 0;
    await assert.rejects(loadShard(dir, spec, planShards(spec, tp), rank, () => reads++), weftError(code, pattern));
    assert.equal(reads, 0, 'no tensor data read before refusing');
  }

  it('a tensor whose header shape differs from the config: names the tensor, file and both shapes', async () => {
    const tensors = llama().map((t) => (t.name === 'model.layers.1.self_attn.q_proj.weight' ? { ...t, shape: [32, 128] } : t));
    await refuses(modelDir('llama-tiny', tensors), 'WEFT_BAD_WEIGHTS', /model\.safetensors: tensor "model\.layers\.1\.self_attn\.q_proj\.weight" has shape \[32, 128\], expected \[64, 64\] from config\.json/);
  });

  it('a config that disagrees with the weights (intermediate_size)', async () => {
    await refuses(modelDir('llama-tiny', llama(), { intermediate_size: 352 }), 'WEFT_BAD_WEIGHTS', /tensor "model\.layers\.0\.mlp\.gate_proj\.weight" has shape \[176, 64\], expected \[352, 64\]/);
  });

  it('a missing tensor', async () => {
    const tensors = llama().filter((t) => t.name !== 'model.layers.1.self_attn.v_proj.weight');
    await refuses(modelDir('llama-tiny', tensors), 'WEFT_BAD_WEIGHTS', /\(model\.safetensors\): tensor "model\.layers\.1\.self_attn\.v_proj\.weight" \(for weft's layers\.1\.wqkv\) is missing/);
  });

  it('a missing LM head when the config does not tie it', async () => {
    const tensors = readTensors(path.join(fixture('llama3-tiny'), 'model.safetensors'));
    await refuses(modelDir('llama3-tiny', tensors, { tie_word_embeddings: false }), 'WEFT_BAD_WEIGHTS', /tensor "lm_head\.weight" \(for weft's lmHead\) is missing; if the LM head is tied/);
  });

  it('weights stored in another dtype than config.json declares', async () => {
    const f32Spec = readModelSpec(fixture('llama-tiny'));
    await refuses(fixture('llama-tiny-bf16'), 'WEFT_BAD_WEIGHTS', /llama-tiny-bf16\/model\.safetensors: tensor "model\.embed_tokens\.weight" is BF16 but config\.json declares f32/, 2, 0, f32Spec);
  });

  it('a dtype weft cannot load', async () => {
    const tensors = llama().map((t) => (t.name === 'model.norm.weight' ? { ...t, dtype: 'I32' } : t));
    await refuses(modelDir('llama-tiny', tensors), 'WEFT_BAD_WEIGHTS', /tensor "model\.norm\.weight" has dtype I32; weft loads F32, F16 and BF16 only/);
  });

  it('a truncated file', async () => {
    const dir = modelDir('llama-tiny', null);
    const bytes = readFileSync(path.join(fixture('llama-tiny'), 'model.safetensors'));
    writeFileSync(path.join(dir, 'model.safetensors'), bytes.subarray(0, 400_000));
    await refuses(dir, 'WEFT_BAD_WEIGHTS', /model\.safetensors: tensor "model\.layers\.0\.self_attn\.k_proj\.weight" data_offsets \[397824, 406016\] run past the end of the file/);
  });

  it('no weights at all, and a rank outside the plan', async () => {
    await refuses(modelDir('llama-tiny', null), 'WEFT_BAD_WEIGHTS', /neither model\.safetensors nor model\.safetensors\.index\.json exists/);
    const dir = modelDir('llama-tiny', null);
    copyFileSync(path.join(fixture('llama-tiny'), 'model.safetensors'), path.join(dir, 'model.safetensors'));
    await refuses(dir, 'WEFT_BAD_SHARD', /rank 2 is not in the shard plan \(tp=2: ranks 0\.\.1\)/, 2, 2);
  });
});

describe('model families as tables', () => {
  it('every architecture config.json parsing accepts has exactly one family module, and only those', () => {
    const served = FAMILIES.flatMap((f) => f.architectures);
    assert.deepEqual([...served].sort(), [...SUPPORTED_ARCHITECTURES].sort());
    assert.equal(new Set(served).size, served.length, 'no architecture served twice');
    for (const model of MODELS) {
      const spec = readModelSpec(fixture(model));
      assert.equal(familyOf(spec).name, spec.family, `${model}: the module is the family the spec names`);
    }
  });

  it('an unknown architecture is the named WEFT_UNSUPPORTED_MODEL error', () => {
    assert.throws(() => familyOf({ architecture: 'GPT2LMHeadModel' }), weftError('WEFT_UNSUPPORTED_MODEL', /architecture GPT2LMHeadModel is not supported; weft runs LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM/));
  });

  it('each tensor of the layout carries its format: the checkpoint dtype today', () => {
    const spec = readModelSpec(fixture('llama-tiny-bf16'));
    const layout = shardLayout(spec, planShards(spec, 2), 1);
    assert.ok(layout.length > 0);
    for (const t of layout) assert.deepEqual(t.format, { kind: 'dense', dtype: 'bf16' }, t.name);
  });

  it('a loaded tensor is checked against the layout before the native upload, naming it, expected and actual', async () => {
    const dir = fixture('llama-tiny');
    const spec = readModelSpec(dir);
    const plan = planShards(spec, 2);
    const noUpload = { upload: () => assert.fail('uploaded a tensor that does not match the layout') } as unknown as Ops;
    const build = (weights: Map<string, HostTensor>) => buildRankModel(noUpload, spec, plan, 1, hostWeights(noUpload, 1, weights), { kvBlocks: 1, kvBlockSize: 8, kvDtype: 'f32' });
    const wrongFormat = await loadShard(dir, spec, plan, 1);
    wrongFormat.set('embed', { ...wrongFormat.get('embed')!, format: { kind: 'dense', dtype: 'f16' } });
    assert.throws(() => build(wrongFormat), weftError('WEFT_BAD_WEIGHTS', /^rank 1: tensor embed is f16 \[256, 64\], the layout expects f32 \[256, 64\]$/));
    const wrongShape = await loadShard(dir, spec, plan, 1);
    wrongShape.set('embed', { ...wrongShape.get('embed')!, shape: [64, 128] });
    assert.throws(() => build(wrongShape), weftError('WEFT_BAD_WEIGHTS', /^rank 1: tensor embed is f32 \[64, 128\], the layout expects f32 \[256, 64\]$/));
    const quantized = await loadShard(dir, spec, plan, 1);
    quantized.set('embed', { ...quantized.get('embed')!, format: { kind: 'int4', groupSize: 32, scales: 'f16' } });
    assert.throws(() => build(quantized), weftError('WEFT_BAD_WEIGHTS', /tensor embed is int4 \(groups of 32, f16 scales\) \[256, 64\], the layout expects f32/));
  });

  it('uploadWeights (the worker\'s): the tensors hostWeights gives, with the event loop served between uploads', async () => {
    const dir = fixture('mixtral-tiny');
    const spec = readModelSpec(dir);
    const plan = planShards(spec, 2);
    const engine = createEngine({ backend: 'cpu', threads: 1 });
    const events: string[] = [];
    const counting = new Proxy(engine, { get: (target, key) => (key === 'upload' ? (...args: Parameters<typeof engine.upload>) => (events.push('upload'), target.upload(...args)) : Reflect.get(target, key)) });
    const kvOptions = { kvBlocks: 1, kvBlockSize: 8, kvDtype: 'f32' } as const;
    const weights = await loadShard(dir, spec, plan, 1);
    setImmediate(() => events.push('turn'));
    const uploaded = buildRankModel(engine, spec, plan, 1, await uploadWeights(counting, spec, plan, 1, weights), kvOptions);
    assert.equal(events.indexOf('turn'), 1, 'the loop waited for more than one tensor\'s upload');
    assert.equal(events.filter((e) => e === 'upload').length, shardLayout(spec, plan, 1).filter((t) => t.aliasOf === null).length);
    const reference = buildRankModel(engine, spec, plan, 1, hostWeights(engine, 1, await loadShard(dir, spec, plan, 1)), kvOptions);
    for (const key of ['embed', 'norm', 'lmHead'] as const) assert.deepEqual(engine.download(uploaded.model[key]), engine.download(reference.model[key]), key);
    // every tensor of every layer, nested ones (a layer's experts) too
    type Download = Parameters<typeof engine.download>[0];
    const tensorsOf = (value: unknown, at: string): [string, Download][] => {
      if (value === null || typeof value !== 'object') return [];
      const v = value as { shape?: unknown; dtype?: unknown };
      if (Array.isArray(v.shape) && typeof v.dtype === 'string') return [[at, value as Download]];
      return Object.entries(value).flatMap(([k, inner]) => tensorsOf(inner, `${at}.${k}`));
    };
    const got = new Map(tensorsOf(uploaded.model.layers, 'layers'));
    const want = tensorsOf(reference.model.layers, 'layers');
    assert.ok(want.length >= 4 * spec.nLayers);
    for (const [name, t] of want) assert.deepEqual(engine.download(got.get(name)!), engine.download(t), name);
    // a tensor the layout wants and the checkpoint lacks is still named, now before anything is built
    const missing = await loadShard(dir, spec, plan, 1);
    missing.delete('norm');
    await assert.rejects(uploadWeights(engine, spec, plan, 1, missing), weftError('WEFT_BAD_WEIGHTS', /^rank 1: tensor norm was not loaded$/));
  });

  it('the KV cache is kvBlocks blocks of kvBlockSize positions per layer', async () => {
    const dir = fixture('llama3-tiny');
    const spec = readModelSpec(dir);
    const plan = planShards(spec, 2);
    const engine = createEngine({ backend: 'cpu', threads: 1 });
    const built = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), { kvBlocks: 3, kvBlockSize: 40, kvDtype: 'f32' });
    assert.equal(built.model.kvCache.length, spec.nLayers);
    for (const { k, v } of built.model.kvCache) {
      assert.deepEqual(k.shape, [3, plan.nKvHeadsPerRank, 40, spec.headDim]);
      assert.deepEqual(v.shape, [3, plan.nKvHeadsPerRank, 40, spec.headDim]);
    }
    assert.deepEqual(built.collectivePlan.gatherWidths, plan.ranks.map((r) => r.vocab.end - r.vocab.start));
  });
});
