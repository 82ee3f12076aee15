#!/usr/bin/env python3
"""
weft's default models, trained from scratch on the U.S. State of the Union addresses (public domain).

Writes three Hugging Face model directories, loadable by `transformers` unchanged and by weft:
  OUT/sotu-llama        the target: Llama architecture, ~11 M parameters, bf16
  OUT/sotu-llama-draft  a ~1.3 M parameter draft with the same tokenizer (speculative decoding)
  OUT/reference         what transformers computes on the shipped weights (the tests' oracle)
and OUT/train-log.json (loss curves, held-out perplexity, the settings used).

Data split: addresses after 2010 are the held-out test set; every 25th earlier address is the validation set
(it picks the checkpoint to keep); the rest is the training set. The byte-level BPE tokenizer is trained on the
training set only.

Usage (torch, transformers, tokenizers, safetensors):
  bash models/recipe/fetch-data.sh /tmp/sotu
  python3 models/recipe/train.py --data /tmp/sotu --out /tmp/trained
  python3 models/recipe/train.py --data /tmp/sotu --out /tmp/tok --tokenizer-only
Seeds are fixed; on one H200 the whole recipe takes a few minutes.
"""
import argparse
import json
import os
import random
import re
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEST_AFTER_YEAR = 2010
VALIDATION_EVERY = 25
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024
# Roles the chat template knows; each is one special token so that a message's role costs one id.
SPECIALS = ['<s>', '</s>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TARGET = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2)
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
# Perplexity protocol, also what `weft score` is checked against: the test stream (BOS + address + EOS, addresses
# in year order) cut into windows of WINDOW + 1 tokens that overlap by one; every token but a window's first is
# predicted from the tokens before it in its window.
WINDOW = 512
SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"“])')


def read_addresses(data_dir):
    """[(year, name, text)] in year order, from YEAR_NAME_PARTY.txt files."""
    out = []
    for name in sorted(os.listdir(data_dir)):
        if not name.endswith('.txt'):
            continue
        with open(os.path.join(data_dir, name), encoding='utf-8') as f:
            text = ' '.join(f.read().split())
        if text:
            out.append((int(name.split('_')[0]), name[:-4], text))
    return out


def split(addresses):
    train, validation, test = [], [], []
    earlier = [a for a in addresses if a[0] <= TEST_AFTER_YEAR]
    for i, a in enumerate(earlier):
        (validation if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(a)
    test = [a for a in addresses if a[0] > TEST_AFTER_YEAR]
    return train, validation, test


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # transformers users get BOS from the post-processor; weft adds BOS itself (same ids).
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
    return tok


def write_tokenizer(tok, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, 'tokenizer.json'))
    config = {
        'tokenizer_class': 'PreTrainedTokenizerFast',
        'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '</s>',
        'add_bos_token': True, 'model_max_length': MAX_POSITIONS,
        'clean_up_tokenization_spaces': False,
        'chat_template': CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def chat_examples(addresses, tok, rng):
    """A user's sentence from an address and the two sentences after it as the answer, in the chat template's
    format, so that the shipped chat template produces an answer that ends with <|end|>."""
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    out = []
    for _, _, text in addresses:
        sentences = SENTENCE_END.split(text)
        for i in range(0, len(sentences) - 3, 4):
            user, answer = sentences[i], ' '.join(sentences[i + 1:i + 3])
            out.append([ids['<s>'], ids['<|user|>'], *tok.encode(user, add_special_tokens=False).ids, ids['<|end|>'],
                        ids['<|assistant|>'], *tok.encode(answer, add_special_tokens=False).ids, ids['<|end|>'], ids['</s>']])
    rng.shuffle(out)
    return out


def stream(addresses, tok):
    bos, eos = tok.token_to_id('<s>'), tok.token_to_id('</s>')
    ids = []
    for _, _, text in addresses:
        ids += [bos, *tok.encode(text, add_special_tokens=False).ids, eos]
    return ids


def windows(ids):
    return [ids[s:s + WINDOW + 1] for s in range(0, len(ids) - 1, WINDOW)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--data', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--tokenizer-only', action='store_true')
    p.add_argument('--steps', type=int, default=800)
    p.add_argument('--draft-steps', type=int, default=1400)
    p.add_argument('--seed', type=int, default=1790)
    args = p.parse_args()

    rng = random.Random(args.seed)
    addresses = read_addresses(args.data)
    train, validation, test = split(addresses)
    print(f'addresses: {len(train)} train, {len(validation)} validation, {len(test)} test (after {TEST_AFTER_YEAR})', flush=True)
    tok = train_tokenizer([t for _, _, t in train])
    tok_dir = os.path.join(args.out, 'tokenizer')
    write_tokenizer(tok, tok_dir)
    train_ids, val_ids, test_ids = stream(train, tok), stream(validation, tok), stream(test, tok)
    chats = chat_examples(train, tok, rng)
    print(f'tokens: {len(train_ids)} train, {len(val_ids)} validation, {len(test_ids)} test; {len(chats)} chat examples '
          f'({sum(map(len, chats))} tokens); {sum(len(t) for _, _, t in train) / len(train_ids):.2f} chars per token', flush=True)
    if args.tokenizer_only:
        return
    from train_torch import train_model, evaluate_and_write
    log = {'seed': args.seed, 'vocab_size': VOCAB_SIZE, 'window': WINDOW, 'test_after_year': TEST_AFTER_YEAR,
           'addresses': {'train': len(train), 'validation': len(validation), 'test': len(test)},
           'tokens': {'train': len(train_ids), 'validation': len(val_ids), 'test': len(test_ids)}, 'models': {}}
    t0 = time.time()
    for name, shape, steps, lr in (('sotu-llama', TARGET, args.steps, 2e-3), ('sotu-llama-draft', DRAFT, args.draft_steps, 4e-3)):
        out_dir = os.path.join(args.out, name)
        log['models'][name] = train_model(shape, out_dir, tok_dir, tok, train_ids, chats, windows(val_ids),
                                          steps=steps, lr=lr, seed=args.seed, max_positions=MAX_POSITIONS)
        log['models'][name]['test'] = evaluate_and_write(out_dir, windows(test_ids))
        print(f'{name}: test perplexity {log["models"][name]["test"]["perplexity"]:.3f} ({time.time() - t0:.0f} s)', flush=True)
        with open(os.path.join(args.out, 'train-log.json'), 'w') as f:
            json.dump(log, f, indent=1)
    try:
        from plot import plot_curves
        plot_curves(log, os.path.join(args.out, 'loss.png'))
    except ImportError as err:  # the curve is in train-log.json either way
        print(f'no loss.png: {err}', flush=True)
    from reference import write_reference
    write_reference(os.path.join(args.out, 'sotu-llama'), os.path.join(args.out, 'reference'), tok, windows(test_ids))


if __name__ == '__main__':
    main()
