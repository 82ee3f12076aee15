// NCCL through koffi on one GPU, step by step (each step printed, so a crash shows where), in a process of
// its own so that a crash fails one test. Run by e2e.test.ts; exits 0 when every step checked out.
import { createEngine } from '../../worker/native.ts';
import { loadNccl, NcclCollectives } from '../../worker/collectives/nccl.ts';

const log = (s: string): void => void process.stderr.write(`nccl-probe: ${s}\n`);
const nccl = loadNccl();
log(`version ${nccl.version()}`);
const id = nccl.getUniqueId();
log(`unique id ${id.length} bytes, first ${Array.from(id.slice(0, 8)).join(',')}`);
const engine = createEngine({ backend: 'cuda' });
log(`stream 0x${engine.streamHandle().toString(16)}`);
const comm = await NcclCollectives.create(engine, 0, 1, id);
log('communicator ready');
comm.prepare({ gatherWidths: [5] });
const values = Float32Array.from({ length: 15 }, (_, i) => i * 0.5 - 3);
const x = engine.upload(new Uint8Array(values.buffer), 'f32', [3, 5]);
log(`pointer 0x${engine.devicePointer(x).toString(16)}`);
const reduced = engine.download(await comm.allReduce(x));
if (reduced.some((v, i) => v !== values[i])) throw new Error(`allReduce over one rank changed the values: ${reduced.join(',')}`);
log('allReduce ok');
const gathered = engine.download(await comm.allGatherCols(x)); // three rows: the grouped-broadcast path
if (gathered.some((v, i) => v !== values[i])) throw new Error(`allGather over one rank changed the values: ${gathered.join(',')}`);
const row = engine.upload(new Uint8Array(values.buffer, 0, 20), 'f32', [1, 5]);
const gatheredRow = engine.download(await comm.allGatherCols(row)); // one row: the ncclAllGather path
if (gatheredRow.some((v, i) => v !== values[i])) throw new Error(`allGather of one row over one rank changed the values: ${gatheredRow.join(',')}`);
log('allGather ok');
const asyncError = comm.asyncError();
if (asyncError !== null) throw new Error(`asynchronous NCCL error: ${asyncError}`);
comm.close();
log('aborted; exiting');
