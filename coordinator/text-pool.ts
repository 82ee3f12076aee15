/**
 * The text threads: tokenization, long detokenization and chat-template rendering run here, on a few
 * node:worker_threads, never on the event loop that carries every stream, RPC frame and heartbeat (the
 * tokenizer is pure JS: about 2 µs a character, so a 4 MB prompt is seconds of work, and a template's cost is
 * whatever its author wrote). Each thread loads the tokenizer (and the chat template) once (text-thread.ts).
 *
 * - Every call has a time budget counted from the moment a thread takes it. A call over budget is answered
 *   with WEFT_TIMEOUT naming the budget, and its thread is terminated (V8 stops even a tight loop) and
 *   replaced, so a pathological template cannot hold a thread.
 * - Calls wait for a free thread in a bounded queue; one more is refused with WEFT_BUSY.
 * - A thread that dies (out of memory, a bug) fails its call with WEFT_WORKER_ERROR and is replaced.
 * - `close()` fails what is waiting with WEFT_CLOSED and terminates every thread. An idle thread does not keep
 *   the process alive (it is unref'd between calls), so a pool that is never closed cannot hang an exit.
 */
import { Worker } from 'node:worker_threads';
import { WeftError, type WeftErrorCode } from '../core/errors.ts';
import { LOAD_BUDGET_MS, type ChatMessage } from './chat-template.ts';
import type { DecodeOptions, EncodeOptions } from './tokenizer.ts';
import { RUNS_SOURCES, moduleUrl } from './package-layout.ts';

/** What a thread is asked to do. `maxTokens`: refuse a result longer than the context (`contextName` names it). */
export type TextCall =
  | { readonly op: 'encode'; readonly text: string; readonly addBos?: boolean; readonly maxTokens?: number; readonly contextName?: string }
  | { readonly op: 'decode'; readonly ids: readonly number[]; readonly skipSpecial?: boolean }
  | { readonly op: 'chat'; readonly messages: readonly ChatMessage[]; readonly maxChars: number; readonly maxTokens?: number; readonly contextName?: string }
  | { readonly op: 'probe' };

/** The thread's workerData. */
export interface TextThreadData {
  readonly modelDir: string;
  readonly chatTemplate: boolean;
}

/** What a thread posts back: once `ready` or `failed`, then one `result` or `error` per call. */
export type TextThreadMessage =
  | { readonly type: 'ready'; readonly hasChatTemplate: boolean }
  | { readonly type: 'failed'; readonly code: string; readonly message: string }
  | { readonly type: 'result'; readonly id: number; readonly value: string | Int32Array | null } // Int32Array: token ids
  | { readonly type: 'error'; readonly id: number; readonly code: string; readonly message: string };

export interface TextPoolOptions {
  /** Hugging Face model directory (tokenizer.json, tokenizer_config.json). */
  readonly modelDir: string;
  readonly threads: number;
  /** time budget of one call, in ms, from when a thread takes it */
  readonly budgetMs: number;
  /** calls waiting for a free thread at most; more are refused with WEFT_BUSY */
  readonly maxQueue: number;
  /** load the model's chat template too, and refuse one that breaks or is slow on a probe conversation */
  readonly chatTemplate?: boolean;
  /** V8 heap limit of each thread, in MB (default: Node's) */
  readonly maxThreadMemoryMb?: number;
}

/** A probe render the thread has not finished by then is stopped (it is refused after LOAD_BUDGET_MS when it finishes; this bounds one that never does). */
const PROBE_DEADLINE_MS = 5 * LOAD_BUDGET_MS;

// From the sources the thread runs TypeScript like the rest of weft: tsx is registered in it first (a second
// registration, under `node --import tsx`, is harmless). The compiled package loads its JavaScript as it is.
const THREAD_ENTRY = JSON.stringify(moduleUrl('./text-thread'));
const BOOT = RUNS_SOURCES
  ? `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then((tsx) => { tsx.register(); return import(${THREAD_ENTRY}); });`
  : `import(${THREAD_ENTRY});`;

interface Job {
  readonly id: number;
  readonly call: TextCall;
  readonly budgetMs: number;
  /** what the call does, for error messages ("tokenizing a prompt of 12 characters") */
  readonly what: string;
  readonly onBudget: (what: string, ms: number) => WeftError;
  readonly resolve: (value: string | Int32Array | null) => void;
  readonly reject: (err: Error) => void;
}

interface Thread {
  readonly worker: Worker;
  ready: boolean;
  job: Job | null;
  timer: NodeJS.Timeout | null;
}

const overBudget = (what: string, ms: number): WeftError =>
  new WeftError('WEFT_TIMEOUT', `${what} took longer than the text threads' budget of ${ms} ms (textBudgetMs, --text-budget); the thread was stopped`);

export class TextPool {
  private readonly threads = new Set<Thread>();
  private readonly queue: Job[] = [];
  private nextId = 1;
  private closed = false;
  /** why the last thread start failed; calls fail with it while no thread is alive */
  private startFailure: Error | null = null;
  private hasChatTemplateValue = false;

  private constructor(private readonly options: TextPoolOptions) {}

  /** Start the threads; resolves once each has loaded the tokenizer (and the template passed its probe). */
  static async start(options: TextPoolOptions): Promise<TextPool> {
    const pool = new TextPool(options);
    try {
      const started = await Promise.all(Array.from({ length: Math.max(1, options.threads) }, () => pool.spawn()));
      pool.hasChatTemplateValue = started[0]!;
      if (options.chatTemplate && pool.hasChatTemplateValue)
        await pool.run({ op: 'probe' }, PROBE_DEADLINE_MS, 'rendering the chat template on a 4-message probe', (what, ms) =>
          new WeftError('WEFT_BAD_MODEL', `${options.modelDir}: ${what} took longer than ${ms} ms (budget ${LOAD_BUDGET_MS} ms); refusing it`),
        );
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  /** Whether the model has a chat template (loaded only with `chatTemplate`). */
  get hasChatTemplate(): boolean {
    return this.hasChatTemplateValue;
  }

  /** Token ids of `text`; with `maxTokens`, refused (WEFT_BAD_REQUEST) when there are more. */
  async encode(text: string, options: EncodeOptions & { maxTokens?: number; contextName?: string } = {}): Promise<number[]> {
    const ids = await this.run({ op: 'encode', text, ...options }, this.options.budgetMs, `tokenizing a text of ${text.length} characters`);
    return Array.from(ids as Int32Array);
  }

  async decode(ids: readonly number[], options: DecodeOptions = {}): Promise<string> {
    return (await this.run({ op: 'decode', ids, ...options }, this.options.budgetMs, `decoding ${ids.length} token ids`)) as string;
  }

  /** The chat template rendered for `messages` (output capped at `maxChars`), encoded without an added BOS. */
  async chatPromptIds(messages: readonly ChatMessage[], limits: { maxChars: number; maxTokens?: number; contextName?: string }): Promise<number[]> {
    const ids = await this.run({ op: 'chat', messages, ...limits }, this.options.budgetMs, `rendering the chat template for ${messages.length} messages`);
    return Array.from(ids as Int32Array);
  }

  /** Thread ids of the live threads (tests watch replacements). */
  threadIds(): number[] {
    return [...this.threads].map((t) => t.worker.threadId);
  }

  /** Calls waiting for a thread. */
  get waiting(): number {
    return this.queue.length;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const closedError = (): WeftError => new WeftError('WEFT_CLOSED', 'the text threads were closed');
    for (const job of this.queue.splice(0)) job.reject(closedError());
    const threads = [...this.threads];
    this.threads.clear();
    for (const thread of threads) {
      if (thread.timer) clearTimeout(thread.timer);
      thread.job?.reject(closedError());
      thread.job = null;
    }
    await Promise.all(threads.map((t) => t.worker.terminate()));
  }

  private run(call: TextCall, budgetMs: number, what: string, onBudget = overBudget): Promise<string | Int32Array | null> {
    if (this.closed) return Promise.reject(new WeftError('WEFT_CLOSED', 'the text threads were closed'));
    if (this.threads.size === 0 && this.startFailure) return Promise.reject(this.startFailure);
    const idle = [...this.threads].some((t) => t.ready && !t.job);
    if (!idle && this.queue.length >= this.options.maxQueue)
      return Promise.reject(new WeftError('WEFT_BUSY', `the text threads are busy: ${this.queue.length} calls wait for one already (the queue holds ${this.options.maxQueue}); retry later`));
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, call, budgetMs, what, onBudget, resolve, reject });
      this.dispatch();
    });
  }

  private dispatch(): void {
    for (const thread of this.threads) {
      if (this.queue.length === 0) return;
      if (!thread.ready || thread.job) continue;
      const job = this.queue.shift()!;
      thread.job = job;
      thread.worker.ref(); // a call in flight keeps the process alive until it is answered
      thread.timer = setTimeout(() => this.stop(thread, job.onBudget(job.what, job.budgetMs)), job.budgetMs);
      thread.worker.postMessage({ id: job.id, call: job.call });
    }
  }

  /** End a thread's call with `err`, terminate the thread and start another in its place. */
  private stop(thread: Thread, err: Error): void {
    const job = thread.job;
    thread.job = null;
    job?.reject(err);
    this.retire(thread);
    void thread.worker.terminate();
  }

  private retire(thread: Thread): void {
    if (!this.threads.delete(thread)) return;
    if (thread.timer) clearTimeout(thread.timer);
    if (this.closed) return;
    this.spawn().then(
      () => this.dispatch(),
      (err: Error) => {
        if (this.closed) return;
        process.stderr.write(`weft: a text thread could not be started: ${err.message}\n`);
        if (this.threads.size > 0) return;
        for (const job of this.queue.splice(0)) job.reject(err);
      },
    );
  }

  /** Start one thread; resolves with whether the model has a chat template once it has loaded. */
  private spawn(): Promise<boolean> {
    const { modelDir, chatTemplate = false, maxThreadMemoryMb } = this.options;
    const data: TextThreadData = { modelDir, chatTemplate };
    const worker = new Worker(BOOT, { eval: true, workerData: data, ...(maxThreadMemoryMb !== undefined && { resourceLimits: { maxOldGenerationSizeMb: maxThreadMemoryMb } }) });
    const thread: Thread = { worker, ready: false, job: null, timer: null };
    this.threads.add(thread);
    let crash: Error | null = null;
    return new Promise<boolean>((resolve, reject) => {
      let loading = true;
      const startFailed = (err: Error): void => {
        if (!loading) return; // the thread said why already; its exit adds nothing
        loading = false;
        this.startFailure = err;
        reject(err);
      };
      worker.on('message', (message: TextThreadMessage) => {
        if (message.type === 'ready') {
          loading = false;
          thread.ready = true;
          this.startFailure = null;
          worker.unref();
          resolve(message.hasChatTemplate);
          return;
        }
        if (message.type === 'failed') {
          startFailed(new WeftError(message.code as WeftErrorCode, message.message));
          this.threads.delete(thread);
          void worker.terminate();
          return;
        }
        const job = thread.job;
        if (!job || job.id !== message.id) return; // answered after its budget: already refused
        if (thread.timer) clearTimeout(thread.timer);
        thread.job = null;
        thread.timer = null;
        worker.unref();
        if (message.type === 'result') job.resolve(message.value);
        else job.reject(new WeftError(message.code as WeftErrorCode, message.message));
        this.dispatch();
      });
      worker.on('error', (err) => (crash = err));
      worker.on('exit', (code) => {
        const why = crash?.message ?? `exit code ${code}`;
        if (!thread.ready) startFailed(new WeftError('WEFT_WORKER_ERROR', `a text thread for ${modelDir} exited while loading: ${why}`));
        if (!this.threads.has(thread)) return; // stopped on purpose
        const job = thread.job;
        thread.job = null;
        job?.reject(new WeftError('WEFT_WORKER_ERROR', `the text thread died while ${job.what}: ${why}`));
        if (thread.ready) this.retire(thread);
        else this.threads.delete(thread);
      });
    });
  }
}
