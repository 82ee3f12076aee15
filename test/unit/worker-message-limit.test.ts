// What one worker message may carry: a score's full log-prob rows are refused before they are computed when they
// would not fit (naming the most tokens that do), and a group whose speculative rounds answer full rows for every
// running sequence gets a socket limit that fits them (a larger answer cuts the worker off: its connection drops).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FULL_ROWS_MAX_BYTES, checkFullRows } from '../../coordinator/score-step.ts';
import { WORKER_MESSAGE_MAX_BYTES, workerMessageLimit } from '../../core/worker-protocol.ts';
import { isWeftError } from '../../core/errors.ts';

test('checkFullRows refuses full rows past one message, naming the most tokens that fit', () => {
  const vocab = 32000;
  assert.equal(FULL_ROWS_MAX_BYTES, 63 * 2 ** 20);
  const most = Math.floor(FULL_ROWS_MAX_BYTES / ((vocab + 1) * 4)); // a row: its f32 entries and the token's log-prob
  assert.equal(most, 516);
  checkFullRows(most, vocab);
  assert.throws(() => checkFullRows(most + 1, vocab), (err: unknown) => {
    assert.ok(isWeftError(err) && err.code === 'WEFT_BAD_REQUEST');
    assert.match(err.message, /full log-prob rows for 517 tokens of a 32000-token vocabulary are 63\.1 MiB, over the 63 MiB .* at most 516 tokens/);
    return true;
  });
  // 20 alternatives a token take 160 bytes of each row too
  assert.throws(() => checkFullRows(most, vocab, 20), /at most 515 tokens/);
});

test('workerMessageLimit fits a speculative round of every sequence, and never goes below the default', () => {
  assert.equal(workerMessageLimit(16 * 5, 4096), WORKER_MESSAGE_MAX_BYTES); // the default model's rounds fit
  const rows = 256 * 5; // 256 sequences, k = 4: five rows each
  const limit = workerMessageLimit(rows, 128256); // Llama 3's vocabulary: 656 MB of rows
  assert.ok(limit >= rows * 128256 * 4 + (1 << 20), `limit ${limit}`);
  assert.ok(limit < rows * 128256 * 4 + (8 << 20), `limit ${limit} is the rows and a margin, not unbounded`);
});
