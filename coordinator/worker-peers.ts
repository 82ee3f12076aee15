/**
 * Which connection on the coordinator's worker socket is which rank. A connection is only a ZeroMQ routing id,
 * which the ROUTER assigns and anyone can get by connecting, so it is trusted for nothing until it has proven the
 * group secret (the handshake of core/frame-auth.ts: hello, challenge, auth); a connection the client binds to a
 * rank is the only one commands for that rank go to, and the only one whose messages are read as that rank's, each
 * checked by its MAC. Everything else is dropped and logged (once per connection, rate-limited).
 *
 * Whether a proven connection may take its rank (a second claim, a restart) is the client's decision
 * (coordinator/worker-client.ts); this file only reports the proof.
 */
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, SendQueue, decode, encode } from '../core/wire.ts';
import { FrameAuth, RefusalLog, newNonce, peerName } from '../core/frame-auth.ts';
import { WeftError } from '../core/errors.ts';
import { parseWorkerMessage, type CoordinatorMessage, type WorkerHello, type WorkerMessage } from '../core/worker-protocol.ts';

/** What a received message turned out to be; anything not listed was handled here (challenged, or dropped and logged). */
export type Arrival =
  /** a connection that just proved the secret; the caller binds it to `hello.rank` or refuses it */
  | { readonly kind: 'proven'; readonly connection: ProvenConnection }
  /** a message of a bound rank, its MAC checked */
  | { readonly kind: 'message'; readonly rank: number; readonly message: WorkerMessage }
  /** a bound rank sent a frame with a valid MAC that does not decode or validate: a fault of that rank */
  | { readonly kind: 'invalid'; readonly rank: number; readonly error: Error };

export interface ProvenConnection {
  readonly routingId: Buffer;
  readonly hello: WorkerHello;
  readonly auth: FrameAuth;
}

/** Connections that said hello and were challenged, at most this many (the oldest is forgotten first). */
const MAX_PENDING = 256;
/** Connections remembered as challenged and not proven; past this the set starts over. */
const MAX_CHALLENGED = 4096;

export class WorkerPeers {
  private readonly outbox: SendQueue;
  /** challenged connections, by routing id (hex) */
  private readonly pending = new Map<string, ProvenConnection>();
  /**
   * Connections challenged and not proven: each gets one challenge, so a stranger that never reads cannot fill its
   * pipe and make the socket's sends (step batches among them) wait on it.
   */
  private readonly challenged = new Set<string>();
  /** the connection each rank is bound to */
  private readonly bound: (ProvenConnection | null)[];
  private readonly refusals = new RefusalLog((line) => process.stderr.write(`weft: ${line}\n`));

  constructor(
    router: zmq.Router,
    private readonly world: number,
    private readonly secret: string,
    /** what log lines call these processes ('worker', 'draft worker') */
    private readonly label: string,
  ) {
    this.outbox = new SendQueue(router);
    this.bound = Array.from({ length: world }, () => null);
  }

  /** Sort one received message (`frames` after the routing id). */
  receive(routingId: Buffer, frames: Buffer[]): Arrival | null {
    const rank = this.bound.findIndex((c) => c !== null && c.routingId.equals(routingId));
    if (rank >= 0) return this.fromBound(rank, frames);
    const name = peerName(routingId);
    const pending = this.pending.get(name);
    if (pending) {
      this.pending.delete(name);
      return this.proof(name, pending, frames);
    }
    this.hello(routingId, name, frames);
    return null;
  }

  private fromBound(rank: number, frames: Buffer[]): Arrival | null {
    const connection = this.bound[rank]!;
    const [frame, mac, ...extra] = frames;
    if (!frame || extra.length > 0 || !connection.auth.open([frame], mac)) {
      this.refuse(connection.routingId, `dropped a message on ${this.label} rank ${rank}'s connection without a valid MAC (${frames.length} frames)`);
      return null;
    }
    let message: WorkerMessage;
    try {
      message = parseWorkerMessage(decode(frame));
    } catch (err) {
      return { kind: 'invalid', rank, error: err as Error };
    }
    if (message.rank !== rank || message.type === 'hello' || message.type === 'auth') {
      const error = new WeftError('WEFT_PROTOCOL', `sent a ${message.type} message as rank ${message.rank} on its bound connection`);
      return { kind: 'invalid', rank, error };
    }
    return { kind: 'message', rank, message };
  }

  /** The third message of a challenged connection: its `auth`, whose MAC proves the secret. */
  private proof(name: string, pending: ProvenConnection, frames: Buffer[]): Arrival | null {
    const { rank, pid } = pending.hello;
    const [frame, mac, ...extra] = frames;
    if (!frame || extra.length > 0 || !pending.auth.open([frame], mac)) {
      this.refuse(pending.routingId, `refused a connection claiming ${this.label} rank ${rank} (pid ${pid}, connection ${name}): its proof does not match the group secret`);
      return null;
    }
    let message: WorkerMessage | null = null;
    try {
      message = parseWorkerMessage(decode(frame));
    } catch {
      // a proven peer that sends nonsense is refused below like any other
    }
    if (message?.type !== 'auth' || message.rank !== rank) {
      this.refuse(pending.routingId, `refused a connection claiming ${this.label} rank ${rank} (pid ${pid}): expected its auth message, got ${message?.type ?? 'an invalid message'}`);
      return null;
    }
    this.challenged.delete(name); // proven: it may prove itself again after the client forgets it (a re-formed group)
    return { kind: 'proven', connection: pending };
  }

  /** A stranger's message: only a hello is read, and answered with a challenge (which reveals nothing). */
  private hello(routingId: Buffer, name: string, frames: Buffer[]): void {
    let message: WorkerMessage;
    try {
      if (frames.length !== 1) throw new WeftError('WEFT_PROTOCOL', `${frames.length} frames`);
      message = parseWorkerMessage(decode(frames[0]!));
    } catch (err) {
      return this.refuse(routingId, `dropped a message from connection ${name}, which has not proven the group secret: ${(err as Error).message}`);
    }
    if (message.type !== 'hello') return this.refuse(routingId, `dropped a ${message.type} message for rank ${message.rank} from connection ${name}, which has not proven the group secret`);
    if (message.rank >= this.world) return this.refuse(routingId, `refused a hello for ${this.label} rank ${message.rank} (pid ${message.pid}): the group has ${this.world} ranks`);
    if (this.challenged.has(name)) return this.refuse(routingId, `dropped another hello from connection ${name}, which was challenged once and did not prove the group secret`);
    if (this.challenged.size >= MAX_CHALLENGED) this.challenged.clear();
    this.challenged.add(name);
    const nonce = newNonce();
    const auth = FrameAuth.derive(this.secret, 'control', 'server', Buffer.from(message.nonce, 'hex'), nonce, frames[0]!);
    if (this.pending.size >= MAX_PENDING) this.pending.delete(this.pending.keys().next().value!);
    this.pending.set(name, { routingId, hello: message, auth });
    const challenge: CoordinatorMessage = { v: PROTOCOL_VERSION, type: 'challenge', nonce: nonce.toString('hex') };
    this.outbox.send([routingId, encode(challenge)]).catch(() => undefined); // a stranger that left: nothing to do
  }

  /** Log a refused connection (once per connection, rate-limited); its messages are not read. */
  refuse(routingId: Buffer, why: string): void {
    this.refusals.refuse(peerName(routingId), why);
  }

  /** Make `connection` the one rank `rank` is reached on and read from; a connection bound before is forgotten. */
  bind(rank: number, connection: ProvenConnection): void {
    this.bound[rank] = connection;
  }

  /** Forget rank `rank`'s connection: nothing is read from it or sent to it until a connection proves itself again. */
  release(rank: number): void {
    this.bound[rank] = null;
  }

  isBound(rank: number): boolean {
    return this.bound[rank] != null;
  }

  /** Send a message to a bound rank, with its MAC. */
  send(rank: number, message: CoordinatorMessage): Promise<void> {
    const connection = this.bound[rank];
    if (!connection) return Promise.reject(new WeftError('WEFT_WORKER_DIED', `${this.label} rank ${rank} has no authenticated connection`));
    const frame = encode(message);
    return this.outbox.send([connection.routingId, frame, connection.auth.seal([frame])]);
  }
}
