"""Writes a Hugging Face-layout checkpoint of a real model shape with random bf16 weights, for benchmarks of the
product path (`weft generate`, `weft serve`) that must load a model directory the way a user's would.

  python3 bench/make-checkpoint.py OUT_DIR --preset llama-2-7b|llama-3-8b|mistral-7b|mixtral-8x7b [--layers N] [--tiny]

Run from anywhere; needs python3 with numpy, and node (with this repository's node_modules) to read the shape:
the preset is bench/presets.ts's config, read through node so that the two never disagree. Writes:
- config.json: the preset as transformers writes it for LlamaForCausalLM / MixtralForCausalLM (its usual extra
  fields added; shapes exactly the preset's, `--layers` overriding num_hidden_layers);
- model.safetensors, or model-0000I-of-0000N.safetensors + model.safetensors.index.json when over --shard-gb
  (HF's 5 GB default), tensors in HF's names and order, bf16;
- tokenizer.json + tokenizer_config.json: a byte-level BPE whose vocabulary has exactly vocab_size ids: the
  special tokens at the preset's BOS/EOS ids (and <unk> at 0 for the Llama-2 layout), the 256 byte symbols, then
  synthetic words " w<ID>" (ASCII, so every generated id decodes to visible text) that fill every other id.
  No merges: text encodes to one id per byte, which round-trips; the benchmarks send token ids.
Weights: N(0, 0.02) (norm weights 1.0) so activations stay finite. Each tensor is a slice, at a random offset, of
one random pool of 64 Mi elements: writing is disk speed (13.5 GB in about a minute), and a bandwidth-bound decode
reads the same bytes whatever the values. `--tiny` keeps the vocabulary but shrinks every other dimension (hidden
64, 2 layers), for a CPU smoke test.
"""
import argparse, json, os, subprocess, sys, time
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
POOL_ELEMENTS = 64 << 20


def preset_config(name):
    """bench/presets.ts's config for `name`, read through node (the single source of the shapes)."""
    script = ('import("./bench/presets.ts").then((m) => { const c = m.PRESETS[process.argv[1]]; '
              'if (!c) { console.error("unknown preset " + process.argv[1] + "; known: " + Object.keys(m.PRESETS).join(", ")); process.exit(2); } '
              'console.log(JSON.stringify(c)); })')
    out = subprocess.run(['node', '--import', 'tsx', '-e', script, name], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f'make-checkpoint: cannot read preset {name} from bench/presets.ts: {out.stderr.strip()}')
    return json.loads(out.stdout)


def hf_config(preset, layers, tiny):
    """config.json: the preset plus the fields transformers adds when it saves the config."""
    c = dict(preset)
    if tiny:
        mha = c['num_key_value_heads'] == c['num_attention_heads']
        c.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=4 if mha else 2, intermediate_size=128, num_hidden_layers=2)
    if layers:
        c['num_hidden_layers'] = layers
    c.setdefault('head_dim', c['hidden_size'] // c['num_attention_heads'])
    moe = c['model_type'] == 'mixtral'
    extra = dict(transformers_version='4.56.0', initializer_range=0.02, use_cache=True, rope_scaling=None,
                 attention_bias=False, attention_dropout=0.0, pad_token_id=None)
    extra.update(dict(output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0) if moe
                 else dict(mlp_bias=False, pretraining_tp=1))
    return {**extra, **c}


def tensor_shapes(c):
    """(name, shape) in the order HF's state_dict lists them."""
    h, hd, i, v = c['hidden_size'], c['head_dim'], c['intermediate_size'], c['vocab_size']
    q, kv = c['num_attention_heads'] * hd, c['num_key_value_heads'] * hd
    out = [('model.embed_tokens.weight', (v, h))]
    for l in range(c['num_hidden_layers']):
        p = f'model.layers.{l}.'
        out += [(p + 'self_attn.q_proj.weight', (q, h)), (p + 'self_attn.k_proj.weight', (kv, h)),
                (p + 'self_attn.v_proj.weight', (kv, h)), (p + 'self_attn.o_proj.weight', (h, q))]
        if c['model_type'] == 'mixtral':
            out.append((p + 'block_sparse_moe.gate.weight', (c['num_local_experts'], h)))
            for e in range(c['num_local_experts']):
                x = f'{p}block_sparse_moe.experts.{e}.'
                out += [(x + 'w1.weight', (i, h)), (x + 'w2.weight', (h, i)), (x + 'w3.weight', (i, h))]
        else:
            out += [(p + 'mlp.gate_proj.weight', (i, h)), (p + 'mlp.up_proj.weight', (i, h)), (p + 'mlp.down_proj.weight', (h, i))]
        out += [(p + 'input_layernorm.weight', (h,)), (p + 'post_attention_layernorm.weight', (h,))]
    out.append(('model.norm.weight', (h,)))
    if not c.get('tie_word_embeddings', False):
        out.append(('lm_head.weight', (v, h)))
    return out


def bf16_bits(x):
    """float32 array -> bf16 bit patterns (uint16), rounded to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, tensors, pool, rng):
    """One safetensors file of bf16 tensors [(name, shape)], data streamed from `pool` (uint16 bf16 bits)."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape))
        header[name] = dict(dtype='BF16', shape=list(shape), data_offsets=[offset, offset + 2 * n])
        offset += 2 * n
    header['__metadata__'] = dict(format='pt')
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # the data starts 8-aligned, as the reference writer pads it
    one = np.frombuffer(bf16_bits(np.ones(1)).tobytes(), dtype=np.uint16)
    with open(path, 'wb') as f:
        f.write(len(text).to_bytes(8, 'little'))
        f.write(text)
        for name, shape in tensors:
            n = int(np.prod(shape))
            if len(shape) == 1:  # norm weights: 1.0
                f.write(np.repeat(one, n).tobytes())
                continue
            start = int(rng.integers(0, len(pool)))
            while n > 0:
                piece = pool[start:start + n]
                f.write(memoryview(piece))
                n -= len(piece)
                start = 0


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: each byte value's printable stand-in character."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_files(c):
    """tokenizer.json and tokenizer_config.json with exactly vocab_size ids (see the module docstring)."""
    v, bos, eos = c['vocab_size'], c['bos_token_id'], c['eos_token_id']
    llama3 = bos >= 256
    names = {bos: '<|begin_of_text|>' if llama3 else '<s>', eos: '<|end_of_text|>' if llama3 else '</s>'}
    if not llama3 and 0 not in names:
        names[0] = '<unk>'
    vocab = {}
    free = (i for i in range(v) if i not in names)
    for symbol in bytes_to_unicode():
        vocab[symbol] = next(free)
    for i in free:
        vocab[f'Ġw{i}'] = i  # Ġ is the byte-level stand-in of ' '
    for i, name in names.items():
        vocab[name] = i
    assert len(vocab) == v and sorted(vocab.values()) == list(range(v)), 'vocabulary ids must be exactly 0..vocab_size-1'
    added = [dict(id=i, content=name, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, name in sorted(names.items())]
    byte_level = dict(type='ByteLevel', add_prefix_space=False, trim_offsets=True, use_regex=True)
    tokenizer = {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added, 'normalizer': None,
        'pre_tokenizer': byte_level, 'post_processor': None, 'decoder': byte_level,
        'model': dict(type='BPE', dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                      fuse_unk=False, byte_fallback=False, ignore_merges=False, vocab=vocab, merges=[]),
    }
    config = dict(bos_token=names[bos], eos_token=names[eos], add_bos_token=True, tokenizer_class='PreTrainedTokenizerFast',
                  model_max_length=c['max_position_embeddings'])
    return tokenizer, config


def check_tokenizer(out_dir, c):
    """Round-trips a prompt through the Python tokenizers package, where it is installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return 'not checked (no tokenizers package)'
    # a warning, not a failure: what the benchmarks need is that weft's tokenizer (JavaScript) loads it
    text = 'The quick brown fox, 42 times.'
    try:
        tok = Tokenizer.from_file(os.path.join(out_dir, 'tokenizer.json'))
        ids = tok.encode(text, add_special_tokens=False).ids
        back, size = tok.decode(ids), tok.get_vocab_size(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001 (any failure of the package is reported the same way)
        return f'WARNING: the tokenizers package cannot use it: {err}'
    if back != text or size != c['vocab_size']:
        return f'WARNING: tokenizers decodes {text!r} as {back!r} and counts {size} ids, not {c["vocab_size"]}'
    return f'round-trips in the tokenizers package ({len(ids)} ids)'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('out_dir')
    ap.add_argument('--preset', default='llama-2-7b')
    ap.add_argument('--layers', type=int, help='override num_hidden_layers (a cut model)')
    ap.add_argument('--tiny', action='store_true', help='vocabulary kept, every other dimension tiny (CPU smoke tests)')
    ap.add_argument('--shard-gb', type=float, default=5.0, help='largest shard, GB (HF: 5)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--max-positions', type=int,
                    help="override max_position_embeddings (random weights serve any context; Llama-2's 4096 refuses a longer prompt)")
    a = ap.parse_args()
    started = time.time()
    c = hf_config(preset_config(a.preset), a.layers, a.tiny)
    if a.max_positions is not None:
        if a.max_positions <= 0:
            ap.error(f'--max-positions must be positive (got {a.max_positions})')
        c['max_position_embeddings'] = a.max_positions
    os.makedirs(a.out_dir, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    tensors = tensor_shapes(c)
    pool_elements = min(POOL_ELEMENTS, max(int(np.prod(s)) for _, s in tensors))
    pool = bf16_bits(rng.standard_normal(pool_elements, dtype=np.float32) * 0.02)
    shards, size, limit = [[]], 0, a.shard_gb * 1e9
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    for old in os.listdir(a.out_dir):  # a previous run's shards would be picked up by nothing, but take disk
        if old.endswith('.safetensors') or old == 'model.safetensors.index.json':
            os.remove(os.path.join(a.out_dir, old))
    names = ['model.safetensors'] if len(shards) == 1 else [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))]
    for file, shard in zip(names, shards):
        write_safetensors(os.path.join(a.out_dir, file), shard, pool, rng)
    total = sum(2 * int(np.prod(s)) for _, s in tensors)
    if len(shards) > 1:
        index = dict(metadata=dict(total_size=total), weight_map={n: f for f, shard in zip(names, shards) for n, _ in shard})
        with open(os.path.join(a.out_dir, 'model.safetensors.index.json'), 'w') as f:
            json.dump(index, f, indent=2)

    tokenizer, tokenizer_config = tokenizer_files(c)
    with open(os.path.join(a.out_dir, 'tokenizer.json'), 'w') as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    with open(os.path.join(a.out_dir, 'tokenizer_config.json'), 'w') as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(os.path.join(a.out_dir, 'config.json'), 'w') as f:
        json.dump(c, f, indent=2)
    tokenizer_check = check_tokenizer(a.out_dir, c)
    print(json.dumps(dict(checkpoint=a.out_dir, preset=a.preset, layers=c['num_hidden_layers'], tiny=a.tiny, files=len(names),
                          gb=round(total / 1e9, 2), vocab=c['vocab_size'], tokenizer=tokenizer_check, seconds=round(time.time() - started, 1))))


if __name__ == '__main__':
    main()
