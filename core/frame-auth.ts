/**
 * Message authentication for weft's peer links (coordinator ↔ worker control, rank 0's collective hub ↔ its
 * peers). A group's shared secret proves each connection once, without ever being sent; after that every message
 * carries a MAC, so a peer is trusted for what it proved, never for its ZeroMQ routing id.
 *
 * Handshake (the side that connects is the client, the side that binds the server):
 *   client → server  hello: its claim (rank, ...) and a fresh client nonce, no proof
 *   server → client  challenge: a fresh server nonce, no proof
 *   client → server  auth, with a MAC: the client knows the secret
 *   server → client  every later message, with a MAC: the server knows it too
 * Nothing derived from the secret goes to a peer that has proven nothing, so a stranger that connects gets no
 * value to test guessed secrets against. The connection key is HMAC-SHA256(secret, link ‖ client nonce ‖ server
 * nonce ‖ SHA-256(hello)): fresh per connection (a frame recorded on one is worthless on any other), and binding
 * the hello's claims.
 *
 * The MAC is one trailing frame: [counter u64 BE ‖ HMAC-SHA256(key, direction ‖ counter ‖ each frame's length
 * u32 BE and bytes)]. Counters rise per direction; a receiver accepts only a counter above the last one it
 * accepted, so a frame replayed on its own connection is refused as well (gaps are allowed: a send can time out).
 */
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { WeftError } from './errors.ts';

export const NONCE_BYTES = 16;
const COUNTER_BYTES = 8;
const TAG_BYTES = 32;
export const MAC_BYTES = COUNTER_BYTES + TAG_BYTES;
/** Spawned groups and `weft launch` make 48 hex characters; a short secret could be guessed from a MAC. */
export const MIN_SECRET_LENGTH = 16;

/** Which link a key is for, so that a key (and a MAC) of one link is never valid on the other. */
export type AuthLink = 'control' | 'collective';
export type AuthRole = 'client' | 'server';

export const newNonce = (): Buffer => randomBytes(NONCE_BYTES);

/** The group secret, checked: every group has one, long enough that its MACs cannot be brute-forced. */
export function requireSecret(secret: string | null | undefined, who: string): string {
  if (secret === null || secret === undefined || secret.length === 0)
    throw new WeftError('WEFT_BAD_REQUEST', `${who} needs the group's shared secret (--worker-secret-file PATH or WEFT_WORKER_SECRET): every worker message is authenticated with it`);
  if (secret.length < MIN_SECRET_LENGTH)
    throw new WeftError('WEFT_BAD_REQUEST', `${who}: the group's shared secret has ${secret.length} characters, at least ${MIN_SECRET_LENGTH} are needed`);
  return secret;
}

/** The MAC state of one authenticated connection, as one of its two ends. */
export class FrameAuth {
  private sent = 0;
  private received = 0;

  private constructor(
    private readonly key: Buffer,
    private readonly sendDirection: AuthRole,
  ) {}

  /** The key of one connection, as `role`, from the group secret, both nonces and the hello that opened it. */
  static derive(secret: string, link: AuthLink, role: AuthRole, clientNonce: Uint8Array, serverNonce: Uint8Array, hello: Uint8Array): FrameAuth {
    if (clientNonce.byteLength !== NONCE_BYTES || serverNonce.byteLength !== NONCE_BYTES)
      throw new WeftError('WEFT_PROTOCOL', `a handshake nonce must be ${NONCE_BYTES} bytes, got ${clientNonce.byteLength} and ${serverNonce.byteLength}`);
    const key = createHmac('sha256', secret)
      .update(`weft/${link}/1`)
      .update(clientNonce)
      .update(serverNonce)
      .update(createHash('sha256').update(hello).digest())
      .digest();
    return new FrameAuth(key, role);
  }

  private tag(direction: AuthRole, counter: Buffer, frames: readonly Uint8Array[]): Buffer {
    const hmac = createHmac('sha256', this.key).update(direction).update(counter);
    const length = Buffer.alloc(4);
    for (const frame of frames) {
      length.writeUInt32BE(frame.byteLength, 0);
      hmac.update(length).update(frame);
    }
    return hmac.digest();
  }

  /** The MAC frame for the next message this end sends, made of `frames`. */
  seal(frames: readonly Uint8Array[]): Buffer {
    const counter = Buffer.alloc(COUNTER_BYTES);
    counter.writeBigUInt64BE(BigInt(++this.sent), 0);
    return Buffer.concat([counter, this.tag(this.sendDirection, counter, frames)]);
  }

  /** Whether `mac` authenticates `frames` as the peer's next message (its counter above the last one accepted). */
  open(frames: readonly Uint8Array[], mac: Uint8Array | undefined): boolean {
    if (!mac || mac.byteLength !== MAC_BYTES) return false;
    const counterBytes = Buffer.from(mac.buffer, mac.byteOffset, COUNTER_BYTES);
    const counter = Number(counterBytes.readBigUInt64BE(0));
    const expected = this.tag(this.sendDirection === 'client' ? 'server' : 'client', counterBytes, frames);
    if (!timingSafeEqual(expected, Buffer.from(mac.buffer, mac.byteOffset + COUNTER_BYTES, TAG_BYTES))) return false;
    if (counter <= this.received) return false; // a replay on this connection
    this.received = counter;
    return true;
  }
}

/**
 * Refusals of peers, logged: once per peer (a flood from one connection is one line), and at most `burst` lines per
 * `windowMs` over all peers (a flood of connections is a few lines and a count).
 */
export class RefusalLog {
  private readonly logged = new Set<string>();
  private windowStart = 0;
  private lines = 0;
  private suppressed = 0;

  constructor(
    private readonly write: (line: string) => void,
    private readonly burst = 10,
    private readonly windowMs = 10_000,
    /** peers remembered as logged; past this the set starts over (a peer may then be logged again) */
    private readonly remember = 4096,
  ) {}

  refuse(peer: string, why: string): void {
    if (this.logged.has(peer)) return;
    if (this.logged.size >= this.remember) this.logged.clear();
    this.logged.add(peer);
    const now = Date.now();
    if (now - this.windowStart >= this.windowMs) {
      if (this.suppressed > 0) this.write(`${this.suppressed} more refused peers were not logged in the last ${this.windowMs} ms`);
      this.windowStart = now;
      this.lines = 0;
      this.suppressed = 0;
    }
    if (this.lines++ < this.burst) this.write(why);
    else this.suppressed++;
  }
}

/** A routing id as a map key and in log lines. */
export const peerName = (routingId: Uint8Array): string => Buffer.from(routingId.buffer, routingId.byteOffset, routingId.byteLength).toString('hex');
