/**
 * A prompt attended in chunks through sageAttention with a state slot (native/src/sage-state.h), on one engine:
 * the CPU unit test checks the rule of what a slot keeps, the GPU test that CUDA's kept blocks give the CPU
 * reference's outputs. Two sequences in a paged bf16 cache (blocks scattered in reverse): sequence 0, the prompt,
 * keeps slot 0; sequence 1 takes no slot. With `decodeRows` D, a mixed step's: D sequences of one decode row each come
 * first (table rows 0..D-1, each at its own context), the prompt and the other sequence are rows D and D + 1.
 */
import type { Engine, Tensor } from '../../worker/native.ts';
import { sageBlockBytes } from '../../worker/models/sage-state.ts';
import { engineIo } from './engine-io.ts';
import { prng } from './random.ts';

export const CHUNKS = { nKv: 2, group: 2, hd: 64, B: 16, maxContext: 512, promptChunks: [150, 100, 130], other: 90 } as const;

export interface SageChunks {
  /** chunk i's output [T, nH hd] f32 (the decode rows first) with the slots given ([S, 3] per row: slot, afresh,
   * vouched), or without state */
  run(i: number, slots: readonly number[] | null): Float32Array;
  /** the exact attention of chunk i */
  exact(i: number): Float32Array;
  readonly state: { header: Tensor; means: Tensor; blocks: Tensor };
  /** the K rows [0, end) of the prompt's kv head g, as the cache holds them (bf16) */
  keys(g: number, end: number): Float32Array;
}

/** Where decode sequence d's row is fed: its context (positions 0..it, written up front). */
export const decodePosition = (d: number): number => 60 + 45 * d;

/** Chunk i feeds the prompt's next promptChunks[i] positions and, beside them, sequence 1's `other` positions. */
export function sageChunks(engine: Engine, pv: 'f16' | 'fp8', seed: number, decodeRows = 0): SageChunks {
  const { nKv, group, hd, B, maxContext, promptChunks, other } = CHUNKS;
  const { f32, i32 } = engineIo(engine);
  const rand = prng(seed);
  const nH = nKv * group, width = nKv * hd, D = decodeRows, S = D + 2, prompt = D;
  const promptLength = promptChunks.reduce((a, n) => a + n, 0);
  const perSeq = Math.ceil(maxContext / B), nBlocks = S * perSeq + 1;
  const rows = Array.from({ length: S }, (_, i) => Array.from({ length: perSeq }, (_, j) => nBlocks - 1 - (i * perSeq + j)));
  const table = i32(rows.flat(), [S, perSeq]);
  const kc = engine.zeros('bf16', [nBlocks, nKv, B, hd]), vc = engine.zeros('bf16', [nBlocks, nKv, B, hd]);
  // every position of every sequence written up front (a chunk's own rows are in the cache before it attends)
  const decodeSeqs = Array.from({ length: D }, (_, d) => d);
  // the decode rows' values from a generator of their own: the prompt's and the other sequence's are the same with or
  // without them
  const decodeRand = prng(seed + 7919);
  const write = (all: { seq: number; pos: number }[], r: () => number) => {
    const k = Float32Array.from({ length: all.length * width }, (_, i) => 2 * r() - 1 + 3 * ((i % hd) % 3));
    const v = Float32Array.from({ length: all.length * width }, () => 2 * r() - 1);
    if (all.length) engine.writeKv(kc, vc, f32(k, [all.length, width]), f32(v, [all.length, width]), i32(all.map((a) => a.seq)), table, i32(all.map((a) => a.pos)));
  };
  write([...Array.from({ length: promptLength }, (_, p) => ({ seq: prompt, pos: p })), ...Array.from({ length: other }, (_, p) => ({ seq: prompt + 1, pos: p }))], rand);
  write(decodeSeqs.flatMap((d) => Array.from({ length: decodePosition(d) + 1 }, (_, p) => ({ seq: d, pos: p }))), decodeRand);
  const keysOut = engine.download(kc) as Float32Array; // bf16 cache, as f32
  const chunks = promptChunks.map((n, i) => {
    const start = promptChunks.slice(0, i).reduce((a, m) => a + m, 0);
    const fed = [...decodeSeqs.map((d) => ({ seq: d, pos: decodePosition(d) })), ...Array.from({ length: n }, (_, j) => ({ seq: prompt, pos: start + j })), ...Array.from({ length: other }, (_, j) => ({ seq: prompt + 1, pos: j }))];
    const draw = (r: () => number, n: number) => Array.from({ length: n * nH * hd }, () => 2 * (2 * r() - 1));
    const q = Float32Array.from([...draw(decodeRand, D), ...draw(rand, fed.length - D)]);
    return [f32(q, [fed.length, nH * hd]), kc, vc, i32(fed.map((f) => f.seq)), table, i32(fed.map((f) => f.pos))] as const;
  });
  const state = {
    header: engine.zeros('i32', [1, 2]),
    means: engine.zeros('f32', [1, nKv, hd]),
    blocks: engine.zeros('i32', [1, Math.ceil(maxContext / 64), sageBlockBytes(nKv, hd, pv) / 4]),
  };
  const scale = 1 / Math.sqrt(hd);
  const get = (t: Tensor) => engine.download(t) as Float32Array;
  return {
    run: (i, slots) =>
      get(engine.sageAttention(...chunks[i]!, nH, scale, pv, slots ? [state.header, state.means, state.blocks, i32(slots, [S, 3])] : undefined, D)),
    exact: (i) => get(engine.attention(...chunks[i]!, nH, scale)),
    state,
    keys: (g, end) => {
      const out = new Float32Array(end * hd);
      for (let p = 0; p < end; p++) {
        const block = rows[prompt]![Math.floor(p / B)]!;
        out.set(keysOut.subarray(((block * nKv + g) * B + (p % B)) * hd, ((block * nKv + g) * B + (p % B) + 1) * hd), p * hd);
      }
      return out;
    },
  };
}
