/**
 * The byte level of every ZeroMQ link in weft: one msgpackr configuration (plain MessagePack maps, no
 * records, no structured clone, so any decoder can read it) and a send queue, because a zeromq.js socket
 * allows only one pending send at a time.
 */
import { Packr } from 'msgpackr';
import type * as zmq from 'zeromq';
import { WeftError } from './errors.ts';
import { checkMsgpack } from './msgpack-guard.ts';

const packr = new Packr({ useRecords: false, structuredClone: false, moreTypes: false, mapsAsObjects: true, int64AsType: 'number' });

/** Protocol version carried in every message as `v`. */
export const PROTOCOL_VERSION = 1;

export function encode(message: unknown): Buffer {
  return packr.pack(message);
}

/**
 * Decode an untrusted frame; a malformed one becomes a WEFT_PROTOCOL error, never a crash. Every socket's
 * frames come through here, so every one is pre-scanned (no ext types, bounded nesting and lengths) before
 * msgpackr sees it.
 */
export function decode(frame: Buffer | Uint8Array): unknown {
  checkMsgpack(frame);
  try {
    return packr.unpack(frame instanceof Buffer ? frame : Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength));
  } catch (err) {
    throw new WeftError('WEFT_PROTOCOL', `malformed message (${frame.byteLength} bytes): ${(err as Error).message}`);
  }
}

/** A pause before a send the socket refused with EAGAIN is tried again (a retry at once could spin). */
const SEND_RETRY_PAUSE_MS = 5;

/**
 * Serialises sends on one socket (zeromq.js rejects a second concurrent send with EBUSY). On a socket without a send
 * timeout, a send rejected with EAGAIN is tried again: there the socket holds a send until it can take it, so EAGAIN
 * only means it reported itself writable and was not by the time the send ran (zeromq.js sends at once on a socket
 * that reports POLLOUT; CI saw a client's call fail with that raw error 20 ms into a call whose peer never answered).
 * With a send timeout, EAGAIN is that timeout and is the caller's to handle.
 */
export class SendQueue {
  private tail: Promise<void> = Promise.resolve();
  constructor(private readonly socket: zmq.Writable) {}

  send(frames: Array<Buffer | Uint8Array | string>): Promise<void> {
    const result = this.tail.then(() => this.sendUntilTaken(frames));
    this.tail = result.catch(() => undefined);
    return result;
  }

  private async sendUntilTaken(frames: Array<Buffer | Uint8Array | string>): Promise<void> {
    for (;;) {
      try {
        return await this.socket.send(frames);
      } catch (err) {
        const wouldBlock = (err as { code?: string }).code === 'EAGAIN';
        if (!wouldBlock || this.socket.sendTimeout >= 0) throw err;
        await new Promise((resolve) => setTimeout(resolve, SEND_RETRY_PAUSE_MS));
      }
    }
  }
}

/** Copy a received byte frame into a fresh, aligned Float32Array. */
export function toFloat32(bytes: Uint8Array): Float32Array {
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  return new Float32Array(copy.buffer, 0, bytes.byteLength / 4);
}

/** View a Float32Array's bytes without copying. */
export function float32Bytes(values: Float32Array): Uint8Array {
  return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
}
