// One rank of a shared-GPU group in a process of its own (CUDA IPC cannot open a handle of its own process), driven
// by shared-gpu-group.ts over stdin/stdout, one JSON object a line. argv: rank, world, memory, peer timeout ms,
// data bytes, mode ('eager' | 'graph'). The handle exchange goes through the parent ({type: 'exchange'} out,
// {type: 'exchanged'} in); then each request ({type: 'prepare' | 'allReduce' | 'allGatherCols'}) gets one reply.
// In graph mode each collective is captured into a CUDA graph and the graph replayed twice: both replays must agree.
import { createInterface } from 'node:readline';
import { createEngine, cudaDeviceCount, type SharedGpuMemory, type Tensor } from '../../worker/native.ts';
import { SharedGpuCollectives } from '../../worker/collectives/shared-gpu.ts';

const [rank, world] = [Number(process.argv[2]), Number(process.argv[3])];
const memory = process.argv[4] as SharedGpuMemory | 'auto';
const peerTimeoutMs = Number(process.argv[5]);
const dataBytes = Number(process.argv[6]);
const graph = process.argv[7] === 'graph';

const send = (message: object): void => void process.stdout.write(`${JSON.stringify(message)}\n`);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async (): Promise<Record<string, unknown>> => {
  const { value, done } = await lines.next();
  if (done) process.exit(0); // the parent is gone
  return JSON.parse(value as string) as Record<string, unknown>;
};

const device = rank % Math.max(1, cudaDeviceCount());
const engine = createEngine({ backend: 'cuda', device });
const exchange = async (mine: Uint8Array): Promise<Uint8Array[]> => {
  send({ type: 'exchange', bytes: Buffer.from(mine).toString('hex') });
  const reply = await next();
  return (reply.all as string[]).map((hex) => Uint8Array.from(Buffer.from(hex, 'hex')));
};
const log = (line: string): void => void process.stderr.write(`shared-gpu rank ${rank}: ${line}\n`);
let comm: SharedGpuCollectives;
try {
  comm = await SharedGpuCollectives.create(engine, device, rank, world, exchange, { memory, peerTimeoutMs, dataBytes, log });
} catch (err) {
  send({ type: 'failed', message: (err as Error).message });
  process.exit(0);
}
// the engine ops a captured collective uses run once eagerly first, as the runner's warm-up does for its graphs
const warm = engine.zeros('f32', [1, 2]);
engine.copy(engine.zeros('f32', [1, 2]), engine.sliceCols(warm, 0, 2));
engine.synchronize();
send({ type: 'ready', memory: comm.memory });

type Op = 'allReduce' | 'allGatherCols';
const run = (op: Op, x: Tensor): Promise<Tensor> => (op === 'allReduce' ? comm.allReduce(x) : comm.allGatherCols(x));

/** Eager: the collective on an uploaded tensor. Graph: captured on a copy of a persistent input, replayed twice. */
async function collective(op: Op, values: Float32Array, shape: number[], outShape: number[]): Promise<Float32Array> {
  const input = engine.upload(new Uint8Array(values.buffer), 'f32', shape);
  if (!graph) return engine.download(await run(op, input)) as Float32Array;
  const result = engine.zeros('f32', outShape);
  engine.beginStep();
  let captured;
  try {
    engine.captureBegin();
    try {
      // a fresh tensor, as in a forward: all-reduce works in place, and a replay must start from the input again
      engine.copy(result, await run(op, engine.sliceCols(input, 0, shape[1]!)));
    } finally {
      captured = engine.captureEnd();
    }
  } finally {
    engine.endStep();
  }
  engine.replay(captured);
  const first = engine.download(result) as Float32Array;
  engine.write(result, new Uint8Array(new Float32Array(first.length).fill(-1).buffer));
  engine.replay(captured);
  const second = engine.download(result) as Float32Array;
  if (comm.asyncError() === null && second.some((v, i) => v !== first[i])) throw new Error(`${op}: the second replay differs from the first`);
  return second;
}

for (;;) {
  const request = await next();
  try {
    if (request.type === 'prepare') {
      comm.prepare({ gatherWidths: request.widths as number[] });
      send({ type: 'done', asyncError: comm.asyncError() });
      continue;
    }
    const op = request.type as Op;
    const shape = request.shape as number[];
    const outShape = op === 'allReduce' ? shape : [shape[0]!, (request.widths as number[]).reduce((a, b) => a + b, 0)];
    const values = await collective(op, Float32Array.from(request.values as number[]), shape, outShape);
    // a peer that never arrived shows here once the collective's kernels ran (the worker's heartbeat polls the same)
    const asyncError = comm.asyncError();
    if (asyncError !== null) send({ type: 'error', message: asyncError, asyncError });
    else send({ type: 'done', values: Array.from(values), shape: outShape, asyncError });
  } catch (err) {
    send({ type: 'error', message: (err as Error).message, asyncError: comm.asyncError() });
  }
}
