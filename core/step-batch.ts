/**
 * The step as a value: one forward step over a ragged batch, as the coordinator sends it to every rank, and
 * what rank 0 answers. Plain data, validated on receipt.
 */
import { z } from 'zod';

const int = z.number().int();
const nonNegInt = int.nonnegative();

/** One forward step over a ragged batch: token i of the batch belongs to KV slot `slots[i]` at `positions[i]`. */
export const stepBatchSchema = z
  .object({
    tokens: z.array(nonNegInt).min(1),
    slots: z.array(nonNegInt),
    positions: z.array(nonNegInt),
    /** batch rows whose logits are needed, in output order */
    logitRows: z.array(nonNegInt).min(1),
    /** per logit row: sample a token with these parameters and these uniforms */
    sample: z
      .object({
        temperature: z.array(z.number()),
        topK: z.array(nonNegInt),
        topP: z.array(z.number()),
        uniform: z.array(z.number()),
      })
      .strict()
      .optional(),
    /** per logit row: return log p(scoreIds[r]) */
    scoreIds: z.array(nonNegInt).optional(),
    /** return the whole log-softmax rows [logitRows, vocab] as float32 bytes */
    fullLogprobs: z.boolean().optional(),
  })
  .strict()
  .superRefine((b, ctx) => {
    if (b.slots.length !== b.tokens.length || b.positions.length !== b.tokens.length)
      ctx.addIssue({ code: 'custom', message: `tokens, slots and positions must have equal lengths (${b.tokens.length}, ${b.slots.length}, ${b.positions.length})` });
    if (b.logitRows.some((r) => r >= b.tokens.length)) ctx.addIssue({ code: 'custom', message: 'logitRows index past the batch' });
    const n = b.logitRows.length;
    if (b.sample && [b.sample.temperature, b.sample.topK, b.sample.topP, b.sample.uniform].some((a) => a.length !== n))
      ctx.addIssue({ code: 'custom', message: 'sample arrays must have one entry per logit row' });
    if (b.scoreIds && b.scoreIds.length !== n) ctx.addIssue({ code: 'custom', message: 'scoreIds must have one entry per logit row' });
  });
export type StepBatch = z.infer<typeof stepBatchSchema>;

/** What a rank answers to a step: rank 0 fills what the batch asked for (per logit row), the other ranks answer `{}`. */
export const stepResultSchema = z
  .object({
    /** [logitRows] sampled token ids */
    tokens: z.array(nonNegInt).optional(),
    /** [logitRows] log p(scoreIds[r]): any float, -Infinity and NaN included (a model output, not a control value) */
    logprobs: z.array(z.custom<number>((value) => typeof value === 'number', 'expected a number')).optional(),
    /** float32 [logitRows, vocab], little-endian */
    fullLogprobs: z.custom<Uint8Array>((value) => value instanceof Uint8Array, 'expected bytes').optional(),
  })
  .strict();
export type StepResult = z.infer<typeof stepResultSchema>;
