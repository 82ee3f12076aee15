/**
 * The step as a value: one forward step over a ragged batch, as the coordinator sends it to every rank, and
 * what rank 0 answers. Plain data, validated on receipt.
 */
import { z } from 'zod';
import { WeftError } from './errors.ts';

const int = z.number().int();
const nonNegInt = int.nonnegative();
/** The most alternatives a row may ask for (StepBatch.topLogprobs): OpenAI's top_logprobs limit. */
export const MAX_TOP_LOGPROBS = 20;

const shown = (value: unknown): string => (typeof value === 'number' ? String(value) : value === null ? 'null' : typeof value);
/**
 * A step's arrays are checked in one loop each, not by a zod schema per element: zod allocates for every element
 * it parses, and a step carries one per token and per KV block (256 sequences of 48 blocks: 0.86 ms and most of a
 * rank's garbage a step; of 2048 blocks, 31 ms). The first bad element is an issue at its index, as zod's would be.
 */
function checkedArray<T>(what: string, ok: (value: unknown) => boolean, { minLength = 0 } = {}) {
  return z.custom<T[]>((value) => Array.isArray(value), 'expected an array').superRefine((values, ctx) => {
    if (values.length < minLength) return ctx.addIssue({ code: 'custom', continue: false, message: `expected at least ${minLength} element${minLength > 1 ? 's' : ''}` });
    const bad = values.findIndex((value) => !ok(value));
    if (bad >= 0) ctx.addIssue({ code: 'custom', continue: false, path: [bad], message: `expected ${what}, got ${shown(values[bad])}` });
  });
}
const intsFrom = (min: number, max = Number.MAX_SAFE_INTEGER, minLength = 0) =>
  checkedArray<number>(max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`, (v) => Number.isSafeInteger(v) && (v as number) >= min && (v as number) <= max, { minLength });
const finiteNumbers = () => checkedArray<number>('a finite number', (v) => Number.isFinite(v));
/** [S][blocks] block ids: at least one row, and one block a row (a sequence owns the block its token is written in). */
const blockTable = checkedArray<number[]>('an array of block ids', (row) => Array.isArray(row), { minLength: 1 }).superRefine((rows, ctx) => {
  for (const [s, row] of rows.entries()) {
    if (row.length === 0) return ctx.addIssue({ code: 'custom', continue: false, path: [s], message: 'expected at least 1 block id' });
    const bad = row.findIndex((id) => !Number.isSafeInteger(id) || id < 0);
    if (bad >= 0) return ctx.addIssue({ code: 'custom', continue: false, path: [s, bad], message: `expected an integer >= 0, got ${shown(row[bad])}` });
  }
});

/**
 * One forward step over a ragged batch: token t is fed at `positions[t]` of the sequence that owns row
 * `tokenSeq[t]` of `kvBlockTable`; that row lists the sequence's KV blocks, block j holding its positions
 * [j * B, (j + 1) * B) with B the KV block size (fixed per cluster, told to the worker at init; see
 * core/kv-block-table.ts). `checkKvPositions` checks the positions against B.
 */
export const stepBatchSchema = z
  .object({
    tokens: intsFrom(0, Number.MAX_SAFE_INTEGER, 1), // [T] token ids
    positions: intsFrom(0), // [T] position of each token in its sequence
    tokenSeq: intsFrom(0), // [T] row of kvBlockTable the token's sequence owns
    kvBlockTable: blockTable, // [S][blocks of sequence s] physical KV block ids
    /** batch rows whose logits are needed, in output order */
    logitRows: intsFrom(0, Number.MAX_SAFE_INTEGER, 1),
    /** per logit row: sample a token with these parameters and these uniforms */
    sample: z
      .object({
        temperature: finiteNumbers(),
        topK: intsFrom(0),
        topP: finiteNumbers(),
        uniform: finiteNumbers(),
      })
      .strict()
      .optional(),
    /** per logit row: return log p(scoreIds[r]) */
    scoreIds: intsFrom(0).optional(),
    /** return the whole log-softmax rows [logitRows, vocab] as float32 bytes */
    fullLogprobs: z.boolean().optional(),
    /**
     * [logitRows] per logit row: -1, nothing; k in [0, MAX_TOP_LOGPROBS], the log-prob of the row's token (the one
     * sampled, else scoreIds[r]) and of its k most likely alternatives (StepResult.tokenLogprobs). Rows at -1 cost
     * nothing; the raw logits' log-softmax, before temperature, top-k and top-p.
     */
    topLogprobs: intsFrom(-1, MAX_TOP_LOGPROBS).optional(),
    /**
     * [T] where each token comes from: -1 = tokens[t]; r >= 0 = the token this rank's previous step sampled for
     * its logit row r (tokens[t] is then a placeholder). Every rank runs the steps in the order sent and draws the
     * same tokens, so the coordinator can send a decode step before the previous step's tokens are back.
     */
    feed: intsFrom(-1).optional(),
    /**
     * Additive biases on sampled rows' logits (OpenAI's logit_bias): logits[rows[j], ids[j]] += values[j] before the
     * draw. The rows' log-probs stay the model's (vLLM's default).
     */
    logitBias: z.object({ rows: intsFrom(0), ids: intsFrom(0), values: finiteNumbers() }).strict().optional(),
    /** [T] SparQ's r and k per token (core/sparq.ts), for a cluster that keeps SparQ's state; 0 or absent: its setting */
    sparq: z.object({ r: intsFrom(0), k: intsFrom(0) }).strict().optional(),
  })
  .strict()
  .superRefine((b, ctx) => {
    if (b.positions.length !== b.tokens.length || b.tokenSeq.length !== b.tokens.length)
      ctx.addIssue({ code: 'custom', message: `tokens, positions and tokenSeq must have equal lengths (${b.tokens.length}, ${b.positions.length}, ${b.tokenSeq.length})` });
    const badSeq = b.tokenSeq.findIndex((s) => s >= b.kvBlockTable.length);
    if (badSeq >= 0) ctx.addIssue({ code: 'custom', message: `token ${badSeq}: tokenSeq ${b.tokenSeq[badSeq]} is past the ${b.kvBlockTable.length} rows of kvBlockTable` });
    if (b.logitRows.some((r) => r >= b.tokens.length)) ctx.addIssue({ code: 'custom', message: 'logitRows index past the batch' });
    const n = b.logitRows.length;
    if (b.sample && [b.sample.temperature, b.sample.topK, b.sample.topP, b.sample.uniform].some((a) => a.length !== n))
      ctx.addIssue({ code: 'custom', message: 'sample arrays must have one entry per logit row' });
    if (b.scoreIds && b.scoreIds.length !== n) ctx.addIssue({ code: 'custom', message: 'scoreIds must have one entry per logit row' });
    if (b.sparq && (b.sparq.r.length !== b.tokens.length || b.sparq.k.length !== b.tokens.length)) ctx.addIssue({ code: 'custom', message: 'sparq r and k must have one entry per token' });
    if (b.feed && b.feed.length !== b.tokens.length) ctx.addIssue({ code: 'custom', message: `feed must have one entry per token (${b.feed.length} for ${b.tokens.length} tokens)` });
    if (b.topLogprobs && b.topLogprobs.length !== n) ctx.addIssue({ code: 'custom', message: 'topLogprobs must have one entry per logit row' });
    if (b.logitBias) {
      const { rows, ids, values } = b.logitBias;
      if (!b.sample) ctx.addIssue({ code: 'custom', message: 'logitBias needs sampled rows (it biases their draw)' });
      if (ids.length !== rows.length || values.length !== rows.length) ctx.addIssue({ code: 'custom', message: `logitBias rows, ids and values must have equal lengths (${rows.length}, ${ids.length}, ${values.length})` });
      if (rows.some((r) => r >= n)) ctx.addIssue({ code: 'custom', message: `logitBias row past the ${n} logit rows` });
    }
    if (b.topLogprobs && !b.sample && !b.scoreIds) ctx.addIssue({ code: 'custom', message: 'topLogprobs needs sampled or scored rows (their tokens are the ones it rates)' });
  });
export type StepBatch = z.infer<typeof stepBatchSchema>;

/** Refuse batch token `t` at `position` when its sequence (row `row`) owns only `blocks` blocks of `kvBlockSize` positions. */
export function checkKvPosition(t: number, position: number, row: number, blocks: number, kvBlockSize: number): void {
  if (position >= blocks * kvBlockSize)
    throw new WeftError('WEFT_BAD_REQUEST', `batch token ${t}: position ${position} is past the ${blocks} KV blocks of ${kvBlockSize} positions its sequence (row ${row}) owns`);
}

/** Refuse a token whose position lies past its sequence's blocks of `kvBlockSize` positions. */
export function checkKvPositions(batch: Pick<StepBatch, 'positions' | 'tokenSeq' | 'kvBlockTable'>, kvBlockSize: number): void {
  batch.positions.forEach((position, t) => {
    const row = batch.tokenSeq[t]!;
    checkKvPosition(t, position, row, batch.kvBlockTable[row]?.length ?? 0, kvBlockSize);
  });
}

const logprob = z.custom<number>((value) => typeof value === 'number', 'expected a number');
/** One token's log-prob and its k most likely alternatives (highest first, ties to the lower id). */
export const tokenLogprobsSchema = z
  .object({
    logprob,
    topIds: z.array(int.min(-1)), // [k] token ids (-1: none, the vocabulary ran out)
    topLogprobs: z.array(logprob), // [k]
  })
  .strict();
export type TokenLogprobs = z.infer<typeof tokenLogprobsSchema>;

/** What a rank answers to a step: rank 0 fills what the batch asked for (per logit row), the other ranks answer `{}`. */
export const stepResultSchema = z
  .object({
    /** [logitRows] sampled token ids */
    tokens: z.array(nonNegInt).optional(),
    /** [logitRows] log p(scoreIds[r]): any float, -Infinity and NaN included (a model output, not a control value) */
    logprobs: z.array(z.custom<number>((value) => typeof value === 'number', 'expected a number')).optional(),
    /** float32 [logitRows, vocab], little-endian */
    fullLogprobs: z.custom<Uint8Array>((value) => value instanceof Uint8Array, 'expected bytes').optional(),
    /** [logitRows] what StepBatch.topLogprobs asked for, null for rows that asked nothing */
    tokenLogprobs: z.array(tokenLogprobsSchema.nullable()).optional(),
  })
  .strict();
export type StepResult = z.infer<typeof stepResultSchema>;
