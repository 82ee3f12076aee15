/**
 * Sample groups: the sequences of one prompt (OpenAI `n`, each choice a sequence of its own) prefill it once.
 * The first one admitted computes the prompt; the others, admitted once a step that writes its prompt was sent,
 * share its KV blocks (KvBlockTable.fork: whole blocks, reference-counted) and own only what follows. Any running
 * generation with the same prompt tokens serves, so requests that repeat a prompt share it too: the keys and
 * values of a position depend on the tokens up to it and nothing else.
 *
 * The prompt's last, partly filled block is recomputed, not copied: each sample feeds the prompt's tokens past
 * the shared whole blocks (fewer than kvBlockSize, plus the last one, whose logits it samples its first token
 * from) in its first step. That needs no device copy op and no new step field, costs under one block of
 * positions per sample, and the sample's first token comes from logits of its own row, drawn with its own
 * uniform, as it would be alone. The shared region is then whole blocks, what bifurcated decode attention reads
 * once per group (worker/prefix-groups.ts finds it in each step's block table).
 *
 * Preemption and cancellation need nothing more: a member gives back its references (a shared block is freed
 * with its last sequence); a preempted member, requeued at position 0, forks again from a running member if one
 * is left, else prefills its prompt itself.
 */
import { createHash } from 'node:crypto';
import type { KvBlockTable, KvSequenceId } from '../core/kv-block-table.ts';
import type { SequenceState } from './generate.ts';

/** A generation as the scheduler holds it: its sequence and its KV blocks while it runs. */
export interface SampleMember {
  readonly seq: SequenceState;
  readonly kv: KvSequenceId | null;
  readonly finished: boolean;
}

/** What admission does with a queued generation: wait for a member's prompt to go out, or fork one's blocks. */
export type SamplePlan = 'wait' | { readonly from: KvSequenceId; readonly shared: number };

export class SampleGroups {
  /**
   * positions of each sequence written by steps already sent (its prompt going out), beyond seq.position, and
   * the blocks they went to (a preempted sequence's count ends with the blocks it gave back)
   */
  private readonly written = new WeakMap<SequenceState, { readonly kv: KvSequenceId; readonly upTo: number }>();
  private readonly keys = new WeakMap<readonly number[], string>();

  constructor(private readonly kv: KvBlockTable) {}

  /** A step was sent that writes the sequence's positions before `upTo` into its blocks `kv`. */
  wrote(seq: SequenceState, kv: KvSequenceId, upTo: number): void {
    const before = this.written.get(seq);
    this.written.set(seq, { kv, upTo: before?.kv === kv ? Math.max(upTo, before.upTo) : upTo });
  }

  /**
   * For a queued generation at position 0: the member of its group to fork (one whose shareable prompt blocks
   * a sent step writes), 'wait' when the only members still have their prompt to send (their next step does:
   * forking after it shares the whole prompt), or null (no member: allocate and prefill as usual).
   */
  plan(seq: SequenceState, running: Iterable<SampleMember | { readonly kind: string }>): SamplePlan | null {
    const B = this.kv.layout.kvBlockSize;
    // whole blocks short of the last prompt token, whose logits the sample needs from a row of its own
    const shareable = Math.floor((seq.promptIds.length - 1) / B) * B;
    if (seq.position !== 0 || shareable === 0) return null;
    const key = this.keyOf(seq.promptIds);
    let wait = false;
    for (const other of running) {
      if (!('seq' in other) || other.seq === seq || other.kv === null || other.finished) continue;
      if (other.seq.promptIds.length !== seq.promptIds.length || this.keyOf(other.seq.promptIds) !== key) continue;
      const sent = this.written.get(other.seq);
      const written = Math.max(other.seq.position, sent?.kv === other.kv ? sent.upTo : 0);
      if (written >= shareable) return { from: other.kv, shared: shareable };
      wait = true;
    }
    return wait ? 'wait' : null;
  }

  /** The sequence forked from `plan`'s member: its blocks share the prompt's, its input is what follows them. */
  fork(seq: SequenceState, plan: { readonly from: KvSequenceId; readonly shared: number }): KvSequenceId {
    const { id, shared } = this.kv.fork(plan.from, plan.shared);
    seq.input = seq.input.slice(shared - seq.position);
    seq.position = shared;
    return id;
  }

  private keyOf(promptIds: readonly number[]): string {
    let key = this.keys.get(promptIds);
    if (key === undefined) {
      key = createHash('sha256').update(Int32Array.from(promptIds)).digest('base64');
      this.keys.set(promptIds, key);
    }
    return key;
  }
}
