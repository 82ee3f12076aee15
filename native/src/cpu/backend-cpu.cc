// CPU backend: host memory, index checks that read i32 tensors, dispatch to the kernels in ops.cc.
#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <unistd.h>

#include "backend.h"
#include "cpu/attention-bifurcated.h"
#include "cpu/convert.h"
#include "cpu/ops.h"
#include "cpu/thread-pool.h"
#include "error.h"
#include "kv-block-table.h"
#include "moe-route.h"

namespace weft {
namespace {

// 64-byte aligned host memory (a cache line; room for any SIMD width).
class HostBuffer final : public Buffer {
 public:
  HostBuffer(size_t bytes, uint64_t step) : Buffer(bytes, step) {
    size_t rounded = (bytes + 63) / 64 * 64;
    data_ = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (!data_) throw std::bad_alloc();
  }
  ~HostBuffer() override { std::free(data_); }
  void* data() const override { return data_; }
  // Step memory is freed by the step rule (CpuBackend::reclaim), as the CUDA arena is reused, not by its last
  // handle: reported to V8 as external memory, a decode step's few hundred KiB of intermediates set off a full
  // garbage collection every few dozen steps (measured on the hf-tiny model: 49 in 2000 steps, 1 without).
  bool freed_on_release() const override { return step() == kPersistent; }
  // Frees the memory now; the handles left point at nothing, which check_usable guarantees is never read.
  void reclaim() {
    std::free(data_);
    data_ = nullptr;
  }

 private:
  void* data_;
};

// "gatherRows: rows[2] = 9 is out of range for x [8, 16] f32 (need 0 <= row < 8)"
void check_indices(const char* op, const char* name, const char* what, const Tensor& idx, int64_t limit,
                   const char* against_name, const Tensor& against) {
  const int32_t* v = idx.data<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    WEFT_CHECK(v[i] >= 0 && v[i] < limit, op, name, "[", i, "] = ", v[i], " is out of range for ", against_name, " ",
               against, " (need 0 <= ", what, " < ", limit, ")");
}

// The KV ops' index checks: tokenSeq rows in the table, positions within maxBlocksPerSeq * B, and every table
// entry the op reaches (the block of each position written; with whole_prefix, every block up to it) a block
// of the cache. Entries no token reaches are not read, so they may hold anything (e.g. -1 for none).
KvBlockTable checked_kv_table(const char* op, const Tensor& k_cache, const Tensor& token_seq, const Tensor& table,
                              const Tensor& positions, bool whole_prefix) {
  KvBlockTable kv = KvBlockTable::of(k_cache, table);
  check_indices(op, "tokenSeq", "sequence", token_seq, table.dim(0), "kvBlockTable", table);
  const int32_t* seq = token_seq.data<int32_t>();
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < positions.numel(); ++t) {
    WEFT_CHECK(pos[t] >= 0 && pos[t] < kv.capacity(), op, "positions[", t, "] = ", pos[t], " is out of range for ",
               "kvBlockTable ", table, " of blocks of ", kv.block_size, " positions (need 0 <= position < ",
               kv.capacity(), ")");
    for (int64_t j = whole_prefix ? 0 : pos[t] / kv.block_size; j <= pos[t] / kv.block_size; ++j) {
      const int32_t block = kv.block_id(seq[t], j);
      WEFT_CHECK(block >= 0 && block < kv.n_blocks, op, "kvBlockTable[", seq[t], "][", j, "] = ", block,
                 " (a block of tokenSeq[", t, "] = ", seq[t], ") is out of range for kCache ", k_cache,
                 " (need 0 <= block < ", kv.n_blocks, ")");
    }
  }
  return kv;
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}
  const char* name() const override { return "cpu"; }

 protected:
  Tensor allocate(DType dtype, const Shape& shape) override { return make(dtype, shape, in_step() ? step() : kPersistent); }
  Tensor empty_persistent(DType dtype, const Shape& shape) override { return make(dtype, shape, kPersistent); }
  Tensor make(DType dtype, const Shape& shape, uint64_t step) {
    Tensor t{dtype, shape, nullptr, nullptr};
    auto buffer = std::make_shared<HostBuffer>(t.nbytes(), step);
    if (step != kPersistent) step_buffers_.push_back(buffer);
    t.buffer = std::move(buffer);
    return t;
  }
  // The rule every backend keeps (backend.h): a step's tensors are unusable after the next begin_step(), and a
  // layer's after its releaseLayer(). Their memory goes then, so a step holds at most what it made since.
  void on_begin_step() override { reclaim(0, UINT64_MAX); }
  bool on_release_layer(uint64_t mark, const std::vector<Tensor>& /*moved*/) override {
    released_above_ = mark;
    released_through_ = 0;
    for (const auto& weak : step_buffers_)
      if (auto buffer = weak.lock()) released_through_ = std::max(released_through_, buffer->serial());
    return true;
  }
  // after the layer's kept outputs were copied down (the copies are newer than every released buffer)
  void on_layer_released(const std::vector<Tensor>& /*moved*/, const std::vector<Tensor>& /*copies*/) override {
    reclaim(released_above_, released_through_);
  }
  // Frees the step buffers numbered in (above, through] and forgets them; drops the entries of buffers gone.
  void reclaim(uint64_t above, uint64_t through) {
    auto gone = std::remove_if(step_buffers_.begin(), step_buffers_.end(), [&](const std::weak_ptr<HostBuffer>& weak) {
      auto buffer = weak.lock();
      if (!buffer) return true;
      if (buffer->serial() <= above || buffer->serial() > through) return false;
      buffer->reclaim();
      return true;
    });
    step_buffers_.erase(gone, step_buffers_.end());
  }
  void copy_from_host(const Tensor& dst, const void* src) override {
    if (dst.nbytes()) std::memcpy(dst.buffer->data(), src, dst.nbytes());
  }
  void fill_zero(const Tensor& t) override {
    if (t.nbytes()) std::memset(t.buffer->data(), 0, t.nbytes());
  }
  void to_host_converted(const Tensor& t, void* dst) override {
    if (t.nbytes() == 0) return;  // dst may be null (an empty JS typed array)
    if (t.dtype == DType::I32)
      std::memcpy(dst, t.buffer->data(), t.nbytes());
    else
      cpu::to_f32(t.buffer->data(), t.dtype, 0, t.numel(), static_cast<float*>(dst));
  }

  void run_embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out) override {
    cpu::embedding(out.data<float>(), table.buffer->data(), table.dtype, table.dim(0), table.dim(1),
                   ids.data<int32_t>(), ids.dim(0), vocab_start);
  }
  void run_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) override {
    cpu::rms_norm(out.data<float>(), x.data<float>(), weight.buffer->data(), weight.dtype, x.dim(0), x.dim(1), eps);
  }
  void run_matmul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    cpu::matmul(pool_, out.data<float>(), x.data<float>(), cpu::WeightRows::of(w), x.dim(0), x.dim(1), w.dim(0));
  }
  void run_add(const Tensor& a, const Tensor& b, const Tensor& out) override {
    cpu::add(out.data<float>(), a.data<float>(), b.data<float>(), a.numel());
  }
  void run_rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                const Tensor& out) override {
    const int32_t* pos = positions.data<int32_t>();
    for (int64_t t = 0; t < positions.numel(); ++t)
      WEFT_CHECK(pos[t] >= 0, "rope", "positions[", t, "] = ", pos[t], " is negative");
    cpu::rope(out.data<float>(), x.data<float>(), pos, inv_freq.data<float>(), x.dim(0), x.dim(1), head_dim);
  }
  void run_write_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                    const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) override {
    KvBlockTable kv = checked_kv_table("writeKv", k_cache, token_seq, kv_block_table, positions, false);
    cpu::write_kv(k_cache.buffer->data(), v_cache.buffer->data(), k_cache.dtype, k.data<float>(), v.data<float>(),
                  kv, token_seq.data<int32_t>(), positions.data<int32_t>(), k.dim(0), k_cache.dim(3),
                  k_cache.kv_scales(), v_cache.kv_scales());
  }
  void run_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                     const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                     bool /*decode_rows: one loop serves every row*/, const Tensor& out) override {
    KvBlockTable kv = checked_kv_table("attention", k_cache, token_seq, kv_block_table, positions, true);
    cpu::attention(pool_, out.data<float>(), q.data<float>(), k_cache.buffer->data(), v_cache.buffer->data(),
                   k_cache.dtype, kv, token_seq.data<int32_t>(), positions.data<int32_t>(), q.dim(0), n_heads,
                   k_cache.dim(3), scale, k_cache.kv_scales(), v_cache.kv_scales());
  }
  void run_attention_bifurcated(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                                const Tensor& kv_block_table, const Tensor& positions, const Tensor& token_group,
                                const Tensor& group_shared, int64_t n_heads, float scale, const Tensor& out) override {
    const char* op = "attentionBifurcated";
    KvBlockTable kv = checked_kv_table(op, k_cache, token_seq, kv_block_table, positions, true);
    cpu::check_prefix_groups(op, kv, token_seq.data<int32_t>(), positions.data<int32_t>(), token_group.data<int32_t>(),
                             q.dim(0), group_shared.data<int32_t>(), group_shared.dim(0));
    cpu::attention_bifurcated(pool_, out.data<float>(), q.data<float>(), k_cache.buffer->data(),
                              v_cache.buffer->data(), k_cache.dtype, kv, token_seq.data<int32_t>(),
                              positions.data<int32_t>(), token_group.data<int32_t>(), group_shared.data<int32_t>(),
                              q.dim(0), n_heads, k_cache.dim(3), scale);
  }
  void run_sparq_append(const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) override {
    KvBlockTable kv = checked_kv_table("sparqAppend", k_cache, token_seq, kv_block_table, positions, false);
    cpu::sparq_append(k_t.buffer->data(), v_sum.data<float>(), k_cache.buffer->data(), v_cache.buffer->data(),
                      k_cache.dtype, kv, token_seq.data<int32_t>(), positions.data<int32_t>(), token_seq.dim(0),
                      k_cache.dim(3));
  }
  // The dense attention for every token first: the tokens SparQ serves exactly (length <= k) keep it bit for bit.
  void run_sparq_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_t,
                           const Tensor& v_sum, const Tensor& token_seq, const Tensor& kv_block_table,
                           const Tensor& positions, const Tensor& sparq_r, const Tensor& sparq_k, int64_t n_heads,
                           float scale, const Tensor& out) override {
    run_attention(q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, false, out);
    KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
    for (int64_t t = 0; t < q.dim(0); ++t) {
      const int32_t r = sparq_r.data<int32_t>()[t], k = sparq_k.data<int32_t>()[t];
      WEFT_CHECK(r >= 1 && r <= k_cache.dim(3) && k >= 1, "sparqAttention", "token ", t, ": r = ", r, ", k = ", k,
                 " (need 1 <= r <= headDim = ", k_cache.dim(3), " and k >= 1)");
    }
    cpu::sparq_attention(pool_, out.data<float>(), q.data<float>(), k_cache.buffer->data(), v_cache.buffer->data(),
                         k_t.buffer->data(), v_sum.data<float>(), k_cache.dtype, kv, token_seq.data<int32_t>(),
                         positions.data<int32_t>(), sparq_r.data<int32_t>(), sparq_k.data<int32_t>(), q.dim(0),
                         n_heads, k_cache.dim(3), scale);
  }
  void run_sage_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                          const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale, DType pv,
                          const SageState* state, int64_t seqs, const Tensor& out) override {
    KvBlockTable kv = checked_kv_table("sageAttention", k_cache, token_seq, kv_block_table, positions, true);
    // the CUDA kernels' scratch holds `seqs` sequences (their device check, StatusOp::SageSeqs): refused alike
    std::vector<bool> named(static_cast<size_t>(kv.n_seqs), false);
    int64_t distinct = 0;
    for (int64_t t = 0; t < q.dim(0); ++t)
      if (!named[token_seq.data<int32_t>()[t]]) named[token_seq.data<int32_t>()[t]] = true, ++distinct;
    WEFT_CHECK(distinct <= seqs, "sageAttention", "the rows after the decode rows name ", distinct,
               " sequences, over the ", seqs,
               " the table has besides the decode rows': a decode row's sequence has other rows in the step");
    const cpu::SageStateView view = state ? sage_state_view(*state) : cpu::SageStateView{};
    cpu::sage_attention(pool_, out.data<float>(), q.data<float>(), k_cache.buffer->data(), v_cache.buffer->data(),
                        k_cache.dtype, kv, token_seq.data<int32_t>(), positions.data<int32_t>(), q.dim(0), n_heads,
                        k_cache.dim(3), scale, pv == DType::FP8, k_cache.kv_scales(), v_cache.kv_scales(),
                        state ? &view : nullptr);
  }
  void run_sage_state_reset(const SageState& state) override {
    cpu::sage_state_reset(sage_state_view(state), state.slots.dim(0));
  }
  // The slots' view; two rows naming one slot are refused (the CUDA kernels would race on it).
  static cpu::SageStateView sage_state_view(const SageState& state) {
    const cpu::SageStateView view{state.header.data<int32_t>(), state.means.data<float>(), state.slots.data<int32_t>(),
                                  state.header.dim(0), state.blocks.dim(1)};
    std::vector<int64_t> row_of(static_cast<size_t>(view.n_slots), -1);
    for (int64_t s = 0; s < state.slots.dim(0); ++s) {
      const int32_t slot = view.slots[3 * s];
      if (slot < 0 || slot >= view.n_slots) continue;
      WEFT_CHECK(row_of[slot] < 0, "sageAttention", "sageSlots names slot ", slot, " for rows ", row_of[slot], " and ", s,
                 " (a slot holds one sequence)");
      row_of[slot] = s;
    }
    return view;
  }
  void run_add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps, const Tensor& sum,
                        const Tensor& normed) override {
    cpu::add_rms_norm(sum.data<float>(), normed.data<float>(), x.data<float>(), y.data<float>(),
                      weight.buffer->data(), weight.dtype, x.dim(0), x.dim(1), eps);
  }
  void run_qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq, const Tensor& k_cache,
                    const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                    const Tensor& q) override {
    KvBlockTable kv = checked_kv_table("qkvRope", k_cache, token_seq, kv_block_table, positions, false);
    cpu::qkv_rope(q.data<float>(), k_cache.buffer->data(), v_cache.buffer->data(), k_cache.dtype, qkv.data<float>(),
                  positions.data<int32_t>(), inv_freq.data<float>(), kv, token_seq.data<int32_t>(), qkv.dim(0),
                  q.dim(1) / k_cache.dim(3), k_cache.dim(3), k_cache.kv_scales(), v_cache.kv_scales());
  }
  void run_copy(const Tensor& dst, const Tensor& src) override {
    if (dst.nbytes()) std::memcpy(dst.buffer->data(), src.buffer->data(), dst.nbytes());
  }
  void run_feed_tokens(const Tensor& ids, const Tensor& from, const Tensor& src) override {
    int32_t* out = ids.data<int32_t>();
    const int32_t* f = from.data<int32_t>();
    for (int64_t i = 0; i < ids.dim(0); ++i) {
      WEFT_CHECK(f[i] < src.dim(0), "feedTokens", "from[", i, "] = ", f[i], " is out of range (src holds ", src.dim(0),
                 " tokens)");
      if (f[i] >= 0) out[i] = src.data<int32_t>()[f[i]];
    }
  }
  void run_silu_mul(const Tensor& gate_up, const Tensor& out) override {
    cpu::silu_mul(out.data<float>(), gate_up.data<float>(), out.dim(0), out.dim(1));
  }
  void run_slice_cols(const Tensor& x, int64_t start, const Tensor& out) override {
    int64_t es = static_cast<int64_t>(dtype_size(x.dtype));
    cpu::copy_cols(out.data<uint8_t>(), out.dim(1) * es, 0, x.data<uint8_t>(), x.dim(1) * es, start * es, x.dim(0),
                   out.dim(1) * es);
  }
  void run_concat_cols(const std::vector<Tensor>& xs, const Tensor& out) override {
    int64_t es = static_cast<int64_t>(dtype_size(out.dtype)), offset = 0;
    for (const Tensor& x : xs) {
      cpu::copy_cols(out.data<uint8_t>(), out.dim(1) * es, offset * es, x.data<uint8_t>(), x.dim(1) * es, 0,
                     x.dim(0), x.dim(1) * es);
      offset += x.dim(1);
    }
  }
  void run_gather_rows(const Tensor& x, const Tensor& rows, const Tensor& out) override {
    check_indices("gatherRows", "rows", "row", rows, x.dim(0), "x", x);
    cpu::gather_rows(out.data<uint8_t>(), x.data<uint8_t>(), x.dim(1) * static_cast<int64_t>(dtype_size(x.dtype)),
                     rows.data<int32_t>(), rows.dim(0));
  }
  void run_route_top_k(const Tensor& logits, const Tensor* rows_in_use, const Routing& out) override {
    const int64_t T = logits.dim(0), E = logits.dim(1), k = out.experts.dim(1);
    const int64_t used = rows_in_use ? rows_in_use->data<int32_t>()[0] : T;
    for (int64_t t = 0; t < T; ++t) {
      if (t >= used) route_padding(k, out.experts.data<int32_t>() + t * k, out.weights.data<float>() + t * k);
      else route_token(logits.data<float>() + t * E, E, k, out.experts.data<int32_t>() + t * k,
                       out.weights.data<float>() + t * k);
    }
  }
  // Rows grouped by expert: each expert's weights are read once, for all of its rows, by the threaded matmul.
  void run_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start, bool gated,
                         const Tensor& out) override {
    const int64_t T = experts.dim(0), k = experts.dim(1), El = w.dim(0), N = w.dim(1), K = w.dim(2);
    const auto by_expert = pairs_by_expert(gated ? "siluMulExpertMatmul" : "expertMatmul", experts.data<int32_t>(), T,
                                           k, expert_start, El);
    fill_zero(out);
    const bool per_pair = x.dim(0) == T * k;
    std::vector<float> xs, ys;
    for (int64_t e = 0; e < El; ++e) {
      const std::vector<int32_t>& pairs = by_expert[e];
      if (pairs.empty()) continue;
      const int64_t R = static_cast<int64_t>(pairs.size());
      xs.resize(static_cast<size_t>(R * K));
      ys.resize(static_cast<size_t>(R * N));
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = per_pair ? pairs[r] : pairs[r] / k;
        if (gated)
          cpu::silu_mul(xs.data() + r * K, x.data<float>() + row * 2 * K, 1, K);
        else
          std::memcpy(xs.data() + r * K, x.data<float>() + row * K, static_cast<size_t>(K) * sizeof(float));
      }
      cpu::matmul(pool_, ys.data(), xs.data(), cpu::WeightRows::of(w, e), R, K, N);
      for (int64_t r = 0; r < R; ++r)
        std::memcpy(out.data<float>() + pairs[r] * N, ys.data() + r * N, static_cast<size_t>(N) * sizeof(float));
    }
  }
  void run_silu_mul_matmul(const Tensor& gate_up, const Tensor& w, const Tensor& out) override {
    const int64_t T = gate_up.dim(0), K = w.dim(1);
    std::vector<float> hidden(static_cast<size_t>(T * K));
    cpu::silu_mul(hidden.data(), gate_up.data<float>(), T, K);
    cpu::matmul(pool_, out.data<float>(), hidden.data(), cpu::WeightRows::of(w), T, K, w.dim(0));
  }
  void run_matmul_silu_mul(const Tensor& x, const Tensor& w, const Tensor& out) override {
    const int64_t T = x.dim(0), F = out.dim(1);
    std::vector<float> gate_up(static_cast<size_t>(T * 2 * F));
    cpu::matmul(pool_, gate_up.data(), x.data<float>(), cpu::WeightRows::of(w), T, x.dim(1), 2 * F);
    cpu::silu_mul(out.data<float>(), gate_up.data(), T, F);
  }
  void run_combine_experts(const Tensor& y, const Tensor& weights, const Tensor& out) override {
    cpu::combine_experts(out.data<float>(), y.data<float>(), weights.data<float>(), weights.dim(0), weights.dim(1),
                         y.dim(1));
  }
  void run_log_softmax(const Tensor& logits, const Tensor& out) override {
    cpu::log_softmax(out.data<float>(), logits.data<float>(), logits.dim(0), logits.dim(1));
  }
  void run_top_logprobs(const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k,
                        const Tensor& out) override {
    check_indices("topLogprobs", "rows", "row", rows, logits.dim(0), "logits", logits);
    const int32_t* r = rows.data<int32_t>();
    for (int64_t q = 0; q < rows.numel(); ++q)
      WEFT_CHECK(ids.data<int32_t>()[r[q]] >= 0 && ids.data<int32_t>()[r[q]] < logits.dim(1), "topLogprobs", "ids[",
                 r[q], "] = ", ids.data<int32_t>()[r[q]], " is out of range for logits ", logits, " (need 0 <= id < ",
                 logits.dim(1), ")");
    cpu::top_logprobs(out.data<float>(), logits.data<float>(), r, ids.data<int32_t>(), rows.numel(), logits.dim(1), k);
  }
  void run_logprobs(const Tensor& logits, const int32_t* ids, float* out) override {
    cpu::logprobs(out, logits.data<float>(), ids, logits.dim(0), logits.dim(1));
  }
  void run_sample(const Tensor& logits, const SampleArgs& args, int32_t* out) override {
    sample_checked("sample", logits, args, out);
  }
  void run_sample_tensor(const Tensor& logits, const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
                         const Tensor& uniform, const Tensor& out) override {
    SampleArgs args{temperature.data<float>(), top_k.data<int32_t>(), top_p.data<float>(), uniform.data<float>()};
    check_sample_args("sampleTensor", args, logits.dim(0));
    sample_checked("sampleTensor", logits, args, out.data<int32_t>());
  }
  void sample_checked(const char* op, const Tensor& logits, const SampleArgs& args, int32_t* out) {
    const float* l = logits.data<float>();
    for (int64_t i = 0; i < logits.numel(); ++i)
      WEFT_CHECK(!std::isnan(l[i]), op, "logits ", logits, " holds NaN at row ", i / logits.dim(1), ", column ",
                 i % logits.dim(1));
    cpu::sample(out, l, args, logits.dim(0), logits.dim(1));
  }
  void run_random_uniform(const Tensor& out, uint64_t seed, float scale) override {
    cpu::random_uniform(out.buffer->data(), out.dtype, out.numel(), seed, scale);
  }
  MemoryInfo memory_info() override {
#if defined(_SC_AVPHYS_PAGES) && defined(_SC_PHYS_PAGES)
    double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    return {static_cast<double>(sysconf(_SC_AVPHYS_PAGES)) * page, static_cast<double>(sysconf(_SC_PHYS_PAGES)) * page};
#else
    return {0, 0};
#endif
  }

 private:
  cpu::ThreadPool pool_;
  std::vector<std::weak_ptr<HostBuffer>> step_buffers_;  // made since the last reclaim, in the order made
  uint64_t released_above_ = 0, released_through_ = 0;    // the serials releaseLayer frees once its copies exist
};

}  // namespace

std::shared_ptr<Backend> make_cpu_backend(int threads) { return std::make_shared<CpuBackend>(threads); }

}  // namespace weft
