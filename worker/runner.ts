/**
 * A Step command → the model's forward over the ragged batch → sampled tokens or log-probs. Every rank runs
 * the forward (the collectives need all of them); only rank 0 turns logits into the answer.
 */
import type { StepBatch, StepResult } from './protocol.ts';
import type { Collectives } from './collectives/collectives.ts';
import { forward } from './models/llama.ts';
import type { RankModel } from './models/registry.ts';
import { int32Tensor, type Ops } from './models/ops.ts';
import { WeftError } from '../coordinator/errors.ts';

export async function runStep(ops: Ops, comm: Collectives, rankModel: RankModel, batch: StepBatch): Promise<StepResult> {
  const [kvSlots = 0, , maxContext = 0] = rankModel.model.kvCache[0]?.k.shape ?? [];
  const badSlot = batch.slots.findIndex((s) => s >= kvSlots);
  if (badSlot >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badSlot}: KV slot ${batch.slots[badSlot]} is outside the ${kvSlots} slots`);
  const badPosition = batch.positions.findIndex((p) => p >= maxContext);
  if (badPosition >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badPosition}: position ${batch.positions[badPosition]} is past the context of ${maxContext}`);
  const badToken = batch.tokens.findIndex((t) => t >= rankModel.model.spec.vocabSize);
  if (badToken >= 0) throw new WeftError('WEFT_BAD_REQUEST', `batch token ${badToken}: id ${batch.tokens[badToken]} is outside the vocabulary of ${rankModel.model.spec.vocabSize}`);

  const step = {
    tokenIds: int32Tensor(ops, batch.tokens),
    slots: int32Tensor(ops, batch.slots),
    positions: int32Tensor(ops, batch.positions),
    logitRows: int32Tensor(ops, batch.logitRows),
  };
  const logits = await forward(ops, comm, rankModel.model, rankModel.feedForward, step); // [R, vocab]
  if (comm.rank !== 0) return {};

  const result: StepResult = {};
  if (batch.sample) {
    const { temperature, topK, topP, uniform } = batch.sample;
    result.tokens = Array.from(ops.sample(logits, Float32Array.from(temperature), Int32Array.from(topK), Float32Array.from(topP), Float32Array.from(uniform)));
  }
  if (batch.scoreIds) result.logprobs = Array.from(ops.logprobs(logits, Int32Array.from(batch.scoreIds)));
  if (batch.fullLogprobs) {
    const rows = ops.download(ops.logSoftmax(logits)) as Float32Array;
    result.fullLogprobs = new Uint8Array(rows.buffer, rows.byteOffset, rows.byteLength);
  }
  return result;
}
