/**
 * Per-token log-probs on the worker: which logit rows of a step ask for them (StepBatch.topLogprobs), and the
 * native topLogprobs op's output [Q, 1 + 2k] f32 read back as one TokenLogprobs per logit row.
 */
import type { StepBatch, TokenLogprobs } from '../core/step-batch.ts';

/** The logit rows that ask for log-probs, and the most alternatives one of them asks for (the op's k). */
export interface LogprobAsks {
  readonly rows: number[]; // [Q] logit rows, ascending
  readonly k: number;
  /** per asked row, its own k (<= k: the rest of the op's columns are dropped) */
  readonly ks: number[]; // [Q]
}

/** What the batch asks for, or null when no row does (the step then costs nothing more). */
export function logprobAsks(batch: Pick<StepBatch, 'topLogprobs'>): LogprobAsks | null {
  const rows: number[] = [];
  const ks: number[] = [];
  batch.topLogprobs?.forEach((k, row) => {
    if (k < 0) return;
    rows.push(row);
    ks.push(k);
  });
  return rows.length ? { rows, ks, k: Math.max(...ks) } : null;
}

/** One entry per logit row of `logitRows` (null where none was asked) from the op's output `values` [Q, 1 + 2k]. */
export function readTokenLogprobs(values: Float32Array, asks: LogprobAsks, logitRows: number): (TokenLogprobs | null)[] {
  const out: (TokenLogprobs | null)[] = Array.from({ length: logitRows }, () => null);
  const width = 1 + 2 * asks.k;
  asks.rows.forEach((row, q) => {
    const at = q * width;
    const own = asks.ks[q]!;
    out[row] = {
      logprob: values[at]!,
      topIds: Array.from(values.subarray(at + 1, at + 1 + own)),
      topLogprobs: Array.from(values.subarray(at + 1 + asks.k, at + 1 + asks.k + own)),
    };
  });
  return out;
}
