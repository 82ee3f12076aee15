// The native CPU backend, op by op, against plain-TypeScript references on seeded random inputs.
// Needs native/build/weft.node (`npm run build:native`).
//
// Tolerances. References compute in double. An fp32 result with rounding unit u = 2^-24 ≈ 6e-8:
//  - elementwise ops (add, siluMul, rope, rmsNorm's scaling): a few u relative → rtol 1e-6 (rope: cos/sin of
//    an fp32 angle, |x| <= 1 → atol 1e-6);
//  - reductions over n terms (matmul K <= 300, attention, log-softmax V <= 1000): error <= n·u·Σ|terms|,
//    so we bound |got - want| <= 1e-5 · Σ|terms| (Σ|terms| computed by the reference), "1e-5 relative";
//  - copies (embedding, slice/concat/gather, f16/bf16 conversion, writeKv): exact.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PerformanceObserver, constants, type PerformanceEntry } from 'node:perf_hooks';
import { createEngine, nativeInfo, type Engine, type Tensor } from '../../worker/native.ts';
import { prng } from '../helpers/random.ts';
import { quantizeMatrix } from '../../core/weight-quantize.ts';

// ---- helpers

const randoms = (rand: () => number, n: number, lo = -1, hi = 1): Float32Array =>
  Float32Array.from({ length: n }, () => lo + (hi - lo) * rand());

const bytesOf = (a: Float32Array | Int32Array | Uint16Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (e: Engine, values: Float32Array, shape: number[]): Tensor => e.upload(bytesOf(values), 'f32', shape);
const i32 = (e: Engine, values: number[]): Tensor => e.upload(bytesOf(Int32Array.from(values)), 'i32', [values.length]);
/** A kvBlockTable [rows.length, maxBlocksPerSeq] i32 from its rows (of equal lengths). */
const table = (e: Engine, rows: number[][]): Tensor => e.upload(bytesOf(Int32Array.from(rows.flat())), 'i32', [rows.length, rows[0]?.length ?? 0]);
const get = (e: Engine, t: Tensor): Float32Array => e.download(t) as Float32Array;

/** bf16 by round-to-nearest-even of the f32 bits, and its exact f32 value. */
function toBf16(values: Float32Array): { bits: Uint16Array; exact: Float32Array } {
  const u32 = new Uint32Array(values.buffer.slice(values.byteOffset, values.byteOffset + values.byteLength));
  const bits = Uint16Array.from(u32, (b) => (b + 0x7fff + ((b >>> 16) & 1)) >>> 16);
  return { bits, exact: new Float32Array(Uint32Array.from(bits, (h) => h << 16).buffer) };
}

/** IEEE half -> number, written independently of the native converter. */
function f16Value(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

/** Random finite f16 values in about ±[2^-14, 2): bit patterns with exponent 1..15. */
function randomF16(rand: () => number, n: number): { bits: Uint16Array; exact: Float32Array } {
  const bits = Uint16Array.from({ length: n }, () => (rand() < 0.5 ? 0x8000 : 0) | ((1 + Math.floor(rand() * 15)) << 10) | Math.floor(rand() * 1024));
  return { bits, exact: Float32Array.from(bits, f16Value) };
}

function assertClose(got: ArrayLike<number>, want: ArrayLike<number>, tol: (i: number) => number, what: string): void {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    const g = got[i]!, w = want[i]!;
    if (!(Math.abs(g - w) <= tol(i))) assert.fail(`${what}[${i}]: got ${g}, want ${w} (tolerance ${tol(i)})`);
  }
}

function assertNativeError(fn: () => unknown, pattern: RegExp, type: typeof Error = Error): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof type, `expected a ${type.name}, got ${String(err)}`);
    assert.equal((err as { code?: unknown }).code, 'WEFT_NATIVE');
    assert.match((err as Error).message, pattern);
    return true;
  });
}

/** out [T, N] = x [T, K] @ w [N, K]^T in double, plus Σ|x·w| per output for the tolerance. */
function refMatmul(x: Float32Array, w: Float32Array, T: number, K: number, N: number): { out: Float64Array; mag: Float64Array } {
  const out = new Float64Array(T * N), mag = new Float64Array(T * N);
  for (let t = 0; t < T; t++)
    for (let n = 0; n < N; n++) {
      let s = 0, m = 0;
      for (let k = 0; k < K; k++) {
        s += x[t * K + k]! * w[n * K + k]!;
        m += Math.abs(x[t * K + k]! * w[n * K + k]!);
      }
      out[t * N + n] = s;
      mag[t * N + n] = m;
    }
  return { out, mag };
}

const engine = createEngine({ backend: 'cpu', threads: 3 });

// ---- foundation: loading, engines, memory

test('nativeInfo and createEngine', () => {
  const info = nativeInfo();
  assert.equal(typeof info.cuda, 'boolean');
  assert.match(info.version, /^\d+\.\d+\.\d+/);
  assert.equal(engine.backend, 'cpu');
  if (!info.cuda) {
    assertNativeError(() => createEngine({ backend: 'cuda' }), /weft was built without CUDA \(rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS\)/);
  }
  assertNativeError(() => createEngine({ backend: 'gpu' as 'cpu' }), /createEngine: options\.backend must be 'cpu' or 'cuda'/);
  assertNativeError(() => createEngine({ backend: 'cpu', threads: 0 }), /options\.threads must be an integer in \[1, 1024\]/);
});

test('upload/download round trip; tensors expose dtype and a frozen shape', () => {
  const rand = prng(1);
  const x = randoms(rand, 12);
  const t = f32(engine, x, [3, 4]);
  assert.equal(t.dtype, 'f32');
  assert.deepEqual(t.shape, [3, 4]);
  assert.ok(Object.isFrozen(t.shape));
  assert.deepEqual(get(engine, t), x);
  const ids = i32(engine, [5, -7, 2147483647]);
  const back = engine.download(ids);
  assert.ok(back instanceof Int32Array);
  assert.deepEqual([...back], [5, -7, 2147483647]);
  assert.deepEqual([...get(engine, engine.zeros('f32', [2, 3]))], [0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...engine.download(engine.zeros('i32', [2]))], [0, 0]);
  assert.deepEqual(get(engine, engine.zeros('f32', [0, 5])).length, 0);
  assertNativeError(() => engine.upload(new Uint8Array(10), 'f32', [3]), /upload: bytes has length 10 but shape \[3\] f32 needs 3 x 4 = 12 bytes/);
  assertNativeError(() => engine.upload(new Uint8Array(4), 'f64' as 'f32', [1]), /upload: dtype must be 'f32', 'f16', 'bf16' or 'i32'/);
  assertNativeError(() => engine.zeros('f32', [2, -1]), /zeros: shape\[1\] must be an integer >= 0/);
  assertNativeError(() => engine.upload(new Float32Array(1) as unknown as Uint8Array, 'f32', [1]), /upload: bytes must be a Uint8Array \(got Float32Array\)/, TypeError);
});

test('f16 and bf16 convert exactly to f32 (known values, subnormals, inf, nan)', () => {
  const f16 = [0x3c00, 0xc100, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x8000, 0x7c00, 0xfc00, 0x3555];
  const want16 = [1.0, -2.5, 65504, 2 ** -24, 1023 * 2 ** -24, 2 ** -14, -0, Infinity, -Infinity, f16Value(0x3555)];
  const got16 = get(engine, engine.upload(bytesOf(Uint16Array.from(f16)), 'f16', [f16.length]));
  assert.deepEqual([...got16], want16.map(Math.fround));
  assert.ok(Object.is(got16[6], -0));
  const nan16 = get(engine, engine.upload(bytesOf(Uint16Array.from([0x7e00, 0xfd01])), 'f16', [2]));
  assert.ok(Number.isNaN(nan16[0]) && Number.isNaN(nan16[1]));

  const bf16 = [0x3f80, 0xc020, 0x477f, 0x0001, 0x7f80, 0xff80, 0x8000];
  const want = [1.0, -2.5, 65280, 2 ** -133, Infinity, -Infinity, -0];
  const gotBf = get(engine, engine.upload(bytesOf(Uint16Array.from(bf16)), 'bf16', [bf16.length]));
  assert.deepEqual([...gotBf], want);
  // Rounding f32 -> bf16 in the test, then back natively, is exact.
  const x = randoms(prng(2), 64, -100, 100);
  const b = toBf16(x);
  assert.deepEqual(get(engine, engine.upload(bytesOf(b.bits), 'bf16', [8, 8])), b.exact);
});

// ---- ops

test('embedding: f32/bf16/f16 tables, vocab-parallel ids out of range give zero rows', () => {
  const rand = prng(3);
  const Vr = 7, H = 5, vocabStart = 10;
  const table = randoms(rand, Vr * H);
  const ids = [10, 16, 9, 17, 13, -1, 0, 12];
  for (const [dtype, bits, exact] of [
    ['f32', table, table],
    ['bf16', toBf16(table).bits, toBf16(table).exact],
    ['f16', randomF16(prng(4), Vr * H).bits, randomF16(prng(4), Vr * H).exact],
  ] as const) {
    const t = engine.upload(bytesOf(bits), dtype, [Vr, H]);
    const out = engine.embedding(t, i32(engine, ids), vocabStart);
    assert.deepEqual(out.shape, [ids.length, H]);
    const want = new Float32Array(ids.length * H);
    ids.forEach((id, r) => {
      if (id >= vocabStart && id < vocabStart + Vr) want.set(exact.subarray((id - vocabStart) * H, (id - vocabStart + 1) * H), r * H);
    });
    assert.deepEqual(get(engine, out), want, dtype);
  }
  assertNativeError(() => engine.embedding(f32(engine, table, [Vr * H]), i32(engine, ids), 0), /embedding: table must be \[Vr, H\] f32\|f16\|bf16 \(got \[35\] f32\)/);
  assertNativeError(() => engine.embedding(f32(engine, table, [Vr, H]), f32(engine, new Float32Array(2), [2]), 0), /embedding: ids must be \[T\] i32 \(got \[2\] f32\)/);
});

test('rmsNorm with f32 and bf16 weights (HF LlamaRMSNorm in fp32)', () => {
  const rand = prng(5);
  const T = 4, H = 37, eps = 1e-5;
  const x = randoms(rand, T * H, -3, 3);
  const w = toBf16(randoms(rand, H, 0.5, 1.5));
  for (const [dtype, bits] of [['f32', w.exact], ['bf16', w.bits]] as const) {
    const out = get(engine, engine.rmsNorm(f32(engine, x, [T, H]), engine.upload(bytesOf(bits), dtype, [H]), eps));
    const want = new Float64Array(T * H);
    for (let t = 0; t < T; t++) {
      let ss = 0;
      for (let i = 0; i < H; i++) ss += x[t * H + i]! ** 2;
      const inv = 1 / Math.sqrt(ss / H + eps);
      for (let i = 0; i < H; i++) want[t * H + i] = x[t * H + i]! * inv * w.exact[i]!;
    }
    assertClose(out, want, (i) => 1e-6 * Math.abs(want[i]!) + 1e-7, `rmsNorm ${dtype}`);
  }
  assertNativeError(() => engine.rmsNorm(f32(engine, x, [T, H]), f32(engine, w.exact.subarray(1), [H - 1]), eps), /rmsNorm: x \[4, 37\] f32 and weight \[36\] f32 do not match \(expected weight \[37\]\)/);
});

test('matmul with f32, bf16 and f16 weights; threaded result equals single-threaded', () => {
  const rand = prng(6);
  const T = 3, K = 67, N = 33;
  const x = randoms(rand, T * K);
  const w32 = randoms(rand, N * K);
  const wb = toBf16(w32);
  const wh = randomF16(rand, N * K);
  for (const [dtype, bits, exact] of [['f32', w32, w32], ['bf16', wb.bits, wb.exact], ['f16', wh.bits, wh.exact]] as const) {
    const out = engine.matmul(f32(engine, x, [T, K]), engine.upload(bytesOf(bits), dtype, [N, K]));
    assert.deepEqual(out.shape, [T, N]);
    const { out: want, mag } = refMatmul(x, exact, T, K, N);
    assertClose(get(engine, out), want, (i) => 1e-5 * mag[i]!, `matmul ${dtype}`); // 1e-5 · Σ|x·w|
  }
  // Large enough to be split over threads (N = 200 rows in chunks); the partition must not change results.
  const K2 = 300, N2 = 200;
  const x2 = randoms(rand, 2 * K2), w2 = toBf16(randoms(rand, N2 * K2));
  const single = createEngine({ backend: 'cpu', threads: 1 });
  const a = get(engine, engine.matmul(f32(engine, x2, [2, K2]), engine.upload(bytesOf(w2.bits), 'bf16', [N2, K2])));
  const b = get(single, single.matmul(f32(single, x2, [2, K2]), single.upload(bytesOf(w2.bits), 'bf16', [N2, K2])));
  assert.deepEqual(a, b);
  const { out: want2, mag: mag2 } = refMatmul(x2, w2.exact, 2, K2, N2);
  assertClose(a, want2, (i) => 1e-5 * mag2[i]!, 'matmul threaded');

  assertNativeError(
    () => engine.matmul(engine.zeros('f32', [3, 64]), engine.zeros('bf16', [128, 32])),
    /^matmul: x \[3, 64\] f32 and w \[128, 32\] bf16 do not match \(expected w \[N, 64\]\)$/,
  );
  assertNativeError(() => engine.matmul(engine.zeros('bf16', [3, 64]), engine.zeros('bf16', [8, 64])), /matmul: x must be \[T, K\] f32 \(got \[3, 64\] bf16\)/);
});

test('add and siluMul', () => {
  const rand = prng(7);
  const a = randoms(rand, 24, -5, 5), b = randoms(rand, 24, -5, 5);
  const sum = get(engine, engine.add(f32(engine, a, [4, 6]), f32(engine, b, [4, 6])));
  assert.deepEqual(sum, Float32Array.from(a, (v, i) => v + b[i]!)); // one fp32 rounding: exact match
  assertNativeError(() => engine.add(f32(engine, a, [4, 6]), f32(engine, b, [6, 4])), /add: a \[4, 6\] f32 and b \[6, 4\] f32 must be f32 of the same shape/);

  const T = 3, F = 10;
  const gu = randoms(rand, T * 2 * F, -6, 6);
  const out = engine.siluMul(f32(engine, gu, [T, 2 * F]));
  assert.deepEqual(out.shape, [T, F]);
  const want = new Float64Array(T * F);
  for (let t = 0; t < T; t++)
    for (let f = 0; f < F; f++) {
      const g = gu[t * 2 * F + f]!, u = gu[t * 2 * F + F + f]!;
      want[t * F + f] = (g / (1 + Math.exp(-g))) * u;
    }
  assertClose(get(engine, out), want, (i) => 1e-6 * Math.abs(want[i]!) + 1e-7, 'siluMul');
  assertNativeError(() => engine.siluMul(f32(engine, gu.subarray(0, 9), [3, 3])), /siluMul: gateUp \[3, 3\] f32 has an odd number of columns/);
});

test('rope: HF rotate_half per head, angle = fp32(pos * invFreq)', () => {
  const rand = prng(8);
  const T = 4, nHeads = 3, hd = 8, base = 10000;
  const invFreq = Float32Array.from({ length: hd / 2 }, (_, j) => 1 / base ** ((2 * j) / hd));
  const positions = [0, 1, 17, 4095];
  const x = randoms(rand, T * nHeads * hd);
  const out = get(engine, engine.rope(f32(engine, x, [T, nHeads * hd]), i32(engine, positions), f32(engine, invFreq, [hd / 2]), hd));
  const want = new Float64Array(x.length);
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nHeads; h++)
      for (let j = 0; j < hd / 2; j++) {
        const angle = Math.fround(positions[t]! * invFreq[j]!);
        const o = t * nHeads * hd + h * hd;
        const x1 = x[o + j]!, x2 = x[o + j + hd / 2]!;
        want[o + j] = x1 * Math.cos(angle) - x2 * Math.sin(angle);
        want[o + j + hd / 2] = x2 * Math.cos(angle) + x1 * Math.sin(angle);
      }
  assertClose(out, want, () => 1e-6, 'rope'); // |x| <= 1, fp32 cos/sin within ~1 ulp
  assertNativeError(() => engine.rope(f32(engine, x, [T, nHeads * hd]), i32(engine, positions), f32(engine, invFreq, [hd / 2]), 7), /rope: headDim must be a positive even number \(got 7\)/);
  assertNativeError(() => engine.rope(f32(engine, x, [T, nHeads * hd]), i32(engine, positions), f32(engine, invFreq, [hd / 2]), 16), /rope: x \[4, 24\] f32 has 24 columns, not a multiple of headDim = 16/);
});

test('addRmsNorm equals add then rmsNorm exactly (f32, bf16 and f16 weights)', () => {
  const rand = prng(41);
  const T = 5, H = 37, eps = 1e-5;
  const x = randoms(rand, T * H, -3, 3), y = randoms(rand, T * H, -3, 3);
  const w = randoms(rand, H, 0.5, 1.5);
  for (const [dtype, bits] of [['f32', w], ['bf16', toBf16(w).bits], ['f16', randomF16(prng(42), H).bits]] as const) {
    const weight = engine.upload(bytesOf(bits), dtype, [H]);
    const xt = f32(engine, x, [T, H]), yt = f32(engine, y, [T, H]);
    const { sum, normed } = engine.addRmsNorm(xt, yt, weight, eps);
    assert.deepEqual(sum.shape, [T, H]);
    assert.deepEqual(normed.shape, [T, H]);
    const wantSum = engine.add(xt, yt);
    assert.deepEqual(get(engine, sum), get(engine, wantSum), `sum ${dtype}`);
    assert.deepEqual(get(engine, normed), get(engine, engine.rmsNorm(wantSum, weight, eps)), `normed ${dtype}`);
  }
  const z = engine.addRmsNorm(engine.zeros('f32', [0, H]), engine.zeros('f32', [0, H]), f32(engine, w, [H]), eps);
  assert.deepEqual(z.normed.shape, [0, H]);
  assertNativeError(() => engine.addRmsNorm(f32(engine, x, [T, H]), f32(engine, y, [H, T]), f32(engine, w, [H]), eps), /addRmsNorm: x \[5, 37\] f32 and y \[37, 5\] f32 must have the same shape/);
  assertNativeError(() => engine.addRmsNorm(f32(engine, x, [T, H]), f32(engine, y, [T, H]), f32(engine, w.subarray(1), [H - 1]), eps), /addRmsNorm: x \[5, 37\] f32 and weight \[36\] f32 do not match \(expected weight \[37\]\)/);
  assertNativeError(() => engine.addRmsNorm(f32(engine, x, [T, H]), f32(engine, y, [T, H]), f32(engine, w, [H]), -1), /addRmsNorm: eps must be a finite number >= 0/);
});

test('qkvRope equals sliceCols x 3, rope of q and k, and writeKv, exactly (GQA and MHA)', () => {
  const rand = prng(43);
  for (const [nHeads, nKv] of [[4, 2], [3, 3], [2, 1]] as const) {
    const S = 3, C = 9, hd = 8, base = 10000;
    const invFreq = f32(engine, Float32Array.from({ length: hd / 2 }, (_, j) => 1 / base ** ((2 * j) / hd)), [hd / 2]);
    const tokenSeq = i32(engine, [2, 0, 2, 1, 0]), positions = i32(engine, [0, 8, 3, 5, 7]);
    const blocks = table(engine, [[1], [2], [0]]); // one block per sequence, not in sequence order
    const T = 5, width = (nHeads + 2 * nKv) * hd;
    const qkv = f32(engine, randoms(rand, T * width), [T, width]);
    const cache0 = randoms(rand, S * nKv * C * hd);
    const caches = () => ({ k: f32(engine, cache0, [S, nKv, C, hd]), v: f32(engine, cache0, [S, nKv, C, hd]) });
    const fused = caches(), separate = caches();
    const q = engine.qkvRope(qkv, positions, invFreq, fused.k, fused.v, tokenSeq, blocks, nHeads);
    assert.deepEqual(q.shape, [T, nHeads * hd]);
    const qEnd = nHeads * hd, kEnd = qEnd + nKv * hd;
    const wantQ = engine.rope(engine.sliceCols(qkv, 0, qEnd), positions, invFreq, hd);
    const k = engine.rope(engine.sliceCols(qkv, qEnd, kEnd), positions, invFreq, hd);
    engine.writeKv(separate.k, separate.v, k, engine.sliceCols(qkv, kEnd, width), tokenSeq, blocks, positions);
    const what = `${nHeads}/${nKv}`;
    assert.deepEqual(get(engine, q), get(engine, wantQ), `q ${what}`);
    assert.deepEqual(get(engine, fused.k), get(engine, separate.k), `kCache ${what}`);
    assert.deepEqual(get(engine, fused.v), get(engine, separate.v), `vCache ${what}`);
  }
  const c = engine.zeros('f32', [2, 2, 4, 8]), inv = engine.zeros('f32', [4]), one = table(engine, [[0], [1]]);
  const qkv = engine.zeros('f32', [1, (4 + 2 * 2) * 8]);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [0]), inv, c, c, i32(engine, [0]), one, 3), /qkvRope: qkv \[1, 64\] f32 does not match nHeads = 3 and kCache \[2, 2, 4, 8\] f32 \(expected qkv \[T, 56\]/);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [0]), engine.zeros('f32', [3]), c, c, i32(engine, [0]), one, 4), /qkvRope: invFreq \[3\] f32 does not match kCache \[2, 2, 4, 8\] f32 \(expected invFreq \[4\]\)/);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [0, 1]), inv, c, c, i32(engine, [0, 1]), one, 4), /qkvRope: tokenSeq \[2\] i32 and positions \[2\] i32 must both be \[1\]/);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [4]), inv, c, c, i32(engine, [0]), one, 4), /qkvRope: positions\[0\] = 4 is out of range for kvBlockTable \[2, 1\] i32 of blocks of 4 positions \(need 0 <= position < 4\)/);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [0]), inv, c, c, i32(engine, [-1]), one, 4), /qkvRope: tokenSeq\[0\] = -1 is out of range for kvBlockTable \[2, 1\] i32 \(need 0 <= sequence < 2\)/);
  assertNativeError(() => engine.qkvRope(qkv, i32(engine, [0]), inv, c, c, i32(engine, [1]), table(engine, [[0], [2]]), 4), /qkvRope: kvBlockTable\[1\]\[0\] = 2 \(a block of tokenSeq\[0\] = 1\) is out of range for kCache \[2, 2, 4, 8\] f32 \(need 0 <= block < 2\)/);
});

/**
 * Attention in double from a batch's own keys and values: query t attends to the tokens u of its sequence with
 * positions[u] <= positions[t] (every position up to the query's is in the batch); plus Σ p·|v| per output
 * for the tolerance.
 */
function refAttention(
  q: Float32Array, k: Float32Array, v: Float32Array, seq: readonly number[], positions: readonly number[],
  nHeads: number, nKv: number, hd: number, scale: number,
): { out: Float64Array; mag: Float64Array } {
  const T = seq.length;
  const out = new Float64Array(T * nHeads * hd), mag = new Float64Array(T * nHeads * hd);
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nHeads; h++) {
      const kvh = Math.floor(h / (nHeads / nKv));
      const keys = [...Array(T).keys()].filter((u) => seq[u] === seq[t] && positions[u]! <= positions[t]!);
      const scores = keys.map((u) => {
        let s = 0;
        for (let d = 0; d < hd; d++) s += q[(t * nHeads + h) * hd + d]! * k[(u * nKv + kvh) * hd + d]!;
        return s * scale;
      });
      const m = Math.max(...scores);
      const e = scores.map((s) => Math.exp(s - m));
      const z = e.reduce((a, b) => a + b, 0);
      for (let d = 0; d < hd; d++) {
        let o = 0, m2 = 0;
        keys.forEach((u, i) => {
          const vu = v[(u * nKv + kvh) * hd + d]!;
          o += (e[i]! / z) * vu;
          m2 += (e[i]! / z) * Math.abs(vu);
        });
        out[(t * nHeads + h) * hd + d] = o;
        mag[(t * nHeads + h) * hd + d] = m2;
      }
    }
  return { out, mag };
}

test('attention: a chunk of 40 tokens (tiles of 16 sharing each key row) equals the same queries attended one token at a time, bit for bit', () => {
  const rand = prng(41);
  const nKv = 2, nHeads = 6, hd = 32, B = 16, L = 120, scale = 1 / Math.sqrt(hd);
  const kCache = engine.zeros('f32', [8, nKv, B, hd]), vCache = engine.zeros('f32', [8, nKv, B, hd]); // 8 blocks: 128 positions
  const blocks = table(engine, [[3, 0, 6, 1, 5, 2, 4, 7]]);
  const all = [...Array(L).keys()];
  engine.writeKv(kCache, vCache, f32(engine, randoms(rand, L * nKv * hd), [L, nKv * hd]), f32(engine, randoms(rand, L * nKv * hd), [L, nKv * hd]), i32(engine, Array(L).fill(0)), blocks, i32(engine, all));
  const positions = all.slice(L - 40), T = positions.length;
  const q = randoms(rand, T * nHeads * hd);
  const chunk = get(engine, engine.attention(f32(engine, q, [T, nHeads * hd]), kCache, vCache, i32(engine, Array(T).fill(0)), blocks, i32(engine, positions), nHeads, scale));
  for (let t = 0; t < T; t++) {
    const row = q.slice(t * nHeads * hd, (t + 1) * nHeads * hd);
    const one = get(engine, engine.attention(f32(engine, row, [1, nHeads * hd]), kCache, vCache, i32(engine, [0]), blocks, i32(engine, [positions[t]!]), nHeads, scale));
    assert.deepEqual(chunk.slice(t * nHeads * hd, (t + 1) * nHeads * hd), one, `token ${t} (position ${positions[t]})`);
  }
});

test('writeKv and attention, one block per sequence: GQA, several sequences, garbage beyond each position is ignored', () => {
  const rand = prng(9);
  const S = 3, nKv = 2, C = 8, hd = 4, nHeads = 4, scale = 1 / Math.sqrt(hd);
  // Every cache entry starts as NaN: reading anything that was not written poisons the output.
  const nan = new Float32Array(S * nKv * C * hd).fill(NaN);
  const kCache = f32(engine, nan, [S, nKv, C, hd]);
  const vCache = f32(engine, nan, [S, nKv, C, hd]);
  const blocks = table(engine, [[0], [1], [2]]); // sequence s owns block s, of B = C positions
  // Prefill: sequence 2 gets positions 0..4, sequence 0 gets positions 0..2 (one batch of 8 tokens).
  const seq = [2, 2, 2, 2, 2, 0, 0, 0];
  const positions = [0, 1, 2, 3, 4, 0, 1, 2];
  const T = seq.length;
  const k = randoms(rand, T * nKv * hd), v = randoms(rand, T * nKv * hd), q = randoms(rand, T * nHeads * hd);
  engine.writeKv(kCache, vCache, f32(engine, k, [T, nKv * hd]), f32(engine, v, [T, nKv * hd]), i32(engine, seq), blocks, i32(engine, positions));

  const kc = get(engine, kCache);
  for (let t = 0; t < T; t++)
    for (let h = 0; h < nKv; h++)
      for (let d = 0; d < hd; d++) assert.equal(kc[((seq[t]! * nKv + h) * C + positions[t]!) * hd + d], k[(t * nKv + h) * hd + d]);
  assert.ok(Number.isNaN(kc[((1 * nKv + 0) * C + 0) * hd]!), 'block 1 untouched');
  assert.ok(Number.isNaN(kc[((2 * nKv + 1) * C + 5) * hd]!), 'block 2 position 5 untouched');

  const out = engine.attention(f32(engine, q, [T, nHeads * hd]), kCache, vCache, i32(engine, seq), blocks, i32(engine, positions), nHeads, scale);
  assert.deepEqual(out.shape, [T, nHeads * hd]);
  const want = refAttention(q, k, v, seq, positions, nHeads, nKv, hd, scale);
  assertClose(get(engine, out), want.out, (i) => 1e-5 * want.mag[i]! + 1e-7, 'attention'); // 1e-5 · Σ p·|v|

  // Decode step: one more token for sequence 2 at position 5, then attention for it alone.
  const k1 = randoms(rand, nKv * hd), v1 = randoms(rand, nKv * hd), q1 = randoms(rand, nHeads * hd);
  engine.writeKv(kCache, vCache, f32(engine, k1, [1, nKv * hd]), f32(engine, v1, [1, nKv * hd]), i32(engine, [2]), blocks, i32(engine, [5]));
  const one = get(engine, engine.attention(f32(engine, q1, [1, nHeads * hd]), kCache, vCache, i32(engine, [2]), blocks, i32(engine, [5]), nHeads, scale));
  assert.ok(one.every(Number.isFinite), 'decode attention reads only positions 0..5');

  const k1t = f32(engine, k1, [1, nKv * hd]), v1t = f32(engine, v1, [1, nKv * hd]);
  assertNativeError(() => engine.writeKv(kCache, vCache, k1t, v1t, i32(engine, [3]), blocks, i32(engine, [0])), /writeKv: tokenSeq\[0\] = 3 is out of range for kvBlockTable \[3, 1\] i32 \(need 0 <= sequence < 3\)/);
  assertNativeError(() => engine.writeKv(kCache, vCache, k1t, v1t, i32(engine, [0]), blocks, i32(engine, [8])), /writeKv: positions\[0\] = 8 is out of range for kvBlockTable \[3, 1\] i32 of blocks of 8 positions \(need 0 <= position < 8\)/);
  assertNativeError(() => engine.writeKv(kCache, vCache, k1t, v1t, i32(engine, [0]), i32(engine, [0, 1, 2]), i32(engine, [0])), /writeKv: kvBlockTable must be \[S, maxBlocksPerSeq\] i32 \(got \[3\] i32\)/);
  assertNativeError(() => engine.writeKv(kCache, vCache, k1t, v1t, f32(engine, new Float32Array(1), [1]), blocks, i32(engine, [0])), /writeKv: tokenSeq must be \[T\] i32 \(got \[1\] f32\)/);
  assertNativeError(() => engine.attention(f32(engine, q1, [1, nHeads * hd]), kCache, vCache, i32(engine, [1]), table(engine, [[0], [-1], [2]]), i32(engine, [0]), nHeads, scale), /attention: kvBlockTable\[1\]\[0\] = -1 \(a block of tokenSeq\[0\] = 1\) is out of range for kCache \[3, 2, 8, 4\] f32 \(need 0 <= block < 3\)/);
  assertNativeError(() => engine.attention(f32(engine, q1, [1, nHeads * hd]), kCache, vCache, i32(engine, [0]), blocks, i32(engine, [0]), 3, scale), /attention: nHeads = 3 must be a positive multiple of nKv = 2/);
  assertNativeError(
    () => engine.attention(f32(engine, q1, [2, 8]), kCache, vCache, i32(engine, [0, 0]), blocks, i32(engine, [0, 1]), nHeads, scale),
    /attention: q \[2, 8\] f32 does not match nHeads = 4 and kCache \[3, 2, 8, 4\] f32 \(expected q \[T, 16\]\)/,
  );
});

test('paged KV cache: blocks of B = 4, 16, 7 and maxContext, scattered and out of order in the pool, equal one block per sequence exactly (GQA)', () => {
  const rand = prng(12);
  const maxContext = 20, nKv = 2, nHeads = 6, hd = 8, scale = 1 / Math.sqrt(hd);
  const lengths = [20, 13, 1]; // tokens per sequence: full, several blocks with a partial one, one position
  const S = lengths.length;
  // One prefill batch of every position of every sequence, in shuffled order.
  const order = lengths.flatMap((n, s) => Array.from({ length: n }, (_, p) => [s, p] as const)).sort(() => rand() - 0.5);
  const seq = order.map(([s]) => s), positions = order.map(([, p]) => p), T = order.length;
  const k = randoms(rand, T * nKv * hd), v = randoms(rand, T * nKv * hd), q = randoms(rand, T * nHeads * hd);
  const width = (nHeads + 2 * nKv) * hd;
  const qkv = randoms(rand, T * width);
  const invFreq = f32(engine, Float32Array.from({ length: hd / 2 }, (_, j) => 1 / 10000 ** ((2 * j) / hd)), [hd / 2]);
  const shape = (nBlocks: number, B: number): number[] => [nBlocks, nKv, B, hd];

  /** writeKv, attention, then qkvRope (new k/v) and attention again, in a pool of nBlocks blocks of B positions. */
  const run = (nBlocks: number, B: number, rows: number[][]) => {
    const nan = new Float32Array(nBlocks * nKv * B * hd).fill(NaN); // blocks no sequence owns stay NaN
    const kCache = f32(engine, nan, shape(nBlocks, B)), vCache = f32(engine, nan, shape(nBlocks, B));
    const blocks = table(engine, rows), tokenSeq = i32(engine, seq), pos = i32(engine, positions);
    engine.writeKv(kCache, vCache, f32(engine, k, [T, nKv * hd]), f32(engine, v, [T, nKv * hd]), tokenSeq, blocks, pos);
    const kc = get(engine, kCache);
    const attended = get(engine, engine.attention(f32(engine, q, [T, nHeads * hd]), kCache, vCache, tokenSeq, blocks, pos, nHeads, scale));
    const rq = get(engine, engine.qkvRope(f32(engine, qkv, [T, width]), pos, invFreq, kCache, vCache, tokenSeq, blocks, nHeads));
    const roped = get(engine, engine.attention(f32(engine, rq, [T, nHeads * hd]), kCache, vCache, tokenSeq, blocks, pos, nHeads, scale));
    return { kc, attended, rq, roped };
  };

  const oneBlock = run(S, maxContext, lengths.map((_, s) => [s]));
  const want = refAttention(q, k, v, seq, positions, nHeads, nKv, hd, scale);
  assertClose(oneBlock.attended, want.out, (i) => 1e-5 * want.mag[i]! + 1e-7, 'one block per sequence vs reference');
  for (const B of [4, 16, 7, maxContext]) {
    const perSeq = Math.ceil(maxContext / B);
    const used = lengths.map((n) => Math.ceil(n / B));
    const nBlocks = used.reduce((a, b) => a + b, 0) + 2; // two spare blocks nobody owns
    const pool = [...Array(nBlocks).keys()].sort(() => rand() - 0.5); // scattered, out of order
    let next = 0;
    // Entries past a sequence's length are -1: no token reaches them, so they are never read.
    const rows = used.map((n) => Array.from({ length: perSeq }, (_, j) => (j < n ? pool[next++]! : -1)));
    const paged = run(nBlocks, B, rows);
    for (let t = 0; t < T; t++) {
      const block = rows[seq[t]!]![Math.floor(positions[t]! / B)]!;
      const row = ((block * nKv + 1) * B + (positions[t]! % B)) * hd; // kv head 1
      assert.deepEqual([...paged.kc.subarray(row, row + hd)], [...k.subarray((t * nKv + 1) * hd, (t * nKv + 2) * hd)], `B = ${B}: token ${t} written to block ${block}`);
    }
    for (const spare of pool.slice(next)) assert.ok(Number.isNaN(paged.kc[spare * nKv * B * hd]!), `B = ${B}: spare block ${spare} untouched`);
    assert.deepEqual(paged.attended, oneBlock.attended, `B = ${B}: attention equals the one-block layout`);
    assert.deepEqual(paged.rq, oneBlock.rq, `B = ${B}: qkvRope q`);
    assert.deepEqual(paged.roped, oneBlock.roped, `B = ${B}: attention after qkvRope equals the one-block layout`);
  }
});

test('sliceCols, concatCols, gatherRows', () => {
  const rand = prng(10);
  const T = 3, N = 7;
  const x = randoms(rand, T * N);
  const cols = (a: Float32Array, n: number, s: number, e: number) => Float32Array.from({ length: (a.length / n) * (e - s) }, (_, i) => a[Math.floor(i / (e - s)) * n + s + (i % (e - s))]!);
  const xt = f32(engine, x, [T, N]);
  assert.deepEqual(get(engine, engine.sliceCols(xt, 2, 5)), cols(x, N, 2, 5));
  assert.deepEqual(engine.sliceCols(xt, 4, 4).shape, [T, 0]);
  const xb = toBf16(x);
  const sb = engine.sliceCols(engine.upload(bytesOf(xb.bits), 'bf16', [T, N]), 1, 3);
  assert.equal(sb.dtype, 'bf16');
  assert.deepEqual(get(engine, sb), cols(xb.exact, N, 1, 3));
  assertNativeError(() => engine.sliceCols(xt, 3, 8), /sliceCols: columns \[3, 8\) are not within x \[3, 7\] f32/);

  const y = randoms(rand, T * 2);
  const cat = engine.concatCols([engine.sliceCols(xt, 0, 3), f32(engine, y, [T, 2]), engine.sliceCols(xt, 3, 7)]);
  assert.deepEqual(cat.shape, [T, 9]);
  const c = get(engine, cat);
  for (let t = 0; t < T; t++) assert.deepEqual([...c.subarray(t * 9, t * 9 + 9)], [...x.subarray(t * N, t * N + 3), ...y.subarray(t * 2, t * 2 + 2), ...x.subarray(t * N + 3, t * N + 7)]);
  assertNativeError(() => engine.concatCols([xt, f32(engine, y, [2, 3])]), /concatCols: xs\[1\] \[2, 3\] f32 does not match xs\[0\] \[3, 7\] f32/);
  assertNativeError(() => engine.concatCols([]), /concatCols: xs must hold at least one tensor/);

  const rows = [2, 0, 2];
  assert.deepEqual(get(engine, engine.gatherRows(xt, i32(engine, rows))), Float32Array.from(rows.flatMap((r) => [...x.subarray(r * N, r * N + N)])));
  assertNativeError(() => engine.gatherRows(xt, i32(engine, [3])), /gatherRows: rows\[0\] = 3 is out of range for x \[3, 7\] f32 \(need 0 <= row < 3\)/);

});

/** Hugging Face's Mixtral router in double precision: softmax, top-k (ties to the lower index), renormalised. */
function refRoute(logits: Float32Array, E: number, k: number): { experts: number[]; weights: number[] } {
  const experts: number[] = [], weights: number[] = [];
  for (let t = 0; t < logits.length / E; t++) {
    const row = Array.from(logits.subarray(t * E, (t + 1) * E));
    const max = Math.max(...row);
    const total = row.reduce((a, l) => a + Math.exp(l - max), 0);
    const chosen = row.map((l, e) => ({ p: Math.exp(l - max) / total, e })).sort((a, b) => b.p - a.p || a.e - b.e).slice(0, k);
    const chosenTotal = chosen.reduce((a, c) => a + c.p, 0);
    for (const { p, e } of chosen) {
      experts.push(e);
      weights.push(p / chosenTotal);
    }
  }
  return { experts, weights };
}

test('routeTopK follows Hugging Face: softmax, top-k with ties to the lower index, renormalised', () => {
  const rand = prng(12);
  const T = 6, E = 8, k = 2;
  const logits = randoms(rand, T * E, -3, 3);
  logits.fill(0.5, 5 * E, 6 * E); // token 5: all equal, so experts 0 and 1 at 1/2 each
  const { experts, weights } = engine.routeTopK(f32(engine, logits, [T, E]), k);
  assert.deepEqual(experts.shape, [T, k]);
  const want = refRoute(logits, E, k);
  assert.deepEqual([...engine.download(experts)], want.experts);
  assert.deepEqual(want.experts.slice(10), [0, 1]);
  assertClose(get(engine, weights), want.weights, () => 1e-6, 'routeTopK weights');
  assertNativeError(() => engine.routeTopK(f32(engine, logits, [T, E]), 9), /routeTopK: k = 9 must be in \[1, 8\] \(the experts of logits \[6, 8\] f32\)/);
  assertNativeError(() => engine.routeTopK(f32(engine, logits, [T, E]), 0), /routeTopK: k = 0 must be in \[1, 8\]/);
});

test('routeTopK with rowsInUse: the rows past it pad a graph step, their pairs choose no expert and weigh nothing', () => {
  const rand = prng(14);
  const T = 5, E = 8, k = 2, K = 16, N = 3, used = 3;
  const logits = randoms(rand, T * E, -3, 3);
  const { experts, weights } = engine.routeTopK(f32(engine, logits, [T, E]), k, i32(engine, [used]));
  const want = refRoute(logits, E, k);
  assert.deepEqual([...engine.download(experts)], [...want.experts.slice(0, used * k), -1, -2, -1, -2]);
  assertClose(get(engine, weights), [...want.weights.slice(0, used * k), 0, 0, 0, 0], () => 1e-6, 'routeTopK weights');
  // every row in use: the plain routing; none: every row padding
  assert.deepEqual([...engine.download(engine.routeTopK(f32(engine, logits, [T, E]), k, i32(engine, [T])).experts)], want.experts);
  assert.deepEqual([...engine.download(engine.routeTopK(f32(engine, logits, [T, E]), k, i32(engine, [0])).experts)], Array.from({ length: T * k }, (_, p) => -1 - (p % k)));
  // the padding pairs' rows come out zero from the expert matmul (no expert reads them), and combine to zero
  const y = engine.expertMatmul(f32(engine, randoms(rand, T * K), [T, K]), f32(engine, randoms(rand, E * N * K), [E, N, K]), experts, 0);
  const rows = get(engine, y);
  assert.ok(rows.subarray(0, used * k * N).some((v) => v !== 0), 'the rows in use have their products');
  assert.ok(rows.subarray(used * k * N).every((v) => v === 0), 'the padding pairs are zero');
  assert.ok(get(engine, engine.combineExperts(y, weights)).subarray(used * N).every((v) => v === 0));
  assertNativeError(() => engine.routeTopK(f32(engine, logits, [T, E]), k, i32(engine, [1, 2])), /routeTopK: rowsInUse \[2\] i32 must hold one value/);
});

test('expertMatmul reads each routed expert, zeros for experts held elsewhere; combineExperts weighs the pairs', () => {
  const rand = prng(13);
  const T = 4, k = 2, K = 24, N = 5, El = 3, first = 2; // this rank holds experts 2, 3, 4 of 8
  const routed = [2, 4, 3, 7, 0, 1, 4, 2]; // token 1 has one held expert, token 2 none
  const x = randoms(rand, T * K), xPairs = randoms(rand, T * k * K), w = randoms(rand, El * N * K);
  const wt = f32(engine, w, [El, N, K]);
  const expertsT = engine.upload(bytesOf(Int32Array.from(routed)), 'i32', [T, k]);
  const want = (xs: Float32Array, perPair: boolean): Float64Array => {
    const out = new Float64Array(T * k * N);
    routed.forEach((e, p) => {
      if (e < first || e >= first + El) return;
      const row = xs.subarray((perPair ? p : Math.floor(p / k)) * K, ((perPair ? p : Math.floor(p / k)) + 1) * K);
      const { out: y } = refMatmul(row, w.subarray((e - first) * N * K, (e - first + 1) * N * K), 1, K, N);
      out.set(y, p * N);
    });
    return out;
  };
  const perToken = engine.expertMatmul(f32(engine, x, [T, K]), wt, expertsT, first);
  assert.deepEqual(perToken.shape, [T * k, N]);
  assertClose(get(engine, perToken), want(x, false), () => 1e-5, 'expertMatmul, x per token');
  assertClose(get(engine, engine.expertMatmul(f32(engine, xPairs, [T * k, K]), wt, expertsT, first)), want(xPairs, true), () => 1e-5, 'expertMatmul, x per pair');

  const weights = Float32Array.from([0.75, 0.25, 0.5, 0.5, 0.9, 0.1, 0.3, 0.7]);
  const y = get(engine, perToken);
  const combined = get(engine, engine.combineExperts(perToken, f32(engine, weights, [T, k])));
  const wantCombined = Float64Array.from({ length: T * N }, (_, i) => {
    const t = Math.floor(i / N), n = i % N;
    return weights[t * k]! * y[t * k * N + n]! + weights[t * k + 1]! * y[(t * k + 1) * N + n]!;
  });
  assertClose(combined, wantCombined, () => 1e-6, 'combineExperts');

  assertNativeError(() => engine.expertMatmul(f32(engine, x, [T, K]), wt, engine.upload(bytesOf(Int32Array.from([3, 3, 2, 4, 0, 1, 4, 2])), 'i32', [T, k]), first), /expertMatmul: experts\[0\] chooses expert 3 twice/);
  assertNativeError(() => engine.expertMatmul(f32(engine, x.subarray(0, 3 * K), [3, K]), wt, expertsT, first), /expertMatmul: x \[3, 24\] f32 must have 4 rows \(one per token\) or 8 \(one per pair\)/);
  assertNativeError(() => engine.expertMatmul(f32(engine, x, [T, K]), f32(engine, w, [El * N, K]), expertsT, first), /expertMatmul: w must be \[El, N, K\]/);
  // The gated form equals siluMul then expertMatmul (the same fp32 operations here).
  const gateUp = randoms(rand, T * 2 * K);
  const gateUpT = f32(engine, gateUp, [T, 2 * K]);
  assert.deepEqual(get(engine, engine.siluMulExpertMatmul(gateUpT, wt, expertsT, first)), get(engine, engine.expertMatmul(engine.siluMul(gateUpT), wt, expertsT, first)));
  assertNativeError(() => engine.siluMulExpertMatmul(f32(engine, x, [T, K]), wt, expertsT, first), /siluMulExpertMatmul: gateUp \[4, 24\] f32 and w \[3, 5, 24\] f32 do not match \(expected w \[El, N, 12\] and an even number of gateUp columns\)/);

  assertNativeError(() => engine.combineExperts(perToken, f32(engine, weights.subarray(0, 6), [3, k])), /combineExperts: y \[8, 5\] f32 must have 6 rows to match weights \[3, 2\] f32/);
});

test('siluMulMatmul equals siluMul then matmul', () => {
  const rand = prng(14);
  const T = 3, K = 40, N = 6;
  const gateUp = f32(engine, randoms(rand, T * 2 * K, -4, 4), [T, 2 * K]);
  const w = f32(engine, randoms(rand, N * K), [N, K]);
  const fused = engine.siluMulMatmul(gateUp, w);
  assert.deepEqual(fused.shape, [T, N]);
  assert.deepEqual(get(engine, fused), get(engine, engine.matmul(engine.siluMul(gateUp), w)));
  assertNativeError(() => engine.siluMulMatmul(gateUp, f32(engine, randoms(rand, N * 2 * K), [N, 2 * K])), /siluMulMatmul: gateUp \[3, 80\] f32 and w \[6, 80\] f32 do not match \(expected w \[N, 40\]/);
});

test('matmulSiluMul equals siluMul of matmul', () => {
  const rand = prng(15);
  const T = 3, K = 40, F = 6;
  const x = f32(engine, randoms(rand, T * K, -2, 2), [T, K]);
  const w = f32(engine, randoms(rand, 2 * F * K), [2 * F, K]);
  const fused = engine.matmulSiluMul(x, w);
  assert.deepEqual(fused.shape, [T, F]);
  assert.deepEqual(get(engine, fused), get(engine, engine.siluMul(engine.matmul(x, w))));
  assertNativeError(() => engine.matmulSiluMul(x, f32(engine, randoms(rand, 5 * K), [5, K])), /matmulSiluMul: x \[3, 40\] f32 and w \[5, 40\] f32 do not match \(expected w \[2F, 40\]: gate rows, then up rows\)/);
  assertNativeError(() => engine.matmulSiluMul(x, f32(engine, randoms(rand, 2 * F * 8), [2 * F, 8])), /matmulSiluMul: x \[3, 40\] f32 and w \[12, 8\] f32 do not match/);
  // A quantized w13 (int8 per row, int4 in groups of 8): the same two products, whatever the weight's format.
  for (const format of [{ kind: 'int8', groupSize: 'channel' }, { kind: 'int4', groupSize: 8 }] as const) {
    const q = quantizeMatrix(randoms(rand, 2 * F * K), 2 * F, K, format);
    const scales = engine.upload(q.scales, 'bf16', [2 * F, format.groupSize === 'channel' ? 1 : K / 8]);
    const wq = engine.uploadQuantized(q.data, format.kind === 'int8' ? 'i8' : 'i4', [2 * F, K], scales);
    assert.deepEqual(get(engine, engine.matmulSiluMul(x, wq)), get(engine, engine.siluMul(engine.matmul(x, wq))), format.kind);
  }
});

test('logSoftmax and logprobs, stable for large logits', () => {
  const rand = prng(11);
  const R = 3, V = 1000;
  const logits = randoms(rand, R * V, -20, 20);
  logits[V + 5] = 3000; // row 1: a huge logit must not overflow
  const want = new Float64Array(R * V), mag = new Float64Array(R * V);
  for (let r = 0; r < R; r++) {
    const row = logits.subarray(r * V, (r + 1) * V);
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((s, v) => s + Math.exp(v - m), 0));
    for (let v = 0; v < V; v++) {
      want[r * V + v] = row[v]! - lse;
      mag[r * V + v] = Math.abs(row[v]!) + Math.abs(lse);
    }
  }
  const got = get(engine, engine.logSoftmax(f32(engine, logits, [R, V])));
  assertClose(got, want, (i) => 1e-6 * mag[i]! + 1e-6, 'logSoftmax'); // x - max - log(sum): a few roundings of |x| + |lse|
  const ids = Int32Array.from([3, 5, 999]);
  const lp = engine.logprobs(f32(engine, logits, [R, V]), ids);
  assertClose(lp, [...ids].map((id, r) => want[r * V + id]!), (r) => 1e-6 * mag[r * V + ids[r]!]! + 1e-6, 'logprobs');
  assertNativeError(() => engine.logprobs(f32(engine, logits, [R, V]), Int32Array.from([0, 1])), /logprobs: ids has length 2 but logits \[3, 1000\] f32 has 3 rows/);
  assertNativeError(() => engine.logprobs(f32(engine, logits, [R, V]), Int32Array.from([0, 1, 1000])), /logprobs: ids\[2\] = 1000 is out of range/);
});

// ---- sampling

/** The sampling rule of worker/native.ts, literally, in double. */
function refSample(logits: Float32Array, V: number, temperature: number, topK: number, topP: number, uniform: number): number {
  if (!(temperature > 0)) {
    let best = 0;
    for (let v = 1; v < V; v++) if (logits[v]! > logits[best]!) best = v;
    return best;
  }
  const z = Float32Array.from(logits, (l) => l / temperature); // fp32 division
  let order = [...Array(V).keys()].sort((a, b) => z[b]! - z[a]! || a - b);
  if (topK > 0) order = order.slice(0, topK);
  const max = z[order[0]!]!;
  const e = order.map((i) => (z[i] === max ? 1 : Math.exp(z[i]! - max)));
  const sum = e.reduce((a, b) => a + b, 0);
  let p = e.map((x) => x / sum);
  if (topP < 1) {
    let c = 0;
    const cut = p.findIndex((x) => (c += x) >= topP);
    if (cut >= 0) p = p.slice(0, cut + 1);
  }
  const total = p.reduce((a, b) => a + b, 0);
  let c = 0;
  const pick = p.findIndex((x) => (c += x) > uniform * total);
  return order[pick >= 0 ? pick : p.length - 1]!;
}

function sampleOne(logits: number[], temperature: number, topK: number, topP: number, uniform: number): number {
  const out = engine.sample(f32(engine, Float32Array.from(logits), [1, logits.length]), Float32Array.of(temperature), Int32Array.of(topK), Float32Array.of(topP), Float32Array.of(uniform));
  return out[0]!;
}

test('sample: greedy is argmax with the lowest index on ties; topK = 1 equals greedy', () => {
  assert.equal(sampleOne([0.5, 2, -1, 2, 1], 0, 0, 1, 0.7), 1);
  assert.equal(sampleOne([0.5, 2, -1, 2, 1], -1, 0, 1, 0.7), 1);
  assert.equal(sampleOne([-Infinity, -Infinity], 0, 0, 1, 0), 0);
  const rand = prng(12);
  const R = 16, V = 50;
  const logits = randoms(rand, R * V, -4, 4);
  const greedy = engine.sample(f32(engine, logits, [R, V]), new Float32Array(R), new Int32Array(R), new Float32Array(R).fill(1), randoms(rand, R, 0, 1));
  const top1 = engine.sample(f32(engine, logits, [R, V]), new Float32Array(R).fill(1.3), new Int32Array(R).fill(1), new Float32Array(R).fill(1), randoms(rand, R, 0, 1));
  assert.deepEqual(top1, greedy);
  for (let r = 0; r < R; r++) assert.equal(greedy[r], refSample(logits.subarray(r * V, (r + 1) * V), V, 0, 0, 1, 0));
});

test('sample: hand-computed topP, temperature and uniform thresholds', () => {
  // Probabilities .5, .3, .15, .05 at indices 2, 0, 3, 1: sorted order [2, 0, 3, 1], cumulative .5, .8, .95, 1.
  const l = [Math.log(0.3), Math.log(0.05), Math.log(0.5), Math.log(0.15)];
  assert.equal(sampleOne(l, 1, 0, 1, 0), 2);
  assert.equal(sampleOne(l, 1, 0, 1, 0.45), 2); // .45 < .5
  assert.equal(sampleOne(l, 1, 0, 1, 0.6), 0); // .5 < .6 < .8
  assert.equal(sampleOne(l, 1, 0, 1, 0.9), 3); // .8 < .9 < .95
  assert.equal(sampleOne(l, 1, 0, 1, 0.97), 1);
  assert.equal(sampleOne(l, 1, 0, 1, 1), 1); // nothing exceeds total: the last kept
  // topP = .75 keeps [2, 0] (cumulative .8 >= .75), total .8: thresholds .8·u.
  assert.equal(sampleOne(l, 1, 0, 0.75, 0.6), 2); // .48 < .5
  assert.equal(sampleOne(l, 1, 0, 0.75, 0.65), 0); // .52
  assert.equal(sampleOne(l, 1, 0, 0.75, 0.99), 0); // never 3 or 1
  assert.equal(sampleOne(l, 1, 0, 0.4, 0.99), 2); // .5 >= .4: one candidate
  assert.equal(sampleOne(l, 1, 0, 0, 0.99), 2); // topP 0 keeps at least one
  // topK = 3 keeps [2, 0, 3], total .95: u = .9 → .855 > .8 → 3.
  assert.equal(sampleOne(l, 1, 3, 1, 0.9), 3);
  // Temperature 2 on logits ln4, ln1: z = ln2, 0, p = 2/3, 1/3. At temperature 1: p = .8, .2.
  assert.equal(sampleOne([Math.log(4), 0], 2, 0, 1, 0.6), 0);
  assert.equal(sampleOne([Math.log(4), 0], 2, 0, 1, 0.7), 1);
  assert.equal(sampleOne([Math.log(4), 0], 1, 0, 1, 0.7), 0);
  // Equal logits: order by index, p = .25 each; u = .3 → second candidate, index 1.
  assert.equal(sampleOne([1, 1, 1, 1], 1, 0, 1, 0.3), 1);
  assert.equal(sampleOne([1, 1, 1, 1], 0.5, 0, 1, 0.8), 3);
});

test('sample: matches the reference rule on random rows, deterministically', () => {
  const rand = prng(13);
  const R = 40, V = 300;
  const logits = randoms(rand, R * V, -6, 6);
  const temperature = Float32Array.from({ length: R }, (_, r) => [0, 0.5, 1, 1.7][r % 4]!);
  const topK = Int32Array.from({ length: R }, (_, r) => [0, 1, 5, 40, 300, 1000][r % 6]!);
  const topP = Float32Array.from({ length: R }, (_, r) => [1, 0.9, 0.5, 0.1, 0][r % 5]!);
  const uniform = randoms(rand, R, 0, 1);
  const logitsT = f32(engine, logits, [R, V]);
  const a = engine.sample(logitsT, temperature, topK, topP, uniform);
  const b = engine.sample(logitsT, temperature, topK, topP, uniform);
  assert.deepEqual(a, b);
  const single = createEngine({ backend: 'cpu', threads: 1 });
  assert.deepEqual(single.sample(f32(single, logits, [R, V]), temperature, topK, topP, uniform), a);
  for (let r = 0; r < R; r++) {
    assert.equal(a[r], refSample(logits.subarray(r * V, (r + 1) * V), V, temperature[r]!, topK[r]!, topP[r]!, uniform[r]!), `row ${r}`);
  }
});

test('sample: argument validation', () => {
  const logits = f32(engine, new Float32Array(6), [2, 3]);
  const ones = Float32Array.of(1, 1);
  assertNativeError(() => engine.sample(logits, Float32Array.of(1), Int32Array.of(0), Float32Array.of(1), Float32Array.of(0)), /sample: temperature, topK, topP and uniform must each have length 2/);
  assertNativeError(() => engine.sample(logits, ones, Int32Array.of(0, 0, 0), ones, ones), /sample: temperature, topK, topP and uniform must have one length/);
  assertNativeError(() => engine.sample(logits, Float32Array.of(1, NaN), Int32Array.of(0, 0), ones, ones), /sample: temperature\[1\] is NaN/);
  assertNativeError(() => engine.sample(logits, ones, Int32Array.of(0, -1), ones, ones), /sample: topK\[1\] = -1 must be >= 0/);
  assertNativeError(() => engine.sample(logits, ones, Int32Array.of(0, 0), Float32Array.of(1.5, 1), ones), /sample: topP\[0\] = 1.5 must be in \[0, 1\]/);
  assertNativeError(() => engine.sample(f32(engine, Float32Array.of(0, NaN), [1, 2]), Float32Array.of(1), Int32Array.of(0), Float32Array.of(1), Float32Array.of(0)), /sample: logits \[1, 2\] f32 holds NaN at row 0, column 1/);
  assertNativeError(() => engine.sample(logits, [1, 1] as unknown as Float32Array, Int32Array.of(0, 0), ones, ones), /sample: temperature must be a Float32Array \(got Array\)/, TypeError);
});

// ---- handles

test('non-tensor arguments throw a TypeError naming the parameter; tensors stay with their engine', () => {
  const x = engine.zeros('f32', [2, 4]);
  const fake = { dtype: 'f32', shape: [4, 4] } as unknown as Tensor;
  assertNativeError(() => engine.matmul(x, fake), /^matmul: w must be a weft Tensor \(got object\)$/, TypeError);
  assertNativeError(() => engine.rmsNorm(undefined as unknown as Tensor, x, 1e-5), /rmsNorm: x must be a weft Tensor \(got undefined\)/, TypeError);
  assertNativeError(() => engine.concatCols([x, 3 as unknown as Tensor]), /concatCols: xs\[1\] must be a weft Tensor \(got number 3\)/, TypeError);
  assertNativeError(() => engine.rope(x, x, x, '8' as unknown as number), /rope: headDim must be an integer \(got string\)/, TypeError);
  assertNativeError(() => engine.sliceCols(x, 0.5, 1), /sliceCols: start must be an integer \(got 0.5\)/);
  assertNativeError(() => new (x.constructor as new () => unknown)(), /Tensor: tensors are made by an engine/, TypeError);
  const other = createEngine({ backend: 'cpu', threads: 1 });
  assertNativeError(() => other.add(x, other.zeros('f32', [2, 4])), /add: a \[2, 4\] f32 belongs to a different engine/);
});

test('dispose frees a tensor now; a disposed tensor is refused, disposing twice is harmless', () => {
  const x = engine.zeros('f32', [2, 4]);
  const y = engine.add(x, x);
  x.dispose();
  x.dispose();
  assert.deepEqual(x.shape, [2, 4]);
  assertNativeError(() => engine.add(x, y), /^add: a \[2, 4\] f32 was disposed$/);
  assertNativeError(() => engine.download(x), /download: t \[2, 4\] f32 was disposed/);
  assert.deepEqual([...get(engine, y)], [0, 0, 0, 0, 0, 0, 0, 0]);
});

// ---- steps, graphs and device plumbing (the CPU backend keeps heap memory but the same rules)

test('beginStep/endStep: step tensors go stale at the next beginStep; persistent ones do not', () => {
  const e = createEngine({ backend: 'cpu', threads: 1 });
  const persistent = f32(e, Float32Array.from([1, 2]), [2]);
  e.beginStep();
  const inStep = e.add(persistent, persistent);
  e.endStep();
  assert.deepEqual([...get(e, inStep)], [2, 4]); // usable until the next beginStep
  e.beginStep();
  assertNativeError(() => e.add(inStep, persistent), /add: a \[2\] f32 is a tensor from an earlier step \(made in step 1/);
  assertNativeError(() => e.download(inStep), /download: t \[2\] f32 is a tensor from an earlier step/);
  assert.deepEqual([...get(e, e.add(persistent, persistent))], [2, 4]);
  e.endStep();
  assert.deepEqual([...get(e, persistent)], [1, 2]);
});

test('releaseLayer: what a layer kept comes back moved with its values; the rest of its tensors throw; the mark serves every layer; marks are per step', () => {
  const e = createEngine({ backend: 'cpu', threads: 1 });
  const one = e.upload(bytesOf(Float32Array.from([1, 2])), 'f32', [1, 2]);
  const outside = e.add(one, one); // outside a step: persistent, and the release does nothing
  assert.deepEqual([...get(e, e.releaseLayer(e.layerMark(), [outside])[0]!)], [2, 4]);
  assert.deepEqual([...get(e, outside)], [2, 4]);
  e.beginStep();
  const before = e.add(one, one); // made before the mark: the release leaves it alone
  const mark = e.layerMark();
  const scratch = e.add(before, one);
  const kept = e.add(scratch, one);
  const [moved, same] = e.releaseLayer(mark, [kept, before]);
  assert.deepEqual([...get(e, moved!)], [4, 8]);
  assert.deepEqual([...get(e, same!)], [2, 4], 'a tensor made before the mark is returned as it is');
  assertNativeError(() => e.add(scratch, one), /add: a \[1, 2\] f32 was released at the end of its layer \(releaseLayer\)/);
  assertNativeError(() => e.download(kept), /download: t \[1, 2\] f32 was released at the end of its layer/);
  assert.deepEqual([...get(e, e.add(moved!, before))], [6, 12], 'the moved tensor and the one made before the mark live on');
  // a second layer releases to the same mark: the first layer's output, its input, goes with it
  const [next] = e.releaseLayer(mark, [e.add(moved!, moved!)]);
  assert.deepEqual([...get(e, next!)], [8, 16]);
  assertNativeError(() => e.add(moved!, one), /add: a \[1, 2\] f32 was released at the end of its layer/);
  // a mark made after it closes when a layer releases to the earlier one
  const inner = e.layerMark();
  const [last] = e.releaseLayer(mark, [next!]);
  assertNativeError(() => e.releaseLayer(inner, []), /releaseLayer: mark \d+ is not an open layerMark\(\) of this step/);
  assert.deepEqual([...get(e, last!)], [8, 16]);
  e.endStep();
  e.beginStep();
  assertNativeError(() => e.releaseLayer(mark, []), /not an open layerMark\(\) of this step/);
  assertNativeError(() => e.add(last!, one), /from an earlier step/);
  e.endStep();
});

test('step memory goes by the step rule, not the garbage collector: at the next beginStep, at its layer\'s releaseLayer', () => {
  // A step's handles stay referenced throughout, so only the rule can free them. 256 MiB, zero-filled (resident).
  const e = createEngine({ backend: 'cpu', threads: 1 });
  const big: [number, number] = [64, 1 << 20];
  const rssMiB = (): number => process.memoryUsage().rss / (1 << 20);
  e.beginStep();
  const rss0 = rssMiB();
  const stepTensor = e.zeros('f32', big);
  assert.ok(rssMiB() - rss0 > 200, `a 256 MiB step tensor is resident (RSS +${(rssMiB() - rss0).toFixed(0)} MiB)`);
  e.endStep();
  e.beginStep();
  assert.ok(rssMiB() - rss0 < 64, `the next beginStep frees it while its handle lives (RSS +${(rssMiB() - rss0).toFixed(0)} MiB)`);
  assertNativeError(() => e.download(stepTensor), /download: t \[64, 1048576\] f32 is a tensor from an earlier step/);
  const mark = e.layerMark();
  const scratch = e.zeros('f32', big);
  const small = e.zeros('f32', [2]);
  assert.ok(rssMiB() - rss0 > 200);
  const [kept] = e.releaseLayer(mark, [small]);
  assert.ok(rssMiB() - rss0 < 64, `releaseLayer frees the layer's other tensors (RSS +${(rssMiB() - rss0).toFixed(0)} MiB)`);
  assert.deepEqual([...get(e, kept!)], [0, 0]);
  assertNativeError(() => e.download(scratch), /released at the end of its layer/);
  e.endStep();
});

test('step tensors are not reported to V8 as external memory, persistent ones are: steps set off no full garbage collections', async () => {
  // V8 starts a full collection for each ~64 MiB of external memory reported; the persistent loop is the control.
  const e = createEngine({ backend: 'cpu', threads: 1 });
  const fullCollections = async (run: () => void): Promise<number> => {
    let count = 0;
    const observer = new PerformanceObserver((list) => {
      count += list.getEntries().filter((entry) => (entry as PerformanceEntry & { detail: { kind: number } }).detail.kind === constants.NODE_PERFORMANCE_GC_MAJOR).length;
    });
    observer.observe({ entryTypes: ['gc'] });
    run();
    await new Promise((resolve) => setTimeout(resolve, 50)); // gc entries are delivered after the fact
    observer.disconnect();
    return count;
  };
  const fourMiB = [1 << 20];
  const inSteps = await fullCollections(() => {
    for (let i = 0; i < 256; i++) {
      e.beginStep();
      e.zeros('f32', fourMiB);
      e.endStep();
    }
  });
  const persistent = await fullCollections(() => {
    for (let i = 0; i < 256; i++) e.zeros('f32', fourMiB);
  });
  assert.ok(persistent >= 4, `the control: 1 GiB of persistent tensors dropped set off ${persistent} full collections`);
  assert.ok(inSteps <= 1, `1 GiB of step tensors set off ${inSteps} full collections`);
});

test('write overwrites in place and checks the byte length; copy copies in place', () => {
  const e = createEngine({ backend: 'cpu', threads: 1 });
  const t = e.zeros('f32', [3]);
  e.write(t, bytesOf(Float32Array.from([7, 8, 9])));
  assert.deepEqual([...get(e, t)], [7, 8, 9]);
  assertNativeError(() => e.write(t, new Uint8Array(8)), /write: bytes has length 8 but t \[3\] f32 holds 12 bytes/);
  const d = e.zeros('f32', [3]);
  e.copy(d, t);
  assert.deepEqual([...get(e, d)], [7, 8, 9]);
  assertNativeError(() => e.copy(e.zeros('f32', [2]), t), /copy: dst \[2\] f32 and src \[3\] f32 must have the same dtype and shape/);
});

test('graphs and device handles need the cuda backend', () => {
  const e = createEngine({ backend: 'cpu', threads: 1 });
  e.beginStep();
  assertNativeError(() => e.captureBegin(), /captureBegin: graphs need the cuda backend/);
  e.endStep();
  assertNativeError(() => e.captureBegin(), /captureBegin: capture must happen inside a step/);
  assertNativeError(() => e.captureEnd(), /captureEnd: no capture is open/);
  assertNativeError(() => e.replay({} as never), /replay: graph must be a weft Graph/, TypeError);
  assertNativeError(() => e.devicePointer(e.zeros('f32', [1])), /devicePointer: needs the cuda backend/);
  assertNativeError(() => e.streamHandle(), /streamHandle: needs the cuda backend/);
  assertNativeError(() => e.measureBandwidth(1 << 20, 1), /measureBandwidth: needs the cuda backend/);
  e.profileRange(true); // nothing for a profiler to collect on the CPU: a no-op either way
  e.profileRange(false);
  assertNativeError(() => e.profileRange(1 as never), /profileRange: on must be a boolean \(got number 1\)/, TypeError);
  e.synchronize();
  const m = e.memoryInfo();
  assert.ok(m.total >= m.free && m.free >= 0, `memoryInfo ${JSON.stringify(m)}`);
});

test('sampleTensor equals sample on the CPU (all parameters as tensors)', () => {
  const rand = prng(31);
  const R = 6, V = 40;
  const logits = randoms(rand, R * V, -3, 3);
  logits[5] = logits[9] = 9; // a tie at the max of row 0
  const temperature = Float32Array.from([0, 0.7, 1, 1.5, 1, 0.9]);
  const topK = Int32Array.from([0, 0, 5, 0, 1, 12]);
  const topP = Float32Array.from([1, 0.8, 1, 0.5, 1, 0.95]);
  const uniform = Float32Array.from({ length: R }, () => rand());
  const l = f32(engine, logits, [R, V]);
  const want = engine.sample(l, temperature, topK, topP, uniform);
  assert.equal(want[0], 5);
  const got = engine.sampleTensor(l, f32(engine, temperature, [R]), i32(engine, [...topK]), f32(engine, topP, [R]), f32(engine, uniform, [R]));
  assert.equal(got.dtype, 'i32');
  assert.deepEqual([...engine.download(got)], [...want]);
  assertNativeError(
    () => engine.sampleTensor(l, f32(engine, temperature, [R]), i32(engine, [...topK]), f32(engine, Float32Array.from([1, 1, 1, 2, 1, 1]), [R]), f32(engine, uniform, [R])),
    /sampleTensor: topP\[3\] = 2 must be in \[0, 1\]/,
  );
  assertNativeError(() => engine.sampleTensor(l, f32(engine, temperature, [R]), i32(engine, [1]), f32(engine, topP, [R]), f32(engine, uniform, [R])), /sampleTensor: temperature, topK, topP and uniform must each be \[6\]/);
});

test('randomUniform: in [-scale, scale), deterministic per seed, narrow dtypes round toward zero', () => {
  for (const dtype of ['f32', 'bf16', 'f16'] as const) {
    const a = get(engine, engine.randomUniform(dtype, [64, 100], 7, 0.5));
    const b = get(engine, engine.randomUniform(dtype, [64, 100], 7, 0.5));
    const c = get(engine, engine.randomUniform(dtype, [64, 100], 8, 0.5));
    assert.deepEqual(a, b, `${dtype}: same seed, same values`);
    assert.notDeepEqual(a, c, `${dtype}: another seed, other values`);
    const lo = Math.min(...a), hi = Math.max(...a);
    assert.ok(lo >= -0.5 && hi < 0.5 && lo < -0.49 && hi > 0.49, `${dtype}: range [${lo}, ${hi}]`);
    const mean = a.reduce((s, x) => s + x, 0) / a.length;
    assert.ok(Math.abs(mean) < 0.02, `${dtype}: mean ${mean}`); // 6400 uniforms: sd of the mean ~0.0036
  }
  assert.deepEqual(engine.randomUniform('bf16', [2, 3], 1, 1).shape, [2, 3]);
  assertNativeError(() => engine.randomUniform('i32' as 'f32', [2], 1, 1), /randomUniform: dtype must be 'f32', 'f16' or 'bf16'/);
  assertNativeError(() => engine.randomUniform('f32', [2], -1, 1), /randomUniform: seed must be an integer >= 0/);
});
