/**
 * Scoring: a score job's tokens go out in steps of their own, at most the step budget each (a long text in one step
 * would hold its worker past the heartbeat deadline on a CPU), asking for the log-prob of each token after the first
 * (`full`: the whole log-softmax row of every position); its answer is gathered from those steps' results.
 */
import { MESSAGE_OVERHEAD_BYTES, WORKER_MESSAGE_MAX_BYTES, fullRowBytes, type StepResult } from '../core/worker-protocol.ts';
import { WeftError } from '../core/errors.ts';
import type { KvBlockTable } from '../core/kv-block-table.ts';
import { toFloat32 } from '../core/wire.ts';
import { tokenLogprobOf } from './generate.ts';
import { StepBatchBuilder } from './step-builder.ts';
import type { ScoreJob, ScoreOutput, StepWork } from './scheduler-jobs.ts';

/** Bytes of full rows one score may ask for: the rows of each of its steps come back in one worker message, and its
 * whole answer in one RPC reply (64 MiB each). */
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

/**
 * The next step of `job` (its blocks in `kv`): its next tokens, at most `budget` of them (the step budget, as a
 * prompt's chunks), asking for the log-prob of each that has a token after it (`full`: every position's whole row);
 * null when no token it has left asks for a row (its answer is then complete: `scoreOutput`).
 */
export function scoreStep(job: ScoreJob, kv: KvBlockTable, budget: number): StepWork | null {
  const n = job.ids.length, from = job.stepped, to = Math.min(n, from + budget);
  const rows = Array.from({ length: to - from }, (_, i) => from + i).filter((r) => job.full || r < n - 1);
  if (rows.length === 0) return null;
  const builder = new StepBatchBuilder(kv.layout.kvBlockSize);
  const start = builder.append(kv.blocks(job.kv!), job.ids.slice(from, to), from, job.attention);
  for (const r of rows) builder.logits(start + r - from, { scoreId: job.ids[r + 1] ?? 0, topLogprobs: job.topLogprobs });
  return { kind: 'step', batch: builder.build({ fullLogprobs: job.full }), rows: [job], chunked: [] };
}

/** Takes the answer of one of `job`'s steps, `work`; true once the job has stepped all its tokens. */
export function takeScoreStep(job: ScoreJob, work: StepWork, result: StepResult): boolean {
  const n = job.ids.length, rows = work.batch.logitRows.length, first = job.stepped;
  const scored = job.full ? Math.min(rows, n - 1 - first) : rows; // a full score's last row has no token after it
  job.answered.logprobs.push(...(result.logprobs ?? []).slice(0, scored));
  if (result.tokenLogprobs) job.answered.top.push(...result.tokenLogprobs.slice(0, scored).map((t) => (t ? tokenLogprobOf(t) : null)));
  if (job.full && result.fullLogprobs) {
    const flat = toFloat32(result.fullLogprobs);
    const vocab = flat.length / rows;
    for (let r = 0; r < rows; r++) job.answered.full.push(flat.slice(r * vocab, (r + 1) * vocab));
  }
  job.stepped = Math.min(n, first + work.batch.tokens.length);
  return job.stepped === n;
}

/** The score job's answer from what its steps answered. */
export function scoreOutput(job: ScoreJob): ScoreOutput {
  const { logprobs, top, full } = job.answered;
  return {
    logprobs: [null, ...logprobs],
    ...(job.topLogprobs !== null && { top: [null, ...top] }),
    ...(job.full && { full }),
  };
}
