// Where a shared-GPU group's exchange regions live (../shared-gpu.h): the one piece of the group that differs
// between device memory shared through CUDA IPC and a /dev/shm file mapped by every process and registered with
// CUDA. Both give a device pointer to this rank's region and to each peer's region, and a handle (bytes) that
// names this rank's region to its peers. Plain C++ (no kernels).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "shared-gpu.h"

namespace weft::cuda {

class ExchangeMemory {
 public:
  virtual ~ExchangeMemory() = default;
  // This rank's region (zero-filled when made), as a device pointer.
  virtual void* local() const = 0;
  // What a peer passes to open_peer to map this rank's region.
  virtual std::vector<uint8_t> handle() const = 0;
  // Maps a peer's region (its handle()); the device pointer stays valid while this object lives. Throws
  // "<op>: <call> failed: CUDA error <text>" naming the CUDA call that refused.
  virtual void* open_peer(const std::vector<uint8_t>& handle, const char* op) = 0;
  // Every peer has mapped this region: its name may go (a /dev/shm file is unlinked, so that a killed process
  // leaves none behind; the mappings stay).
  virtual void unlink_name() {}
};

// A region of `bytes` on the current device. Throws naming the call that failed.
std::unique_ptr<ExchangeMemory> make_exchange_memory(ExchangeKind kind, int64_t bytes, const char* op);

}  // namespace weft::cuda
