"""Fixtures for test/gpu/precision.test.ts, made on the GPU host (torch, transformers):

  python3 test/gpu/make-precision-fixtures.py OUT_DIR

Writes OUT_DIR/<model>/ for each model below: a bf16 checkpoint with random weights (std 0.02 like a trained
model's, norms 1; hub tensor names), its config.json, the hf-tiny tokenizer (vocab 512), and precision.json with
Hugging Face's own outputs on fixed prompts, twice: the model loaded in fp32 (the stored bf16 weights upcast,
TF32 off), the reference, and loaded in bf16 (dtype bfloat16, the default attention implementation), HF's own
bf16 path. For each: `logprobs[i][j]` = log p(prompts[i][j + 1] | prompts[i][..j]), and `greedy[i]`, the 16-token
greedy continuation (generate, KV cache); fp32 also `greedyGap[i][j]`, its top-1 minus top-2 log-prob at step j.
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
out = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
tokenizer_dir = os.path.join(here, '..', 'fixtures', 'hf-tiny', 'llama-tiny')
PROMPT_LENS = [24, 40, 72, 100]  # the longer two run weft's prefill attention kernel (over 64 tokens)
NEW_TOKENS = 16

base = dict(vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
moe = dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.0)
# (name, seed, family, config): query/KV heads 6/2 (groups of 3) split at TP 1 and 2; 12/4 also at TP 4.
MODELS = [
    ('mixtral-e8-h6-hd64', 31, 'mixtral', dict(base, **moe, hidden_size=512, intermediate_size=768, num_hidden_layers=3,
                                                num_attention_heads=6, num_key_value_heads=2, head_dim=64)),
    ('mixtral-e8-h12-hd64', 32, 'mixtral', dict(base, **moe, hidden_size=768, intermediate_size=1024, num_hidden_layers=2,
                                                 num_attention_heads=12, num_key_value_heads=4, head_dim=64)),
    ('llama-h6-hd32', 33, 'llama', dict(base, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=6, num_key_value_heads=2, head_dim=32)),
    ('llama-h6-hd128', 34, 'llama', dict(base, hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=128)),
]


def hub_shapes(family, c):
    """Every tensor of the checkpoint by its hub name, with its shape."""
    H, I, V, hd = c['hidden_size'], c['intermediate_size'], c['vocab_size'], c['head_dim']
    q, kv = c['num_attention_heads'] * hd, c['num_key_value_heads'] * hd
    shapes = {'model.embed_tokens.weight': [V, H], 'model.norm.weight': [H], 'lm_head.weight': [V, H]}
    for i in range(c['num_hidden_layers']):
        p = f'model.layers.{i}.'
        shapes.update({p + 'input_layernorm.weight': [H], p + 'post_attention_layernorm.weight': [H],
                       p + 'self_attn.q_proj.weight': [q, H], p + 'self_attn.k_proj.weight': [kv, H],
                       p + 'self_attn.v_proj.weight': [kv, H], p + 'self_attn.o_proj.weight': [H, q]})
        if family == 'mixtral':
            shapes[p + 'block_sparse_moe.gate.weight'] = [c['num_local_experts'], H]
            for e in range(c['num_local_experts']):
                x = f'{p}block_sparse_moe.experts.{e}.'
                shapes.update({x + 'w1.weight': [I, H], x + 'w3.weight': [I, H], x + 'w2.weight': [H, I]})
        else:
            shapes.update({p + 'mlp.gate_proj.weight': [I, H], p + 'mlp.up_proj.weight': [I, H],
                           p + 'mlp.down_proj.weight': [H, I]})
    return shapes


def write_checkpoint(d, seed, family, c):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in sorted(hub_shapes(family, c).items()):
        w = torch.ones(shape) if name.endswith('norm.weight') else torch.randn(shape, generator=g) * 0.02
        sd[name] = w.to(torch.bfloat16).contiguous()
    save_file(sd, os.path.join(d, 'model.safetensors'), metadata={'format': 'pt'})
    config_class = MixtralConfig if family == 'mixtral' else LlamaConfig
    config = config_class(**c).to_dict()
    config.pop('torch_dtype', None)  # transformers 5 writes `dtype`; weft reads either
    config['dtype'] = 'bfloat16'
    config['architectures'] = ['MixtralForCausalLM' if family == 'mixtral' else 'LlamaForCausalLM']
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, default=str)
    for name in ['tokenizer.json', 'tokenizer_config.json']:
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(d, name))
    return sum(float((w.double() ** 2).sum()) for w in sd.values())


def load(d, family, dtype, sum_squares):
    model_class = MixtralForCausalLM if family == 'mixtral' else LlamaForCausalLM
    model = model_class.from_pretrained(d, dtype=dtype).cuda().eval()
    params = list(model.parameters())
    assert all(p.dtype == dtype for p in params), f'{d}: not every parameter is {dtype}'
    # every parameter came from the file (a missing one would be freshly initialised: another sum of squares)
    loaded = sum(float((p.detach().double() ** 2).sum()) for p in params)
    assert abs(loaded - sum_squares) <= 1e-9 * sum_squares, f'{d}: {dtype} parameters {loaded}, file {sum_squares}'
    return model


def next_token_logprobs(model, ids):
    x = torch.tensor([ids], device='cuda')
    with torch.no_grad():
        logprobs = torch.log_softmax(model(x).logits[0].float(), -1)  # bf16 logits stay as HF rounded them
    return logprobs[:-1].gather(1, x[0, 1:, None])[:, 0].tolist()


def greedy(model, ids):
    x = torch.tensor([ids], device='cuda')
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(x),
                             pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    assert len(tokens) == NEW_TOKENS, f'generate gave {len(tokens)} tokens, not {NEW_TOKENS}'
    gaps = []
    for scores in out.scores:
        top = torch.log_softmax(scores[0].float(), -1).topk(2).values
        gaps.append(float(top[0] - top[1]))
    return tokens, gaps


for name, seed, family, c in MODELS:
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    sum_squares = write_checkpoint(d, seed, family, c)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(2, c['vocab_size'], (n,), generator=g).tolist() for n in PROMPT_LENS]
    ref = {'model': name, 'prompts': prompts}
    for key, dtype in [('fp32', torch.float32), ('bf16', torch.bfloat16)]:
        model = load(d, family, dtype, sum_squares)
        runs = [greedy(model, p) for p in prompts]
        ref[key] = {'logprobs': [next_token_logprobs(model, p) for p in prompts], 'greedy': [t for t, _ in runs]}
        if key == 'fp32':
            ref[key]['greedyGap'] = [gaps for _, gaps in runs]
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(d, 'precision.json'), 'w') as f:
        json.dump(ref, f)
    worst = max(abs(a - b) for p, q in zip(ref['fp32']['logprobs'], ref['bf16']['logprobs']) for a, b in zip(p, q))
    print(f'{name}: HF bf16 max |delta logprob| {worst:.4f}, written to {d}')
