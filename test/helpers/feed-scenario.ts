/**
 * The decode pipeline's contract, for any backend: a run of steps whose decode tokens are fed from the step
 * before (StepBatch.feed), launched back to back without waiting for answers, draws exactly the tokens of the same
 * steps run one at a time with every token given. The steps cover what the runner must get right: an eager step
 * feeding graph steps, graph steps feeding graph steps of the same and of a larger batch (the larger one captured
 * while the draw it feeds from is still on the device), and a graph step feeding a mixed eager step (a prompt
 * joining two decoding sequences). Sampled rows (temperature 0.8) as well as greedy ones.
 */
import type { StepBatch } from '../../core/step-batch.ts';
import type { StepRunner } from '../../worker/runner.ts';

type Row = { seq: number; prompt?: number[] } | { seq: number; fedFrom: number };
/** One step: its rows, each a prompt (prefill) or a decode token drawn at a logit row of the step before. */
const STEPS: Row[][] = [
  [{ seq: 0, prompt: [1, 5, 9, 2] }, { seq: 1, prompt: [3, 3, 7] }],
  [{ seq: 0, fedFrom: 0 }, { seq: 1, fedFrom: 1 }],
  [{ seq: 0, fedFrom: 0 }],
  [{ seq: 0, fedFrom: 0 }],
  [{ seq: 0, fedFrom: 0 }, { seq: 2, prompt: [4, 8] }],
  [{ seq: 0, fedFrom: 0 }, { seq: 2, fedFrom: 1 }],
  [{ seq: 0, fedFrom: 0 }, { seq: 2, fedFrom: 1 }],
  [{ seq: 0, fedFrom: 0 }, { seq: 2, fedFrom: 1 }, { seq: 3, prompt: [6, 1, 1] }],
  [{ seq: 0, fedFrom: 0 }, { seq: 2, fedFrom: 1 }, { seq: 3, fedFrom: 2 }],
];

/**
 * Runs STEPS on `fed` (feeds, no waiting) and on `given` (every token given, one step at a time). Sequence s owns
 * KV block s. Returns each run's tokens per step.
 */
export async function feedScenario(fed: StepRunner, given: StepRunner): Promise<{ fed: number[][]; given: number[][] }> {
  const positions = new Map<number, number>();
  const batches: Array<{ batch: StepBatch; rows: Row[] }> = STEPS.map((rows, step) => {
    const batch: StepBatch = { tokens: [], positions: [], tokenSeq: [], kvBlockTable: [], logitRows: [], feed: [], sample: { temperature: [], topK: [], topP: [], uniform: [] } };
    rows.forEach((row, r) => {
      const tokens = 'prompt' in row ? row.prompt! : [0];
      const start = positions.get(row.seq) ?? 0;
      batch.kvBlockTable.push([row.seq]);
      tokens.forEach((token, i) => {
        batch.tokens.push(token);
        batch.positions.push(start + i);
        batch.tokenSeq.push(r);
        batch.feed!.push('fedFrom' in row && i === 0 ? row.fedFrom : -1);
      });
      positions.set(row.seq, start + tokens.length);
      batch.logitRows.push(batch.tokens.length - 1);
      // sequence 1 and 3 sample at temperature 0.8, the others greedily
      const sampled = row.seq % 2 === 1;
      batch.sample!.temperature.push(sampled ? 0.8 : 0);
      batch.sample!.topK.push(0);
      batch.sample!.topP.push(1);
      batch.sample!.uniform.push(((step * 7 + r * 3) % 10) / 10 + 0.05);
    });
    return { batch, rows };
  });

  const launched = [];
  for (const { batch } of batches) launched.push((await fed.launch(batch)).result);
  const fedTokens = (await Promise.all(launched)).map((result) => result.tokens!);

  const givenTokens: number[][] = [];
  for (const { batch, rows } of batches) {
    const previous = givenTokens[givenTokens.length - 1] ?? [];
    const tokens = [...batch.tokens];
    let t = 0;
    for (const row of rows) {
      if ('fedFrom' in row) tokens[t] = previous[row.fedFrom]!;
      t += 'prompt' in row ? row.prompt!.length : 1;
    }
    const { feed: _feed, ...plain } = batch;
    givenTokens.push((await given.step({ ...plain, tokens })).tokens!);
  }
  return { fed: fedTokens, given: givenTokens };
}
