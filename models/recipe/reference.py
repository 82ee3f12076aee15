"""What transformers computes on the shipped target (fp32 arithmetic on its bf16 weights, TF32 off): the oracle
weft's tests compare against. Writes reference.json and reference.safetensors in the hf-tiny fixtures' format
(prompts, greedy, text; logprobs.I [prompt length, vocab] f32), plus the perplexity of the first test windows
and a chat answer."""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

GREEDY_TOKENS = 24
CHECKED_WINDOWS = 4
TEXTS = ['The state of the Union is strong.', 'Fellow-Citizens of the Senate and House of Representatives:',
         'In 1861, the Congress—“at last”—acted.', '']
CHAT = [{'role': 'user', 'content': 'What should the Congress do about the tariff?'}]


@torch.no_grad()
def greedy(model, ids, n, stop=None):
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids + out], device='cuda')).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        if nxt == stop:
            break
    return out


def write_reference(model_dir, ref_dir, tok, test_windows):
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(ref_dir, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to('cuda').eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    bos = tok.token_to_id('<s>')
    chat_ids = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if hasattr(chat_ids, 'keys'):
        chat_ids = chat_ids['input_ids']
    chat_ids = list(chat_ids)
    prompts = [[bos, *tok.encode('The state of the Union is', add_special_tokens=False).ids], chat_ids, test_windows[0][:40]]
    tensors, greedy_out = {}, []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            logits = model(torch.tensor([p], device='cuda')).logits[0].float()
            tensors[f'logprobs.{i}'] = F.log_softmax(logits, dim=-1).cpu().contiguous()
            greedy_out.append(greedy(model, p, GREEDY_TOKENS))
        nll, count = 0.0, 0
        for w in test_windows[:CHECKED_WINDOWS]:
            logits = model(torch.tensor([w[:-1]], device='cuda')).logits[0].float()
            nll += F.cross_entropy(logits, torch.tensor(w[1:], device='cuda'), reduction='sum').item()
            count += len(w) - 1
    end = tok.token_to_id('<|end|>')
    answer = greedy(model, chat_ids, 64, stop=end)
    reference = {
        'prompts': prompts,
        'greedy': greedy_out,
        'text': [{'text': t, 'ids': tok.encode(t, add_special_tokens=False).ids} for t in TEXTS],
        'perplexity': {'windows': test_windows[:CHECKED_WINDOWS], 'predicted_tokens': count, 'mean_nll': nll / count,
                       'perplexity': math.exp(nll / count)},
        'chat': {'messages': CHAT, 'prompt_ids': chat_ids, 'greedy_ids': answer,
                 'greedy_text': hf_tok.decode(answer, skip_special_tokens=True)},
        'generated_text': hf_tok.decode(greedy_out[0], skip_special_tokens=True),
        'note': 'transformers fp32 forward (TF32 off) on the bf16 weights of models/sotu-llama; greedy is argmax per step, no EOS stop',
    }
    save_file(tensors, os.path.join(ref_dir, 'reference.safetensors'))
    with open(os.path.join(ref_dir, 'reference.json'), 'w') as f:
        json.dump(reference, f)
    print('reference: "The state of the Union is' + reference['generated_text'] + '"', flush=True)
    print('chat answer: ' + reference['chat']['greedy_text'], flush=True)
