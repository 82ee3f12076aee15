// The native topLogprobs op on the CPU backend against a plain-TypeScript log-softmax (in double) and sort.
// Needs native/build/weft.node (`npm run build:native`).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Engine, type Tensor } from '../../worker/native.ts';
import { prng } from '../helpers/random.ts';

const engine = createEngine({ backend: 'cpu', threads: 2 });
const bytesOf = (a: Float32Array | Int32Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const f32 = (e: Engine, values: Float32Array, shape: number[]): Tensor => e.upload(bytesOf(values), 'f32', shape);
const i32 = (e: Engine, values: number[]): Tensor => e.upload(bytesOf(Int32Array.from(values)), 'i32', [values.length]);

/** log-softmax of one row, in double. */
function logSoftmax(row: Float32Array): number[] {
  const max = Math.max(...row);
  const logSum = Math.log(row.reduce((sum, x) => sum + Math.exp(x - max), 0));
  return Array.from(row, (x) => x - max - logSum);
}

/** The k most likely ids of a row, highest first, ties to the lower id. */
const topIds = (row: Float32Array, k: number): number[] =>
  Array.from(row.keys())
    .sort((a, b) => row[b]! - row[a]! || a - b)
    .slice(0, k);

test('topLogprobs: the id log-prob and the k most likely ids with theirs, per asked-for row', () => {
  const rand = prng(19);
  const R = 5, V = 700, k = 20;
  const logits = Float32Array.from({ length: R * V }, () => -10 + 20 * rand());
  // row 2: a tie at the top (the lower id first) and logits far from zero (the max is subtracted)
  logits[2 * V + 300] = 40;
  logits[2 * V + 17] = 40;
  for (let v = 0; v < V; v++) logits[3 * V + v]! += 1e4;
  const ids = [3, 699, 300, 0, 42];
  const rows = [2, 0, 3, 2]; // a subset, out of order, one row twice
  const out = engine.download(engine.topLogprobs(f32(engine, logits, [R, V]), i32(engine, rows), i32(engine, ids), k)) as Float32Array;
  assert.equal(out.length, rows.length * (1 + 2 * k));
  rows.forEach((r, q) => {
    const row = logits.subarray(r * V, (r + 1) * V);
    const want = logSoftmax(row);
    const got = out.subarray(q * (1 + 2 * k), (q + 1) * (1 + 2 * k));
    const close = (a: number, b: number, what: string): void => assert.ok(Math.abs(a - b) <= 1e-5 * (1 + Math.abs(b)), `row ${r} ${what}: ${a} vs ${b}`);
    close(got[0]!, want[ids[r]!]!, `log p(${ids[r]})`);
    const top = topIds(row, k);
    assert.deepEqual(Array.from(got.subarray(1, 1 + k)), top, `row ${r}: top ids`);
    top.forEach((id, j) => close(got[1 + k + j]!, want[id]!, `top ${j} (id ${id})`));
  });
  // the tie: id 17 before id 300
  assert.deepEqual(Array.from(out.subarray(1, 3)), [17, 300]);
});

test('topLogprobs: k = 0 gives the id log-prob alone; k past the vocabulary pads with id -1', () => {
  const logits = Float32Array.from([1, 2, 3, 0.5]);
  const zero = engine.download(engine.topLogprobs(f32(engine, logits, [1, 4]), i32(engine, [0]), i32(engine, [1]), 0)) as Float32Array;
  assert.equal(zero.length, 1);
  assert.ok(Math.abs(zero[0]! - logSoftmax(logits)[1]!) < 1e-6);
  const wide = engine.download(engine.topLogprobs(f32(engine, logits, [1, 4]), i32(engine, [0]), i32(engine, [1]), 6)) as Float32Array;
  assert.deepEqual(Array.from(wide.subarray(1, 7)), [2, 1, 0, 3, -1, -1]);
  assert.deepEqual(Array.from(wide.subarray(11, 13)), [-Infinity, -Infinity]);
});

test('topLogprobs: bad arguments are refused by name', () => {
  const logits = f32(engine, new Float32Array(6), [2, 3]);
  const refuses = (fn: () => unknown, pattern: RegExp): void =>
    assert.throws(fn, (err: unknown) => (err as { code?: string }).code === 'WEFT_NATIVE' && pattern.test((err as Error).message));
  refuses(() => engine.topLogprobs(logits, i32(engine, [0]), i32(engine, [0, 1]), 21), /topLogprobs: k = 21 must be in \[0, 20\]/);
  refuses(() => engine.topLogprobs(logits, i32(engine, [0]), i32(engine, [0]), 1), /topLogprobs: ids .* must have one id per row/);
  refuses(() => engine.topLogprobs(logits, i32(engine, [2]), i32(engine, [0, 1]), 1), /topLogprobs: rows\[0\] = 2 is out of range/);
  refuses(() => engine.topLogprobs(logits, i32(engine, [1]), i32(engine, [0, 3]), 1), /topLogprobs: ids\[1\] = 3 is out of range/);
});
