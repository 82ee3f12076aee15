// The state a prompt keeps across its steps under quantized prefill attention (native/src/sage-state.h;
// worker/models/sage-state.ts): on the CPU backend, what a slot keeps and when it starts afresh (the first step is
// the stateless attention bit for bit, a later step keeps the first step's K mean, a step not vouched for recomputes
// it, a short step empties a slot it starts afresh), the refusals; and the host directory that gives prompt chunks
// their slots and takes back what a write below them touches.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Tensor } from '../../worker/native.ts';
import { SageDirectory, sageStateBytes } from '../../worker/models/sage-state.ts';
import { CHUNKS, sageChunks } from '../helpers/sage-chunks.ts';
import { engineIo } from '../helpers/engine-io.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });
const { i32 } = engineIo(engine);

const header = (c: ReturnType<typeof sageChunks>): number[] => Array.from(engine.download(c.state.header));
const maxDiff = (a: Float32Array, b: Float32Array): number => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0);
// fp8 P V at e4m3 (3 mantissa bits): sage-attention.test.ts's bound for it
const TOLERANCE = { f16: 0.01, fp8: 0.08 } as const;

for (const pv of ['f16', 'fp8'] as const)
  test(`sageAttention ${pv} with a state slot: the first step as without state, later steps keep its K mean`, () => {
    const c = sageChunks(engine, pv, 11);
    const [first, second] = CHUNKS.promptChunks;
    // chunk 0 takes slot 0 afresh: the stateless attention, bit for bit; the slot holds [0, 150) and its mean
    assert.deepEqual(c.run(0, [0, 1, 0, -1, 0, 0]), c.run(0, null));
    assert.deepEqual(header(c), [first, 0]);
    const means = engine.download(c.state.means) as Float32Array;
    for (let g = 0; g < CHUNKS.nKv; g++) {
      const keys = c.keys(g, first);
      for (let d = 0; d < CHUNKS.hd; d++) {
        let sum = 0;
        for (let p = 0; p < first; p++) sum += keys[p * CHUNKS.hd + d]!;
        assert.ok(Math.abs(means[g * CHUNKS.hd + d]! - sum / first) < 1e-5, `kv head ${g}, channel ${d}: kept mean ${means[g * CHUNKS.hd + d]}, K's ${sum / first}`);
      }
    }
    // chunk 1, vouched for: the mean kept (not the step's, over [0, 250)), within the bound of exact
    const kept = c.run(1, [0, 0, first, -1, 0, 0]);
    assert.deepEqual(engine.download(c.state.means), means, 'the kept mean is left as it was');
    assert.deepEqual(header(c), [first + second, 0]);
    assert.ok(maxDiff(kept, c.run(1, null)) > 0, 'a kept mean differs from the step\'s own');
    assert.ok(maxDiff(kept, c.exact(1)) <= TOLERANCE[pv], `max ${maxDiff(kept, c.exact(1))} from exact`);
    // vouched for nothing: the step's own mean again (the stateless attention), kept from here
    assert.deepEqual(c.run(1, [0, 0, 0, -1, 0, 0]), c.run(1, null));
    assert.notDeepEqual(engine.download(c.state.means), means);
  });

test('sageAttention with a state slot beside decode rows (a mixed step): the other rows as without them, bit for bit, the decode rows exact', () => {
  const D = 3, width = CHUNKS.nKv * CHUNKS.group * CHUNKS.hd;
  for (const pv of ['f16', 'fp8'] as const) {
    const mixed = sageChunks(engine, pv, 15, D), alone = sageChunks(engine, pv, 15);
    let end = 0;
    for (let i = 0; i < CHUNKS.promptChunks.length; i++) {
      const slot = [0, i === 0 ? 1 : 0, end];
      const got = mixed.run(i, [...Array(D).fill([-1, 0, 0]).flat(), ...slot, -1, 0, 0]);
      assert.deepEqual(got.subarray(0, D * width), mixed.exact(i).subarray(0, D * width), `${pv} chunk ${i}: decode rows exact`);
      assert.deepEqual(got.subarray(D * width), alone.run(i, [...slot, -1, 0, 0]), `${pv} chunk ${i}: the prompt's and the other's rows`);
      assert.deepEqual(engine.download(mixed.state.means), engine.download(alone.state.means), `${pv} chunk ${i}: the same kept mean`);
      assert.deepEqual(header(mixed), header(alone));
      end += CHUNKS.promptChunks[i]!;
    }
  }
});

test('sageAttention with a state slot: a short step empties the slots it starts afresh and attends exactly', () => {
  const c = sageChunks(engine, 'f16', 12);
  c.run(0, [0, 1, 0, -1, 0, 0]);
  assert.deepEqual(header(c), [CHUNKS.promptChunks[0], 0]);
  const { f32 } = engineIo(engine);
  const q = f32(new Float32Array(40 * CHUNKS.nKv * CHUNKS.group * CHUNKS.hd).fill(0.5), [40, CHUNKS.nKv * CHUNKS.group * CHUNKS.hd]);
  const kc = engine.zeros('f32', [4, CHUNKS.nKv, CHUNKS.B, CHUNKS.hd]), vc = engine.zeros('f32', [4, CHUNKS.nKv, CHUNKS.B, CHUNKS.hd]);
  const args = [q, kc, vc, i32(new Array(40).fill(0)), i32([0, 1, 2, 3], [1, 4]), i32(Array.from({ length: 40 }, (_, p) => p))] as const;
  const scale = 1 / Math.sqrt(CHUNKS.hd);
  const out = engine.sageAttention(...args, 4, scale, 'f16', [c.state.header, c.state.means, c.state.blocks, i32([0, 1, 0], [1, 3])]);
  assert.deepEqual(engine.download(out), engine.download(engine.attention(...args, 4, scale)));
  assert.deepEqual(header(c), [0, 0]);
});

test('sageAttention with a state: refuses two rows in one slot and state tensors of the wrong shape, naming them', () => {
  const c = sageChunks(engine, 'f16', 13);
  assert.throws(() => c.run(0, [0, 1, 0, 0, 1, 0]), /sageAttention: sageSlots names slot 0 for rows 0 and 1 \(a slot holds one sequence\)/);
  const bad = sageChunks(engine, 'fp8', 14); // its blocks are sized for fp8 P V
  assert.throws(() => {
    const { header: h, means, blocks } = bad.state;
    const chunk = sageChunks(engine, 'f16', 14);
    Object.assign(chunk.state, { header: h, means, blocks });
    chunk.run(0, [0, 1, 0, -1, 0, 0]);
  }, /sageAttention: sageBlocks \[1, 8, \d+\] i32 must be \[1, nbMax, \d+\] \(f16 P V/);
  assert.throws(() => engine.sageAttention(engine.zeros('f32', [70, 256]), c.state.header, c.state.header, i32([0]), i32([0], [1, 1]), i32([0]), 4, 0.1, 'f16', [c.state.header] as unknown as readonly [Tensor, Tensor, Tensor, Tensor]), /sageAttention: sageState must be \[header, means, blocks, slots\] \(got 1 tensors\)/);
});

const step = (rows: { blocks: number[]; start: number; n: number }[]) => ({
  kvBlockTable: rows.map((r) => r.blocks),
  tokenSeq: rows.flatMap((r, s) => new Array<number>(r.n).fill(s)),
  positions: rows.flatMap((r) => Array.from({ length: r.n }, (_, j) => r.start + j)),
});
const slotsOf = (out: Int32Array | null): number[][] | null => (out ? Array.from({ length: out.length / 3 }, (_, s) => Array.from(out.subarray(3 * s, 3 * s + 3))) : null);

test('SageDirectory: a prompt keeps its slot across chunks; decode rows and short or decode-only steps take none', () => {
  const dir = new SageDirectory(1, 16);
  const prompt = Array.from({ length: 20 }, (_, j) => 100 + j); // its blocks
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: prompt, start: 0, n: 100 }, { blocks: [7], start: 5, n: 1 }]))), [[0, 1, 0], [-1, 0, 0]]);
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: prompt, start: 100, n: 100 }]))), [[0, 0, 100]]);
  assert.equal(dir.assign(step([{ blocks: prompt, start: 200, n: 64 }])), null, '64 tokens: the exact path');
  assert.equal(dir.assign(step(Array.from({ length: 70 }, (_, i) => ({ blocks: [i], start: 3, n: 1 })))), null, 'a decode batch');
  // decode rows first (they attend exactly): 64 prompt rows after them are a short step, 65 are quantized
  const mixed = new SageDirectory(1, 16), decodeRows = [{ blocks: [7], start: 5, n: 1 }, { blocks: [8], start: 9, n: 1 }];
  assert.equal(mixed.assign(step([...decodeRows, { blocks: [300, 301, 302, 303, 304], start: 0, n: 64 }])), null, 'two decode rows and 64 prompt rows');
  assert.deepEqual(slotsOf(mixed.assign(step([...decodeRows, { blocks: [400, 401, 402, 403, 404], start: 0, n: 65 }]))), [[-1, 0, 0], [-1, 0, 0], [0, 1, 0]]);
  // the 64-token step wrote [200, 264) past what the slot holds: it is still vouched for up to 200
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: prompt, start: 264, n: 65 }]))), [[0, 0, 200]]);
});

test('SageDirectory: another sequence in the blocks, or a write below, takes back what the slot vouches for', () => {
  const dir = new SageDirectory(2, 16);
  const a = Array.from({ length: 10 }, (_, j) => 50 + j), b = Array.from({ length: 10 }, (_, j) => 80 + j);
  dir.assign(step([{ blocks: a, start: 0, n: 128 }]));
  dir.assign(step([{ blocks: b, start: 0, n: 128 }]));
  // a prompt in a's first blocks (a prefix cache hit on them) keeps what they hold: 2 blocks agree
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: [50, 51, 99, 98, 97, 96, 95, 94, 93], start: 32, n: 100 }]))), [[0, 0, 32]]);
  // b's blocks rewritten from position 40 by a short step (a prompt recomputed): b is vouched for up to 40
  dir.observe(step([{ blocks: b, start: 40, n: 10 }]));
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: b, start: 50, n: 100 }]))), [[1, 0, 40]]);
  // a new sequence takes the slot used longest ago, afresh; two prompts in one step take both slots
  assert.deepEqual(slotsOf(dir.assign(step([{ blocks: [1, 2, 3, 4, 5, 6, 7, 8], start: 0, n: 100 }, { blocks: b, start: 150, n: 70 }]))), [[0, 1, 0], [1, 0, 150]]);
  const three = dir.assign(step([1, 2, 3].map((x) => ({ blocks: [x * 10, x * 10 + 1, x * 10 + 2, x * 10 + 3, x * 10 + 4], start: 0, n: 70 }))));
  assert.deepEqual(slotsOf(three)?.map((r) => r[0]).sort(), [-1, 0, 1], 'a third prompt finds no slot');
});

test('sageStateBytes: the slots of every layer for the context', () => {
  // Llama-2-7B, one rank: 32 layers, 32 kv heads of 128, 32K positions, fp8: 8.6 GB
  assert.equal(sageStateBytes({ nLayers: 32, headDim: 128 }, 32, 32768, 'fp8'), 32 * (8 + 32 * 128 * 4 + 512 * Math.ceil((32 * (64 * 128 * 2 + 8)) / 256) * 256));
  assert.ok(Math.abs(sageStateBytes({ nLayers: 32, headDim: 128 }, 32, 32768, 'fp8') / 1e9 - 8.6) < 0.05);
});
