"""Training and evaluation for train.py (torch + transformers): one Llama, trained on random windows of the
training stream mixed with chat examples, the checkpoint with the best validation loss kept and saved in bf16."""
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

SEQ = 512
BATCH = 64
CHAT_FRACTION = 0.15  # of each batch's rows: packed chat examples instead of address text
EVAL_EVERY = 100
WARMUP = 100


def llama_config(shape, tok, max_positions):
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=max_positions, rms_norm_eps=1e-5,
        tie_word_embeddings=True, hidden_act='silu', attention_bias=False,
        bos_token_id=tok.token_to_id('<s>'), eos_token_id=tok.token_to_id('</s>'), dtype='bfloat16', **shape)


def batches(train_ids, chats, generator, device):
    """Yields [BATCH, SEQ + 1] int64: random windows of the training stream, and rows of packed chat examples."""
    data = torch.tensor(train_ids, dtype=torch.long)
    n_chat = int(BATCH * CHAT_FRACTION)
    chat_rows = []
    row = []
    for example in chats:
        if len(row) + len(example) > SEQ + 1:
            chat_rows.append(row + example[:SEQ + 1 - len(row)])
            row = []
        else:
            row += example
    chat_data = torch.tensor(chat_rows, dtype=torch.long)
    while True:
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH - n_chat,), generator=generator)
        text = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        picks = torch.randint(0, len(chat_data), (n_chat,), generator=generator)
        yield torch.cat([text, chat_data[picks]]).to(device, non_blocking=True)


@torch.no_grad()
def mean_nll(model, windows, device, dtype):
    """Mean next-token negative log-likelihood over every window (each token but a window's first)."""
    total, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids[:, :-1]).logits.float()
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction='sum').item()
        count += len(w) - 1
    return total / count


def train_model(shape, out_dir, tok_dir, tok, train_ids, chats, val_windows, steps, lr, seed, max_positions):
    device = 'cuda'
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = llama_config(shape, tok, max_positions)
    model = LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)
    schedule = lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    data = batches(train_ids, chats, generator, device)
    curve, best, best_state = [], float('inf'), None
    t0 = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g['lr'] = lr * schedule(step)
        x = next(data)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % EVAL_EVERY == EVAL_EVERY - 1 or step == steps - 1:
            model.eval()
            val = mean_nll(model, val_windows, device, torch.bfloat16)
            model.train()
            curve.append({'step': step + 1, 'train_loss': loss.item(), 'validation_loss': val, 'seconds': time.time() - t0})
            print(f'  {os.path.basename(out_dir)} step {step + 1}: train {loss.item():.3f} validation {val:.3f} ({time.time() - t0:.0f} s)', flush=True)
            if val < best:
                best = val
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    eos = [tok.token_to_id('</s>'), tok.token_to_id('<|end|>')]
    GenerationConfig(bos_token_id=tok.token_to_id('<s>'), eos_token_id=eos).save_pretrained(out_dir)
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    best_step = min(curve, key=lambda c: c['validation_loss'])['step']
    return {'parameters': params, 'shape': shape, 'steps': steps, 'lr': lr, 'batch_tokens': BATCH * SEQ,
            'chat_fraction': CHAT_FRACTION, 'best_step': best_step, 'best_validation_loss': best, 'curve': curve}


def evaluate_and_write(out_dir, test_windows):
    """Held-out perplexity of the saved bf16 weights, computed in fp32 (as weft's CPU backend computes)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to('cuda').eval()
    nll = mean_nll(model, test_windows, 'cuda', torch.float32)
    tokens = sum(len(w) - 1 for w in test_windows)
    return {'windows': len(test_windows), 'predicted_tokens': tokens, 'mean_nll': nll, 'perplexity': math.exp(nll)}
