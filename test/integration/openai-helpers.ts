/** A copy of the llama-tiny fixture with a chat template, served by `weft serve` for the OpenAI-surface tests. */
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fixtureDir } from '../helpers/fixtures.ts';
import { startServe, type ServeProcess } from './serve-helpers.ts';

const TEMPLATE = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";
/** The served context cap: small, so a chat without max_tokens runs to its end quickly. */
export const MAX_CONTEXT = 128;
export const MODEL = 'llama-tiny';

export interface ChatServer {
  readonly server: ServeProcess;
  /** stop the server (exit code and leftover workers, as ServeProcess.stop) and remove the model copy */
  stop(): ReturnType<ServeProcess['stop']>;
}

/** `weft serve` (TP=1, --max-context 128) on a copy of llama-tiny that has a chat template; `args` are added. */
export async function startChatServer(args: string[] = []): Promise<ChatServer> {
  const root = mkdtempSync(join(tmpdir(), 'weft-openai-'));
  const dir = join(root, MODEL); // the served model id is the directory's name
  cpSync(fixtureDir(MODEL), dir, { recursive: true });
  const config = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...config, chat_template: TEMPLATE }));
  try {
    const server = await startServe(['--model', dir, '--tp', '1', '--max-context', String(MAX_CONTEXT), '--heartbeat-timeout', '30000', ...args]);
    return {
      server,
      async stop() {
        try {
          return await server.stop();
        } finally {
          rmSync(root, { recursive: true, force: true });
        }
      },
    };
  } catch (err) {
    rmSync(root, { recursive: true, force: true });
    throw err;
  }
}
