/**
 * The periodic server log line of `weft serve` (`--log-interval`, `--log-format`): every interval in which
 * something happened (tokens were computed, or requests run or wait), one line with the requests running and
 * waiting, the prompt and generation throughput over the interval and the KV cache usage. Plain text, or one
 * JSON object a line. Written to stderr: stdout carries serve's JSON events.
 */
import type { Cluster } from './cluster.ts';
import { kvCacheUsage, type TokenTotals, type WeftMetrics } from './metrics.ts';

export type LogFormat = 'text' | 'json';

/** What one line reports. */
export interface ServerLogLine {
  readonly running: number;
  readonly waiting: number;
  /** tokens per second over the interval */
  readonly promptTokensPerSecond: number;
  readonly generationTokensPerSecond: number;
  /** KV cache blocks in use, percent */
  readonly kvCacheUsagePercent: number;
}

export function formatLogLine(line: ServerLogLine, format: LogFormat): string {
  if (format === 'json') return JSON.stringify({ event: 'stats', time: new Date().toISOString(), ...line });
  return (
    `weft: running ${line.running}, waiting ${line.waiting}, ` +
    `prompt ${line.promptTokensPerSecond.toFixed(1)} tok/s, generation ${line.generationTokensPerSecond.toFixed(1)} tok/s, ` +
    `KV cache ${line.kvCacheUsagePercent.toFixed(1)}%`
  );
}

/** Start logging every `intervalSeconds` (0: never); returns the function that stops it. */
export function startServerLog(cluster: Cluster, metrics: WeftMetrics, intervalSeconds: number, format: LogFormat, write: (line: string) => void): () => void {
  if (intervalSeconds <= 0) return () => undefined;
  let before: TokenTotals = metrics.totals();
  let beforeAt = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const totals = metrics.totals();
    const seconds = (now - beforeAt) / 1000;
    const { running, waiting } = cluster.stats();
    const prompt = totals.prompt - before.prompt;
    const generation = totals.generation - before.generation;
    [before, beforeAt] = [totals, now];
    if (prompt === 0 && generation === 0 && running === 0 && waiting === 0) return; // an idle interval: no line
    const line = { running, waiting, promptTokensPerSecond: prompt / seconds, generationTokensPerSecond: generation / seconds, kvCacheUsagePercent: 100 * kvCacheUsage(cluster) };
    write(formatLogLine(line, format) + '\n');
  }, intervalSeconds * 1000);
  timer.unref();
  return () => clearInterval(timer);
}
