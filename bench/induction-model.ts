/**
 * A Llama checkpoint that retrieves by construction: two layers whose weights are written, not trained, so that
 * the model continues any span it has seen before (an induction circuit), at any position up to 32K. It is the
 * "model that can do it" for the needle test (bench/sparq-needle.ts) and issue 20's quality checks of approximate
 * attention: the default model does not copy (its needle top-1 equals the control's), and a trained long-context
 * model is out of reach here. The default model's tokenizer (vocabulary 4096), so the needle test's text works.
 *
 * Residual stream (hidden 512): T = the token's code (C = 45 dims, a random unit vector per token id), P1 and P2 =
 * the codes of the tokens one and two back, a constant 1, O = the code of the predicted token.
 * - Layer 0: head 0 attends to the position one back, head 2 two back, by position alone: their queries and keys
 *   come from the constant, the query of head "d back" is e^{-i d theta_p} on each rotary pair p that turns (0..18),
 *   so its score with the key n positions back is 24 sum_p cos((n - d) theta_p), peaked at n = d (weight
 *   > 0.999999 at 32K); their values are T, written to P1 and P2.
 * - Layer 1: head 0's query is (T, P1) = (this token, the one before), its key (P1, P2) of each earlier position,
 *   both in the rotary pairs that turn by under 0.04 rad over 32K positions (rope_theta 1e20: pairs 19..63), so
 *   the score is 24 (u_t . u_{j-1} + u_{t-1} . u_{j-2}): position j after an earlier occurrence of the last two
 *   tokens wins; its value T (token j's code) goes to O.
 * - The LM head: logit v = 30 u_v . O. MLPs zero, the other heads' outputs zero; the norms' weights undo the RMS.
 * So with exact attention the continuation of a repeated span is predicted from the trigram it ends with; where
 * the bigram has not been seen, the model guesses (a control). Approximate attention that loses the one position
 * among thousands loses the prediction.
 *
 *   node --import tsx bench/induction-model.ts --out DIR
 */
import { Command } from 'commander';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeSafetensorsFile, type TensorToWrite } from '../core/safetensors.ts';

const VOCAB = 4096;
const HIDDEN = 512;
const HEAD_DIM = 128;
const HEADS = 4;
const KV_HEADS = 2; // heads 0, 1 read kv head 0; 2, 3 read kv head 1 (GQA, as Llama-3)
const INTERMEDIATE = 64; // all zero
const CONTEXT = 32768;
const ROPE_THETA = 1e20;
const CODE = 45; // code dims: the rotary pairs 19..63 that stay still over the context
const STILL_PAIR = 19;
const T = 0, P1 = 64, P2 = 128, ONE = 192, O = 256; // first dims of the residual's parts
const SHARP = 24; // score units between the wanted position and the next best (after the 1/sqrt(head dim))
const LOGIT = 30;

/** Deterministic unit-norm code per token id (Box-Muller over a splitmix-style generator). */
function tokenCodes(seed: number): Float32Array {
  let s = BigInt(seed);
  const next = () => {
    s = (s + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn;
    let z = s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    z ^= z >> 31n;
    return (Number(z >> 11n) + 0.5) / 2 ** 53;
  };
  const codes = new Float32Array(VOCAB * CODE);
  for (let v = 0; v < VOCAB; v++) {
    let norm = 0;
    for (let i = 0; i < CODE; i++) {
      const g = Math.sqrt(-2 * Math.log(next())) * Math.cos(2 * Math.PI * next());
      codes[v * CODE + i] = g;
      norm += g * g;
    }
    for (let i = 0; i < CODE; i++) codes[v * CODE + i]! /= Math.sqrt(norm);
  }
  return codes;
}

function matrix(rows: number, cols: number, fill: (m: Float32Array) => void): Float32Array {
  const m = new Float32Array(rows * cols);
  fill(m);
  return m;
}

export async function writeInductionModel(out: string, seed = 1): Promise<void> {
  mkdirSync(out, { recursive: true });
  const u = tokenCodes(seed);
  const theta = Array.from({ length: HEAD_DIM / 2 }, (_, p) => ROPE_THETA ** (-(2 * p) / HEAD_DIM));
  const qScale = SHARP * Math.sqrt(HEAD_DIM);
  const rms = (parts: number) => Math.sqrt(parts / HIDDEN); // parts of unit norm in the residual
  const tensors: [string, number[], Float32Array][] = [];
  const add = (name: string, shape: number[], data: Float32Array) => tensors.push([name, shape, data]);

  add('model.embed_tokens.weight', [VOCAB, HIDDEN], matrix(VOCAB, HIDDEN, (m) => {
    for (let v = 0; v < VOCAB; v++) {
      for (let i = 0; i < CODE; i++) m[v * HIDDEN + T + i] = u[v * CODE + i]!;
      m[v * HIDDEN + ONE] = 1;
    }
  }));
  for (let layer = 0; layer < 2; layer++) {
    const pre = `model.layers.${layer}`;
    const q = new Float32Array(HEADS * HEAD_DIM * HIDDEN), k = new Float32Array(KV_HEADS * HEAD_DIM * HIDDEN);
    const v = new Float32Array(KV_HEADS * HEAD_DIM * HIDDEN), o = new Float32Array(HIDDEN * HEADS * HEAD_DIM);
    const set = (m: Float32Array, cols: number, row: number, col: number, value: number) => { m[row * cols + col] = value; };
    if (layer === 0) {
      for (const [head, back] of [[0, 1], [2, 2]] as const) {
        const kv = head / 2;
        for (let p = 0; p < STILL_PAIR; p++) { // the pairs that turn (the still ones would add a constant)
          set(q, HIDDEN, head * HEAD_DIM + p, ONE, qScale * Math.cos(back * theta[p]!));
          set(q, HIDDEN, head * HEAD_DIM + p + HEAD_DIM / 2, ONE, -qScale * Math.sin(back * theta[p]!));
          set(k, HIDDEN, kv * HEAD_DIM + p, ONE, 1);
        }
        for (let i = 0; i < CODE; i++) {
          set(v, HIDDEN, kv * HEAD_DIM + i, T + i, 1);
          set(o, HEADS * HEAD_DIM, (back === 1 ? P1 : P2) + i, head * HEAD_DIM + i, 1);
        }
      }
    } else {
      for (let i = 0; i < CODE; i++) {
        const lo = STILL_PAIR + i, hi = STILL_PAIR + i + HEAD_DIM / 2; // one still rotary pair
        set(q, HIDDEN, lo, T + i, qScale);
        set(q, HIDDEN, hi, P1 + i, qScale);
        set(k, HIDDEN, lo, P1 + i, 1);
        set(k, HIDDEN, hi, P2 + i, 1);
        set(v, HIDDEN, i, T + i, 1);
        set(o, HEADS * HEAD_DIM, O + i, i, 1);
      }
    }
    const norm = new Float32Array(HIDDEN).fill(rms(layer === 0 ? 2 : 4));
    add(`${pre}.input_layernorm.weight`, [HIDDEN], norm);
    add(`${pre}.self_attn.q_proj.weight`, [HEADS * HEAD_DIM, HIDDEN], q);
    add(`${pre}.self_attn.k_proj.weight`, [KV_HEADS * HEAD_DIM, HIDDEN], k);
    add(`${pre}.self_attn.v_proj.weight`, [KV_HEADS * HEAD_DIM, HIDDEN], v);
    add(`${pre}.self_attn.o_proj.weight`, [HIDDEN, HEADS * HEAD_DIM], o);
    add(`${pre}.post_attention_layernorm.weight`, [HIDDEN], new Float32Array(HIDDEN).fill(1));
    add(`${pre}.mlp.gate_proj.weight`, [INTERMEDIATE, HIDDEN], new Float32Array(INTERMEDIATE * HIDDEN));
    add(`${pre}.mlp.up_proj.weight`, [INTERMEDIATE, HIDDEN], new Float32Array(INTERMEDIATE * HIDDEN));
    add(`${pre}.mlp.down_proj.weight`, [HIDDEN, INTERMEDIATE], new Float32Array(HIDDEN * INTERMEDIATE));
  }
  add('model.norm.weight', [HIDDEN], new Float32Array(HIDDEN).fill(rms(5)));
  add('lm_head.weight', [VOCAB, HIDDEN], matrix(VOCAB, HIDDEN, (m) => {
    for (let t = 0; t < VOCAB; t++) for (let i = 0; i < CODE; i++) m[t * HIDDEN + O + i] = LOGIT * u[t * CODE + i]!;
  }));

  const toWrite: TensorToWrite[] = tensors.map(([name, shape, data]) => ({
    name, dtype: 'F32', shape, bytes: async () => new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  }));
  await writeSafetensorsFile(path.join(out, 'model.safetensors'), toWrite);
  writeFileSync(path.join(out, 'config.json'), `${JSON.stringify({
    architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: HIDDEN, intermediate_size: INTERMEDIATE,
    num_hidden_layers: 2, num_attention_heads: HEADS, num_key_value_heads: KV_HEADS, head_dim: HEAD_DIM,
    vocab_size: VOCAB, max_position_embeddings: CONTEXT, rope_theta: ROPE_THETA, rms_norm_eps: 1e-5,
    hidden_act: 'silu', tie_word_embeddings: false, bos_token_id: 0, eos_token_id: 1, torch_dtype: 'float32',
  }, null, 2)}\n`);
  const tokenizerDir = fileURLToPath(new URL('../models/sotu-llama/', import.meta.url));
  for (const file of ['tokenizer.json', 'tokenizer_config.json']) copyFileSync(path.join(tokenizerDir, file), path.join(out, file));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const opts = new Command('induction-model').requiredOption('--out <dir>', 'where to write the checkpoint')
    .option('--seed <n>', 'token codes seed', '1').parse().opts<{ out: string; seed: string }>();
  await writeInductionModel(opts.out, Number(opts.seed));
  console.log(`wrote ${opts.out}`);
}
