// CudaBackend: device, stream, memory (persistent stream-ordered allocations, the step arena, pinned
// staging), graphs, device-status checks, and the op table (each run_* calls one launcher of an op file).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "backend.h"
#include "cpu/convert.h"
#include "cuda/attention.cuh"
#include "cuda/common.cuh"
#include "cuda/device.h"
#include "cuda/elementwise.cuh"
#include "cuda/fused-layer.cuh"
#include "cuda/matmul.cuh"
#include "cuda/moe.cuh"
#include "cuda/norm-rope.cuh"
#include "cuda/sample.cuh"
#include "cuda/softmax.cuh"
#include "error.h"

namespace weft {
namespace {

using cuda::DeviceState;

constexpr size_t kAlign = 256;
constexpr size_t kStagingBytes = size_t{16} << 20;  // each of the two pinned upload buffers; also the download chunk

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Throws "<op>: CUDA error <text><detail>"; sticky errors mark the engine dead.
void check_cuda(DeviceState& st, cudaError_t e, const char* op, const std::string& detail = "") {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so that it is not reported again by the next launch
  std::string msg = std::string("CUDA error ") + cudaGetErrorString(e) + detail;
  if (cuda::is_sticky(e) && st.dead.empty()) st.dead = std::string(op) + ": " + msg;
  throw Error(op, msg);
}

// A persistent allocation (cudaMallocAsync on the engine stream; freed stream-ordered, or after the capture
// if its last handle goes while one is open).
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

// The step arena's device memory; kept alive by every tensor in it.
struct ArenaMemory {
  void* base = nullptr;
  size_t size = 0;
  std::shared_ptr<DeviceState> st;
  ~ArenaMemory() {
    if (!base) return;
    cudaSetDevice(st->device);
    cudaStreamSynchronize(st->stream);
    cudaFree(base);
  }
};

// Arena bytes [.., end) that a captured graph writes: reserved while the graph or any of its tensors lives.
struct GraphRegion {
  size_t end = ~size_t{0};
};

class ArenaBuffer final : public Buffer {
 public:
  ArenaBuffer(size_t bytes, uint64_t step, void* ptr, std::shared_ptr<ArenaMemory> arena,
              std::shared_ptr<GraphRegion> region)
      : Buffer(bytes, step), ptr_(ptr), arena_(std::move(arena)), region_(std::move(region)) {}
  void* data() const override { return ptr_; }

 private:
  void* ptr_;
  std::shared_ptr<ArenaMemory> arena_;
  std::shared_ptr<GraphRegion> region_;
};

class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, std::shared_ptr<DeviceState> st, std::shared_ptr<GraphRegion> region)
      : exec_(exec), st_(std::move(st)), region_(std::move(region)) {}
  ~CudaGraph() override {
    cudaSetDevice(st_->device);
    cudaGraphExecDestroy(exec_);
  }
  cudaGraphExec_t exec() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
  std::shared_ptr<DeviceState> st_;
  std::shared_ptr<GraphRegion> region_;
};

// Pinned host staging: two upload buffers used in turn (an event says when a buffer's last copy ran).
struct Staging {
  void* buf[2] = {nullptr, nullptr};
  cudaEvent_t done[2] = {nullptr, nullptr};
  int next = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaOptions& o) : st_(std::make_shared<DeviceState>()), arena_bytes_(o.arena_bytes) {
    const char* op = "createEngine";
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    WEFT_CHECK(e == cudaSuccess && count > 0, op, "no CUDA device found (",
               e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), "); use backend: 'cpu'");
    WEFT_CHECK(o.device >= 0 && o.device < count, op, "options.device = ", o.device, " but this host has ", count,
               " CUDA device(s)");
    st_->device = o.device;
    st_->poison = o.poison;
    check_cuda(*st_, cudaSetDevice(o.device), op);
    check_cuda(*st_, cudaStreamCreateWithFlags(&st_->stream, cudaStreamNonBlocking), op);
    check_cuda(*st_, cudaDeviceGetAttribute(&st_->num_sms, cudaDevAttrMultiProcessorCount, o.device), op);
    check_cuda(*st_, cudaHostAlloc(reinterpret_cast<void**>(&st_->status_host), sizeof(cuda::DeviceStatus),
                                   cudaHostAllocMapped), op);
    std::memset(st_->status_host, 0, sizeof(cuda::DeviceStatus));
    check_cuda(*st_, cudaHostGetDevicePointer(reinterpret_cast<void**>(&st_->status_dev), st_->status_host, 0), op);
    // Keep freed pool memory for reuse instead of returning it to the driver at every sync.
    cudaMemPool_t pool;
    check_cuda(*st_, cudaDeviceGetDefaultMemPool(&pool, o.device), op);
    uint64_t keep = ~uint64_t{0};
    check_cuda(*st_, cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), op);
    for (int i = 0; i < 2; ++i) {
      check_cuda(*st_, cudaHostAlloc(&staging_.buf[i], kStagingBytes, cudaHostAllocDefault), op);
      check_cuda(*st_, cudaEventCreateWithFlags(&staging_.done[i], cudaEventDisableTiming), op);
    }
  }

  ~CudaBackend() override {
    cudaSetDevice(st_->device);
    cudaStreamSynchronize(st_->stream);
    matmul_.reset();
    for (int i = 0; i < 2; ++i) {
      if (staging_.buf[i]) cudaFreeHost(staging_.buf[i]);
      if (staging_.done[i]) cudaEventDestroy(staging_.done[i]);
    }
  }

  const char* name() const override { return "cuda"; }

  void check_alive(const char* op) const override {
    cudaSetDevice(st_->device);  // the JS thread pool may call from another thread than the last
    WEFT_CHECK(st_->dead.empty(), op, "engine is dead after ", st_->dead,
               " (a sticky CUDA error; the process must create a new engine, usually by restarting)");
  }

  // ---- device facts and plumbing

  uint64_t device_pointer(const Tensor& t) override { return reinterpret_cast<uint64_t>(t.buffer->data()); }
  uint64_t stream_handle() override { return reinterpret_cast<uint64_t>(st_->stream); }
  void synchronize() override {
    no_capture("synchronize", "it waits for the device");
    sync("synchronize");
  }
  MemoryInfo memory_info() override {
    size_t free = 0, total = 0;
    check_cuda(*st_, cudaMemGetInfo(&free, &total), "memoryInfo");
    return {static_cast<double>(free), static_cast<double>(total)};
  }
  double measure_bandwidth(size_t bytes, int iterations) override {
    no_capture("measureBandwidth", "it allocates and waits");
    sync("measureBandwidth");
    return cuda::measure_read_bandwidth(bytes, iterations, st_->stream);
  }

 protected:
  // ---- memory

  Tensor empty(DType dtype, const Shape& shape) override {
    if (!in_step()) return empty_persistent(dtype, shape);
    Tensor t{dtype, shape, nullptr};
    size_t bytes = t.nbytes(), need = align_up(bytes);
    if (used_ + need > arena_->size)
      WEFT_FAIL("stepArena", "the step arena is exhausted: a ", shape, ' ', dtype_name(dtype), " tensor needs ", bytes,
                " bytes, ", used_, " of ", arena_->size, " bytes are in use (raise EngineOptions.arenaBytes, "
                "or make fewer tensors per step)");
    void* ptr = static_cast<char*>(arena_->base) + used_;
    used_ += need;
    if (capturing())
      t.buffer = std::make_shared<ArenaBuffer>(bytes, kGraphOwned, ptr, arena_, capture_region_);
    else
      t.buffer = std::make_shared<ArenaBuffer>(bytes, step(), ptr, arena_, nullptr);
    poison(t);
    return t;
  }

  Tensor empty_persistent(DType dtype, const Shape& shape) override {
    no_capture("allocate", "persistent memory cannot be allocated while capturing");
    Tensor t{dtype, shape, nullptr};
    size_t bytes = t.nbytes();
    void* ptr = nullptr;
    if (bytes) {
      cudaError_t e = cudaMallocAsync(&ptr, bytes, st_->stream);
      if (e != cudaSuccess) {
        size_t free = 0, total = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free, &total);
        WEFT_FAIL("allocate", "cannot allocate ", bytes, " bytes for a ", shape, ' ', dtype_name(dtype), " tensor: ",
                  cudaGetErrorString(e), " (", free, " of ", total, " bytes free on device ", st_->device, ")");
      }
    }
    t.buffer = std::make_shared<DeviceBuffer>(bytes, ptr, st_);
    poison(t);
    return t;
  }

  void poison(const Tensor& t) {
    if (st_->poison && !capturing() && t.nbytes())
      check_cuda(*st_, cudaMemsetAsync(t.buffer->data(), 0xff, t.nbytes(), st_->stream), "poison");
  }

  // Host -> device through the two pinned buffers in turn; returns once the bytes are staged.
  void copy_from_host(const Tensor& dst, const void* src) override {
    size_t n = dst.nbytes();
    const char* from = static_cast<const char*>(src);
    char* to = static_cast<char*>(dst.buffer->data());
    for (size_t off = 0; off < n; off += kStagingBytes) {
      size_t chunk = std::min(kStagingBytes, n - off);
      int i = staging_.next;
      staging_.next ^= 1;
      check_cuda(*st_, cudaEventSynchronize(staging_.done[i]), "upload");
      std::memcpy(staging_.buf[i], from + off, chunk);
      check_cuda(*st_, cudaMemcpyAsync(to + off, staging_.buf[i], chunk, cudaMemcpyHostToDevice, st_->stream),
                 "upload");
      check_cuda(*st_, cudaEventRecord(staging_.done[i], st_->stream), "upload");
    }
  }

  void fill_zero(const Tensor& t) override {
    if (t.nbytes()) check_cuda(*st_, cudaMemsetAsync(t.buffer->data(), 0, t.nbytes(), st_->stream), "zeros");
  }

  // Device -> pinned (chunk by chunk, waiting for each) -> dst, converting f16/bf16 on the host.
  void to_host_converted(const Tensor& t, void* dst) override {
    size_t n = t.nbytes(), es = dtype_size(t.dtype);
    const char* from = static_cast<const char*>(t.buffer->data());
    if (n == 0) {
      sync("download");
      return;
    }
    size_t step_bytes = kStagingBytes / 4 * 4;
    for (size_t off = 0; off < n; off += step_bytes) {
      size_t chunk = std::min(step_bytes, n - off);
      check_cuda(*st_, cudaEventSynchronize(staging_.done[0]), "download");
      check_cuda(*st_, cudaMemcpyAsync(staging_.buf[0], from + off, chunk, cudaMemcpyDeviceToHost, st_->stream),
                 "download");
      sync("download");
      if (t.dtype == DType::F32 || t.dtype == DType::I32)
        std::memcpy(static_cast<char*>(dst) + off, staging_.buf[0], chunk);
      else
        cpu::to_f32(staging_.buf[0], t.dtype, 0, static_cast<int64_t>(chunk / es),
                    static_cast<float*>(dst) + off / es);
    }
  }

  // Waits for the stream, then reports a device-side index error if a kernel found one.
  void sync(const char* op) {
    check_cuda(*st_, cudaStreamSynchronize(st_->stream), op);
    cuda::DeviceStatus& s = *st_->status_host;
    if (!s.flag) return;
    cuda::DeviceStatus f = s;
    s.flag = 0;
    const char* tail = " (found on the device; reported at the next synchronising call, and that op's output is "
                       "unspecified)";
    switch (static_cast<cuda::StatusOp>(f.op)) {
      case cuda::StatusOp::WriteKvSeq:
        WEFT_FAIL("writeKv", "tokenSeq[", f.index, "] = ", f.value, " is out of range (need 0 <= sequence < ", f.limit,
                  ")", tail);
      case cuda::StatusOp::WriteKvPosition:
        WEFT_FAIL("writeKv", "positions[", f.index, "] = ", f.value, " is out of range (need 0 <= position < ", f.limit,
                  ")", tail);
      case cuda::StatusOp::WriteKvBlock:
        WEFT_FAIL("writeKv", "the KV block of token ", f.index, " (kvBlockTable[tokenSeq[", f.index, "]][positions[",
                  f.index, "] / B]) = ", f.value, " is out of range (need 0 <= block < ", f.limit, ")", tail);
      case cuda::StatusOp::AttentionSeq:
        WEFT_FAIL("attention", "tokenSeq[", f.index, "] = ", f.value, " is out of range (need 0 <= sequence < ",
                  f.limit, ")", tail);
      case cuda::StatusOp::AttentionPosition:
        WEFT_FAIL("attention", "positions[", f.index, "] = ", f.value, " is out of range (need 0 <= position < ",
                  f.limit, ")", tail);
      case cuda::StatusOp::AttentionBlock:
        WEFT_FAIL("attention", "a KV block read by token ", f.index, " (kvBlockTable[tokenSeq[", f.index,
                  "]][...]) = ", f.value, " is out of range (need 0 <= block < ", f.limit, ")", tail);
      case cuda::StatusOp::RopePosition:
        WEFT_FAIL("rope", "positions[", f.index, "] = ", f.value, " is negative", tail);
      case cuda::StatusOp::GatherRow:
        WEFT_FAIL("gatherRows", "rows[", f.index, "] = ", f.value, " is out of range (need 0 <= row < ", f.limit, ")",
                  tail);
      case cuda::StatusOp::ExpertRepeat:
        WEFT_FAIL("expertMatmul", "experts[", f.index, "] chooses expert ", f.value,
                  " more than once (a token's experts must be distinct)", tail);
      case cuda::StatusOp::SampleArgs:
        WEFT_FAIL("sampleTensor", "row ", f.index, " has a NaN temperature, topK < 0, or topP / uniform outside [0, 1]",
                  tail);
      case cuda::StatusOp::SampleNan:
        WEFT_FAIL("sampleTensor", "logits row ", f.index, " holds NaN", tail);
      default:
        WEFT_FAIL("synchronize", "unknown device status ", f.op);
    }
  }

  // ---- steps and graphs

  void on_begin_step() override {
    if (!arena_) {
      void* base = nullptr;
      cudaError_t e = cudaMalloc(&base, arena_bytes_);
      if (e != cudaSuccess) {
        cudaGetLastError();
        WEFT_FAIL("beginStep", "cannot allocate the step arena of ", arena_bytes_, " bytes (EngineOptions.arenaBytes): ",
                  cudaGetErrorString(e));
      }
      arena_ = std::make_shared<ArenaMemory>();
      arena_->base = base;
      arena_->size = arena_bytes_;
      arena_->st = st_;
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

  void on_capture_begin() override {
    sync("captureBegin");
    capture_region_ = std::make_shared<GraphRegion>();
    check_cuda(*st_, cudaStreamBeginCapture(st_->stream, cudaStreamCaptureModeRelaxed), "captureBegin");
    std::lock_guard<std::mutex> lock(st_->deferred_mutex);
    st_->capturing = true;
  }

  std::shared_ptr<Graph> on_capture_end() override {
    {
      std::lock_guard<std::mutex> lock(st_->deferred_mutex);
      st_->capturing = false;
      for (void* p : st_->deferred_frees) cudaFreeAsync(p, st_->stream);
      st_->deferred_frees.clear();
    }
    std::shared_ptr<GraphRegion> region = std::move(capture_region_);
    region->end = used_;
    regions_.push_back(region);
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamEndCapture(st_->stream, &graph);
    if (e != cudaSuccess) {
      cudaGetLastError();
      WEFT_FAIL("captureEnd", "the capture failed: CUDA error ", cudaGetErrorString(e),
                " (an op in it synchronised, allocated or copied from the host, or an error happened inside it)");
    }
    cudaGraphExec_t exec = nullptr;
    e = cudaGraphInstantiateWithFlags(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check_cuda(*st_, e, "captureEnd", " (instantiating the graph)");
    return std::make_shared<CudaGraph>(exec, st_, std::move(region));
  }

  void on_replay(const Graph& graph) override {
    check_cuda(*st_, cudaGraphLaunch(static_cast<const CudaGraph&>(graph).exec(), st_->stream), "replay");
  }

  // ---- ops

  cuda::Ctx ctx() const { return {st_.get(), st_->stream, st_->status_dev}; }

  void run_embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out) override {
    cuda::launch_embedding(ctx(), table, ids, vocab_start, out);
  }
  void run_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    cuda::launch_rms_norm(ctx(), x, weight, eps, out);
  }
  void run_matmul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    if (x.dim(0) == 0 || w.dim(0) == 0) return;
    if (x.dim(1) == 0) {
      fill_zero(out);
      return;
    }
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(st_->stream);
    try {
      matmul_->run(x.data<float>(), w.buffer->data(), w.dtype, out.data<float>(), x.dim(0), w.dim(0), x.dim(1));
    } catch (const Error& e) {
      throw Error("matmul", std::string(e.what()) + " (x " + to_string(x) + ", w " + to_string(w) + ")");
    }
    cuda::check_launch(ctx(), "matmul", {{"x", x}, {"w", w}});
  }
  void run_add(const Tensor& a, const Tensor& b, const Tensor& out) override { cuda::launch_add(ctx(), a, b, out); }
  void run_rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                const Tensor& out) override {
    cuda::launch_rope(ctx(), x, positions, inv_freq, head_dim, out);
  }
  void run_write_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                    const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) override {
    cuda::launch_write_kv(ctx(), k_cache, v_cache, k, v, token_seq, kv_block_table, positions);
  }
  void run_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                     const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                     const Tensor& out) override {
    int64_t floats = cuda::attention_scratch_floats(q, k_cache, kv_block_table, n_heads, st_->num_sms);
    Tensor scratch = floats ? empty(DType::F32, {floats}) : Tensor{};
    cuda::launch_attention(ctx(), q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, out,
                           floats ? scratch.data<float>() : nullptr, st_->num_sms);
  }
  void run_add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps, const Tensor& sum,
                        const Tensor& normed) override {
    cuda::launch_add_rms_norm(ctx(), x, y, weight, eps, sum, normed);
  }
  void run_qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq, const Tensor& k_cache,
                    const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                    const Tensor& q) override {
    cuda::launch_qkv_rope(ctx(), qkv, positions, inv_freq, k_cache, v_cache, token_seq, kv_block_table, q);
  }
  void run_copy(const Tensor& dst, const Tensor& src) override {
    if (dst.nbytes())
      check_cuda(*st_, cudaMemcpyAsync(dst.buffer->data(), src.buffer->data(), dst.nbytes(), cudaMemcpyDeviceToDevice,
                                       st_->stream),
                 "copy");
  }
  void run_silu_mul(const Tensor& gate_up, const Tensor& out) override { cuda::launch_silu_mul(ctx(), gate_up, out); }
  void run_slice_cols(const Tensor& x, int64_t start, const Tensor& out) override {
    cuda::launch_copy_cols(ctx(), "sliceCols", x, start, out, 0, out.dim(1));
  }
  void run_concat_cols(const std::vector<Tensor>& xs, const Tensor& out) override {
    int64_t offset = 0;
    for (const Tensor& x : xs) {
      cuda::launch_copy_cols(ctx(), "concatCols", x, 0, out, offset, x.dim(1));
      offset += x.dim(1);
    }
  }
  void run_gather_rows(const Tensor& x, const Tensor& rows, const Tensor& out) override {
    cuda::launch_gather_rows(ctx(), x, rows, out);
  }
  void run_route_top_k(const Tensor& logits, const Routing& out) override {
    cuda::launch_route_top_k(ctx(), logits, out.experts, out.weights);
  }
  void run_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start, bool gated,
                         const Tensor& out) override {
    const char* op = gated ? "siluMulExpertMatmul" : "expertMatmul";
    const int64_t T = experts.dim(0), k = experts.dim(1), El = w.dim(0), N = w.dim(1), K = w.dim(2), P = T * k;
    if (P == 0 || N == 0) return;
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(st_->stream);
    const bool per_pair = x.dim(0) == P;
    if (gated && !cuda::Matmul::fuses_silu_mul(T, K, w.dtype)) {  // the product first, then the plain op
      Tensor hidden = empty(DType::F32, {x.dim(0), K});
      cuda::launch_silu_mul(ctx(), x, hidden);
      run_expert_matmul(hidden, w, experts, expert_start, false, out);
      return;
    }
    try {
      if (T <= cuda::Matmul::kGemvMaxTokens) {  // decode: routing stays on the device (capturable)
        const cuda::ExpertRows ex{experts.data<int32_t>(), static_cast<int>(P), static_cast<int>(k), per_pair ? 1 : 0,
                                  static_cast<int>(std::min<int64_t>(expert_start, INT32_MAX)), static_cast<int>(El),
                                  st_->status_dev};
        matmul_->run_experts(x.data<float>(), w.buffer->data(), w.dtype, out.data<float>(), T, N, K, ex, gated);
      } else {
        grouped_expert_matmul(x, w, experts, expert_start, per_pair, out);
      }
    } catch (const Error& e) {
      std::string m = e.what();
      for (const char* prefix : {"expertMatmul: ", "matmul: "})
        if (m.rfind(prefix, 0) == 0) m = m.substr(std::strlen(prefix));
      throw Error(op, m + " (x " + to_string(x) + ", w " + to_string(w) + ", experts " + to_string(experts) + ")");
    }
    cuda::check_launch(ctx(), op, {{"x", x}, {"w", w}, {"experts", experts}});
  }
  void run_silu_mul_matmul(const Tensor& gate_up, const Tensor& w, const Tensor& out) override {
    const int64_t T = gate_up.dim(0), N = w.dim(0), K = w.dim(1);
    if (T == 0 || N == 0) return;
    if (!cuda::Matmul::fuses_silu_mul(T, K, w.dtype)) {  // prefill: the product, then cuBLAS
      Tensor hidden = empty(DType::F32, {T, K});
      cuda::launch_silu_mul(ctx(), gate_up, hidden);
      run_matmul(hidden, w, out);
      return;
    }
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(st_->stream);
    try {
      matmul_->run(gate_up.data<float>(), w.buffer->data(), w.dtype, out.data<float>(), T, N, K, true);
    } catch (const Error& e) {
      throw Error("siluMulMatmul", std::string(e.what()) + " (gateUp " + to_string(gate_up) + ", w " + to_string(w) + ")");
    }
    cuda::check_launch(ctx(), "siluMulMatmul", {{"gateUp", gate_up}, {"w", w}});
  }
  void run_combine_experts(const Tensor& y, const Tensor& weights, const Tensor& out) override {
    cuda::launch_combine_experts(ctx(), y, weights, out);
  }
  void run_log_softmax(const Tensor& logits, const Tensor& out) override {
    cuda::launch_log_softmax(ctx(), logits, out);
  }
  void run_logprobs(const Tensor& logits, const int32_t* ids, float* out) override {
    int64_t R = logits.dim(0);
    Tensor ids_t = empty(DType::I32, {R}), out_t = empty(DType::F32, {R});
    copy_from_host(ids_t, ids);
    cuda::launch_logprobs(ctx(), logits, ids_t, out_t);
    to_host_converted(out_t, out);
  }
  void run_sample(const Tensor& logits, const SampleArgs& a, int32_t* out) override {
    int64_t R = logits.dim(0);
    Tensor temperature = empty(DType::F32, {R}), top_k = empty(DType::I32, {R}), top_p = empty(DType::F32, {R}),
           uniform = empty(DType::F32, {R}), out_t = empty(DType::I32, {R});
    copy_from_host(temperature, a.temperature);
    copy_from_host(top_k, a.top_k);
    copy_from_host(top_p, a.top_p);
    copy_from_host(uniform, a.uniform);
    cuda::launch_sample(ctx(), "sample", logits, temperature, top_k, top_p, uniform, out_t);
    try {
      to_host_converted(out_t, out);
    } catch (const Error& e) {  // a NaN in the logits is reported as sampleTensor's; say sample
      std::string m = e.what();
      if (m.rfind("sampleTensor: ", 0) == 0) throw Error("sample", m.substr(14));
      throw;
    }
  }
  void run_sample_tensor(const Tensor& logits, const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
                         const Tensor& uniform, const Tensor& out) override {
    cuda::launch_sample(ctx(), "sampleTensor", logits, temperature, top_k, top_p, uniform, out);
  }
  void run_random_uniform(const Tensor& out, uint64_t seed, float scale) override {
    cuda::launch_random_uniform(ctx(), out, seed, scale);
  }

 private:
  // Prefill: the routing is read on the host, pairs are sorted by expert, and each expert multiplies its
  // rows in one matmul (cuBLAS above 8 rows) straight out of the stacked weights; rows go back in pair order.
  void grouped_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start,
                             bool per_pair, const Tensor& out) {
    const char* op = "expertMatmul";
    no_capture(op, "more than 8 tokens are grouped by expert on the host; capture decode steps only");
    const int64_t T = experts.dim(0), k = experts.dim(1), El = w.dim(0), N = w.dim(1), K = w.dim(2);
    std::vector<int32_t> ids(static_cast<size_t>(T * k));
    to_host_converted(experts, ids.data());
    const auto by_expert = pairs_by_expert(op, ids.data(), T, k, expert_start, El);
    std::vector<int32_t> order, x_rows;  // pairs sorted by held expert, and the x row each reads
    for (const std::vector<int32_t>& pairs : by_expert)
      for (int32_t p : pairs) {
        order.push_back(p);
        x_rows.push_back(static_cast<int32_t>(per_pair ? p : p / k));
      }
    fill_zero(out);  // pairs of experts this rank does not hold stay zero
    const int64_t R = static_cast<int64_t>(order.size());
    if (R == 0) return;
    Tensor order_t = empty(DType::I32, {R}), x_rows_t = empty(DType::I32, {R});
    copy_from_host(order_t, order.data());
    copy_from_host(x_rows_t, x_rows.data());
    Tensor xs = empty(DType::F32, {R, K}), ys = empty(DType::F32, {R, N});
    cuda::launch_gather_rows(ctx(), x, x_rows_t, xs);
    const size_t expert_bytes = static_cast<size_t>(N) * K * dtype_size(w.dtype);
    int64_t first = 0;
    for (int64_t e = 0; e < El; ++e) {
      const int64_t rows = static_cast<int64_t>(by_expert[e].size());
      if (rows == 0) continue;
      matmul_->run(xs.data<float>() + first * K, static_cast<const uint8_t*>(w.buffer->data()) + e * expert_bytes,
                   w.dtype, ys.data<float>() + first * N, rows, N, K);
      first += rows;
    }
    cuda::launch_scatter_rows(ctx(), ys.data<float>(), order_t.data<int32_t>(), R, N, out.data<float>());
  }

  static std::string to_string(const Tensor& t) {
    std::ostringstream s;
    s << t;
    return s.str();
  }

  std::shared_ptr<DeviceState> st_;
  size_t arena_bytes_;
  std::shared_ptr<ArenaMemory> arena_;
  size_t used_ = 0;
  std::vector<std::weak_ptr<GraphRegion>> regions_;
  std::shared_ptr<GraphRegion> capture_region_;
  Staging staging_;
  std::unique_ptr<cuda::Matmul> matmul_;
};

}  // namespace

bool have_cuda_backend() { return true; }

std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& options) {
  return std::make_shared<CudaBackend>(options);
}

}  // namespace weft
