/**
 * `weft doctor` through the real command: every check in order on a host that can run the model (the run check
 * starting real worker processes and leaving none), and a failing check that names the problem, skips the run and
 * exits 1.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, rmSync, truncateSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixtureDir } from '../helpers/fixtures.ts';
import { runWeft } from '../helpers/cli.ts';
import { cudaReport, nativeInfo } from '../../worker/native.ts';
import type { DoctorReport } from '../../coordinator/doctor.ts';

const llama = fixtureDir('llama-tiny');
const NAMES = ['node', 'addon', 'cuda', 'nccl', 'zeromq', 'model', 'run'];

async function doctor(args: string[]): Promise<{ code: number | null; report: DoctorReport; leftover: number[] }> {
  const result = await runWeft(['doctor', '--json', ...args]);
  const report = JSON.parse(result.stdout) as DoctorReport;
  assert.deepEqual(report.checks.map((c) => c.name), NAMES, 'every check, in order');
  return { code: result.code, report, leftover: result.leftover };
}
const check = (report: DoctorReport, name: string) => report.checks.find((c) => c.name === name)!;

describe('weft doctor', () => {
  test('a host that can run the model at TP 2 on the CPU: every check ok or skipped, one token generated, nothing left running', async () => {
    const { code, report, leftover } = await doctor(['--model', llama, '--tp', '2']);
    assert.equal(code, 0, JSON.stringify(report));
    assert.equal(report.ok, true);
    for (const name of ['node', 'addon', 'model', 'run']) assert.equal(check(report, name).status, 'ok', JSON.stringify(check(report, name)));
    assert.equal(check(report, 'nccl').status, 'skip', 'NCCL is not needed on the CPU');
    assert.match(check(report, 'run').detail, /^2 ranks on cpu: started and loaded in \d+ ms, first token in \d+ ms$/);
    assert.match(check(report, 'model').detail, /LlamaForCausalLM, \d+ layers/);
    assert.deepEqual(leftover, []);
  });

  test('a model weft cannot read fails its check, skips the run and exits 1', async () => {
    const { code, report } = await doctor(['--model', join(tmpdir(), 'weft-no-such-model')]);
    assert.equal(code, 1);
    assert.equal(report.ok, false);
    assert.equal(check(report, 'model').status, 'fail');
    assert.match(check(report, 'model').detail, /weft-no-such-model/);
    assert.deepEqual(check(report, 'run'), { name: 'run', status: 'skip', detail: 'not tried: model failed' });
  });

  test('what only the run finds (truncated weights, a TP degree the model cannot split) fails the run check, naming it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-doctor-'));
    try {
      cpSync(llama, dir, { recursive: true });
      const weights = join(dir, 'model.safetensors');
      truncateSync(weights, statSync(weights).size - 64);
      const truncated = await doctor(['--model', dir]);
      assert.equal(truncated.code, 1);
      assert.equal(check(truncated.report, 'model').status, 'ok', 'config.json is fine');
      assert.equal(check(truncated.report, 'run').status, 'fail');
      assert.match(check(truncated.report, 'run').detail, /model\.safetensors.*(truncated|past the end)/);
      assert.deepEqual(truncated.leftover, []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const split = await doctor(['--model', llama, '--tp', '3']);
    assert.equal(split.code, 1);
    assert.match(check(split.report, 'run').detail, /cannot split .* over tp=3.*TP sizes that work/);
    assert.deepEqual(split.leftover, []);
  });

  test("a CPU-only addon's CUDA report says why it has no devices, and the cuda check skips", { skip: nativeInfo().cuda && 'this addon has the CUDA backend' }, async () => {
    const report = cudaReport();
    assert.deepEqual({ ...report, error: '' }, { driverVersion: 0, runtimeVersion: 0, error: '', devices: [] });
    assert.match(report.error, /built without CUDA/);
    const { report: checked } = await doctor(['--model', llama]);
    assert.deepEqual(check(checked, 'cuda'), { name: 'cuda', status: 'skip', detail: 'not needed with --device cpu (a CPU-only build)' });
  });

  test('--device cuda with a CPU-only addon fails the addon check and says how to build the CUDA one', { skip: nativeInfo().cuda && 'this addon has the CUDA backend' }, async () => {
    const { code, report } = await doctor(['--model', llama, '--device', 'cuda']);
    assert.equal(code, 1);
    assert.equal(check(report, 'addon').status, 'fail');
    assert.match(check(report, 'addon').detail, /WEFT_CUDA=1 npm run build:native/);
    assert.equal(check(report, 'run').status, 'skip');
  });
});
