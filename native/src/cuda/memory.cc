#include "cuda/memory.h"

#include <algorithm>
#include <cstring>

#include "cpu/convert.h"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(size_t bytes, void* ptr, std::shared_ptr<DeviceState> st) : Buffer(bytes), ptr_(ptr), st_(std::move(st)) {}
  ~DeviceBuffer() override {
    if (!ptr_) return;
    cudaSetDevice(st_->device);
    std::lock_guard<std::mutex> lock(st_->deferred_mutex);
    if (st_->capturing)
      st_->deferred_frees.push_back(ptr_);
    else
      cudaFreeAsync(ptr_, st_->stream);
  }
  void* data() const override { return ptr_; }

 private:
  void* ptr_;
  std::shared_ptr<DeviceState> st_;
};

}  // namespace

// The arena's device memory.
struct StepArena::Memory {
  void* base = nullptr;
  size_t size = 0;
  std::shared_ptr<DeviceState> st;
  ~Memory() {
    if (!base) return;
    cudaSetDevice(st->device);
    cudaStreamSynchronize(st->stream);
    cudaFree(base);
  }
};

namespace {

class ArenaBuffer final : public Buffer {
 public:
  ArenaBuffer(size_t bytes, uint64_t step, void* ptr, std::shared_ptr<const void> arena,
              std::shared_ptr<GraphRegion> region)
      : Buffer(bytes, step), ptr_(ptr), arena_(std::move(arena)), region_(std::move(region)) {}
  void* data() const override { return ptr_; }
  bool freed_on_release() const override { return false; }

 private:
  void* ptr_;
  std::shared_ptr<const void> arena_;
  std::shared_ptr<GraphRegion> region_;
};

}  // namespace

std::shared_ptr<Buffer> allocate_persistent(const std::shared_ptr<DeviceState>& st, const Tensor& t) {
  size_t bytes = t.nbytes();
  void* ptr = nullptr;
  if (bytes) {
    cudaError_t e = cudaMallocAsync(&ptr, bytes, st->stream);
    if (e != cudaSuccess) {
      size_t free = 0, total = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free, &total);
      fail_cuda(st.get(), "allocate", e,
                detail::concat(" (cannot allocate ", bytes, " bytes for a ", t.shape, ' ', dtype_name(t.dtype),
                               " tensor; ", free, " of ", total, " bytes free on device ", st->device, ")"));
    }
  }
  return std::make_shared<DeviceBuffer>(bytes, ptr, st);
}

void set_capturing(DeviceState& st, bool capturing) {
  std::lock_guard<std::mutex> lock(st.deferred_mutex);
  st.capturing = capturing;
  if (capturing) return;
  for (void* p : st.deferred_frees) cudaFreeAsync(p, st.stream);
  st.deferred_frees.clear();
}

void StepArena::begin_step() {
  if (!memory_) {
    void* base = nullptr;
    cudaError_t e = cudaMalloc(&base, bytes_);
    if (e != cudaSuccess)
      fail_cuda(st_.get(), "beginStep", e,
                detail::concat(" (cannot allocate the step arena of ", bytes_, " bytes, EngineOptions.arenaBytes)"));
    memory_ = std::make_shared<Memory>();
    memory_->base = base;
    memory_->size = bytes_;
    memory_->st = st_;
  }
  // Start above the memory of every live graph.
  size_t floor = 0;
  regions_.erase(std::remove_if(regions_.begin(), regions_.end(),
                                [](const std::weak_ptr<GraphRegion>& r) { return r.expired(); }),
                 regions_.end());
  for (auto& w : regions_)
    if (auto r = w.lock()) floor = std::max(floor, r->end);
  used_ = floor;
}

std::shared_ptr<Buffer> StepArena::allocate(const Tensor& t, uint64_t step, std::shared_ptr<GraphRegion> region) {
  size_t bytes = t.nbytes(), need = align_up(bytes);
  if (used_ + need > memory_->size)
    WEFT_FAIL("stepArena", "the step arena is exhausted: a ", t.shape, ' ', dtype_name(t.dtype), " tensor needs ",
              bytes, " bytes, ", used_, " of ", memory_->size, " bytes are in use (raise EngineOptions.arenaBytes, "
              "or make fewer tensors per step)");
  void* ptr = static_cast<char*>(memory_->base) + used_;
  used_ += need;
  return std::make_shared<ArenaBuffer>(bytes, step, ptr, memory_, std::move(region));
}

void StepArena::close_region(const std::shared_ptr<GraphRegion>& region) {
  region->end = used_;
  regions_.push_back(region);
}

size_t StepArena::footprint(size_t bytes) { return align_up(bytes); }

void StepArena::rewind(size_t offset) {
  if (offset > used_)
    WEFT_FAIL("stepArena", "cannot rewind to offset ", offset, " above the ", used_, " bytes in use");
  used_ = offset;
}

int64_t StepArena::offset_of(const Buffer& buffer) const {
  if (!memory_ || buffer.freed_on_release()) return -1;
  const char* p = static_cast<const char*>(buffer.data()), *base = static_cast<const char*>(memory_->base);
  return p >= base && p < base + memory_->size ? p - base : -1;
}

Staging::Staging(DeviceState& st) : st_(st) {
  const char* op = "createEngine";
  for (int i = 0; i < 2; ++i) {
    check_cuda(st_, cudaHostAlloc(&buf_[i], kBytes, cudaHostAllocDefault), op);
    check_cuda(st_, cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming), op);
  }
  check_cuda(st_, cudaHostAlloc(reinterpret_cast<void**>(&small_), kSmallSlots * kSmallBytes, cudaHostAllocDefault), op);
  for (cudaEvent_t& e : small_done_) check_cuda(st_, cudaEventCreateWithFlags(&e, cudaEventDisableTiming), op);
  check_cuda(st_, cudaHostAlloc(reinterpret_cast<void**>(&slots_), kSlots * kSlotBytes, cudaHostAllocDefault), op);
  for (cudaEvent_t& e : slot_done_) check_cuda(st_, cudaEventCreateWithFlags(&e, cudaEventDisableTiming), op);
}

Staging::~Staging() {
  cudaSetDevice(st_.device);
  for (int i = 0; i < 2; ++i) {
    if (buf_[i]) cudaFreeHost(buf_[i]);
    if (done_[i]) cudaEventDestroy(done_[i]);
  }
  if (small_) cudaFreeHost(small_);
  if (slots_) cudaFreeHost(slots_);
  for (cudaEvent_t e : small_done_)
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : slot_done_)
    if (e) cudaEventDestroy(e);
}

void Staging::upload(void* dst, const void* src, size_t n) {
  if (n <= kSmallBytes) {
    const int i = small_next_;
    small_next_ = (small_next_ + 1) % kSmallSlots;
    char* slot = small_ + static_cast<size_t>(i) * kSmallBytes;
    check_cuda(st_, cudaEventSynchronize(small_done_[i]), "upload");
    std::memcpy(slot, src, n);
    check_cuda(st_, cudaMemcpyAsync(dst, slot, n, cudaMemcpyHostToDevice, st_.stream), "upload");
    check_cuda(st_, cudaEventRecord(small_done_[i], st_.stream), "upload");
    return;
  }
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  for (size_t off = 0; off < n; off += kBytes) {
    size_t chunk = std::min(kBytes, n - off);
    int i = next_;
    next_ ^= 1;
    check_cuda(st_, cudaEventSynchronize(done_[i]), "upload");
    std::memcpy(buf_[i], from + off, chunk);
    check_cuda(st_, cudaMemcpyAsync(to + off, buf_[i], chunk, cudaMemcpyHostToDevice, st_.stream), "upload");
    check_cuda(st_, cudaEventRecord(done_[i], st_.stream), "upload");
  }
}

void Staging::download(const Tensor& t, void* dst) {
  size_t n = t.nbytes(), es = dtype_size(t.dtype);
  const char* from = static_cast<const char*>(t.buffer->data());
  if (n == 0) {
    synchronize(st_, "download");
    return;
  }
  size_t step_bytes = kBytes / 4 * 4;
  for (size_t off = 0; off < n; off += step_bytes) {
    size_t chunk = std::min(step_bytes, n - off);
    check_cuda(st_, cudaEventSynchronize(done_[0]), "download");
    check_cuda(st_, cudaMemcpyAsync(buf_[0], from + off, chunk, cudaMemcpyDeviceToHost, st_.stream), "download");
    synchronize(st_, "download");
    if (t.dtype == DType::F32 || t.dtype == DType::I32)
      std::memcpy(static_cast<char*>(dst) + off, buf_[0], chunk);
    else
      cpu::to_f32(buf_[0], t.dtype, 0, static_cast<int64_t>(chunk / es), static_cast<float*>(dst) + off / es);
  }
}

// A download into a held slot: waited for on any thread, finished (status checked, copied, converted) on the
// engine's thread, and the slot given back when it goes.
class SlotDownload final : public PendingDownload {
 public:
  SlotDownload(Staging& staging, int slot, DType dtype, int64_t numel)
      : staging_(staging), slot_(slot), dtype_(dtype), numel_(numel) {}
  ~SlotDownload() override { staging_.slot_held_[slot_] = false; }
  void wait() override {
    cudaSetDevice(staging_.st_.device);  // a thread of the JS thread pool
    waited_ = cudaEventSynchronize(staging_.slot_done_[slot_]);
  }
  void finish(void* dst) override {
    if (waited_ != cudaSuccess) fail_cuda(&staging_.st_, "downloadAsync", waited_, "");
    check_status(staging_.st_);
    const char* from = staging_.slots_ + static_cast<size_t>(slot_) * Staging::kSlotBytes;
    if (dtype_ == DType::F32 || dtype_ == DType::I32)
      std::memcpy(dst, from, static_cast<size_t>(numel_) * 4);
    else
      cpu::to_f32(from, dtype_, 0, numel_, static_cast<float*>(dst));
  }

 private:
  Staging& staging_;
  int slot_;
  DType dtype_;
  int64_t numel_;
  cudaError_t waited_ = cudaErrorNotReady;
};

std::unique_ptr<PendingDownload> Staging::download_async(const Tensor& t) {
  const size_t n = t.nbytes();
  if (n == 0 || n > kSlotBytes) return nullptr;
  for (int i = 0; i < kSlots; ++i) {
    if (slot_held_[i]) continue;
    char* slot = slots_ + static_cast<size_t>(i) * kSlotBytes;
    check_cuda(st_, cudaMemcpyAsync(slot, t.buffer->data(), n, cudaMemcpyDeviceToHost, st_.stream), "downloadAsync");
    check_cuda(st_, cudaEventRecord(slot_done_[i], st_.stream), "downloadAsync");
    slot_held_[i] = true;
    return std::make_unique<SlotDownload>(*this, i, t.dtype, t.numel());
  }
  return nullptr;
}

}  // namespace weft::cuda
