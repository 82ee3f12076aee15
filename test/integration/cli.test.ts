/**
 * The CLI contract, end to end through real processes: `weft generate`, `weft score`, and every kind of bad
 * input ending in a non-zero exit, one line on stderr naming the problem, and no process left behind.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type AddressInfo } from 'node:net';
import { spawnSync } from 'node:child_process';
import { WEFT_BIN, fixtureDir, readReference } from '../helpers/fixtures.ts';
import { runWeft, type CliResult } from '../helpers/cli.ts';
import { declarationsOf, type CommandName } from '../../coordinator/config.ts';

const llama = fixtureDir('llama-tiny');
const reference = readReference('llama-tiny');
const prompt0 = reference.prompts[0]!.join(',');

function assertCleanFailure(result: CliResult, pattern: RegExp): void {
  assert.notEqual(result.code, 0, `expected a failure, got exit 0; stdout: ${result.stdout}`);
  const lines = result.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line on stderr, got: ${result.stderr}`);
  assert.match(lines[0]!, pattern);
  assert.deepEqual(result.leftover, [], 'no worker process left behind');
}

describe('weft generate / score', () => {
  test('--json greedy tokens equal Hugging Face, TP=1 and TP=2', async () => {
    for (const tp of ['1', '2']) {
      const result = await runWeft(['generate', '--model', llama, '--tp', tp, '--prompt-ids', prompt0, '--max-new-tokens', '10', '--ignore-eos', '--json']);
      assert.equal(result.code, 0, result.stderr);
      const out = JSON.parse(result.stdout) as { tokens: number[]; text: string };
      assert.deepEqual(out.tokens, reference.greedy[0]!.slice(0, 10));
      assert.equal(typeof out.text, 'string');
      assert.deepEqual(result.leftover, []);
    }
  });

  test('a text prompt streams text; EOS stops generation', async () => {
    const result = await runWeft(['generate', '--model', llama, '--prompt', 'hello world', '--max-new-tokens', '5']);
    assert.equal(result.code, 0, result.stderr);
    assert.ok(result.stdout.endsWith('\n'));
    assert.equal(result.stderr, '', 'off a terminal, a load that ends within 2 s shows no progress lines');
    // reference greedy 0 hits EOS (id 1) as its third token: without --ignore-eos generation stops there
    const stopped = await runWeft(['generate', '--model', llama, '--prompt-ids', prompt0, '--max-new-tokens', '10', '--json']);
    const out = JSON.parse(stopped.stdout) as { tokens: number[]; finishReason: string };
    assert.deepEqual(out.tokens, reference.greedy[0]!.slice(0, 3));
    assert.equal(out.finishReason, 'stop');
  });

  test('same seed, same tokens; sampling at TP=2 equals TP=1', async () => {
    const args = ['generate', '--model', llama, '--prompt-ids', prompt0, '--max-new-tokens', '12', '--temperature', '1.5', '--top-k', '50', '--top-p', '0.95', '--ignore-eos', '--json'];
    const a = JSON.parse((await runWeft([...args, '--seed', '7'])).stdout) as { tokens: number[] };
    const b = JSON.parse((await runWeft([...args, '--seed', '7', '--tp', '2'])).stdout) as { tokens: number[] };
    const c = JSON.parse((await runWeft([...args, '--seed', '8'])).stdout) as { tokens: number[] };
    assert.equal(a.tokens.length, 12);
    assert.deepEqual(a.tokens, b.tokens);
    assert.notDeepEqual(a.tokens, c.tokens, 'a different seed gives different samples (at temperature 1.5 over 12 tokens)');
  });

  test('score --json: entry 0 null, then log-probs', async () => {
    const result = await runWeft(['score', '--model', llama, '--ids', prompt0, '--json']);
    assert.equal(result.code, 0, result.stderr);
    const { logprobs } = JSON.parse(result.stdout) as { logprobs: (number | null)[] };
    assert.equal(logprobs.length, reference.prompts[0]!.length);
    assert.equal(logprobs[0], null);
    for (const lp of logprobs.slice(1)) assert.ok(typeof lp === 'number' && lp < 0 && lp > -20);
  });
});

describe('bad input: clear error, non-zero exit, nothing left running', () => {
  let scratch: string;
  const copyModel = (name: string): string => {
    const dir = join(scratch, name);
    cpSync(llama, dir, { recursive: true });
    return dir;
  };
  before(() => {
    scratch = mkdtempSync(join(tmpdir(), 'weft-cli-'));
  });
  after(() => rmSync(scratch, { recursive: true, force: true }));

  test('a missing model directory', async () => {
    const result = await runWeft(['generate', '--model', join(scratch, 'nope'), '--prompt', 'hi']);
    assertCleanFailure(result, /WEFT_BAD_MODEL.*nope/);
    assert.equal(result.code, 78, 'configuration errors exit with EX_CONFIG, which pm2 does not restart');
  });

  test('missing weights', async () => {
    const dir = copyModel('no-weights');
    rmSync(join(dir, 'model.safetensors'));
    assertCleanFailure(await runWeft(['generate', '--model', dir, '--prompt', 'hi']), /WEFT_BAD_WEIGHTS.*model\.safetensors/);
  });

  test('a truncated safetensors file', async () => {
    const dir = copyModel('truncated');
    const file = join(dir, 'model.safetensors');
    truncateSync(file, Math.floor(statSync(file).size / 2));
    assertCleanFailure(await runWeft(['generate', '--model', dir, '--prompt', 'hi', '--tp', '2']), /WEFT_BAD_WEIGHTS.*(truncat|past the end|end of)/i);
  });

  test('a tensor of the wrong shape', async () => {
    const dir = copyModel('bad-shape');
    const file = join(dir, 'model.safetensors');
    const bytes = readFileSync(file);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, { shape: number[] }>;
    header['model.norm.weight']!.shape = [32, 2]; // same byte count, wrong shape
    let json = JSON.stringify(header);
    json += ' '.repeat((8 - (json.length % 8)) % 8);
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(json.length));
    writeFileSync(file, Buffer.concat([prefix, Buffer.from(json), bytes.subarray(8 + headerLength)]));
    assertCleanFailure(await runWeft(['generate', '--model', dir, '--prompt', 'hi']), /WEFT_BAD_WEIGHTS.*model\.norm\.weight.*64.*32, ?2|WEFT_BAD_WEIGHTS.*model\.norm\.weight/);
  });

  test('an unsupported architecture', async () => {
    const dir = copyModel('gpt2');
    const config = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...config, architectures: ['GPT2LMHeadModel'], model_type: 'gpt2' }));
    assertCleanFailure(await runWeft(['generate', '--model', dir, '--prompt', 'hi']), /WEFT_UNSUPPORTED_MODEL.*GPT2LMHeadModel/);
  });

  test('a TP degree that cannot split the model', async () => {
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--tp', '3']), /WEFT_BAD_SHARD.*3/);
  });

  test('a prompt longer than the context', async () => {
    const ids = Array.from({ length: 600 }, (_, i) => 2 + (i % 400)).join(',');
    const result = await runWeft(['generate', '--model', llama, '--prompt-ids', ids]);
    assertCleanFailure(result, /WEFT_BAD_REQUEST: prompt of 600 tokens exceeds the model's context of 512 tokens$/);
    assert.equal(result.code, 1, 'a bad request is not a configuration error');
    // the --max-context cap (here from its variable) is named when it is what limits
    const hundred = ids.split(',').slice(0, 100).join(',');
    const capped = await runWeft(['generate', '--model', llama, '--prompt-ids', hundred], { env: { WEFT_MAX_CONTEXT: '64' } });
    assertCleanFailure(capped, /WEFT_BAD_REQUEST: prompt of 100 tokens exceeds the --max-context cap of 64 tokens$/);
    const room = await runWeft(['generate', '--model', llama, '--prompt-ids', hundred, '--max-context', '512', '--max-new-tokens', '2', '--json'], { env: { WEFT_MAX_CONTEXT: '64' } });
    assert.equal(room.code, 0, `the flag wins over WEFT_MAX_CONTEXT: ${room.stderr}`);
  });

  test('--prompt and --prompt-ids together are refused naming both; a bad WEFT_* value names the variable; exit 78', async () => {
    const both = await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--prompt-ids', '1,2']);
    assertCleanFailure(both, /^weft: WEFT_BAD_CONFIG: --prompt and --prompt-ids were both given: give one of them$/);
    assert.equal(both.code, 78);
    const badEnv = await runWeft(['generate', '--model', llama, '--prompt', 'hi'], { env: { WEFT_TP: 'two' } });
    assertCleanFailure(badEnv, /^weft: WEFT_BAD_CONFIG: WEFT_TP must be an integer >= 1, got "two"$/);
    assert.equal(badEnv.code, 78);
  });

  test('a bad option value names the option and the value, before any worker starts; exit 78', async () => {
    const result = await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--tp', 'two']);
    assertCleanFailure(result, /^weft: WEFT_BAD_CONFIG: --tp must be an integer >= 1, got "two"$/);
    assert.equal(result.code, 78, 'a flag the operator set is configuration: pm2 must not restart it');
    const fromEnv = await runWeft(['serve', '--model', llama, '--rpc-port', '0', '--http-port', '0'], { env: { WEFT_WORKER_STDERR: 'loud' } });
    assertCleanFailure(fromEnv, /^weft: WEFT_BAD_CONFIG: WEFT_WORKER_STDERR must be one of tail, inherit, got "loud"/);
    assert.equal(fromEnv.code, 78);
  });

  test("vLLM's flag names carry over (--tensor-parallel-size, --max-model-len, --max-num-seqs); a bad value names the spelling used; both spellings are refused", async () => {
    const args = ['generate', '--model', llama, '--prompt-ids', prompt0, '--max-new-tokens', '6', '--ignore-eos', '--json'];
    const aliased = await runWeft([...args, '--tensor-parallel-size', '2', '--max-model-len', '256', '--max-num-seqs', '2']);
    assert.equal(aliased.code, 0, aliased.stderr);
    assert.deepEqual((JSON.parse(aliased.stdout) as { tokens: number[] }).tokens, reference.greedy[0]!.slice(0, 6));
    assert.deepEqual(aliased.leftover, []);
    const capped = await runWeft([...args, '--max-model-len', '4']);
    assertCleanFailure(capped, /--max-context cap of 4 tokens/);
    const bad = await runWeft([...args, '--tensor-parallel-size', 'two']);
    assertCleanFailure(bad, /^weft: WEFT_BAD_CONFIG: --tensor-parallel-size must be an integer >= 1, got "two"$/);
    assert.equal(bad.code, 78);
    const both = await runWeft([...args, '--tp', '1', '--tensor-parallel-size', '2']);
    assertCleanFailure(both, /^weft: WEFT_BAD_CONFIG: --tp and --tensor-parallel-size are the same option; give one$/);
  });

  test('--quantize-lm-head without --quantize names both flags', async () => {
    const result = await runWeft(['generate', '--model', llama, '--prompt-ids', prompt0, '--quantize-lm-head']);
    assertCleanFailure(result, /^weft: WEFT_BAD_MODEL: --quantize-lm-head .*--quantize is not set$/);
  });

  test('invalid sampling parameters', async () => {
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--temperature', '-1']), /temperature/);
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--top-p', '0']), /top.?p/i);
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--top-k', '-3']), /top-k/);
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt', 'hi', '--top-k', '100000']), /top.?k/i);
    assertCleanFailure(await runWeft(['generate', '--model', llama, '--prompt-ids', '1,2,x']), /entry 2/);
  });
});

describe('weft serve: configuration errors exit 78 (EX_CONFIG, in pm2 stop_exit_codes) with one line', () => {
  let scratch: string;
  before(() => {
    scratch = mkdtempSync(join(tmpdir(), 'weft-cli-serve-'));
  });
  after(() => rmSync(scratch, { recursive: true, force: true }));
  const serveArgs = (model: string, ...more: string[]): string[] => ['serve', '--model', model, '--tp', '2', '--threads', '1', ...more];

  test('truncated weights: the worker error, no re-form attempts', async () => {
    const dir = join(scratch, 'truncated');
    cpSync(llama, dir, { recursive: true });
    const file = join(dir, 'model.safetensors');
    truncateSync(file, Math.floor(statSync(file).size / 2));
    const result = await runWeft(serveArgs(dir, '--rpc-port', '0', '--http-port', '0'));
    assertCleanFailure(result, /^weft: WEFT_BAD_WEIGHTS: .*(truncat|past the end|end of)/i);
    assert.equal(result.code, 78);
  });

  test('a non-loopback --host without CURVE keys and an API key', async () => {
    const result = await runWeft(serveArgs(llama, '--host', '0.0.0.0', '--rpc-port', '0', '--http-port', '0'));
    assertCleanFailure(result, /^weft: WEFT_BAD_CONFIG: serving on 0\.0\.0\.0 \(not loopback\) needs CURVE keys/);
    assert.equal(result.code, 78);
  });

  test('a busy RPC or HTTP port names the socket and its endpoint', async () => {
    const busy = createServer();
    await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
    const { port } = busy.address() as AddressInfo;
    try {
      const rpc = await runWeft(serveArgs(llama, '--rpc-port', String(port), '--http-port', '0'));
      assertCleanFailure(rpc, new RegExp(`^weft: WEFT_ADDRESS_IN_USE: cannot listen on tcp://127\\.0\\.0\\.1:${port} \\(RPC\\): address already in use$`));
      assert.equal(rpc.code, 78);
      const http = await runWeft(serveArgs(llama, '--rpc-port', '0', '--http-port', String(port)));
      assertCleanFailure(http, new RegExp(`^weft: WEFT_ADDRESS_IN_USE: cannot listen on http://127\\.0\\.0\\.1:${port} \\(HTTP\\): address already in use$`));
      assert.equal(http.code, 78);
    } finally {
      busy.close();
    }
  });
});

test('weft --version and -V print the version of package.json', async () => {
  const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  for (const flag of ['--version', '-V']) {
    const result = await runWeft([flag]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `${version}\n`);
  }
});

test('weft status without --name and no cluster running says so', async () => {
  const home = mkdtempSync(join(tmpdir(), 'weft-cli-status-'));
  try {
    const result = await runWeft(['status'], { env: { WEFT_HOME: home } });
    assertCleanFailure(result, new RegExp(`^weft: WEFT_BAD_REQUEST: no launched cluster is running \\(none under pm2 from ${home}\\); start one with weft launch$`));
    assert.equal(result.code, 1);
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
});

test('on a terminal, weft generate draws the load progress bar and its closing line', { skip: spawnSync('script', ['--version']).status !== 0 && 'no script(1) to give it a terminal' }, () => {
  // script(1) runs the command on a pseudo-terminal; its output is the terminal's (stdout and stderr together)
  const command = [process.execPath, WEFT_BIN, 'generate', '--model', llama, '--tp', '2', '--prompt-ids', prompt0, '--max-new-tokens', '2'].map((arg) => `'${arg}'`).join(' ');
  const result = spawnSync('script', ['-qec', command, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(result.status, 0, result.stdout);
  assert.match(result.stdout, /\rweft: loading weights \[[#.]{30}\] +\d+% [\d.]+\/[\d.]+ MiB, [12]\/2 ranks/);
  assert.match(result.stdout, /\rweft: loaded [\d.]+ MiB of weights on 2 ranks in [\d.]+ s\x1b\[K\r?\n/);
});

test("each command's help lists exactly its declared flags", async () => {
  const commands: CommandName[] = ['generate', 'score', 'serve', 'launch', 'status', 'logs', 'stop', 'keygen', 'worker', 'doctor'];
  for (const command of commands) {
    const help = await runWeft([command, '--help']);
    assert.equal(help.code, 0, help.stderr);
    const offered = [...help.stdout.matchAll(/^ {2}(--[a-z][a-z0-9-]*)/gm)].map((m) => m[1]).filter((flag) => flag !== '--help');
    const declared = declarationsOf(command).flatMap(([, decl]) => (decl.flag === undefined ? [] : [decl.flag]));
    assert.deepEqual(offered.sort(), declared.sort(), command);
    if (command === 'score') assert.ok(!help.stdout.includes('--draft') && !help.stdout.includes('--speculate-k'), 'a draft model does not apply to scoring');
  }
});
