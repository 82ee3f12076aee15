// bf16 KV caches on the CPU backend: writeKv and qkvRope store the f32 path's values rounded to nearest even,
// attention reads them back into the f32 path's arithmetic. So with values that are already bf16 the results
// equal the f32 cache's bit for bit, and otherwise they differ only by the rounding of the stored k and v
// (bound derived at the tolerance test). A cache of another dtype, or k and v caches of different dtypes, are
// refused naming both. The option's values and defaults (test/integration/kv-dtype.test.ts runs it end to end).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Tensor } from '../../worker/native.ts';
import { kvCacheLayout, kvDtypeBytes, resolveKvDtype } from '../../core/kv-block-table.ts';
import { apiConfig } from '../../coordinator/config.ts';
import { isWeftError } from '../../core/errors.ts';
import { maxAbsDiff } from '../helpers/fixtures.ts';
import { prng } from '../helpers/random.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });

const bytesOf = (a: Float32Array | Int32Array | Uint16Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (values: Float32Array, shape: number[]): Tensor => engine.upload(bytesOf(values), 'f32', shape);
const i32 = (values: readonly number[]): Tensor => engine.upload(bytesOf(Int32Array.from(values)), 'i32', [values.length]);
const table = (rows: number[][]): Tensor => engine.upload(bytesOf(Int32Array.from(rows.flat())), 'i32', [rows.length, rows[0]!.length]);
const get = (t: Tensor): Float32Array => engine.download(t) as Float32Array;
const randoms = (rand: () => number, n: number): Float32Array => Float32Array.from({ length: n }, () => 2 * rand() - 1);

/** The f32 value of bf16(x), rounded to nearest even from the f32 bits (finite x only), written apart from the native rule. */
function roundBf16(values: Float32Array): Float32Array {
  const bits = new Uint32Array(Float32Array.from(values).buffer);
  return new Float32Array(Uint32Array.from(bits, (b) => (((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16) >>> 0).buffer);
}

const fromBits = (bits: number[]): Float32Array => new Float32Array(Uint32Array.from(bits).buffer);

/** Paged caches of nBlocks blocks of B positions, NaN where nothing was written (a stray read shows). */
function caches(dtype: 'f32' | 'bf16', nBlocks: number, nKv: number, B: number, hd: number): { k: Tensor; v: Tensor } {
  const shape = [nBlocks, nKv, B, hd];
  const make = (): Tensor => {
    const t = engine.zeros(dtype, shape);
    engine.write(t, dtype === 'f32' ? bytesOf(new Float32Array(nBlocks * nKv * B * hd).fill(NaN)) : bytesOf(new Uint16Array(nBlocks * nKv * B * hd).fill(0x7fc0)));
    return t;
  };
  return { k: make(), v: make() };
}

test('writeKv into a bf16 cache rounds to nearest, ties to even; NaN stays NaN, overflow goes to infinity', () => {
  const special = fromBits([
    0x3f808000, // 1.00390625: a tie, kept half even -> 1
    0x3f818000, // a tie, kept half odd -> rounds up to 0x3f82
    0x3f808001, // just over the tie -> up
    0x3f807fff, // just under the tie -> down
    0xbf818000, // negative tie, odd -> away from zero
    0x7f7fffff, // the largest f32 -> +inf
    0x80000000, // -0
    0x7fc00001, // NaN
  ]);
  const k = f32(special, [1, 8]), v = f32(Float32Array.from(special).reverse(), [1, 8]);
  const c = caches('bf16', 1, 1, 2, 8);
  engine.writeKv(c.k, c.v, k, v, i32([0]), table([[0]]), i32([1]));
  const got = get(c.k).subarray(8, 16);
  const want = fromBits([0x3f800000, 0x3f820000, 0x3f810000, 0x3f800000, 0xbf820000, 0x7f800000, 0x80000000]);
  assert.deepEqual([...got.subarray(0, 7)], [...want]);
  assert.ok(Object.is(got[6], -0), '-0 keeps its sign');
  assert.ok(Number.isNaN(got[7]), 'NaN stays NaN');
  assert.ok(Number.isNaN(get(c.v)[8]) && Number.isNaN(get(c.k)[0]), 'row 0 untouched (and v row 1 starts with the NaN)');

  const rand = prng(5);
  const values = randoms(rand, 4 * 2 * 16);
  const r = caches('bf16', 2, 2, 4, 16);
  engine.writeKv(r.k, r.v, f32(values, [4, 32]), f32(values, [4, 32]), i32([0, 0, 1, 1]), table([[1], [0]]), i32([0, 1, 2, 3]));
  const kc = get(r.k), rounded = roundBf16(values);
  for (const [t, block, pos] of [[0, 1, 0], [1, 1, 1], [2, 0, 2], [3, 0, 3]] as const)
    for (let h = 0; h < 2; h++) {
      const row = ((block * 2 + h) * 4 + pos) * 16;
      assert.deepEqual([...kc.subarray(row, row + 16)], [...rounded.subarray((t * 2 + h) * 16, (t * 2 + h + 1) * 16)], `token ${t} head ${h}`);
    }
});

/** One batch through qkvRope then attention (prefill), and a decode token after it, on caches of one dtype. */
function forward(dtype: 'f32' | 'bf16', inputs: { qkv: Float32Array; q1: Float32Array; kv1: Float32Array }) {
  const nHeads = 6, nKv = 2, hd = 8, B = 4, width = (nHeads + 2 * nKv) * hd, scale = 1 / Math.sqrt(hd);
  const invFreq = f32(Float32Array.from({ length: hd / 2 }, (_, j) => 1 / 10000 ** ((2 * j) / hd)), [hd / 2]);
  // two sequences in blocks of 4, out of order in a pool of 7: sequence 0 has 7 positions, sequence 1 has 5
  const blocks = table([[5, 1], [2, 6]]);
  const seq = [0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1], pos = [0, 0, 1, 2, 1, 3, 2, 4, 3, 5, 6, 4];
  const T = seq.length;
  const c = caches(dtype, 7, nKv, B, hd);
  const q = engine.qkvRope(f32(inputs.qkv, [T, width]), i32(pos), invFreq, c.k, c.v, i32(seq), blocks, nHeads);
  const prefill = get(engine.attention(q, c.k, c.v, i32(seq), blocks, i32(pos), nHeads, scale));
  engine.writeKv(c.k, c.v, f32(inputs.kv1, [1, nKv * hd]), f32(inputs.kv1.map((x) => -x), [1, nKv * hd]), i32([1]), blocks, i32([5]));
  const decode = get(engine.attention(f32(inputs.q1, [1, nHeads * hd]), c.k, c.v, i32([1]), blocks, i32([5]), nHeads, scale));
  return { q: get(q), k: get(c.k), v: get(c.v), prefill, decode, hd };
}

test('qkvRope into a bf16 cache stores the f32 path\'s k and v rounded; q is the same', () => {
  const rand = prng(21);
  const inputs = { qkv: randoms(rand, 12 * 80), q1: randoms(rand, 48), kv1: randoms(rand, 16) };
  const a = forward('f32', inputs), b = forward('bf16', inputs);
  assert.deepEqual(b.q, a.q);
  // NaN (never written) stays NaN through the rounding, so the whole pools compare
  assert.deepEqual(b.k, roundBf16(a.k));
  assert.deepEqual(b.v, roundBf16(a.v));
});

test('attention over a bf16 cache equals the f32 cache bit for bit when k and v are bf16 values (prefill and decode, GQA, paged)', () => {
  const rand = prng(22);
  // k and v written with writeKv (no rotation, which would make them f32 values again); q stays f32
  const nHeads = 6, nKv = 2, hd = 8, B = 4, scale = 1 / Math.sqrt(hd);
  const blocks = table([[5, 1], [2, 6]]);
  const seq = [0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1], pos = [0, 0, 1, 2, 1, 3, 2, 4, 3, 5, 6, 4];
  const T = seq.length;
  const k = roundBf16(randoms(rand, T * nKv * hd)), v = roundBf16(randoms(rand, T * nKv * hd)), q = randoms(rand, T * nHeads * hd);
  const run = (dtype: 'f32' | 'bf16') => {
    const c = caches(dtype, 7, nKv, B, hd);
    engine.writeKv(c.k, c.v, f32(k, [T, nKv * hd]), f32(v, [T, nKv * hd]), i32(seq), blocks, i32(pos));
    const prefill = get(engine.attention(f32(q, [T, nHeads * hd]), c.k, c.v, i32(seq), blocks, i32(pos), nHeads, scale));
    const decode = get(engine.attention(f32(q.subarray(0, nHeads * hd), [1, nHeads * hd]), c.k, c.v, i32([0]), blocks, i32([6]), nHeads, scale));
    return { prefill, decode, k: get(c.k) };
  };
  const a = run('f32'), b = run('bf16');
  assert.deepEqual(b.k, a.k, 'bf16 values are stored unchanged');
  assert.ok(a.prefill.every(Number.isFinite) && a.decode.every(Number.isFinite));
  assert.deepEqual(b.prefill, a.prefill);
  assert.deepEqual(b.decode, a.decode);
});

test('attention over a bf16 cache of arbitrary values stays within the bound of bf16 rounding of k and v', () => {
  const rand = prng(23);
  const inputs = { qkv: randoms(rand, 12 * 80), q1: randoms(rand, 48), kv1: randoms(rand, 16) };
  const a = forward('f32', inputs), b = forward('bf16', inputs);
  // Each stored k and v is off by at most 2^-9 relative (8 significant bits, round to nearest). An output is
  // o = sum_i p_i v_i with p = softmax(s), s_i = scale * q.k_i:
  //  - v's rounding moves o by at most 2^-9 * sum_i p_i |v_i| <= 2^-9 * max|v|;
  //  - k's rounding moves each score by at most ds = 2^-9 * scale * sum_d |q_d k_id| <= 2^-9 * scale * hd *
  //    max|q| * max|k|, which moves each p_i by at most about 2 ds p_i (first order), hence o by 2 ds * max|v|.
  // tol = (2^-9 + 2 ds) * max|v|, with 10% over first order; the maxima are measured from the inputs.
  const maxAbs = (x: Float32Array): number => x.reduce((m, y) => (Number.isNaN(y) ? m : Math.max(m, Math.abs(y))), 0);
  const qMax = Math.max(maxAbs(a.q), maxAbs(inputs.q1)), kMax = maxAbs(a.k), vMax = maxAbs(a.v);
  const tol = (2 ** -9 + 2 * 2 ** -9 * (1 / Math.sqrt(a.hd)) * a.hd * qMax * kMax) * vMax * 1.1;
  for (const what of ['prefill', 'decode'] as const) {
    const err = maxAbsDiff(b[what], a[what]);
    assert.ok(err <= tol, `${what}: max |bf16 - f32| = ${err} > ${tol}`);
    assert.ok(err > 0, `${what}: the bf16 cache changed nothing (was it rounded?)`);
  }
});

test('caches other than f32 or bf16, or of two dtypes, are refused naming both', () => {
  const k = f32(new Float32Array(8), [1, 8]), seq = i32([0]), one = table([[0]]), pos = i32([0]);
  const f16 = { k: engine.zeros('f16', [1, 1, 2, 8]), v: engine.zeros('f16', [1, 1, 2, 8]) };
  const mixed = { k: engine.zeros('bf16', [1, 1, 2, 8]), v: engine.zeros('f32', [1, 1, 2, 8]) };
  const refused = (fn: () => unknown, pattern: RegExp) => assert.throws(fn, (err: unknown) => (err as { code?: string }).code === 'WEFT_NATIVE' && pattern.test((err as Error).message));
  refused(() => engine.writeKv(f16.k, f16.v, k, k, seq, one, pos), /^writeKv: kCache \[1, 1, 2, 8\] f16 and vCache \[1, 1, 2, 8\] f16 must both be f32 or both bf16/);
  refused(() => engine.writeKv(mixed.k, mixed.v, k, k, seq, one, pos), /^writeKv: kCache \[1, 1, 2, 8\] bf16 and vCache \[1, 1, 2, 8\] f32 must both be f32 or both bf16/);
  refused(() => engine.attention(k, mixed.v, mixed.k, seq, one, pos, 1, 1), /^attention: kCache \[1, 1, 2, 8\] f32 and vCache \[1, 1, 2, 8\] bf16 must both be f32 or both bf16/);
  refused(() => engine.qkvRope(f32(new Float32Array(24), [1, 24]), pos, f32(new Float32Array(4), [4]), f16.k, f16.v, seq, one, 1), /^qkvRope: kCache .* f16 and vCache .* f16 must both be f32 or both bf16/);
});

test('--kv-dtype: auto is bf16 on cuda and f32 on cpu; the layout carries it; other values are refused', () => {
  assert.deepEqual([resolveKvDtype('auto', 'cuda'), resolveKvDtype('auto', 'cpu'), resolveKvDtype('f32', 'cuda'), resolveKvDtype('bf16', 'cpu')], ['bf16', 'f32', 'f32', 'bf16']);
  assert.deepEqual([kvDtypeBytes('f32'), kvDtypeBytes('bf16')], [4, 2]);
  assert.equal(kvCacheLayout({ kvSlots: 2, maxContext: 8, device: 'cuda' }).kvDtype, 'bf16');
  assert.equal(kvCacheLayout({ kvSlots: 2, maxContext: 8, device: 'cuda', kvDtype: 'f32' }).kvDtype, 'f32');
  assert.equal(apiConfig('cluster', { modelDir: '/m' }).kvDtype, 'auto');
  assert.throws(() => apiConfig('cluster', { modelDir: '/m', kvDtype: 'f16' }), (err: unknown) => isWeftError(err) && /^kvDtype must be one of/.test(err.message));
});
