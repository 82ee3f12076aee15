// SparQ decode attention on the CPU backend (native/src/cuda/attention-sparq.cuh states the algorithm): sparqAppend
// keeps the transposed K and the per-block V sums; sparqAttention equals the dense attention bit for bit where a
// token's length is at most its k, equals an independent TypeScript statement of the algorithm within float
// rounding (1e-5) elsewhere, approaches dense as r -> hd and k -> length, and refuses settings it cannot serve.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { engineIo } from '../helpers/engine-io.ts';
import { maxAbsDiff } from '../helpers/fixtures.ts';
import { prng } from '../helpers/random.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });
const { f32, i32, get } = engineIo(engine);

interface Setup {
  nKv: number;
  group: number;
  hd: number;
  B: number;
  lens: number[]; // one sequence per entry, filled with this many positions
  dtype: 'f32' | 'bf16';
}

/** Fills paged caches (each sequence's blocks scattered in the pool, in reverse) and SparQ's state through the ops. */
function build(s: Setup, seed: number) {
  const rand = prng(seed);
  const perSeq = Math.max(...s.lens.map((l) => Math.ceil(l / s.B)));
  const nBlocks = perSeq * s.lens.length + 1;
  const rows = s.lens.map((_, i) => Array.from({ length: perSeq }, (_, j) => nBlocks - 1 - (i * perSeq + j)));
  const cache = () => engine.zeros(s.dtype, [nBlocks, s.nKv, s.B, s.hd]);
  const kc = cache(), vc = cache();
  const kT = engine.zeros(s.dtype, [nBlocks, s.nKv, s.hd, s.B]), vSum = engine.zeros('f32', [nBlocks, s.nKv, s.hd]);
  const table = i32(rows.flat(), [rows.length, perSeq]);
  const seq = s.lens.flatMap((l, i) => Array<number>(l).fill(i)), pos = s.lens.flatMap((l) => Array.from({ length: l }, (_, p) => p));
  const width = s.nKv * s.hd;
  // Keys with a few large components per head, so |q| selection has something to find (as trained models do).
  const k = Float32Array.from({ length: seq.length * width }, (_, i) => (2 * rand() - 1) * (i % s.hd < 4 ? 3 : 1));
  const v = Float32Array.from({ length: seq.length * width }, () => 2 * rand() - 1);
  engine.writeKv(kc, vc, f32(k, [seq.length, width]), f32(v, [seq.length, width]), i32(seq), table, i32(pos));
  engine.sparqAppend(kT, vSum, kc, vc, i32(seq), table, i32(pos));
  return { kc, vc, kT, vSum, table, rows, rand, nBlocks };
}

const queries = (rand: () => number, T: number, nH: number, hd: number) =>
  Float32Array.from({ length: T * nH * hd }, (_, i) => (2 * rand() - 1) * (i % hd < 4 ? 2 : 1));

function run(s: Setup, b: ReturnType<typeof build>, q: Float32Array, r: number[], k: number[], sparq: boolean): Float32Array {
  const T = s.lens.length, nH = s.nKv * s.group;
  const args = [f32(q, [T, nH * s.hd]), b.kc, b.vc] as const;
  const seq = i32(s.lens.map((_, i) => i)), pos = i32(s.lens.map((l) => l - 1)), scale = 1 / Math.sqrt(s.hd);
  return get(sparq ? engine.sparqAttention(...args, b.kT, b.vSum, seq, b.table, pos, i32(r), i32(k), nH, scale) : engine.attention(...args, seq, b.table, pos, nH, scale));
}

/** The n indices of the largest keys, ties to the lower index, ascending. */
const topIndices = (keys: ArrayLike<number>, n: number): number[] =>
  Array.from(keys, (key, i) => ({ key, i }))
    .sort((a, b) => b.key - a.key || a.i - b.i)
    .slice(0, n)
    .map((e) => e.i)
    .sort((a, b) => a - b);

/** Algorithm 1 of SparQ with the group-shared selection, from the cache values read back as numbers. */
function reference(s: Setup, b: ReturnType<typeof build>, q: Float32Array, r: number, kRows: number): Float32Array {
  const K = get(b.kc), V = get(b.vc), nH = s.nKv * s.group, out = new Float32Array(s.lens.length * nH * s.hd);
  const row = (t: number, g: number, p: number) => ((b.rows[t]![Math.floor(p / s.B)]! * s.nKv + g) * s.B + (p % s.B)) * s.hd;
  s.lens.forEach((len, t) => {
    for (let g = 0; g < s.nKv; g++) {
      const heads = Array.from({ length: s.group }, (_, h) => q.subarray(((t * nH) + g * s.group + h) * s.hd, ((t * nH) + g * s.group + h + 1) * s.hd));
      const cols = topIndices(Array.from({ length: s.hd }, (_, d) => heads.reduce((a, qh) => a + Math.abs(qh[d]!), 0)), r);
      const shat = heads.map((qh) => {
        const l1 = (idx: number[]) => idx.reduce((a, d) => a + Math.abs(qh[d]!), 0);
        const c = Math.sqrt(l1(Array.from({ length: s.hd }, (_, d) => d)) / l1(cols)) / Math.sqrt(s.hd);
        const logits = Array.from({ length: len }, (_, p) => c * cols.reduce((a, d) => a + qh[d]! * K[row(t, g, p) + d]!, 0));
        const m = Math.max(...logits), z = logits.reduce((a, x) => a + Math.exp(x - m), 0);
        return logits.map((x) => Math.exp(x - m) / z);
      });
      const sel = topIndices(Array.from({ length: len }, (_, p) => shat.reduce((a, sh) => a + sh[p]!, 0)), kRows);
      const mean = Array.from({ length: s.hd }, (_, d) => Array.from({ length: len }, (_, p) => V[row(t, g, p) + d]!).reduce((a, x) => a + x, 0) / len);
      heads.forEach((qh, h) => {
        const alpha = sel.reduce((a, p) => a + shat[h]![p]!, 0);
        const sc = sel.map((p) => Array.from(qh, (x, d) => x * K[row(t, g, p) + d]!).reduce((a, x) => a + x, 0) / Math.sqrt(s.hd));
        const m = Math.max(...sc), e = sc.map((x) => Math.exp(x - m)), z = e.reduce((a, x) => a + x, 0);
        for (let d = 0; d < s.hd; d++) {
          const y = sel.reduce((a, p, j) => a + e[j]! * V[row(t, g, p) + d]!, 0) / z;
          out[(t * nH + g * s.group + h) * s.hd + d] = alpha * y + (1 - alpha) * mean[d]!;
        }
      });
    }
  });
  return out;
}

const setups: Setup[] = [
  { nKv: 2, group: 3, hd: 16, B: 4, lens: [37, 9, 64], dtype: 'f32' }, // GQA, partial last blocks
  { nKv: 3, group: 1, hd: 8, B: 8, lens: [40, 17], dtype: 'bf16' }, // MHA, bf16 caches
];

test('sparqAppend: kT is the K cache transposed within each block; vSum is each full block\'s V sum', () => {
  const s = setups[0]!;
  const b = build(s, 1);
  const K = get(b.kc), V = get(b.vc), KT = get(b.kT), S = get(b.vSum);
  const { B, hd, nKv } = s;
  let checkedSums = 0;
  s.lens.forEach((len, t) => {
    for (let j = 0; j < Math.ceil(len / B); j++) {
      const block = b.rows[t]![j]!;
      for (let g = 0; g < nKv; g++) {
        for (let o = 0; o < Math.min(B, len - j * B); o++)
          for (let d = 0; d < hd; d++) assert.equal(KT[((block * nKv + g) * hd + d) * B + o], K[((block * nKv + g) * B + o) * hd + d]);
        for (let d = 0; d < hd; d++) {
          let sum = 0;
          for (let o = 0; o < B; o++) sum += V[((block * nKv + g) * B + o) * hd + d]!;
          const got = S[(block * nKv + g) * hd + d]!;
          if (len >= (j + 1) * B) {
            assert.ok(Math.abs(got - sum) <= 1e-5, `block ${block} head ${g} dim ${d}: ${got} vs ${sum}`);
            checkedSums++;
          } else assert.equal(got, 0, 'a partial block has no sum yet');
        }
      }
    }
  });
  assert.ok(checkedSums > 0);
});

for (const s of setups) {
  const name = `nKv ${s.nKv} group ${s.group} hd ${s.hd} B ${s.B} ${s.dtype}`;
  const nH = s.nKv * s.group;
  test(`sparqAttention with k >= length equals dense attention bit for bit (${name})`, () => {
    const b = build(s, 2);
    const q = queries(b.rand, s.lens.length, nH, s.hd);
    const dense = run(s, b, q, [], [], false);
    const T = s.lens.length;
    assert.deepEqual(run(s, b, q, Array<number>(T).fill(2), s.lens, true), dense, 'k = length');
    assert.deepEqual(run(s, b, q, Array<number>(T).fill(1), Array<number>(T).fill(1 << 30), true), dense, 'k huge');
  });

  test(`sparqAttention equals the algorithm written in TypeScript (${name})`, () => {
    const b = build(s, 3);
    const q = queries(b.rand, s.lens.length, nH, s.hd);
    for (const [r, k] of [[s.hd / 4, 6], [s.hd / 2, 8], [1, 1]] as const) {
      const T = s.lens.length;
      const got = run(s, b, q, Array<number>(T).fill(r), Array<number>(T).fill(k), true);
      const want = reference(s, b, q, r, k);
      const err = maxAbsDiff(got, want);
      assert.ok(err <= 1e-5, `r ${r} k ${k}: max abs diff ${err}`);
    }
  });

  test(`sparqAttention approaches dense as r and k grow, and mixes settings per token (${name})`, () => {
    const b = build(s, 4);
    const q = queries(b.rand, s.lens.length, nH, s.hd);
    const dense = run(s, b, q, [], [], false);
    const T = s.lens.length;
    const errs = [4, 2, 1].map((div) => maxAbsDiff(run(s, b, q, Array<number>(T).fill(s.hd / div), s.lens.map((l) => Math.ceil(l / div) - (div === 1 ? 1 : 0)), true), dense));
    assert.ok(errs[0]! > errs[1]! && errs[1]! > errs[2]!, `errors at 1/4, 1/2, full r with k = length - 1: ${errs.join(', ')}`);
    // per token: token 0 exact (k = its length), the others approximate; token 0 equals dense, the rest equal the all-approximate run
    const k = s.lens.map((l, t) => (t === 0 ? l : 4));
    const mixed = run(s, b, q, Array<number>(T).fill(2), k, true);
    const approx = run(s, b, q, Array<number>(T).fill(2), Array<number>(T).fill(4), true);
    const w = nH * s.hd;
    assert.deepEqual(mixed.subarray(0, w), dense.subarray(0, w));
    assert.deepEqual(mixed.subarray(w), approx.subarray(w));
    assert.notDeepEqual(approx.subarray(0, w), dense.subarray(0, w));
  });
}

test('sparqAttention and sparqAppend refuse what they cannot serve, naming the values', () => {
  const s = setups[0]!;
  const b = build(s, 5);
  const q = queries(b.rand, s.lens.length, s.nKv * s.group, s.hd);
  const T = s.lens.length;
  assert.throws(() => run(s, b, q, Array<number>(T).fill(s.hd + 1), Array<number>(T).fill(4), true), /r = 17, k = 4 \(need 1 <= r <= headDim = 16 and k >= 1\)/);
  assert.throws(() => run(s, b, q, Array<number>(T).fill(2), Array<number>(T).fill(0), true), /k = 0/);
  assert.throws(() => run(s, b, q, [2], [4], true), /sparqR.*must both be \[3\]/);
  const wrongT = engine.zeros(s.dtype, [b.nBlocks, s.nKv, s.B, s.hd]);
  assert.throws(() => engine.sparqAppend(wrongT, b.vSum, b.kc, b.vc, i32([0]), b.table, i32([0])), /kT .* does not match .*\[nBlocks, nKv, hd, B\]/);
});

test('sparqAppend after a rollback: rewriting a block\'s rows remakes its V sum from the new rows (nothing accumulates)', () => {
  const s: Setup = { nKv: 1, group: 2, hd: 8, B: 4, lens: [12], dtype: 'f32' };
  const b = build(s, 6);
  // rewrite positions 4..7 (block 1 of the sequence) with new values, as a sequence does after rejected tokens
  const v = Float32Array.from({ length: 4 * s.hd }, (_, i) => i / 10);
  const k = Float32Array.from({ length: 4 * s.hd }, (_, i) => -i / 10);
  const seq = i32([0, 0, 0, 0]), pos = i32([4, 5, 6, 7]);
  engine.writeKv(b.kc, b.vc, f32(k, [4, s.hd]), f32(v, [4, s.hd]), seq, b.table, pos);
  engine.sparqAppend(b.kT, b.vSum, b.kc, b.vc, seq, b.table, pos);
  const block = b.rows[0]![1]!;
  const sums = get(b.vSum).subarray(block * s.hd, (block + 1) * s.hd);
  const want = Array.from({ length: s.hd }, (_, d) => [0, 1, 2, 3].reduce((a, o) => a + v[o * s.hd + d]!, 0));
  assert.ok(maxAbsDiff(sums, want) <= 1e-6, `${[...sums]} vs ${want}`);
  const kT = get(b.kT);
  for (let o = 0; o < 4; o++) for (let d = 0; d < s.hd; d++) assert.equal(kT[(block * s.hd + d) * s.B + o], k[o * s.hd + d]);
});
