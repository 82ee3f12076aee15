/**
 * Speculative decoding, the exact rule (Leviathan et al., Chen et al.): the draft proposes k tokens
 * d1..dk, sampled from its distributions q1..qk; the target scores all k+1 positions in one forward,
 * giving p1..p(k+1). Token di is accepted with probability min(1, pi(di) / qi(di)); at the first
 * rejection one token is drawn from the normalised max(0, pi - qi) and the round ends; if all k pass,
 * one more token is drawn from p(k+1). The tokens produced are distributed exactly as the target's own
 * samples. p and q are the distributions the samplers actually use (temperature, top-k, top-p applied);
 * greedy decoding is the case where both are one-hot, and then the output is the target's greedy output.
 */
import type { StepBatch, StepResult } from '../core/worker-protocol.ts';
import type { SequenceState } from './generate.ts';
import { toFloat32 } from '../core/wire.ts';
import type { KvCacheLayout } from '../core/kv-block-table.ts';
import { GREEDY, StepBatchBuilder, sampledWith } from './step-builder.ts';

export interface SamplingShape {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
}

/**
 * The distribution a sampler draws from for one logits row, as weft's samplers define it: greedy is a
 * one-hot at the argmax (lowest index on ties); otherwise softmax(logits / T) restricted to the top-k
 * and then to the shortest prefix (by probability, ties by lower index) reaching top-p, renormalised.
 */
export function samplingDistribution(logits: Float32Array, shape: SamplingShape): Float64Array {
  const out = new Float64Array(logits.length);
  if (shape.temperature <= 0) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
    out[best] = 1;
    return out;
  }
  const order = Array.from(logits.keys()).sort((a, b) => logits[b]! - logits[a]! || a - b);
  const kept = shape.topK > 0 ? order.slice(0, shape.topK) : order;
  const max = logits[kept[0]!]! / shape.temperature;
  const weights = kept.map((i) => Math.exp(logits[i]! / shape.temperature - max));
  const total = weights.reduce((a, b) => a + b, 0);
  let count = kept.length;
  if (shape.topP < 1) {
    let cumulative = 0;
    count = 0;
    while (count < kept.length && (count === 0 || cumulative < shape.topP)) cumulative += weights[count++]! / total;
  }
  const keptTotal = weights.slice(0, count).reduce((a, b) => a + b, 0);
  for (let j = 0; j < count; j++) out[kept[j]!] = weights[j]! / keptTotal;
  return out;
}

/** Inverse CDF in index order: the first index whose cumulative probability exceeds u. */
export function drawFrom(distribution: ArrayLike<number>, u: number): number {
  let total = 0;
  for (let i = 0; i < distribution.length; i++) total += distribution[i]!;
  let cumulative = 0;
  let last = 0;
  for (let i = 0; i < distribution.length; i++) {
    if (distribution[i]! <= 0) continue;
    last = i;
    cumulative += distribution[i]!;
    if (cumulative > u * total) return i;
  }
  return last;
}

export interface RoundOutcome {
  /** draft tokens accepted, in order */
  readonly accepted: number;
  /** the accepted draft tokens followed by the one token the target contributed (correction or bonus) */
  readonly tokens: number[];
}

/**
 * Decide one round. `q[i]` is the draft's distribution for draft token i, `p[i]` the target's at the same
 * position (p has one more row: the position after the last draft token). `uniform()` gives the
 * request's random numbers (two per draft token at most, one for the final draw).
 */
export function acceptDraft(draft: readonly number[], q: readonly ArrayLike<number>[], p: readonly ArrayLike<number>[], uniform: () => number): RoundOutcome {
  const tokens: number[] = [];
  for (let i = 0; i < draft.length; i++) {
    const token = draft[i]!;
    const pi = p[i]!;
    const qi = q[i]!;
    const ratio = qi[token]! > 0 ? pi[token]! / qi[token]! : 0;
    if (uniform() < Math.min(1, ratio)) {
      tokens.push(token);
      continue;
    }
    const residual = Array.from({ length: pi.length }, (_, v) => Math.max(0, pi[v]! - qi[v]!));
    // p == q exactly leaves no residual mass; then the rejection had probability 0 and p itself is right.
    const hasMass = residual.some((r) => r > 0);
    tokens.push(drawFrom(hasMass ? residual : pi, uniform()));
    return { accepted: i, tokens };
  }
  tokens.push(drawFrom(p[draft.length]!, uniform()));
  return { accepted: draft.length, tokens };
}

/** The speedup a per-token acceptance rate `a` predicts for k draft tokens at draft/target cost ratio c. */
export function predictedSpeedup(a: number, k: number, c: number): number {
  const expectedTokens = a >= 1 ? k + 1 : (1 - a ** (k + 1)) / (1 - a);
  return expectedTokens / (k * c + 1);
}

// ---- rounds over a batch of sequences -------------------------------------------------------------

/** What the draft has in its KV cache for one sequence: `pending` tokens still to feed at `position`. */
interface DraftState {
  pending: number[];
  position: number;
}

export interface SpeculationStats {
  rounds: number;
  proposed: number;
  accepted: number;
  /** tokens emitted per target forward, summed over sequences */
  emitted: number;
  draftSeconds: number;
  targetSeconds: number;
}

export interface RoundSequence {
  readonly seq: SequenceState;
  /**
   * the sequence's KV blocks, covering its positions up to `seq.position + seq.input.length + k` (within its
   * context); the draft's cache has the target's layout, so one block list serves both
   */
  readonly blocks: readonly number[];
}

/**
 * Runs speculative rounds for a batch of decoding sequences on two worker groups: k draft steps (each one
 * row per sequence), then one target step scoring k + 1 positions per sequence. Greedy sequences ask the
 * target for its argmax at each position; sampled ones ask both models for their full log-prob rows, from
 * which the sampling distributions are rebuilt here for the acceptance rule. Rejected entries of either KV
 * cache need no undo: the next round writes over them, and attention reads only positions it wrote.
 */
export class SpeculativeExecutor {
  private drafts = new WeakMap<SequenceState, DraftState>();
  readonly stats: SpeculationStats = { rounds: 0, proposed: 0, accepted: 0, emitted: 0, draftSeconds: 0, targetSeconds: 0 };
  /** Set while the draft group is down: rounds go on with the target alone (k = 0), so no request fails for it. */
  private draftFault: Error | null = null;

  constructor(
    /** draft tokens proposed per round at most */
    readonly k: number,
    private readonly kv: Pick<KvCacheLayout, 'maxContext' | 'kvBlockSize'>,
    private readonly draftStep: (batch: StepBatch) => Promise<StepResult>,
    private readonly targetStep: (batch: StepBatch) => Promise<StepResult>,
  ) {}

  /** One round; returns, per sequence, the tokens it produced (at least one each). */
  async round(rows: readonly RoundSequence[]): Promise<number[][]> {
    const drafts = rows.map(({ seq }) => this.draftState(seq));
    // Every sequence drafts the same k this round, cut so the target's k + 1 positions fit the context.
    const room = Math.min(...rows.map(({ seq }) => this.kv.maxContext - seq.position - seq.input.length));
    let k = this.draftFault ? 0 : Math.max(0, Math.min(this.k, room));
    const greedy = rows.map(({ seq }) => seq.params.temperature <= 0);
    const proposals: number[][] = rows.map(() => []);
    const q: Float64Array[][] = rows.map(() => []);

    const draftStarted = performance.now();
    try {
      await this.propose(rows, drafts, greedy, k, proposals, q);
    } catch (err) {
      // A dead draft only costs speed: this round and the ones after it decode with the target alone.
      this.disableDraft(err as Error);
      k = 0;
      proposals.forEach((p) => (p.length = 0));
      q.forEach((rowQ) => (rowQ.length = 0));
    }
    this.stats.draftSeconds += (performance.now() - draftStarted) / 1000;

    // The target scores its pending token(s) and the k proposals; logits at the last pending token and at
    // each proposal give p1..p(k+1).
    const targetStarted = performance.now();
    const builder = new StepBatchBuilder(this.kv.kvBlockSize);
    const firstRow: number[] = [];
    rows.forEach(({ seq, blocks }, r) => {
      const input = [...seq.input, ...proposals[r]!];
      const start = builder.append(blocks, input, seq.position, seq.params.attention); // SparQ: a selection per verified token
      firstRow.push(builder.logitRowCount);
      // greedy rows: the target's argmax; sampled rows use the log-probs
      for (let i = seq.input.length - 1; i < input.length; i++) builder.logits(start + i, { sample: GREEDY });
    });
    const anySampled = greedy.some((g) => !g);
    const result = await this.targetStep(builder.build({ fullLogprobs: anySampled }));
    const targetRows = anySampled ? splitRows(result.fullLogprobs!, builder.logitRowCount) : null;
    this.stats.targetSeconds += (performance.now() - targetStarted) / 1000;

    const produced = rows.map(({ seq }, r) => {
      const mine = proposals[r]!;
      let outcome: RoundOutcome;
      if (greedy[r]) {
        const argmax = result.tokens!.slice(firstRow[r]!, firstRow[r]! + k + 1);
        let a = 0;
        while (a < k && mine[a] === argmax[a]) a++;
        outcome = { accepted: a, tokens: [...mine.slice(0, a), argmax[a]!] };
      } else {
        const p = Array.from({ length: k + 1 }, (_, i) => samplingDistribution(targetRows![firstRow[r]! + i]!, seq.params));
        outcome = acceptDraft(mine, q[r]!, p, () => seq.nextUniform());
      }
      this.advanceDraft(drafts[r]!, outcome, mine);
      this.stats.proposed += k;
      this.stats.accepted += outcome.accepted;
      this.stats.emitted += outcome.tokens.length;
      return outcome.tokens;
    });
    this.stats.rounds++;
    return produced;
  }

  /** k draft steps, one row per sequence: proposals and, for sampled rows, the draft's distributions. */
  private async propose(
    rows: readonly RoundSequence[],
    drafts: DraftState[],
    greedy: boolean[],
    k: number,
    proposals: number[][],
    q: Float64Array[][],
  ): Promise<void> {
    for (let j = 0; j < k; j++) {
      const builder = new StepBatchBuilder(this.kv.kvBlockSize);
      rows.forEach(({ seq, blocks }, r) => {
        const input = j === 0 ? drafts[r]!.pending : [proposals[r]![j - 1]!];
        const position = j === 0 ? drafts[r]!.position : drafts[r]!.position + drafts[r]!.pending.length + j - 1;
        builder.appendSampled(blocks, input, position, sampledWith(seq.params, seq.nextUniform()));
      });
      const anySampled = greedy.some((g) => !g);
      const result = await this.draftStep(builder.build({ fullLogprobs: anySampled }));
      const rowsLogprobs = anySampled ? splitRows(result.fullLogprobs!, rows.length) : null;
      rows.forEach(({ seq }, r) => {
        proposals[r]!.push(result.tokens![r]!);
        if (rowsLogprobs) q[r]!.push(samplingDistribution(rowsLogprobs[r]!, seq.params));
      });
    }
  }

  /** Stop drafting after a draft-group fault (logged once); requests continue on the target alone. */
  disableDraft(err: Error): void {
    if (this.draftFault) return;
    this.draftFault = err;
    process.stderr.write(`weft: speculative decoding is off until the draft group is back, the draft failed: ${err.message}\n`);
  }

  /** The draft group is back with an empty KV cache: propose again, every sequence's draft fed from its start. */
  enableDraft(): void {
    this.drafts = new WeakMap();
    this.draftFault = null;
  }

  /** The draft-group fault that turned speculation off, while it is off. */
  get draftError(): Error | null {
    return this.draftFault;
  }

  /** A sequence new to speculation: the draft has seen nothing of it yet. */
  private draftState(seq: SequenceState): DraftState {
    let state = this.drafts.get(seq);
    if (!state) {
      state = { pending: [...seq.promptIds, ...seq.generated], position: 0 };
      this.drafts.set(seq, state);
    }
    return state;
  }

  /**
   * The draft processed its pending tokens and proposals 1..k-1 (it sampled the k-th without feeding it).
   * Keep what was accepted; the next round feeds what it has not seen.
   */
  private advanceDraft(state: DraftState, outcome: RoundOutcome, proposals: number[]): void {
    const k = proposals.length;
    const last = outcome.tokens[outcome.tokens.length - 1]!;
    if (k === 0) {
      state.pending = [...state.pending, last];
      return;
    }
    state.position += state.pending.length + Math.min(outcome.accepted, k - 1);
    state.pending = outcome.accepted === k ? [proposals[k - 1]!, last] : [last];
  }

  /** Forget a finished sequence (its draft state goes with it). */
  release(seq: SequenceState): void {
    this.drafts.delete(seq);
  }
}

function splitRows(bytes: Uint8Array, rows: number): Float32Array[] {
  const flat = toFloat32(bytes);
  const vocab = flat.length / rows;
  return Array.from({ length: rows }, (_, r) => flat.subarray(r * vocab, (r + 1) * vocab));
}
