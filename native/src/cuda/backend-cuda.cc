// CudaBackend: the op table (each run_* calls one launcher of an op file) over the engine's device
// (device.h: stream, status word, the CUDA error path), memory (memory.h: persistent tensors, the step arena,
// pinned staging) and graphs (graphs.h: capture and replay).
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "backend.h"
#include "cuda/attention-bifurcated.cuh"
#include "cuda/attention.cuh"
#include "cuda/attention-sparq.cuh"
#include "cuda/attention-sage.cuh"
#include "cuda/bandwidth.cuh"
#include "cuda/common.cuh"
#include "cuda/device.h"
#include "cuda/elementwise.cuh"
#include "cuda/fused-layer.cuh"
#include "cuda/gemv-one-token-mma.cuh"  // quant_tiles_pay
#include "cuda/gemv-one-token.cuh"
#include "cuda/gemv-quant-mma.cuh"
#include "cuda/gemv-quant.cuh"
#include "cuda/gemv-rows-tma.cuh"
#include "cuda/graphs.h"
#include "cuda/matmul.cuh"
#include "cuda/memory.h"
#include "cuda/moe.cuh"
#include "cuda/quant-tiles.cuh"
#include "cuda/rope-write-kv.cuh"
#include "cuda/sample.cuh"
#include "cuda/softmax.cuh"
#include "cuda/logprobs.cuh"
#include "error.h"
#include "quant-tiles.h"  // kTileRows

namespace weft {
namespace {

using cuda::check_cuda;
using cuda::DeviceState;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaOptions& o)
      : st_(open(o)), arena_(st_, o.arena_bytes), staging_(*st_), graphs_(st_, arena_) {}

  ~CudaBackend() override {
    cudaSetDevice(st_->device);
    cudaStreamSynchronize(st_->stream);
  }

  const char* name() const override { return "cuda"; }

  // Before every call from JS: a dead engine (a sticky CUDA error, device.h) refuses it without touching the device.
  void check_alive(const char* op) const override {
    WEFT_CHECK(st_->dead.empty(), op, "engine is dead after ", st_->dead,
               " (a sticky CUDA error; the process must create a new engine, usually by restarting)");
    cudaSetDevice(st_->device);  // the JS thread pool may call from another thread than the last
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
  void profile_range(bool on) override {
    no_capture("profileRange", "it waits for the device");
    sync("profileRange");
    check_cuda(*st_, on ? cudaProfilerStart() : cudaProfilerStop(), "profileRange");
  }
  double measure_bandwidth(size_t bytes, int iterations) override {
    no_capture("measureBandwidth", "it allocates and waits");
    sync("measureBandwidth");
    return cuda::measure_read_bandwidth(ctx(), bytes, iterations);
  }

 protected:
  // ---- memory (memory.h)

  Tensor allocate(DType dtype, const Shape& shape) override {
    if (!in_step()) return empty_persistent(dtype, shape);
    Tensor t{dtype, shape, nullptr, nullptr};
    t.buffer = capturing() ? arena_.allocate(t, kGraphOwned, graphs_.region()) : arena_.allocate(t, step(), nullptr);
    poison(t);
    return t;
  }
  Tensor empty_persistent(DType dtype, const Shape& shape) override {
    no_capture("allocate", "persistent memory cannot be allocated while capturing");
    Tensor t{dtype, shape, nullptr, nullptr};
    t.buffer = cuda::allocate_persistent(st_, t);
    poison(t);
    return t;
  }
  // Debug (CudaOptions::poison): every new tensor starts as 0xff bytes, NaN in f32, so unwritten elements show.
  void poison(const Tensor& t) {
    if (st_->poison && !capturing() && t.nbytes())
      check_cuda(*st_, cudaMemsetAsync(t.buffer->data(), 0xff, t.nbytes(), st_->stream), "poison");
  }
  void copy_from_host(const Tensor& dst, const void* src) override {
    half_copies_.drop(dst);  // written in place: a 16-bit copy of its old values would be stale
    staging_.upload(dst.buffer->data(), src, dst.nbytes());
  }
  void fill_zero(const Tensor& t) override {
    if (t.nbytes()) check_cuda(*st_, cudaMemsetAsync(t.buffer->data(), 0, t.nbytes(), st_->stream), "zeros");
  }
  void to_host_converted(const Tensor& t, void* dst) override { staging_.download(t, dst); }
  std::unique_ptr<PendingDownload> start_download(const Tensor& t) override {
    std::unique_ptr<PendingDownload> queued = staging_.download_async(t);
    return queued ? std::move(queued) : Backend::start_download(t);  // too large, or every slot held: at once
  }
  // Waits for the stream, then reports a device-side index error if a kernel found one.
  void sync(const char* op) { cuda::synchronize(*st_, op); }

  // ---- steps and graphs (graphs.h)

  void on_begin_step() override {
    held_norm_.reset();  // an earlier step's (end_step launched it; this is only after an error between)
    half_copies_.clear();  // first: the copies hold their tensors' arena regions
    sage_scratch_ = Tensor{};  // likewise
    attention_scratch_ = Tensor{};
    layer_offsets_.clear();
    arena_.begin_step();
  }

  // ---- layers (Backend::release_layer): the arena goes back to the layer's mark, and what the layer keeps is
  // copied there. Where the copies would overwrite a source, the layer keeps its memory instead.
  void on_layer_mark(uint64_t mark) override { layer_offsets_.emplace_back(mark, arena_.used()); }
  bool on_release_layer(uint64_t mark, const std::vector<Tensor>& moved) override {
    int64_t rows = 0;
    for (const Tensor& t : moved) rows = std::max<int64_t>(rows, t.rank() ? t.dim(0) : 0);
    if (rows <= cuda::Matmul::kGemvMaxTokens) return false;  // a decode step's: small, and its norm is held
    auto at = std::find_if(layer_offsets_.begin(), layer_offsets_.end(), [&](const auto& m) { return m.first == mark; });
    if (at == layer_offsets_.end()) return false;
    const size_t offset = at->second;
    std::vector<Tensor> sources = moved;
    moved_halves_.clear();
    for (const Tensor& t : moved) {
      const Tensor* half = half_copies_.any(t);
      moved_halves_.push_back(half ? *half : Tensor{});
      if (half) sources.push_back(*half);
    }
    size_t end = offset;
    for (const Tensor& t : sources) end += cuda::StepArena::footprint(t.nbytes());
    for (const Tensor& t : sources)
      if (arena_.offset_of(*t.buffer) < static_cast<int64_t>(end)) return false;
    release_held_norm();
    half_copies_.clear();  // every other entry's tensor was made in the layer (or is an input it has read)
    for (Tensor* scratch : {&sage_scratch_, &attention_scratch_})
      if (scratch->buffer && scratch->buffer->serial() > mark) *scratch = Tensor{};
    layer_offsets_.erase(at + 1, layer_offsets_.end());
    arena_.rewind(offset);
    return true;
  }
  void on_layer_released(const std::vector<Tensor>& moved, const std::vector<Tensor>& copies) override {
    for (size_t j = 0; j < moved.size(); ++j) {
      const Tensor& half = moved_halves_[j];
      if (!half.buffer) continue;
      Tensor copy = empty(half.dtype, half.shape);
      check_cuda(*st_, cudaMemcpyAsync(copy.buffer->data(), half.buffer->data(), half.nbytes(),
                                       cudaMemcpyDeviceToDevice, st_->stream),
                 "releaseLayer");
      half_copies_.add(copies[j], copy);
    }
    moved_halves_.clear();
  }
  // A graph's attention partials are its own (in its arena region), made by its first layer
  void on_capture_begin() override {
    release_held_norm();  // outside the graph, where it was asked for
    attention_scratch_ = Tensor{};
    graphs_.begin();
  }
  std::shared_ptr<Graph> on_capture_end() override {
    release_held_norm();  // inside the graph, still capturing
    attention_scratch_ = Tensor{};
    return graphs_.end();
  }
  void on_end_step() override { release_held_norm(); }

  // ---- the held-back addRmsNorm. A one-token addRmsNorm in a step is not launched at once: the one-token GEMV
  // that reads its normed row next makes that row itself and writes sum and normed (gemv-rows-tma.cuh
  // AddRmsNormInput), which saves a kernel and its dependent launch on the decode step's critical path, twice a
  // layer. Any other use of its tensors launches it first, as do a replay and the end of a step or a capture: ops
  // see the same values either way.
  struct HeldNorm {
    Tensor x, y, weight, sum, normed;
    float eps;
    bool touches(const Tensor& t) const {
      for (const Tensor* held : {&x, &y, &weight, &sum, &normed})
        if (held->buffer == t.buffer) return true;
      return false;
    }
  };
  std::optional<HeldNorm> held_norm_;

  void release_held_norm() {
    if (!held_norm_) return;
    const HeldNorm n = std::move(*held_norm_);
    held_norm_.reset();
    cuda::launch_add_rms_norm(ctx(), n.x, n.y, n.weight, n.eps, n.sum, n.normed);
  }
  void before_use(const char* op, const char* name, const Tensor& t) override {
    if (!held_norm_ || !held_norm_->touches(t)) return;
    // releaseLayer reads no values: where it moves the layer's outputs, on_release_layer launches the norm first.
    // A decode step's layer ends with its next norm held and its outputs named to releaseLayer; launching the norm
    // here had cost every layer's wqkv its held norm (33 add_rms_norm kernels a step, ~2.4 us each on H200).
    if (std::strcmp(op, "releaseLayer") == 0) return;
    const bool gemv_input = (std::strcmp(op, "matmul") == 0 || std::strcmp(op, "matmulSiluMul") == 0) &&
                            std::strcmp(name, "x") == 0 && t.buffer == held_norm_->normed.buffer;
    if (!gemv_input) release_held_norm();  // the matmul decides (norm_into_gemv)
  }
  // The matmul of x = the held norm's normed row: true where the GEMV made it (and the norm is done), else the
  // norm is launched and the matmul goes on as usual.
  bool norm_into_gemv(const Tensor& x, const Tensor& w, const Tensor& out, bool pairs) {
    if (!held_norm_ || x.buffer != held_norm_->normed.buffer) return false;
    const HeldNorm& n = *held_norm_;
    const int64_t N = out.dim(1), K = x.dim(1);
    const cuda::AddRmsNormInput norm{n.y.data<float>(), n.weight.buffer->data(), n.weight.dtype == DType::BF16,
                                     n.eps, n.sum.data<float>(), n.normed.data<float>()};
    const cuda::QuantMatrix q = gemv_weights(w);
    if (x.dim(0) == 1 && N <= INT32_MAX / 2 && K <= INT32_MAX &&
        cuda::gemv_one_token_normed(ctx(), n.x.data<float>(), q.q, q.dtype, q.scales, q.group, out.data<float>(),
                                    static_cast<int>(N), static_cast<int>(K), pairs, st_->num_sms, norm, q.tiles)) {
      held_norm_.reset();
      cuda::check_launch(ctx(), pairs ? "matmulSiluMul" : "matmul", {{"x", x}, {"w", w}});
      return true;
    }
    release_held_norm();
    return false;
  }
  void on_replay(const Graph& graph) override {
    release_held_norm();  // a replay may rewrite its inputs (tensors the graph owns)
    graphs_.replay(graph);
  }

  // ---- ops

  cuda::Ctx ctx() const { return {st_.get(), st_->stream, st_->status_dev}; }

  void run_embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out) override {
    cuda::launch_embedding(ctx(), table, ids, vocab_start, out);
  }
  void run_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    cuda::launch_rms_norm(ctx(), x, weight, eps, out, half_copy_for(out, weight.dtype));
  }
  // Prefill steps (rows past the GEMV's): a norm's output also in its weight's dtype (f16/bf16, as the model's
  // matrices are stored), which the matmul that reads it takes instead of casting (HalfCopies, gemm.cuh). Step
  // memory only (the copies are dropped at the next step). Null otherwise.
  const Tensor* half_copy_for(const Tensor& out, DType dtype) {
    if (!in_step() || out.dim(0) <= cuda::Matmul::kGemvMaxTokens || dtype == DType::F32) return nullptr;
    return &half_copies_.add(out, empty(dtype, out.shape));
  }
  void run_matmul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    if (norm_into_gemv(x, w, out, false)) return;
    if (is_quantized(w.dtype)) return run_quant_matmul(x, w, out, false);
    if (x.dim(0) == 0 || w.dim(0) == 0) return;
    if (x.dim(1) == 0) {
      fill_zero(out);
      return;
    }
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(ctx());
    try {
      const Tensor* x_half = x.dim(0) > cuda::Matmul::kGemvMaxTokens ? half_copies_.find(x, w.dtype) : nullptr;
      matmul_->run(x.data<float>(), w.buffer->data(), w.dtype, out.data<float>(), x.dim(0), w.dim(0), x.dim(1), false,
                   x_half ? x_half->buffer->data() : nullptr);
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
                     bool decode_rows, const Tensor& out) override {
    int64_t floats = cuda::attention_scratch_floats(q, k_cache, kv_block_table, n_heads, st_->num_sms, decode_rows);
    // One scratch for a step's layers (the stream orders them), grown when a layer needs more: a 256-token decode
    // batch at a 32K context needs ~1.3 GB of partials, which every layer making its own would take 32 times
    // (outside a step, each call its own)
    Tensor scratch = in_step() ? attention_scratch_ : Tensor{};
    if (floats > 0 && (!scratch.buffer || scratch.numel() < floats)) scratch = empty(DType::F32, {floats});
    if (in_step()) attention_scratch_ = scratch;
    cuda::launch_attention(ctx(), q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, out,
                           floats ? scratch.data<float>() : nullptr, st_->num_sms, decode_rows);
  }
  void run_attention_bifurcated(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                                const Tensor& kv_block_table, const Tensor& positions, const Tensor& token_group,
                                const Tensor& group_shared, int64_t n_heads, float scale, const Tensor& out) override {
    Tensor scratch = empty(DType::F32, {cuda::attention_bifurcated_scratch_floats(q, k_cache, kv_block_table,
                                                                                  group_shared, n_heads, st_->num_sms)});
    cuda::launch_attention_bifurcated(ctx(), q, k_cache, v_cache, token_seq, kv_block_table, positions, token_group,
                                      group_shared, n_heads, scale, out, scratch.data<float>(), st_->num_sms);
  }
  // Quantized prefill attention: one scratch per step, made at its first layer and reused by the others (the
  // stream orders them), dropped at the next step. While capturing, or where the scratch would pass
  // kSageMaxScratchBytes (many long sequences in one step), the exact kernel runs instead.
  void run_sage_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                          const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale, DType pv,
                          const SageState* state, int64_t seqs, const Tensor& out) override {
    static_assert(Backend::kSageMinTokens == cuda::kDecodeMaxTokens + 1, "Sage takes the prefill kernel's steps");
    WEFT_CHECK(!(state && capturing()), "sageAttention", "a graph cannot keep the Sage state (its steps are decode steps)");
    const bool fp8 = pv == DType::FP8;
    const int64_t bytes = cuda::sage_scratch_bytes(q, k_cache, kv_block_table, fp8, seqs);
    if (capturing() || bytes > cuda::kSageMaxScratchBytes) {
      if (state) run_sage_state_reset(*state);
      return run_attention(q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, false, out);
    }
    if (!sage_scratch_.buffer || sage_scratch_.numel() < bytes) sage_scratch_ = empty(DType::I8, {bytes});
    cuda::launch_sage_attention(ctx(), q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, fp8,
                                out, sage_scratch_.buffer->data(), st_->num_sms, sage_state_args(state), seqs);
  }
  void run_sage_state_reset(const SageState& state) override {
    cuda::launch_sage_state_reset(ctx(), sage_state_args(&state), state.slots.dim(0));
  }
  static cuda::SageStateArgs sage_state_args(const SageState* state) {
    cuda::SageStateArgs a;
    if (!state) return a;
    a.header = state->header.data<int32_t>();
    a.means = state->means.data<float>();
    a.blocks = static_cast<unsigned char*>(state->blocks.buffer->data());
    a.slots = state->slots.data<int32_t>();
    a.n_slots = static_cast<int>(state->header.dim(0));
    a.nb_max = static_cast<int>(state->blocks.dim(1));
    a.block_bytes = state->blocks.dim(2) * 4;
    return a;
  }
  void run_add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps, const Tensor& sum,
                        const Tensor& normed) override {
    release_held_norm();  // one held at a time
    if (in_step() && x.dim(0) == 1 && (weight.dtype == DType::BF16 || weight.dtype == DType::F32)) {
      held_norm_ = HeldNorm{x, y, weight, sum, normed, eps};
      return;
    }
    cuda::launch_add_rms_norm(ctx(), x, y, weight, eps, sum, normed, half_copy_for(normed, weight.dtype));
  }
  void run_qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq, const Tensor& k_cache,
                    const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                    const Tensor& q) override {
    cuda::launch_qkv_rope(ctx(), qkv, positions, inv_freq, k_cache, v_cache, token_seq, kv_block_table, q);
  }
  void run_sparq_append(const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) override {
    cuda::launch_sparq_append(ctx(), k_t, v_sum, k_cache, v_cache, token_seq, kv_block_table, positions);
  }
  void run_sparq_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_t,
                           const Tensor& v_sum, const Tensor& token_seq, const Tensor& kv_block_table,
                           const Tensor& positions, const Tensor& sparq_r, const Tensor& sparq_k, int64_t n_heads,
                           float scale, const Tensor& out) override {
    Tensor scratch = empty(DType::F32, {cuda::sparq_scratch_floats(q, k_cache, kv_block_table, n_heads)});
    cuda::launch_sparq_attention(ctx(), q, k_cache, v_cache, k_t, v_sum, token_seq, kv_block_table, positions, sparq_r,
                                 sparq_k, n_heads, scale, out, scratch.data<float>());
  }
  void run_copy(const Tensor& dst, const Tensor& src) override {
    half_copies_.drop(dst);
    if (dst.nbytes())
      check_cuda(*st_, cudaMemcpyAsync(dst.buffer->data(), src.buffer->data(), dst.nbytes(), cudaMemcpyDeviceToDevice,
                                       st_->stream),
                 "copy");
  }
  void run_feed_tokens(const Tensor& ids, const Tensor& from, const Tensor& src) override {
    cuda::launch_feed_tokens(ctx(), ids, from, src);
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
  void run_route_top_k(const Tensor& logits, const Tensor* rows_in_use, const Routing& out) override {
    cuda::launch_route_top_k(ctx(), logits, rows_in_use ? rows_in_use->data<int32_t>() : nullptr, out.experts,
                             out.weights);
  }
  void run_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start, bool gated,
                         const Tensor& out) override {
    const char* op = gated ? "siluMulExpertMatmul" : "expertMatmul";
    const int64_t T = experts.dim(0), k = experts.dim(1), El = w.dim(0), N = w.dim(1), K = w.dim(2), P = T * k;
    if (P == 0 || N == 0) return;
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(ctx());
    if (is_quantized(w.dtype)) {
      try {
        run_quant_expert_matmul(x, w, experts, expert_start, gated, out);
      } catch (const Error& e) {
        throw Error(op, std::string(e.what()) + " (x " + to_string(x) + ", w " + to_string(w) + ", experts " + to_string(experts) + ")");
      }
      return cuda::check_launch(ctx(), op, {{"x", x}, {"w", w}, {"experts", experts}});
    }
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
    if (is_quantized(w.dtype)) return run_quant_matmul(gate_up, w, out, true);
    const int64_t T = gate_up.dim(0), N = w.dim(0), K = w.dim(1);
    if (T == 0 || N == 0) return;
    const bool fused = cuda::Matmul::fuses_silu_mul(T, K, w.dtype);
    Tensor hidden;  // unfused (prefill): the product first, in w's dtype where cuBLAS reads it (no cast pass)
    if (!fused) {
      hidden = empty(T > cuda::Matmul::kGemvMaxTokens ? w.dtype : DType::F32, {T, K});
      cuda::launch_silu_mul(ctx(), gate_up, hidden);
      if (hidden.dtype == DType::F32) return run_matmul(hidden, w, out);
    }
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(ctx());
    try {
      if (fused)
        matmul_->run(gate_up.data<float>(), w.buffer->data(), w.dtype, out.data<float>(), T, N, K, true);
      else
        matmul_->run(nullptr, w.buffer->data(), w.dtype, out.data<float>(), T, N, K, false, hidden.buffer->data());
    } catch (const Error& e) {
      throw Error("siluMulMatmul", std::string(e.what()) + " (gateUp " + to_string(gate_up) + ", w " + to_string(w) + ")");
    }
    cuda::check_launch(ctx(), "siluMulMatmul", {{"gateUp", gate_up}, {"w", w}});
  }
  // One token: gemv_one_token_silu_pairs (bf16, int8, int4). Otherwise the product [T, 2F], then silu(gate) * up;
  // a prefill step also writes the down projection's 16-bit input in the same pass (half_copy_for; a quantized
  // down projection's GEMM reads bf16).
  void run_matmul_silu_mul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    if (norm_into_gemv(x, w, out, true)) return;
    const int64_t T = x.dim(0), F = out.dim(1), K = x.dim(1);
    if (T == 0 || F == 0) return;
    const bool quant = is_quantized(w.dtype);
    if (T == 1 && F <= INT32_MAX / 2 && K <= INT32_MAX) {
      const cuda::QuantMatrix q = gemv_weights(w);
      if (cuda::gemv_one_token_silu_pairs(ctx(), x.data<float>(), q.q, q.dtype, q.scales, q.group, out.data<float>(),
                                          static_cast<int>(F), static_cast<int>(K), cuda::OneTokenTuning{}, q.tiles)) {
        cuda::check_launch(ctx(), "matmulSiluMul", {{"x", x}, {"w", w}});
        return;
      }
    }
    if (T > 1 && T <= cuda::Matmul::kGemvMaxTokens && quant && F <= INT32_MAX / 2 && K <= INT32_MAX) {
      // 2..8 tokens (gemv_tokens takes the formats it can): the pairs' SwiGLU in the GEMV, as for one (GEMV rows: no
      // prefill half copy is made for them)
      const cuda::QuantMatrix q = gemv_weights(w);
      if (cuda::gemv_tokens(ctx(), x.data<float>(), q.q, q.dtype, q.scales, q.group, out.data<float>(),
                            static_cast<int>(T), static_cast<int>(F), static_cast<int>(K), false, true, q.tiles)) {
        cuda::check_launch(ctx(), "matmulSiluMul", {{"x", x}, {"w", w}});
        return;
      }
    }
    Tensor gate_up = empty(DType::F32, {T, 2 * F});
    run_matmul(x, w, gate_up);
    if (const Tensor* half = half_copy_for(out, quant ? DType::BF16 : w.dtype))
      cuda::launch_silu_mul(ctx(), gate_up, out, *half);
    else
      cuda::launch_silu_mul(ctx(), gate_up, out);
  }
  // ---- quantized weights (gemv-quant.cuh): up to 16 tokens the GEMV dequantizes as it reads; longer steps
  // dequantize w into the bf16 scratch (sized at upload) and run the GEMM on it, a run of w's rows at a time where
  // w is larger than the scratch. Stacked experts are dequantized a whole expert at a time (grouped_expert_matmul);
  // a 2-D weight takes at most kDequantScratchMax of it: a quantized LM head (Llama-3-8B's 128256 x 4096) would
  // otherwise make the scratch 1.05 GB beside its 0.28 GB of int4 codes.
  static constexpr int64_t kDequantScratchMax = int64_t{128} << 20;  // elements: 256 MiB of bf16
  // Past 64 rows the passes lose to dequantize + GEMM: Llama-3-8B int4 at 128 rows 21.3 ms a step in two passes,
  // against ~19.6 estimated for the GEMM path (18.5 ms at 64 rows plus the bf16 GEMM's growth; H200, session 29).
  static constexpr int64_t kQuantMmaMaxBatch = 64;
  void on_quantized_weight(Tensor& w) override {
    // int4 and int8 per channel in tiles where the one-token kernel takes the shape: its warp loads become
    // contiguous (quant-tiles.h), and int8 then runs there with the held norm. H100, Llama-2-7B int4 g128 decode:
    // batch 1 422 -> 452 tok/s, batch 8 1996 -> 2311 (bench/RESULTS.md, session 36); H200, int8: batch 1 333.4 ->
    // 349.6, batch 8 1624.5 -> 1696.0 (session 45). Stacked experts [El, N, K] as El N rows where N is a multiple of
    // 16 (each expert's rows then start a tile: the expert GEMV, the scalar fallback and dequantization read them).
    const bool stacked = w.rank() == 3 && w.dim(1) % kTileRows == 0;
    const int64_t rows = w.rank() == 2 ? w.dim(0) : stacked ? w.dim(0) * w.dim(1) : 0;
    if (rows > 0 && cuda::quant_tiles_pay(w.dtype, rows, w.shape.back(), w.group())) {
      Tensor tiled = empty_persistent(w.dtype, w.shape);
      Tensor scales = empty_persistent(DType::BF16, w.scales->shape);
      cuda::repack_quant_tiles(ctx(), w.dtype == DType::I4, w.data<uint8_t>(), w.scales->data<uint16_t>(),
                               tiled.data<uint8_t>(), scales.data<uint16_t>(), rows, w.shape.back(),
                               static_cast<int>(w.group()));
      tiled.scales = std::make_shared<const Tensor>(scales);
      tiled.quant_tiles = true;
      w = tiled;  // the row-major buffers go once the repack has read them (stream-ordered frees)
    }
    const int64_t matrix = w.dim(w.rank() - 2) * w.shape.back();  // one expert's [N, K] for stacked experts
    const int64_t need = w.rank() > 2 ? matrix : std::min(matrix, std::max(kDequantScratchMax, w.shape.back()));
    if (!dequant_scratch_.buffer || dequant_scratch_.numel() < need) dequant_scratch_ = empty_persistent(DType::BF16, {need});
  }
  // Rows n0 .. of a quantized matrix [N, K] (or of stacked experts [El, N, K]).
  static cuda::QuantMatrix rows_from(const cuda::QuantMatrix& q, int64_t n0, int64_t K) {
    // Tiles (n0 a multiple of 16) hold rows n0 .. at the same offsets as row-major codes and scales.
    const int64_t row_bytes = q.dtype == DType::I4 ? K / 2 : K, scales_per_row = K / q.group;
    return {static_cast<const uint8_t*>(q.q) + n0 * row_bytes, q.scales + n0 * scales_per_row, q.dtype, q.group, q.tiles};
  }
  static cuda::QuantMatrix quant_matrix(const Tensor& w, int64_t expert = 0) {
    const int64_t N = w.dim(w.rank() - 2), K = w.shape.back();  // expert e's rows follow e N rows of the stack
    return rows_from({w.buffer->data(), w.scales->data<uint16_t>(), w.dtype, static_cast<int>(w.group()), w.quant_tiles},
                     expert * N, K);
  }
  // Any one-token GEMV's weights: quantized as above, bf16/f32 with no scales.
  static cuda::QuantMatrix gemv_weights(const Tensor& w) {
    return is_quantized(w.dtype) ? quant_matrix(w) : cuda::QuantMatrix{w.buffer->data(), nullptr, w.dtype, 0};
  }
  // Quantized experts: up to 64 tokens the expert GEMV on the device (capturable: decode graphs to 64 rows); longer
  // steps are grouped by expert on the host (grouped_expert_matmul), each expert dequantized into the scratch for the
  // GEMM.
  void run_quant_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start,
                               bool gated, const Tensor& out) {
    const int64_t T = experts.dim(0), k = experts.dim(1), El = w.dim(0), N = w.dim(1), K = w.dim(2), P = T * k;
    if (P == 0 || N == 0) return;
    const bool per_pair = x.dim(0) == P;
    WEFT_CHECK(N <= INT32_MAX && K <= INT32_MAX, gated ? "siluMulExpertMatmul" : "expertMatmul", "w ", to_string(w), " is out of range");
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(ctx());
    if (T <= cuda::kQuantExpertGemvMaxTokens) {
      const cuda::ExpertRows ex{experts.data<int32_t>(), static_cast<int>(P), static_cast<int>(k), per_pair ? 1 : 0,
                                static_cast<int>(std::min<int64_t>(expert_start, INT32_MAX)), static_cast<int>(El),
                                st_->status_dev};
      cuda::quant_expert_gemv(ctx(), matmul_->gemv(), x.data<float>(), quant_matrix(w), out.data<float>(), static_cast<int>(T),
                              static_cast<int>(N), static_cast<int>(K), ex, gated);
      return;
    }
    if (!gated) return grouped_expert_matmul(x, w, experts, expert_start, per_pair, out);
    Tensor hidden = empty(DType::F32, {x.dim(0), K});
    cuda::launch_silu_mul(ctx(), x, hidden);
    grouped_expert_matmul(hidden, w, experts, expert_start, per_pair, out);
  }
  void run_quant_matmul(const Tensor& x, const Tensor& w, const Tensor& out, bool gated) {
    const char* op = gated ? "siluMulMatmul" : "matmul";
    const int64_t T = x.dim(0), N = w.dim(0), K = w.dim(1);
    if (T == 0 || N == 0) return;
    WEFT_CHECK(w.rank() == 2 && N <= INT32_MAX && K <= INT32_MAX, op, "w ", to_string(w), " is out of range");
    const cuda::QuantMatrix q = quant_matrix(w);
    if (!matmul_) matmul_ = std::make_unique<cuda::Matmul>(ctx());
    try {
      // Up to 16 rows the GEMV dequantizes as it reads; decode batches up to kQuantMmaMaxBatch rows take the
      // tensor-core GEMV for 17..64 tokens (two passes of 32 where 64 tokens' x does not fit its shared memory).
      // Longer steps dequantize w into bf16 for the GEMM, as every step of 33..64 rows did before (Llama-3-8B int4
      // 18.5 -> 11.1 ms a step at 64 rows, 11.6 -> 6.6 at 32; H200, bench/RESULTS.md session 29).
      if (T <= cuda::kQuantGemvMaxTokens) {
        cuda::quant_gemv(ctx(), matmul_->gemv(), x.data<float>(), q, out.data<float>(), static_cast<int>(T),
                         static_cast<int>(N), static_cast<int>(K), gated);
      } else if (T <= kQuantMmaMaxBatch && cuda::quant_gemv_mma_passes(ctx(), x.data<float>(), q, out.data<float>(),
                                                                       static_cast<int>(T), static_cast<int>(N),
                                                                       static_cast<int>(K), gated)) {
      } else {
        void* dense = dequant_scratch_.buffer->data();
        Tensor hidden;  // gated: the product in bf16, where cuBLAS reads it
        if (gated) {
          hidden = empty(DType::BF16, {T, K});
          cuda::launch_silu_mul(ctx(), x, hidden);
        }
        const Tensor* x_half = gated ? &hidden : half_copies_.find(x, DType::BF16);
        int64_t rows_each = K == 0 ? N : std::min<int64_t>(N, dequant_scratch_.numel() / K);
        if (q.tiles && rows_each < N) rows_each = std::max<int64_t>(16, rows_each / 16 * 16);  // whole tiles
        for (int64_t n0 = 0; n0 < N; n0 += rows_each) {  // out's columns n0 .. from w's rows n0 ..
          const int64_t n = std::min(rows_each, N - n0);
          cuda::dequantize_bf16(ctx(), rows_from(q, n0, K), dense, n, K);
          matmul_->gemm().run(gated ? nullptr : x.data<float>(), x_half ? x_half->buffer->data() : nullptr, dense,
                              DType::BF16, out.data<float>() + n0, static_cast<int>(T), static_cast<int>(n),
                              static_cast<int>(K), static_cast<int>(N));
        }
      }
    } catch (const Error& e) {
      throw Error(op, std::string(e.what()) + " (x " + to_string(x) + ", w " + to_string(w) + ")");
    }
    cuda::check_launch(ctx(), op, {{"x", x}, {"w", w}});
  }
  void run_combine_experts(const Tensor& y, const Tensor& weights, const Tensor& out) override {
    cuda::launch_combine_experts(ctx(), y, weights, out);
  }
  void run_log_softmax(const Tensor& logits, const Tensor& out) override {
    cuda::launch_log_softmax(ctx(), logits, out);
  }
  void run_top_logprobs(const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k,
                        const Tensor& out) override {
    cuda::launch_top_logprobs(ctx(), logits, rows, ids, k, out);
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
      if (is_quantized(w.dtype)) {  // this expert dequantized into the scratch, then the same product
        cuda::dequantize_bf16(ctx(), quant_matrix(w, e), dequant_scratch_.buffer->data(), N, K);
        matmul_->run(xs.data<float>() + first * K, dequant_scratch_.buffer->data(), DType::BF16,
                     ys.data<float>() + first * N, rows, N, K);
      } else {
        matmul_->run(xs.data<float>() + first * K, static_cast<const uint8_t*>(w.buffer->data()) + e * expert_bytes,
                     w.dtype, ys.data<float>() + first * N, rows, N, K);
      }
      first += rows;
    }
    cuda::launch_scatter_rows(ctx(), ys.data<float>(), order_t.data<int32_t>(), R, N, out.data<float>());
  }

  static std::string to_string(const Tensor& t) {
    std::ostringstream s;
    s << t;
    return s.str();
  }

  static std::shared_ptr<DeviceState> open(const CudaOptions& o) {
    auto st = std::make_shared<DeviceState>();
    st->poison = o.poison;
    cuda::open_device(*st, o.device, "createEngine");
    return st;
  }

  std::shared_ptr<DeviceState> st_;  // first: destroyed last
  cuda::StepArena arena_;
  cuda::Staging staging_;
  cuda::GraphCapture graphs_;
  std::unique_ptr<cuda::Matmul> matmul_;
  Tensor sage_scratch_;  // run_sage_attention's bytes, step memory: dropped at each step's start
  Tensor attention_scratch_;  // run_attention's decode partials, step memory: dropped at each step's start and capture
  Tensor dequant_scratch_;  // bf16, persistent (run_quant_matmul, T > 16): on_quantized_weight sizes it
  cuda::HalfCopies half_copies_;
  std::vector<std::pair<uint64_t, size_t>> layer_offsets_;  // this step's open layer marks and their arena offsets
  std::vector<Tensor> moved_halves_;  // between on_release_layer and on_layer_released: the moved tensors' half copies
};

}  // namespace

bool have_cuda_backend() { return true; }

std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& options) {
  return std::make_shared<CudaBackend>(options);
}

}  // namespace weft
