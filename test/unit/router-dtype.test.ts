/**
 * The Mixtral router is held in f32 whatever the checkpoint stores (worker/models/mixtral.ts says why): from a
 * bf16 checkpoint its values are widened exactly at load, every other tensor stays as stored, and the engine
 * gets an f32 router. A router stored in another dtype than config.json declares is still refused.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { fromFloat32, toFloat32 } from '../../core/weight-quantize.ts';
import { buildRankModel, hostWeights } from '../../worker/models/registry.ts';
import type { MixtralLayer } from '../../worker/models/mixtral.ts';
import { createEngine } from '../../worker/native.ts';
import { loadShard, shardBytes, shardLayout } from '../../worker/weights/load-shard.ts';
import { fixtureDir } from '../helpers/fixtures.ts';
import { readTensors, weftError, writeTensors, type RawTensor } from '../helpers/safetensors-files.ts';

const tmp = mkdtempSync(path.join(tmpdir(), 'weft-router-dtype-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const f32Tensors = readTensors(path.join(fixtureDir('mixtral-tiny'), 'model.safetensors'));
const ROUTER = 'model.layers.1.block_sparse_moe.gate.weight';

/** mixtral-tiny stored in bf16 (config.json saying so), except the tensors named in `keepF32`. */
function bf16Mixtral(keepF32: string[] = []): { dir: string; tensors: RawTensor[] } {
  const dir = mkdtempSync(path.join(tmp, 'mixtral-bf16-'));
  const config = JSON.parse(readFileSync(path.join(fixtureDir('mixtral-tiny'), 'config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, torch_dtype: 'bfloat16' }));
  const tensors = f32Tensors.map((t) => (keepF32.includes(t.name) ? t : { ...t, dtype: 'BF16', bytes: Buffer.from(fromFloat32(toFloat32(new Uint8Array(t.bytes), 'f32'), 'bf16')) }));
  writeTensors(path.join(dir, 'model.safetensors'), tensors);
  return { dir, tensors };
}

describe('the Mixtral router is f32 on every rank', () => {
  it('the layout asks for f32 read from the checkpoint dtype: widened from bf16, as stored from f32', () => {
    const router = (dir: string) => {
      const spec = readModelSpec(dir);
      return shardLayout(spec, planShards(spec, 2), 1).find((t) => t.name === 'layers.0.router')!;
    };
    const fromBf16 = router(bf16Mixtral().dir);
    assert.deepEqual([fromBf16.format, fromBf16.widenedFrom], [{ kind: 'dense', dtype: 'f32' }, 'bf16']);
    const fromF32 = router(fixtureDir('mixtral-tiny'));
    assert.deepEqual([fromF32.format, fromF32.widenedFrom], [{ kind: 'dense', dtype: 'f32' }, undefined]);
  });

  for (const tp of [1, 2]) {
    it(`tp ${tp}: a bf16 checkpoint's router loads as its exact f32 values, the rest as stored; progress ends at the held bytes`, async () => {
      const { dir, tensors } = bf16Mixtral();
      const spec = readModelSpec(dir);
      const plan = planShards(spec, tp);
      for (const r of plan.ranks) {
        const progress: [number, number][] = [];
        const weights = await loadShard(dir, spec, plan, r.rank, (read, total) => progress.push([read, total]));
        const router = weights.get('layers.1.router')!;
        assert.deepEqual([router.format, router.shape], [{ kind: 'dense', dtype: 'f32' }, [spec.nExperts, spec.hidden]]);
        const stored = tensors.find((t) => t.name === ROUTER)!;
        assert.deepEqual(toFloat32(router.data, 'f32'), toFloat32(new Uint8Array(stored.bytes), 'bf16'));
        assert.deepEqual(weights.get('layers.1.experts.w13')!.format, { kind: 'dense', dtype: 'bf16' });
        assert.deepEqual(weights.get('layers.1.ffnNorm')!.format, { kind: 'dense', dtype: 'bf16' });
        const total = shardBytes(spec, plan, r.rank);
        assert.deepEqual(progress.at(-1), [total, total]);
        assert.equal([...new Set(weights.values())].reduce((s, t) => s + t.data.length, 0), total);
      }
    });
  }

  it('the engine gets an f32 router and bf16 experts (CPU)', async () => {
    const { dir } = bf16Mixtral();
    const spec = readModelSpec(dir);
    const plan = planShards(spec, 2);
    const engine = createEngine({ backend: 'cpu', threads: 1 });
    const { model } = buildRankModel(engine, spec, plan, 0, hostWeights(engine, 0, await loadShard(dir, spec, plan, 0)), { kvBlocks: 1, kvBlockSize: 8, kvDtype: 'bf16' });
    const layers = model.layers as readonly MixtralLayer[];
    assert.deepEqual(layers.map((l) => [l.router.dtype, l.experts.w13.dtype]), layers.map(() => ['f32', 'bf16']));
  });

  it('a router stored in f32 beside a bf16 config is refused as any other tensor is (weft widens only what config.json declares)', async () => {
    const { dir } = bf16Mixtral([ROUTER]);
    const spec = readModelSpec(dir);
    await assert.rejects(loadShard(dir, spec, planShards(spec, 1), 0), weftError('WEFT_BAD_WEIGHTS', /tensor "model\.layers\.1\.block_sparse_moe\.gate\.weight" is F32 but config\.json declares bf16/));
  });
});
