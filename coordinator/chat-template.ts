/**
 * Chat templates: `tokenizer_config.json`'s `chat_template` (a string, or a list of {name, template} where the
 * one named "default" is used), rendered with @huggingface/jinja, a sandboxed re-implementation of Jinja.
 * Templates come only from the model directory, never from requests. It has no work budget of its own, and it
 * runs on the event loop that carries every stream and heartbeat: so the template is rendered once at load with
 * a probe conversation and refused when that takes longer than LOAD_BUDGET_MS, and each request's render is
 * timed and its output capped.
 */
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { WeftError } from '../core/errors.ts';

export interface ChatMessage {
  readonly role: string;
  readonly content: string;
}

const LOAD_BUDGET_MS = 200;
const MAX_OUTPUT_CHARS = 4 << 20;

export class ChatTemplate {
  private constructor(
    private readonly template: Template,
    private readonly specials: { bos_token: string; eos_token: string },
  ) {}

  /** The model's template, or null when tokenizer_config.json has none. Throws on a template that cannot be used. */
  static load(modelDir: string): ChatTemplate | null {
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
    const chat = new ChatTemplate(template, { bos_token: token(config.bos_token), eos_token: token(config.eos_token) });
    const started = performance.now();
    chat.render([
      { role: 'system', content: 'You are a helpful assistant.' },
      { role: 'user', content: 'Hello!' },
      { role: 'assistant', content: 'Hi. How can I help?' },
      { role: 'user', content: 'Tell me a story.' },
    ]);
    const ms = performance.now() - started;
    if (ms > LOAD_BUDGET_MS) throw new WeftError('WEFT_BAD_MODEL', `${path}: chat_template took ${ms.toFixed(0)} ms to render a 4-message probe (budget ${LOAD_BUDGET_MS} ms); refusing it`);
    return chat;
  }

  /** The prompt text for `messages`, ending with the assistant's turn opened. */
  render(messages: readonly ChatMessage[]): string {
    let text: string;
    try {
      text = this.template.render({ messages, add_generation_prompt: true, ...this.specials });
    } catch (err) {
      throw new WeftError('WEFT_BAD_REQUEST', `the chat template failed on these messages: ${(err as Error).message}`);
    }
    if (text.length > MAX_OUTPUT_CHARS) throw new WeftError('WEFT_BAD_REQUEST', `the rendered chat prompt is longer than ${MAX_OUTPUT_CHARS} characters`);
    return text;
  }
}
