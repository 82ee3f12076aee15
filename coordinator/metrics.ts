/**
 * Prometheus metrics of one coordinator (`GET /metrics`), named `weft_` + vLLM's suffixes so dashboards port
 * by a rename, labelled with `model_name`. They live in the coordinator only: workers report nothing directly.
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Cluster } from './cluster.ts';
import type { SchedulerObserver } from './scheduler.ts';

export class WeftMetrics {
  readonly registry = new Registry();
  private cluster: Cluster | null = null;
  private readonly labels: { model_name: string };
  private readonly ttft: Histogram<'model_name'>;
  private readonly e2e: Histogram<'model_name'>;
  private readonly generated: Counter<'model_name'>;
  private readonly finished: Counter<'model_name' | 'finished_reason'>;
  private readonly rejected: Counter<'model_name' | 'reason'>;
  /** decode tokens in the last window, for weft_tokens_per_second */
  private window: { at: number; tokens: number }[] = [];

  constructor(modelName: string) {
    this.labels = { model_name: modelName };
    const registers = [this.registry];
    const labelNames = ['model_name'] as const;
    const gauge = (name: string, help: string, read: (c: Cluster) => number): void => {
      const labels = this.labels;
      const self = this;
      new Gauge({
        name,
        help,
        labelNames,
        registers,
        collect() {
          if (self.cluster) this.set(labels, read(self.cluster));
        },
      });
    };
    gauge('weft_num_requests_waiting', 'Requests waiting for a KV slot (the queue depth).', (c) => c.stats().waiting);
    gauge('weft_num_requests_running', 'Requests holding a KV slot.', (c) => c.stats().running);
    gauge('weft_kv_slots_used', 'KV cache slots in use.', (c) => c.stats().kvSlotsUsed);
    gauge('weft_kv_slots_total', 'KV cache slots (sequences cached at once).', (c) => c.stats().kvSlots);
    gauge('weft_ready', '1 when every rank is loaded and serving, else 0.', (c) => (c.state === 'ready' ? 1 : 0));
    gauge('weft_group_reforms', 'Times the worker group was re-formed after a fault.', (c) => c.stats().reforms);
    const self = this;
    new Gauge({
      name: 'weft_tokens_per_second',
      help: 'Generated tokens per second over the last 10 s.',
      labelNames,
      registers,
      collect() {
        this.set(self.labels, self.tokensPerSecond());
      },
    });
    // speculative decoding does not exist yet: the series are exported (at 0) so dashboards can be built now
    new Gauge({ name: 'weft_spec_decode_draft_acceptance_rate', help: 'Accepted / proposed draft tokens (0 until speculative decoding exists).', labelNames, registers }).set(this.labels, 0);
    new Counter({ name: 'weft_spec_decode_num_accepted_tokens_total', help: 'Accepted draft tokens (0 until speculative decoding exists).', labelNames, registers }).inc(this.labels, 0);
    const buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
    this.ttft = new Histogram({ name: 'weft_time_to_first_token_seconds', help: 'Time from submission to the first token.', labelNames, registers, buckets });
    this.e2e = new Histogram({ name: 'weft_e2e_request_latency_seconds', help: 'Time from submission to the end of the request.', labelNames, registers, buckets });
    this.generated = new Counter({ name: 'weft_generation_tokens_total', help: 'Generated tokens.', labelNames, registers });
    this.finished = new Counter({ name: 'weft_request_success_total', help: 'Finished requests by outcome.', labelNames: ['model_name', 'finished_reason'], registers });
    this.rejected = new Counter({ name: 'weft_requests_rejected_total', help: 'Requests refused at admission.', labelNames: ['model_name', 'reason'], registers });
  }

  attach(cluster: Cluster): void {
    this.cluster = cluster;
  }

  private tokensPerSecond(): number {
    const now = performance.now();
    this.window = this.window.filter((w) => now - w.at < 10_000);
    return this.window.reduce((sum, w) => sum + w.tokens, 0) / 10;
  }

  readonly observer: SchedulerObserver = {
    firstToken: (seconds) => this.ttft.observe(this.labels, seconds),
    tokens: (count) => {
      this.generated.inc(this.labels, count);
      this.window.push({ at: performance.now(), tokens: count });
      if (this.window.length > 100_000) this.window.splice(0, 50_000);
    },
    finished: (outcome, seconds) => {
      this.finished.inc({ ...this.labels, finished_reason: outcome });
      this.e2e.observe(this.labels, seconds);
    },
    rejected: (reason) => this.rejected.inc({ ...this.labels, reason }),
  };

  text(): Promise<string> {
    return this.registry.metrics();
  }
}
