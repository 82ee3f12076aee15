// Engine-wide CUDA state shared by the backend, its buffers and the op launchers: device, stream, the
// device-status word that kernels report bad indices into, capture and dead flags. Plain C++ (no kernels),
// so that .cc files include it too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace weft::cuda {

// Which check failed on the device (DeviceStatus::op).
enum class StatusOp : int {
  None = 0,
  WriteKvSeq,  // tokenSeq outside the kvBlockTable's rows (writeKv, qkvRope)
  WriteKvPosition,
  AttentionSeq,
  AttentionPosition,
  RopePosition,
  GatherRow,
  ExpertRepeat,
  SampleArgs,
  SampleNan,
  WriteKvBlock,    // a kvBlockTable entry outside the cache's blocks
  AttentionBlock,
};

// In mapped pinned host memory: kernels write it directly, the host reads it after a stream sync.
struct DeviceStatus {
  int flag;  // 0: fine; 1: the fields below describe the first failure
  int op;    // StatusOp
  long long index, value, limit;
};

struct DeviceState {
  int device = 0;
  cudaStream_t stream = nullptr;
  DeviceStatus* status_host = nullptr;
  DeviceStatus* status_dev = nullptr;
  int num_sms = 0;
  bool capturing = false;
  bool poison = false;
  std::string dead;                  // non-empty after a sticky error: what happened
  std::mutex deferred_mutex;         // finalizers may run while a capture is open
  std::vector<void*> deferred_frees;  // persistent buffers freed during a capture, freed after it

  ~DeviceState();
};

// What a launcher needs.
struct Ctx {
  DeviceState* st;
  cudaStream_t stream;
  DeviceStatus* status;  // device pointer
};

// True for errors after which the CUDA context is unusable (the engine is then dead).
bool is_sticky(cudaError_t e);

}  // namespace weft::cuda
