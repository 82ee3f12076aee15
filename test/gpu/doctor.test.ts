/**
 * `weft doctor --device cuda` on a GPU host: the CUDA check lists the devices with their compute capability, NCCL
 * loads where the host has it, and the run check starts the cluster on the GPU and generates a token, leaving no
 * process. Skips, saying why, without a CUDA build or a GPU.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fixtureDir } from '../helpers/fixtures.ts';
import { runWeft } from '../helpers/cli.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';
import type { DoctorReport } from '../../coordinator/doctor.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

test('weft doctor --device cuda: devices, then one token on the GPU', { skip }, async () => {
  const result = await runWeft(['doctor', '--json', '--device', 'cuda', '--model', fixtureDir('llama-tiny')], { timeoutMs: 300_000 });
  const report = JSON.parse(result.stdout) as DoctorReport;
  const check = (name: string) => report.checks.find((c) => c.name === name)!;
  assert.equal(check('cuda').status, 'ok', check('cuda').detail);
  assert.match(check('cuda').detail, /device.*\(sm 9\.0, [\d.]+ GiB, \d+ SMs\); driver \d+\.\d+, runtime \d+\.\d+$/);
  assert.equal(check('run').status, 'ok', check('run').detail);
  assert.match(check('run').detail, /^1 rank on cuda: /);
  assert.equal(result.code, report.ok ? 0 : 1);
  assert.deepEqual(result.leftover, []);
});
