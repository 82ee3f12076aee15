/**
 * The collectives contract (test/helpers/collectives-contract.ts) on shared-gpu: 2 and 4 ranks, each a process of
 * its own on one GPU, eager and captured into CUDA graphs (each graph replayed twice), with exchange regions in
 * device memory (CUDA IPC) and in /dev/shm host memory, and once with data areas so small that every collective
 * runs in chunks. The dead-peer case SIGKILLs a rank's process. First, a probe: CUDA IPC on this host either
 * works or fails with an error naming the CUDA call; the device-IPC suites skip, saying so, where it fails.
 * Everything skips, saying why, without a CUDA build or a GPU.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { collectiveContract } from '../helpers/collectives-contract.ts';
import { cudaSkipReason, openSharedGpuGroup, sharedGpuImplementation } from './shared-gpu-group.ts';

const skip = cudaSkipReason();
if (skip) console.log(`# shared-gpu suite skipped: ${skip}`);

/** null: CUDA IPC works between two processes here; else the error the group reported. */
async function probeDeviceIpc(): Promise<string | null> {
  try {
    const { ranks } = await openSharedGpuGroup({ world: 2, memory: 'device-ipc', mode: 'eager' });
    ranks.forEach((comm) => comm.close());
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}
const ipcError = skip ? null : await probeDeviceIpc();
if (ipcError) console.log(`# CUDA IPC is unavailable on this host: ${ipcError}`);
const ipcSkip = skip || (ipcError === null ? false : `CUDA IPC is unavailable on this host: ${ipcError}`);

test('CUDA IPC between two processes works, or its failure names the CUDA call and error', { skip }, () => {
  if (ipcError !== null) assert.match(ipcError, /cudaIpc(Open|Get)MemHandle failed: CUDA error .+/);
});

test("memory 'auto' takes device IPC where it works, else /dev/shm, on every rank alike", { skip, timeout: 120_000 }, async () => {
  const { ranks, memory } = await openSharedGpuGroup({ world: 2, memory: 'auto', mode: 'eager' });
  ranks.forEach((comm) => comm.close());
  assert.equal(memory, ipcError === null ? 'device-ipc' : 'host-shm');
});

for (const world of [2, 4]) {
  for (const mode of ['eager', 'graph'] as const) {
    collectiveContract(sharedGpuImplementation({ world, memory: 'device-ipc', mode }, ipcSkip));
    collectiveContract(sharedGpuImplementation({ world, memory: 'host-shm', mode }, skip));
  }
}
// 8 floats a data area: a 12-value all-reduce takes 2 chunks, a gather of 7-column rows one row a chunk
collectiveContract(sharedGpuImplementation({ world: 4, memory: 'device-ipc', mode: 'graph', dataBytes: 32 }, ipcSkip));
collectiveContract(sharedGpuImplementation({ world: 2, memory: 'host-shm', mode: 'eager', dataBytes: 32 }, skip));
