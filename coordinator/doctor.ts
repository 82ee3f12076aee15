/**
 * `weft doctor`: whether this host can run weft as asked, one check at a time, each saying what it found and, when
 * it cannot run, what to change. In order: Node.js, the native addon, the CUDA runtime and its devices, NCCL, ZeroMQ,
 * the model directory, and last a real run: the cluster started as asked (worker processes, sockets, collectives,
 * weights) and one token generated. The checks after a failure that they depend on are skipped, saying which.
 * The earlier checks find what the run would only report as a failure to start (a CUDA driver older than the
 * runtime, an NCCL that does not load, a model weft cannot read); the run finds the rest.
 */
import * as zmq from 'zeromq';
import { firstLine } from '../core/errors.ts';
import type { HostProbe } from '../core/host-probe.ts';
import { readModelSpec } from '../core/model-spec.ts';
import { startCluster } from './cluster.ts';
import { WORKER_ENTRY } from './config.ts';
import { PACKAGE_JSON as PACKAGE } from './package-layout.ts';

export type CheckStatus = 'ok' | 'warn' | 'fail' | 'skip';
export interface DoctorCheck {
  readonly name: 'node' | 'addon' | 'cuda' | 'nccl' | 'zeromq' | 'model' | 'run';
  readonly status: CheckStatus;
  readonly detail: string;
}
export interface DoctorReport {
  /** no check failed */
  readonly ok: boolean;
  readonly checks: readonly DoctorCheck[];
}
export interface DoctorOptions {
  readonly modelDir: string;
  readonly tp: number;
  readonly device: 'cpu' | 'cuda';
  readonly collectives?: 'auto' | 'nccl' | 'shared-gpu';
  /** the NCCL library the workers would load (--nccl-library's resolved value) */
  readonly ncclLibrary: string;
}

/** The kernels are built for this compute capability (native/build.mjs: sm_90a). */
const KERNEL_ARCH = '9.0';

/** 13000 -> "13.0", 12080 -> "12.8" (the CUDA runtime's encoding) */
const cudaVersion = (v: number): string => `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
/** 22803 -> "2.28.3" (NCCL's encoding since 2.9) */
const ncclVersion = (v: number): string => `${Math.floor(v / 10000)}.${Math.floor((v % 10000) / 100)}.${v % 100}`;
const gib = (bytes: number): string => `${(bytes / 2 ** 30).toFixed(1)} GiB`;

function checkNode(): DoctorCheck {
  const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
  const [needMajor = 0, needMinor = 0] = (/(\d+)\.(\d+)/.exec(PACKAGE.engines.node) ?? []).slice(1).map(Number);
  const fits = major > needMajor || (major === needMajor && minor >= needMinor);
  return { name: 'node', status: fits ? 'ok' : 'fail', detail: `Node.js ${process.versions.node}${fits ? '' : `: weft needs ${PACKAGE.engines.node} (package.json engines)`}` };
}

function checkAddon(device: DoctorOptions['device'], probe: HostProbe): DoctorCheck {
  if ('error' in probe.addon) return { name: 'addon', status: 'fail', detail: probe.addon.error };
  const { version, cuda } = probe.addon;
  const built = `weft.node ${version}, CUDA backend: ${cuda ? 'yes' : 'no'}`;
  if (version !== PACKAGE.version) return { name: 'addon', status: 'warn', detail: `${built}, built from another version than this package's ${PACKAGE.version}: run \`npm run build:native\`` };
  if (device === 'cuda' && !cuda) return { name: 'addon', status: 'fail', detail: `${built}; --device cuda needs the CUDA build (WEFT_CUDA=1 npm run build:native, on a host with nvcc 13)` };
  return { name: 'addon', status: 'ok', detail: built };
}

function checkCuda(device: DoctorOptions['device'], probe: HostProbe): DoctorCheck {
  if ('error' in probe.addon) return { name: 'cuda', status: 'skip', detail: 'the addon did not load' };
  const report = probe.cuda;
  if (report === null) return { name: 'cuda', status: 'skip', detail: device === 'cpu' ? 'not needed with --device cpu (a CPU-only build)' : 'a CPU-only build' };
  const versions = `driver ${report.driverVersion ? cudaVersion(report.driverVersion) : 'none'}, runtime ${cudaVersion(report.runtimeVersion)}`;
  if (report.devices.length === 0) {
    const why = report.error || 'no device';
    return { name: 'cuda', status: device === 'cuda' ? 'fail' : 'skip', detail: `${why} (${versions})${device === 'cuda' ? ': check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES' : ''}` };
  }
  const list = report.devices.map((d) => `${d.index} ${d.name} (sm ${d.computeCapability}, ${gib(d.memoryBytes)}, ${d.sms} SMs)`).join('; ');
  const other = report.devices.filter((d) => d.computeCapability !== KERNEL_ARCH);
  if (device === 'cuda' && other.length > 0)
    return { name: 'cuda', status: other.length === report.devices.length ? 'fail' : 'warn', detail: `${list}; ${versions}: the kernels are built for compute capability ${KERNEL_ARCH} (Hopper), not ${[...new Set(other.map((d) => d.computeCapability))].join(', ')}` };
  return { name: 'cuda', status: 'ok', detail: `${report.devices.length} device${report.devices.length > 1 ? 's' : ''}: ${list}; ${versions}` };
}

function checkNccl(options: DoctorOptions, cuda: DoctorCheck, probe: HostProbe): DoctorCheck {
  if (options.device !== 'cuda') return { name: 'nccl', status: 'skip', detail: 'not needed with --device cpu' };
  if (cuda.status === 'fail' || cuda.status === 'skip' || probe.nccl === null) return { name: 'nccl', status: 'skip', detail: 'no CUDA device to check it with' };
  if ('version' in probe.nccl) return { name: 'nccl', status: 'ok', detail: `NCCL ${ncclVersion(probe.nccl.version)} (${options.ncclLibrary})` };
  // Needed only where the ranks combine through NCCL: more than one rank with collectives other than shared-gpu.
  const needed = options.tp > 1 && options.collectives !== 'shared-gpu';
  return { name: 'nccl', status: needed ? 'fail' : 'warn', detail: `${probe.nccl.error}${needed ? '' : ' (needed only for more than one rank on NCCL)'}` };
}

function checkZeromq(): DoctorCheck {
  const curve = zmq.capability.curve === true;
  return {
    name: 'zeromq',
    status: curve ? 'ok' : 'warn',
    detail: `libzmq ${zmq.version}, CURVE ${curve ? 'available' : 'missing: sockets on other than loopback are refused (they need CURVE keys)'}`,
  };
}

function checkModel(modelDir: string): DoctorCheck {
  try {
    const spec = readModelSpec(modelDir);
    const kv = spec.nKvHeads === spec.nHeads ? '' : `, ${spec.nKvHeads} KV heads`;
    const experts = spec.nExperts ? `, ${spec.nExperts} experts` : '';
    return { name: 'model', status: 'ok', detail: `${modelDir}: ${spec.architecture}, ${spec.nLayers} layers, hidden ${spec.hidden}, ${spec.nHeads} heads${kv}${experts}, vocabulary ${spec.vocabSize}, context ${spec.maxContext}` };
  } catch (err) {
    return { name: 'model', status: 'fail', detail: firstLine(err) };
  }
}

/** The cluster as asked, one greedy token, closed again: every process it started is gone when this returns. */
async function checkRun(options: DoctorOptions): Promise<DoctorCheck> {
  const started = performance.now();
  let cluster: Awaited<ReturnType<typeof startCluster>> | undefined;
  try {
    cluster = await startCluster({ modelDir: options.modelDir, tp: options.tp, device: options.device, ...(options.collectives && { collectives: options.collectives }) });
    const loaded = performance.now();
    let tokens = 0;
    for await (const event of cluster.generate({ prompt: 'The', sampling: { maxNewTokens: 1, temperature: 0, ignoreEos: true } })) if (event.type === 'token') tokens += 1;
    const ms = (t: number): string => `${t.toFixed(0)} ms`;
    return { name: 'run', status: tokens === 1 ? 'ok' : 'fail', detail: `${options.tp} rank${options.tp > 1 ? 's' : ''} on ${options.device}: started and loaded in ${ms(loaded - started)}, first token in ${ms(performance.now() - loaded)}` };
  } catch (err) {
    return { name: 'run', status: 'fail', detail: firstLine(err) };
  } finally {
    await cluster?.close();
  }
}

/** What the worker entry gives the doctor: the host as a worker would find it (worker/host-probe.ts). */
interface WorkerEntryProbe {
  probeHost(ncclLibrary: string | null): HostProbe;
}

export async function runDoctor(options: DoctorOptions): Promise<DoctorReport> {
  // The addon, CUDA and NCCL are the worker side's: asked through the worker's entry, as `weft worker` loads it.
  const { probeHost } = (await import(WORKER_ENTRY)) as WorkerEntryProbe;
  const probe = probeHost(options.device === 'cuda' ? options.ncclLibrary : null);
  const checks: DoctorCheck[] = [checkNode(), checkAddon(options.device, probe)];
  const cuda = checkCuda(options.device, probe);
  checks.push(cuda, checkNccl(options, cuda, probe), checkZeromq(), checkModel(options.modelDir));
  const blocking = checks.filter((c) => c.status === 'fail').map((c) => c.name);
  checks.push(blocking.length > 0 ? { name: 'run', status: 'skip', detail: `not tried: ${blocking.join(', ')} failed` } : await checkRun(options));
  return { ok: checks.every((c) => c.status !== 'fail'), checks };
}

/** The report as text: a line a check, status first. */
export function formatDoctorReport(report: DoctorReport): string {
  const width = Math.max(...report.checks.map((c) => c.name.length));
  return report.checks.map((c) => `${c.status.padEnd(4)}  ${c.name.padEnd(width)}  ${c.detail}`).join('\n') + '\n';
}
