/**
 * What per-token log-probs cost on the device: the topLogprobs op (one block per asked-for row, k + 2 reads of the
 * row) against logSoftmax of the same rows, at Llama-3's vocabulary, as a table of µs per call:
 *
 *   node --import tsx bench/top-logprobs.ts        (CUDA; well under a minute)
 *
 * Rows a step does not ask for cost nothing (the op runs only on the asked rows), so the cost is per row asking.
 * Each call includes the upload of its row list, as the runner makes one per step.
 */
import { createEngine, type Tensor } from '../worker/native.ts';

const V = 128_256;
const ROWS = 64;
const engine = createEngine({ backend: 'cuda', arenaBytes: 2 ** 28 });
const logits = engine.randomUniform('f32', [ROWS, V], 19, 8);
const ids = engine.upload(new Uint8Array(new Int32Array(ROWS).fill(7).buffer), 'i32', [ROWS]);

/** µs per call of `op` (in steps of its own: step memory is reused), over `iterations` after a warm-up. */
function time(op: () => Tensor, iterations = 50): number {
  const once = (): void => {
    engine.beginStep();
    try {
      op();
    } finally {
      engine.endStep();
    }
  };
  once();
  engine.synchronize();
  const started = performance.now();
  for (let i = 0; i < iterations; i++) once();
  engine.synchronize();
  return ((performance.now() - started) / iterations) * 1000;
}

const rows = (q: number): Tensor => engine.upload(new Uint8Array(Int32Array.from({ length: q }, (_, i) => i).buffer), 'i32', [q]);
console.log(`topLogprobs, V = ${V}: µs per call (one launch; logSoftmax of the same rows for scale)`);
console.log(['rows', 'k=0', 'k=5', 'k=20', 'logSoftmax'].map((h) => h.padStart(10)).join(''));
for (const q of [1, 8, 64]) {
  const cells = [0, 5, 20].map((k) => time(() => engine.topLogprobs(logits, rows(q), ids, k)));
  const full = time(() => engine.logSoftmax(engine.gatherRows(logits, rows(q))));
  console.log([String(q), ...[...cells, full].map((us) => us.toFixed(1))].map((c) => c.padStart(10)).join(''));
}
