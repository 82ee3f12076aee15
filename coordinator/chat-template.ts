/**
 * Chat templates: `tokenizer_config.json`'s `chat_template` (a string, or a list of {name, template} where the
 * one named "default" is used), rendered with @huggingface/jinja, a sandboxed re-implementation of Jinja.
 * Templates come only from the model directory, never from requests. Jinja has no work budget of its own, so a
 * server renders only in the text threads (text-pool.ts), where each call has a time budget and a thread that
 * runs over it is stopped. A template is refused at load when rendering a probe conversation takes longer than
 * LOAD_BUDGET_MS; each request's output is capped.
 */
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { WeftError } from '../core/errors.ts';

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

/** A chat template as the event loop sees it: rendering and tokenizing run in the text threads. */
export interface ChatPrompter {
  /** The prompt's token ids for `messages` (rendered, then encoded without an added BOS). */
  promptIds(messages: readonly ChatMessage[]): Promise<number[]>;
}

/** A template must render the probe conversation within this, in ms. */
export const LOAD_BUDGET_MS = 200;
const MAX_OUTPUT_CHARS = 4 << 20;
const PROBE: readonly ChatMessage[] = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Hello!' },
  { role: 'assistant', content: 'Hi. How can I help?' },
  { role: 'user', content: 'Tell me a story.' },
];

export class ChatTemplate {
  private constructor(
    private readonly template: Template,
    private readonly specials: { bos_token: string; eos_token: string },
    private readonly path: string,
  ) {}

  /** The model's template, or null when tokenizer_config.json has none; parsed, not yet probed. Throws on a template that does not parse. */
  static parse(modelDir: string): ChatTemplate | null {
    const path = join(modelDir, 'tokenizer_config.json');
    if (!existsSync(path)) return null;
    const config = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
    let source = config.chat_template;
    if (Array.isArray(source)) source = (source as { name?: unknown; template?: unknown }[]).find((t) => t?.name === 'default')?.template;
    if (source === undefined || source === null) return null;
    if (typeof source !== 'string') throw new WeftError('WEFT_BAD_MODEL', `${path}: chat_template must be a string or a list of {name, template}`);
    const token = (v: unknown): string => (typeof v === 'string' ? v : typeof (v as { content?: unknown })?.content === 'string' ? (v as { content: string }).content : '');
    let template: Template;
    try {
      template = new Template(source);
    } catch (err) {
      throw new WeftError('WEFT_BAD_MODEL', `${path}: chat_template does not parse: ${(err as Error).message}`);
    }
    return new ChatTemplate(template, { bos_token: token(config.bos_token), eos_token: token(config.eos_token) }, path);
  }

  /** The model's template, parsed and probed here, on the calling thread; null when it has none. Throws on a template that cannot be used. */
  static load(modelDir: string): ChatTemplate | null {
    const chat = ChatTemplate.parse(modelDir);
    chat?.probe();
    return chat;
  }

  /**
   * Renders a 4-message conversation until the fastest render is known; throws WEFT_BAD_MODEL when that fails or
   * the fastest render takes longer than LOAD_BUDGET_MS. The fastest: the first also pays for compiling, and a
   * loaded machine (a start-up beside other processes) can starve the thread (CI refused the tests' template, a
   * few hundred loop turns on the probe, at 227, 264 and 285 ms), so a render costs the less of its wall time and
   * the process's CPU time (a starved thread spends little), and one over budget is tried again while the probe
   * has spent less than 4 budgets (the pool's deadline, 5 budgets, bounds one that never finishes).
   */
  probe(): void {
    const began = performance.now();
    let ms = Infinity;
    for (let round = 0; ; round++) {
      const started = performance.now(), cpu = process.cpuUsage();
      try {
        this.render(PROBE);
      } catch (err) {
        throw new WeftError('WEFT_BAD_MODEL', `${this.path}: chat_template fails on a 4-message probe: ${(err as Error).message}`);
      }
      const spent = process.cpuUsage(cpu);
      ms = Math.min(ms, performance.now() - started, (spent.user + spent.system) / 1000);
      if (ms <= LOAD_BUDGET_MS / 10) break;
      if (round >= 1 && (ms <= LOAD_BUDGET_MS || performance.now() - began >= 4 * LOAD_BUDGET_MS)) break;
    }
    if (ms > LOAD_BUDGET_MS) throw new WeftError('WEFT_BAD_MODEL', `${this.path}: chat_template took ${ms.toFixed(0)} ms to render a 4-message probe (budget ${LOAD_BUDGET_MS} ms); refusing it`);
  }

  /** The prompt text for `messages`, ending with the assistant's turn opened. */
  render(messages: readonly ChatMessage[], maxChars = MAX_OUTPUT_CHARS): string {
    let text: string;
    try {
      text = this.template.render({ messages, add_generation_prompt: true, ...this.specials });
    } catch (err) {
      throw new WeftError('WEFT_BAD_REQUEST', `the chat template failed on these messages: ${(err as Error).message}`);
    }
    if (text.length > maxChars) throw new WeftError('WEFT_BAD_REQUEST', `the rendered chat prompt is ${text.length} characters long; the limit is ${maxChars}`);
    return text;
  }
}
