/**
 * A run of decode steps timed two ways, for the benches:
 *  - serial: each step awaited before the next is built, its tokens back on the host first;
 *  - ahead: as the worker runs `weft generate` and `weft serve` (worker/main.ts): each step queued before the
 *    previous one's tokens are back, its tokens fed from that step's draw on the device (StepBatch.feed), so
 *    the host builds step i + 1 while the device runs step i.
 * The difference is the host's share of a step that the product path hides.
 */
import type { StepBatch, StepResult } from '../core/step-batch.ts';
import type { StepRunner } from '../worker/runner.ts';

/** The decode step at `position` (every row at the same position), without its tokens. */
export type DecodeAt = (position: number) => Omit<StepBatch, 'tokens' | 'feed'>;

/** ms per step over `steps` serial steps from position `from`, the first fed `tokens`; and the tokens the last drew. */
export async function serialStepMs(runner: StepRunner, decodeAt: DecodeAt, tokens: number[], from: number, steps: number): Promise<{ ms: number; tokens: number[] }> {
  const started = performance.now();
  for (let i = 0; i < steps; i++) tokens = (await runner.step({ ...decodeAt(from + i), tokens })).tokens!;
  return { ms: (performance.now() - started) / steps, tokens };
}

/**
 * ms per step over `steps` steps from position `from`, each queued before the previous one's answer is awaited,
 * row r fed from row r of the step before (the runner's previous step must have drawn one token per row).
 */
export async function aheadStepMs(runner: StepRunner, decodeAt: DecodeAt, rows: number, from: number, steps: number): Promise<number> {
  const feed = [...Array(rows).keys()];
  const started = performance.now();
  let previous: Promise<StepResult> | null = null;
  for (let i = 0; i < steps; i++) {
    const { result } = await runner.launch({ ...decodeAt(from + i), tokens: Array(rows).fill(0), feed });
    await previous;
    previous = result;
  }
  await previous;
  return (performance.now() - started) / steps;
}
