/**
 * Weight-load progress on stderr, one implementation for `weft generate`, `weft serve` and `weft launch`. On a
 * terminal it redraws one line (`\r`) as a bar; elsewhere (a pipe, a pm2 log) it writes plain lines, at most one
 * per 10% of the bytes or per 2 s. A load that ends within the first 2 s writes nothing off a terminal: a log
 * gains nothing from it, and a failure stays the one `weft: CODE: message` line.
 */

/** Where progress goes: process.stderr, or anything that writes text and says whether it is a terminal. */
export interface ProgressOut {
  readonly isTTY?: boolean;
  write(text: string): unknown;
}

const PLAIN_STEP = 0.1;
const PLAIN_EVERY_MS = 2000;
const TTY_EVERY_MS = 100;
const BAR_WIDTH = 30;
const mib = (bytes: number): string => (bytes / 2 ** 20).toFixed(1);

export class LoadProgress {
  /** bytes read and bytes to read, by rank */
  private readonly ranks = new Map<number, { read: number; total: number }>();
  private startedAt: number | null = null;
  private drawnAt = -Infinity;
  private drawnFraction = 0;
  /** a plain line or a bar has been written since the load started */
  private shown = false;

  /** `world`: the ranks expected to report (the line says how many have). */
  constructor(
    private readonly out: ProgressOut,
    private readonly world: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** A rank's progress (the onProgress callback of startCluster, or a rank of launch's /health). */
  update(rank: number, bytesRead: number, bytesTotal: number): void {
    const at = this.now();
    if (this.startedAt === null) this.startedAt = at; // a first report, or a re-form after done()
    this.ranks.set(rank, { read: bytesRead, total: bytesTotal });
    const fraction = this.fraction();
    if (this.out.isTTY) {
      if (at - this.drawnAt < TTY_EVERY_MS && fraction < 1) return;
      this.out.write(`\r${this.line(fraction)}\x1b[K`);
    } else {
      if (at - this.startedAt < PLAIN_EVERY_MS) return;
      const stepped = Math.floor(fraction / PLAIN_STEP) > Math.floor(this.drawnFraction / PLAIN_STEP);
      if (this.shown && !stepped && at - this.drawnAt < PLAIN_EVERY_MS) return;
      this.out.write(`${this.line(fraction)}\n`);
    }
    this.shown = true;
    this.drawnAt = at;
    this.drawnFraction = fraction;
  }

  /** The load ended (ready, or failed): a shown bar or log gets its closing line; the next update starts anew. */
  done(): void {
    if (this.startedAt !== null && this.shown) {
      const seconds = ((this.now() - this.startedAt) / 1000).toFixed(1);
      this.out.write(`${this.out.isTTY ? '\r' : ''}weft: loaded ${mib(this.totals().read)} MiB of weights on ${this.ranks.size} rank${this.ranks.size === 1 ? '' : 's'} in ${seconds} s${this.out.isTTY ? '\x1b[K' : ''}\n`);
    }
    this.ranks.clear();
    this.startedAt = null;
    this.shown = false;
    this.drawnAt = -Infinity;
    this.drawnFraction = 0;
  }

  /** bytes read and to read, over the ranks that have reported */
  private totals(): { read: number; total: number } {
    let read = 0;
    let total = 0;
    for (const r of this.ranks.values()) {
      read += r.read;
      total += r.total;
    }
    return { read, total };
  }

  private fraction(): number {
    const { read, total } = this.totals();
    // ranks that have not reported yet count as not started: the fraction only grows
    const reported = this.ranks.size / Math.max(this.world, this.ranks.size);
    return total > 0 ? (read / total) * reported : 0;
  }

  private line(fraction: number): string {
    const { read, total } = this.totals();
    const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
    const detail = `${mib(read)}/${mib(total)} MiB, ${this.ranks.size}/${Math.max(this.world, this.ranks.size)} ranks`;
    if (!this.out.isTTY) return `weft: loading weights ${percent.trim()} (${detail})`;
    const filled = Math.round(fraction * BAR_WIDTH);
    return `weft: loading weights [${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}] ${percent} ${detail}`;
  }
}
