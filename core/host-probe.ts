/**
 * What a worker on this host would load, as plain data: the native addon's build facts, the CUDA runtime's versions
 * and devices, NCCL's version. worker/host-probe.ts makes it (the worker side owns the addon and NCCL); `weft doctor`
 * (coordinator/doctor.ts) reads it.
 */

/** The CUDA runtime of the addon's build, as it sees the host (the addon's cudaReport()). */
export interface CudaReport {
  /** 1000 major + 10 minor (13000: 13.0); 0 when there is no driver, or no CUDA in this build */
  readonly driverVersion: number;
  readonly runtimeVersion: number;
  /** why no device is seen (a build without CUDA, no driver, a driver older than the runtime); '' when the query worked */
  readonly error: string;
  readonly devices: readonly { readonly index: number; readonly name: string; readonly computeCapability: string; readonly memoryBytes: number; readonly sms: number }[];
}

export interface HostProbe {
  /** the native addon's version and whether it has the CUDA backend, or why it did not load */
  readonly addon: { readonly version: string; readonly cuda: boolean } | { readonly error: string };
  /** the CUDA runtime's report; null without the addon, or with a build without CUDA */
  readonly cuda: CudaReport | null;
  /** NCCL's version (10000 major + 100 minor + patch), or why it did not load; null when not asked for */
  readonly nccl: { readonly version: number } | { readonly error: string } | null;
}
