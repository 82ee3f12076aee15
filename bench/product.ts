/**
 * The product path's speed, beside its floor: the real `weft generate` (batch 1) and `weft serve` (N concurrent
 * streaming completions) on a model directory, as users run them:
 *
 *   node --import tsx bench/product.ts --model /tmp/llama-2-7b --name llama-2-7b --new-tokens 200 --concurrency 8,64 \
 *     [--bandwidth GBS] [--in-process decode.log] [--anchor gptfast.jsonl] [--out bench-product.jsonl]
 *
 * - generate: one `weft generate --json` process, a 5-token prompt (ids, BOS first), EOS ignored, --max-context
 *   as bench/decode.ts sizes its KV cache; its own decode tok/s and TTFT (a fresh process: the first decode
 *   step's graph capture is inside its figure).
 * - serve: one `weft serve` process on free ports (--kv-slots = the largest concurrency), per concurrency C one
 *   untimed warm-up round, then C streams at once from node's fetch; tok/s = generated tokens / the phase's wall
 *   time (prefills and ramp included), TTFT = the median time to a stream's first text; "steady" = chunks per
 *   second while all C streams were decoding. The server is stopped with SIGTERM and no process of it may remain.
 * - in-process and gpt-fast rows come from files: bench/decode.ts's output (its last JSON line) and
 *   bench/anchor/run_gptfast.py's JSON lines, measured in the same call by bench/product.sh.
 * Floor: the bytes a decode step reads (bench/step-bytes.ts) at the mean context of the run, at the read
 * bandwidth (--bandwidth, else weft's probe in a child process; none on the CPU). Each row is appended to --out
 * as one JSON line; a markdown table ends the run.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { appendFileSync, readFileSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { Command } from 'commander';
import { readModelSpec } from '../core/model-spec.ts';
import { planShards } from '../core/shard-plan.ts';
import { concurrentStreams, runGenerate, startServe } from './product-serve.ts';
import { floorMs, stepBytes } from './step-bytes.ts';
import { kvDtypeBytes, resolveKvDtype, type KvDtypeOption } from '../core/kv-block-table.ts';
import { productTable, type ProductPath, type ProductRow } from './product-table.ts';

const PATH_ORDER: readonly ProductPath[] = ['in-process', 'generate', 'serve', 'gpt-fast'];

const list = (s: string): number[] => s.split(',').map((x) => x.trim()).filter(Boolean).map(Number);
const opts = new Command('bench-product')
  .requiredOption('--model <dir>', 'Hugging Face model directory (bench/make-checkpoint.py writes one)')
  .option('--name <label>', 'model label in the rows (default: the directory name)')
  .option('--device <d>', 'cpu or cuda', 'cuda')
  .option('--prompt-tokens <n>', 'prompt length in tokens, BOS first', '5')
  .option('--new-tokens <n>', 'tokens generated per sequence', '200')
  .option('--concurrency <list>', 'concurrent streams against weft serve; empty: no serve run', '8,64')
  .option('--no-generate', 'skip weft generate')
  .option('--bandwidth <GBs>', 'read bandwidth for the floors (default: weft\'s probe; none on the CPU)')
  .option('--in-process <file>', 'bench/decode.ts output whose rows (at --prompt-tokens) join the table')
  .option('--anchor <file>', 'run_gptfast.py JSON lines whose figures join the table')
  .option('--kv-dtype <d>', 'the weft commands\' KV cache (auto: bf16 on cuda, f32 on cpu), also the floors\' KV bytes', 'auto')
  .option('--weft-args <args>', 'extra flags for both weft commands, space-separated', '')
  .option('--timeout-s <n>', 'limit on each weft process start (weights load) and run', '600')
  .option('--out <file>', 'JSON lines appended here', 'bench-product.jsonl')
  .parse()
  .opts<{ model: string; name?: string; device: 'cpu' | 'cuda'; promptTokens: string; newTokens: string; concurrency: string; generate: boolean; kvDtype: string; bandwidth?: string; inProcess?: string; anchor?: string; weftArgs: string; timeoutS: string; out: string }>();

const modelDir = resolve(opts.model);
const model = opts.name ?? basename(modelDir);
const promptTokens = Number(opts.promptTokens);
const newTokens = Number(opts.newTokens);
const concurrency = list(opts.concurrency);
const timeoutMs = Number(opts.timeoutS) * 1000;
const kvDtype = resolveKvDtype(opts.kvDtype as KvDtypeOption, opts.device);
const extraArgs = ['--kv-dtype', kvDtype, ...opts.weftArgs.split(/\s+/).filter(Boolean)];
const spec = readModelSpec(modelDir);
const bytes = stepBytes(spec, planShards(spec, 1), 0, kvDtypeBytes(kvDtype));
// BOS, then fixed ids spread over the vocabulary: the same prompt for every path and run
const promptIds = [spec.bosTokenId ?? 0, ...Array.from({ length: promptTokens - 1 }, (_, i) => Math.floor(((i + 1) * spec.vocabSize) / (promptTokens + 1)))];
const meanContext = promptTokens + newTokens / 2;
// the KV cache per sequence that bench/decode.ts gives its in-process runs (what a run needs, and a little)
const maxContext = promptTokens + newTokens + 16;

function commandLine(file: string, args: string[]): string | null {
  const result = spawnSync(file, args, { encoding: 'utf8' });
  return result.status === 0 ? result.stdout.trim().split('\n')[0]! : null;
}
const gpu = opts.device === 'cuda' ? (commandLine('nvidia-smi', ['--query-gpu=name', '--format=csv,noheader']) ?? 'unknown GPU') : 'cpu';
const commit = process.env.WEFT_COMMIT ?? commandLine('git', ['rev-parse', 'HEAD']) ?? 'unknown';
const bandwidthGBs = opts.bandwidth ? Number(opts.bandwidth) : opts.device === 'cuda' ? measureBandwidth() : NaN;

function measureBandwidth(): number {
  const out = execFileSync(process.execPath, ['--import', 'tsx', new URL('./bandwidth.ts', import.meta.url).pathname], { encoding: 'utf8' });
  return (JSON.parse(out.trim().split('\n').at(-1)!) as { bandwidthGBs: number }).bandwidthGBs;
}

const rows: ProductRow[] = [];
// null without a bandwidth (the CPU)
const floorOf = (batch: number): number | null => (Number.isFinite(bandwidthGBs) ? floorMs(bytes.bytesPerStep(batch, meanContext), bandwidthGBs) : null);
const elapsed = (since: number): string => `${((performance.now() - since) / 1000).toFixed(1)} s`;

function readInProcess(file: string): void {
  const json = readFileSync(file, 'utf8').trim().split('\n').filter((l) => l.startsWith('{"bench":"decode"')).at(-1);
  if (json === undefined) throw new Error(`${file} holds no bench/decode.ts result line`);
  const result = JSON.parse(json) as { rows: { batch: number; prompt: number; ttftMs: number; tokensPerS: number; bytesPerStep: number }[] };
  for (const r of result.rows.filter((r) => r.prompt === promptTokens))
    rows.push({ model, batch: r.batch, path: 'in-process', tokensPerS: r.tokensPerS, ttftMs: r.ttftMs, floorMs: Number.isFinite(bandwidthGBs) ? floorMs(r.bytesPerStep, bandwidthGBs) : null, anchorTokensPerS: null });
}

function readAnchor(file: string): void {
  const lines = readFileSync(file, 'utf8').split('\n').filter((l) => l.startsWith('{"system": "gpt-fast"'));
  if (lines.length === 0) throw new Error(`${file} holds no run_gptfast.py result line`);
  for (const line of lines) {
    const r = JSON.parse(line) as { batch: number; tok_s: number };
    // run_gptfast.py counts tokens per sequence; the row counts all of the batch's
    rows.push({ model, batch: r.batch, path: 'gpt-fast', tokensPerS: r.tok_s * r.batch, ttftMs: null, floorMs: floorOf(r.batch), anchorTokensPerS: null });
  }
}

async function measureGenerate(): Promise<void> {
  const started = performance.now();
  const args = ['--model', modelDir, '--device', opts.device, '--prompt-ids', promptIds.join(','), '--max-new-tokens', String(newTokens), '--ignore-eos', '--max-context', String(maxContext), ...extraArgs];
  const figures = await runGenerate(args, timeoutMs);
  if (figures.tokens !== newTokens) throw new Error(`weft generate made ${figures.tokens} tokens, not ${newTokens}`);
  rows.push({ model, batch: 1, path: 'generate', tokensPerS: figures.decodeTokensPerS, ttftMs: figures.timeToFirstTokenS * 1000, floorMs: floorOf(1), anchorTokensPerS: null, loadS: figures.processS });
  console.log(`generate: ${figures.decodeTokensPerS.toFixed(1)} tok/s, TTFT ${(figures.timeToFirstTokenS * 1000).toFixed(1)} ms (process ${figures.processS.toFixed(1)} s; stage ${elapsed(started)})`);
}

async function measureServe(): Promise<void> {
  const started = performance.now();
  const slots = Math.max(...concurrency);
  const args = ['--model', modelDir, '--device', opts.device, '--kv-slots', String(slots), '--max-queue', String(2 * slots), '--max-context', String(maxContext), ...extraArgs];
  const server = await startServe(args, timeoutMs);
  console.log(`serve: ready at ${server.url} in ${server.readyS.toFixed(1)} s`);
  let failure: unknown = null;
  try {
    for (const c of concurrency) {
      const phase = performance.now();
      await concurrentStreams(server.url, promptIds, Math.min(16, newTokens), c); // warm-up: graph capture, first-use allocations
      const f = await concurrentStreams(server.url, promptIds, newTokens, c);
      if (f.tokens !== c * newTokens) throw new Error(`serve x${c} generated ${f.tokens} tokens, not ${c * newTokens}`);
      rows.push({ model, batch: c, path: 'serve', tokensPerS: f.tokensPerS, ttftMs: f.p50TtftMs, floorMs: floorOf(c), anchorTokensPerS: null, steadyTokensPerS: f.steadyTokensPerS, loadS: server.readyS });
      console.log(`serve x${c}: ${f.tokensPerS.toFixed(1)} tok/s (steady ${f.steadyTokensPerS.toFixed(1)}), p50 TTFT ${f.p50TtftMs.toFixed(1)} ms, ${f.tokens} tokens in ${f.wallS.toFixed(2)} s (stage ${elapsed(phase)})`);
    }
  } catch (err) {
    failure = err;
  }
  const stopped = await server.stop();
  console.log(`serve: stopped, exit code ${stopped.exitCode}${stopped.leftover ? ', LEFTOVER PROCESSES (killed)' : ', no process left'} (stage ${elapsed(started)})`);
  if (failure !== null) throw failure;
  if (stopped.leftover || stopped.exitCode !== 0) throw new Error(`weft serve did not stop cleanly: exit code ${stopped.exitCode}, leftover processes: ${stopped.leftover}`);
}

function report(): void {
  const anchorAt = new Map(rows.filter((r) => r.path === 'gpt-fast').map((r) => [r.batch, r.tokensPerS]));
  const date = new Date().toISOString();
  rows.sort((a, b) => a.batch - b.batch || PATH_ORDER.indexOf(a.path) - PATH_ORDER.indexOf(b.path));
  for (const row of rows) {
    row.anchorTokensPerS = anchorAt.get(row.batch) ?? null;
    appendFileSync(opts.out, JSON.stringify({ date, gpu, commit, ...row, device: opts.device, promptTokens, newTokens, bandwidthGBs: Number.isFinite(bandwidthGBs) ? bandwidthGBs : null }) + '\n');
  }
  console.log(`\n${model} on ${gpu}, commit ${commit.slice(0, 12)}, prompt ${promptTokens}, ${newTokens} new tokens, read bandwidth ${Number.isFinite(bandwidthGBs) ? bandwidthGBs.toFixed(0) : '-'} GB/s\n`);
  console.log(productTable(rows));
}

const started = performance.now();
if (opts.inProcess) readInProcess(opts.inProcess);
if (opts.anchor) readAnchor(opts.anchor);
try {
  if (opts.generate) await measureGenerate();
  if (concurrency.length > 0) await measureServe();
} finally {
  report();
  console.log(`product bench: ${elapsed(started)}`);
}
