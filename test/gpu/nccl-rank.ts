// One rank of a multi-GPU NCCL group, in a process of its own, for collectives.test.ts. argv: rank, world, the
// unique id in hex, the gather widths as JSON. Prints one JSON line: the all-reduce and each gather, downloaded.
import { createEngine } from '../../worker/native.ts';
import { NcclCollectives } from '../../worker/collectives/nccl.ts';
import { GATHER_ROWS, piece } from '../helpers/collectives-contract.ts';

const rank = Number(process.argv[2]);
const world = Number(process.argv[3]);
const id = Uint8Array.from(Buffer.from(process.argv[4] ?? '', 'hex'));
const widths = JSON.parse(process.argv[5] ?? '[]') as number[];
const engine = createEngine({ backend: 'cuda', device: rank });
const comm = await NcclCollectives.create(engine, rank, world, id);
comm.prepare({ gatherWidths: widths });
const input = piece(rank, 2, 3);
const reduced = Array.from(engine.download(await comm.allReduce(engine.upload(new Uint8Array(input.buffer), 'f32', [2, 3]))));
const gathered: number[][] = [];
for (const rows of GATHER_ROWS) {
  const x = piece(rank, rows, widths[rank]!);
  gathered.push(Array.from(engine.download(await comm.allGatherCols(engine.upload(new Uint8Array(x.buffer), 'f32', [rows, widths[rank]!])))));
}
process.stdout.write(`${JSON.stringify({ reduced, gathered, asyncError: comm.asyncError() })}\n`);
comm.close();
