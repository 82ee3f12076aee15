/**
 * The KV cache as fixed-size blocks. Every rank holds, per layer, k and v caches of
 * [kvBlocks, nKvHeadsPerRank, kvBlockSize, headDim]; a sequence owns a list of blocks, block j of its list
 * holding its positions [j * kvBlockSize, (j + 1) * kvBlockSize). The coordinator allocates (KvBlockTable),
 * each step batch carries the lists of its sequences (StepBatch.kvBlockTable), the worker's kernels read
 * through them.
 *
 * Today's layout (`kvCacheLayout`) is the special case of one block of `maxContext` positions per sequence.
 * A paged cache (small blocks from a shared pool) is a change of the sizes there and of the policy here
 * (`allocate`, `grow`): the batch, the runner and the kernels stay as they are.
 */
import { WeftError } from './errors.ts';

/**
 * The KV cache's element type. bf16 halves the bytes decode attention reads; it is written rounded to nearest
 * even and read back into f32 arithmetic (the native KV ops), so only the stored values lose precision.
 */
export type KvDtype = 'f32' | 'bf16';
/** What `--kv-dtype` takes: `auto` is bf16 on cuda (where the cache's bytes bound long-context decode) and f32 on cpu (the fp32 reference). */
export type KvDtypeOption = KvDtype | 'auto';

export function resolveKvDtype(option: KvDtypeOption, device: 'cpu' | 'cuda'): KvDtype {
  if (option !== 'auto') return option;
  return device === 'cuda' ? 'bf16' : 'f32';
}

/** Bytes per cache element. */
export function kvDtypeBytes(dtype: KvDtype): number {
  return dtype === 'bf16' ? 2 : 4;
}

/** The sizes both processes derive from the init command: the cache's shape, its element type and how sequences use it. */
export interface KvCacheLayout {
  /** sequences that hold a KV cache at once */
  readonly kvSlots: number;
  /** positions one sequence can hold */
  readonly maxContext: number;
  /** positions per block (B) */
  readonly kvBlockSize: number;
  /** blocks in the cache, the padding block included */
  readonly kvBlocks: number;
  /** the block that padding rows of CUDA graph batches write to, never given to a sequence; null: none */
  readonly paddingBlock: number | null;
  /** the caches' element type */
  readonly kvDtype: KvDtype;
}

/**
 * One block of `maxContext` positions per sequence, `kvSlots` of them; on CUDA one more block at the end for
 * the padding rows of graph batches (decode batches are padded up to a captured graph's size). The element
 * type is the init command's `kvDtype` (`auto` when absent: bf16 on cuda, f32 on cpu).
 */
export function kvCacheLayout(init: { readonly kvSlots: number; readonly maxContext: number; readonly device: 'cpu' | 'cuda'; readonly kvDtype?: KvDtypeOption }): KvCacheLayout {
  const padding = init.device === 'cuda';
  return {
    kvSlots: init.kvSlots,
    maxContext: init.maxContext,
    kvBlockSize: init.maxContext,
    kvBlocks: init.kvSlots + (padding ? 1 : 0),
    paddingBlock: padding ? init.kvSlots : null,
    kvDtype: resolveKvDtype(init.kvDtype ?? 'auto', init.device),
  };
}

/** Blocks of `kvBlockSize` positions that hold `tokens` positions. */
export function blocksFor(tokens: number, kvBlockSize: number): number {
  return Math.ceil(tokens / kvBlockSize);
}

/** The longest block list a sequence can own: the width of a padded block table. */
export function maxBlocksPerSequence(layout: KvCacheLayout): number {
  return blocksFor(layout.maxContext, layout.kvBlockSize);
}

/** A sequence's handle on its blocks, given by `allocate`. */
export type KvSequenceId = number;

/**
 * The allocator: a pool of blocks (every block but the padding block), at most `kvSlots` sequences. Blocks
 * are handed out in the order they came back, so the first sequences get blocks 0, 1, 2...
 */
export class KvBlockTable {
  private readonly freeBlocks: number[];
  private readonly owned = new Map<KvSequenceId, number[]>();
  private nextId: KvSequenceId = 0;

  constructor(readonly layout: KvCacheLayout) {
    const { kvBlocks, kvBlockSize, paddingBlock } = layout;
    if (!Number.isInteger(kvBlockSize) || kvBlockSize < 1) throw new WeftError('WEFT_BAD_REQUEST', `kvBlockSize must be a positive integer, got ${kvBlockSize}`);
    if (paddingBlock !== null && (paddingBlock < 0 || paddingBlock >= kvBlocks))
      throw new WeftError('WEFT_BAD_REQUEST', `padding block ${paddingBlock} is outside the ${kvBlocks} KV blocks`);
    this.freeBlocks = Array.from({ length: kvBlocks }, (_, b) => b).filter((b) => b !== paddingBlock);
  }

  /** Sequences holding blocks now. */
  get sequences(): number {
    return this.owned.size;
  }
  /** Blocks owned by sequences now. */
  get blocksInUse(): number {
    let n = 0;
    for (const blocks of this.owned.values()) n += blocks.length;
    return n;
  }
  get blocksFree(): number {
    return this.freeBlocks.length;
  }

  /** Refuse, at once, a sequence that could never be held (longer than a sequence's context). */
  checkFits(tokens: number): void {
    if (tokens > this.layout.maxContext) throw new WeftError('WEFT_BAD_REQUEST', `a sequence of ${tokens} tokens exceeds the KV cache's context of ${this.layout.maxContext} tokens`);
  }

  /** Whether a new sequence of `tokens` positions fits now (a free sequence and enough free blocks). */
  canAllocate(tokens: number): boolean {
    return tokens <= this.layout.maxContext && this.owned.size < this.layout.kvSlots && blocksFor(tokens, this.layout.kvBlockSize) <= this.freeBlocks.length;
  }

  /** A new sequence with blocks for its first `tokens` positions. Throws WEFT_BUSY when the pool cannot hold it now. */
  allocate(tokens: number): KvSequenceId {
    this.checkFits(tokens);
    if (!this.canAllocate(tokens))
      throw new WeftError('WEFT_BUSY', `the KV cache is full: ${this.owned.size} of ${this.layout.kvSlots} sequences, ${this.freeBlocks.length} free blocks for ${blocksFor(tokens, this.layout.kvBlockSize)} needed`);
    const id = this.nextId++;
    this.owned.set(id, []);
    this.grow(id, tokens);
    return id;
  }

  /**
   * Make the sequence's blocks cover its first `tokens` positions, taking more blocks when needed (never
   * fewer: positions a step overwrites stay in their blocks). Throws WEFT_BUSY when the pool has too few.
   */
  grow(id: KvSequenceId, tokens: number): void {
    const blocks = this.listOf(id);
    this.checkFits(tokens);
    const more = blocksFor(tokens, this.layout.kvBlockSize) - blocks.length;
    if (more <= 0) return;
    if (more > this.freeBlocks.length)
      throw new WeftError('WEFT_BUSY', `the KV cache is full: sequence ${id} needs ${more} more blocks for ${tokens} tokens, ${this.freeBlocks.length} are free`);
    blocks.push(...this.freeBlocks.splice(0, more));
  }

  /** Give the sequence's blocks back to the pool. */
  free(id: KvSequenceId): void {
    this.freeBlocks.push(...this.listOf(id));
    this.owned.delete(id);
  }

  /** The sequence's block list: block j holds its positions [j * kvBlockSize, (j + 1) * kvBlockSize). */
  blocks(id: KvSequenceId): readonly number[] {
    return this.listOf(id);
  }

  private listOf(id: KvSequenceId): number[] {
    const blocks = this.owned.get(id);
    if (!blocks) throw new WeftError('WEFT_BAD_REQUEST', `KV sequence ${id} holds no blocks (never allocated, or freed)`);
    return blocks;
  }
}
