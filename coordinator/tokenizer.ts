/**
 * Tokenizer for a Hugging Face model directory, on top of @huggingface/tokenizers (pure JS).
 *
 * Reads `tokenizer.json` (required), `tokenizer_config.json`, `config.json` and `generation_config.json`
 * (each optional) from the model directory.
 *
 * Decisions worth knowing:
 * - `encode` never lets the tokenizer's post-processor add special tokens; weft prepends BOS itself
 *   (`addBos`, default: true when the model has a BOS token, unless `tokenizer_config.json` says
 *   `add_bos_token: false`). A post-processor that adds BOS (Llama-3's TemplateProcessing) gives the same ids.
 * - BOS: `tokenizer_config.json`'s `bos_token` (string or `{content}`), mapped to an id through the
 *   vocabulary / added tokens; else `config.json`'s `bos_token_id`.
 * - EOS: the union of `tokenizer_config.json`'s `eos_token` and the `eos_token_id` (int or list) of
 *   `config.json` and `generation_config.json` (Llama-3-Instruct lists `<|eot_id|>` only there).
 * - `decode` never applies `clean_up_tokenization_spaces` (the BERT-era " ." → "." rewrite): the text is
 *   exactly what the tokens spell, as with the Rust tokenizers, TGI and vLLM's incremental detokenizer.
 *   (tokenizers.js would apply it whenever the config does not mention it; transformers ≥ 4.45 does not.)
 *   This also keeps the stream decoder's output prefix-stable.
 * - `skipSpecial` defaults to true in both `decode` and the stream decoder (text shown to users).
 * - A text is refused before any tokenizer work when it is longer than `maxTextChars(maxTokens)`: it could not
 *   encode into `maxTokens` tokens (see there). Servers run `encode` and long `decode`s in the text threads
 *   (text-pool.ts); the stream decoder's `push` stays on the event loop: it decodes a bounded tail, tens of µs.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { WeftError } from '../core/errors.ts';

export interface EncodeOptions {
  /** prepend the BOS token; default: true when the model has a BOS token (and `add_bos_token` is not false) */
  addBos?: boolean;
}

export interface DecodeOptions {
  /** drop special tokens (BOS, EOS, other special added tokens); default true */
  skipSpecial?: boolean;
}

export interface StreamDecoder {
  /** feed one generated id; returns the text that became final with it (possibly '') */
  push(id: number): string;
  /** returns whatever is still held back (e.g. an incomplete UTF-8 sequence, as U+FFFD) and resets */
  flush(): string;
}

export interface WeftTokenizer {
  encode(text: string, options?: EncodeOptions): number[];
  decode(ids: readonly number[], options?: DecodeOptions): string;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  /** ids the tokenizer knows: 1 + the largest id of the vocabulary and added tokens (config.json's vocab_size, the logits width, may be larger) */
  readonly vocabSize: number;
  /**
   * The most characters of text a prompt of `maxTokens` tokens can hold: `maxTokens` × `charsPerToken`, where
   * charsPerToken is the longest spelling in the vocabulary (added tokens included), at least
   * MIN_CHARS_PER_TOKEN. Why it is a bound: a byte-level BPE token spells one vocabulary character per byte
   * and a SentencePiece piece one per character (byte-fallback pieces, `<0x41>`, spell more than they hold),
   * while every UTF-16 unit of a text is at least one UTF-8 byte; so no token covers more of the text than its
   * spelling is long. The floor leaves room for normalizers that join characters (NFC/NFKC compose a few into one).
   */
  maxTextChars(maxTokens: number): number;
  /** The characters-per-token factor of `maxTextChars`. */
  readonly charsPerToken: number;
  /**
   * Streaming detokenizer: feed ids one at a time, get the text that is now final. Multi-byte UTF-8
   * characters split across tokens are held back while the decoded tail ends in U+FFFD; decoders that
   * depend on context (e.g. SentencePiece's leading-space strip) see the previous token too.
   * Concatenating every `push` and the final `flush` gives `decode(allIds, options)` for text that is valid
   * UTF-8; a run of more than MAX_HELD_IDS ids that stays invalid is emitted as it is (U+FFFD included).
   */
  createStreamDecoder(options?: DecodeOptions): StreamDecoder;
}

type Json = Record<string, unknown>;

/** The floor of charsPerToken (see maxTextChars): generous for byte-level BPE vocabularies. */
export const MIN_CHARS_PER_TOKEN = 32;
/**
 * The stream decoder holds back ids while their text ends in U+FFFD (an incomplete UTF-8 character). A
 * character is at most 4 bytes and every token at least one, so a longer held-back run is invalid UTF-8 for
 * good (a model can emit lone continuation bytes): it is then emitted as it is, which keeps each push's decode
 * bounded instead of growing with the run.
 */
const MAX_HELD_IDS = 8;

function readJson(path: string, required: boolean): Json | null {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new WeftError('WEFT_BAD_MODEL', `cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new WeftError('WEFT_BAD_MODEL', `${path} is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value))
    throw new WeftError('WEFT_BAD_MODEL', `${path} must hold a JSON object`);
  return value as Json;
}

/** `bos_token` / `eos_token` in tokenizer_config.json: a string, `{content: string}` (AddedToken), or null. */
function tokenContent(value: unknown, key: string, path: string): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value === 'string') return value;
  if (typeof value === 'object' && !Array.isArray(value) && typeof (value as Json).content === 'string')
    return (value as { content: string }).content;
  throw new WeftError('WEFT_BAD_MODEL', `${path}: ${key} must be a string or {content: string}, got ${JSON.stringify(value)}`);
}

/** `bos_token_id` / `eos_token_id` in config.json: an int, a list of ints, or null. */
function tokenIds(value: unknown, key: string, path: string): number[] {
  if (value === undefined || value === null) return [];
  const list = Array.isArray(value) ? value : [value];
  for (const id of list)
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0)
      throw new WeftError('WEFT_BAD_MODEL', `${path}: ${key} must be a non-negative integer or a list of them, got ${JSON.stringify(value)}`);
  return list as number[];
}

class HfTokenizer implements WeftTokenizer {
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  readonly vocabSize: number;
  readonly charsPerToken: number;
  readonly #tok: Tokenizer;
  readonly #addBosDefault: boolean;

  constructor(tok: Tokenizer, bos: number | null, eos: number[], vocabSize: number, addBosDefault: boolean, longestSpelling: number) {
    this.#tok = tok;
    this.bosTokenId = bos;
    this.eosTokenIds = Object.freeze([...eos]);
    this.vocabSize = vocabSize;
    this.#addBosDefault = addBosDefault;
    this.charsPerToken = Math.max(MIN_CHARS_PER_TOKEN, longestSpelling);
  }

  maxTextChars(maxTokens: number): number {
    return maxTokens * this.charsPerToken;
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new WeftError('WEFT_BAD_REQUEST', `text to encode must be a string, got ${typeof text}`);
    const ids = text.length === 0 ? [] : this.#tok.encode(text, { add_special_tokens: false }).ids;
    const addBos = options.addBos ?? this.#addBosDefault;
    if (addBos) {
      if (this.bosTokenId === null) throw new WeftError('WEFT_BAD_REQUEST', 'addBos requested but the model has no BOS token');
      return [this.bosTokenId, ...ids];
    }
    return ids;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= this.vocabSize || this.#tok.id_to_token(id) === undefined)
        throw new WeftError('WEFT_BAD_REQUEST', `token id ${String(id)} at index ${i} is not in the tokenizer's vocabulary of ${this.vocabSize} ids`);
    }
    if (ids.length === 0) return '';
    return this.#tok.decode([...ids], { skip_special_tokens: options.skipSpecial ?? true, clean_up_tokenization_spaces: false });
  }

  createStreamDecoder(options: DecodeOptions = {}): StreamDecoder {
    // The prefix/read-offset scheme of TGI and vLLM: `ids[prefix..read)` is context already emitted,
    // `ids[read..)` is pending. Decoding with the context keeps context-dependent decoders right.
    let ids: number[] = [];
    let prefix = 0;
    let read = 0;
    const decode = (from: number, to: number): string => this.decode(ids.slice(from, to), options);
    return {
      push: (id: number): string => {
        ids.push(id);
        const prefixText = decode(prefix, read);
        const text = decode(prefix, ids.length);
        const complete = text.length > prefixText.length && !text.endsWith('\uFFFD');
        if (complete || ids.length - read > MAX_HELD_IDS) {
          const out = text.slice(prefixText.length);
          // keep just the context that produced the emitted text (bounded memory for long streams)
          ids = ids.slice(read);
          prefix = 0;
          read = ids.length;
          return out;
        }
        return '';
      },
      flush: (): string => {
        const out = ids.length > read ? decode(prefix, ids.length).slice(decode(prefix, read).length) : '';
        ids = [];
        prefix = 0;
        read = 0;
        return out;
      },
    };
  }
}

/** Loads the tokenizer of the Hugging Face model directory `modelDir`. Throws WeftError WEFT_BAD_MODEL when it is missing or malformed. */
export function loadTokenizer(modelDir: string): WeftTokenizer {
  const tokPath = join(modelDir, 'tokenizer.json');
  const cfgPath = join(modelDir, 'tokenizer_config.json');
  const modelCfgPath = join(modelDir, 'config.json');
  const genCfgPath = join(modelDir, 'generation_config.json');
  const tokJson = readJson(tokPath, true) as Json;
  const tokCfg = readJson(cfgPath, false) ?? {};
  const modelCfg = readJson(modelCfgPath, false) ?? {};
  const genCfg = readJson(genCfgPath, false) ?? {};

  if (tokJson.model === null || typeof tokJson.model !== 'object')
    throw new WeftError('WEFT_BAD_MODEL', `${tokPath} has no "model" object`);
  if (tokJson.added_tokens !== undefined && !Array.isArray(tokJson.added_tokens))
    throw new WeftError('WEFT_BAD_MODEL', `${tokPath}: "added_tokens" must be a list`);
  let tok: Tokenizer;
  try {
    // tokenizers.js iterates added_tokens unconditionally
    tok = new Tokenizer({ ...tokJson, added_tokens: tokJson.added_tokens ?? [] }, tokCfg);
  } catch (err) {
    throw new WeftError('WEFT_BAD_MODEL', `${tokPath} cannot be loaded: ${(err as Error).message}`, { cause: err });
  }

  let maxId = -1;
  let longestSpelling = 0;
  for (const [spelling, id] of tok.get_vocab(true)) {
    if (id > maxId) maxId = id;
    if (spelling.length > longestSpelling) longestSpelling = spelling.length;
  }
  const vocabSize = maxId + 1;
  if (vocabSize <= 0) throw new WeftError('WEFT_BAD_MODEL', `${tokPath} has an empty vocabulary`);

  const idOf = (content: string, key: string): number => {
    const id = tok.token_to_id(content);
    if (id === undefined) throw new WeftError('WEFT_BAD_MODEL', `${cfgPath}: ${key} ${JSON.stringify(content)} is not in the vocabulary of ${tokPath}`);
    return id;
  };

  const bosContent = tokenContent(tokCfg.bos_token, 'bos_token', cfgPath);
  let bos: number | null = bosContent !== null ? idOf(bosContent, 'bos_token') : null;
  if (bos === null) bos = tokenIds(modelCfg.bos_token_id, 'bos_token_id', modelCfgPath)[0] ?? null;
  if (bos === null) bos = tokenIds(genCfg.bos_token_id, 'bos_token_id', genCfgPath)[0] ?? null;

  const eos = new Set<number>();
  const eosContent = tokenContent(tokCfg.eos_token, 'eos_token', cfgPath);
  if (eosContent !== null) eos.add(idOf(eosContent, 'eos_token'));
  for (const id of tokenIds(modelCfg.eos_token_id, 'eos_token_id', modelCfgPath)) eos.add(id);
  for (const id of tokenIds(genCfg.eos_token_id, 'eos_token_id', genCfgPath)) eos.add(id);

  for (const [what, id] of [['bos', bos], ...[...eos].map((e) => ['eos', e] as const)] as const)
    if (id !== null && id >= vocabSize)
      throw new WeftError('WEFT_BAD_MODEL', `${modelDir}: ${what} token id ${id} is outside the tokenizer's vocabulary of ${vocabSize} ids`);

  const addBosDefault = bos !== null && tokCfg.add_bos_token !== false;
  return new HfTokenizer(tok, bos, [...eos].sort((a, b) => a - b), vocabSize, addBosDefault, longestSpelling);
}
