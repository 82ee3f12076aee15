/**
 * One text thread of the pool (text-pool.ts): loads the model's tokenizer and, when asked, its chat template
 * once, then answers calls one at a time. It holds no budget of its own: the pool stops a thread whose call
 * runs too long. Errors go back as {code, message} (WeftError's fields) so they keep their code across.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { readlinkSync } from 'node:fs';
import { constants, setPriority } from 'node:os';
import { WeftError, isWeftError } from '../core/errors.ts';
import { loadTokenizer, type WeftTokenizer } from './tokenizer.ts';
import { ChatTemplate } from './chat-template.ts';
import { contextName } from './sampling-params.ts';
import type { TextCall, TextThreadData, TextThreadMessage } from './text-pool.ts';

const port = parentPort!;
const post = (message: TextThreadMessage, transfer: ArrayBuffer[] = []): void => port.postMessage(message, transfer);
const failure = (err: unknown): { code: string; message: string } => ({
  code: isWeftError(err) ? err.code : 'WEFT_WORKER_ERROR',
  message: (err as Error)?.message ?? String(err),
});

/** Token ids, refused when there are more than the context holds (the message validatePromptIds gives). */
function fitting(ids: number[], maxTokens: number | undefined, limitName: string | undefined): Int32Array {
  if (maxTokens !== undefined && ids.length > maxTokens) throw new WeftError('WEFT_BAD_REQUEST', `prompt of ${ids.length} tokens exceeds ${limitName ?? contextName(maxTokens, false)}`);
  return Int32Array.from(ids);
}

function run(tokenizer: WeftTokenizer, chat: ChatTemplate | null, call: TextCall): string | Int32Array | null {
  switch (call.op) {
    case 'encode':
      return fitting(tokenizer.encode(call.text, call.addBos === undefined ? {} : { addBos: call.addBos }), call.maxTokens, call.contextName);
    case 'decode':
      return tokenizer.decode(call.ids, call.skipSpecial === undefined ? {} : { skipSpecial: call.skipSpecial });
    case 'chat':
      if (!chat) throw new WeftError('WEFT_BAD_REQUEST', 'the model has no chat template');
      return fitting(tokenizer.encode(chat.render(call.messages, call.maxChars), { addBos: false }), call.maxTokens, call.contextName);
    case 'probe':
      chat?.probe();
      return null;
  }
}

/**
 * Below the event loop's priority: on a machine with few cores a busy text thread (a long prompt, a template
 * running to its budget) then takes a core from the event loop only when the loop does not need it. Linux gives
 * each thread its own nice value (setpriority on the thread's id); elsewhere this does nothing.
 */
function lowerPriority(): void {
  try {
    setPriority(Number(readlinkSync('/proc/thread-self').split('/').pop()), constants.priority.PRIORITY_BELOW_NORMAL);
  } catch {
    // not Linux: the thread keeps the process's priority
  }
}

lowerPriority();
try {
  const data = workerData as TextThreadData;
  const tokenizer = loadTokenizer(data.modelDir);
  const chat = data.chatTemplate ? ChatTemplate.parse(data.modelDir) : null;
  port.on('message', ({ id, call }: { id: number; call: TextCall }) => {
    try {
      const value = run(tokenizer, chat, call);
      post({ type: 'result', id, value }, value instanceof Int32Array ? [value.buffer as ArrayBuffer] : []);
    } catch (err) {
      post({ type: 'error', id, ...failure(err) });
    }
  });
  post({ type: 'ready', hasChatTemplate: chat !== null });
} catch (err) {
  post({ type: 'failed', ...failure(err) });
}
