/**
 * What this host gives a worker (core/host-probe.ts): the addon loaded, its CUDA runtime's report, NCCL loaded if
 * asked. Every failure is reported, never thrown. worker/main.ts exports it for `weft doctor`.
 */
import { firstLine } from '../core/errors.ts';
import type { HostProbe } from '../core/host-probe.ts';
import { cudaReport, nativeInfo } from './native.ts';
import { loadNccl } from './collectives/nccl.ts';

/** ncclLibrary: the NCCL library to load and ask its version; null: not asked for. */
export function probeHost(ncclLibrary: string | null): HostProbe {
  let addon: HostProbe['addon'];
  try {
    const info = nativeInfo();
    addon = { version: info.version, cuda: info.cuda };
  } catch (err) {
    return { addon: { error: firstLine(err) }, cuda: null, nccl: null };
  }
  let cuda: HostProbe['cuda'] = null;
  if (addon.cuda) {
    try {
      cuda = cudaReport();
    } catch (err) {
      cuda = { driverVersion: 0, runtimeVersion: 0, error: firstLine(err), devices: [] };
    }
  }
  let nccl: HostProbe['nccl'] = null;
  if (ncclLibrary !== null) {
    try {
      nccl = { version: loadNccl(ncclLibrary).version() };
    } catch (err) {
      nccl = { error: firstLine(err) };
    }
  }
  return { addon, cuda, nccl };
}
