/**
 * Sizing a CUDA rank's paged KV pool from a fraction of its device's memory (--gpu-memory-fraction, vLLM's
 * gpu_memory_utilization): of `fraction × total` bytes, what the device already had in use before this rank
 * allocated anything (other processes, this rank's CUDA context), the rank's weights, its step arena, the state it
 * keeps beside the cache and a reserve are taken off; the pool is the rest, in whole blocks, and never more than
 * `kvSlots` full contexts (all the sequences can use: a small model does not take the whole device). Ranks sharing
 * one device divide the fraction among them. A fraction that leaves less than one sequence of the full context is
 * refused, naming every term.
 */
import { WeftError } from '../core/errors.ts';
import { blocksFor } from '../core/kv-block-table.ts';

/**
 * Device memory that none of the terms counts: the cuBLAS workspace and cast buffers, NCCL's buffers, the
 * staging buffers, the decode graphs' executables and the allocator's slack.
 */
export const KV_POOL_RESERVE_BYTES = 2 ** 30;

export interface KvPoolMemory {
  /** the share of the device weft may use, in (0, 1] */
  readonly fraction: number;
  /** the device's memory, and what was free before this rank allocated (its context already made) */
  readonly totalBytes: number;
  readonly freeBytes: number;
  /** this rank's weights (stored bytes) and its step arena */
  readonly weightBytes: number;
  readonly arenaBytes: number;
  /** state kept beside the cache whatever the pool's size: the prompts' Sage slots (models/sage-state.ts) */
  readonly stateBytes?: number;
  /** bytes one position of the pool takes on this rank: layers × 2 (k, v) × KV heads × head size × element bytes */
  readonly kvBytesPerToken: number;
  readonly kvBlockSize: number;
  readonly maxContext: number;
  /** sequences at once at most: the pool never exceeds this many full contexts */
  readonly kvSlots: number;
}

/** The bytes the fraction leaves for the pool (negative when it leaves nothing). */
export function kvPoolBytes(m: KvPoolMemory): number {
  return Math.floor(m.fraction * m.totalBytes) - (m.totalBytes - m.freeBytes) - m.weightBytes - m.arenaBytes - (m.stateBytes ?? 0) - KV_POOL_RESERVE_BYTES;
}

/** The bytes a pool of one full-context sequence takes: the least a fraction must leave. */
export function minKvPoolBytes(m: Pick<KvPoolMemory, 'kvBytesPerToken' | 'kvBlockSize' | 'maxContext'>): number {
  return blocksFor(m.maxContext, m.kvBlockSize) * m.kvBlockSize * m.kvBytesPerToken;
}

/** The pool's positions (whole blocks) the fraction leaves; refused when that is less than one full context. */
export function kvPoolTokens(m: KvPoolMemory): number {
  const bytes = kvPoolBytes(m);
  const blocks = Math.max(0, Math.floor(bytes / (m.kvBytesPerToken * m.kvBlockSize)));
  const needed = minKvPoolBytes(m);
  if (bytes < needed) {
    const GiB = (n: number): string => `${(n / 2 ** 30).toFixed(2)} GiB`;
    throw new WeftError(
      'WEFT_BAD_CONFIG',
      `--gpu-memory-fraction ${m.fraction} of ${GiB(m.totalBytes)} leaves ${GiB(Math.max(0, bytes))} for the KV cache (in use before loading ${GiB(m.totalBytes - m.freeBytes)}, weights ${GiB(m.weightBytes)}, step arena ${GiB(m.arenaBytes)}${m.stateBytes ? `, Sage prefill state ${GiB(m.stateBytes)}` : ''}, reserve ${GiB(KV_POOL_RESERVE_BYTES)}), less than one sequence of the context of ${m.maxContext} positions (${GiB(needed)}); raise the fraction, lower --max-context, or give --kv-cache-tokens`,
    );
  }
  return Math.min(blocks, m.kvSlots * blocksFor(m.maxContext, m.kvBlockSize)) * m.kvBlockSize;
}
