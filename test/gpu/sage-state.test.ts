/**
 * The Sage state on CUDA (native/src/sage-state.h): a prompt attended in three chunks with a slot, beside a sequence
 * without one, must give the CPU reference's outputs (which quantizes every block again from the kept mean, where
 * the CUDA kernels reuse the blocks the slot kept), as closely as the stateless op does, and keep the same mean and
 * header. The first chunk equals the stateless op bit for bit. The same beside a mixed step's decode rows (their
 * sequences take no place in the step's scratch). Skips, saying why, without a CUDA build or a GPU.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine } from '../../worker/native.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';
import { CHUNKS, sageChunks } from '../helpers/sage-chunks.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

const maxDiff = (a: Float32Array, b: Float32Array): number => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0);

test('sageAttention with a state slot on CUDA: the CPU reference\'s outputs, means and header, chunk by chunk', { skip }, () => {
  const cpuEngine = createEngine({ backend: 'cpu', threads: 4 }), cudaEngine = createEngine({ backend: 'cuda', poison: true });
  for (const pv of ['f16', 'fp8'] as const) {
    const cpu = sageChunks(cpuEngine, pv, 21), cuda = sageChunks(cudaEngine, pv, 21);
    let end = 0;
    for (let i = 0; i < CHUNKS.promptChunks.length; i++) {
      const slots = [0, i === 0 ? 1 : 0, end, -1, 0, 0];
      const stateless = maxDiff(cuda.run(i, null), cpu.run(i, null));
      const kept = cuda.run(i, slots);
      if (i === 0) assert.deepEqual(kept, cuda.run(i, null), 'the first chunk: the stateless op');
      const diff = maxDiff(kept, cpu.run(i, slots));
      console.log(`# ${pv} chunk ${i}: |cuda - cpu| ${diff.toExponential(2)} with the slot, ${stateless.toExponential(2)} without`);
      assert.ok(diff <= 2 * stateless + 1e-5, `${pv} chunk ${i}: ${diff} from the CPU reference (stateless: ${stateless})`);
      end += CHUNKS.promptChunks[i]!;
      assert.deepEqual(Array.from(cudaEngine.download(cuda.state.header)), [end, 0]);
      assert.deepEqual(cudaEngine.download(cuda.state.means), cpuEngine.download(cpu.state.means), `${pv} chunk ${i}: the kept means`);
    }
  }
});

test('sageAttention with a state slot beside decode rows on CUDA (a mixed step): the CPU reference\'s outputs, means and header', { skip }, () => {
  const D = 3, cpuEngine = createEngine({ backend: 'cpu', threads: 4 }), cudaEngine = createEngine({ backend: 'cuda', poison: true });
  for (const pv of ['f16', 'fp8'] as const) {
    const cpu = sageChunks(cpuEngine, pv, 22, D), cuda = sageChunks(cudaEngine, pv, 22, D);
    let end = 0;
    for (let i = 0; i < CHUNKS.promptChunks.length; i++) {
      const slots = [...Array(D).fill([-1, 0, 0]).flat(), 0, i === 0 ? 1 : 0, end, -1, 0, 0];
      const stateless = maxDiff(cuda.run(i, null), cpu.run(i, null));
      const diff = maxDiff(cuda.run(i, slots), cpu.run(i, slots));
      console.log(`# ${pv} chunk ${i} beside ${D} decode rows: |cuda - cpu| ${diff.toExponential(2)} with the slot, ${stateless.toExponential(2)} without`);
      assert.ok(diff <= 2 * stateless + 1e-5, `${pv} chunk ${i}: ${diff} from the CPU reference (stateless: ${stateless})`);
      end += CHUNKS.promptChunks[i]!;
      assert.deepEqual(Array.from(cudaEngine.download(cuda.state.header)), [end, 0]);
      assert.deepEqual(cudaEngine.download(cuda.state.means), cpuEngine.download(cpu.state.means), `${pv} chunk ${i}: the kept means`);
    }
  }
});
