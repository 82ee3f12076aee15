/**
 * The KV allocator: today's layout (one block of maxContext positions per sequence, a padding block on CUDA)
 * and the paged case the same class serves with small blocks: allocation, growth, freeing, refusals.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { KvBlockTable, blocksFor, kvCacheLayout, maxBlocksPerSequence, type KvCacheLayout } from '../../core/kv-block-table.ts';
import { isWeftError } from '../../core/errors.ts';

const weftError = (code: string, pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === code && pattern.test(err.message);

test('kvCacheLayout: one block of maxContext per sequence; on cuda one more block, for padding', () => {
  assert.deepEqual(kvCacheLayout({ kvSlots: 4, maxContext: 512, device: 'cpu' }), { kvSlots: 4, maxContext: 512, kvBlockSize: 512, kvBlocks: 4, paddingBlock: null, kvDtype: 'f32' });
  const cuda = kvCacheLayout({ kvSlots: 4, maxContext: 512, device: 'cuda' });
  assert.deepEqual(cuda, { kvSlots: 4, maxContext: 512, kvBlockSize: 512, kvBlocks: 5, paddingBlock: 4, kvDtype: 'bf16' });
  assert.equal(maxBlocksPerSequence(cuda), 1);
  assert.equal(blocksFor(0, 16), 0);
  assert.equal(blocksFor(16, 16), 1);
  assert.equal(blocksFor(17, 16), 2);
});

test('one block per sequence: blocks in order, the padding block never handed out, freed blocks come back last', () => {
  const kv = new KvBlockTable(kvCacheLayout({ kvSlots: 3, maxContext: 64, device: 'cuda' }));
  const a = kv.allocate(10);
  const b = kv.allocate(1);
  const c = kv.allocate(64);
  assert.deepEqual([kv.blocks(a), kv.blocks(b), kv.blocks(c)], [[0], [1], [2]]);
  assert.equal(kv.sequences, 3);
  assert.equal(kv.blocksInUse, 3);
  assert.equal(kv.canAllocate(1), false, 'the padding block (3) is not in the pool');
  assert.throws(() => kv.allocate(1), weftError('WEFT_BUSY', /KV cache is full: 3 of 3 sequences/));
  kv.grow(a, 64); // one block holds the whole context: growing within it takes nothing
  assert.deepEqual(kv.blocks(a), [0]);
  kv.free(b);
  assert.equal(kv.sequences, 2);
  const d = kv.allocate(5);
  assert.deepEqual(kv.blocks(d), [1]);
  kv.free(c);
  kv.free(a);
  kv.free(d);
  assert.equal(kv.blocksInUse, 0);
  assert.equal(kv.blocksFree, 3);
  assert.deepEqual(kv.blocks(kv.allocate(1)), [2], 'freed blocks are reused in the order they came back');
});

test('refusals: past the context, an unknown or freed sequence, a padding block outside the cache', () => {
  const kv = new KvBlockTable(kvCacheLayout({ kvSlots: 2, maxContext: 32, device: 'cpu' }));
  assert.throws(() => kv.checkFits(33), weftError('WEFT_BAD_REQUEST', /33 tokens exceeds the KV cache's context of 32/));
  assert.equal(kv.canAllocate(33), false);
  assert.throws(() => kv.allocate(33), weftError('WEFT_BAD_REQUEST', /context of 32/));
  const a = kv.allocate(4);
  assert.throws(() => kv.grow(a, 33), weftError('WEFT_BAD_REQUEST', /context of 32/));
  kv.free(a);
  assert.throws(() => kv.blocks(a), weftError('WEFT_BAD_REQUEST', /KV sequence 0 holds no blocks/));
  assert.throws(() => kv.free(a), weftError('WEFT_BAD_REQUEST', /holds no blocks/));
  const bad: KvCacheLayout = { kvSlots: 2, maxContext: 32, kvBlockSize: 32, kvBlocks: 2, paddingBlock: 2, kvDtype: 'f32' };
  assert.throws(() => new KvBlockTable(bad), weftError('WEFT_BAD_REQUEST', /padding block 2 is outside the 2 KV blocks/));
  assert.throws(() => new KvBlockTable({ ...bad, paddingBlock: null, kvBlockSize: 0 }), weftError('WEFT_BAD_REQUEST', /kvBlockSize must be a positive integer/));
});

test('paged: small blocks from a shared pool; sequences grow block by block until the pool is full', () => {
  // 8 blocks of 16 positions for up to 4 sequences of 64 positions: the sizes of a paged cache
  const layout: KvCacheLayout = { kvSlots: 4, maxContext: 64, kvBlockSize: 16, kvBlocks: 9, paddingBlock: 8, kvDtype: 'bf16' };
  assert.equal(maxBlocksPerSequence(layout), 4);
  const kv = new KvBlockTable(layout);
  const a = kv.allocate(20); // 2 blocks
  const b = kv.allocate(16); // 1 block
  assert.deepEqual(kv.blocks(a), [0, 1]);
  assert.deepEqual(kv.blocks(b), [2]);
  kv.grow(b, 17);
  assert.deepEqual(kv.blocks(b), [2, 3]);
  kv.grow(a, 64);
  assert.deepEqual(kv.blocks(a), [0, 1, 4, 5]);
  assert.equal(kv.blocksInUse, 6);
  assert.equal(kv.canAllocate(48), false, '3 blocks wanted, 2 free');
  assert.equal(kv.canAllocate(32), true);
  const c = kv.allocate(16); // block 6; block 7 is left
  assert.throws(() => kv.grow(b, 64), weftError('WEFT_BUSY', /sequence 1 needs 2 more blocks for 64 tokens, 1 are free/));
  assert.deepEqual(kv.blocks(b), [2, 3], 'a refused growth takes nothing');
  kv.free(c);
  kv.grow(b, 64); // exactly the 2 left
  assert.deepEqual(kv.blocks(b), [2, 3, 7, 6]);
  assert.equal(kv.blocksFree, 0);
  assert.throws(() => kv.allocate(1), weftError('WEFT_BUSY', /0 free blocks for 1 needed/));
  assert.deepEqual(kv.blocks(kv.allocate(0)), [], 'an empty sequence needs no block');
  kv.free(a);
  assert.equal(kv.blocksFree, 4);
  assert.equal(kv.blocksInUse, 4);
});

test('kvCacheLayout, paged: blocks of kvBlockSize from a pool of kvCacheTokens (whole blocks), the padding block after them; a pool short of one context is refused', () => {
  const cpu = kvCacheLayout({ kvSlots: 16, maxContext: 512, device: 'cpu', kvBlockSize: 16, kvCacheTokens: 2048 + 15 });
  assert.deepEqual(cpu, { kvSlots: 16, maxContext: 512, kvBlockSize: 16, kvBlocks: 128, paddingBlock: null, kvDtype: 'f32' });
  assert.equal(maxBlocksPerSequence(cpu), 32);
  const cuda = kvCacheLayout({ kvSlots: 64, maxContext: 500, device: 'cuda', kvBlockSize: 16, kvCacheTokens: 512 });
  assert.deepEqual([cuda.kvBlocks, cuda.paddingBlock, maxBlocksPerSequence(cuda)], [33, 32, 32]);
  assert.equal(kvCacheLayout({ kvSlots: 3, maxContext: 64, device: 'cpu', kvBlockSize: 5 }).kvBlocks, 38, 'no pool given: kvSlots full contexts');
  assert.throws(
    () => kvCacheLayout({ kvSlots: 4, maxContext: 512, device: 'cpu', kvBlockSize: 16, kvCacheTokens: 500 }),
    weftError('WEFT_BAD_CONFIG', /a KV cache of 500 positions \(31 blocks of 16\) cannot hold one sequence of the context of 512 positions \(32 blocks\); give --kv-cache-tokens 512/),
  );
  assert.throws(() => kvCacheLayout({ kvSlots: 4, maxContext: 512, device: 'cpu', kvBlockSize: 0 }), weftError('WEFT_BAD_CONFIG', /block size must be a positive integer, got 0/));
  const kv = new KvBlockTable(cuda);
  const a = kv.allocate(500);
  assert.ok(!kv.blocks(a).includes(32), 'the padding block is never handed out');
  assert.equal(kv.canGrow(a, 500), true);
  assert.equal(kv.canAllocate(1), false);
  kv.free(a);
  const b = kv.allocate(16);
  assert.equal(kv.canGrow(b, 500), true);
  assert.equal(kv.canGrow(b, 501), false, 'past the context');
  kv.allocate(16 * 30);
  assert.equal(kv.canGrow(b, 32), true, 'one block left');
  assert.equal(kv.canGrow(b, 33), false);
});
