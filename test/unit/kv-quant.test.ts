// fp8 (e4m3) and int8 KV caches on the CPU backend (native/src/kv-quant.h): qkvRope and writeKv quantize each
// (position, kv head) row as they write it, with one f32 scale per row; download gives the values every read
// sees (code * scale). Checked against a rounding written here apart from the native one (nearest of the 256
// e4m3 values, ties to the even code), then: attention over a paged quantized cache equals f32 attention over the
// dequantized cache bit for bit, at block edges and ragged lengths; a prefix-cache hit draws the tokens of a miss
// with an fp8 cache; bad dtypes are refused with messages that name them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Tensor } from '../../worker/native.ts';
import { kvCacheLayout, kvDtypeBytes, kvNativeDtype, type KvDtype } from '../../core/kv-block-table.ts';
import { apiConfig } from '../../coordinator/config.ts';
import { isWeftError } from '../../core/errors.ts';
import { prng } from '../helpers/random.ts';
import { readReference } from '../helpers/fixtures.ts';
import { PAGED_MAX_CONTEXT as MAX_CONTEXT, pagedScheduler as tinyScheduler, runPaged as run, type TinyRequest as Request } from '../helpers/tiny-scheduler.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });

const bytesOf = (a: Float32Array | Int32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (values: Float32Array, shape: number[]): Tensor => engine.upload(bytesOf(values), 'f32', shape);
const i32 = (values: readonly number[]): Tensor => engine.upload(bytesOf(Int32Array.from(values)), 'i32', [values.length]);
const table = (rows: number[][]): Tensor => engine.upload(bytesOf(Int32Array.from(rows.flat())), 'i32', [rows.length, rows[0]!.length]);
const get = (t: Tensor): Float32Array => engine.download(t) as Float32Array;
const f = Math.fround;

/** The 128 non-negative finite e4m3 values by code (0x00..0x7e), from the format's definition. */
const E4M3 = Array.from({ length: 0x7f }, (_, code) => {
  const exponent = code >> 3, mantissa = code & 7;
  return exponent === 0 ? mantissa * 2 ** -9 : (1 + mantissa / 8) * 2 ** (exponent - 7);
});

/** e4m3 rounding of x: the nearest value, ties to the even code, past 448 saturated. */
function roundE4m3(x: number): number {
  const a = Math.min(Math.abs(x), 448);
  let best = 0;
  for (let code = 1; code < E4M3.length; code++) {
    const d = Math.abs(E4M3[code]! - a), dBest = Math.abs(E4M3[best]! - a);
    if (d < dBest || (d === dBest && code % 2 === 0)) best = code;
  }
  return Math.sign(x) * E4M3[best]!;
}

/** int8 rounding: to nearest, ties to even, clamped to +-127. */
function roundInt8(x: number): number {
  const c = Math.max(-127, Math.min(127, x));
  const r = Math.round(c);
  return (Math.abs(c - Math.trunc(c)) === 0.5 && r % 2 !== 0 ? r - 1 : r) + 0; // + 0: an int8 has no -0
}

/** What a row of `values` reads back as: code * scale with scale = amax / QMAX, in f32 steps (kv-quant.h). */
function quantizedRow(values: Float32Array, dtype: 'fp8' | 'int8'): Float32Array {
  const qmax = dtype === 'fp8' ? 448 : 127;
  const amax = values.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
  const scale = amax > 0 ? f(amax / qmax) : 0, inv = amax > 0 ? f(qmax / amax) : 0;
  return values.map((x) => f((dtype === 'fp8' ? roundE4m3(f(x * inv)) : roundInt8(f(x * inv))) * scale));
}

const randoms = (rand: () => number, n: number, spread: number): Float32Array =>
  Float32Array.from({ length: n }, () => (2 * rand() - 1) * spread ** (2 * rand() - 1)); // magnitudes over 2 decades

test('writeKv stores each (position, kv head) row quantized with its scale, as an independent rounding does', () => {
  const rand = prng(3);
  const [nKv, B, hd] = [2, 4, 16];
  for (const dtype of ['fp8', 'int8'] as const) {
    const k = engine.zeros(kvNativeDtype(dtype), [3, nKv, B, hd]), v = engine.zeros(kvNativeDtype(dtype), [3, nKv, B, hd]);
    const rows = randoms(rand, 5 * nKv * hd, 10);
    rows.fill(0, 0, hd); // a zero row: scale 0, codes 0
    rows[hd] = 1e6; // a row with one outlier
    const vRows = rows.map((x) => -2 * x);
    // 5 positions of sequence 0 over blocks [2, 0]: positions 0-3 in block 2, position 4 in block 0 (row 0)
    engine.writeKv(k, v, f32(rows, [5, nKv * hd]), f32(vRows, [5, nKv * hd]), i32([0, 0, 0, 0, 0]), table([[2, 0]]), i32([0, 1, 2, 3, 4]));
    const [gotK, gotV] = [get(k), get(v)];
    for (let p = 0; p < 5; p++)
      for (let h = 0; h < nKv; h++) {
        const at = ((p < 4 ? 2 : 0) * nKv + h) * B * hd + (p % 4) * hd, src = (p * nKv + h) * hd;
        assert.deepEqual(gotK.slice(at, at + hd), quantizedRow(rows.slice(src, src + hd), dtype), `${dtype} k position ${p} head ${h}`);
        assert.deepEqual(gotV.slice(at, at + hd), quantizedRow(vRows.slice(src, src + hd), dtype), `${dtype} v position ${p} head ${h}`);
      }
  }
});

test('paged fp8 / int8 attention equals f32 attention over the dequantized cache, at block edges and ragged lengths', () => {
  const rand = prng(11);
  const [nHeads, nKv, hd, B, nBlocks] = [4, 2, 16, 4, 12];
  const width = (nHeads + 2 * nKv) * hd;
  const invFreq = f32(Float32Array.from({ length: hd / 2 }, (_, j) => 10000 ** (-(2 * j) / hd)), [hd / 2]);
  // three sequences of 4 (one block exactly), 9 (an edge + 1) and 11 (ragged) positions over scattered blocks
  const lengths = [4, 9, 11];
  const blocks = table([[7, 0, 0], [3, 9, 1], [11, 5, 2]]);
  const seq = lengths.flatMap((n, s) => Array<number>(n).fill(s));
  const pos = lengths.flatMap((n) => Array.from({ length: n }, (_, p) => p));
  for (const dtype of ['fp8', 'int8'] as const) {
    const k = engine.zeros(kvNativeDtype(dtype), [nBlocks, nKv, B, hd]), v = engine.zeros(kvNativeDtype(dtype), [nBlocks, nKv, B, hd]);
    const qkv = randoms(rand, seq.length * width, 4);
    const q = engine.qkvRope(f32(qkv, [seq.length, width]), i32(pos), invFreq, k, v, i32(seq), blocks, nHeads);
    // the f32 reference: the same table over caches holding what the quantized ones read back
    const kRef = f32(get(k), [nBlocks, nKv, B, hd]), vRef = f32(get(v), [nBlocks, nKv, B, hd]);
    const scale = 1 / Math.sqrt(hd);
    const prefill = engine.attention(q, k, v, i32(seq), blocks, i32(pos), nHeads, scale);
    assert.deepEqual(get(prefill), get(engine.attention(q, kRef, vRef, i32(seq), blocks, i32(pos), nHeads, scale)), `${dtype} prefill`);
    // one decode token per sequence (its row written first), then attention over every position so far
    const last = lengths.map((n) => n);
    const qd = engine.qkvRope(f32(randoms(rand, 3 * width, 4), [3, width]), i32(last), invFreq, k, v, i32([0, 1, 2]), blocks, nHeads);
    const [kDec, vDec] = [f32(get(k), [nBlocks, nKv, B, hd]), f32(get(v), [nBlocks, nKv, B, hd])];
    const decode = get(engine.attention(qd, k, v, i32([0, 1, 2]), blocks, i32(last), nHeads, scale));
    assert.deepEqual(decode, get(engine.attention(qd, kDec, vDec, i32([0, 1, 2]), blocks, i32(last), nHeads, scale)), `${dtype} decode`);
    // and near the attention of an f32 cache fed the same rows (the rounding of k and v is all that differs)
    const kF32 = engine.zeros('f32', [nBlocks, nKv, B, hd]), vF32 = engine.zeros('f32', [nBlocks, nKv, B, hd]);
    engine.qkvRope(f32(qkv, [seq.length, width]), i32(pos), invFreq, kF32, vF32, i32(seq), blocks, nHeads);
    const exact = get(engine.attention(q, kF32, vF32, i32(seq), blocks, i32(pos), nHeads, scale));
    const diff = Math.max(...Array.from(get(prefill), (x, i) => Math.abs(x - exact[i]!)));
    const top = Math.max(...Array.from(exact, Math.abs));
    assert.ok(diff > 0 && diff < (dtype === 'fp8' ? 0.05 : 0.01) * top, `${dtype}: prefill within ${diff} of the f32 cache's (max |out| ${top})`);
  }
});

test('prefix caching with an fp8 cache: a hit draws the tokens of a miss', async () => {
  const text = readReference('llama-tiny').prompts[2]!;
  const shared = text.slice(0, 18);
  const batch: Request[] = [1, 2, 5].map((extra, i) => ({
    prompt: [...shared, ...text.slice(20 + i, 20 + i + extra)],
    sampling: i % 2 === 0 ? { maxNewTokens: 10, ignoreEos: true } : { maxNewTokens: 10, ignoreEos: true, temperature: 0.9, seed: 3 + i },
  }));
  const expected = await run((await tinyScheduler({ kvSlots: batch.length, kvDtype: 'fp8' })).scheduler, batch);
  const cache = await tinyScheduler({ kvSlots: batch.length, kvBlockSize: 4, kvCacheTokens: 4 * MAX_CONTEXT, kvDtype: 'fp8' }, true);
  const [first] = await run(cache.scheduler, batch.slice(0, 1));
  assert.equal(cache.prefix.hit, 0, 'the first is a miss');
  const rest = await run(cache.scheduler, batch.slice(1));
  assert.ok(cache.prefix.hit >= 2 * 16, `${cache.prefix.hit} prompt tokens hit`);
  assert.deepEqual([first, ...rest], expected, 'a hit gives the tokens of a miss');
  const f32Tokens = await run((await tinyScheduler({ kvSlots: batch.length, kvDtype: 'f32' })).scheduler, batch);
  const agree = f32Tokens[0]!.filter((t, i) => t === expected[0]![i]).length;
  console.log(`# fp8 KV, tiny llama: ${agree} of ${f32Tokens[0]!.length} greedy tokens as with the f32 cache`);
});

test('the KV dtypes: sizes count the scales, bad values are refused naming them', () => {
  assert.deepEqual((['f32', 'bf16', 'fp8', 'int8'] as KvDtype[]).map((d) => kvDtypeBytes(d, 128)), [4, 2, 1 + 4 / 128, 1 + 4 / 128]);
  assert.equal(kvCacheLayout({ kvSlots: 2, maxContext: 8, device: 'cuda', kvDtype: 'int8' }).kvDtype, 'int8');
  assert.equal(apiConfig('cluster', { modelDir: '/m', kvDtype: 'fp8' }).kvDtype, 'fp8');
  assert.throws(() => apiConfig('cluster', { modelDir: '/m', kvDtype: 'fp4' }), (err: unknown) => isWeftError(err) && /^kvDtype must be one of .*fp8.*int8/.test(err.message));
  const refused = (fn: () => unknown, pattern: RegExp) => assert.throws(fn, (err: unknown) => err instanceof Error && pattern.test(err.message));
  refused(() => engine.zeros('fp8', [4, 16]), /^zeros: an fp8 tensor is a KV cache \[nBlocks, nKv, B, hd\] with hd a multiple of 4 \(got \[4, 16\]\)/);
  refused(() => engine.zeros('i8', [1, 1, 4, 6]), /^zeros: an i8 tensor is a KV cache .* \(got \[1, 1, 4, 6\]\)/);
  refused(() => engine.upload(new Uint8Array(4), 'fp8', [4]), /^upload: dtype 'fp8' is a quantized type/);
  const fp8 = engine.zeros('fp8', [1, 1, 4, 8]), int8 = engine.zeros('i8', [1, 1, 4, 8]);
  refused(() => engine.writeKv(fp8, int8, f32(new Float32Array(8), [1, 8]), f32(new Float32Array(8), [1, 8]), i32([0]), table([[0]]), i32([0])),
    /^writeKv: kCache \[1, 1, 4, 8\] fp8 and vCache \[1, 1, 4, 8\] i8 must both be f32 or both bf16 \(or both fp8 or both i8/);
  refused(() => engine.downloadAsync(fp8), /^downloadAsync: t \[1, 1, 4, 8\] fp8 is a quantized KV cache/);
});
