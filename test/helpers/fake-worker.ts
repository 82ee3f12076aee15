/**
 * A stand-in worker rank on a Dealer socket, for tests of the coordinator's end of the control protocol: it runs
 * the handshake of core/frame-auth.ts with whatever secret it is given (the group's, or a wrong one), then lets
 * the test send messages with their MAC and read the coordinator's (MAC checked, pings skipped).
 */
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, decode, encode } from '../../core/wire.ts';
import { FrameAuth, newNonce } from '../../core/frame-auth.ts';
import { parseCoordinatorMessage, type CoordinatorMessage } from '../../core/worker-protocol.ts';

const v = PROTOCOL_VERSION;

export interface FakeRankOptions {
  readonly pid?: number;
  /** a fixed routing id (the old `rank-N` scheme): the coordinator must not care */
  readonly routingId?: string;
  /** sent in hello: this host's name makes the coordinator watch the pid */
  readonly hostname?: string;
  /** how long a receive waits. Defaults to 5000 ms. */
  readonly receiveTimeoutMs?: number;
}

export class FakeRank {
  readonly socket: zmq.Dealer;
  private auth: FrameAuth | null = null;
  /** every frame set received, raw (what a rogue got) */
  readonly received: Buffer[][] = [];

  constructor(
    endpoint: string,
    readonly rank: number,
    readonly world: number,
    private readonly secret: string,
    private readonly options: FakeRankOptions = {},
  ) {
    this.socket = new zmq.Dealer({ linger: 0, receiveTimeout: options.receiveTimeoutMs ?? 5000, ...(options.routingId !== undefined && { routingId: options.routingId }) });
    this.socket.connect(endpoint);
  }

  /** Connect as `rank` with `secret`: hello, wait for the challenge, auth. Resolves once auth is sent. */
  static async join(endpoint: string, rank: number, world: number, secret: string, options: FakeRankOptions = {}): Promise<FakeRank> {
    const fake = new FakeRank(endpoint, rank, world, secret, options);
    await fake.handshake();
    return fake;
  }

  /** Run the handshake (again, on the same connection, after the coordinator forgot it). */
  async handshake(): Promise<void> {
    const nonce = newNonce();
    const hello = encode({ v, type: 'hello', rank: this.rank, world: this.world, pid: this.options.pid ?? process.pid, collectiveEndpoint: `tcp://127.0.0.1:${7000 + this.rank}`, nonce: nonce.toString('hex'), ...(this.options.hostname !== undefined && { hostname: this.options.hostname }) });
    await this.socket.send(hello);
    const frames = await this.socket.receive();
    this.received.push(frames);
    const challenge = parseCoordinatorMessage(decode(frames[0]!));
    if (challenge.type !== 'challenge' || frames.length !== 1) throw new Error(`expected a challenge, got ${challenge.type} in ${frames.length} frames`);
    this.auth = FrameAuth.derive(this.secret, 'control', 'client', nonce, Buffer.from(challenge.nonce, 'hex'), hello);
    await this.send({ v, type: 'auth', rank: this.rank });
  }

  /** Send a message with its MAC. */
  send(message: unknown): Promise<void> {
    const frame = encode(message);
    return this.socket.send([frame, this.auth!.seal([frame])]);
  }

  /** The coordinator's next message other than a ping, its MAC checked. */
  async next(): Promise<CoordinatorMessage> {
    for (;;) {
      const frames = await this.socket.receive();
      this.received.push(frames);
      const [frame, mac] = frames;
      if (!this.auth!.open([frame!], mac)) throw new Error('a coordinator message without a valid MAC');
      const message = parseCoordinatorMessage(decode(frame!));
      if (message.type !== 'ping') return message;
    }
  }

  close(): void {
    this.socket.close();
  }
}
