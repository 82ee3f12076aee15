// Collectives for several ranks (processes) sharing one GPU: the contract of worker/collectives/shared-gpu.ts.
//
// Each rank owns one exchange region: a header (its arrival counter, written by it and read by its peers) and
// a data area. The regions are shared between the processes either as device memory through CUDA IPC or as a
// /dev/shm file every process maps and registers with CUDA (ExchangeMemory in cuda/shared-gpu-memory.cc: the
// one piece that differs). A collective copies this rank's input into its data area, meets its peers at a
// barrier, reads every rank's data area (all-reduce: sums them in rank order, so every rank gets the same bits;
// all-gather: places each rank's slice), and meets them again before the data area is written next. Collectives
// larger than a data area run in chunks.
//
// Every step is a kernel or a copy on the caller's stream, so collectives are stream-ordered and can be captured
// into a CUDA graph. The barrier counts on the device (the count lives in device memory, not in a kernel
// argument), so a replayed graph keeps counting. A barrier waits on each peer at most `timeout_ms`; then it
// records the failure in mapped host memory (status(), readable without a sync) and every later collective of
// the group skips its waits: a dead peer becomes an error, never a hang.
//
// Pointers and streams cross as integers (the engine's devicePointer and streamHandle), as for NCCL.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace weft {

// Where the exchange regions live.
enum class ExchangeKind { DeviceIpc, HostShm };

// The first failure of a group, as the device recorded it.
struct SharedGpuStatus {
  bool failed = false;
  int peer = -1;          // the rank that did not arrive
  int64_t collective = -1;  // which collective of the group (0 = the first one)
  int op = 0;             // 1: all-reduce, 2: all-gather
};

class SharedGpuGroup {
 public:
  virtual ~SharedGpuGroup() = default;
  // This rank's region, for its peers: a CUDA IPC memory handle (64 bytes) or a /dev/shm file name.
  virtual std::vector<uint8_t> handle() const = 0;
  // Maps every peer's region (handles in rank order; this rank's own entry is ignored). Throws naming the call
  // that failed (cudaIpcOpenMemHandle, cudaHostRegister) and the CUDA error string.
  virtual void connect(const std::vector<std::vector<uint8_t>>& handles) = 0;
  // Every rank has connected: this rank's handle is no longer needed (ExchangeMemory::unlink_name).
  virtual void peers_connected() = 0;
  // In place: x [count] f32 = the element-wise sum over the ranks, in rank order.
  virtual void all_reduce(uint64_t x, int64_t count, uint64_t stream) = 0;
  // x [rows, widths[rank]] f32 -> out [rows, sum(widths)] f32, the ranks' columns side by side in rank order.
  virtual void all_gather_cols(uint64_t x, uint64_t out, int64_t rows, const std::vector<int64_t>& widths,
                               uint64_t stream) = 0;
  virtual SharedGpuStatus status() const = 0;
};

// A group's rank on CUDA device `device`, its data area `data_bytes` long (collectives above it run in chunks).
std::unique_ptr<SharedGpuGroup> make_shared_gpu_group(int device, int rank, int world, int64_t data_bytes,
                                                      double timeout_ms, ExchangeKind kind);

// The CUDA devices this process sees (0 without CUDA or without a device).
int cuda_device_count();

}  // namespace weft
