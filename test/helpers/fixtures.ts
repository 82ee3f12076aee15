/** The hf-tiny fixtures (copied from ../shared/fixtures/hf-tiny) and their Hugging Face reference outputs. */
import { readFileSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { isAbsolute, join } from 'node:path';
import { SafetensorsFile } from '../../core/safetensors.ts';

export const FIXTURES = fileURLToPath(new URL('../fixtures/hf-tiny/', import.meta.url));
export const FIXTURE_MODELS = ['llama-tiny', 'llama-tiny-bf16', 'llama3-tiny', 'mixtral-tiny'] as const;
export const fixtureDir = (name: string): string => (isAbsolute(name) ? name : join(FIXTURES, name));
export const WEFT_BIN = fileURLToPath(new URL('../../bin/weft.js', import.meta.url));

export interface Reference {
  prompts: number[][];
  greedy: number[][];
  text: { text: string; ids: number[] }[];
}

export function readReference(model: string): Reference {
  return JSON.parse(readFileSync(join(fixtureDir(model), 'reference.json'), 'utf8')) as Reference;
}

/** Hugging Face's log-probs for prompt i: one Float32Array row per position. */
export async function referenceLogprobs(model: string, prompt: number): Promise<Float32Array[]> {
  const file = await SafetensorsFile.open(join(fixtureDir(model), 'reference.safetensors'));
  try {
    const entry = file.tensor(`logprobs.${prompt}`);
    if (!entry) throw new Error(`reference logprobs.${prompt} missing for ${model}`);
    const bytes = await file.readAll(entry);
    const flat = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const [rows = 0, vocab = 0] = entry.shape;
    return Array.from({ length: rows }, (_, r) => flat.subarray(r * vocab, (r + 1) * vocab));
  } finally {
    await file.close();
  }
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

/** Pids of live processes whose command line contains `marker` (to prove a test left nothing behind). */
export function processesMentioning(marker: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const cmdline = readFileSync(`/proc/${entry}/cmdline`, 'utf8');
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (cmdline.includes(marker) && !/\) Z /.test(stat)) pids.push(Number(entry));
    } catch {
      // the process ended while we looked
    }
  }
  return pids;
}

export async function waitFor(condition: () => boolean, timeoutMs: number, stepMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (condition()) return true;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  return condition();
}
