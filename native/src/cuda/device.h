// Engine-wide CUDA state shared by the backend, its buffers and the op launchers: device, stream, the
// device-status word that kernels report bad indices into, capture and dead flags; and the one path every CUDA
// error takes (fail_cuda). Plain C++ (no kernels), so that .cc files include it too.
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
  FeedTokens,      // feedTokens: a from index past src
  SageSeqs,        // sageAttention: rows naming more sequences than its scratch holds (decodeRows not decode rows)
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

// Opens `device` for an engine: a non-blocking stream, the mapped status word, a memory pool that keeps freed
// memory. Throws "<op>: no CUDA device found ..." and the like.
void open_device(DeviceState& st, int device, const char* op);

// True for errors after which the CUDA context is unusable (the engine is then dead).
bool is_sticky(cudaError_t e);

// ---- the one path of a CUDA error. Throws weft::Error(op, "CUDA error <text><detail>"), where detail names
// the call or the shapes (" (x [3, 64] f32, w [128, 64] bf16)"). A non-sticky error is cleared so that the next
// launch check does not report it again; a sticky one marks the engine dead (st->dead), after which
// Backend::check_alive refuses every call with "engine is dead after <op>: CUDA error <text>". st may be null
// (a benchmark without an engine).
[[noreturn]] void fail_cuda(DeviceState* st, const char* op, cudaError_t e, const std::string& detail = "");

// detail is a plain string here, so that the check costs nothing when the call succeeded.
inline void check_cuda(DeviceState* st, cudaError_t e, const char* op, const char* detail = "") {
  if (e != cudaSuccess) fail_cuda(st, op, e, detail);
}
inline void check_cuda(DeviceState& st, cudaError_t e, const char* op, const char* detail = "") {
  if (e != cudaSuccess) fail_cuda(&st, op, e, detail);
}

// Throws what a kernel reported in the status word since the last check (and clears it); call after the
// reporting work completed (a stream sync, or an event recorded after it).
void check_status(DeviceState& st);
// Waits for the stream (check_cuda), then throws a device-side index error if a kernel reported one.
void synchronize(DeviceState& st, const char* op);

}  // namespace weft::cuda
