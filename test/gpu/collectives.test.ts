/**
 * The collectives contract (test/helpers/collectives-contract.ts) on NCCL through koffi, one rank on GPU 0:
 * all-reduce, all-gather of 1, 3, 5 and 17 rows (one ncclAllGather for one row of equal widths, grouped
 * broadcasts otherwise), health and refusals. With two GPUs, also two ranks in processes of their own
 * (nccl-rank.ts) gathering uneven widths. Skips, saying why, without a CUDA build, a GPU or libnccl.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createEngine } from '../../worker/native.ts';
import { loadNccl } from '../../worker/collectives/nccl.ts';
import { collectiveContract, GATHER_ROWS, gatheredPieces, ncclImplementation, ncclSkipReason, piece } from '../helpers/collectives-contract.ts';

collectiveContract(ncclImplementation());

function twoGpuSkipReason(): string | false {
  const noNccl = ncclSkipReason();
  if (noNccl) return noNccl;
  try {
    createEngine({ backend: 'cuda', device: 1 });
    return false;
  } catch (err) {
    return `a second GPU is needed: ${(err as Error).message}`;
  }
}

/** Runs nccl-rank.ts as rank `rank`; its one line of JSON output. */
function runRank(rank: number, world: number, id: string, widths: readonly number[]): Promise<string> {
  const script = fileURLToPath(new URL('./nccl-rank.ts', import.meta.url));
  return new Promise((resolve, reject) => {
    // NVLink multicast off, as the coordinator's spawner sets it for workers.
    const child = spawn(process.execPath, ['--import', 'tsx', script, String(rank), String(world), id, JSON.stringify(widths)], {
      env: { ...process.env, NCCL_NVLS_ENABLE: '0' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`rank ${rank} exited with ${signal ?? code}`));
    });
  });
}

test('NCCL, 2 ranks on 2 GPUs: all-reduce, and gathers of uneven widths for 1, 3, 5 and 17 rows', { skip: twoGpuSkipReason() }, async () => {
  const id = Buffer.from(loadNccl().getUniqueId()).toString('hex');
  const widths = [5, 2];
  const outputs = await Promise.all([0, 1].map((r) => runRank(r, 2, id, widths)));
  const sum = Array.from(piece(0, 2, 3), (v, i) => v + piece(1, 2, 3)[i]!);
  outputs.forEach((out, r) => {
    const result = JSON.parse(out) as { reduced: number[]; gathered: number[][]; asyncError: string | null };
    assert.deepEqual(result.reduced, sum, `rank ${r} all-reduce`);
    GATHER_ROWS.forEach((rows, i) => assert.deepEqual(result.gathered[i], gatheredPieces(rows, widths), `rank ${r}, ${rows} rows`));
    assert.equal(result.asyncError, null, `rank ${r} healthy`);
  });
});
