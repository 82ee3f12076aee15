/**
 * What a prompt keeps across its steps under quantized prefill attention (--prefill-attention int8|fp8): per layer,
 * slots of its quantized K, V operand and K mean (native/src/sage-state.h), so that a prompt run in 1024-token
 * steps quantizes each 64-position block of its cache once rather than at every step. Without them a step
 * re-quantizes its sequences' whole prefix: 59 ms of kernel time in Llama-2-7B's 16384-token prompt on H100
 * (bench/RESULTS.md, session 41); keeping them took its TTFT from 608 to 568 ms (session 42).
 *
 * The directory here decides, on the host, which table row of a step uses which slot. A slot is matched to a row by
 * the KV blocks it recorded (a sequence owns its blocks; a prompt that shares cached leading blocks shares their
 * contents too), and every step's writes are watched: a write below what a slot recorded, in a block it recorded,
 * takes the vouched positions down to it (a preempted prompt recomputed, a block freed and given to another
 * sequence). The device keeps its own count of what it quantized, and a row reuses only what both vouch for.
 */
import { WeftError } from '../../core/errors.ts';
import type { ModelSpec } from '../../core/model-spec.ts';
import { DEFAULT_PREFILL_ATTENTION_SLOTS } from '../../core/prefill-attention.ts';
import type { ShardPlan } from '../../core/shard-plan.ts';
import { leadingDecodeRows, type Ops, type StepIndex, type Tensor } from './ops.ts';

/** positions per quantized block (native kSageBlock); a row with fewer tokens in a step (a decode row) takes no slot */
export const SAGE_BLOCK = 64;
/** the shortest step sageAttention quantizes (native Backend::kSageMinTokens); shorter ones attend exactly */
export const SAGE_MIN_TOKENS = 65;

/** Bytes of one slot's 64-position record (native sage_state_block_bytes). */
export function sageBlockBytes(nKvHeads: number, headDim: number, pv: 'f16' | 'fp8'): number {
  return Math.ceil((nKvHeads * (SAGE_BLOCK * headDim * (pv === 'fp8' ? 2 : 3) + 8)) / 256) * 256;
}

/** Bytes of a rank's state: every layer's slots, sized for the context. */
export function sageStateBytes(spec: Pick<ModelSpec, 'nLayers' | 'headDim'>, nKvHeadsPerRank: number, maxContext: number, pv: 'f16' | 'fp8', slots = DEFAULT_PREFILL_ATTENTION_SLOTS): number {
  const blocks = Math.ceil(maxContext / SAGE_BLOCK);
  return spec.nLayers * slots * (8 + nKvHeadsPerRank * spec.headDim * 4 + blocks * sageBlockBytes(nKvHeadsPerRank, spec.headDim, pv));
}

/** One layer's slots, as sageAttention takes them beside the step's use of them. */
export interface SageLayerState {
  readonly header: Tensor; // [slots, 2] i32
  readonly means: Tensor; // [slots, nKv, hd] f32
  readonly blocks: Tensor; // [slots, nbMax, blockBytes / 4] i32: bytes, in words
}

export interface SageState {
  readonly layers: readonly SageLayerState[];
  readonly directory: SageDirectory;
}

/** sageAttention's state argument for one layer of a step: none where the model keeps no state or the step uses no slot. */
export function sageStateOf(state: SageState | undefined, layerIndex: number, step: StepIndex): readonly [Tensor, Tensor, Tensor, Tensor] | undefined {
  if (!state || !step.sageSlots) return undefined;
  const { header, means, blocks } = state.layers[layerIndex]!;
  return [header, means, blocks, step.sageSlots];
}

export function allocateSageState(ops: Ops, spec: ModelSpec, plan: ShardPlan, kv: { maxContext: number; kvBlockSize: number }, pv: 'f16' | 'fp8', slots = DEFAULT_PREFILL_ATTENTION_SLOTS): SageState {
  if (!Number.isInteger(slots) || slots < 1) throw new WeftError('WEFT_BAD_CONFIG', `Sage state slots must be a positive integer, got ${slots}`);
  const nKv = plan.nKvHeadsPerRank;
  const nbMax = Math.ceil(kv.maxContext / SAGE_BLOCK);
  const layers = Array.from({ length: spec.nLayers }, () => ({
    header: ops.zeros('i32', [slots, 2]),
    means: ops.zeros('f32', [slots, nKv, spec.headDim]),
    blocks: ops.zeros('i32', [slots, nbMax, sageBlockBytes(nKv, spec.headDim, pv) / 4]),
  }));
  return { layers, directory: new SageDirectory(slots, kv.kvBlockSize) };
}

/** The host-side rows of a step the directory reads. */
export interface SageStepRows {
  readonly positions: readonly number[];
  readonly tokenSeq: readonly number[];
  readonly kvBlockTable: readonly (readonly number[])[];
}

interface SlotRecord {
  /** the KV blocks of the sequence the slot holds, as its last step listed them */
  blocks: number[];
  /** its leading positions no watched write has touched since (0: nothing to reuse) */
  vouched: number;
  /** the directory's step count when a row last took the slot */
  used: number;
}

export class SageDirectory {
  private readonly records: SlotRecord[];
  private steps = 0;

  constructor(
    readonly slots: number,
    private readonly kvBlockSize: number,
  ) {
    this.records = Array.from({ length: slots }, () => ({ blocks: [], vouched: 0, used: -1 }));
  }

  /**
   * Whether sageAttention quantizes this step (the native rule: at least SAGE_MIN_TOKENS tokens after its leading
   * decode rows, which attend exactly, and not a decode batch).
   */
  static quantizes(step: SageStepRows): boolean {
    const T = step.tokenSeq.length;
    return T - leadingDecodeRows(step.tokenSeq) >= SAGE_MIN_TOKENS && T !== step.kvBlockTable.length;
  }

  /**
   * Watch a step's writes (every step, whichever attention it takes): a token written at a position below what a
   * slot vouches for, in a block that slot recorded at that position, takes the slot's vouched positions down to it.
   */
  observe(step: SageStepRows): void {
    const B = this.kvBlockSize;
    step.positions.forEach((position, t) => {
      const j = Math.floor(position / B);
      const block = step.kvBlockTable[step.tokenSeq[t]!]![j];
      for (const record of this.records) if (position < record.vouched && record.blocks[j] === block) record.vouched = position;
    });
  }

  /**
   * The step's use of the slots, [S, 3] per table row: its slot (-1: none), 1 where the slot starts afresh, and the
   * positions vouched for. Only a step sageAttention quantizes gives slots, only to rows of at least SAGE_BLOCK
   * tokens (prompt chunks); null when no row takes one. Watches the step's writes first (observe).
   */
  assign(step: SageStepRows): Int32Array | null {
    this.observe(step);
    if (!SageDirectory.quantizes(step)) return null;
    const S = step.kvBlockTable.length;
    const count = new Array<number>(S).fill(0);
    const start = new Array<number>(S).fill(Infinity);
    const end = new Array<number>(S).fill(0);
    step.tokenSeq.forEach((s, t) => {
      count[s]!++;
      start[s] = Math.min(start[s]!, step.positions[t]!);
      end[s] = Math.max(end[s]!, step.positions[t]! + 1);
    });
    const out = new Int32Array(S * 3);
    const taken = new Set<number>();
    this.steps++;
    for (let s = 0; s < S; s++) {
      out[3 * s] = -1;
      if (count[s]! < SAGE_BLOCK) continue;
      const blocks = step.kvBlockTable[s]!;
      // the record whose blocks agree with this row's over the most vouched positions
      let best = -1;
      let bestVouched = 0;
      this.records.forEach((record, m) => {
        if (taken.has(m)) return;
        const v = Math.min(record.vouched, this.agreeing(record.blocks, blocks));
        if (v > bestVouched) [best, bestVouched] = [m, v];
      });
      const fresh = best < 0;
      if (fresh) best = this.victim(taken);
      if (best < 0) continue; // every slot is taken by a row of this step
      taken.add(best);
      out[3 * s] = best;
      out[3 * s + 1] = fresh ? 1 : 0;
      out[3 * s + 2] = fresh ? 0 : bestVouched;
      const record = this.records[best]!;
      record.blocks = blocks.slice(0, Math.ceil(end[s]! / this.kvBlockSize));
      record.vouched = end[s]!;
      record.used = this.steps;
    }
    return taken.size ? out : null;
  }

  /** Positions covered by the leading blocks the two lists share. */
  private agreeing(recorded: readonly number[], blocks: readonly number[]): number {
    let j = 0;
    while (j < recorded.length && j < blocks.length && recorded[j] === blocks[j]) j++;
    return j * this.kvBlockSize;
  }

  /** The slot a new sequence takes: the one used longest ago among those no row of this step took. */
  private victim(taken: ReadonlySet<number>): number {
    let best = -1;
    this.records.forEach((record, m) => {
      if (!taken.has(m) && (best < 0 || record.used < this.records[best]!.used)) best = m;
    });
    return best;
  }
}
