"""A wide Llama (hidden 2048, several layers) with Hugging Face's own outputs, made on the GPU host so that
the CUDA kernels run at real widths against an outside oracle. Pattern: ../shared/fixtures/make_hf_fixtures.py.

  python3 test/gpu/make-wide-fixture.py OUTDIR

Weights are stored in bf16 (the real-model path); HF computes in fp32 on those stored values, TF32 off.
The tokenizer is the hf-tiny one (vocab 512).
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
out = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
tiny = os.path.join(here, '..', 'fixtures', 'hf-tiny', 'llama-tiny')
os.makedirs(out, exist_ok=True)

cfg = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                  rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=512))
torch.manual_seed(21)
model = LlamaForCausalLM(cfg)
with torch.no_grad():
    for n, p in model.named_parameters():
        if 'norm' in n:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.02)
        p.copy_(p.to(torch.bfloat16).float())  # the stored values; compute stays fp32
model = model.cuda().eval()

ref, tensors = {'prompts': [], 'greedy': []}, {}
g = torch.Generator().manual_seed(22)
for i, L in enumerate([7, 300]):
    ids = torch.randint(2, cfg.vocab_size, (L,), generator=g).tolist()
    x = torch.tensor([ids], device='cuda')
    with torch.no_grad():
        logits = model(x).logits[0].float().cpu()
        gen = model.generate(x, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(x),
                             pad_token_id=0, eos_token_id=None)
    ref['prompts'].append(ids)
    ref['greedy'].append(gen[0, L:].tolist())
    tensors[f'logprobs.{i}'] = torch.log_softmax(logits, -1).contiguous()
    # the gap between HF's top two logits at each generated step tells where bf16 rounding may flip greedy
sd = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
save_file(sd, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
c = cfg.to_dict()
c['torch_dtype'] = 'bfloat16'
c['architectures'] = ['LlamaForCausalLM']
with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(c, f, indent=2, default=str)
for name in ['tokenizer.json', 'tokenizer_config.json']:
    shutil.copy(os.path.join(tiny, name), os.path.join(out, name))
save_file(tensors, os.path.join(out, 'reference.safetensors'))
with open(os.path.join(out, 'reference.json'), 'w') as f:
    json.dump(ref, f)
print('wide fixture written to', out, 'params', sum(v.numel() for v in sd.values()))
