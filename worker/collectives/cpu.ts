/**
 * CPU collectives over ZeroMQ: rank 0 is a hub (ROUTER), the other ranks connect to it (DEALER). A
 * collective is numbered by its position in the sequence every rank issues; non-root ranks send their
 * piece, the hub combines the pieces in rank order (so the result is the same on every rank and every run)
 * and sends it back; two ranks trade their pieces instead and each combines both in rank order. Frames:
 * [sequence u32 LE, float32 payload, (the hub's gather only) column counts as u32, MAC].
 * Waits are bounded: a peer that is gone or stalled fails the collective (naming the ranks that did not
 * answer) instead of holding the group forever, and the group stays failed (`asyncError`).
 *
 * The hub is ipc:// in the cluster's private socket directory, or tcp:// with CURVE across hosts
 * (core/transport.ts), so pieces are confidential. The hub trusts no routing id: a peer proves the group secret first (core/frame-auth.ts: [hello, rank u32 LE,
 * nonce] → [challenge, nonce] → [auth, MAC] → [welcome, MAC]), and every piece both ways carries a MAC. Until then
 * nothing it sends is read and nothing is sent to it; a second peer for a rank that joined is refused; refusals
 * are logged once per peer.
 */
import * as zmq from 'zeromq';
import type { Engine, Tensor } from '../native.ts';
import { preparedWidths, type CollectivePlan, type Collectives } from './collectives.ts';
import { SendQueue, float32Bytes, toFloat32 } from '../../core/wire.ts';
import { WeftError } from '../../core/errors.ts';
import { FrameAuth, NONCE_BYTES, RefusalLog, newNonce, peerName, requireSecret } from '../../core/frame-auth.ts';
import { WORKER_CURVE_OPTION, curveClient, curveServer, ipcDirOf, ipcEndpoint, type WorkerCurveKeys } from '../../core/transport.ts';

interface Piece {
  rank: number;
  payload: Float32Array;
  /** gather replies: the column count of each rank's piece, u32 LE */
  extra: Buffer | undefined;
}

/** Hubs this process bound (a rank 0 that rejoins a re-formed group binds a new one). */
let hubsBound = 0;

/**
 * Bind the hub socket on rank 0 before the group forms, so its endpoint can be handed to the others: ipc:// in the
 * coordinator's socket directory (mode 0700) when the coordinator is reached over ipc://, else tcp:// on `host`,
 * with CURVE (the workers' key pair) when the group has keys; required when `host` is not loopback.
 */
export async function bindCollectiveHub(host: string, { coordinator, curve }: { coordinator?: string; curve?: WorkerCurveKeys } = {}): Promise<{ socket: zmq.Router; endpoint: string }> {
  const dir = coordinator === undefined ? null : ipcDirOf(coordinator);
  // a new name per hub: the socket of a hub closed before (a re-formed group) unlinks its own file as it closes
  const address = dir !== null ? ipcEndpoint(dir, `hub-${process.pid}-${hubsBound++}.sock`) : `tcp://${host}:*`;
  const socket = new zmq.Router({ linger: 0, mandatory: true, maxMessageSize: 1 << 30, ...curveServer(address, curve?.secretKey, WORKER_CURVE_OPTION) });
  await socket.bind(address);
  return { socket, endpoint: socket.lastEndpoint ?? address };
}

export interface CpuCollectivesOptions {
  /** The group's shared secret, which the peers prove to the hub and every piece is authenticated with. */
  readonly secret: string;
  /** The group's CURVE keys: a peer reaches a tcp:// hub with them (the hub serves with the workers' pair). */
  readonly curve?: WorkerCurveKeys;
  /** How long a rank waits for its peers in one collective (and for the hub's welcome) before failing it. Defaults to 60 s: ranks run the same work between collectives, so a wait this long means a peer is gone. */
  readonly peerTimeoutMs?: number;
}

const DEFAULT_PEER_TIMEOUT_MS = 60_000;
/** The handshake's frames start with these tags (a piece starts with its 4-byte sequence number). */
const HELLO = Buffer.from('weft.hello');
const CHALLENGE = Buffer.from('weft.challenge');
const AUTH = Buffer.from('weft.auth');
const WELCOME = Buffer.from('weft.welcome');
/** Peers that said hello and were challenged, at most this many (the oldest is forgotten first). */
const MAX_PENDING = 256;

/** A connection to the hub: challenged, then (`joined`) the rank it proved itself as. */
interface HubPeer {
  readonly routingId: Buffer;
  readonly rank: number;
  readonly auth: FrameAuth;
  joined: boolean;
}

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
  private readonly refusals = new RefusalLog((line) => process.stderr.write(`weft worker rank ${this.rank}: collective ${line}\n`));
  /** the hub: connections by routing id (hex), and the joined peer of each rank */
  private readonly hubPeers = new Map<string, HubPeer>();
  private readonly routes: (HubPeer | null)[];
  /** connections the hub challenged: one challenge each, so a stranger that never reads cannot fill its pipe */
  private readonly challenged = new Set<string>();
  /** a peer: its handshake with the hub */
  private readonly nonce = newNonce();
  private hubAuth: FrameAuth | null = null;
  private welcomed: (() => void) | null = null;
  /** the hub: wakes a wait for a peer to join (joined) */
  private joinWaiter: (() => void) | null = null;

  private constructor(
    private readonly engine: Engine,
    readonly rank: number,
    readonly world: number,
    private readonly socket: zmq.Router | zmq.Dealer,
    private readonly peerTimeoutMs: number,
    private readonly secret: string,
  ) {
    this.sendQueue = new SendQueue(socket);
    this.routes = Array.from({ length: world }, () => null);
    void this.receiveLoop();
  }

  static async create(engine: Engine, rank: number, world: number, hub: zmq.Router | null, rootEndpoint: string, options: CpuCollectivesOptions): Promise<CpuCollectives> {
    const timeout = options.peerTimeoutMs ?? DEFAULT_PEER_TIMEOUT_MS;
    const secret = requireSecret(options.secret, `collectives of rank ${rank}`);
    if (rank === 0) {
      if (!hub) throw new WeftError('WEFT_PROTOCOL', 'rank 0 needs its collective hub socket');
      return new CpuCollectives(engine, rank, world, hub, timeout, secret);
    }
    // no routing id: the hub knows this peer by the rank it proves, never by a name it could be given by anyone
    const dealer = new zmq.Dealer({ linger: 0, maxMessageSize: 1 << 30, ...curveClient(rootEndpoint, options.curve, options.curve?.publicKey, WORKER_CURVE_OPTION) });
    dealer.connect(rootEndpoint);
    const comm = new CpuCollectives(engine, rank, world, dealer, timeout, secret);
    await comm.joinHub(rootEndpoint);
    return comm;
  }

  /** A peer: say hello to the hub and wait for its welcome (the handshake itself runs in the receive loop). */
  private async joinHub(endpoint: string): Promise<void> {
    const welcomed = new Promise<boolean>((resolve) => (this.welcomed = () => resolve(true)));
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), this.peerTimeoutMs)));
    this.sendQueue.send([HELLO, u32Frame(this.rank), this.nonce]).catch(() => undefined); // a hub that never answers times out below
    const joined = await Promise.race([welcomed, timedOut]);
    clearTimeout(timer);
    if (!joined) {
      this.close();
      throw new WeftError('WEFT_TIMEOUT', `rank ${this.rank}: the collective hub at ${endpoint} did not welcome this rank within ${this.peerTimeoutMs} ms (rank 0 is gone, or its group secret differs)`);
    }
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
    this.joinWaiter?.();
    throw new WeftError(code, message);
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const frames of this.socket) {
        // The hub sees [routing id, ...frames]; a peer sees the frames.
        if (this.rank === 0) this.hubReceive(frames[0]!, frames.slice(1));
        else this.peerReceive(frames);
      }
    } catch (err) {
      if (!this.closed) {
        this.failure ??= `rank ${this.rank}: collective socket failed: ${(err as Error).message}`;
        for (const wake of this.waiters.values()) wake();
      }
    }
  }

  private refuse(peer: string, why: string): void {
    this.refusals.refuse(peer, why);
  }

  /** The hub: a joined peer's piece (MAC checked), or a step of a handshake; anything else is dropped and logged. */
  private hubReceive(routingId: Buffer, body: Buffer[]): void {
    const name = peerName(routingId);
    const peer = this.hubPeers.get(name);
    if (peer?.joined) {
      const frames = body.slice(0, -1);
      if (peer.auth.open(frames, body.at(-1))) this.arrived(peer.rank, frames);
      else this.refuse(name, `hub: dropped a message on rank ${peer.rank}'s connection without a valid MAC`);
      return;
    }
    const [tag, second, third] = body;
    if (peer && tag?.equals(AUTH) && body.length === 2) {
      this.hubPeers.delete(name);
      if (!peer.auth.open([tag], second)) return this.refuse(name, `hub: refused a peer claiming rank ${peer.rank} (connection ${name}): its proof does not match the group secret`);
      if (this.routes[peer.rank]) return this.refuse(name, `hub: refused a second peer for rank ${peer.rank} (connection ${name}): rank ${peer.rank} already joined`);
      peer.joined = true;
      this.hubPeers.set(name, peer);
      this.routes[peer.rank] = peer;
      this.joinWaiter?.();
      this.sendQueue.send([routingId, WELCOME, peer.auth.seal([WELCOME])]).catch(() => undefined); // a peer that left fails its collectives
      return;
    }
    if (!peer && tag?.equals(HELLO) && body.length === 3 && second?.byteLength === 4 && third?.byteLength === NONCE_BYTES) {
      const claimed = second.readUInt32LE(0);
      if (claimed < 1 || claimed >= this.world) return this.refuse(name, `hub: refused a hello for rank ${claimed}: the peers of a group of ${this.world} are ranks 1-${this.world - 1}`);
      if (this.challenged.has(name)) return this.refuse(name, `hub: dropped another hello from connection ${name}, which was challenged once`);
      if (this.challenged.size >= 4 * MAX_PENDING) this.challenged.clear();
      this.challenged.add(name);
      const nonce = newNonce();
      const auth = FrameAuth.derive(this.secret, 'collective', 'server', third, nonce, Buffer.concat([second, third]));
      const pending = [...this.hubPeers].filter(([, p]) => !p.joined);
      if (pending.length >= MAX_PENDING) this.hubPeers.delete(pending[0]![0]);
      this.hubPeers.set(name, { routingId, rank: claimed, auth, joined: false });
      this.sendQueue.send([routingId, CHALLENGE, nonce]).catch(() => undefined); // a stranger that left: nothing to do
      return;
    }
    if (peer) this.hubPeers.delete(name);
    this.refuse(name, `hub: dropped a message (${body.length} frames) from connection ${name}, which has not proven the group secret`);
  }

  /** A peer: the hub's challenge and welcome, then its pieces (MAC checked). */
  private peerReceive(frames: Buffer[]): void {
    const [tag, second] = frames;
    if (this.welcomed === null && this.hubAuth) {
      const body = frames.slice(0, -1);
      if (this.hubAuth.open(body, frames.at(-1))) this.arrived(0, body);
      else this.refuse('hub', 'dropped a message from the hub without a valid MAC');
    } else if (!this.hubAuth && tag?.equals(CHALLENGE) && second?.byteLength === NONCE_BYTES && frames.length === 2) {
      this.hubAuth = FrameAuth.derive(this.secret, 'collective', 'client', this.nonce, second, Buffer.concat([u32Frame(this.rank), this.nonce]));
      this.sendQueue.send([AUTH, this.hubAuth.seal([AUTH])]).catch(() => undefined); // the hub gone: joinHub times out
    } else if (this.hubAuth && tag?.equals(WELCOME) && frames.length === 2 && this.hubAuth.open([tag], second)) {
      this.welcomed?.();
      this.welcomed = null;
    } else {
      this.refuse('hub', `dropped a message (${frames.length} frames) from the hub before its welcome`);
    }
  }

  /** A piece of rank `from`, authenticated: [seq, payload, extra]. */
  private arrived(from: number, body: Buffer[]): void {
    const [seqFrame, payloadFrame] = body;
    if (!seqFrame || !payloadFrame || seqFrame.byteLength !== 4) return;
    const seq = seqFrame.readUInt32LE(0);
    const list = this.inbox.get(seq) ?? [];
    list.push({ rank: from, payload: toFloat32(payloadFrame), extra: body[2] });
    this.inbox.set(seq, list);
    this.waiters.get(seq)?.();
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
    return u32Frame(seq >>> 0);
  }

  /** The other ranks: the hub waits for them. */
  private peers(): number[] {
    return Array.from({ length: this.world - 1 }, (_, i) => i + 1);
  }

  /** The hub: wait until `rank` has joined (a peer sends nothing before), at most peerTimeoutMs. */
  private async joined(what: string, rank: number): Promise<void> {
    const deadline = Date.now() + this.peerTimeoutMs;
    while (!this.routes[rank]) {
      if (this.failure !== null) throw new WeftError('WEFT_WORKER_DIED', `rank ${this.rank}: ${what}: the group already failed (${this.failure})`);
      const left = deadline - Date.now();
      if (left <= 0) this.fail('WEFT_TIMEOUT', `rank ${this.rank}: ${what}: rank ${rank} did not join the collective hub within ${this.peerTimeoutMs} ms (gone or stalled)`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        timer.unref();
        this.joinWaiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.joinWaiter = null;
    }
  }

  /**
   * Send a piece to rank `to` (from the hub) or to the hub, with its MAC, within peerTimeoutMs: a ROUTER's send to a
   * peer that is going away can wait for room that never comes.
   */
  private async send(what: string, to: number, frames: Uint8Array[]): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      const peer = this.rank === 0 ? this.routes[to] : null;
      if (this.rank === 0 && !peer) throw new Error('it has not joined');
      const sent = peer ? this.sendQueue.send([peer.routingId, ...frames, peer.auth.seal(frames)]) : this.sendQueue.send([...frames, this.hubAuth!.seal(frames)]);
      const timedOut = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`not sent within ${this.peerTimeoutMs} ms`)), this.peerTimeoutMs);
        timer.unref();
      });
      await Promise.race([sent, timedOut]);
    } catch (err) {
      this.fail('WEFT_WORKER_DIED', `rank ${this.rank}: ${what}: cannot send to rank ${to} (${(err as Error).message})`);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Two ranks trade their pieces, each sending its own before it waits for the other's: the wait is one hop, where
   * the hub's sum takes a round trip through rank 0 for rank 1. Returns both in rank order, so that both ranks
   * combine them in the same order (the same floats), as the hub would.
   */
  private async trade(what: string, seq: number, mine: Float32Array): Promise<[Float32Array, Float32Array]> {
    const other = 1 - this.rank;
    if (this.rank === 0) await this.joined(what, other); // the first collective can come before the peer's handshake ends
    const sent = this.send(what, other, [this.seqFrame(seq), float32Bytes(mine)]);
    sent.catch(() => undefined); // a failed send has failed the group, which the wait reports
    const [piece] = await this.collect(what, seq, [other]);
    await sent;
    return this.rank === 0 ? [mine, piece!.payload] : [piece!.payload, mine];
  }

  async allReduce(x: Tensor): Promise<Tensor> {
    if (this.world === 1) return x;
    const seq = this.sequence++;
    const what = `allReduce #${seq}`;
    const mine = this.engine.download(x) as Float32Array;
    let sum: Float32Array;
    if (this.world === 2) {
      const [first, second] = await this.trade(what, seq, mine);
      if (first.length !== second.length) this.fail('WEFT_PROTOCOL', `${what}: rank 0 has ${first.length} values, rank 1 ${second.length}`);
      sum = Float32Array.from(first);
      for (let i = 0; i < sum.length; i++) sum[i]! += second[i]!;
    } else if (this.rank === 0) {
      const pieces = await this.collect(what, seq, this.peers());
      pieces.sort((a, b) => a.rank - b.rank);
      sum = Float32Array.from(mine);
      for (const piece of pieces) {
        if (piece.payload.length !== sum.length) this.fail('WEFT_PROTOCOL', `${what}: rank ${piece.rank} sent ${piece.payload.length} values, rank 0 has ${sum.length}`);
        for (let i = 0; i < sum.length; i++) sum[i]! += piece.payload[i]!;
      }
      for (const piece of pieces) await this.send(what, piece.rank, [this.seqFrame(seq), float32Bytes(sum)]);
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
    if (this.world === 2) {
      pieces = await this.trade(what, seq, mine);
      if (pieces.some((p) => p.length % rows !== 0)) this.fail('WEFT_PROTOCOL', `${what}: rank ${1 - this.rank} sent ${pieces[1 - this.rank]!.length} values, not a multiple of ${rows} rows`);
    } else if (this.rank === 0) {
      const received = await this.collect(what, seq, this.peers());
      received.sort((a, b) => a.rank - b.rank);
      for (const p of received) {
        if (p.payload.length % rows !== 0) this.fail('WEFT_PROTOCOL', `${what}: rank ${p.rank} sent ${p.payload.length} values, not a multiple of rank 0's ${rows} rows`);
      }
      pieces = [mine, ...received.map((p) => p.payload)];
      const widths = Buffer.alloc(4 * this.world);
      pieces.forEach((p, r) => widths.writeUInt32LE(p.length / rows, 4 * r));
      const all = concatFloat32(pieces);
      for (const piece of received) await this.send(what, piece.rank, [this.seqFrame(seq), float32Bytes(all), widths]);
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
    this.joinWaiter?.();
    this.socket.close();
  }
}

function u32Frame(value: number): Buffer {
  const frame = Buffer.alloc(4);
  frame.writeUInt32LE(value, 0);
  return frame;
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
