// The CUDA backend's memory: persistent tensors (stream-ordered allocations from the device pool), the step
// arena (one allocation, bump-allocated within a step), and pinned host staging for uploads and downloads.
// Plain C++ (no kernels).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "backend.h"  // PendingDownload
#include "cuda/device.h"
#include "tensor.h"

namespace weft::cuda {

// Arena bytes [.., end) that a captured graph writes: reserved while the graph or any of its tensors lives.
struct GraphRegion {
  size_t end = ~size_t{0};
};

// Storage for the persistent tensor t (t.buffer unset): cudaMallocAsync on the engine stream, freed
// stream-ordered, or after the capture if its last handle goes while one is open.
std::shared_ptr<Buffer> allocate_persistent(const std::shared_ptr<DeviceState>& st, const Tensor& t);

// While a capture is open (st.capturing), persistent buffers freed by their last handle wait in
// st.deferred_frees; set_capturing(false) frees them.
void set_capturing(DeviceState& st, bool capturing);

// The step arena: allocated at the first step (EngineOptions.arenaBytes), bump-allocated within a step, and
// reset by the next step to start above the memory of every live graph.
class StepArena {
 public:
  StepArena(std::shared_ptr<DeviceState> st, size_t bytes) : st_(std::move(st)), bytes_(bytes) {}
  void begin_step();
  // Arena storage for t (t.buffer unset), stamped with `step`; `region` is the open capture's (else null).
  std::shared_ptr<Buffer> allocate(const Tensor& t, uint64_t step, std::shared_ptr<GraphRegion> region);
  // A capture ended: its region covers the arena bytes used so far and stays reserved while it lives.
  void close_region(const std::shared_ptr<GraphRegion>& region);
  // Bytes of the arena in use (the next allocation's offset), and a return to such an earlier offset: what
  // was allocated above it is free again (a layer's release; the stream orders the reuse after its readers).
  size_t used() const { return used_; }
  static size_t footprint(size_t bytes);  // what an allocation of `bytes` takes (aligned)
  void rewind(size_t offset);
  // The offset of the buffer's memory in the arena, or -1 when it is not arena memory.
  int64_t offset_of(const Buffer& buffer) const;

 private:
  struct Memory;
  std::shared_ptr<DeviceState> st_;
  size_t bytes_;
  std::shared_ptr<Memory> memory_;  // kept alive by every tensor in it
  size_t used_ = 0;
  std::vector<std::weak_ptr<GraphRegion>> regions_;
};

// Pinned host staging: two upload buffers used in turn (an event says when a buffer's last copy ran); the
// first one also carries downloads. Small uploads (a step's index and sampling inputs) go through a ring of
// kSmallSlots slots instead, so that writing the next step's inputs while earlier steps are queued waits only
// for the copy made kSmallSlots uploads ago, not for the queued work. Asynchronous downloads (download_async)
// land in slots of their own, held until the download is finished.
class Staging {
 public:
  static constexpr size_t kBytes = size_t{16} << 20;  // each buffer; also the download chunk
  static constexpr size_t kSmallBytes = 4096;         // an upload up to this size takes a small slot
  static constexpr int kSmallSlots = 64;
  static constexpr size_t kSlotBytes = 64 << 10;      // an asynchronous download up to this size takes a slot
  static constexpr int kSlots = 16;

  explicit Staging(DeviceState& st);
  ~Staging();
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  // Host -> device, n bytes; returns once the bytes are staged.
  void upload(void* dst, const void* src, size_t n);
  // Device -> pinned (chunk by chunk, waiting for each) -> dst, converting f16/bf16 to f32 on the host.
  void download(const Tensor& t, void* dst);
  // The copy of t into a free slot, queued now; null when t is larger than a slot or every slot is held.
  std::unique_ptr<PendingDownload> download_async(const Tensor& t);

 private:
  friend class SlotDownload;
  DeviceState& st_;
  void* buf_[2] = {nullptr, nullptr};
  cudaEvent_t done_[2] = {nullptr, nullptr};
  int next_ = 0;
  char* small_ = nullptr;  // [kSmallSlots][kSmallBytes] pinned
  cudaEvent_t small_done_[kSmallSlots] = {};
  int small_next_ = 0;
  char* slots_ = nullptr;  // [kSlots][kSlotBytes] pinned
  cudaEvent_t slot_done_[kSlots] = {};
  bool slot_held_[kSlots] = {};
};

}  // namespace weft::cuda
