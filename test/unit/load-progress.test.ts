/**
 * The weight-load progress renderer (coordinator/load-progress.ts) on a fake clock: off a terminal, nothing for a
 * load that ends within 2 s, then plain lines at most every 10% or 2 s; on a terminal, one line redrawn with \r.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LoadProgress } from '../../coordinator/load-progress.ts';

const MiB = 2 ** 20;

function rig(isTTY: boolean, world = 2) {
  const written: string[] = [];
  let now = 0;
  const progress = new LoadProgress({ isTTY, write: (text: string) => written.push(text) }, world, () => now);
  return { written, progress, at: (ms: number) => void (now = ms) };
}

test('off a terminal a load that ends within 2 s writes nothing', () => {
  const { written, progress, at } = rig(false);
  for (let i = 0; i <= 10; i++) {
    at(i * 100);
    progress.update(0, i * 10 * MiB, 100 * MiB);
    progress.update(1, i * 10 * MiB, 100 * MiB);
  }
  progress.done();
  assert.deepEqual(written, []);
});

test('off a terminal: plain lines, one per 10% of the bytes or per 2 s, then the closing line', () => {
  const { written, progress, at } = rig(false);
  progress.update(0, 0, 100 * MiB); // rank 1 has not reported: it counts as not started
  at(2500);
  progress.update(0, 50 * MiB, 100 * MiB);
  assert.deepEqual(written, ['weft: loading weights 25% (50.0/100.0 MiB, 1/2 ranks)\n']);
  at(2600);
  progress.update(1, 1 * MiB, 100 * MiB); // 25.5%: same 10% step, 0.1 s later
  assert.equal(written.length, 1);
  at(2700);
  progress.update(1, 20 * MiB, 100 * MiB); // 35%: a new 10% step
  assert.equal(written.at(-1), 'weft: loading weights 35% (70.0/200.0 MiB, 2/2 ranks)\n');
  at(4800);
  progress.update(1, 21 * MiB, 100 * MiB); // 35.5%: same step, but 2.1 s later
  assert.equal(written.length, 3);
  at(5000);
  progress.done();
  assert.equal(written.at(-1), 'weft: loaded 71.0 MiB of weights on 2 ranks in 5.0 s\n');
  written.length = 0;
  progress.done(); // nothing shown since: nothing to close
  assert.deepEqual(written, []);
});

test('on a terminal: a bar redrawn in place at once, at most every 100 ms, and a closing line', () => {
  const { written, progress, at } = rig(true, 1);
  progress.update(0, 25 * MiB, 100 * MiB);
  assert.equal(written.length, 1);
  assert.match(written[0]!, /^\rweft: loading weights \[#{8}\.{22}\]  25% 25\.0\/100\.0 MiB, 1\/1 ranks\x1b\[K$/);
  at(50);
  progress.update(0, 30 * MiB, 100 * MiB);
  assert.equal(written.length, 1, 'redrawn at most every 100 ms');
  at(60);
  progress.update(0, 100 * MiB, 100 * MiB);
  assert.match(written.at(-1)!, /\[#{30}\] 100%/, 'the full bar is always drawn');
  at(1000);
  progress.done();
  assert.equal(written.at(-1), '\rweft: loaded 100.0 MiB of weights on 1 rank in 1.0 s\x1b[K\n');
});
