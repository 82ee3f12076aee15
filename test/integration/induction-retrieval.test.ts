// Retrieval through approximate attention, on the CPU: the model built to copy (bench/induction-model.ts: two
// layers whose weights make it continue any span it has seen, context 32K) finds a needle of the held-out text
// (bench/needle.ts) with dense attention and with SparQ at r 16 (1/8 of the head) and k 64 (1/16 of the 1024
// positions), and guesses without the needle; and a score whose full log-prob rows would not fit one worker
// message is refused, naming the most tokens that do, with the cluster serving on (it used to cut the worker off).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { writeInductionModel } from '../../bench/induction-model.ts';
import { heldOutStream, needleCase, retrieve } from '../../bench/needle.ts';
import { withCluster } from '../helpers/with-cluster.ts';
import { isWeftError } from '../../core/errors.ts';

const NEEDLE = 64, KEY = 16, LENGTH = 1024;

test('the induction model retrieves a needle with dense attention and SparQ, and guesses without it', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'weft-induction-'));
  try {
    await writeInductionModel(dir);
    const text = heldOutStream(dir);
    const cases = [0.1, 0.5, 0.9].map((depth, j) => needleCase(text, LENGTH, depth, j, NEEDLE));
    const control = needleCase(text, LENGTH, null, 0, NEEDLE);
    await withCluster({ modelDir: dir, device: 'cpu', maxContext: 4096, attention: 'sparq', sparqR: 16, sparqK: 64 }, async (cluster) => {
      for (const [name, attention] of [['dense', { mode: 'dense' }], ['SparQ r 16 k 64', undefined]] as const) {
        for (const { context, needle } of cases) {
          const { top1, nll } = await retrieve(cluster, context, needle, KEY, attention);
          assert.ok(top1 >= 0.75 && nll < 2, `${name}: top-1 ${top1}, NLL ${nll} on the needle's continuation`);
        }
        const guess = await retrieve(cluster, control.context, control.needle, KEY, attention);
        assert.ok(guess.top1 <= 0.2, `${name}: top-1 ${guess.top1} without the needle (the model should only guess)`);
      }

      // 4096 tokens x 4097 x 4 bytes = 64 MiB of full rows: over the 63 MiB one step's answer carries
      const ids = text.slice(0, 4096);
      await assert.rejects(cluster.score(ids, { full: true }), (err: unknown) => {
        assert.ok(isWeftError(err) && err.code === 'WEFT_BAD_REQUEST', String(err));
        assert.match(err.message, /full log-prob rows for 4096 tokens .* at most 4031 tokens/);
        return true;
      });
      const { full } = await cluster.score(ids.slice(0, 300), { full: true });
      assert.equal(full!.length, 300);
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
