// SageAttention-style quantized prefill attention on the CPU backend (native/src/cuda/attention-sage.cuh states
// the algorithm; cpu/attention-sage.cc is the reference the CUDA kernels are checked against in ops-check.cc):
// within a stated tolerance of the exact attention on random inputs, ragged and chunked (a sequence whose step
// starts past position 0); as accurate with a large common offset in K as without (the smoothing); the exact
// attention itself for short steps, decode batches and a mixed step's decode rows; and refused where it cannot apply.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { engineIo } from '../helpers/engine-io.ts';
import { prng } from '../helpers/random.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });
const { f32, i32, get } = engineIo(engine);

interface Setup {
  readonly nKv: number;
  readonly group: number;
  readonly hd: number;
  readonly B: number;
  readonly dtype: 'f32' | 'bf16' | 'fp8' | 'i8';
  readonly seqs: readonly { readonly cached: number; readonly fed: number }[]; // positions already in the cache, then fed this step
  readonly kOffset?: number; // added to every K row (channel d gets kOffset * (1 + d % 3))
}

/** Caches holding every sequence's positions (blocks scattered in reverse), and the step's queries. */
function build(s: Setup, seed: number) {
  const rand = prng(seed);
  const nH = s.nKv * s.group, width = s.nKv * s.hd;
  const perSeq = Math.max(...s.seqs.map((q) => Math.ceil((q.cached + q.fed) / s.B)));
  const nBlocks = perSeq * s.seqs.length + 1;
  const rows = s.seqs.map((_, i) => Array.from({ length: perSeq }, (_, j) => nBlocks - 1 - (i * perSeq + j)));
  const kc = engine.zeros(s.dtype, [nBlocks, s.nKv, s.B, s.hd]), vc = engine.zeros(s.dtype, [nBlocks, s.nKv, s.B, s.hd]);
  const table = i32(rows.flat(), [rows.length, perSeq]);
  const all = s.seqs.flatMap((q, i) => Array.from({ length: q.cached + q.fed }, (_, p) => ({ seq: i, pos: p })));
  const k = Float32Array.from({ length: all.length * width }, (_, i) => 2 * rand() - 1 + (s.kOffset ?? 0) * (1 + ((i % s.hd) % 3)));
  const v = Float32Array.from({ length: all.length * width }, () => 2 * rand() - 1);
  engine.writeKv(kc, vc, f32(k, [all.length, width]), f32(v, [all.length, width]), i32(all.map((a) => a.seq)), table, i32(all.map((a) => a.pos)));
  const fed = s.seqs.flatMap((q, i) => Array.from({ length: q.fed }, (_, j) => ({ seq: i, pos: q.cached + j })));
  const q = Float32Array.from({ length: fed.length * nH * s.hd }, () => 2 * (2 * rand() - 1));
  return { args: [f32(q, [fed.length, nH * s.hd]), kc, vc, i32(fed.map((f) => f.seq)), table, i32(fed.map((f) => f.pos))] as const, nH, scale: 1 / Math.sqrt(s.hd), q, fed };
}

function errors(s: Setup, seed: number, pv: 'f16' | 'fp8') {
  const b = build(s, seed);
  const exact = get(engine.attention(...b.args, b.nH, b.scale)), sage = get(engine.sageAttention(...b.args, b.nH, b.scale, pv));
  let max = 0, sum = 0;
  for (let i = 0; i < exact.length; i++) {
    const e = Math.abs(exact[i]! - sage[i]!);
    assert.ok(Number.isFinite(sage[i]!), `output ${i} is ${sage[i]}`);
    max = Math.max(max, e);
    sum += e;
  }
  return { max, mean: sum / exact.length, exact, sage };
}

// Outputs are averages of V rows in [-1, 1] (|out| < 1). Measured here: int8 Q K^T with f16 P V, max 4.6e-3 and
// mean 2.7e-4; e4m3 P and V (3 mantissa bits), max 4.4e-2 and mean 2.6e-3. About 2x that is allowed.
const TOLERANCE = { f16: { max: 0.01, mean: 0.0006 }, fp8: { max: 0.08, mean: 0.005 } } as const;

const RAGGED: Setup = { nKv: 2, group: 2, hd: 64, B: 16, dtype: 'bf16', seqs: [{ cached: 0, fed: 150 }, { cached: 100, fed: 70 }] };

for (const pv of ['f16', 'fp8'] as const)
  test(`sageAttention ${pv}: within ${TOLERANCE[pv].max} (max) and ${TOLERANCE[pv].mean} (mean) of exact, GQA, ragged and chunked`, () => {
    for (const [setup, seed] of [[RAGGED, 1], [{ ...RAGGED, nKv: 1, group: 4, hd: 128, B: 64, dtype: 'f32' }, 2], [{ ...RAGGED, dtype: 'fp8' }, 3], [{ ...RAGGED, dtype: 'i8' }, 4]] as const) {
      const e = errors(setup, seed, pv);
      assert.ok(e.max <= TOLERANCE[pv].max && e.mean <= TOLERANCE[pv].mean, `${setup.dtype} cache, hd ${setup.hd}: max ${e.max}, mean ${e.mean}`);
      assert.ok(e.max > 0, 'the quantized path ran (some output differs from exact)');
    }
  });

test('sageAttention: K smoothing makes a large common offset in K as accurate as none', () => {
  for (const pv of ['f16', 'fp8'] as const) {
    const base: Setup = { ...RAGGED, dtype: 'f32' }; // f32: a bf16 cache would round K + 60 to steps of 0.25
    const plain = errors(base, 5, pv), offset = errors({ ...base, kOffset: 20 }, 5, pv);
    // the exact attention ignores the offset (softmax is shift-invariant per query row)...
    for (let i = 0; i < plain.exact.length; i++) assert.ok(Math.abs(plain.exact[i]! - offset.exact[i]!) < 2e-3, `exact output ${i} moved with the offset`);
    // ...and so does Sage's error: without smoothing, K's int8 step would be ~60/127 instead of ~1/127
    assert.ok(offset.mean <= 1.3 * plain.mean + 1e-4 && offset.max <= TOLERANCE[pv].max, `${pv}: offset mean ${offset.mean}, max ${offset.max}; plain mean ${plain.mean}`);
  }
});

test('sageAttention: steps of at most 64 tokens and decode batches get the exact attention bit for bit', () => {
  for (const setup of [{ ...RAGGED, seqs: [{ cached: 30, fed: 64 }] }, { ...RAGGED, seqs: Array.from({ length: 70 }, (_, i) => ({ cached: 10 + i, fed: 1 })) }]) {
    const e = errors(setup, 6, 'f16');
    assert.equal(e.max, 0, `${setup.seqs.length} sequences`);
  }
});

test('sageAttention: refuses a P V type other than f16 and fp8, and bad shapes', () => {
  const b = build(RAGGED, 7);
  assert.throws(() => engine.sageAttention(...b.args, b.nH, b.scale, 'bf16' as 'f16'), /sageAttention: pv must be f16 or fp8 \(got bf16\)/);
  assert.throws(() => engine.sageAttention(...b.args, 3, b.scale, 'f16'), /sageAttention: .*nHeads = 3/);
});

// A mixed step (decode rows first, then prompt chunks, as the step composer builds it): decodeRows gives its leading
// rows the decode kernel on cuda and, under sageAttention, the exact attention.
const MIXED: Setup = { ...RAGGED, seqs: [...Array.from({ length: 5 }, (_, i) => ({ cached: 40 + 7 * i, fed: 1 })), { cached: 0, fed: 150 }, { cached: 100, fed: 70 }] };

/** The step's rows [from, T) as a step of their own (same caches and table). */
function restOf(b: ReturnType<typeof build>, from: number) {
  const width = b.args[0].shape[1]!, rows = b.fed.slice(from);
  return [f32(b.q.slice(from * width), [rows.length, width]), b.args[1], b.args[2], i32(rows.map((f) => f.seq)), b.args[4], i32(rows.map((f) => f.pos))] as const;
}

test('attention with decodeRows: every row as without it, bit for bit (a speed choice only)', () => {
  const b = build(MIXED, 8);
  const plain = get(engine.attention(...b.args, b.nH, b.scale));
  for (const decodeRows of [0, 3, 5, b.fed.length]) assert.deepEqual(get(engine.attention(...b.args, b.nH, b.scale, decodeRows)), plain, `decodeRows ${decodeRows}`);
});

test('sageAttention with decodeRows: the decode rows get the exact attention, the rows after them are quantized as a step of their own', () => {
  const b = build(MIXED, 9), D = 5, width = b.args[0].shape[1]!;
  for (const pv of ['f16', 'fp8'] as const) {
    const mixed = get(engine.sageAttention(...b.args, b.nH, b.scale, pv, undefined, D));
    const exact = get(engine.attention(...b.args, b.nH, b.scale));
    assert.deepEqual(mixed.subarray(0, D * width), exact.subarray(0, D * width), `${pv}: decode rows exact`);
    const rest = get(engine.sageAttention(...restOf(b, D), b.nH, b.scale, pv));
    assert.deepEqual(mixed.subarray(D * width), rest, `${pv}: the prompt rows as their own step`);
    // without decodeRows the decode rows were quantized with the rest
    const whole = get(engine.sageAttention(...b.args, b.nH, b.scale, pv));
    assert.notDeepEqual(whole.subarray(0, D * width), exact.subarray(0, D * width), `${pv}: decode rows quantized without decodeRows`);
  }
  // 64 rows after the decode rows: the whole step is exact (a step of 64 tokens is)
  const short = build({ ...MIXED, seqs: [...MIXED.seqs.slice(0, 5), { cached: 10, fed: 64 }] }, 10);
  assert.deepEqual(get(engine.sageAttention(...short.args, short.nH, short.scale, 'f16', undefined, 5)), get(engine.attention(...short.args, short.nH, short.scale)));
});

test('attention and sageAttention refuse decodeRows outside [0, T]', () => {
  const b = build(MIXED, 11), T = b.fed.length;
  for (const bad of [-1, T + 1]) {
    assert.throws(() => engine.attention(...b.args, b.nH, b.scale, bad), new RegExp(`attention: decodeRows = ${bad} must be in \\[0, ${T}\\]`));
    assert.throws(() => engine.sageAttention(...b.args, b.nH, b.scale, 'f16', undefined, bad), new RegExp(`sageAttention: decodeRows = ${bad} must be in \\[0, ${T}\\]`));
  }
  assert.throws(() => engine.attention(...b.args, b.nH, b.scale, 1.5), /attention: decodeRows/);
  // a "decode row" whose sequence has other rows: the quantized part names more sequences than the table leaves it
  assert.throws(() => engine.sageAttention(...b.args, b.nH, b.scale, 'f16', undefined, 6), /sageAttention: the rows after the decode rows name 2 sequences, over the 1 the table has besides the decode rows': a decode row's sequence has other rows in the step/);
  assert.throws(() => engine.sageAttention(...b.args, b.nH, b.scale, 'f16', undefined, 7), /sageAttention: decodeRows = 7 leaves no row of kvBlockTable \[7, \d+\] i32 for the rows after them/);
});
