/**
 * Scoring: a score job's tokens go out in one step of their own, asking for the log-prob of each token after the
 * first (`full`: the whole log-softmax row of every position), and its answer is read off that step's result.
 */
import { MESSAGE_OVERHEAD_BYTES, WORKER_MESSAGE_MAX_BYTES, fullRowBytes, type StepResult } from '../core/worker-protocol.ts';
import { WeftError } from '../core/errors.ts';
import type { KvBlockTable } from '../core/kv-block-table.ts';
import { toFloat32 } from '../core/wire.ts';
import { tokenLogprobOf } from './generate.ts';
import { StepBatchBuilder } from './step-builder.ts';
import type { ScoreJob, ScoreOutput, StepWork } from './scheduler-jobs.ts';

/** Bytes of rows one score's answer may carry: a step's answer is one worker message. */
export const FULL_ROWS_MAX_BYTES = WORKER_MESSAGE_MAX_BYTES - MESSAGE_OVERHEAD_BYTES;

/**
 * Refuses (WEFT_BAD_REQUEST) a score whose full rows (with `top` alternatives a token) would not fit one step's
 * answer, naming the most tokens that do.
 */
export function checkFullRows(tokens: number, vocab: number, top = 0): void {
  const row = fullRowBytes(vocab, top), bytes = tokens * row;
  if (bytes <= FULL_ROWS_MAX_BYTES) return;
  throw new WeftError('WEFT_BAD_REQUEST', `score: full log-prob rows for ${tokens} tokens of a ${vocab}-token vocabulary are ${(bytes / 2 ** 20).toFixed(1)} MiB, ` +
    `over the ${FULL_ROWS_MAX_BYTES / 2 ** 20} MiB one step's answer carries: ask for the full rows of at most ${Math.floor(FULL_ROWS_MAX_BYTES / row)} tokens a call, or for topLogprobs`);
}

/** The step that scores `job` (its blocks in `kv`), or null when it asks for no row (one token, not `full`: no token has one before it). */
export function scoreStep(job: ScoreJob, kv: KvBlockTable): StepWork | null {
  const positions = job.ids.map((_, i) => i);
  const rows = job.full ? positions : positions.slice(0, -1);
  if (rows.length === 0) return null;
  const builder = new StepBatchBuilder(kv.layout.kvBlockSize);
  const start = builder.append(kv.blocks(job.kv!), job.ids, 0, job.attention);
  for (const r of rows) builder.logits(start + r, { scoreId: job.ids[r + 1] ?? 0, topLogprobs: job.topLogprobs });
  return { kind: 'step', batch: builder.build({ fullLogprobs: job.full }), rows: [job], chunked: [] };
}

/** The score job's answer from the result of its step, `work`. */
export function scoreOutput(job: ScoreJob, work: StepWork, result: StepResult): ScoreOutput {
  const logprobs = [null, ...(result.logprobs ?? []).slice(0, job.ids.length - 1)];
  const top = result.tokenLogprobs && { top: [null, ...result.tokenLogprobs.slice(0, job.ids.length - 1).map((t) => (t ? tokenLogprobOf(t) : null))] };
  if (!job.full || !result.fullLogprobs) return { logprobs, ...top };
  const flat = toFloat32(result.fullLogprobs);
  const n = work.batch.logitRows.length;
  const vocab = flat.length / n;
  return { logprobs, ...top, full: Array.from({ length: n }, (_, r) => flat.slice(r * vocab, (r + 1) * vocab)) };
}
