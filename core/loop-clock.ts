/**
 * A clock that runs only while this process's event loop is responsive: wall time minus the stalls a timer probe
 * measured. A peer's silence is measured on it, so a stall of this process (a long synchronous task) is never
 * blamed on the peer: what the peer sent meanwhile sits unread in the socket until the loop turns, and the timer
 * that checks the deadline runs before the socket is read.
 *
 * The probe is the checking timer itself: `probe()` is called every `periodMs`, and any lateness beyond the period
 * is a stall. A stall that ends before the timer is due delays nothing the deadline sees (messages are read first).
 */
import { performance } from 'node:perf_hooks';

export class ResponsiveClock {
  private lastProbe: number;
  private stalled = 0;

  constructor(
    private readonly periodMs: number,
    private readonly wall: () => number = () => performance.now(),
  ) {
    this.lastProbe = wall();
  }

  /** Called by a timer every `periodMs`: counts its lateness as a stall; returns that lateness (0 when on time). */
  probe(): number {
    const now = this.wall();
    const late = Math.max(0, now - this.lastProbe - this.periodMs);
    this.stalled += late;
    this.lastProbe = now;
    return late;
  }

  /** Milliseconds the loop was responsive, from an arbitrary origin. */
  now(): number {
    return this.wall() - this.stalled;
  }

  /** Milliseconds of stalls measured so far. */
  stalledMs(): number {
    return this.stalled;
  }
}
