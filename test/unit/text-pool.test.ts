/**
 * The text threads (coordinator/text-pool.ts): the same ids and text as the tokenizer on this thread, the event
 * loop free while a thread tokenizes, a call over its budget answered with WEFT_TIMEOUT and its thread replaced,
 * a thread that dies replaced, a full queue refused with WEFT_BUSY, templates refused at start-up, and shutdown:
 * close() ends even a thread stuck in a template, and an idle pool never closed does not hold the process.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TextPool, type TextPoolOptions } from '../../coordinator/text-pool.ts';
import { ChatTemplate } from '../../coordinator/chat-template.ts';
import { loadTokenizer } from '../../coordinator/tokenizer.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir } from '../helpers/fixtures.ts';

const LLAMA = fixtureDir('llama-tiny');
/** Renders each message's content, a user's after a loop over (its length)² that prints nothing: quick on the probe, a minute on 3000 characters. */
const QUADRATIC = "{% for m in messages %}{% if m['role'] == 'user' %}{% for i in range(m['content']|length) %}{% for j in range(m['content']|length) %}{% endfor %}{% endfor %}{% endif %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}";

/** A copy of llama-tiny's tokenizer files, with `chatTemplate` in tokenizer_config.json when given. */
function modelWith(chatTemplate?: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'weft-text-pool-'));
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'config.json']) copyFileSync(join(LLAMA, f), join(dir, f));
  if (chatTemplate !== undefined) {
    const config = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...config, chat_template: chatTemplate }));
  }
  return dir;
}

async function withPool(options: Partial<TextPoolOptions>, body: (pool: TextPool) => Promise<void>): Promise<void> {
  const pool = await TextPool.start({ modelDir: LLAMA, threads: 1, budgetMs: 10_000, maxQueue: 8, ...options });
  try {
    await body(pool);
  } finally {
    await pool.close();
  }
}

const weftError = (code: string, pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === code && pattern.test(err.message);

test('encode, decode and chat give what the tokenizer and template give on this thread; each thread loads once', async () => {
  const dir = modelWith(QUADRATIC);
  try {
    const tokenizer = loadTokenizer(dir);
    await withPool({ modelDir: dir, threads: 2, chatTemplate: true }, async (pool) => {
      const threads = pool.threadIds();
      assert.equal(threads.length, 2);
      assert.equal(pool.hasChatTemplate, true);
      const text = 'Grüße 👋, the quick brown fox';
      assert.deepEqual(await pool.encode(text), tokenizer.encode(text));
      assert.deepEqual(await pool.encode(text, { addBos: false }), tokenizer.encode(text, { addBos: false }));
      const ids = tokenizer.encode(text);
      assert.equal(await pool.decode(ids), tokenizer.decode(ids));
      assert.equal(await pool.decode(ids, { skipSpecial: false }), tokenizer.decode(ids, { skipSpecial: false }));
      const messages = [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hello' }];
      const rendered = ChatTemplate.load(dir)!.render(messages);
      assert.deepEqual(await pool.chatPromptIds(messages, { maxChars: 1000 }), tokenizer.encode(rendered, { addBos: false }));
      await assert.rejects(pool.chatPromptIds(messages, { maxChars: 10 }), weftError('WEFT_BAD_REQUEST', /is \d+ characters long; the limit is 10/));
      await assert.rejects(pool.encode(text, { maxTokens: 3 }), weftError('WEFT_BAD_REQUEST', /prompt of \d+ tokens exceeds the model's context of 3 tokens/));
      const capped = { maxTokens: 3, contextName: 'the --max-context cap of 3 tokens' };
      await assert.rejects(pool.chatPromptIds(messages, { maxChars: 1000, ...capped }), weftError('WEFT_BAD_REQUEST', /prompt of \d+ tokens exceeds the --max-context cap of 3 tokens$/));
      await assert.rejects(pool.decode([5, 100_000]), weftError('WEFT_BAD_REQUEST', /token id 100000 at index 1/));
      assert.deepEqual(await Promise.all([1, 2, 3, 4].map((n) => pool.encode('x'.repeat(n)))), [1, 2, 3, 4].map((n) => tokenizer.encode('x'.repeat(n))));
      assert.deepEqual(pool.threadIds(), threads, 'errors are answers: no thread was replaced');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the event loop stays free while a thread tokenizes a 1 MB text', async () => {
  // a budget far above the work (about a second here, 8 s seen on a loaded machine): this test is about the loop
  await withPool({ budgetMs: 120_000 }, async (pool) => {
    await pool.encode('warm up');
    let worstLagMs = 0;
    let last = performance.now();
    const ticker = setInterval(() => {
      const now = performance.now();
      worstLagMs = Math.max(worstLagMs, now - last - 10);
      last = now;
    }, 10);
    const started = performance.now();
    let ids: number[];
    try {
      ids = await pool.encode('The quick brown fox jumps over the lazy dog. '.repeat(23_000));
    } finally {
      clearInterval(ticker); // also when encode throws: a live interval keeps the test process from ending
    }
    const tookMs = performance.now() - started;
    assert.ok(ids.length > 200_000);
    // the same work on this thread takes about a second (tokenizer.ts: ~2 µs a character), and blocks the loop for
    // all of it; on a loaded CI machine the thread's work stretches (8 s seen) and timer lag grows with the load, so
    // the bound is 150 ms or an eighth of the work, whichever is more: far below the whole work either way
    const boundMs = Math.max(150, tookMs / 8);
    assert.ok(worstLagMs < boundMs, `the event loop lagged ${worstLagMs.toFixed(0)} ms while the thread worked ${tookMs.toFixed(0)} ms (bound ${boundMs.toFixed(0)} ms)`);
  });
});

test('a call over its budget is answered with WEFT_TIMEOUT naming the budget, at the budget; its thread is replaced', async () => {
  const dir = modelWith(QUADRATIC);
  try {
    await withPool({ modelDir: dir, threads: 1, budgetMs: 500, chatTemplate: true }, async (pool) => {
      const [before] = pool.threadIds();
      const started = performance.now();
      // (3000)² loop turns: about a minute of rendering
      await assert.rejects(
        pool.chatPromptIds([{ role: 'user', content: 'x'.repeat(3000) }], { maxChars: 1 << 20 }),
        weftError('WEFT_TIMEOUT', /rendering the chat template for 1 messages took longer than the text threads' budget of 500 ms/),
      );
      const tookMs = performance.now() - started;
      assert.ok(tookMs >= 490 && tookMs < 2500, `refused after ${tookMs.toFixed(0)} ms`);
      assert.deepEqual(await pool.encode('hi', { addBos: false }), loadTokenizer(dir).encode('hi', { addBos: false }), 'the replacement thread answers');
      const [after] = pool.threadIds();
      assert.equal(pool.threadIds().length, 1);
      assert.notEqual(after, before, 'the thread that ran over was replaced');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a thread that dies (out of memory) fails its call with WEFT_WORKER_ERROR and is replaced', async () => {
  await withPool({ maxThreadMemoryMb: 24 }, async (pool) => {
    const [before] = pool.threadIds();
    await assert.rejects(pool.encode('abc '.repeat(2_000_000)), weftError('WEFT_WORKER_ERROR', /the text thread died while tokenizing a text of 8000000 characters: .*memory/));
    assert.deepEqual(await pool.encode('hi'), loadTokenizer(LLAMA).encode('hi'));
    assert.notEqual(pool.threadIds()[0], before);
  });
});

test('a full queue is refused at once with WEFT_BUSY; close() fails what waits with WEFT_CLOSED and ends a stuck thread', async () => {
  const dir = modelWith(QUADRATIC);
  try {
    const pool = await TextPool.start({ modelDir: dir, threads: 1, budgetMs: 60_000, maxQueue: 1, chatTemplate: true });
    const stuck = pool.chatPromptIds([{ role: 'user', content: 'x'.repeat(3000) }], { maxChars: 1 << 20 });
    const queued = pool.encode('queued');
    assert.equal(pool.waiting, 1);
    await assert.rejects(pool.encode('one too many'), weftError('WEFT_BUSY', /text threads are busy: 1 calls wait for one already \(the queue holds 1\)/));
    const refused = [assert.rejects(stuck, weftError('WEFT_CLOSED', /closed/)), assert.rejects(queued, weftError('WEFT_CLOSED', /closed/))];
    const started = performance.now();
    await pool.close();
    assert.ok(performance.now() - started < 2000, `close took ${(performance.now() - started).toFixed(0)} ms`);
    await Promise.all(refused);
    await assert.rejects(pool.encode('after'), weftError('WEFT_CLOSED', /closed/));
    assert.deepEqual(pool.threadIds(), []);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('start-up refuses a missing tokenizer, a template that does not parse, and one that is slow on the probe', async () => {
  const empty = mkdtempSync(join(tmpdir(), 'weft-text-pool-'));
  const broken = modelWith('{% for %}');
  const endless = modelWith('{% for i in range(100000000) %}{% endfor %}');
  try {
    await assert.rejects(TextPool.start({ modelDir: empty, threads: 2, budgetMs: 1000, maxQueue: 1 }), weftError('WEFT_BAD_MODEL', /tokenizer\.json/));
    await assert.rejects(TextPool.start({ modelDir: broken, threads: 1, budgetMs: 1000, maxQueue: 1, chatTemplate: true }), weftError('WEFT_BAD_MODEL', /chat_template does not parse/));
    const started = performance.now();
    await assert.rejects(
      TextPool.start({ modelDir: endless, threads: 1, budgetMs: 60_000, maxQueue: 1, chatTemplate: true }),
      weftError('WEFT_BAD_MODEL', /rendering the chat template on a 4-message probe took longer than 1000 ms \(budget 200 ms\); refusing it/),
    );
    assert.ok(performance.now() - started < 10_000);
    // without chatTemplate the template is not looked at
    await withPool({ modelDir: broken }, async (pool) => assert.equal(pool.hasChatTemplate, false));
  } finally {
    for (const dir of [empty, broken, endless]) rmSync(dir, { recursive: true, force: true });
  }
});

test('an idle pool that is never closed does not keep the process alive', () => {
  const script = `
    import { TextPool } from ${JSON.stringify(new URL('../../coordinator/text-pool.ts', import.meta.url).href)};
    const pool = await TextPool.start({ modelDir: ${JSON.stringify(LLAMA)}, threads: 2, budgetMs: 1000, maxQueue: 1 });
    console.log(JSON.stringify(await pool.encode('hi')));
  `;
  const started = Date.now();
  const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(child.status, 0, child.stderr);
  assert.deepEqual(JSON.parse(child.stdout), loadTokenizer(LLAMA).encode('hi'));
  assert.ok(Date.now() - started < 20_000);
});
