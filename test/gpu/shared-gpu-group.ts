/**
 * A shared-GPU group for the collectives contract (test/helpers/collectives-contract.ts): each rank is a process of
 * its own (shared-gpu-rank.ts; CUDA IPC cannot open a handle of its own process), and this process holds a proxy
 * Collectives per rank that sends it each call (the tensors' values, through a CPU engine here) and relays the
 * handle exchange between them.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { createEngine, cudaDeviceCount, nativeInfo, type Engine, type SharedGpuMemory, type Tensor } from '../../worker/native.ts';
import type { CollectivePlan, Collectives } from '../../worker/collectives/collectives.ts';
import type { CollectiveGroup, Implementation } from '../helpers/collectives-contract.ts';

export interface SharedGpuGroupOptions {
  readonly world: number;
  readonly memory: SharedGpuMemory | 'auto';
  readonly mode: 'eager' | 'graph';
  /** each rank's data area; small values make every collective run in chunks */
  readonly dataBytes?: number;
}

export function cudaSkipReason(): string | false {
  if (!nativeInfo().cuda) return 'weft was built without CUDA (WEFT_CUDA=1 node native/build.mjs)';
  if (cudaDeviceCount() === 0) return 'no CUDA device';
  try {
    createEngine({ backend: 'cuda' });
    return false;
  } catch (err) {
    return `no usable GPU: ${(err as Error).message}`;
  }
}

type Message = Record<string, unknown>;

/** One rank's process: requests go out one at a time, replies come back in order. */
class RankProcess {
  private readonly replies: Message[] = [];
  private waiting: ((m: Message | null) => void) | null = null;
  private exited = false;
  readonly stderr: string[] = [];

  constructor(readonly child: ChildProcess) {
    const lines = createInterface({ input: child.stdout! });
    lines.on('line', (line) => this.deliver(JSON.parse(line) as Message));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => this.stderr.push(d));
    child.on('exit', () => {
      this.exited = true;
      this.waiting?.(null);
      this.waiting = null;
    });
  }

  private deliver(message: Message): void {
    if (this.waiting) {
      const wake = this.waiting;
      this.waiting = null;
      wake(message);
    } else this.replies.push(message);
  }

  send(message: Message): void {
    this.child.stdin!.write(`${JSON.stringify(message)}\n`);
  }

  /** The next message, or an error saying the process exited (with its stderr). */
  async next(): Promise<Message> {
    const queued = this.replies.shift();
    if (queued) return queued;
    if (this.exited) throw new Error(`the rank process exited: ${this.stderr.join('')}`);
    const message = await new Promise<Message | null>((resolve) => (this.waiting = resolve));
    if (message === null) throw new Error(`the rank process exited: ${this.stderr.join('')}`);
    return message;
  }
}

/** Proxies one rank's calls to its process. asyncError is what the process reported with its last reply. */
class ProxyCollectives implements Collectives {
  private lastAsyncError: string | null = null;
  private plan: CollectivePlan | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    readonly rank: number,
    readonly world: number,
    private readonly process: RankProcess,
    private readonly engine: Engine,
  ) {}

  private request(message: Message): Promise<Message> {
    const result = this.queue.then(async () => {
      this.process.send(message);
      const reply = await this.process.next();
      this.lastAsyncError = (reply.asyncError as string | null | undefined) ?? null;
      if (reply.type === 'error') throw new Error(reply.message as string);
      return reply;
    });
    this.queue = result.catch(() => undefined);
    return result;
  }

  prepare(plan: CollectivePlan): void {
    this.plan = plan;
    void this.request({ type: 'prepare', widths: plan.gatherWidths }).catch(() => undefined);
  }

  private async call(type: 'allReduce' | 'allGatherCols', x: Tensor): Promise<Tensor> {
    const values = Array.from(this.engine.download(x));
    const reply = await this.request({ type, values, shape: x.shape, widths: this.plan?.gatherWidths ?? [] });
    return this.engine.upload(new Uint8Array(Float32Array.from(reply.values as number[]).buffer), 'f32', reply.shape as number[]);
  }

  allReduce(x: Tensor): Promise<Tensor> {
    return this.call('allReduce', x);
  }

  allGatherCols(x: Tensor): Promise<Tensor> {
    return this.call('allGatherCols', x);
  }

  asyncError(): string | null {
    return this.lastAsyncError;
  }

  close(): void {
    this.process.child.kill('SIGKILL');
  }
}

const RANK_SCRIPT = fileURLToPath(new URL('./shared-gpu-rank.ts', import.meta.url));

/**
 * Starts the rank processes and relays their handle exchange. Resolves with their proxies once every rank is
 * ready; rejects with the first rank's failure (a host that refuses CUDA IPC: the message names the call).
 */
export async function openSharedGpuGroup(options: SharedGpuGroupOptions, peerTimeoutMs = 60_000): Promise<{ ranks: ProxyCollectives[]; engine: Engine; memory: string }> {
  const { world, memory, mode, dataBytes = 4 << 20 } = options;
  const processes = Array.from({ length: world }, (_, r) => new RankProcess(
    spawn(process.execPath, ['--import', 'tsx', RANK_SCRIPT, String(r), String(world), memory, String(peerTimeoutMs), String(dataBytes), mode], { stdio: ['pipe', 'pipe', 'pipe'] }),
  ));
  try {
    for (;;) {
      const messages = await Promise.all(processes.map((p) => p.next()));
      const failed = messages.find((m) => m.type === 'failed');
      if (failed) throw new Error(failed.message as string);
      if (messages.every((m) => m.type === 'ready')) {
        const engine = createEngine({ backend: 'cpu', threads: 1 });
        return { ranks: processes.map((p, r) => new ProxyCollectives(r, world, p, engine)), engine, memory: messages[0]!.memory as string };
      }
      if (!messages.every((m) => m.type === 'exchange')) throw new Error(`the ranks are out of step: ${JSON.stringify(messages.map((m) => m.type))}`);
      const all = messages.map((m) => m.bytes);
      for (const p of processes) p.send({ type: 'exchanged', all });
    }
  } catch (err) {
    processes.forEach((p) => p.child.kill('SIGKILL'));
    throw err;
  }
}

/** The contract's view of a shared-GPU group: ranks on one GPU, killRank a SIGKILL of that rank's process. */
export function sharedGpuImplementation(options: SharedGpuGroupOptions, skip: string | false): Implementation {
  const chunked = options.dataBytes !== undefined && options.dataBytes < 1024 ? `, ${options.dataBytes}-byte chunks` : '';
  return {
    name: `shared-gpu (${options.memory}), ${options.world} ranks, ${options.mode}${chunked}`,
    skip,
    waitsOn: (_rank, dead) => dead,
    async open({ peerTimeoutMs }): Promise<CollectiveGroup> {
      const { ranks, engine } = await openSharedGpuGroup(options, peerTimeoutMs);
      return {
        ranks,
        engines: ranks.map(() => engine),
        killRank: (r) => ranks[r]!.close(),
        close: () => ranks.forEach((comm) => comm.close()),
      };
    },
  };
}
