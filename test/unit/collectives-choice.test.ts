/**
 * `--collectives auto|nccl|shared-gpu`: the option as every entry point reads it, the init command that carries
 * it to the workers, and each rank's choice of Collectives and CUDA device (worker/collectives/choose.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { apiConfig, commandConfig } from '../../coordinator/config.ts';
import { isWeftError } from '../../core/errors.ts';
import { PROTOCOL_VERSION } from '../../core/wire.ts';
import { parseCoordinatorMessage } from '../../core/worker-protocol.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { chooseCollectives } from '../../worker/collectives/choose.ts';
import { fixtureDir } from '../helpers/fixtures.ts';

test('--collectives: auto by default, from the flag or WEFT_COLLECTIVES, anything else refused by name', () => {
  assert.equal(commandConfig('generate', { modelDir: '/m', prompt: 'hi' }, {}).collectives, 'auto');
  assert.equal(commandConfig('generate', { modelDir: '/m', prompt: 'hi', collectives: 'shared-gpu' }, {}).collectives, 'shared-gpu');
  assert.equal(commandConfig('serve', { modelDir: '/m' }, { WEFT_COLLECTIVES: 'nccl' }).collectives, 'nccl');
  assert.equal(apiConfig('cluster', { modelDir: '/m', collectives: 'shared-gpu' }).collectives, 'shared-gpu');
  assert.throws(
    () => commandConfig('generate', { modelDir: '/m', prompt: 'hi', collectives: 'mpi' }, {}),
    (err: unknown) => isWeftError(err) && /--collectives/.test(err.message) && /mpi/.test(err.message),
  );
});

test('the init command carries the choice to the workers; an unknown one is refused', () => {
  const spec = readModelSpec(fixtureDir('llama-tiny'));
  const init = { v: PROTOCOL_VERSION, type: 'init', id: 1, modelDir: '/m', spec, plan: planShards(spec, 2), device: 'cuda', kvSlots: 4, maxContext: 64, kvDtype: 'bf16', threads: 1, collectiveRoot: '' };
  const parsed = parseCoordinatorMessage({ ...init, collectives: 'shared-gpu' });
  assert.equal(parsed.type === 'init' && parsed.collectives, 'shared-gpu');
  assert.equal((parseCoordinatorMessage(init) as { collectives?: string }).collectives, undefined, 'absent: the worker takes auto');
  assert.throws(() => parseCoordinatorMessage({ ...init, collectives: 'mpi' }));
});

test('auto on CUDA: NCCL with a GPU per rank, else shared-gpu (if the ranks share a host) with rank r on GPU r mod count', () => {
  const cuda = { device: 'cuda' as const, world: 4 };
  assert.deepEqual(chooseCollectives('auto', { ...cuda, deviceIndex: 3, visibleDevices: 4 }), { kind: 'nccl', deviceIndex: 3 });
  assert.deepEqual(chooseCollectives('auto', { ...cuda, deviceIndex: 3, visibleDevices: 1 }), { kind: 'shared-gpu-if-one-host', deviceIndex: 0 });
  assert.deepEqual(chooseCollectives('auto', { ...cuda, deviceIndex: 3, visibleDevices: 2 }), { kind: 'shared-gpu-if-one-host', deviceIndex: 1 });
  // external workers, one GPU each on hosts of their own: every rank was given device 0
  assert.deepEqual(chooseCollectives('auto', { ...cuda, deviceIndex: 0, visibleDevices: 1 }), { kind: 'shared-gpu-if-one-host', deviceIndex: 0 });
});

test('an explicit choice is kept; a group of one is solo; CPU groups use the hub and refuse a CUDA choice by name', () => {
  assert.deepEqual(chooseCollectives('shared-gpu', { device: 'cuda', world: 2, deviceIndex: 1, visibleDevices: 8 }), { kind: 'shared-gpu', deviceIndex: 1 });
  assert.deepEqual(chooseCollectives('shared-gpu', { device: 'cuda', world: 2, deviceIndex: 1, visibleDevices: 1 }), { kind: 'shared-gpu', deviceIndex: 0 });
  assert.deepEqual(chooseCollectives('nccl', { device: 'cuda', world: 2, deviceIndex: 1, visibleDevices: 1 }), { kind: 'nccl', deviceIndex: 1 });
  assert.deepEqual(chooseCollectives('shared-gpu', { device: 'cuda', world: 1, deviceIndex: 0, visibleDevices: 1 }), { kind: 'solo', deviceIndex: 0 });
  assert.deepEqual(chooseCollectives('auto', { device: 'cpu', world: 2, deviceIndex: 1, visibleDevices: 0 }), { kind: 'cpu', deviceIndex: 1 });
  assert.deepEqual(chooseCollectives('auto', { device: 'cpu', world: 1, deviceIndex: 0, visibleDevices: 0 }), { kind: 'solo', deviceIndex: 0 });
  assert.throws(
    () => chooseCollectives('shared-gpu', { device: 'cpu', world: 2, deviceIndex: 0, visibleDevices: 0 }),
    (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && /--collectives shared-gpu needs --device cuda/.test(err.message),
  );
});
