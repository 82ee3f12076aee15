/**
 * Prometheus metrics of one coordinator (`GET /metrics`), named `weft_` + vLLM's names where the meaning is the
 * same, so dashboards port by a rename, labelled with `model_name`; plus Node's default process metrics under
 * their standard names (`process_*`, `nodejs_*`). They live in the coordinator only: workers report nothing
 * directly. The scheduler feeds them through its observer, the HTTP gateway through `httpAnswered`.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { Cluster } from './cluster.ts';
import type { SchedulerObserver } from './scheduler.ts';

/** The scheduler's outcomes as vLLM's finished_reason: a cancel or timeout is `abort`; a worker fault `error`. */
const FINISHED_REASON = { stop: 'stop', length: 'length', cancelled: 'abort', timeout: 'abort', error: 'error' } as const;

/** The `reason` label of a 4xx the HTTP gateway sends (weft_requests_rejected_total). */
const REJECTED_REASON: Readonly<Record<number, string>> = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  405: 'method_not_allowed',
  408: 'request_timeout',
  413: 'body_too_large',
  415: 'unsupported_media_type',
  431: 'headers_too_large',
};

export function rejectedReason(status: number): string {
  return REJECTED_REASON[status] ?? `http_${status}`;
}

/** Tokens counted since the process started, read by the periodic server log (server-log.ts). */
export interface TokenTotals {
  readonly prompt: number;
  readonly generation: number;
}

export class WeftMetrics {
  readonly registry = new Registry();
  private cluster: Cluster | null = null;
  private readonly labels: { model_name: string };
  private readonly ttft: Histogram<'model_name'>;
  private readonly tpot: Histogram<'model_name'>;
  private readonly e2e: Histogram<'model_name'>;
  private readonly promptTokens: Counter<'model_name'>;
  private readonly generated: Counter<'model_name'>;
  private readonly finished: Counter<'model_name' | 'finished_reason'>;
  private readonly rejected: Counter<'model_name' | 'reason'>;
  private readonly preemptions: Counter<'model_name'>;
  private readonly prefixQueries: Counter<'model_name'>;
  private readonly prefixHits: Counter<'model_name'>;
  private readonly tokenTotals = { prompt: 0, generation: 0 };
  /** when each running sequence's last token came (performance.now() ms), for the per-token gaps */
  private readonly lastTokenAt = new WeakMap<object, number>();
  /** decode tokens in the last window, for weft_tokens_per_second */
  private window: { at: number; tokens: number }[] = [];

  constructor(modelName: string) {
    this.labels = { model_name: modelName };
    const registers = [this.registry];
    const labelNames = ['model_name'] as const;
    const self = this;
    const gauge = (name: string, help: string, read: (c: Cluster) => number): void => {
      new Gauge({
        name,
        help,
        labelNames,
        registers,
        collect() {
          if (self.cluster) this.set(self.labels, read(self.cluster));
        },
      });
    };
    gauge('weft_num_requests_waiting', 'Requests waiting for the KV cache (the queue depth).', (c) => c.stats().waiting);
    gauge('weft_num_requests_running', 'Requests holding KV blocks.', (c) => c.stats().running);
    gauge('weft_kv_cache_usage_perc', 'KV cache usage: blocks held by sequences / blocks (1 = full).', (c) => kvCacheUsage(c));
    gauge('weft_ready', '1 when every rank is loaded and serving, else 0.', (c) => (c.state === 'ready' ? 1 : 0));
    gauge('weft_group_reforms', 'Times the worker group was re-formed after a fault.', (c) => c.stats().reforms);
    new Gauge({
      name: 'weft_tokens_per_second',
      help: 'Generated tokens per second over the last 10 s.',
      labelNames,
      registers,
      collect() {
        this.set(self.labels, self.tokensPerSecond());
      },
    });
    // speculative decoding reports nothing yet: the series are exported (at 0) so dashboards can be built now
    new Gauge({ name: 'weft_spec_decode_draft_acceptance_rate', help: 'Accepted / proposed draft tokens (0 until reported).', labelNames, registers }).set(this.labels, 0);
    new Counter({ name: 'weft_spec_decode_num_accepted_tokens_total', help: 'Accepted draft tokens (0 until reported).', labelNames, registers }).inc(this.labels, 0);
    const buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
    const tokenBuckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5];
    this.ttft = new Histogram({ name: 'weft_time_to_first_token_seconds', help: 'Time from submission to the first token.', labelNames, registers, buckets });
    this.tpot = new Histogram({ name: 'weft_time_per_output_token_seconds', help: "Time from a sequence's previous token to each token after its first.", labelNames, registers, buckets: tokenBuckets });
    this.e2e = new Histogram({ name: 'weft_e2e_request_latency_seconds', help: 'Time from submission to the end of the request.', labelNames, registers, buckets });
    this.promptTokens = new Counter({ name: 'weft_prompt_tokens_total', help: 'Prompt tokens computed (prefill).', labelNames, registers });
    this.generated = new Counter({ name: 'weft_generation_tokens_total', help: 'Generated tokens.', labelNames, registers });
    this.finished = new Counter({ name: 'weft_request_success_total', help: 'Finished requests by finished_reason: stop, length, abort (cancelled or timed out), error (a worker fault).', labelNames: ['model_name', 'finished_reason'], registers });
    this.rejected = new Counter({ name: 'weft_requests_rejected_total', help: 'Requests refused: busy (a full queue) or a 4xx HTTP answer by its reason.', labelNames: ['model_name', 'reason'], registers });
    this.preemptions = new Counter({ name: 'weft_num_preemptions_total', help: 'Running sequences preempted (their KV blocks taken back, recomputed later) because the KV cache was full.', labelNames, registers });
    this.preemptions.inc(this.labels, 0);
    this.prefixQueries = new Counter({ name: 'weft_prefix_cache_queries_total', help: 'Prompt tokens looked up in the prefix cache (the hit rate is hits / queries).', labelNames, registers });
    this.prefixHits = new Counter({ name: 'weft_prefix_cache_hits_total', help: 'Prompt tokens found computed in the prefix cache (their prefill skipped).', labelNames, registers });
    this.prefixQueries.inc(this.labels, 0);
    this.prefixHits.inc(this.labels, 0);
    for (const reason of ['stop', 'length', 'abort']) this.finished.inc({ ...this.labels, finished_reason: reason }, 0);
    this.rejected.inc({ ...this.labels, reason: 'busy' }, 0);
    collectDefaultMetrics({ register: this.registry });
  }

  attach(cluster: Cluster): void {
    this.cluster = cluster;
  }

  /** Prompt and generated tokens so far. */
  totals(): TokenTotals {
    return { ...this.tokenTotals };
  }

  private tokensPerSecond(): number {
    const now = performance.now();
    this.window = this.window.filter((w) => now - w.at < 10_000);
    return this.window.reduce((sum, w) => sum + w.tokens, 0) / 10;
  }

  readonly observer: SchedulerObserver = {
    firstToken: (seconds, promptTokens) => {
      this.ttft.observe(this.labels, seconds);
      this.promptTokens.inc(this.labels, promptTokens);
      this.tokenTotals.prompt += promptTokens;
    },
    tokens: (count, sequence) => {
      const now = performance.now();
      const last = this.lastTokenAt.get(sequence);
      // tokens after a sequence's first: the gap since its previous token, spread over the tokens it brought
      if (last !== undefined) for (let i = 0; i < count; i++) this.tpot.observe(this.labels, (now - last) / 1000 / count);
      this.lastTokenAt.set(sequence, now);
      this.generated.inc(this.labels, count);
      this.tokenTotals.generation += count;
      this.window.push({ at: now, tokens: count });
      if (this.window.length > 100_000) this.window.splice(0, 50_000);
    },
    finished: (outcome, seconds) => {
      this.finished.inc({ ...this.labels, finished_reason: FINISHED_REASON[outcome] });
      this.e2e.observe(this.labels, seconds);
    },
    rejected: (reason) => this.rejected.inc({ ...this.labels, reason }),
    preempted: () => this.preemptions.inc(this.labels),
    prefixCache: (queried, hit) => {
      this.prefixQueries.inc(this.labels, queried);
      this.prefixHits.inc(this.labels, hit);
    },
  };

  /** An HTTP answer was sent: a 4xx counts as a rejected request with its reason. */
  httpAnswered(status: number): void {
    if (status >= 400 && status < 500) this.rejected.inc({ ...this.labels, reason: rejectedReason(status) });
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }
}

/** Blocks held by sequences / blocks, 0 to 1. */
export function kvCacheUsage(cluster: Cluster): number {
  const { kvBlocksUsed, kvBlocks } = cluster.stats();
  return kvBlocks === 0 ? 0 : kvBlocksUsed / kvBlocks;
}
