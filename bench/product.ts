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
 *   untimed warm-up round, then C streams at once from node's fetch, each stream and round a prompt of its own (of
 *   --prompt-tokens; identical streams draw identical tokens, and a mixture of experts' steps then read only the
 *   experts one token picks: Mixtral's 8 identical streams ran 1.53x its in-process batch of 8); tok/s = generated
 *   tokens / the phase's wall time (prefills and ramp included), TTFT = the median time to a stream's first text; "steady" = chunks per
 *   second while all C streams were decoding. The server is stopped with SIGTERM and no process of it may remain.
 * - in-process and gpt-fast rows come from files: bench/decode.ts's output (its last JSON line) and
 *   bench/anchor/run_gptfast.py's JSON lines, measured in the same call by bench/product.sh.
 * Floor: the bytes a decode step reads (bench/step-bytes.ts) at the mean context of the run, at the read
 * bandwidth (--bandwidth, else weft's probe in a child process; none on the CPU). Each row is appended to --out
 * as one JSON line; a markdown table ends the run.
 * - serving at scale (--serve-prompt-tokens): the serve streams' prompts are of that length (no prefix-cache hits
 *   between streams or rounds); its row adds TTFT p99 and the roofline of one decode step of
 *   that batch: the bytes of the weights and of the KV at the mean context over the read bandwidth, the FLOPs over
 *   the tensor-core rate (--tensor-tflops), the floor the larger of the two, set beside the steady step time
 *   (batch / steady tok/s).
 */
import { execFileSync } from 'node:child_process';
import { appendFileSync, readFileSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { Command } from 'commander';
import { readModelSpec } from '../core/model-spec.ts';
import { planShards } from '../core/shard-plan.ts';
import { concurrentStreams, runGenerate, runIdentity, startServe } from './product-serve.ts';
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
  .option('--serve-prompt-tokens <n>', 'prompt length of each serve stream, a prompt of its own each (default: --prompt-tokens, one prompt for all)')
  .option('--tensor-tflops <n>', 'dense bf16 tensor-core rate for the compute floor (default 989, an H200\'s; none on the CPU)')
  .option('--new-tokens <n>', 'tokens generated per sequence', '200')
  .option('--concurrency <list>', 'concurrent streams against weft serve; empty: no serve run', '8,64')
  .option('--no-generate', 'skip weft generate')
  .option('--bandwidth <GBs>', 'read bandwidth for the floors (default: weft\'s probe; none on the CPU)')
  .option('--in-process <file>', 'bench/decode.ts output whose rows (at --prompt-tokens) join the table')
  .option('--anchor <file>', 'run_gptfast.py JSON lines whose figures join the table')
  .option('--kv-dtype <d>', 'the weft commands\' KV cache (auto: bf16 on cuda, f32 on cpu), also the floors\' KV bytes', 'auto')
  .option('--weft-args <args>', 'extra flags for both weft commands, space-separated', '')
  .option('--timeout-s <n>', 'limit on each weft process start (weights load) and run, and on each serve stream', '600')
  .option('--out <file>', 'JSON lines appended here', 'bench-product.jsonl')
  .parse()
  .opts<{ model: string; name?: string; device: 'cpu' | 'cuda'; promptTokens: string; servePromptTokens?: string; tensorTflops?: string; newTokens: string; concurrency: string; generate: boolean; kvDtype: string; bandwidth?: string; inProcess?: string; anchor?: string; weftArgs: string; timeoutS: string; out: string }>();

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
const maxContext = promptTokens + 2 * newTokens + 16;
const servePromptTokens = opts.servePromptTokens === undefined ? null : Number(opts.servePromptTokens);
const serveMeanContext = (servePromptTokens ?? promptTokens) + newTokens / 2;
const tensorTflops = opts.tensorTflops ? Number(opts.tensorTflops) : opts.device === 'cuda' ? 989 : NaN;
/** Serve stream `stream`'s prompt in round `round`: BOS, then ids of its own (a fixed stride through the vocabulary). */
const servePrompt = (round: number) => (stream: number): number[] => [
  spec.bosTokenId ?? 0,
  ...Array.from({ length: (servePromptTokens ?? promptTokens) - 1 }, (_, i) => 1 + ((round * 1_000_003 + stream * 7919 + i * 104_729) % (spec.vocabSize - 1))),
];

/** FLOPs of one decode step of `batch` sequences at `context` positions: the projections (2 per weight and row; experts: those a token uses) and attention (QK and PV). */
function stepFlops(batch: number, context: number): number {
  const { hidden, nLayers, nHeads, nKvHeads, headDim, ffnDim, vocabSize, nExpertsPerToken } = spec;
  const attentionWeights = hidden * (2 * nHeads + 2 * nKvHeads) * headDim;
  const ffnWeights = 3 * hidden * ffnDim * Math.max(1, nExpertsPerToken);
  return 2 * batch * (nLayers * (attentionWeights + ffnWeights) + vocabSize * hidden) + 4 * batch * context * nLayers * nHeads * headDim;
}

/** A serve row at scale: TTFT p99 and the decode step's roofline. */
interface ScaleFigures {
  p99TtftMs: number;
  servePromptTokens: number;
  /** what one decode step of the batch at the mean context reads (weights, KV) and computes */
  weightBytes: number;
  kvBytes: number;
  flops: number;
  memoryFloorMs: number | null;
  computeFloorMs: number | null;
  /** the measured step (batch / steady tok/s) and the floor's share of it */
  stepMs: number;
  floorShare: number | null;
}
const scaleRows: (ProductRow & ScaleFigures)[] = [];

const { gpu, commit } = runIdentity(opts.device);
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
  const serveContext = servePromptTokens === null ? maxContext : servePromptTokens + newTokens + 16;
  // cpu: a pool of every slot's full context, as a cuda rank sizes it from --gpu-memory-fraction at most (the cpu's default is 4 contexts)
  const cpuPool = opts.device === 'cpu' ? ['--kv-cache-tokens', String(slots * serveContext)] : [];
  const args = ['--model', modelDir, '--device', opts.device, '--kv-slots', String(slots), '--max-queue', String(2 * slots), '--max-context', String(serveContext), ...cpuPool, ...extraArgs];
  const server = await startServe(args, timeoutMs);
  console.log(`serve: ready at ${server.url} in ${server.readyS.toFixed(1)} s`);
  let failure: unknown = null;
  try {
    for (const [round, c] of concurrency.entries()) {
      const phase = performance.now();
      // warm-up: graph capture, first-use allocations (prompts of their own, so the timed round finds none cached)
      await concurrentStreams(server.url, servePrompt(2 * round), Math.min(16, newTokens), c, timeoutMs);
      const f = await concurrentStreams(server.url, servePrompt(2 * round + 1), newTokens, c, timeoutMs);
      if (f.tokens !== c * newTokens) throw new Error(`serve x${c} generated ${f.tokens} tokens, not ${c * newTokens}`);
      const row: ProductRow = { model, batch: c, path: 'serve', tokensPerS: f.tokensPerS, ttftMs: f.p50TtftMs, floorMs: floorOf(c), anchorTokensPerS: null, steadyTokensPerS: f.steadyTokensPerS, loadS: server.readyS };
      if (servePromptTokens !== null) {
        const weightBytes = bytes.activeWeightBytes(c);
        const kvBytes = bytes.kvBytes(c, serveMeanContext);
        const flops = stepFlops(c, serveMeanContext);
        const memoryFloorMs = Number.isFinite(bandwidthGBs) ? floorMs(weightBytes + kvBytes, bandwidthGBs) : null;
        const computeFloorMs = Number.isFinite(tensorTflops) ? (flops / (tensorTflops * 1e12)) * 1e3 : null;
        const floor = memoryFloorMs === null ? null : Math.max(memoryFloorMs, computeFloorMs ?? 0);
        const stepMs = (c / f.steadyTokensPerS) * 1e3;
        row.floorMs = floor;
        const scaled = { ...row, p99TtftMs: f.p99TtftMs, servePromptTokens, weightBytes, kvBytes, flops, memoryFloorMs, computeFloorMs, stepMs, floorShare: floor === null ? null : floor / stepMs };
        scaleRows.push(scaled);
        rows.push(scaled); // its JSON line carries the roofline too
      } else rows.push(row);
      console.log(`serve x${c}: ${f.tokensPerS.toFixed(1)} tok/s (steady ${f.steadyTokensPerS.toFixed(1)}), TTFT p50 ${f.p50TtftMs.toFixed(1)} ms p99 ${f.p99TtftMs.toFixed(1)} ms, ${f.tokens} tokens in ${f.wallS.toFixed(2)} s (stage ${elapsed(phase)})`);
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
    // a serve row at scale ran prompts of its own length
    const rowPromptTokens = row.path === 'serve' && servePromptTokens !== null ? servePromptTokens : promptTokens;
    appendFileSync(opts.out, JSON.stringify({ date, gpu, commit, ...row, device: opts.device, promptTokens: rowPromptTokens, newTokens, bandwidthGBs: Number.isFinite(bandwidthGBs) ? bandwidthGBs : null, tensorTflops: Number.isFinite(tensorTflops) ? tensorTflops : null }) + '\n');
  }
  const prompts = servePromptTokens === null ? `prompt ${promptTokens}` : `serve prompts ${servePromptTokens}${opts.generate || opts.inProcess || opts.anchor ? `, other paths' prompt ${promptTokens}` : ''}`;
  console.log(`\n${model} on ${gpu}, commit ${commit.slice(0, 12)}, ${prompts}, ${newTokens} new tokens, read bandwidth ${Number.isFinite(bandwidthGBs) ? bandwidthGBs.toFixed(0) : '-'} GB/s\n`);
  console.log(productTable(rows));
  if (scaleRows.length === 0) return;
  const fixed = (x: number | null, digits: number): string => (x === null || !Number.isFinite(x) ? '-' : x.toFixed(digits));
  console.log(`\nserving at scale: prompts of ${servePromptTokens} tokens (one each), ${newTokens} new; roofline of one decode step at the mean context of ${serveMeanContext} (read ${fixed(bandwidthGBs, 0)} GB/s, tensor cores ${fixed(tensorTflops, 0)} TFLOP/s)\n`);
  console.log('| batch | tok/s | steady tok/s | TTFT p50 ms | TTFT p99 ms | step ms | weights GB | KV GB | TFLOP | memory floor ms | compute floor ms | floor / step |\n|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of scaleRows)
    console.log(`| ${r.batch} | ${fixed(r.tokensPerS, 0)} | ${fixed(r.steadyTokensPerS ?? null, 0)} | ${fixed(r.ttftMs, 0)} | ${fixed(r.p99TtftMs, 0)} | ${fixed(r.stepMs, 2)} | ${fixed(r.weightBytes / 1e9, 2)} | ${fixed(r.kvBytes / 1e9, 2)} | ${fixed(r.flops / 1e12, 2)} | ${fixed(r.memoryFloorMs, 2)} | ${fixed(r.computeFloorMs, 2)} | ${r.floorShare === null || !Number.isFinite(r.floorShare) ? '-' : `${(100 * r.floorShare).toFixed(0)}%`} |`);
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
