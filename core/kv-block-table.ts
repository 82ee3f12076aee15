/**
 * The KV cache as fixed-size blocks. Every rank holds, per layer, k and v caches of
 * [kvBlocks, nKvHeadsPerRank, kvBlockSize, headDim]; a sequence owns a list of blocks, block j of its list
 * holding its positions [j * kvBlockSize, (j + 1) * kvBlockSize). The coordinator allocates (KvBlockTable),
 * each step batch carries the lists of its sequences (StepBatch.kvBlockTable), the worker's kernels read
 * through them.
 *
 * A paged layout (`kvCacheLayout` with a `kvBlockSize`) is small blocks from one pool of `kvCacheTokens`
 * positions shared by every sequence; without one it is one block of `maxContext` positions per sequence. The
 * batch, the runner and the kernels read both alike; what a full pool means (preemption) is the scheduler's.
 */
import { createHash } from 'node:crypto';
import { WeftError } from './errors.ts';

/**
 * The KV cache's element type. bf16 halves the bytes decode attention reads; it is written rounded to nearest
 * even and read back into f32 arithmetic (the native KV ops), so only the stored values lose precision. fp8
 * (e4m3) and int8 halve them again: 1-byte codes with one f32 scale per (position, kv head) row, quantized as
 * the row is written and dequantized as it is read (native/src/kv-quant.h).
 */
export type KvDtype = 'f32' | 'bf16' | 'fp8' | 'int8';
export const KV_DTYPES: readonly KvDtype[] = ['f32', 'bf16', 'fp8', 'int8'];
/** What `--kv-dtype` takes: `auto` is bf16 on cuda (where the cache's bytes bound long-context decode) and f32 on cpu (the fp32 reference). */
export type KvDtypeOption = KvDtype | 'auto';

export function resolveKvDtype(option: KvDtypeOption, device: 'cpu' | 'cuda'): KvDtype {
  if (option !== 'auto') return option;
  return device === 'cuda' ? 'bf16' : 'f32';
}

/** Bytes of one f32 scale per cache row (position, kv head) of the 1-byte dtypes. */
const KV_SCALE_BYTES = 4;

/**
 * Bytes per cache element; for fp8 and int8 with `headDim` given, the row's scale spread over its `headDim`
 * elements (1 + 4 / headDim), so that elements x bytes is what the cache takes. Without `headDim`, the code's byte alone.
 */
export function kvDtypeBytes(dtype: KvDtype, headDim?: number): number {
  if (dtype === 'fp8' || dtype === 'int8') return 1 + (headDim === undefined ? 0 : KV_SCALE_BYTES / headDim);
  return dtype === 'bf16' ? 2 : 4;
}

/** The native engine's dtype of a cache (what `zeros` takes: a 1-byte dtype makes the cache with its scales). */
export function kvNativeDtype(dtype: KvDtype): 'f32' | 'bf16' | 'fp8' | 'i8' {
  return dtype === 'int8' ? 'i8' : dtype;
}

/** The sizes both processes derive from the init command: the cache's shape, its element type and how sequences use it. */
export interface KvCacheLayout {
  /** sequences that hold KV blocks at once at most (the pool, not this, is what costs memory) */
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
 * The pool of a paged cache when none is given: the positions of this many full-context sequences, the memory
 * the cache took when it was one block per sequence and `--kv-slots` defaulted to 4.
 */
export const DEFAULT_KV_CACHE_SEQUENCES = 4;

/** The sizes of a KV cache, as the init command gives them. */
export interface KvCacheSizes {
  readonly kvSlots: number;
  readonly maxContext: number;
  readonly device: 'cpu' | 'cuda';
  readonly kvDtype?: KvDtypeOption;
  /** positions per block; absent: one block of `maxContext` positions per sequence (kvSlots of them) */
  readonly kvBlockSize?: number;
  /** positions of the paged pool (rounded down to whole blocks); absent: kvSlots × maxContext */
  readonly kvCacheTokens?: number;
}

/**
 * Paged (`kvBlockSize` given): blocks of that many positions, `kvCacheTokens / kvBlockSize` of them shared by
 * every sequence; a pool that cannot hold one full-context sequence is refused. Else one block of `maxContext`
 * positions per sequence, `kvSlots` of them. On CUDA one more block at the end for the padding rows of graph
 * batches (decode batches are padded up to a captured graph's size). The element type is `kvDtype` (`auto`
 * when absent: bf16 on cuda, f32 on cpu).
 */
export function kvCacheLayout(init: KvCacheSizes): KvCacheLayout {
  const { kvSlots, maxContext, kvBlockSize } = init;
  const padding = init.device === 'cuda';
  let blockSize = maxContext;
  let poolBlocks = kvSlots;
  if (kvBlockSize !== undefined) {
    if (!Number.isInteger(kvBlockSize) || kvBlockSize < 1) throw new WeftError('WEFT_BAD_CONFIG', `the KV block size must be a positive integer, got ${kvBlockSize}`);
    const poolTokens = init.kvCacheTokens ?? kvSlots * maxContext;
    blockSize = kvBlockSize;
    poolBlocks = Math.floor(poolTokens / kvBlockSize);
    const needed = blocksFor(maxContext, kvBlockSize);
    if (poolBlocks < needed)
      throw new WeftError(
        'WEFT_BAD_CONFIG',
        `a KV cache of ${poolTokens} positions (${poolBlocks} blocks of ${kvBlockSize}) cannot hold one sequence of the context of ${maxContext} positions (${needed} blocks); give --kv-cache-tokens ${needed * kvBlockSize} or more, or a smaller --max-context`,
      );
  }
  return {
    kvSlots,
    maxContext,
    kvBlockSize: blockSize,
    kvBlocks: poolBlocks + (padding ? 1 : 0),
    paddingBlock: padding ? poolBlocks : null,
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
 *
 * Prefix caching: a full block written by a step already sent can be registered under the hash of its tokens
 * and of every token before it (a hash chain, `registerFull`), since its K/V depend on nothing else. A new
 * sequence (`allocatePrefix`) shares the registered blocks its first tokens match instead of computing them.
 * Blocks count their sequences; one no sequence holds is free, but keeps its registration (and can be shared
 * again) until it is handed out afresh. Steps run in the order they are sent, so a block registered by a sent
 * step holds its K/V before any later step reads it; shared blocks are only read (a sequence writes from its
 * first unmatched position on, the start of a block).
 */
export class KvBlockTable {
  /** blocks no sequence holds, oldest first (a Set keeps insertion order and deletes in O(1)) */
  private readonly freeBlocks: Set<number>;
  private readonly poolBlocks: number;
  /** sequences holding each block */
  private readonly refs: Int32Array;
  private readonly owned = new Map<KvSequenceId, { blocks: number[]; hashes: string[] }>();
  /** registered full blocks: the hash chain up to and including a block's tokens → the block, and back */
  private readonly cached = new Map<string, number>();
  private readonly hashOf = new Map<number, string>();
  private nextId: KvSequenceId = 0;

  constructor(readonly layout: KvCacheLayout) {
    const { kvBlocks, kvBlockSize, paddingBlock } = layout;
    if (!Number.isInteger(kvBlockSize) || kvBlockSize < 1) throw new WeftError('WEFT_BAD_REQUEST', `kvBlockSize must be a positive integer, got ${kvBlockSize}`);
    if (paddingBlock !== null && (paddingBlock < 0 || paddingBlock >= kvBlocks))
      throw new WeftError('WEFT_BAD_REQUEST', `padding block ${paddingBlock} is outside the ${kvBlocks} KV blocks`);
    this.freeBlocks = new Set(Array.from({ length: kvBlocks }, (_, b) => b).filter((b) => b !== paddingBlock));
    this.poolBlocks = this.freeBlocks.size;
    this.refs = new Int32Array(kvBlocks);
  }

  /** Sequences holding blocks now. */
  get sequences(): number {
    return this.owned.size;
  }
  /** Blocks held by sequences now (a shared block once). */
  get blocksInUse(): number {
    return this.poolBlocks - this.freeBlocks.size;
  }
  get blocksFree(): number {
    return this.freeBlocks.size;
  }

  /** Refuse, at once, a sequence that could never be held (longer than a sequence's context). */
  checkFits(tokens: number): void {
    if (tokens > this.layout.maxContext) throw new WeftError('WEFT_BAD_REQUEST', `a sequence of ${tokens} tokens exceeds the KV cache's context of ${this.layout.maxContext} tokens`);
  }

  /** Whether the sequence's blocks can cover its first `tokens` positions now (growing by what is free). */
  canGrow(id: KvSequenceId, tokens: number): boolean {
    return tokens <= this.layout.maxContext && blocksFor(tokens, this.layout.kvBlockSize) - this.listOf(id).length <= this.freeBlocks.size;
  }

  /** Whether a new sequence of `tokens` positions fits now (a free sequence, and enough free blocks with `reserve` left over). */
  canAllocate(tokens: number, reserve = 0): boolean {
    return tokens <= this.layout.maxContext && this.owned.size < this.layout.kvSlots && blocksFor(tokens, this.layout.kvBlockSize) + reserve <= this.freeBlocks.size;
  }

  /** A new sequence with blocks for its first `tokens` positions. Throws WEFT_BUSY when the pool cannot hold it now. */
  allocate(tokens: number): KvSequenceId {
    this.checkFits(tokens);
    if (!this.canAllocate(tokens))
      throw new WeftError('WEFT_BUSY', `the KV cache is full: ${this.owned.size} of ${this.layout.kvSlots} sequences, ${this.freeBlocks.size} free blocks for ${blocksFor(tokens, this.layout.kvBlockSize)} needed`);
    const id = this.nextId++;
    this.owned.set(id, { blocks: [], hashes: [] });
    this.grow(id, tokens);
    return id;
  }

  /**
   * A new sequence with blocks for `ids`, sharing the registered blocks that hold its first tokens (whole
   * blocks, short of its last token: a step must compute that one's logits). `cached`: the positions shared.
   */
  allocatePrefix(ids: readonly number[]): { id: KvSequenceId; cached: number } {
    const id = this.allocate(0);
    const entry = this.owned.get(id)!;
    const B = this.layout.kvBlockSize;
    for (let j = 0; j < Math.floor((ids.length - 1) / B); j++) {
      const hash = chainHash(entry.hashes[j - 1], ids.slice(j * B, (j + 1) * B));
      const block = this.cached.get(hash);
      if (block === undefined) break;
      this.freeBlocks.delete(block); // when no sequence held it
      this.refs[block] = this.refs[block]! + 1;
      entry.blocks.push(block);
      entry.hashes.push(hash);
    }
    const cached = entry.blocks.length * B;
    this.grow(id, ids.length);
    return { id, cached };
  }

  /**
   * A new sequence sharing `parent`'s blocks that hold its first `tokens` positions, whole blocks only: each
   * shared block counts one more sequence, and the new one writes from the first position after them, in blocks
   * of its own (grow). How the n samples of one prompt share its KV (coordinator/sample-group.ts); the parent's
   * last, partly filled block is not shared, its positions are recomputed by the new sequence. `shared`: the
   * positions shared (a multiple of kvBlockSize). Throws WEFT_BUSY when no sequence is free.
   */
  fork(parent: KvSequenceId, tokens: number): { id: KvSequenceId; shared: number } {
    const from = this.listOf(parent);
    const count = Math.min(from.length, Math.floor(Math.max(0, tokens) / this.layout.kvBlockSize));
    const id = this.allocate(0);
    const blocks = this.listOf(id);
    for (const block of from.slice(0, count)) {
      this.refs[block] = this.refs[block]! + 1;
      blocks.push(block);
    }
    return { id, shared: count * this.layout.kvBlockSize };
  }

  /**
   * Register the sequence's full blocks among its first `written` positions (written by steps already sent),
   * `ids()` being its tokens from position 0 (called only when a block is new to register).
   */
  registerFull(id: KvSequenceId, written: number, ids: () => readonly number[]): void {
    const { blocks, hashes } = this.entryOf(id);
    const full = Math.min(blocks.length, Math.floor(written / this.layout.kvBlockSize));
    if (full <= hashes.length) return;
    const tokens = ids();
    const B = this.layout.kvBlockSize;
    for (let j = hashes.length; j < full; j++) {
      const hash = chainHash(hashes[j - 1], tokens.slice(j * B, (j + 1) * B));
      hashes.push(hash);
      if (this.cached.has(hash) || this.hashOf.has(blocks[j]!)) continue; // the same tokens in another block already
      this.cached.set(hash, blocks[j]!);
      this.hashOf.set(blocks[j]!, hash);
    }
  }

  /** Forget every registration (the workers' caches were lost: a re-formed group starts empty). */
  forgetCached(): void {
    this.cached.clear();
    this.hashOf.clear();
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
    if (more > this.freeBlocks.size)
      throw new WeftError('WEFT_BUSY', `the KV cache is full: sequence ${id} needs ${more} more blocks for ${tokens} tokens, ${this.freeBlocks.size} are free`);
    const taken: number[] = [];
    for (const block of this.freeBlocks) if (taken.push(block) === more) break;
    for (const block of taken) {
      this.freeBlocks.delete(block);
      this.refs[block] = 1;
      // handed out afresh: whatever it held is about to be overwritten
      const hash = this.hashOf.get(block);
      if (hash !== undefined) {
        this.cached.delete(hash);
        this.hashOf.delete(block);
      }
      blocks.push(block);
    }
  }

  /** Give the sequence's blocks back to the pool. */
  free(id: KvSequenceId): void {
    for (const block of this.listOf(id)) {
      this.refs[block] = this.refs[block]! - 1;
      if (this.refs[block] === 0) this.freeBlocks.add(block);
    }
    this.owned.delete(id);
  }

  /** The sequence's block list: block j holds its positions [j * kvBlockSize, (j + 1) * kvBlockSize). */
  blocks(id: KvSequenceId): readonly number[] {
    return this.listOf(id);
  }

  private listOf(id: KvSequenceId): number[] {
    return this.entryOf(id).blocks;
  }

  private entryOf(id: KvSequenceId): { blocks: number[]; hashes: string[] } {
    const entry = this.owned.get(id);
    if (!entry) throw new WeftError('WEFT_BAD_REQUEST', `KV sequence ${id} holds no blocks (never allocated, or freed)`);
    return entry;
  }
}

/** The hash chain of a full block: its tokens and the hash of the block before it (none for the first). */
function chainHash(parent: string | undefined, tokens: readonly number[]): string {
  return createHash('sha256').update(parent ?? '').update(Int32Array.from(tokens)).digest('base64');
}
