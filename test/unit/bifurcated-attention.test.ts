// Bifurcated decode attention on the CPU backend equals the plain paged attention: groups of samples that share
// their leading blocks (shared lengths at block edges, ragged continuations, GQA, f32 and bf16 caches), a token of
// no group beside them, a group whose shared range is a member's whole context. The descriptors a step's table
// gives (worker/prefix-groups.ts) and the contract's value checks. Tolerance: both are fp32 reductions over the
// same terms in another order, so 1e-5 of sum p|v| (as native-ops.test.ts's attention) bounds the difference.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Tensor } from '../../worker/native.ts';
import { groupSlots, prefixGroupArrays, prefixGroupTensors, writePrefixGroups } from '../../worker/prefix-groups.ts';
import { prng } from '../helpers/random.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });
const bytesOf = (a: Float32Array | Int32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (values: Float32Array, shape: number[]): Tensor => engine.upload(bytesOf(values), 'f32', shape);
const i32 = (values: readonly number[]): Tensor => engine.upload(bytesOf(Int32Array.from(values)), 'i32', [values.length]);
const table = (rows: number[][]): Tensor => engine.upload(bytesOf(Int32Array.from(rows.flat())), 'i32', [rows.length, rows[0]!.length]);
const get = (t: Tensor): Float32Array => engine.download(t) as Float32Array;
const randoms = (rand: () => number, n: number): Float32Array => Float32Array.from({ length: n }, () => 2 * rand() - 1);

const B = 4;
const KV = { kvBlockSize: B, kvDtype: 'f32' } as const;
const nKv = 2;
const hd = 8;
const scale = 1 / Math.sqrt(hd);

/**
 * Caches of `nBlocks` blocks with random keys and values written at every position of every row of `rows`
 * (shared blocks written once), up to each row's `lengths`; a decode batch of one token per row at its last
 * position; the plain and the bifurcated result.
 */
function run(dtype: 'f32' | 'bf16', nHeads: number, rows: number[][], lengths: number[], tokenGroup: number[], groupShared: number[], seed: number): { plain: Float32Array; bifurcated: Float32Array } {
  const rand = prng(seed);
  const nBlocks = Math.max(...rows.flat()) + 1;
  const k = engine.zeros(dtype, [nBlocks, nKv, B, hd]);
  const v = engine.zeros(dtype, [nBlocks, nKv, B, hd]);
  const blockTable = table(rows);
  // every position of every row: a shared block is written by each row with the same values (the first's)
  const written = new Map<string, { k: Float32Array; v: Float32Array }>();
  rows.forEach((row, s) => {
    for (let p = 0; p < lengths[s]!; p++) {
      const key = `${row[Math.floor(p / B)]}:${p % B}`;
      const kv = written.get(key) ?? { k: randoms(rand, nKv * hd), v: randoms(rand, nKv * hd) };
      written.set(key, kv);
      engine.writeKv(k, v, f32(kv.k, [1, nKv * hd]), f32(kv.v, [1, nKv * hd]), i32([s]), blockTable, i32([p]));
    }
  });
  const T = rows.length;
  const q = f32(randoms(rand, T * nHeads * hd), [T, nHeads * hd]);
  const seq = i32(rows.map((_, s) => s));
  const positions = i32(lengths.map((n) => n - 1));
  return {
    plain: get(engine.attention(q, k, v, seq, blockTable, positions, nHeads, scale)),
    bifurcated: get(engine.attentionBifurcated(q, k, v, seq, blockTable, positions, i32(tokenGroup), i32(groupShared), nHeads, scale)),
  };
}

function assertClose(got: Float32Array, want: Float32Array, what: string): void {
  assert.equal(got.length, want.length);
  for (let i = 0; i < got.length; i++) assert.ok(Math.abs(got[i]! - want[i]!) <= 1e-5 * (1 + Math.abs(want[i]!)), `${what}: element ${i}: ${got[i]} vs ${want[i]}`);
}

for (const dtype of ['f32', 'bf16'] as const)
  for (const nHeads of [2, 8])
    test(`bifurcated equals plain paged attention (${dtype} cache, ${nHeads} heads over ${nKv} kv heads): block edges, ragged continuations, a token of no group`, () => {
      // group 0: three samples sharing blocks 0, 1 (8 positions) and continuing 1, 4 and 5 positions past them;
      // group 1: two sharing block 6, one of them at the shared range's last position (its whole context shared);
      // token 5: a sequence of its own
      const rows = [
        [0, 1, 2, 0],
        [0, 1, 3, 9],
        [0, 1, 4, 5],
        [6, 7, 0, 0],
        [6, 0, 0, 0],
        [10, 11, 0, 0],
      ];
      const lengths = [9, 12, 13, 7, 4, 6];
      const { plain, bifurcated } = run(dtype, nHeads, rows, lengths, [0, 0, 0, 1, 1, -1], [8, 4], 7 + nHeads);
      assertClose(bifurcated, plain, 'bifurcated');
      // sharing nothing (every token alone, or a group of shared length 0) is the plain attention too
      const alone = run(dtype, nHeads, rows, lengths, [-1, -1, -1, -1, -1, 0], [0], 7 + nHeads);
      assertClose(alone.bifurcated, alone.plain, 'no groups');
    });

test('a shared range off a block edge and groups listed in any order still equal the plain attention', () => {
  const rows = [
    [3, 1, 0],
    [3, 1, 2],
  ];
  const { plain, bifurcated } = run('f32', 4, rows, [10, 11], [1, 1], [0, 6], 3);
  assertClose(bifurcated, plain, 'shared 6');
});

test('the contract: members must share the blocks, the shared range must lie within each member, groups must exist', () => {
  const rows = [
    [0, 1],
    [0, 2],
  ];
  const nBlocks = 3;
  const k = engine.zeros('f32', [nBlocks, nKv, B, hd]);
  const v = engine.zeros('f32', [nBlocks, nKv, B, hd]);
  const q = f32(new Float32Array(2 * 2 * hd), [2, 2 * hd]);
  const call = (positions: number[], tokenGroup: number[], groupShared: number[]): Tensor =>
    engine.attentionBifurcated(q, k, v, i32([0, 1]), table(rows), i32(positions), i32(tokenGroup), i32(groupShared), 2, scale);
  call([5, 6], [0, 0], [4]); // block 0 shared: fine
  assert.throws(() => call([7, 7], [0, 0], [8]), /attentionBifurcated: token 1 of group 0 holds block 2 as its block 1, its group's first member \(token 0\) block 1/);
  assert.throws(() => call([2, 6], [0, 0], [4]), /attentionBifurcated: groupShared\[0\] = 4 is past position 2 of its member token 0/);
  assert.throws(() => call([5, 6], [0, 1], [4]), /attentionBifurcated: tokenGroup\[1\] = 1 is not -1 or a group below 1/);
  assert.throws(() => call([5, 6], [0, 0], [-4]), /attentionBifurcated: groupShared\[0\] = -4 is negative/);
  assert.throws(() => engine.attentionBifurcated(q, k, v, i32([0, 1]), table(rows), i32([5, 6]), i32([0]), i32([4]), 2, scale), /attentionBifurcated: tokenGroup \[1\] i32 must be \[2\]/);
});

test('prefix groups of a decode step: tokens whose rows begin with the same blocks, whole blocks each member reaches', () => {
  const batch = {
    tokenSeq: [0, 1, 2, 3, 4],
    positions: [9, 13, 6, 8, 2],
    kvBlockTable: [
      [0, 1, 2],
      [0, 1, 3, 4],
      [5, 6],
      [0, 1, 7],
      [8],
    ],
  };
  assert.deepEqual(prefixGroupArrays(batch, KV), { tokenGroup: Int32Array.from([0, 0, -1, 0, -1]), groupShared: Int32Array.from([8]) });
  // a member at position 6 reaches one whole block of the two its row shares
  assert.deepEqual(prefixGroupArrays({ ...batch, positions: [9, 13, 6, 6, 2] }, KV)?.groupShared, Int32Array.from([4]));
  // nothing shared, a prefill (several tokens of one row), a single token: none
  assert.equal(prefixGroupArrays({ ...batch, kvBlockTable: [[0], [1], [2], [3], [4]] }, KV), null);
  assert.equal(prefixGroupArrays({ ...batch, tokenSeq: [0, 0, 1, 3, 4] }, KV), null);
  assert.equal(prefixGroupArrays({ tokenSeq: [0], positions: [9], kvBlockTable: [[0, 1, 2]] }, KV), null);
});

test('a decode graph holds its groups in a power of two of slots, at most the bucket, and refuses a step with more', () => {
  assert.deepEqual([1, 2, 3, 4, 5, 9].map((groups) => groupSlots(groups, 8)), [1, 2, 4, 4, 8, 8]);
  assert.equal(groupSlots(3, 2), 2);
  const tensors = prefixGroupTensors(engine, 4, 2);
  assert.deepEqual(tensors.groupShared.shape, [2]);
  writePrefixGroups(engine, tensors, { tokenGroup: Int32Array.from([1, 0, 1]), groupShared: Int32Array.from([8]) });
  assert.deepEqual([...(engine.download(tensors.tokenGroup) as Int32Array)], [1, 0, 1, -1]);
  assert.deepEqual([...(engine.download(tensors.groupShared) as Int32Array)], [8, 0]);
  assert.throws(
    () => writePrefixGroups(engine, tensors, { tokenGroup: Int32Array.from([0, 1, 2]), groupShared: Int32Array.from([4, 4, 4]) }),
    /a step of 3 prefix groups in a graph of 2 group slots/,
  );
});
