// Diagnostic: NCCL through koffi step by step on one GPU (prints each step, so a crash shows where).
import { createEngine } from '../worker/native.ts';
import { loadNccl, NcclCollectives } from '../worker/collectives/nccl.ts';

const log = (s: string): void => void process.stderr.write(`nccl-probe: ${s}\n`);
const nccl = loadNccl();
log(`version ${nccl.version()}`);
const id = nccl.getUniqueId();
log(`unique id ${id.length} bytes, first ${Array.from(id.slice(0, 8)).join(',')}`);
const engine = createEngine({ backend: 'cuda' });
log(`stream 0x${engine.streamHandle().toString(16)}`);
const comm = await NcclCollectives.create(engine, 0, 1, id);
log('communicator ready');
comm.prepare([3]);
const values = Float32Array.from({ length: 15 }, (_, i) => i * 0.5 - 3);
const x = engine.upload(new Uint8Array(values.buffer), 'f32', [3, 5]);
log(`pointer 0x${engine.devicePointer(x).toString(16)}`);
const reduced = engine.download(await comm.allReduce(x));
log(`allReduce ok: ${reduced.slice(0, 4).join(',')}`);
const gathered = engine.download(await comm.allGatherCols(x));
log(`allGather ok: ${gathered.slice(0, 4).join(',')}`);
log(`async error: ${comm.asyncError()}`);
comm.close();
log('aborted; exiting');
