/**
 * CPU collectives over ZeroMQ: rank 0 is a hub (ROUTER), the other ranks connect to it (DEALER). A
 * collective is numbered by its position in the sequence every rank issues; non-root ranks send their
 * piece, the hub combines the pieces in rank order (so the result is the same on every rank and every run)
 * and sends it back. Frames: [sequence u32 LE, float32 payload, (gather only) column counts as u32].
 * Waits are bounded: a peer that is gone or stalled fails the collective (naming the ranks that did not
 * answer) instead of holding the group forever, and the group stays failed (`asyncError`).
 */
import * as zmq from 'zeromq';
import type { Engine, Tensor } from '../native.ts';
import { preparedWidths, type CollectivePlan, type Collectives } from './collectives.ts';
import { SendQueue, float32Bytes, toFloat32 } from '../../core/wire.ts';
import { WeftError } from '../../core/errors.ts';

interface Piece {
  rank: number;
  payload: Float32Array;
  /** gather replies: the column count of each rank's piece, u32 LE */
  extra: Buffer | undefined;
}

/** Bind the hub socket on rank 0 before the group forms, so its endpoint can be handed to the others. */
export async function bindCollectiveHub(host: string): Promise<{ socket: zmq.Router; endpoint: string }> {
  const socket = new zmq.Router({ linger: 0, mandatory: true, maxMessageSize: 1 << 30 });
  await socket.bind(`tcp://${host}:*`);
  return { socket, endpoint: socket.lastEndpoint ?? '' };
}

export interface CpuCollectivesOptions {
  /** How long a rank waits for its peers in one collective before failing it. Defaults to 60 s: ranks run the same work between collectives, so a wait this long means a peer is gone. */
  readonly peerTimeoutMs?: number;
}

const DEFAULT_PEER_TIMEOUT_MS = 60_000;

export class CpuCollectives implements Collectives {
  private sequence = 0;
  private plan: CollectivePlan | null = null;
  /** set by the first failure (a timed-out wait, a failed send, a broken socket); later collectives fail with it */
  private failure: string | null = null;
  private readonly sendQueue: SendQueue;
  /** pieces received but not yet consumed, by sequence number */
  private readonly inbox = new Map<number, Piece[]>();
  private readonly waiters = new Map<number, () => void>();
  private closed = false;

  private constructor(
    private readonly engine: Engine,
    readonly rank: number,
    readonly world: number,
    private readonly socket: zmq.Router | zmq.Dealer,
    private readonly peerTimeoutMs: number,
  ) {
    this.sendQueue = new SendQueue(socket);
    void this.receiveLoop();
  }

  static async create(engine: Engine, rank: number, world: number, hub: zmq.Router | null, rootEndpoint: string, options: CpuCollectivesOptions = {}): Promise<CpuCollectives> {
    const timeout = options.peerTimeoutMs ?? DEFAULT_PEER_TIMEOUT_MS;
    if (rank === 0) {
      if (!hub) throw new WeftError('WEFT_PROTOCOL', 'rank 0 needs its collective hub socket');
      return new CpuCollectives(engine, rank, world, hub, timeout);
    }
    const dealer = new zmq.Dealer({ linger: 0, routingId: `rank-${rank}`, maxMessageSize: 1 << 30 });
    dealer.connect(rootEndpoint);
    return new CpuCollectives(engine, rank, world, dealer, timeout);
  }

  prepare(plan: CollectivePlan): void {
    this.plan = plan;
  }

  asyncError(): string | null {
    return this.failure;
  }

  /** Record the group's first failure, wake every waiter (they fail with it) and throw it. */
  private fail(code: 'WEFT_TIMEOUT' | 'WEFT_WORKER_DIED' | 'WEFT_PROTOCOL', message: string): never {
    this.failure ??= message;
    for (const wake of this.waiters.values()) wake();
    throw new WeftError(code, message);
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const frames of this.socket) {
        // The hub sees [identity, seq, payload, extra]; a dealer sees [seq, payload, extra].
        const body = this.rank === 0 ? frames.slice(1) : frames;
        const identity = this.rank === 0 ? String(frames[0]) : 'rank-0';
        const [seqFrame, payloadFrame] = body;
        if (!seqFrame || !payloadFrame || seqFrame.byteLength !== 4) continue;
        const seq = seqFrame.readUInt32LE(0);
        const piece = { rank: Number(identity.replace('rank-', '')), payload: toFloat32(payloadFrame), extra: body[2] };
        const list = this.inbox.get(seq) ?? [];
        list.push(piece);
        this.inbox.set(seq, list);
        this.waiters.get(seq)?.();
      }
    } catch (err) {
      if (!this.closed) {
        this.failure ??= `rank ${this.rank}: collective socket failed: ${(err as Error).message}`;
        for (const wake of this.waiters.values()) wake();
      }
    }
  }

  /** Wait until the pieces of `from` (ranks) with this sequence number have arrived, at most peerTimeoutMs. */
  private async collect(what: string, seq: number, from: readonly number[]): Promise<Piece[]> {
    const deadline = Date.now() + this.peerTimeoutMs;
    while ((this.inbox.get(seq)?.length ?? 0) < from.length) {
      if (this.failure !== null) throw new WeftError('WEFT_WORKER_DIED', `rank ${this.rank}: ${what}: the group already failed (${this.failure})`);
      const left = deadline - Date.now();
      if (left <= 0) {
        const arrived = new Set((this.inbox.get(seq) ?? []).map((p) => p.rank));
        const missing = from.filter((r) => !arrived.has(r));
        this.fail('WEFT_TIMEOUT', `rank ${this.rank}: ${what}: no answer from rank ${missing.join(', ')} within ${this.peerTimeoutMs} ms (gone or stalled)`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        timer.unref(); // a wait in progress must not keep an exiting worker alive
        this.waiters.set(seq, () => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    this.waiters.delete(seq);
    const pieces = this.inbox.get(seq) ?? [];
    this.inbox.delete(seq);
    return pieces;
  }

  private seqFrame(seq: number): Buffer {
    const frame = Buffer.alloc(4);
    frame.writeUInt32LE(seq >>> 0, 0);
    return frame;
  }

  /** The other ranks: the hub waits for them. */
  private peers(): number[] {
    return Array.from({ length: this.world - 1 }, (_, i) => i + 1);
  }

  private async send(what: string, to: number, frames: Array<Buffer | Uint8Array | string>): Promise<void> {
    try {
      await this.sendQueue.send(frames);
    } catch (err) {
      this.fail('WEFT_WORKER_DIED', `rank ${this.rank}: ${what}: cannot send to rank ${to} (${(err as Error).message})`);
    }
  }

  async allReduce(x: Tensor): Promise<Tensor> {
    if (this.world === 1) return x;
    const seq = this.sequence++;
    const what = `allReduce #${seq}`;
    const mine = this.engine.download(x) as Float32Array;
    let sum: Float32Array;
    if (this.rank === 0) {
      const pieces = await this.collect(what, seq, this.peers());
      pieces.sort((a, b) => a.rank - b.rank);
      sum = Float32Array.from(mine);
      for (const piece of pieces) {
        if (piece.payload.length !== sum.length) this.fail('WEFT_PROTOCOL', `${what}: rank ${piece.rank} sent ${piece.payload.length} values, rank 0 has ${sum.length}`);
        for (let i = 0; i < sum.length; i++) sum[i]! += piece.payload[i]!;
      }
      for (const piece of pieces) await this.send(what, piece.rank, [`rank-${piece.rank}`, this.seqFrame(seq), float32Bytes(sum)]);
    } else {
      await this.send(what, 0, [this.seqFrame(seq), float32Bytes(mine)]);
      const [reply] = await this.collect(what, seq, [0]);
      sum = reply!.payload;
    }
    return this.engine.upload(float32Bytes(sum), 'f32', [...x.shape]);
  }

  async allGatherCols(x: Tensor): Promise<Tensor> {
    preparedWidths(this.plan, this.rank, this.world, x);
    if (this.world === 1) return x;
    const seq = this.sequence++;
    const what = `allGather #${seq}`;
    const [rows = 1] = x.shape;
    const mine = this.engine.download(x) as Float32Array;
    let pieces: Float32Array[];
    if (this.rank === 0) {
      const received = await this.collect(what, seq, this.peers());
      received.sort((a, b) => a.rank - b.rank);
      for (const p of received) {
        if (p.payload.length % rows !== 0) this.fail('WEFT_PROTOCOL', `${what}: rank ${p.rank} sent ${p.payload.length} values, not a multiple of rank 0's ${rows} rows`);
      }
      pieces = [mine, ...received.map((p) => p.payload)];
      const widths = Buffer.alloc(4 * this.world);
      pieces.forEach((p, r) => widths.writeUInt32LE(p.length / rows, 4 * r));
      const all = concatFloat32(pieces);
      for (const piece of received) await this.send(what, piece.rank, [`rank-${piece.rank}`, this.seqFrame(seq), float32Bytes(all), widths]);
    } else {
      await this.send(what, 0, [this.seqFrame(seq), float32Bytes(mine)]);
      const [reply] = await this.collect(what, seq, [0]);
      const widthsFrame = reply!.extra;
      if (!widthsFrame) this.fail('WEFT_PROTOCOL', `rank ${this.rank}: ${what}: reply without column counts`);
      pieces = [];
      let offset = 0;
      for (let r = 0; r < this.world; r++) {
        const n = widthsFrame.readUInt32LE(4 * r) * rows;
        pieces.push(reply!.payload.subarray(offset, offset + n));
        offset += n;
      }
    }
    return this.engine.concatCols(pieces.map((p) => this.engine.upload(float32Bytes(p), 'f32', [rows, p.length / rows])));
  }

  /** Closes the socket; a collective still waiting fails at once. */
  close(): void {
    this.closed = true;
    this.failure ??= `rank ${this.rank}: collectives closed`;
    for (const wake of this.waiters.values()) wake();
    this.socket.close();
  }
}

function concatFloat32(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}
