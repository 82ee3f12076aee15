/**
 * --gpu-memory-fraction: a CUDA rank's KV pool is what the fraction of its device leaves after the memory
 * already in use, the weights, the step arena and a reserve (worker/kv-pool.ts); fractions that make no sense,
 * or leave less than one full-context sequence, are refused naming the terms.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  KV_POOL_RESERVE_BYTES,
  deviceBeforeGroup,
  kvPoolBytes,
  kvPoolTokens,
  minKvPoolBytes,
  parseDeviceMeasure,
  rankShare,
  type DeviceMeasure,
  type KvPoolMemory,
} from '../../worker/kv-pool.ts';
import { commandConfig } from '../../coordinator/config.ts';
import { parseCoordinatorMessage, parseWorkerMessage } from '../../core/worker-protocol.ts';
import { PROTOCOL_VERSION as v } from '../../core/wire.ts';

const GiB = 2 ** 30;
// Llama-2-7B on one H200: 32 layers × k, v × 32 KV heads × 128 × bf16 = 512 KiB a position
const h200: KvPoolMemory = {
  fraction: 0.9,
  totalBytes: 140 * GiB,
  freeBytes: 139.5 * GiB,
  weightBytes: 12.6 * GiB,
  arenaBytes: 24 * GiB,
  kvBytesPerToken: 32 * 2 * 32 * 128 * 2,
  kvBlockSize: 16,
  maxContext: 4096,
  kvSlots: 256,
};

test('the pool is the fraction less what is in use, the weights, the arena and the reserve, in whole blocks', () => {
  const bytes = 0.9 * 140 * GiB - 0.5 * GiB - 12.6 * GiB - 24 * GiB - KV_POOL_RESERVE_BYTES;
  assert.ok(Math.abs(kvPoolBytes(h200) - bytes) < 1);
  const tokens = kvPoolTokens(h200);
  assert.equal(tokens % 16, 0);
  assert.ok(tokens * h200.kvBytesPerToken <= bytes && (tokens + 16) * h200.kvBytesPerToken > bytes);
  // about 234 streams of 512 + 256 positions at once (the 256-stream bench gives 0.95)
  assert.ok(tokens >= 230 * 768 && tokens < 240 * 768, `${tokens} positions`);
  assert.ok(kvPoolTokens({ ...h200, fraction: 0.95 }) >= 250 * 768);
  // a lower fraction leaves a smaller pool; memory others hold comes off it
  assert.ok(kvPoolTokens({ ...h200, fraction: 0.5 }) < tokens);
  assert.equal(kvPoolTokens({ ...h200, freeBytes: 129.5 * GiB }), kvPoolTokens({ ...h200, fraction: 0.9 - 10 / 140 }));
  assert.equal(minKvPoolBytes(h200), 4096 * h200.kvBytesPerToken);
  // a small model takes no more than its sequences can use: kvSlots full contexts
  assert.equal(kvPoolTokens({ ...h200, kvBytesPerToken: 4096, weightBytes: 0.1 * GiB, arenaBytes: 4 * GiB }), 256 * 4096);
  assert.equal(kvPoolTokens({ ...h200, kvSlots: 3, maxContext: 1000 }), 3 * 1008);
});

test('a fraction that leaves less than one full-context sequence is refused, naming the terms', () => {
  const refused = (m: KvPoolMemory, pattern: RegExp) => assert.throws(() => kvPoolTokens(m), (err: Error & { code?: string }) => err.code === 'WEFT_BAD_CONFIG' && pattern.test(err.message), pattern.source);
  refused({ ...h200, fraction: 0.25 }, /--gpu-memory-fraction 0.25 of 140.00 GiB leaves 0.00 GiB for the KV cache .*weights 12.60 GiB, step arena 24.00 GiB.*context of 4096 positions \(2.00 GiB\)/);
  // another process holds most of the device
  refused({ ...h200, freeBytes: 40 * GiB }, /in use before loading 100.00 GiB/);
  // the state kept beside the cache (the prompts' Sage slots) comes off the pool and is named
  assert.equal(kvPoolBytes({ ...h200, stateBytes: 2 * GiB }), kvPoolBytes(h200) - 2 * GiB);
  refused({ ...h200, fraction: 0.25, stateBytes: 1.5 * GiB }, /step arena 24.00 GiB, Sage prefill state 1.50 GiB, reserve/);
  // exactly one context is enough
  const oneContext = { ...h200, fraction: (0.5 * GiB + 12.6 * GiB + 24 * GiB + KV_POOL_RESERVE_BYTES + minKvPoolBytes(h200)) / (140 * GiB) + 1e-9 };
  assert.equal(kvPoolTokens(oneContext), 4096);
});

test('--gpu-memory-fraction takes a number in (0, 1], 0.9 by default', () => {
  assert.equal(commandConfig('serve', {}, {}).gpuMemoryFraction, 0.9);
  assert.equal(commandConfig('serve', { gpuMemoryFraction: '0.5' }, {}).gpuMemoryFraction, 0.5);
  assert.equal(commandConfig('serve', {}, { WEFT_GPU_MEMORY_FRACTION: '1' }).gpuMemoryFraction, 1);
  for (const bad of ['0', '1.5', '-0.2', 'most', ''])
    assert.throws(() => commandConfig('serve', { gpuMemoryFraction: bad }, {}), /--gpu-memory-fraction.*a number in \(0, 1\]/, bad);
});

test('the init command carries the fraction and the reply the pool sized from it', () => {
  const init = { v, type: 'init', id: 1, modelDir: '/m', spec: {}, plan: {}, device: 'cuda', kvSlots: 256, maxContext: 4096, kvDtype: 'bf16', kvBlockSize: 16, threads: 1, collectiveRoot: '' };
  assert.equal((parseCoordinatorMessage({ ...init, gpuMemoryFraction: 0.9 }) as { gpuMemoryFraction?: number }).gpuMemoryFraction, 0.9);
  assert.throws(() => parseCoordinatorMessage({ ...init, gpuMemoryFraction: 0 }));
  assert.throws(() => parseCoordinatorMessage({ ...init, gpuMemoryFraction: 1.01 }));
  const reply = { v, type: 'reply', rank: 0, id: 1, command: 'init', result: { bytesLoaded: 10, kvCacheTokens: 196608 } };
  assert.deepEqual(parseWorkerMessage(reply), reply);
  assert.throws(() => parseWorkerMessage({ ...reply, result: { bytesLoaded: 10, kvCacheTokens: 0 } }));
});

/** What a rank on `host`'s CUDA device `device` of 80 GiB measured free. */
function measure(host: string, device: number, freeBytes: number): DeviceMeasure {
  return { host, device, totalBytes: 80 * GiB, freeBytes };
}

/** Every order of `items`. */
function permutations<T>(items: readonly T[]): T[][] {
  if (items.length <= 1) return [[...items]];
  return items.flatMap((item, i) => permutations(items.filter((_, j) => j !== i)).map((rest) => [item, ...rest]));
}

test('ranks sharing a GPU size the same pools in whatever order they measured: siblings are not in use', () => {
  // TP 4 of Llama-2-7B on one 80 GiB GPU that another process uses 2 GiB of; each rank's CUDA context takes 0.5 GiB
  const total = 80 * GiB, outside = 2 * GiB, context = 0.5 * GiB;
  const rank = { ...h200, totalBytes: total, weightBytes: (12.6 * GiB) / 4, arenaBytes: 4 * GiB };
  rank.kvBytesPerToken = h200.kvBytesPerToken / 4;
  const before = { totalBytes: total, freeBytes: total - outside - 4 * context, ranks: 4 };
  const pools = new Set<number>();
  for (const order of permutations([0, 1, 2, 3])) {
    // the k-th rank to measure saw its own context and those of the k ranks before it, and nothing else of theirs
    const measures = [0, 1, 2, 3].map((r) => measure('h', 0, total - outside - (order.indexOf(r) + 1) * context));
    for (const mine of measures) {
      assert.deepEqual(deviceBeforeGroup(mine, measures), before);
      pools.add(kvPoolTokens({ ...rank, ...rankShare(0.9, deviceBeforeGroup(mine, measures)) }));
    }
    // sized from its own measure (as before), the rank that measured last got less than the first
    const own = (r: number): number => kvPoolTokens({ ...rank, fraction: 0.9 / 4, freeBytes: measures[r]!.freeBytes });
    assert.ok(own(order[3]!) < own(order[0]!));
  }
  assert.equal(pools.size, 1);
  // together the four take the fraction: each takes a quarter of what was in use before them (others, contexts)
  assert.deepEqual(rankShare(0.9, before), { fraction: 0.225, totalBytes: total, freeBytes: total - 1 * GiB });
  const [tokens] = pools;
  const each = rank.weightBytes + rank.arenaBytes + KV_POOL_RESERVE_BYTES + tokens! * rank.kvBytesPerToken;
  const used = outside + 4 * context + 4 * each;
  assert.ok(used <= 0.9 * total && used > 0.9 * total - 4 * 16 * rank.kvBytesPerToken, `${used / GiB} GiB`);
  // a fraction too small for the group is refused as before, naming this rank's part of what was in use
  assert.throws(
    () => kvPoolTokens({ ...rank, ...rankShare(0.2, { ...before, freeBytes: total - 16 * GiB }) }),
    /--gpu-memory-fraction 0.05 of 80.00 GiB leaves 0.00 GiB for the KV cache \(in use before loading 4.00 GiB,/,
  );
});

test('only ranks on the same host and GPU share one: each GPU is measured and divided on its own', () => {
  // TP 4 on two GPUs of one host (rank r on GPU r mod 2); another process holds 10 GiB of GPU 1
  const twoGpus = [79, 69, 78.5, 68.5].map((free, r) => measure('h', r % 2, free * GiB));
  assert.deepEqual(deviceBeforeGroup(twoGpus[0]!, twoGpus), { totalBytes: 80 * GiB, freeBytes: 78.5 * GiB, ranks: 2 });
  assert.deepEqual(deviceBeforeGroup(twoGpus[3]!, twoGpus), { totalBytes: 80 * GiB, freeBytes: 68.5 * GiB, ranks: 2 });
  // TP 2 on two hosts of one GPU each (auto: NCCL): each rank has its GPU, and the whole fraction
  const twoHosts = [measure('a', 0, 79 * GiB), measure('b', 0, 79.5 * GiB)];
  const ownGpu = deviceBeforeGroup(twoHosts[1]!, twoHosts);
  assert.deepEqual(ownGpu, { totalBytes: 80 * GiB, freeBytes: 79.5 * GiB, ranks: 1 });
  assert.equal(rankShare(0.9, ownGpu).fraction, 0.9);
});

test('a rank\'s traded device measure is checked: a malformed one is refused naming the rank and the field', () => {
  const good = { host: 'gpu-host', device: 0, totalBytes: 80 * GiB, freeBytes: 78 * GiB };
  const bytes = (v: unknown): Uint8Array => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v));
  assert.deepEqual(parseDeviceMeasure(bytes(good), 2), good);
  assert.throws(() => parseDeviceMeasure(bytes('{"host":'), 3), /rank 3's device measure is not JSON/);
  const negative = bytes({ ...good, freeBytes: -1 });
  assert.throws(() => parseDeviceMeasure(negative, 1), /rank 1's device measure is malformed \(freeBytes/);
  assert.throws(() => parseDeviceMeasure(bytes({ ...good, device: 'zero' }), 0), /malformed \(device/);
  assert.throws(() => parseDeviceMeasure(bytes({ ...good, freeBytes: 81 * GiB }), 0), /freeBytes over totalBytes/);
  assert.throws(() => parseDeviceMeasure(bytes({ ...good, extra: 1 }), 0), /malformed/);
});
