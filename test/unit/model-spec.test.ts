import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, describe, it } from 'node:test';
import { type ModelSpec, parseModelConfig, readModelSpec, ropeInvFreq } from '../../core/model-spec.ts';
import { weftError } from '../helpers/safetensors-files.ts';

const FIXTURES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../fixtures/hf-tiny');
const fixture = (name: string) => path.join(FIXTURES, name);
const config = (name: string) => JSON.parse(readFileSync(path.join(fixture(name), 'config.json'), 'utf8')) as Record<string, unknown>;
const tmp = mkdtempSync(path.join(tmpdir(), 'weft-model-spec-'));
after(() => rmSync(tmp, { recursive: true, force: true }));


/** A config.json object: llama-tiny's with some fields changed (undefined deletes). */
function llamaWith(changes: Record<string, unknown>): Record<string, unknown> {
  const cfg = { ...config('llama-tiny'), ...changes };
  for (const [k, v] of Object.entries(changes)) if (v === undefined) delete cfg[k];
  return cfg;
}

const LLAMA_TINY: ModelSpec = {
  family: 'llama', architecture: 'LlamaForCausalLM', hidden: 64, nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16,
  ffnDim: 176, vocabSize: 512, maxContext: 512, rmsEps: 1e-5, ropeTheta: 10000, ropeScaling: null,
  tieWordEmbeddings: false, dtype: 'f32', nExperts: 0, nExpertsPerToken: 0, bosTokenId: 0, eosTokenIds: [1],
};

describe('readModelSpec on the hf-tiny fixtures', () => {
  it('llama-tiny: classic layout (top-level rope_theta, rope_scaling null, torch_dtype)', () => {
    const spec = readModelSpec(fixture('llama-tiny'));
    assert.deepEqual(spec, LLAMA_TINY);
    assert.deepEqual(JSON.parse(JSON.stringify(spec)), spec); // plain data, travels over msgpack
  });

  it('llama-tiny-bf16: newer layout (rope_parameters, dtype)', () => {
    assert.deepEqual(readModelSpec(fixture('llama-tiny-bf16')), { ...LLAMA_TINY, dtype: 'bf16' });
  });

  it('llama3-tiny: Llama 3 rope scaling, tied embeddings', () => {
    assert.deepEqual(readModelSpec(fixture('llama3-tiny')), {
      ...LLAMA_TINY, hidden: 128, nHeads: 8, ffnDim: 256, ropeTheta: 500000, tieWordEmbeddings: true,
      ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 64 },
    });
  });

  it('mixtral-tiny: experts; head_dim null means hidden / heads', () => {
    assert.deepEqual(readModelSpec(fixture('mixtral-tiny')), {
      ...LLAMA_TINY, family: 'mixtral', architecture: 'MixtralForCausalLM', ffnDim: 96, nExperts: 4, nExpertsPerToken: 2,
    });
  });

  it('takes the dtype from the weights when config.json states none (HF dtype "auto")', () => {
    const dir = mkdtempSync(path.join(tmp, 'nodtype-'));
    writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config('llama-tiny-bf16'), dtype: undefined }));
    copyFileSync(path.join(fixture('llama-tiny-bf16'), 'model.safetensors'), path.join(dir, 'model.safetensors'));
    assert.equal(readModelSpec(dir).dtype, 'bf16');
  });
});

describe('readModelSpec refusals', () => {
  it('names a missing directory, a missing config.json and invalid JSON', () => {
    const missing = path.join(tmp, 'no-such-model');
    assert.throws(() => readModelSpec(missing), weftError('WEFT_BAD_MODEL', /model directory .*no-such-model does not exist/));
    const empty = mkdtempSync(path.join(tmp, 'empty-'));
    assert.throws(() => readModelSpec(empty), weftError('WEFT_BAD_MODEL', /empty-\w+\/config\.json: cannot read the model's config\.json/));
    writeFileSync(path.join(empty, 'config.json'), '{"hidden_size": 64,');
    assert.throws(() => readModelSpec(empty), weftError('WEFT_BAD_MODEL', /empty-\w+\/config\.json: not valid JSON/));
  });

  it('names missing and malformed fields', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [llamaWith({ hidden_size: undefined }), /field "hidden_size" is missing/],
      [llamaWith({ num_hidden_layers: 2.5 }), /field "num_hidden_layers" must be an integer >= 1, got 2\.5/],
      [llamaWith({ vocab_size: '512' }), /field "vocab_size" must be an integer >= 1, got "512"/],
      [llamaWith({ num_key_value_heads: 3 }), /num_attention_heads 4 is not a multiple of num_key_value_heads 3/],
      [llamaWith({ head_dim: undefined, hidden_size: 66 }), /head_dim is absent and hidden_size 66 is not a multiple of num_attention_heads 4/],
      [llamaWith({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4 } }), /field "rope_scaling\.original_max_position_embeddings" is missing/],
      [llamaWith({ rope_scaling: { rope_type: 'linear' } }), /field "rope_scaling\.factor" is missing/],
      [llamaWith({ torch_dtype: undefined }), /neither "dtype" nor "torch_dtype" is set/],
      [llamaWith({ architectures: 'LlamaForCausalLM' }), /field "architectures" must be a non-empty list of strings/],
      [{ ...llamaWith({ architectures: undefined }), model_type: 'gpt2' }, /field "architectures" is missing and model_type "gpt2" names no supported model/],
    ];
    for (const [cfg, pattern] of cases) {
      assert.throws(() => parseModelConfig(cfg, '/m/config.json'), weftError('WEFT_BAD_MODEL', new RegExp(`^/m/config\\.json: ${pattern.source}`)));
    }
  });

  it('refuses what weft does not implement with WEFT_UNSUPPORTED_MODEL, naming it', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [llamaWith({ architectures: ['GPT2LMHeadModel'] }), /architecture GPT2LMHeadModel is not supported; weft runs LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM/],
      [llamaWith({ hidden_act: 'gelu' }), /hidden_act "gelu" is not supported/],
      [llamaWith({ attention_bias: true }), /attention_bias: true is not supported/],
      [llamaWith({ mlp_bias: true }), /mlp_bias: true is not supported/],
      [llamaWith({ rope_scaling: { rope_type: 'yarn', factor: 4 } }), /rope_scaling\.rope_type "yarn" is not supported; weft supports default, linear, llama3/],
      [llamaWith({ rope_scaling: { type: 'dynamic', factor: 2 } }), /rope_scaling\.rope_type "dynamic" is not supported/],
      [{ ...config('llama-tiny-bf16'), rope_parameters: { rope_theta: 1e4, rope_type: 'longrope' } }, /rope_parameters\.rope_type "longrope" is not supported/],
      [llamaWith({ torch_dtype: 'float8_e4m3fn' }), /torch_dtype "float8_e4m3fn" is not supported; weft loads float32, float16, bfloat16/],
      [llamaWith({ quantization_config: { quant_method: 'awq' } }), /quantization_config bits undefined: weft reads 4-bit awq checkpoints/],
      [llamaWith({ quantization_config: { quant_method: 'gptq', bits: 4, group_size: 8, checkpoint_format: 'marlin' } }), /quantization_config checkpoint_format "marlin" is not gptq or gptq_v2/],
      [llamaWith({ quantization_config: { quant_method: 'bitsandbytes' } }), /quantized checkpoints are not supported \(quantization_config\.quant_method "bitsandbytes"\); weft reads 4-bit gptq and awq/],
      [llamaWith({ partial_rotary_factor: 0.5 }), /partial_rotary_factor 0\.5 is not supported/],
    ];
    for (const [cfg, pattern] of cases) {
      assert.throws(() => parseModelConfig(cfg, '/m/config.json'), weftError('WEFT_UNSUPPORTED_MODEL', new RegExp(`^/m/config\\.json: ${pattern.source}`)));
    }
  });
});

describe('parseModelConfig variants', () => {
  it('Mistral: a sliding window shorter than the context caps maxContext, and says so', () => {
    const notes: string[] = [];
    const mistral = llamaWith({ architectures: ['MistralForCausalLM'], model_type: 'mistral', max_position_embeddings: 32768, sliding_window: 4096 });
    const spec = parseModelConfig(mistral, 'mistral/config.json', { onNote: (n) => notes.push(n) });
    assert.equal(spec.family, 'llama');
    assert.equal(spec.architecture, 'MistralForCausalLM');
    assert.equal(spec.maxContext, 4096);
    assert.equal(notes.length, 1);
    assert.match(notes[0]!, /sliding_window 4096 < max_position_embeddings 32768: context capped at 4096 tokens/);
    assert.equal(parseModelConfig({ ...mistral, sliding_window: null }, 'm').maxContext, 32768);
    assert.equal(parseModelConfig({ ...mistral, sliding_window: 32768 }, 'm').maxContext, 32768);
    // Llama has no sliding window: the field is ignored.
    assert.equal(parseModelConfig(llamaWith({ sliding_window: 16 }), 'm').maxContext, 512);
  });

  it('eos as a list, bos absent, head_dim absent, defaults for absent rope_theta and rms_norm_eps', () => {
    const spec = parseModelConfig(
      llamaWith({ eos_token_id: [128001, 128008, 128009], bos_token_id: undefined, head_dim: undefined, rope_theta: undefined, rope_scaling: undefined, rms_norm_eps: undefined, num_key_value_heads: undefined }),
      'm',
    );
    assert.deepEqual(spec.eosTokenIds, [128001, 128008, 128009]);
    assert.equal(spec.bosTokenId, null);
    assert.equal(spec.headDim, 16);
    assert.equal(spec.nKvHeads, 4);
    assert.equal(spec.ropeTheta, 10000); // LlamaConfig defaults
    assert.equal(spec.rmsEps, 1e-6);
    assert.deepEqual(parseModelConfig(llamaWith({ eos_token_id: null }), 'm').eosTokenIds, []);
  });

  it('rope scaling: linear, the old "type" key, "default", and the newer rope_parameters with llama3', () => {
    assert.deepEqual(parseModelConfig(llamaWith({ rope_scaling: { type: 'linear', factor: 4 } }), 'm').ropeScaling, { type: 'linear', factor: 4 });
    assert.equal(parseModelConfig(llamaWith({ rope_scaling: { rope_type: 'default' } }), 'm').ropeScaling, null);
    const newer = { ...config('llama-tiny-bf16'), rope_parameters: { rope_theta: 500000, rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 } };
    const spec = parseModelConfig(newer, 'm');
    assert.equal(spec.ropeTheta, 500000);
    assert.deepEqual(spec.ropeScaling, { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 });
  });
});

describe('ropeInvFreq', () => {
  it('default: 1 / theta^(2i/d) in f32', () => {
    const inv = ropeInvFreq(LLAMA_TINY);
    assert.equal(inv.length, 8);
    inv.forEach((x, i) => assert.equal(x, Math.fround(1 / Math.fround(Math.pow(10000, (2 * i) / 16)))));
  });

  it('linear: the default divided by the factor', () => {
    const base = ropeInvFreq(LLAMA_TINY);
    const scaled = ropeInvFreq({ ...LLAMA_TINY, ropeScaling: { type: 'linear', factor: 4 } });
    scaled.forEach((x, i) => assert.equal(x, Math.fround(base[i]! / 4)));
  });

  // Expected values: HF's _compute_llama3_parameters replayed in numpy float32 (torch's `x / t` is
  // `t.reciprocal() * x`), with a correctly rounded powf; torch's vectorised powf may differ by one ulp.
  it('llama3: matches HF for llama3-tiny (theta 5e5, d 16, factor 8, original context 64)', () => {
    const spec = readModelSpec(fixture('llama3-tiny'));
    assert.deepEqual(Array.from(ropeInvFreq(spec)), [
      1.0, 0.07940301299095154, 0.004700753837823868, 0.0009115831344388425, 0.00017677668074611574,
      3.428102354519069e-5, 6.647869668086059e-6, 1.289173155782919e-6,
    ]);
  });

  it('llama3: matches HF for Llama 3.1 8B (d 128, original context 8192): high, medium and low bands', () => {
    const spec: ModelSpec = {
      ...LLAMA_TINY, headDim: 128, ropeTheta: 500000,
      ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 },
    };
    const inv = ropeInvFreq(spec);
    assert.equal(inv.length, 64);
    const expected: [number, number][] = [
      [0, 1.0], [2, 0.663601279258728], [15, 0.046164050698280334], [28, 0.0032114461064338684], // high: kept
      [29, 0.0021665706299245358], [30, 0.0013718936825171113], [31, 0.0008567514596506953], // medium: smoothed
      [32, 0.0005248460220173001], [48, 6.647869668086059e-6], [63, 3.068925877869333e-7], // low: / factor
    ];
    for (const [i, v] of expected) assert.equal(inv[i], v, `inv_freq[${i}]`);
  });
});
