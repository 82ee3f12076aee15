// Bifurcated decode attention on CUDA (cuda/attention-bifurcated.cu) against the CPU reference and against the
// plain CUDA paged attention: samples sharing a prompt of whole blocks with ragged continuations, a token of no
// group, GQA and MHA, f32 and bf16 caches; captured in a CUDA graph and replayed after the descriptors (groups,
// shared lengths, table, positions) were rewritten. Then through weft: 4 samples (a decode graph of its own with
// the bifurcated op) and 12 (past the graphs' 8 rows: eager steps) of one prompt, greedy, each the one greedy
// sequence. Run on a GPU host:  node --import tsx --test test/gpu/bifurcated.test.ts
// Bound 1e-4 of max|out| (norm-wise, as ops-check's decode attention): fp32 reductions in another order; 1e-3 for
// head dims 64 and 128, whose bf16 caches run on f16 tensor cores (cuda/attention-bifurcated-mma.cu: q, k, v and
// the softmax weights rounded to f16, as the prefill kernel, whose bound in ops-check this is).
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, type Engine, type Tensor } from '../../worker/native.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';
import { startCluster } from '../../coordinator/cluster.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { prng } from '../helpers/random.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);

const bytesOf = (a: Float32Array | Int32Array | Uint16Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
const B = 16;

interface Inputs {
  readonly q: Float32Array; // [T, nH * hd]
  readonly k: Float32Array; // [nBlocks, nKv, B, hd]
  readonly v: Float32Array;
  readonly rows: Int32Array; // [T, width]
  readonly width: number;
  readonly positions: Int32Array; // [T]
  readonly tokenGroup: Int32Array; // [T]
  readonly groupShared: Int32Array; // [G]
  readonly nBlocks: number;
}

/** n samples sharing `promptBlocks` blocks, 1..100 positions past them each, and one token of a row of its own. */
function inputs(seed: number, n: number, nH: number, nKv: number, hd: number, promptBlocks: number): Inputs {
  const rand = prng(seed);
  const T = n + 1, width = promptBlocks + Math.ceil(100 / B) + 1;
  const rows = new Int32Array(T * width);
  let next = promptBlocks;
  for (let t = 0; t < T; t++) for (let j = 0; j < width; j++) rows[t * width + j] = t < n && j < promptBlocks ? j : next++;
  const positions = Int32Array.from({ length: T }, (_, t) => (t < n ? promptBlocks * B + Math.floor(rand() * 100) : Math.floor(rand() * width * B)));
  const randoms = (count: number): Float32Array => Float32Array.from({ length: count }, () => 2 * rand() - 1);
  return {
    q: randoms(T * nH * hd),
    k: randoms(next * nKv * B * hd),
    v: randoms(next * nKv * B * hd),
    rows,
    width,
    positions,
    tokenGroup: Int32Array.from({ length: T }, (_, t) => (t < n ? 0 : -1)),
    groupShared: Int32Array.from([promptBlocks * B, 0]),
    nBlocks: next,
  };
}

function cache(e: Engine, values: Float32Array, shape: number[], dtype: 'f32' | 'bf16'): Tensor {
  if (dtype === 'f32') return e.upload(bytesOf(values), 'f32', shape);
  return e.upload(bytesOf(Uint16Array.from(new Uint32Array(values.buffer, values.byteOffset, values.length), (b) => b >>> 16)), 'bf16', shape);
}

function attend(e: Engine, x: Inputs, nH: number, nKv: number, hd: number, dtype: 'f32' | 'bf16', bifurcated: boolean): Float32Array {
  const T = x.positions.length;
  const i32 = (v: Int32Array, shape = [v.length]): Tensor => e.upload(bytesOf(v), 'i32', shape);
  const q = e.upload(bytesOf(x.q), 'f32', [T, nH * hd]);
  const k = cache(e, x.k, [x.nBlocks, nKv, B, hd], dtype);
  const v = cache(e, x.v, [x.nBlocks, nKv, B, hd], dtype);
  const seq = i32(Int32Array.from({ length: T }, (_, t) => t));
  const table = i32(x.rows, [T, x.width]);
  const out = bifurcated
    ? e.attentionBifurcated(q, k, v, seq, table, i32(x.positions), i32(x.tokenGroup), i32(x.groupShared), nH, 1 / Math.sqrt(hd))
    : e.attention(q, k, v, seq, table, i32(x.positions), nH, 1 / Math.sqrt(hd));
  return e.download(out) as Float32Array;
}

/** The bound for a head dim: the tensor-core prefix's (hd 64, 128) or the fp32 kernels'. */
const boundFor = (hd: number): number => (hd === 64 || hd === 128 ? 1e-3 : 1e-4);

function assertNormClose(got: Float32Array, want: Float32Array, bound: number, what: string): void {
  const scale = want.reduce((m, x) => Math.max(m, Math.abs(x)), 0);
  let err = 0;
  for (let i = 0; i < want.length; i++) err = Math.max(err, Math.abs(got[i]! - want[i]!));
  assert.ok(err <= bound * scale, `${what}: max error ${err} over ${bound} of max|out| ${scale}`);
}

describe('bifurcated decode attention on CUDA', { skip }, () => {
  for (const [n, nH, nKv, hd, promptBlocks, dtype] of [
    [4, 32, 8, 128, 64, 'f32'],
    [16, 32, 8, 128, 64, 'bf16'],
    [16, 32, 32, 128, 32, 'bf16'],
    [5, 16, 4, 96, 9, 'f32'],
  ] as const)
    test(`${n} samples, ${nH}/${nKv} heads of ${hd}, a prompt of ${promptBlocks * B}, ${dtype}: equals the CPU and the plain paged kernel`, () => {
      const cuda = createEngine({ backend: 'cuda', poison: true });
      const cpu = createEngine({ backend: 'cpu' });
      const x = inputs(n * 1000 + hd, n, nH, nKv, hd, promptBlocks);
      const got = attend(cuda, x, nH, nKv, hd, dtype, true);
      assertNormClose(got, attend(cpu, x, nH, nKv, hd, dtype, true), boundFor(hd), 'vs the CPU');
      assertNormClose(got, attend(cuda, x, nH, nKv, hd, dtype, false), boundFor(hd), 'vs the plain CUDA kernel');
    });

  test('captured in a graph, it follows descriptors rewritten before each replay', () => {
    const e = createEngine({ backend: 'cuda', poison: true });
    const [nH, nKv, hd] = [32, 8, 128];
    const x = inputs(77, 6, nH, nKv, hd, 20);
    const T = x.positions.length;
    const i32 = (v: Int32Array, shape = [v.length]): Tensor => e.upload(bytesOf(v), 'i32', shape);
    const q = e.upload(bytesOf(x.q), 'f32', [T, nH * hd]);
    const k = cache(e, x.k, [x.nBlocks, nKv, B, hd], 'bf16');
    const v = cache(e, x.v, [x.nBlocks, nKv, B, hd], 'bf16');
    const seq = i32(Int32Array.from({ length: T }, (_, t) => t));
    const [table, positions, tokenGroup, groupShared] = [i32(x.rows, [T, x.width]), i32(x.positions), i32(x.tokenGroup), i32(x.groupShared)];
    const result = e.zeros('f32', [T, nH * hd]);
    e.beginStep();
    e.captureBegin();
    e.copy(result, e.attentionBifurcated(q, k, v, seq, table, positions, tokenGroup, groupShared, nH, 1 / Math.sqrt(hd)));
    const graph = e.captureEnd();
    e.endStep();
    const cpu = createEngine({ backend: 'cpu' });
    // first as captured, then: the group shares fewer blocks, its members moved on, and no group at all
    for (const change of [{}, { groupShared: Int32Array.from([8 * B, 0]), positions: x.positions.map((p, t) => (t < 6 ? p + 3 : p)) }, { tokenGroup: new Int32Array(T).fill(-1) }]) {
      const now = { ...x, ...change };
      e.write(positions, bytesOf(now.positions));
      e.write(tokenGroup, bytesOf(now.tokenGroup));
      e.write(groupShared, bytesOf(now.groupShared));
      e.replay(graph);
      assertNormClose(e.download(result) as Float32Array, attend(cpu, now, nH, nKv, hd, 'bf16', true), boundFor(hd), `replay ${JSON.stringify(Object.keys(change))}`);
    }
  });

  test('through weft: 4 and 12 greedy samples of one prompt (a decode graph, then eager steps, both bifurcated) are each the one greedy sequence', async () => {
    const prompt = readReference('llama-tiny').prompts[1]!.slice(0, 40);
    const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), device: 'cuda', maxContext: 128, kvBlockSize: 16, kvCacheTokens: 4096 });
    try {
      const run = async (): Promise<number[]> => {
        const tokens: number[] = [];
        for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: 16, ignoreEos: true } })) if (event.type === 'token') tokens.push(event.token);
        return tokens;
      };
      for (const n of [4, 12]) {
        const samples = await Promise.all(Array.from({ length: n }, run));
        for (const tokens of samples) assert.deepEqual(tokens, samples[0], `${n} samples`);
      }
      assert.equal(cluster.stats().kvBlocksUsed, 0);
    } finally {
      await cluster.close();
    }
  });
});
