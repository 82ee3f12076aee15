/**
 * The metrics registry and the server log line without a cluster: the scheduler's outcomes map to vLLM's
 * finished_reason, HTTP 4xx to rejected reasons, per-token gaps are counted after each sequence's first token,
 * the Grafana dashboard queries only series weft exports, and the periodic log line appears only after activity.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { WeftMetrics } from '../../coordinator/metrics.ts';
import { formatLogLine, startServerLog } from '../../coordinator/server-log.ts';
import type { Cluster } from '../../coordinator/cluster.ts';
import { sample } from '../helpers/prometheus.ts';

test('outcomes, refusals and per-token gaps are counted as vLLM names them', async () => {
  const metrics = new WeftMetrics('m');
  const { observer } = metrics;
  const a = {};
  const b = {};
  observer.firstToken!(0.01, 5);
  observer.tokens!(1, a);
  observer.tokens!(1, a);
  observer.tokens!(1, a);
  observer.firstToken!(0.02, 7);
  observer.tokens!(1, b);
  observer.finished!('stop', 0.1);
  observer.finished!('length', 0.1);
  observer.finished!('cancelled', 0.1);
  observer.finished!('timeout', 0.1);
  observer.rejected!('busy');
  for (const status of [400, 400, 413, 415, 431, 200, 503]) metrics.httpAnswered(status);
  const text = await metrics.text();
  assert.equal(sample(text, 'weft_prompt_tokens_total'), 12);
  assert.equal(sample(text, 'weft_generation_tokens_total'), 4);
  assert.equal(sample(text, 'weft_time_per_output_token_seconds_count'), 2, "a's second and third token; no gap before a first token");
  assert.equal(sample(text, 'weft_time_to_first_token_seconds_count'), 2);
  assert.equal(sample(text, 'weft_request_success_total', { finished_reason: 'stop' }), 1);
  assert.equal(sample(text, 'weft_request_success_total', { finished_reason: 'length' }), 1);
  assert.equal(sample(text, 'weft_request_success_total', { finished_reason: 'abort' }), 2);
  assert.equal(sample(text, 'weft_request_success_total', { finished_reason: 'cancelled' }), undefined);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'busy' }), 1);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'bad_request' }), 2);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'body_too_large' }), 1);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'unsupported_media_type' }), 1);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'headers_too_large' }), 1);
  assert.equal(sample(text, 'weft_requests_rejected_total', { reason: 'http_503' }), undefined, '503 busy is counted by the scheduler, not twice');
  assert.ok((sample(text, 'process_resident_memory_bytes') ?? 0) > 0, "Node's default metrics under their standard names");
  assert.deepEqual(metrics.totals(), { prompt: 12, generation: 4 });
});

/** Every metric name an expression reads (PromQL function names, label names and strings left out). */
function queriedNames(expr: string): string[] {
  const bare = expr
    .replace(/label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)/g, '$1')
    .replace(/"[^"]*"/g, '')
    .replace(/\{[^}]*\}/g, '')
    .replace(/\[[^\]]*\]/g, '')
    .replace(/\b(by|without)\s*\([^)]*\)/g, '');
  const functions = new Set(['histogram_quantile', 'sum', 'rate', 'irate', 'increase', 'max', 'min', 'avg']);
  return (bare.match(/[a-zA-Z_:][\w:]*/g) ?? []).filter((word) => !functions.has(word));
}

test('the Grafana dashboard queries only series weft exports, and covers the vLLM-named ones', async () => {
  const dashboard = JSON.parse(readFileSync(new URL('../../deploy/grafana-dashboard.json', import.meta.url), 'utf8')) as {
    panels: { targets: { expr: string }[] }[];
    templating: { list: { query: unknown }[] };
  };
  const expressions = [
    ...dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr)),
    ...dashboard.templating.list.map((v) => (typeof v.query === 'object' && v.query !== null ? (v.query as { query: string }).query : '')).filter((q) => q.includes('(')),
  ];
  const queried = new Set(expressions.flatMap(queriedNames));
  const exported = new Set<string>();
  for (const metric of await new WeftMetrics('m').registry.getMetricsAsJSON())
    for (const suffix of String(metric.type) === 'histogram' ? ['_bucket', '_sum', '_count'] : ['']) exported.add(metric.name + suffix);
  const unknown = [...queried].filter((name) => !exported.has(name));
  assert.deepEqual(unknown, [], 'metrics the dashboard queries that weft does not export');
  for (const name of ['weft_time_to_first_token_seconds_bucket', 'weft_time_per_output_token_seconds_bucket', 'weft_generation_tokens_total', 'weft_prompt_tokens_total', 'weft_num_requests_running', 'weft_num_requests_waiting', 'weft_kv_cache_usage_perc', 'weft_requests_rejected_total', 'process_cpu_seconds_total', 'process_resident_memory_bytes'])
    assert.ok(queried.has(name), `the dashboard shows ${name}`);
});

test('the server log line: text and JSON, and only after an interval with activity', async () => {
  const line = { running: 2, waiting: 1, promptTokensPerSecond: 12, generationTokensPerSecond: 34.56, kvCacheUsagePercent: 25 };
  assert.equal(formatLogLine(line, 'text'), 'weft: running 2, waiting 1, prompt 12.0 tok/s, generation 34.6 tok/s, KV cache 25.0%');
  const json = JSON.parse(formatLogLine(line, 'json')) as Record<string, unknown>;
  assert.equal(json.event, 'stats');
  assert.equal(json.generationTokensPerSecond, 34.56);

  const metrics = new WeftMetrics('m');
  const stats = { running: 0, waiting: 0, kvBlocksUsed: 0, kvBlocks: 8 };
  const cluster = { stats: () => stats } as unknown as Cluster;
  const lines: string[] = [];
  const stop = startServerLog(cluster, metrics, 1, 'json', (l) => lines.push(l));
  try {
    await new Promise((r) => setTimeout(r, 1300));
    assert.deepEqual(lines, [], 'an idle interval writes nothing');
    metrics.observer.firstToken!(0.01, 10);
    metrics.observer.tokens!(1, {});
    Object.assign(stats, { running: 1, kvBlocksUsed: 2 });
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(lines.length, 1);
    const logged = JSON.parse(lines[0]!) as { running: number; promptTokensPerSecond: number; generationTokensPerSecond: number; kvCacheUsagePercent: number };
    assert.equal(logged.running, 1);
    assert.equal(logged.kvCacheUsagePercent, 25);
    assert.ok(logged.promptTokensPerSecond > 5 && logged.promptTokensPerSecond < 11, `prompt tok/s ${logged.promptTokensPerSecond}`);
    assert.ok(logged.generationTokensPerSecond > 0.5 && logged.generationTokensPerSecond < 1.1);
  } finally {
    stop();
  }
});
