// GPTQ and AWQ checkpoints loaded directly (worker/weights/read-packed.ts) and through `weft quantize`
// (coordinator/convert-packed.ts), on the CPU backend. The test packs
// llama-tiny's projections itself, from the formats' definitions (GPTQ: qweight [K / 8, N], input column 8r + i in
// nibble i of word r; qzeros [G, N / 8] storing z - 1 in checkpoint format v1; AWQ gemm: qweight [K, N / 8] and
// qzeros, output row 8c + ORDER[i] in nibble i, ORDER = 0 2 4 6 1 3 5 7; scales [G, N] f16), and writes the dense
// model those codes stand for, w = (q - z) * s with s rounded from f16 to bf16 (weft's scales). Loaded or converted,
// the checkpoint must score every position as that dense model at tp 1 and 2, symmetric GPTQ as int4 and asymmetric
// AWQ as int8; checkpoints weft cannot read exactly are refused naming the tensor or field.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { startCluster } from '../../coordinator/cluster.ts';
import { quantizeCheckpoint } from '../../coordinator/quantize.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { bf16Bits, bf16Value, fromFloat32, toFloat32 } from '../../core/weight-quantize.ts';
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';
import { readTensors, writeTensors, type RawTensor } from '../helpers/safetensors-files.ts';

const tmp = mkdtempSync(path.join(tmpdir(), 'weft-packed-int4-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const GROUP = 8; // divides every projection's K at tp 2 (down_proj: 176 / 2 = 88 columns a rank)
const PROJECTION = /\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$/;
const AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];

interface Codes { n: number; k: number; q: Uint8Array; z: Uint8Array; s: Float32Array } // q [N, K], z and s [N, G]

/** Per output row and group of 8 input columns: symmetric (z = 8) or min-max asymmetric 4-bit codes, f16 scales. */
function quantize(w: Float32Array, n: number, k: number, symmetric: boolean): Codes {
  const groups = k / GROUP;
  const q = new Uint8Array(n * k), z = new Uint8Array(n * groups), s = new Float32Array(n * groups);
  for (let r = 0; r < n; r++) {
    for (let g = 0; g < groups; g++) {
      const part = w.subarray(r * k + g * GROUP, r * k + (g + 1) * GROUP);
      const lo = Math.min(...part), hi = Math.max(...part);
      const raw = symmetric ? Math.max(-lo, hi) / 7 : (hi - lo) / 15;
      const scale = toFloat32(fromFloat32(Float32Array.of(raw || 1e-3), 'f16'), 'f16')[0]!;
      const zero = symmetric ? 8 : Math.min(15, Math.max(0, Math.round(-lo / scale)));
      z[r * groups + g] = zero;
      s[r * groups + g] = scale;
      part.forEach((v, i) => (q[r * k + g * GROUP + i] = Math.min(15, Math.max(0, Math.round(v / scale) + zero))));
    }
  }
  return { n, k, q, z, s };
}

/** The dense values the codes stand for in weft: (q - z) * bf16(s). */
function dequantized(c: Codes): Float32Array {
  const groups = c.k / GROUP;
  return Float32Array.from({ length: c.n * c.k }, (_, i) => {
    const r = Math.floor(i / c.k), g = Math.floor((i % c.k) / GROUP);
    return (c.q[i]! - c.z[r * groups + g]!) * bf16Value(bf16Bits(c.s[r * groups + g]!));
  });
}

const int32s = (words: Int32Array): Buffer => Buffer.from(words.buffer);
const f16s = (c: Codes): Buffer => { // [G, N]
  const groups = c.k / GROUP;
  return Buffer.from(fromFloat32(Float32Array.from({ length: groups * c.n }, (_, i) => c.s[(i % c.n) * groups + Math.floor(i / c.n)]!), 'f16'));
};

function gptqTensors(name: string, c: Codes, zeroStored: (z: number) => number): RawTensor[] {
  const groups = c.k / GROUP;
  const qweight = new Int32Array((c.k / 8) * c.n);
  for (let col = 0; col < c.k; col++) for (let r = 0; r < c.n; r++) qweight[(col >> 3) * c.n + r]! |= c.q[r * c.k + col]! << (4 * (col & 7));
  const qzeros = new Int32Array(groups * (c.n / 8));
  for (let g = 0; g < groups; g++) for (let r = 0; r < c.n; r++) qzeros[g * (c.n / 8) + (r >> 3)]! |= zeroStored(c.z[r * groups + g]!) << (4 * (r & 7));
  const gIdx = Int32Array.from({ length: c.k }, (_, col) => Math.floor(col / GROUP));
  const p = name.replace(/\.weight$/, '');
  return [
    { name: `${p}.qweight`, dtype: 'I32', shape: [c.k / 8, c.n], bytes: int32s(qweight) },
    { name: `${p}.qzeros`, dtype: 'I32', shape: [groups, c.n / 8], bytes: int32s(qzeros) },
    { name: `${p}.scales`, dtype: 'F16', shape: [groups, c.n], bytes: f16s(c) },
    { name: `${p}.g_idx`, dtype: 'I32', shape: [c.k], bytes: int32s(gIdx) },
  ];
}

function awqTensors(name: string, c: Codes): RawTensor[] {
  const groups = c.k / GROUP;
  const qweight = new Int32Array(c.k * (c.n / 8));
  const qzeros = new Int32Array(groups * (c.n / 8));
  for (let word = 0; word < c.n / 8; word++) {
    for (let i = 0; i < 8; i++) {
      const r = 8 * word + AWQ_ORDER[i]!;
      for (let col = 0; col < c.k; col++) qweight[col * (c.n / 8) + word]! |= c.q[r * c.k + col]! << (4 * i);
      for (let g = 0; g < groups; g++) qzeros[g * (c.n / 8) + word]! |= c.z[r * groups + g]! << (4 * i);
    }
  }
  const p = name.replace(/\.weight$/, '');
  return [
    { name: `${p}.qweight`, dtype: 'I32', shape: [c.k, c.n / 8], bytes: int32s(qweight) },
    { name: `${p}.qzeros`, dtype: 'I32', shape: [groups, c.n / 8], bytes: int32s(qzeros) },
    { name: `${p}.scales`, dtype: 'F16', shape: [groups, c.n], bytes: f16s(c) },
  ];
}

/** llama-tiny as a packed checkpoint (dir) and as the dense model its codes stand for (dir-dense). */
function writePacked(dir: string, method: 'gptq' | 'awq', symmetric: boolean, edit: (t: RawTensor[]) => RawTensor[] = (t) => t,
  quantConfig: Record<string, unknown> = {}): string {
  const source = fixtureDir('llama-tiny');
  const packed: RawTensor[] = [], dense: RawTensor[] = [];
  for (const t of readTensors(path.join(source, 'model.safetensors'))) {
    if (!PROJECTION.test(t.name)) {
      packed.push(t);
      dense.push(t);
      continue;
    }
    const [n, k] = t.shape as [number, number];
    const codes = quantize(toFloat32(Uint8Array.from(t.bytes), 'f32'), n, k, symmetric);
    packed.push(...(method === 'gptq' ? gptqTensors(t.name, codes, (z) => z - 1) : awqTensors(t.name, codes)));
    dense.push({ name: t.name, dtype: 'F32', shape: [n, k], bytes: Buffer.from(dequantized(codes).buffer) });
  }
  const config = JSON.parse(readFileSync(path.join(source, 'config.json'), 'utf8')) as Record<string, unknown>;
  for (const [to, tensors, cfg] of [
    [dir, edit(packed), { ...config, quantization_config: method === 'gptq'
      ? { quant_method: 'gptq', bits: 4, group_size: GROUP, desc_act: false, sym: symmetric, ...quantConfig }
      : { quant_method: 'awq', bits: 4, group_size: GROUP, version: 'GEMM', zero_point: true, ...quantConfig } }],
    [`${dir}-dense`, dense, config],
  ] as const) {
    mkdirSync(to, { recursive: true });
    writeTensors(path.join(to, 'model.safetensors'), [...tensors]);
    writeFileSync(path.join(to, 'config.json'), JSON.stringify(cfg));
    for (const file of ['tokenizer.json', 'tokenizer_config.json']) writeFileSync(path.join(to, file), readFileSync(path.join(source, file)));
  }
  return dir;
}

async function logprobs(modelDir: string, tp: number, prompt: number[]): Promise<Float32Array[]> {
  const cluster = await startCluster({ modelDir, tp, threads: 1 });
  try {
    return (await cluster.score(prompt, { full: true })).full!;
  } finally {
    await cluster.close();
  }
}

for (const c of [{ method: 'gptq', symmetric: true, kind: 'int4' }, { method: 'awq', symmetric: false, kind: 'int8' }] as const) {
  test(`${c.method} ${c.symmetric ? 'symmetric' : 'asymmetric'} 4-bit, loaded as ${c.kind} and converted by weft quantize, scores as the dense model its codes stand for (tp 1, 2)`, async () => {
    const packed = writePacked(path.join(tmp, `${c.method}-${c.symmetric}`), c.method, c.symmetric);
    const spec = readModelSpec(packed);
    assert.equal(spec.quantization?.kind, c.kind);
    assert.equal(spec.quantization?.groupSize, GROUP);
    assert.equal(spec.quantization?.packed?.method, c.method);
    const out = `${packed}-weft`;
    const summary = await quantizeCheckpoint({ modelDir: packed, out, groupSize: 'channel' });
    assert.equal(summary.format, c.kind);
    assert.equal(summary.groupSize, GROUP);
    assert.equal(summary.tensorsQuantized, 14); // 7 projections x 2 layers
    assert.deepEqual(readModelSpec(out).quantization, { kind: c.kind, groupSize: GROUP, atLoad: false });
    const prompt = readReference('llama-tiny').prompts[0]!;
    for (const tp of [1, 2]) {
      const want = await logprobs(`${packed}-dense`, tp, prompt);
      for (const [how, dir] of [['loaded', packed], ['converted', out]] as const) {
        const got = await logprobs(dir, tp, prompt);
        const worst = Math.max(...got.map((row, r) => maxAbsDiff(row, want[r]!)));
        assert.ok(worst <= 1e-5, `${how}, tp ${tp}: max abs log-prob difference ${worst}`);
      }
    }
  });
}

test('packed checkpoints weft cannot read exactly are refused, converted or loaded, naming the tensor or field', async () => {
  const refuse = async (name: string, dir: string, pattern: RegExp, format?: 'int8' | 'int4') => {
    await assert.rejects(quantizeCheckpoint({ modelDir: dir, out: `${dir}-weft`, groupSize: 'channel', ...(format ? { format } : {}) }), pattern, name);
    assert.equal(existsSync(`${dir}-weft`), false, `${name}: refused before anything is written`);
  };
  const gIdxPermuted = (ts: RawTensor[]) => ts.map((t) => {
    if (!t.name.endsWith('layers.1.mlp.down_proj.g_idx')) return t;
    const g = new Int32Array(Uint8Array.from(t.bytes).buffer);
    [g[0], g[GROUP]] = [g[GROUP]!, g[0]!];
    return { ...t, bytes: Buffer.from(g.buffer) };
  });
  await refuse('act-order', writePacked(path.join(tmp, 'act-order'), 'gptq', true, gIdxPermuted),
    /model\.layers\.1\.mlp\.down_proj\.g_idx: column 0 is in group 1, not 0: act-order/);
  await refuse('no qzeros', writePacked(path.join(tmp, 'no-zeros'), 'awq', false, (ts) => ts.filter((t) => !t.name.endsWith('layers.0.self_attn.k_proj.qzeros'))),
    /tensor "model\.layers\.0\.self_attn\.k_proj\.qzeros" \(from model\.layers\.0\.self_attn\.k_proj\.qweight \[64, 4\]; awq checkpoint\) is missing/);
  await refuse('bits 8', writePacked(path.join(tmp, 'bits-8'), 'gptq', true, undefined, { bits: 8 }), /quantization_config bits 8: weft reads 4-bit gptq/);
  await refuse('awq gemv', writePacked(path.join(tmp, 'gemv'), 'awq', false, undefined, { version: 'gemv' }), /version "gemv": weft reads AWQ's "gemm" packing only/);
  await refuse('int4 of an asymmetric one', writePacked(path.join(tmp, 'asym-int4'), 'awq', false), /zero points other than 8 \(asymmetric\)/, 'int4');
  const shrunk = (ts: RawTensor[]) => ts.map((t) => (t.name.endsWith('layers.0.mlp.up_proj.scales') ? { ...t, shape: [t.shape[0]! * 2, t.shape[1]! / 2] } : t));
  await refuse('scales shape', writePacked(path.join(tmp, 'scales-shape'), 'gptq', true, shrunk),
    /tensor "model\.layers\.0\.mlp\.up_proj\.scales" has shape \[16, 88\], expected \[8, 176\] for a \[176, 64\] projection/);
  const withHead = writePacked(path.join(tmp, 'lm-head'), 'gptq', true);
  await assert.rejects(quantizeCheckpoint({ modelDir: withHead, out: `${withHead}-weft`, groupSize: 'channel', quantizeLmHead: true }),
    /--quantize-lm-head: a GPTQ\/AWQ checkpoint converts as it was quantized, with its LM head dense/);
  assert.equal(existsSync(`${withHead}-weft`), false, 'lm head: refused before anything is written');
  // the same refusals when a cluster loads one
  await assert.rejects(startCluster({ modelDir: path.join(tmp, 'act-order'), threads: 1 }), /down_proj\.g_idx: column 0 is in group 1, not 0: act-order/);
  await assert.rejects(startCluster({ modelDir: path.join(tmp, 'no-zeros'), threads: 1 }), /tensor "model\.layers\.0\.self_attn\.k_proj\.qzeros" \(for weft's layers\.0\.wqkv; awq checkpoint\) is missing/);
  await assert.rejects(startCluster({ modelDir: path.join(tmp, 'scales-shape'), threads: 1 }), /tensor "model\.layers\.0\.mlp\.up_proj\.scales" has shape \[16, 88\], expected \[8, 176\]/);
  assert.throws(() => readModelSpec(path.join(tmp, 'bits-8')), /quantization_config bits 8: weft reads 4-bit gptq checkpoints/);
  const notSymmetric = writePacked(path.join(tmp, 'sym-lies'), 'gptq', false, undefined, { sym: true });
  await assert.rejects(startCluster({ modelDir: notSymmetric, threads: 1 }), /model\.layers\.0\.self_attn\.q_proj\.qzeros: zero points other than 8 in a checkpoint config\.json calls symmetric/);
});
