// A shared-GPU group (../shared-gpu.h): the barrier, copy, reduce and gather kernels and the group that launches
// them on the caller's stream, over exchange regions from shared-gpu-memory.h.
#include <cuda/atomic>
#include <cuda_runtime.h>

#include <cstring>

#include "cuda/shared-gpu-memory.h"
#include "error.h"
#include "shared-gpu.h"

namespace weft {
namespace cuda {
namespace {

constexpr int kMaxRanks = 8;
// The region's header; the data area follows it. Only the owning rank writes its header.
struct alignas(128) RegionHeader {
  unsigned long long arrived;      // barriers this rank has reached (read by its peers)
  unsigned long long collectives;  // collectives this rank has begun (names a failure)
};
constexpr int64_t kHeaderBytes = 256;
static_assert(sizeof(RegionHeader) <= kHeaderBytes, "header too large");

// In mapped pinned host memory: the host reads it without a sync (the flag is written last).
struct GroupStatus {
  int failed;
  int peer;
  long long collective;
  int op;
};

struct Peers {
  const float* data[kMaxRanks];           // every rank's data area, this rank's own included
  const RegionHeader* header[kMaxRanks];  // every rank's header
};

using SystemAtomic = ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_system>;

__device__ inline unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One thread: count this barrier, publish the arrival (release: this rank's data area, written by the kernels
// before, is visible first), then wait until every peer has reached it (acquire), each at most timeout_ns. A
// peer that does not arrive fails the group; once it has failed no barrier waits.
__global__ void barrier_kernel(RegionHeader* self, Peers peers, int rank, int world, bool begins, int op,
                               unsigned long long timeout_ns, GroupStatus* status) {
  volatile GroupStatus* s = status;
  unsigned long long target = self->arrived + 1;
  if (begins) self->collectives += 1;
  SystemAtomic(self->arrived).store(target, ::cuda::std::memory_order_release);
  for (int r = 0; r < world; ++r) {
    if (r == rank) continue;
    SystemAtomic arrived(const_cast<RegionHeader*>(peers.header[r])->arrived);
    unsigned long long start = global_ns();
    while (arrived.load(::cuda::std::memory_order_acquire) < target) {
      if (s->failed) return;
      if (global_ns() - start > timeout_ns) {
        // the group's kernels run one after another on one stream: one writer, the fields before the flag
        if (!s->failed) {
          s->peer = r;
          s->collective = static_cast<long long>(self->collectives) - 1;
          s->op = op;
          __threadfence_system();
          s->failed = 1;
          __threadfence_system();
        }
        return;
      }
      __nanosleep(256);
    }
  }
}

__global__ void copy_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = src[i];
  __threadfence_system();  // the peers read these through another mapping: out of this thread before the barrier
}

// out[i] = data[0][i] + data[1][i] + ... in rank order: every rank adds the same values in the same order.
__global__ void reduce_kernel(float* out, Peers peers, int world, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    // __ldcv: fetched again, never from L1 (blind to the other processes' writes) nor a cached host-memory line
    float sum = __ldcv(peers.data[0] + i);
    for (int r = 1; r < world; ++r) sum += __ldcv(peers.data[r] + i);
    out[i] = sum;
  }
}

struct Columns {
  int64_t width[kMaxRanks];
  int64_t offset[kMaxRanks];  // first column of each rank in the output
};

// out [rows, total] (row stride total): rank r's data area holds its rows [rows, width[r]], row-major.
__global__ void gather_kernel(float* out, Peers peers, Columns cols, int world, int64_t rows, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * total; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t t = i / total, c = i % total;
    int r = 0;
    while (r + 1 < world && c >= cols.offset[r + 1]) ++r;
    int64_t local = c - cols.offset[r];
    out[i] = __ldcv(peers.data[r] + t * cols.width[r] + local);
  }
}

unsigned blocks_for(int64_t n) {
  int64_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

class Group final : public SharedGpuGroup {
 public:
  Group(int device, int rank, int world, int64_t data_bytes, double timeout_ms, ExchangeKind kind)
      : device_(device), rank_(rank), world_(world), data_floats_(data_bytes / 4),
        timeout_ns_(static_cast<unsigned long long>(timeout_ms * 1e6)) {
    const char* op = "sharedGpuGroup";
    WEFT_CHECK(world >= 1 && world <= kMaxRanks, op, "a shared-GPU group has 1 to ", kMaxRanks, " ranks, got ", world);
    WEFT_CHECK(rank >= 0 && rank < world, op, "rank ", rank, " is outside a group of ", world);
    WEFT_CHECK(data_floats_ >= 1, op, "the data area must hold at least one float, got ", data_bytes, " bytes");
    WEFT_CHECK(timeout_ms > 0, op, "the peer timeout must be > 0 ms, got ", timeout_ms);
    check(cudaSetDevice(device), op, "cudaSetDevice");
    check(cudaHostAlloc(reinterpret_cast<void**>(&status_host_), sizeof(GroupStatus), cudaHostAllocMapped), op,
          "cudaHostAlloc (group status)");
    std::memset(status_host_, 0, sizeof(GroupStatus));
    check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&status_dev_), status_host_, 0), op,
          "cudaHostGetDevicePointer (group status)");
    try {
      memory_ = make_exchange_memory(kind, kHeaderBytes + data_floats_ * 4, op);
    } catch (...) {
      cudaFreeHost(status_host_);
      throw;
    }
    set_peer(rank_, memory_->local());
    // load the kernels now: with lazy loading the first launch would load them, maybe inside a graph capture
    cudaFuncAttributes attributes;
    check(cudaFuncGetAttributes(&attributes, barrier_kernel), op, "cudaFuncGetAttributes");
    check(cudaFuncGetAttributes(&attributes, copy_kernel), op, "cudaFuncGetAttributes");
    check(cudaFuncGetAttributes(&attributes, reduce_kernel), op, "cudaFuncGetAttributes");
    check(cudaFuncGetAttributes(&attributes, gather_kernel), op, "cudaFuncGetAttributes");
  }
  ~Group() override {
    cudaSetDevice(device_);
    cudaDeviceSynchronize();  // no kernel of this group may still read the regions
    memory_.reset();
    if (status_host_) cudaFreeHost(status_host_);
  }

  std::vector<uint8_t> handle() const override { return memory_->handle(); }

  void connect(const std::vector<std::vector<uint8_t>>& handles) override {
    const char* op = "sharedGpuConnect";
    WEFT_CHECK(!connected_, op, "rank ", rank_, " is already connected");
    WEFT_CHECK(static_cast<int>(handles.size()) == world_, op, "got ", handles.size(), " handles for a group of ", world_);
    check(cudaSetDevice(device_), op, "cudaSetDevice");
    for (int r = 0; r < world_; ++r)
      if (r != rank_) set_peer(r, memory_->open_peer(handles[r], op));
    connected_ = true;
  }

  void peers_connected() override { memory_->unlink_name(); }

  void all_reduce(uint64_t x, int64_t count, uint64_t stream) override {
    const char* op = "sharedGpuAllReduce";
    cudaStream_t s = begin(op, stream);
    float* data = local_data();
    float* out = reinterpret_cast<float*>(x);
    for (int64_t start = 0; start < count; start += data_floats_) {
      int64_t n = count - start < data_floats_ ? count - start : data_floats_;
      copy_kernel<<<blocks_for(n), 256, 0, s>>>(data, out + start, n);
      barrier(s, start == 0, 1);
      reduce_kernel<<<blocks_for(n), 256, 0, s>>>(out + start, peers_, world_, n);
      barrier(s, false, 1);
    }
    launched(op);
  }

  void all_gather_cols(uint64_t x, uint64_t out, int64_t rows, const std::vector<int64_t>& widths,
                       uint64_t stream) override {
    const char* op = "sharedGpuAllGatherCols";
    WEFT_CHECK(static_cast<int>(widths.size()) == world_, op, "got ", widths.size(), " widths for a group of ", world_);
    Columns cols{};
    int64_t total = 0, widest = 1;
    for (int r = 0; r < world_; ++r) {
      WEFT_CHECK(widths[r] >= 0, op, "rank ", r, "'s width is negative (", widths[r], ")");
      cols.width[r] = widths[r];
      cols.offset[r] = total;
      total += widths[r];
      if (widths[r] > widest) widest = widths[r];
    }
    WEFT_CHECK(widest <= data_floats_, op, "a row of ", widest, " columns does not fit the exchange area of ",
               data_floats_, " floats");
    cudaStream_t s = begin(op, stream);
    const float* in = reinterpret_cast<const float*>(x);
    float* dst = reinterpret_cast<float*>(out);
    const int64_t chunk_rows = data_floats_ / widest;  // every rank derives the same chunks from the same widths
    for (int64_t row = 0; row < rows; row += chunk_rows) {
      int64_t n = rows - row < chunk_rows ? rows - row : chunk_rows;
      int64_t mine = n * widths[rank_];
      if (mine > 0) copy_kernel<<<blocks_for(mine), 256, 0, s>>>(local_data(), in + row * widths[rank_], mine);
      barrier(s, row == 0, 2);
      if (total > 0) gather_kernel<<<blocks_for(n * total), 256, 0, s>>>(dst + row * total, peers_, cols, world_, n, total);
      barrier(s, false, 2);
    }
    launched(op);
  }

  SharedGpuStatus status() const override {
    const volatile GroupStatus* s = status_host_;
    SharedGpuStatus out;
    out.failed = s->failed != 0;
    if (out.failed) {
      out.peer = s->peer;
      out.collective = s->collective;
      out.op = s->op;
    }
    return out;
  }

 private:
  [[noreturn]] static void fail(const char* op, const char* call, cudaError_t e) {
    cudaGetLastError();
    WEFT_FAIL(op, call, " failed: CUDA error ", cudaGetErrorString(e));
  }
  static void check(cudaError_t e, const char* op, const char* call) {
    if (e != cudaSuccess) fail(op, call, e);
  }
  void set_peer(int r, void* region) {
    peers_.header[r] = static_cast<const RegionHeader*>(region);
    peers_.data[r] = reinterpret_cast<const float*>(static_cast<const char*>(region) + kHeaderBytes);
  }
  float* local_data() const { return const_cast<float*>(peers_.data[rank_]); }
  cudaStream_t begin(const char* op, uint64_t stream) {
    WEFT_CHECK(connected_, op, "rank ", rank_, " is not connected to its peers yet");
    check(cudaSetDevice(device_), op, "cudaSetDevice");
    return reinterpret_cast<cudaStream_t>(stream);
  }
  // `which`: the op a failure names (1 all-reduce, 2 all-gather); `begins`: the first barrier of a collective.
  void barrier(cudaStream_t s, bool begins, int which) {
    if (world_ == 1) return;
    barrier_kernel<<<1, 1, 0, s>>>(const_cast<RegionHeader*>(peers_.header[rank_]), peers_, rank_, world_, begins,
                                   which, timeout_ns_, status_dev_);
  }
  void launched(const char* op) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) fail(op, "a kernel launch", e);
  }

  int device_, rank_, world_;
  int64_t data_floats_;
  unsigned long long timeout_ns_;
  GroupStatus* status_host_ = nullptr;
  GroupStatus* status_dev_ = nullptr;
  std::unique_ptr<ExchangeMemory> memory_;
  Peers peers_{};
  bool connected_ = false;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<SharedGpuGroup> make_shared_gpu_group(int device, int rank, int world, int64_t data_bytes,
                                                      double timeout_ms, ExchangeKind kind) {
  return std::make_unique<cuda::Group>(device, rank, world, data_bytes, timeout_ms, kind);
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace weft
