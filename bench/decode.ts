/**
 * Decode benchmark with random weights of real shapes, made on the device (no checkpoint):
 *
 *   node --import tsx bench/decode.ts --models llama-2-7b,llama-3-8b --batches 1,8 --prompts 5,1024 --new-tokens 200
 *
 * In one run: the device's read bandwidth, then per model × prompt length × batch: time to first token
 * (prefill of one sequence plus its first sampled token), decode step time and tokens/s (CUDA graphs; steps
 * queued ahead as the worker runs them, and each awaited in turn: bench/decode-steps.ts),
 * the bytes one decode step must read (weights + the KV cache it attends over, at the cache's element size:
 * --kv-dtype, bf16 on cuda by default) and the fraction of the bandwidth floor reached. Ends with one JSON line.
 * With --attention sparq the bytes and floor are still the dense step's (SparQ reads fewer: its kernel bench,
 * bench/kernels/sparq-run.sh, has its byte model).
 * --profile-decode, under `ncu --profile-from-start off`, times one replay of each row's decode graph kernel by kernel,
 * for any configuration here (bench/kernels/step-profile.ts does the same for bf16 weights alone): run one model,
 * batch and weight format at a time, since bench/kernels/ncu-summary.py adds up every profiled range.
 */
import { Command } from 'commander';
import { createEngine } from '../worker/native.ts';
import { planShards } from '../core/shard-plan.ts';
import { withQuantizeAtLoad } from '../core/model-spec.ts';
import { buildRankModel, disposeRankModel, randomWeights, type RankModel } from '../worker/models/registry.ts';
import { soloCollectives } from '../worker/collectives/collectives.ts';
import { StepRunner } from '../worker/runner.ts';
import { graphBucketFor } from '../worker/step-sizes.ts';
import { aheadStepMs, serialStepMs } from './decode-steps.ts';
import { SeededRng } from '../coordinator/rng.ts';
import { blocksFor, kvCacheLayout, kvDtypeBytes, resolveKvDtype, type KvCacheLayout, type KvDtype, type KvDtypeOption } from '../core/kv-block-table.ts';
import { checkPrefillAttention, sagePvType, type PrefillAttention } from '../core/prefill-attention.ts';
import { allocateSageState } from '../worker/models/sage-state.ts';
import { allocateSparqState, SPARQ_MAX_STEP_TOKENS } from '../worker/models/sparq.ts';
import { DENSE_TOKEN } from '../core/sparq.ts';
import { presetSpec } from './presets.ts';
import { floorMs as stepFloorMs, stepBytes } from './step-bytes.ts';

const list = (s: string): string[] => s.split(',').map((x) => x.trim()).filter(Boolean);
const program = new Command('bench-decode')
  .option('--models <names>', 'presets (bench/presets.ts)', 'llama-2-7b,llama-3-8b,mistral-7b')
  .option('--batches <list>', 'batch sizes', '1,8')
  .option('--prompts <list>', 'prompt lengths', '5,1024')
  .option('--new-tokens <n>', 'decode steps timed', '200')
  .option('--layers <n>', 'override the layer count (a cut model that fits)')
  .option('--device <d>', 'cpu or cuda', 'cuda')
  .option('--kv-dtype <t>', "KV cache element type: auto (bf16 on cuda, f32 on cpu), f32, bf16, fp8 or int8", 'auto')
  .option('--profile-prefill <n>', 'also time the host side of each engine call in one prefill of n tokens')
  .option('--profile-sync', 'with --profile-prefill: synchronise after every call, so each time is that call\'s device time', false)
  .option('--tp <n>', 'run one rank\'s shard of a plan for n ranks on this GPU, all-reduces skipped (per-rank work of tensor or expert parallelism)', '1')
  .option('--rank <r>', 'with --tp: which rank\'s shard', '0')
  .option('--expert-parallel', 'with --tp: whole experts per rank (Mixtral)', false)
  .option('--quantize <list>', 'weight formats to run, each model in turn: none (the preset dtype), int8 (per channel), int4; +head quantizes the LM head too (int4+head)', 'none')
  .option('--group-size <n>', 'int4 columns per scale (int8 is per output channel)', '128')
  .option('--prefill-attention <mode>', 'attention of the prompt steps: exact, or quantized int8 / fp8 (core/prefill-attention.ts)', 'exact')
  .option('--no-sage-state', 'with --prefill-attention int8|fp8: each step quantizes its prefix anew, as before the prompts kept their blocks (worker/models/sage-state.ts)')
  .option('--attention <mode>', 'decode attention: dense, or sparq (SparQ, worker/models/sparq.ts; its state beside the cache)', 'dense')
  .option('--sparq-r <n>', 'with --attention sparq: query components that score every position', '16')
  .option('--sparq-k <n>', 'with --attention sparq: positions attended exactly', '2048')
  .option('--profile-decode', 'after each row, replay its decode graph once inside a profiler range (engine.profileRange), for `ncu --profile-from-start off` to time kernel by kernel (bench/kernels/ncu-summary.py)', false)
  .option('--arena-gib <n>', 'step arena in GiB: it bounds the tokens of one prefill chunk (worker/step-sizes.ts maxStepTokens)', '16')
  .option('--prefill-chunk <n>', 'the most prompt tokens of one eager step (under what the arena holds): 1024, as the product\'s --max-num-batched-tokens steps; 0: what the arena holds; with --attention sparq on cuda the prompt takes what the arena holds (as exact steps do)', '1024')
  .option('--kv-block-size <n>', 'page the KV cache in blocks of n positions, as the product does (16 there, 64 with --attention sparq); without it one block per sequence')
  .parse();
const opts = program.opts<{ models: string; batches: string; prompts: string; newTokens: string; layers?: string; device: 'cpu' | 'cuda'; kvDtype: string; profilePrefill?: string; profileSync: boolean; tp: string; rank: string; expertParallel: boolean; quantize: string; groupSize: string; prefillAttention: string; sageState: boolean; attention: string; sparqR: string; sparqK: string; kvBlockSize?: string; profileDecode: boolean; arenaGib: string; prefillChunk: string }>();
const tp = Number(opts.tp), rank = Number(opts.rank);
const batches = list(opts.batches).map(Number);
const prompts = list(opts.prompts).map(Number);
const newTokens = Number(opts.newTokens);
if (!['auto', 'f32', 'bf16', 'fp8', 'int8'].includes(opts.kvDtype)) program.error(`--kv-dtype must be auto, f32, bf16, fp8 or int8 (got ${opts.kvDtype})`);
const kvDtype = resolveKvDtype(opts.kvDtype as KvDtypeOption, opts.device);
const quantizations = list(opts.quantize);
for (const q of quantizations) if (!['none', 'int8', 'int4', 'int8+head', 'int4+head'].includes(q)) program.error(`--quantize takes none, int8, int4, int8+head and int4+head (got ${q})`);
if (!['exact', 'int8', 'fp8'].includes(opts.prefillAttention)) program.error(`--prefill-attention must be exact, int8 or fp8 (got ${opts.prefillAttention})`);
const prefillAttention = opts.prefillAttention as PrefillAttention;
if (!['dense', 'sparq'].includes(opts.attention)) program.error(`--attention must be dense or sparq (got ${opts.attention})`);
const sparq = opts.attention === 'sparq' ? { r: Number(opts.sparqR), k: Number(opts.sparqK) } : undefined;
const kvBlockSize = opts.kvBlockSize === undefined ? undefined : Number(opts.kvBlockSize);

// The default 16 GiB step arena holds a whole 1024-token prefill of a 7-8B model (no chunking in the TTFT figure);
// longer prompts run in chunks of at most --prefill-chunk tokens (1024: the product's steps).
const arenaGib = Number(opts.arenaGib);
if (!(arenaGib > 0)) program.error(`--arena-gib must be a positive number (got ${opts.arenaGib})`);
const arenaBytes = Math.round(arenaGib * 2 ** 30);
const prefillChunk = Number(opts.prefillChunk);
if (!Number.isInteger(prefillChunk) || prefillChunk < 0) program.error(`--prefill-chunk must be a whole number of tokens, 0 for no cap (got ${opts.prefillChunk})`);
const engine = createEngine({ backend: opts.device, arenaBytes });
const bandwidthGBs = opts.device === 'cuda' ? engine.measureBandwidth(4 * 2 ** 30, 20) : NaN;
console.log(`device read bandwidth: ${bandwidthGBs.toFixed(0)} GB/s`);

interface Row {
  model: string;
  weights: string;
  kvDtype: KvDtype;
  batch: number;
  prompt: number;
  ttftMs: number;
  /** per step, queued ahead (the reported figure); serialStepMs: each awaited in turn */
  stepMs: number;
  serialStepMs: number;
  replayMs: number;
  tokensPerS: number;
  bytesPerStep: number;
  floorMs: number;
  fractionOfFloor: number;
  achievedGBs: number;
}
const rows: Row[] = [];
const rng = new SeededRng(1234);
const randomIds = (n: number, vocab: number): number[] => Array.from({ length: n }, () => rng.nextUint32() % vocab);

for (const name of list(opts.models)) for (const quantize of quantizations) {
  const preset = presetSpec(name, opts.layers ? { num_hidden_layers: Number(opts.layers) } : {});
  // int8 per output channel, int4 in groups (gpt-fast's choices); random codes, as the dense path has random weights
  const [kind, head] = quantize.split('+') as ['none' | 'int8' | 'int4', 'head' | undefined];
  const spec = kind === 'none' ? preset : withQuantizeAtLoad(preset, kind, kind === 'int4' ? opts.groupSize : 'channel', head === 'head');
  const weights = kind === 'none' ? spec.dtype : (kind === 'int4' ? `int4-g${opts.groupSize}` : 'int8') + (head ? '+head' : '');
  const plan = planShards(spec, tp, { expertParallel: opts.expertParallel });
  const label = (tp > 1 ? `${name} tp${tp}${opts.expertParallel ? '-ep' : ''} r${rank}` : name) + (quantize === 'none' ? '' : ` ${weights}`) + (prefillAttention === 'exact' ? '' : ` prefill ${prefillAttention}`) + (sparq ? ` sparq r${sparq.r} k${sparq.k}` : '') + (kvBlockSize === undefined ? '' : ` blocks ${kvBlockSize}`);
  const maxBatch = Math.max(...batches);
  const maxContext = Math.max(...prompts) + 2 * newTokens + 16; // two untimed steps, newTokens serial, newTokens ahead
  // one block per sequence, or (--kv-block-size) sequence b owns the b-th run of the blocks its context needs
  const blocksPerSeq = kvBlockSize === undefined ? 1 : blocksFor(maxContext, kvBlockSize);
  const kv = kvCacheLayout({ kvSlots: maxBatch, maxContext, device: opts.device, kvDtype, ...(kvBlockSize !== undefined && { kvBlockSize, kvCacheTokens: maxBatch * blocksPerSeq * kvBlockSize }) });
  const blocksOf = (seq: number) => Array.from({ length: blocksPerSeq }, (_, j) => seq * blocksPerSeq + j);
  const built = buildRankModel(engine, spec, plan, rank, randomWeights(engine, 7), kv);
  checkPrefillAttention(prefillAttention, spec, opts.device, sparq ? 'sparq' : 'dense');
  // as worker.ts builds them: SparQ's state beside the cache and steps of at most the tokens its kernels serve
  const withSparq = sparq ? { ...built, model: { ...built.model, sparq: allocateSparqState(engine, spec, plan, kv, sparq) } } : built;
  // as the worker: a quantized prefill keeps its prompts' blocks across steps (--no-sage-state: each step quantizes anew)
  const sage = prefillAttention !== 'exact' && opts.sageState ? allocateSageState(engine, spec, plan, kv, sagePvType(prefillAttention)) : undefined;
  const model = prefillAttention === 'exact' ? withSparq : { ...withSparq, model: { ...withSparq.model, prefillAttention, ...(sage && { sage }) } };
  const runner = new StepRunner(engine, soloCollectives(), model, kv, { arenaBytes, ...(sparq && opts.device === 'cuda' ? { maxStepTokens: SPARQ_MAX_STEP_TOKENS } : prefillChunk > 0 && { maxStepTokens: prefillChunk }) });
  const bytes = stepBytes(spec, plan, rank, kvDtypeBytes(kvDtype, spec.headDim));
  const greedy = (n: number) => ({ temperature: Array(n).fill(0), topK: Array(n).fill(0), topP: Array(n).fill(1), uniform: Array(n).fill(0) });
  // with SparQ the prompt is sent dense (exact, the dense kernels: runner.ts) and decode steps take the cluster's r and k
  const dense = (n: number) => (sparq ? { sparq: { r: Array(n).fill(DENSE_TOKEN.r), k: Array(n).fill(DENSE_TOKEN.k) } } : {});
  const prefill = (prompt: number, seq: number) => ({ tokens: randomIds(prompt, spec.vocabSize), positions: [...Array(prompt).keys()], tokenSeq: Array(prompt).fill(0), kvBlockTable: [blocksOf(seq)], logitRows: [prompt - 1], sample: greedy(1), ...dense(prompt) });

  for (const prompt of prompts) {
    for (const batch of batches) {
      // Warm-up prefill on the last slot (cuBLAS setup, first-use allocations), not timed.
      await runner.step(prefill(prompt, batch - 1));
      let ttftMs = 0;
      let last: number[] = [];
      for (let b = 0; b < batch; b++) {
        const started = performance.now();
        const result = await runner.step(prefill(prompt, b));
        if (b === 0) ttftMs = performance.now() - started;
        last.push(result.tokens![0]!);
      }
      const seqs = [...Array(batch).keys()]; // sequence b in blocksOf(b)
      const decodeAt = (position: number) => ({ positions: Array(batch).fill(position), tokenSeq: seqs, kvBlockTable: seqs.map(blocksOf), logitRows: seqs, sample: greedy(batch) });
      ({ tokens: last } = await serialStepMs(runner, decodeAt, last, prompt, 2)); // the first captures this bucket's graph
      const serial = await serialStepMs(runner, decodeAt, last, prompt + 2, newTokens);
      const stepMs = await aheadStepMs(runner, decodeAt, batch, prompt + 2 + newTokens, newTokens);
      // GPU time of the decode graph alone, no host work (none where the batch runs eagerly: Mixtral past 8 rows, 64
      // with quantized experts)
      const bucket = graphBucketFor(batch, runner.maxGraphBatch);
      const replayMs = bucket !== null ? runner.timeGraphReplay(bucket, 50) : NaN;
      if (opts.profileDecode && bucket !== null) {
        engine.profileRange(true);
        runner.timeGraphReplay(bucket, 1);
        engine.profileRange(false);
      }
      const meanContext = prompt + 2 + 1.5 * newTokens; // over the steps timed ahead
      const bytesPerStep = bytes.bytesPerStep(batch, meanContext);
      const floorMs = stepFloorMs(bytesPerStep, bandwidthGBs);
      const row = { model: label, weights, kvDtype, batch, prompt, ttftMs, stepMs, serialStepMs: serial.ms, replayMs, tokensPerS: (batch * 1000) / stepMs, bytesPerStep, floorMs, fractionOfFloor: floorMs / stepMs, achievedGBs: bytesPerStep / (stepMs * 1e6) };
      rows.push(row);
      console.log(
        `${label.padEnd(20)} kv ${kvDtype.padEnd(4)} batch ${String(batch).padStart(2)} prompt ${String(prompt).padStart(4)}: ttft ${ttftMs.toFixed(1)} ms, step ${stepMs.toFixed(3)} ms ahead (serial ${serial.ms.toFixed(3)}, graph alone ${replayMs.toFixed(3)}), ` +
          `${row.tokensPerS.toFixed(1)} tok/s, prefill chunks <= ${sparq ? runner.exactStepTokens : runner.maxStepTokens} tokens, ${(bytesPerStep / 1e9).toFixed(2)} GB/step, ${row.achievedGBs.toFixed(0)} GB/s, ${(row.fractionOfFloor * 100).toFixed(1)}% of floor (${floorMs.toFixed(3)} ms)`,
      );
    }
  }
  if (opts.profilePrefill) await profilePrefill(model, kv, Number(opts.profilePrefill), spec.vocabSize);
  disposeRankModel(model);
}

/** Host time per engine method over one eager prefill (the GPU runs asynchronously behind most calls). */
async function profilePrefill(model: RankModel, kv: KvCacheLayout, n: number, vocab: number): Promise<void> {
  const totals = new Map<string, { calls: number; ms: number }>();
  const timed = new Proxy(engine, {
    get(target, key, receiver) {
      const value = Reflect.get(target, key, receiver) as unknown;
      if (typeof value !== 'function') return value;
      return (...args: unknown[]) => {
        const started = performance.now();
        try {
          const result = (value as (...a: unknown[]) => unknown).apply(target, args);
          // with synchronisation, each call's time is its own device time (kernels serialised)
          if (opts.profileSync && String(key) !== 'synchronize') target.synchronize();
          return result;
        } finally {
          // matrix products by weight shape: the prefill's cost lies in which GEMM shapes run slowly
          const name = key === 'matmul' || key === 'expertMatmul' ? `${key} [${(args[1] as { shape: number[] }).shape.join('x')}]` : String(key);
          const entry = totals.get(name) ?? { calls: 0, ms: 0 };
          entry.calls++;
          entry.ms += performance.now() - started;
          totals.set(name, entry);
        }
      };
    },
  });
  // Eager even for one token (no graph), so that each engine call is timed; a one-token "prefill" is a decode step.
  const runner = new StepRunner(timed, soloCollectives(), model, kv, { arenaBytes, graphs: false });
  const ids = randomIds(n, vocab);
  const step = { tokens: ids, positions: [...ids.keys()], tokenSeq: ids.map(() => 0), kvBlockTable: [[0]], logitRows: [n - 1], sample: { temperature: [0], topK: [0], topP: [1], uniform: [0] } };
  await runner.step(step);
  totals.clear();
  const started = performance.now();
  await runner.step(step);
  const wall = performance.now() - started;
  const rows = [...totals.entries()].sort((a, b) => b[1].ms - a[1].ms);
  // What one call costs with nothing to wait for: subtract it from the per-call times when reading them.
  const syncStarted = performance.now();
  for (let i = 0; i < 100; i++) engine.synchronize();
  const syncMs = (performance.now() - syncStarted) / 100;
  console.log(`prefill of ${n} tokens: ${wall.toFixed(1)} ms wall; ${opts.profileSync ? `device time per engine call (each includes a synchronize, ${(syncMs * 1e3).toFixed(1)} us when idle)` : 'host time per engine call'}:`);
  for (const [name, { calls, ms }] of rows.slice(0, 20)) console.log(`  ${name.padEnd(32)} ${String(calls).padStart(5)} calls ${ms.toFixed(2).padStart(9)} ms ${((ms / calls) * 1e3).toFixed(1).padStart(8)} us/call`);
}
console.log(JSON.stringify({ bench: 'decode', device: opts.device, kvDtype, bandwidthGBs, newTokens, rows }));
