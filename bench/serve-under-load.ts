/**
 * A long prompt arriving while streams decode, against the real `weft serve`: how long the decoding streams wait
 * between tokens while the prompt prefills, beside their gaps before it, and the prompt's time to first token.
 * Under load every step of such a prefill is a mixed step (one decode row per running stream first, then a chunk of
 * the prompt), so a stream's gap during the prefill is about one such step, and the prompt's TTFT their sum.
 *
 *   node --import tsx bench/serve-under-load.ts --model /tmp/llama-2-7b [--device cuda] [--streams 16] \
 *     [--stream-prompt-tokens 64] [--long-prompt-tokens 8192] [--weft-args "--prefill-attention fp8"] [--out F]
 *
 * One `weft serve` on free ports with a slot per stream and one for the prompt. A warm-up round (the streams and the
 * prompt at once, fewer tokens: graph capture, first-use allocations), then the timed round: the streams start, and
 * once every one has streamed --baseline-chunks chunks of text the long prompt is sent (max_tokens 1); the streams
 * ask for enough tokens to decode through the whole prefill. Each request has a prompt of its own (no prefix-cache
 * hits). Figures: the streams' gaps between chunks before the prompt was sent (p50, p99) and while it prefilled
 * (chunks that arrived between its send and its first token: p50, p99, max; none where no stream's chunk arrived in
 * that window), the chunks the streams got in that window per second, and the prompt's TTFT. One JSON line is
 * appended to --out; a markdown table ends the run.
 */
import { appendFileSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { Command } from 'commander';
import { readModelSpec } from '../core/model-spec.ts';
import { percentile, runIdentity, startServe, streamCompletion, type StreamTiming } from './product-serve.ts';

const opts = new Command('bench-serve-under-load')
  .requiredOption('--model <dir>', 'Hugging Face model directory (bench/make-checkpoint.py writes one)')
  .option('--name <label>', 'model label in the row (default: the directory name)')
  .option('--device <d>', 'cpu or cuda', 'cuda')
  .option('--streams <n>', 'streams decoding when the long prompt arrives', '16')
  .option('--stream-prompt-tokens <n>', 'prompt length of each stream', '64')
  .option('--long-prompt-tokens <n>', 'length of the prompt that arrives under load', '8192')
  .option('--baseline-chunks <n>', 'chunks every stream has streamed before the long prompt is sent', '16')
  .option('--prefill-chunk <n>', 'prompt tokens a step takes, for sizing the streams\' max_tokens (the server\'s own is what runs)', '1024')
  .option('--weft-args <args>', 'extra flags for weft serve, space-separated', '')
  .option('--timeout-s <n>', 'limit on the server start (weights load) and on each request', '900')
  .option('--out <file>', 'JSON lines appended here', 'bench-serve-under-load.jsonl')
  .parse()
  .opts<{ model: string; name?: string; device: 'cpu' | 'cuda'; streams: string; streamPromptTokens: string; longPromptTokens: string; baselineChunks: string; prefillChunk: string; weftArgs: string; timeoutS: string; out: string }>();

const modelDir = resolve(opts.model);
const model = opts.name ?? basename(modelDir);
const streams = Number(opts.streams);
const streamPromptTokens = Number(opts.streamPromptTokens);
const longPromptTokens = Number(opts.longPromptTokens);
const baselineChunks = Number(opts.baselineChunks);
const prefillChunk = Number(opts.prefillChunk);
const timeoutMs = Number(opts.timeoutS) * 1000;
for (const [name, value] of Object.entries({ streams, streamPromptTokens, longPromptTokens, baselineChunks, prefillChunk })) {
  if (!Number.isInteger(value) || value < 1) throw new Error(`--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} must be a positive integer (got ${value})`);
}
const spec = readModelSpec(modelDir);
// the streams decode through the baseline and the whole prefill (a token each step of --prefill-chunk prompt tokens),
// twice over, and a margin; a stream that ends early shows in streamsThrough
const prefillSteps = Math.ceil(longPromptTokens / prefillChunk);
const streamTokens = 2 * baselineChunks + 2 * prefillSteps + 32;
const maxContext = Math.max(longPromptTokens + 16, streamPromptTokens + streamTokens + 16);

/** Request `index`'s prompt: BOS, then ids of its own (a fixed stride through the vocabulary). */
const promptOf = (index: number, length: number): number[] => [
  spec.bosTokenId ?? 0,
  ...Array.from({ length: length - 1 }, (_, i) => 1 + ((index * 1_000_003 + i * 104_729) % (spec.vocabSize - 1))),
];

interface Round {
  readonly streams: StreamTiming[];
  readonly long: StreamTiming;
}

/** The streams, then the long prompt once each stream has streamed `baseline` chunks. */
async function round(first: number, streamMax: number, baseline: number): Promise<Round> {
  const counts = new Array<number>(streams).fill(0);
  let release!: () => void;
  const ready = new Promise<void>((resolve) => (release = resolve));
  const onText = (i: number) => () => {
    counts[i] = counts[i]! + 1;
    if (counts[i] === baseline && counts.every((c) => c >= baseline)) release();
  };
  const running = Promise.all(Array.from({ length: streams }, (_, i) => streamCompletion(url, promptOf(first + i, streamPromptTokens), streamMax, timeoutMs, onText(i))));
  // a stream that fails rejects here, and streams that all end first are an error, instead of a wait forever
  const endedFirst = await Promise.race([ready.then(() => false), running.then(() => true)]);
  if (endedFirst) throw new Error(`the streams ended before each had streamed ${baseline} chunks`);
  const long = await streamCompletion(url, promptOf(first + streams, longPromptTokens), 1, timeoutMs);
  return { streams: await running, long };
}

// cpu: a pool of every slot's full context (its default is 4 contexts); a cuda rank sizes its own
const cpuPool = opts.device === 'cpu' ? ['--kv-cache-tokens', String((streams + 1) * maxContext)] : [];
const server = await startServe(['--model', modelDir, '--device', opts.device, '--kv-slots', String(streams + 1), '--max-queue', String(2 * (streams + 1)), '--max-context', String(maxContext), ...cpuPool, ...opts.weftArgs.split(/\s+/).filter(Boolean)], timeoutMs);
const url = server.url;
console.log(`serve: ready at ${url} in ${server.readyS.toFixed(1)} s; ${streams} streams of ${streamTokens} tokens, a prompt of ${longPromptTokens} tokens after ${baselineChunks} chunks each`);
let failure: unknown = null;
let result: Round | null = null;
try {
  await round(0, Math.min(streamTokens, 2 * baselineChunks + 8), Math.min(4, baselineChunks)); // warm-up
  result = await round(streams + 1, streamTokens, baselineChunks);
} catch (err) {
  failure = err;
}
const stopped = await server.stop();
if (failure !== null) throw failure;
if (stopped.leftover || stopped.exitCode !== 0) throw new Error(`weft serve did not stop cleanly: exit code ${stopped.exitCode}, leftover processes: ${stopped.leftover}`);

const { streams: timed, long } = result!;
const sent = long.sentAt;
// its one token: the chunk with its text, or (a token whose text is empty streams none) the stream's end
const firstToken = long.chunkAt[0] ?? long.endedAt;
// a gap belongs to the window its later chunk arrived in
const before: number[] = [];
const during: number[] = [];
let duringChunks = 0;
let streamsThrough = 0; // streams still decoding when the prompt's first token came
for (const s of timed) {
  for (let i = 1; i < s.chunkAt.length; i++) {
    const at = s.chunkAt[i]!;
    const gap = at - s.chunkAt[i - 1]!;
    if (at <= sent) before.push(gap);
    else if (at <= firstToken) during.push(gap), duringChunks++;
  }
  if ((s.chunkAt.at(-1) ?? 0) > firstToken) streamsThrough++;
}
before.sort((a, b) => a - b);
during.sort((a, b) => a - b);
if (before.length === 0) throw new Error('the streams streamed no two chunks before the long prompt was sent');
// none during: every stream ended first, or (a loaded client) read the prefill's chunks only after the prompt's token
const duringOr = (f: (sorted: number[]) => number): number | null => (during.length > 0 ? f(during) : null);
const row = {
  date: new Date().toISOString(),
  ...runIdentity(opts.device),
  model,
  device: opts.device,
  weftArgs: opts.weftArgs,
  streams,
  streamPromptTokens,
  longPromptTokens,
  ttftMs: firstToken - sent,
  beforeP50Ms: percentile(before, 0.5),
  beforeP99Ms: percentile(before, 0.99),
  duringP50Ms: duringOr((d) => percentile(d, 0.5)),
  duringP99Ms: duringOr((d) => percentile(d, 0.99)),
  duringMaxMs: duringOr((d) => d.at(-1)!),
  duringChunksPerS: duringChunks / ((firstToken - sent) / 1000),
  streamsThrough,
};
appendFileSync(opts.out, `${JSON.stringify(row)}\n`);
const ms = (x: number | null) => (x === null ? '-' : x.toFixed(1));
console.log(`\n| model | streams | prompt | TTFT ms | gap before p50 / p99 ms | gap during prefill p50 / p99 / max ms | streams' chunks/s during | streams through |`);
console.log(`|---|---|---|---|---|---|---|---|`);
console.log(`| ${model}${opts.weftArgs ? ` ${opts.weftArgs}` : ''} | ${streams} | ${longPromptTokens} | ${ms(row.ttftMs)} | ${ms(row.beforeP50Ms)} / ${ms(row.beforeP99Ms)} | ${ms(row.duringP50Ms)} / ${ms(row.duringP99Ms)} / ${ms(row.duringMaxMs)} | ${row.duringChunksPerS.toFixed(1)} | ${streamsThrough}/${streams} |`);
