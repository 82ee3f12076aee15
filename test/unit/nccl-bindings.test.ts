/**
 * The koffi declarations of NCCL, checked against a stand-in library with NCCL's C signatures
 * (test/fixtures/fake-nccl/fake-nccl.c, compiled here with the system C compiler) that records its
 * arguments: the 128-byte unique id (with zero bytes inside) survives both ways, the communicator handle
 * comes back as the same pointer, and device addresses, counts and the stream cross unchanged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import koffi from 'koffi';
import { loadNccl } from '../../worker/collectives/nccl.ts';
import { FIXTURES } from '../helpers/fixtures.ts';

test('NCCL bindings pass ids, handles, pointers and the stream intact', async () => {
  const lib = join(mkdtempSync(join(tmpdir(), 'weft-fake-nccl-')), 'libfake-nccl.so');
  execFileSync('cc', ['-shared', '-fPIC', '-O1', '-o', lib, join(FIXTURES, '..', 'fake-nccl', 'fake-nccl.c')]);
  const nccl = loadNccl(lib);
  const fake = koffi.load(lib);
  const receivedId = fake.func('int fake_received_id(_Out_ uint8_t *out)');
  const lastCall = fake.func('void fake_last_call(_Out_ uint64_t *out)');

  assert.equal(nccl.version(), 22803);
  const id = nccl.getUniqueId();
  assert.equal(id.length, 128);
  assert.deepEqual(Array.from(id.slice(0, 6)), [0, 7, 14, 21, 28, 0], 'the id keeps its zero bytes');

  const comm = await nccl.initRank(4, id, 3);
  const seen = new Uint8Array(128);
  assert.equal(receivedId(seen), 403, 'nranks and rank arrive');
  assert.deepEqual(seen, id, 'the 128 id bytes arrive whole');

  const send = 0x7f00_1234_5000n;
  const recv = 0x7f00_1234_9000n;
  const stream = 0x5555_0000_1111n;
  assert.equal(nccl.allReduce(send, recv, 4096, comm, stream), 0, 'the handle is the one init returned');
  const args = new BigUint64Array(7);
  lastCall(args);
  assert.deepEqual(Array.from(args.slice(0, 6)), [send, recv, 4096n, 7n, 0n, stream], 'pointers, count, float32, sum, stream');
  assert.equal(nccl.allGather(recv, send, 10, comm, stream), 0);
  lastCall(args);
  assert.deepEqual(Array.from(args.slice(0, 3)), [recv, send, 10n]);
  assert.equal(nccl.broadcast(send, recv, 12, 2, comm, stream), 5, 'a broadcast outside a group is refused (the fake checks grouping)');
  assert.equal(nccl.groupStart(), 0);
  assert.equal(nccl.broadcast(send, recv, 12, 2, comm, stream), 0);
  assert.equal(nccl.groupEnd(), 0);
  lastCall(args);
  assert.deepEqual(Array.from(args.slice(0, 6)), [send, recv, 12n, 7n, 2n, stream], 'pointers, count, float32, root, stream');
  assert.equal(nccl.groupEnd(), 5, 'group calls pair up');
  assert.equal(nccl.asyncError(comm), 0);
  assert.match(nccl.errorString(4), /invalid argument/);
  await assert.rejects(nccl.initRank(2, id, 5), /ncclCommInitRank \(rank 5 of 2\).*invalid argument/);
  assert.equal(nccl.abort(comm), 0);
  lastCall(args);
  assert.equal(args[6], 1n, 'abort got the same handle');
});
