/**
 * A worker's end of its control connection: the handshake of core/frame-auth.ts (hello, the coordinator's
 * challenge, auth), then a MAC on every message both ways. A message from the coordinator is read only when its
 * MAC is right, so the worker obeys only a coordinator that knows the group secret; one that is not is dropped and
 * logged (once, rate-limited).
 */
import type * as zmq from 'zeromq';
import { PROTOCOL_VERSION, SendQueue, decode, encode } from '../core/wire.ts';
import { FrameAuth, RefusalLog, newNonce } from '../core/frame-auth.ts';
import { parseCoordinatorMessage, type CoordinatorMessage, type WorkerHello, type WorkerMessage } from '../core/worker-protocol.ts';

export type HelloClaim = Omit<WorkerHello, 'v' | 'type' | 'nonce'>;

export class CoordinatorLink {
  private readonly outbox: SendQueue;
  private readonly nonce = newNonce();
  private readonly helloFrame: Buffer;
  private auth: FrameAuth | null = null;
  private coordinatorProven = false;
  private readonly refusals: RefusalLog;

  constructor(
    socket: zmq.Dealer,
    private readonly secret: string,
    private readonly claim: HelloClaim,
    log: (line: string) => void,
  ) {
    this.outbox = new SendQueue(socket);
    this.refusals = new RefusalLog(log);
    this.helloFrame = encode({ v: PROTOCOL_VERSION, type: 'hello', ...claim, nonce: this.nonce.toString('hex') } satisfies WorkerHello);
    this.outbox.send([this.helloFrame]).catch(() => undefined); // the coordinator may be gone; the watchdog handles that
  }

  /** Whether the coordinator has proven the secret on this connection (a message of it with a valid MAC). */
  get established(): boolean {
    return this.coordinatorProven;
  }

  /**
   * Read one received message: the challenge is answered here (and returned: the coordinator is there); later
   * messages are returned once their MAC is checked. Anything else is dropped, logged, and null.
   */
  receive(frames: Buffer[]): CoordinatorMessage | null {
    const [frame, mac, ...extra] = frames;
    if (!frame || extra.length > 0) return this.drop(`dropped a message of ${frames.length} frames from the coordinator`);
    if (this.auth === null) {
      if (mac) return this.drop('dropped a message with a MAC before the handshake');
      let message: CoordinatorMessage;
      try {
        message = parseCoordinatorMessage(decode(frame));
      } catch (err) {
        return this.drop(`dropped ${(err as Error).message}`);
      }
      if (message.type !== 'challenge') return this.drop(`dropped a ${message.type} message from the coordinator before the handshake`);
      this.auth = FrameAuth.derive(this.secret, 'control', 'client', this.nonce, Buffer.from(message.nonce, 'hex'), this.helloFrame);
      this.post({ v: PROTOCOL_VERSION, type: 'auth', rank: this.claim.rank });
      return message;
    }
    if (!this.auth.open([frame], mac)) return this.drop('dropped a message from the coordinator without a valid MAC: it does not know the group secret');
    let message: CoordinatorMessage;
    try {
      message = parseCoordinatorMessage(decode(frame));
    } catch (err) {
      return this.drop(`dropped ${(err as Error).message}`);
    }
    this.coordinatorProven = true;
    return message.type === 'challenge' ? null : message;
  }

  private drop(why: string): null {
    this.refusals.refuse(why, why); // one peer here: each kind of refusal is logged once
    return null;
  }

  /** Send a message with its MAC; before the handshake nothing but the hello can be sent, so it is dropped. */
  post(message: WorkerMessage): void {
    if (this.auth === null) return;
    const frame = encode(message);
    this.outbox.send([frame, this.auth.seal([frame])]).catch(() => undefined); // the coordinator may be gone; the watchdog handles that
  }
}
