/**
 * Sizing a CUDA rank's paged KV pool from a fraction of its device's memory (--gpu-memory-fraction, vLLM's
 * gpu_memory_utilization): of `fraction × total` bytes, what the device already had in use before this rank
 * allocated anything (other processes, this rank's CUDA context), the rank's weights, its step arena, the state it
 * keeps beside the cache and a reserve are taken off; the pool is the rest, in whole blocks, and never more than
 * `kvSlots` full contexts (all the sequences can use: a small model does not take the whole device). Ranks sharing
 * one device divide the fraction, and what the device had in use before them, among them (rankShare). A fraction
 * that leaves less than one sequence of the full context is refused, naming every term.
 */
import { z } from 'zod';
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
  /** the device's memory, and what was free before this rank allocated (its context made; shared: rankShare) */
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

/** What a CUDA rank measured of its device once it had made its context, before any rank of its group allocated. */
export interface DeviceMeasure {
  readonly host: string;
  /** the CUDA ordinal the rank opened */
  readonly device: number;
  readonly totalBytes: number;
  readonly freeBytes: number;
}

const deviceMeasureSchema = z.object({
  host: z.string().min(1),
  device: z.number().int().nonnegative(),
  totalBytes: z.number().int().positive(),
  freeBytes: z.number().int().nonnegative(),
}).strict().refine((m) => m.freeBytes <= m.totalBytes, 'freeBytes over totalBytes');

/** Rank `rank`'s measure as traded between ranks (JSON bytes); a malformed one is refused, naming the rank. */
export function parseDeviceMeasure(bytes: Uint8Array, rank: number): DeviceMeasure {
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(bytes).toString());
  } catch {
    throw new WeftError('WEFT_PROTOCOL', `rank ${rank}'s device measure is not JSON (${bytes.length} bytes)`);
  }
  const parsed = deviceMeasureSchema.safeParse(value);
  if (!parsed.success) {
    const why = parsed.error.issues.map((i) => `${i.path.join('.') || 'measure'}: ${i.message}`).join('; ');
    throw new WeftError('WEFT_PROTOCOL', `rank ${rank}'s device measure is malformed (${why})`);
  }
  return parsed.data;
}

/** A device before a group loaded anything onto it, and how many of the group's ranks share it. */
export interface DeviceBeforeGroup {
  readonly totalBytes: number;
  readonly freeBytes: number;
  readonly ranks: number;
}

/**
 * `mine`'s device before its group, from every rank's measure (`mine` among them): the ranks on the same host and
 * ordinal share it, and it had the least free memory any of them measured. Each rank measures right after making
 * its context, and none allocates more before the measures are traded: the last to measure saw every sibling's
 * context and nothing else of theirs, in whatever order they measured.
 */
export function deviceBeforeGroup(mine: DeviceMeasure, measures: readonly DeviceMeasure[]): DeviceBeforeGroup {
  const sharing = measures.filter((m) => m.host === mine.host && m.device === mine.device);
  const freeBytes = Math.min(...sharing.map((m) => m.freeBytes));
  return { totalBytes: mine.totalBytes, freeBytes, ranks: sharing.length };
}

/**
 * One rank's part of a shared device for kvPoolTokens: the fraction and what the device had in use before the group
 * (the other processes and the group's contexts) divided among its ranks, so that together they take the fraction.
 */
export function rankShare(
  fraction: number,
  device: DeviceBeforeGroup,
): Pick<KvPoolMemory, 'fraction' | 'totalBytes' | 'freeBytes'> {
  const { totalBytes, freeBytes, ranks } = device;
  return { fraction: fraction / ranks, totalBytes, freeBytes: totalBytes - (totalBytes - freeBytes) / ranks };
}
