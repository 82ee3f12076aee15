/**
 * A single-consumer async queue of events that ends with `close()` or `fail(err)`: how a generation's events
 * travel from the scheduler to whoever reads them (the cluster's generate(), the RPC client's calls).
 */
export class Channel<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiter: (() => void) | null = null;
  private ended = false;
  private error: Error | null = null;

  push(item: T): void {
    if (this.ended) return;
    this.items.push(item);
    this.wake();
  }
  close(): void {
    this.ended = true;
    this.wake();
  }
  fail(err: Error): void {
    if (this.ended) return;
    this.error = err;
    this.ended = true;
    this.wake();
  }
  /** Fail at once, dropping events not yet read (the consumer gave up on them). */
  abort(err: Error): void {
    this.items.length = 0;
    this.fail(err);
  }
  get closed(): boolean {
    return this.ended;
  }
  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }
  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const item = this.items.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      if (this.error) throw this.error;
      if (this.ended) return;
      await new Promise<void>((resolve) => (this.waiter = resolve));
    }
  }
}
