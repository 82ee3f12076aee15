/**
 * The speculative acceptance rule is exact: over many draws, the tokens it produces follow the target's
 * distribution, whatever the draft proposes. A chi-square test over the joint distribution of the first
 * two tokens (5-token vocabulary, so 25 cells, 24 degrees of freedom) at significance 0.001 (critical
 * value 51.18); 200k rounds make a real bias of a few percent show as a chi-square in the hundreds. The
 * same test run with a deliberately wrong rule (resample from p instead of max(0, p - q) on rejection)
 * must fail, which shows the test can tell.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SpeculativeExecutor, acceptDraft, drawFrom, predictedSpeedup, samplingDistribution } from '../../coordinator/speculative.ts';
import { SeededRng } from '../../coordinator/rng.ts';
import { SequenceState } from '../../coordinator/generate.ts';
import { parseSamplingParams } from '../../coordinator/sampling-params.ts';
import { checkKvPositions, stepBatchSchema, type StepBatch } from '../../core/step-batch.ts';

const V = 5;
const CRITICAL_24_DF_P001 = 51.18;
const normalise = (w: number[]): number[] => w.map((x) => x / w.reduce((a, b) => a + b, 0));
// target: p0 for the first token, p1[x0] for the second given the first; the draft is deliberately different
const p0 = normalise([5, 1, 3, 0.5, 2]);
const p1 = Array.from({ length: V }, (_, x) => normalise(Array.from({ length: V }, (_, y) => 1 + ((x * 3 + y * 7) % 5))));
const q0 = normalise([1, 4, 1, 3, 1]);
const q1 = Array.from({ length: V }, (_, x) => normalise(Array.from({ length: V }, (_, y) => 1 + ((x + y * 2) % 4))));
const p2 = normalise([1, 1, 1, 1, 1]); // after two drafts; only the bonus draw uses it

type Rule = typeof acceptDraft;

/** Wrong on purpose: on rejection draw from p, not from the residual max(0, p - q). */
const wrongRule: Rule = (draft, q, p, uniform) => {
  const tokens: number[] = [];
  for (let i = 0; i < draft.length; i++) {
    if (uniform() < Math.min(1, p[i]![draft[i]!]! / q[i]![draft[i]!]!)) {
      tokens.push(draft[i]!);
      continue;
    }
    tokens.push(drawFrom(p[i]!, uniform()));
    return { accepted: i, tokens };
  }
  tokens.push(drawFrom(p[draft.length]!, uniform()));
  return { accepted: draft.length, tokens };
};

/** Chi-square of the first two tokens over `rounds` speculative rounds (k = 2) against the target's joint. */
function chiSquare(rule: Rule, rounds: number): number {
  const rng = new SeededRng(99);
  const u = (): number => rng.nextUniform();
  const counts = new Float64Array(V * V);
  for (let n = 0; n < rounds; n++) {
    const d0 = drawFrom(q0, u());
    const d1 = drawFrom(q1[d0]!, u());
    let { tokens } = rule([d0, d1], [q0, q1[d0]!], [p0, p1[d0]!, p2], u);
    // a rejection at the first token ends the round with one token: the next round continues from it,
    // so the second token then comes from the target's own distribution given the first
    if (tokens.length === 1) tokens = [tokens[0]!, drawFrom(p1[tokens[0]!]!, u())];
    counts[tokens[0]! * V + tokens[1]!]!++;
  }
  let chi = 0;
  for (let x = 0; x < V; x++)
    for (let y = 0; y < V; y++) {
      const expected = rounds * p0[x]! * p1[x]![y]!;
      chi += (counts[x * V + y]! - expected) ** 2 / expected;
    }
  return chi;
}

test('speculative sampling reproduces the target distribution (chi-square, 24 df, p = 0.001)', () => {
  const chi = chiSquare(acceptDraft, 200_000);
  assert.ok(chi < CRITICAL_24_DF_P001, `chi-square ${chi.toFixed(1)} exceeds ${CRITICAL_24_DF_P001}`);
});

test('the same test rejects a wrong acceptance rule', () => {
  const chi = chiSquare(wrongRule, 200_000);
  assert.ok(chi > CRITICAL_24_DF_P001, `a biased rule passed with chi-square ${chi.toFixed(1)}`);
});

test('greedy: one-hot distributions accept exactly the target argmax', () => {
  const logitsT = Float32Array.from([0.1, 2, 0.3, 2, -1]); // tie at 1 and 3: lowest index wins
  const logitsD = Float32Array.from([0, 0, 5, 0, 0]);
  const p = samplingDistribution(logitsT, { temperature: 0, topK: 0, topP: 1 });
  const q = samplingDistribution(logitsD, { temperature: 0, topK: 0, topP: 1 });
  assert.deepEqual(Array.from(p), [0, 1, 0, 0, 0]);
  const rng = new SeededRng(1);
  for (let n = 0; n < 100; n++) {
    const outcome = acceptDraft([2], [q], [p, p], () => rng.nextUniform());
    assert.deepEqual(outcome, { accepted: 0, tokens: [1] });
    assert.deepEqual(acceptDraft([1], [p], [p, p], () => rng.nextUniform()), { accepted: 1, tokens: [1, 1] });
  }
});

test('samplingDistribution applies temperature, top-k and top-p as the samplers do', () => {
  const logits = Float32Array.from([2, 1, 0, -1]);
  const full = samplingDistribution(logits, { temperature: 1, topK: 0, topP: 1 });
  const z = [2, 1, 0, -1].map(Math.exp);
  full.forEach((v, i) => assert.ok(Math.abs(v - z[i]! / z.reduce((a, b) => a + b, 0)) < 1e-12));
  const top2 = samplingDistribution(logits, { temperature: 1, topK: 2, topP: 1 });
  assert.ok(Math.abs(top2[0]! - z[0]! / (z[0]! + z[1]!)) < 1e-12);
  assert.equal(top2[2], 0);
  const nucleus = samplingDistribution(logits, { temperature: 1, topK: 0, topP: 0.5 }); // p0 = 0.64 alone reaches 0.5
  assert.deepEqual(Array.from(nucleus), [1, 0, 0, 0]);
});

test('predicted speedup: (1 - a^(k+1)) / ((1 - a)(k c + 1))', () => {
  assert.ok(Math.abs(predictedSpeedup(0.8, 4, 0.1) - (1 - 0.8 ** 5) / (0.2 * 1.4)) < 1e-12);
  assert.equal(predictedSpeedup(1, 3, 0), 4);
});

test('a round builds its draft and verify steps over the sequence\'s KV blocks (paged sizes: 2 blocks of 4)', async () => {
  const kv = { maxContext: 8, kvBlockSize: 4 };
  const steps: { model: 'draft' | 'target'; batch: StepBatch }[] = [];
  // both models answer "position + 100" at every logit row, so the target accepts every proposal
  const answer = (model: 'draft' | 'target') => async (batch: StepBatch) => {
    steps.push({ model, batch });
    return { tokens: batch.logitRows.map((r) => batch.positions[r]! + 100) };
  };
  const executor = new SpeculativeExecutor(2, kv, answer('draft'), answer('target'));
  const params = parseSamplingParams({ maxNewTokens: 4, temperature: 0, ignoreEos: true }, { maxContext: 8, promptLength: 3, vocabSize: 200 });
  const seq = new SequenceState([1, 2, 3], params, [], { push: () => '', flush: () => '' });
  seq.accept(50); // prefilled: position 3, input [50]
  const [produced] = await executor.round([{ seq, blocks: [6, 2] }]);
  assert.deepEqual(produced, [103, 104, 105]);
  assert.deepEqual(
    steps.map(({ model, batch }) => [model, batch.tokens, batch.positions, batch.logitRows]),
    [
      ['draft', [1, 2, 3, 50], [0, 1, 2, 3], [3]],
      ['draft', [103], [4], [0]],
      ['target', [50, 103, 104], [3, 4, 5], [0, 1, 2]],
    ],
  );
  for (const { batch } of steps) {
    assert.deepEqual(batch.kvBlockTable, [[6, 2]]);
    assert.ok(batch.tokenSeq.every((s) => s === 0));
    assert.deepEqual(stepBatchSchema.parse(batch), batch);
    checkKvPositions(batch, kv.kvBlockSize);
  }
});

test('samplingDistribution keeps the tokens and weights the native sampler draws from (one rule, native/src/sample-rule.h)', async () => {
  const { createEngine } = await import('../../worker/native.ts');
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const rng = new SeededRng(11);
  const vocab = 40;
  const shapes = [
    { temperature: 1, topK: 0, topP: 1 },
    { temperature: 0.7, topK: 5, topP: 1 },
    { temperature: 1.3, topK: 0, topP: 0.6 },
    { temperature: 0.9, topK: 12, topP: 0.8 },
    { temperature: 0, topK: 0, topP: 1 },
  ];
  const uniforms = Array.from({ length: 64 }, (_, i) => (i + 0.5) / 64);
  for (const shape of shapes) {
    // a few exact ties, so the order among equal logits (lower index first) is exercised too
    const logits = Float32Array.from({ length: vocab }, (_, i) => (i % 7 === 3 ? 1.25 : 3 * (rng.nextUniform() - 0.5)));
    const distribution = samplingDistribution(logits, shape);
    // the native rule walks the kept candidates by probability (ties: lower index), not by index
    const order = Array.from(distribution.keys()).filter((i) => distribution[i]! > 0).sort((a, b) => distribution[b]! - distribution[a]! || a - b);
    const expected = uniforms.map((u) => {
      let cumulative = 0;
      for (const i of order) if ((cumulative += distribution[i]!) > u) return i;
      return order[order.length - 1]!;
    });
    const rows = uniforms.length;
    const logitRows = new Float32Array(rows * vocab);
    for (let r = 0; r < rows; r++) logitRows.set(logits, r * vocab);
    const tensor = engine.upload(new Uint8Array(logitRows.buffer), 'f32', [rows, vocab]);
    const perRow = (value: number): Float32Array => new Float32Array(rows).fill(value);
    const drawn = engine.sample(tensor, perRow(shape.temperature), new Int32Array(rows).fill(shape.topK), perRow(shape.topP), Float32Array.from(uniforms));
    assert.deepEqual(Array.from(drawn), expected, `shape ${JSON.stringify(shape)}`);
  }
});
