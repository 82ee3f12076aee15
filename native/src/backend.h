// Backend: the op list shared by the CPU backend (cpu/) and, later, the CUDA backend (cuda/).
//
// The public methods are the ops as the binding calls them. Each one (backend.cc, shared by every backend)
// checks the shapes and dtypes of all its arguments, allocates the output with empty(), and calls the
// backend's protected run_* kernel, so a backend only implements kernels on arguments already known to fit.
// Checks that need tensor *values* (sequence, block, position and row indices held in i32 tensors) belong to
// the backend: the CPU backend reads them before computing; a device backend checks them on the device.
//
// All arithmetic is fp32; f16/bf16 weights are converted as they are read. Shapes in comments use T for
// tokens, H for hidden size, K/N for matmul input/output features, hd for head dimension, and for the KV
// cache (kv-block-table.h): nBlocks blocks of B positions, S sequence rows of kvBlockTable, M =
// maxBlocksPerSeq blocks per row.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "sage-state.h"
#include "tensor.h"

namespace weft {

// A captured CUDA graph: opaque here, subclassed by the CUDA backend (cuda/backend-cuda.cc).
class Graph {
 public:
  virtual ~Graph() = default;
};

// Device (cuda) or host (cpu) memory in bytes.
struct MemoryInfo {
  double free;
  double total;
};

// A download in flight (Backend::download_async): the copy was queued behind the work queued before it, so the
// engine may go on queueing work; wait() blocks until the bytes landed (on any thread, touching no JS) and
// finish() writes them to dst (on the calling thread, after wait; it reports device-side errors as download does).
class PendingDownload {
 public:
  virtual ~PendingDownload() = default;
  virtual void wait() = 0;
  virtual void finish(void* dst) = 0;  // dst as download's: numel floats or int32
};

// Per-row sampling parameters, host arrays of length R (see Backend::sample).
struct SampleArgs {
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* uniform;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;  // "cpu" | "cuda"

  // ---- steps. Between begin_step() and end_step() every new tensor (op outputs, uploads, zeros) is
  // step memory: the CUDA backend bumps it out of one preallocated arena that the next begin_step() reuses,
  // and using such a tensor after that throws "tensor from an earlier step". Outside a step new tensors are
  // persistent (freed with their last handle). The CPU backend keeps heap allocation but the same rule, and frees a
  // step's buffers when it applies (its layers' at release_layer).
  void begin_step();
  void end_step();
  bool in_step() const { return in_step_; }
  uint64_t step() const { return step_; }
  // Throws unless t may be used now: not from an earlier step, and during a capture not step memory made
  // before capture_begin() (the next step reuses it, so a replayed graph would read garbage).
  void check_usable(const char* op, const char* name, const Tensor& t) const;
  // Throws "engine is dead after ..." once a sticky device error happened (cuda).
  virtual void check_alive(const char* /*op*/) const {}
  // Before an op called from JS reads or writes t (after check_usable): the CUDA backend launches here the
  // one-token addRmsNorm it holds back for the GEMV that reads its normed row, when another op touches its tensors.
  virtual void before_use(const char* /*op*/, const char* /*name*/, const Tensor& /*t*/) {}

  // ---- graphs (cuda; the CPU backend throws "graphs need the cuda backend"). Capture happens inside a
  // step; ops then record instead of run, and must not synchronise, allocate persistent memory or copy
  // from the host. Tensors made during the capture belong to the graph's memory and stay valid; replay
  // rewrites them.
  void capture_begin();
  std::shared_ptr<Graph> capture_end();
  void replay(const Graph& graph);
  bool capturing() const { return capturing_; }

  // ---- layers. A long step's intermediates of every layer would otherwise live until its end (a 1024-token
  // step of a 7B model makes ~12 GB of them): layer_mark() before the first layer, release_layer(mark, keep) at
  // each layer's end frees what was made since the mark and returns keep's tensors moved down to it (new handles,
  // same values). Every other tensor made since the mark is dead: using it throws "released at the end of its
  // layer". The mark stays open (marks made after it close), so the next layer's release frees the tensors this
  // one kept, once they are read: the step holds one layer and one residual, not a residual a layer. Inside a
  // capture, or where the backend gains nothing (cuda: a step of at most 16 rows, whose intermediates are small
  // and whose held norm would be launched alone), release_layer returns keep itself and frees nothing; outside
  // a step (persistent memory, which goes with its last handle) both do nothing.
  uint64_t layer_mark();
  std::vector<Tensor> release_layer(uint64_t mark, const std::vector<Tensor>& keep);

  // ---- device facts and plumbing
  virtual uint64_t device_pointer(const Tensor& t);  // cuda: the tensor's device address (for NCCL)
  virtual uint64_t stream_handle();                   // cuda: the engine's cudaStream_t
  virtual void synchronize() {}                       // waits for the engine's queued work
  virtual MemoryInfo memory_info() = 0;
  virtual double measure_bandwidth(size_t bytes, int iterations);  // GB/s (cuda)
  // cuda: waits for queued work, then starts (on) or stops a profiler's collection (cudaProfilerStart/Stop), so
  // that `ncu --profile-from-start off` sees only the work in between; cpu: nothing to collect, a no-op
  virtual void profile_range(bool /*on*/) {}

  // ---- memory
  // Overwrites t's contents with n_bytes (== t.nbytes()) raw bytes, ordered after queued work (a later
  // replay sees them).
  void write(const Tensor& t, const void* bytes, size_t n_bytes);
  // A persistent tensor of uniform values in [-scale, scale): a counter-based hash of (seed, index)
  // (random-hash.h), so no host data is made or copied.
  Tensor random_uniform(DType dtype, const Shape& shape, uint64_t seed, float scale);
  Tensor upload(const void* bytes, size_t n_bytes, DType dtype, const Shape& shape);  // n_bytes == numel * size
  // A quantized weight: w [N, K] or [El, N, K] of dtype I8 (int8 values) or I4 (codes value + 8, two per byte
  // along K, the even column in the low nibble; n_bytes == numel / 2), and scales [..., N, K / group] bf16, a
  // persistent tensor (uploaded before), group even for I4. matmul, siluMulMatmul and the expert matmuls take it
  // as w and compute with w = q * scale of the column's group.
  Tensor upload_quantized(const void* bytes, size_t n_bytes, DType dtype, const Shape& shape, const Tensor& scales);
  void download(const Tensor& t, void* dst);  // dst: numel floats (f32/f16/bf16 converted) or numel int32
  // download without waiting here: the copy is ordered after the work queued so far and lands while later work
  // is queued (the decode pipeline: step k's tokens come back while step k + 1 runs). The CPU backend copies at once.
  std::unique_ptr<PendingDownload> download_async(const Tensor& t);
  Tensor zeros(DType dtype, const Shape& shape);

  // ---- ops; each returns a new tensor unless it says "in place"
  // table [Vr, H] float, ids [T] i32 -> [T, H] f32; ids outside [vocab_start, vocab_start + Vr) give zero rows.
  Tensor embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start);
  // x [T, H] f32, weight [H] float -> [T, H] f32: x / sqrt(mean(x^2) + eps) * weight.
  Tensor rms_norm(const Tensor& x, const Tensor& weight, float eps);
  // x [T, K] f32, w [N, K] float or quantized (upload_quantized) -> [T, N] f32 = x @ w^T.
  Tensor matmul(const Tensor& x, const Tensor& w);
  // a, b same shape f32.
  Tensor add(const Tensor& a, const Tensor& b);
  // x [T, nH * hd] f32, positions [T] i32, inv_freq [hd / 2] f32 -> rotated x (HF rotate_half per head).
  Tensor rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim);
  // The KV ops address the cache through a block table (kv-block-table.h): caches [nBlocks, nKv, B, hd], both f32
  // or both bf16 (written rounded to nearest even, bf16-round.h; every read widens to f32 and computes as f32),
  // token_seq [T] i32 (each token's row of the table), kv_block_table [S, M] i32 (physical block ids),
  // positions [T] i32. Token t's position p lives in block kv_block_table[token_seq[t]][p / B], row p % B.
  // In place: the cache row of (token t, kv head h) = k[t, h * hd : (h + 1) * hd]; likewise v. k, v [T, nKv * hd].
  void write_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions);
  // q [T, nH * hd] f32 -> [T, nH * hd] f32: query t attends over positions 0..positions[t] of its sequence,
  // each key and value row read through the table. decode_rows (0..T): the first rows are each their sequence's
  // only row in the step (a mixed step's decode rows, which the step composer puts first): they run as a decode
  // batch, the rest as a prefill. A speed choice only: every row's result is the same for any value.
  Tensor attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                   const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                   int64_t decode_rows = 0);
  // Bifurcated decode attention (prefix groups): equals attention() over the same arguments, but tokens whose
  // sequences share their leading KV blocks (n samples of one prompt) read those blocks once for the whole group.
  // token_group [T] i32: token t's group, or -1 for none; group_shared [G] i32: group g's members share their
  // positions [0, group_shared[g]) (0: an unused slot), read through the table row of its first member (lowest
  // t); each member attends over them and then over its own positions group_shared[g]..positions[t]. Needs
  // group_shared[g] <= positions[t] + 1 for every member and the members' rows holding the same blocks there
  // (the CPU checks both; CUDA assumes them). Fixed-capacity descriptors, so a graph can capture it. hd <= 256.
  Tensor attention_bifurcated(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                              const Tensor& kv_block_table, const Tensor& positions, const Tensor& token_group,
                              const Tensor& group_shared, int64_t n_heads, float scale);
  // ---- fused ops (one kernel each on CUDA; each equals the composition of the separate ops it names)
  // x, y [T, H] f32, weight [H] float -> {sum = x + y, normed = rms_norm(sum, weight, eps)}, both [T, H] f32:
  // the residual add and the next norm in one pass.
  struct SumAndNormed {
    Tensor sum, normed;
  };
  SumAndNormed add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps);
  // qkv [T, (nH + 2 nKv) hd] f32 (q heads, then k heads, then v heads), positions [T] i32, inv_freq [hd / 2]
  // f32, caches, token_seq and kv_block_table as write_kv -> q [T, nH * hd] f32 = rope(q part); in place: the
  // cache rows of (token t, kv head h) get rope(k part) and the v part. Equals sliceCols x 3, rope x 2 and writeKv.
  Tensor qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq, const Tensor& k_cache,
                  const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table, int64_t n_heads);
  // ---- SparQ approximate decode attention (cuda/attention-sparq.cuh states the algorithm). Its state beside the
  // caches: kT [nBlocks, nKv, hd, B] (K transposed within each block, the caches' dtype) and vSum [nBlocks, nKv, hd]
  // f32 (the sum of each full block's V rows). In place, after qkv_rope wrote the tokens' rows: kT gets each
  // token's K row; a block's vSum is remade from the V cache when its last row (B - 1) is written.
  void sparq_append(const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache, const Tensor& v_cache,
                    const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions);
  // As attention, approximated per token t: sparqR [T], sparqK [T] i32 its r (columns, 1..hd) and k (rows, >= 1);
  // a token whose length positions[t] + 1 is at most its k gets the exact (dense) attention.
  Tensor sparq_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_t,
                         const Tensor& v_sum, const Tensor& token_seq, const Tensor& kv_block_table,
                         const Tensor& positions, const Tensor& sparq_r, const Tensor& sparq_k, int64_t n_heads,
                         float scale);
  // ---- quantized prefill attention, SageAttention-style (cuda/attention-sage.cuh states the algorithm): as
  // attention, with Q and the mean-smoothed K in int8 per 64-row block and P V in f16 (pv F16) or e4m3 (pv FP8).
  // Decode is untouched: the first decode_rows rows (as attention's) get attention() itself, and so does the whole
  // step where fewer than kSageMinTokens rows follow them (the CUDA decode kernel's steps) or it is a decode batch
  // (one token per sequence). The rows after them are quantized as a step of their own (Q's 64-row blocks counted
  // from the first). hd 64 or 128 on cuda. state (or null): the layer's slots and the step's use of them
  // (sage-state.h); a short step still empties the slots it starts afresh.
  static constexpr int64_t kSageMinTokens = 65;
  Tensor sage_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                        const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale, DType pv,
                        const SageState* state, int64_t decode_rows = 0);
  // In place: dst = src (same dtype and shape); e.g. a captured graph's result into a persistent tensor.
  void copy(const Tensor& dst, const Tensor& src);
  // In place: ids[i] = from[i] < 0 ? ids[i] : src[from[i]], with ids [N], from [N] and src [M] i32; from[i] >= M is
  // an error (the CPU throws, CUDA reports it at the next synchronising call). How a step's tokens come from the
  // tokens the previous step sampled without passing through the host (worker/runner.ts).
  void feed_tokens(const Tensor& ids, const Tensor& from, const Tensor& src);
  // gate_up [T, 2F] f32 -> [T, F] f32: silu(gate) * up.
  Tensor silu_mul(const Tensor& gate_up);
  // gate_up [T, 2K] f32, w [N, K] float -> [T, N] f32 = matmul(silu_mul(gate_up), w); on CUDA up to 8 tokens
  // one GEMV that forms silu(gate) * up as it loads x (no intermediate, one kernel fewer).
  Tensor silu_mul_matmul(const Tensor& gate_up, const Tensor& w);
  // x [T, K] f32, w [2F, K] (gate rows, then up rows; any matmul weight) -> [T, F] f32 = silu_mul(matmul(x, w)),
  // SwiGLU's gate and up products and their product; on CUDA one token is one GEMV that sums gate row f and up row
  // F + f in one warp and stores silu(gate) * up (no [T, 2F] intermediate, and the down projection reads a finished x).
  Tensor matmul_silu_mul(const Tensor& x, const Tensor& w);
  // x [T, N] any dtype -> [T, end - start] same dtype.
  Tensor slice_cols(const Tensor& x, int64_t start, int64_t end);
  // xs[i] [T, Ni], one dtype -> [T, sum Ni].
  Tensor concat_cols(const std::vector<Tensor>& xs);
  // x [T, N] any dtype, rows [R] i32 -> [R, N].
  Tensor gather_rows(const Tensor& x, const Tensor& rows);
  // ---- mixture of experts (E experts, k chosen per token; pair p = t * k + j is token t's j-th choice)
  // logits [T, E] f32 -> {experts [T, k] i32, weights [T, k] f32}: per token, softmax over all E in fp32, the k
  // most probable experts (highest first, ties to the lower index), their probabilities renormalised to sum 1
  // (Hugging Face's Mixtral router). 1 <= k <= E. rows_in_use ([1] i32, or null: every row): the rows at and past
  // its value only pad a graph step to its bucket, and their pairs choose no expert (route_padding).
  struct Routing {
    Tensor experts, weights;
  };
  Routing route_top_k(const Tensor& logits, int64_t k, const Tensor* rows_in_use = nullptr);
  // x [X, K] f32 with X = T (row t serves all k pairs of token t) or X = T * k (one row per pair), w [El, N, K]
  // float (experts expert_start .. expert_start + El - 1), experts [T, k] i32 -> [T * k, N] f32: row p =
  // x-row of p @ w[experts[p] - expert_start]^T, and zeros where that expert is not in w (another rank's, with
  // expert parallelism). Each expert's weights are read once for all the rows routed to it. A token's k experts
  // must be distinct (route_top_k's are); the CUDA backend checks that on the device.
  Tensor expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start);
  // expert_matmul(silu_mul(gate_up), w, ...) with gate_up [X, 2K]: on CUDA up to 8 tokens the SwiGLU product
  // is formed as the GEMV loads x and is never stored.
  Tensor silu_mul_expert_matmul(const Tensor& gate_up, const Tensor& w, const Tensor& experts, int64_t expert_start);
  // y [T * k, N] f32, weights [T, k] f32 -> [T, N] f32: out[t] = sum over j (in order) of weights[t, j] * y[t k + j].
  Tensor combine_experts(const Tensor& y, const Tensor& weights);
  // logits [R, V] f32 -> [R, V] f32.
  Tensor log_softmax(const Tensor& logits);
  // logits [R, V] f32, ids[R] host -> out[R] host: log_softmax(logits[r])[ids[r]].
  void logprobs(const Tensor& logits, const int32_t* ids, size_t n_ids, float* out);
  // logits [R, V] f32, rows [Q] i32 (each < R), ids [R] i32, 0 <= k <= 20 -> [Q, 1 + 2k] f32: for row r = rows[q],
  // log_softmax(logits[r])[ids[r]], then the k most likely ids (as floats: exact, V <= 2^24), then their
  // log-probs, highest first, ties to the lower id (id -1, -inf when the row has fewer than k numbers). On the
  // device, so the ids may be a draw that never came to the host (sampleTensor's output). Capturable.
  Tensor top_logprobs(const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k);
  // logits [R, V] f32, args arrays of n_rows (must equal R) -> out[R] host token ids; rule in cpu/ops.cc.
  void sample(const Tensor& logits, const SampleArgs& args, size_t n_rows, int32_t* out);
  // The same rule with every argument a tensor ([R] f32 temperature, i32 topK, f32 topP, f32 uniform), so
  // it can be captured; -> [R] i32. Greedy rows equal sample() exactly; others sample the same distribution
  // (the CUDA kernel may visit equal candidates in another order: cuda/sample.cu).
  Tensor sample_tensor(const Tensor& logits, const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
                       const Tensor& uniform);

 protected:
  // Uninitialised storage; every run_* kernel writes all of its output. Step memory inside a step
  // (stamped with step() and numbered in the order of allocation), else persistent; empty_persistent is
  // persistent always. allocate() is the backend's half of empty().
  Tensor empty(DType dtype, const Shape& shape);
  virtual Tensor allocate(DType dtype, const Shape& shape) = 0;
  virtual Tensor empty_persistent(DType dtype, const Shape& shape) = 0;
  // release_layer's backend half: whether to free what step memory was made after the layer's mark
  // (`moved`: the keep tensors made after it, to be copied below); if so, the step's allocation is rewound to
  // the mark before the copies are made. on_layer_released then has the copies (moved[i] -> copies[i]).
  virtual bool on_release_layer(uint64_t /*mark*/, const std::vector<Tensor>& /*moved*/) { return true; }
  virtual void on_layer_released(const std::vector<Tensor>& /*moved*/, const std::vector<Tensor>& /*copies*/) {}
  virtual void on_layer_mark(uint64_t /*mark*/) {}
  virtual void on_begin_step() {}
  virtual void on_end_step() {}
  // A weight upload_quantized made (outside a capture); the backend may lay it out anew (cuda: int4 in tiles).
  virtual void on_quantized_weight(Tensor& /*w*/) {}
  virtual void on_capture_begin();
  virtual std::shared_ptr<Graph> on_capture_end();
  virtual void on_replay(const Graph& graph);
  virtual void run_random_uniform(const Tensor& out, uint64_t seed, float scale) = 0;
  virtual void run_sample_tensor(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                                 const Tensor& top_p, const Tensor& uniform, const Tensor& out) = 0;
  virtual void copy_from_host(const Tensor& dst, const void* src) = 0;  // raw bytes, dst.nbytes()
  virtual void fill_zero(const Tensor& t) = 0;
  virtual void to_host_converted(const Tensor& t, void* dst) = 0;  // see download
  // Default: a download made at once, held until finish() (what a host backend needs).
  virtual std::unique_ptr<PendingDownload> start_download(const Tensor& t);
  // The 1-byte KV caches (kv-quant.h): zeros of FP8 or I8 makes one with its scales; download dequantizes it.
  Tensor zeros_kv_quantized(DType dtype, const Shape& shape);
  void download_kv_dequantized(const Tensor& t, float* dst);

  virtual void run_embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start, const Tensor& out) = 0;
  virtual void run_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out) = 0;
  virtual void run_matmul(const Tensor& x, const Tensor& w, const Tensor& out) = 0;
  virtual void run_add(const Tensor& a, const Tensor& b, const Tensor& out) = 0;
  virtual void run_rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim,
                        const Tensor& out) = 0;
  virtual void run_write_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                            const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) = 0;
  // decode_rows: every row of q is its sequence's only one (attention()'s first rows)
  virtual void run_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                             const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                             bool decode_rows, const Tensor& out) = 0;
  virtual void run_attention_bifurcated(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                        const Tensor& token_seq, const Tensor& kv_block_table,
                                        const Tensor& positions, const Tensor& token_group,
                                        const Tensor& group_shared, int64_t n_heads, float scale,
                                        const Tensor& out) = 0;
  virtual void run_sparq_append(const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache, const Tensor& v_cache,
                                const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) = 0;
  virtual void run_sparq_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_t,
                                   const Tensor& v_sum, const Tensor& token_seq, const Tensor& kv_block_table,
                                   const Tensor& positions, const Tensor& sparq_r, const Tensor& sparq_k,
                                   int64_t n_heads, float scale, const Tensor& out) = 0;
  // seqs: the most table rows the rows name (the table's, less the decode rows' sequences: sage_attention)
  virtual void run_sage_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                  const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                  int64_t n_heads, float scale, DType pv, const SageState* state, int64_t seqs,
                                  const Tensor& out) = 0;
  virtual void run_sage_state_reset(const SageState& state) = 0;  // the slots that start afresh, emptied
  virtual void run_copy(const Tensor& dst, const Tensor& src) = 0;
  virtual void run_feed_tokens(const Tensor& ids, const Tensor& from, const Tensor& src) = 0;
  virtual void run_add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps, const Tensor& sum,
                                const Tensor& normed) = 0;
  virtual void run_qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                            const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                            const Tensor& kv_block_table, const Tensor& q) = 0;
  virtual void run_silu_mul(const Tensor& gate_up, const Tensor& out) = 0;
  virtual void run_slice_cols(const Tensor& x, int64_t start, const Tensor& out) = 0;
  virtual void run_concat_cols(const std::vector<Tensor>& xs, const Tensor& out) = 0;
  virtual void run_gather_rows(const Tensor& x, const Tensor& rows, const Tensor& out) = 0;
  virtual void run_route_top_k(const Tensor& logits, const Tensor* rows_in_use, const Routing& out) = 0;
  // gated: x is gate_up [X, 2K] and the rows multiplied are silu_mul of it.
  virtual void run_expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start,
                                 bool gated, const Tensor& out) = 0;
  virtual void run_silu_mul_matmul(const Tensor& gate_up, const Tensor& w, const Tensor& out) = 0;
  virtual void run_matmul_silu_mul(const Tensor& x, const Tensor& w, const Tensor& out) = 0;
  virtual void run_combine_experts(const Tensor& y, const Tensor& weights, const Tensor& out) = 0;
  virtual void run_log_softmax(const Tensor& logits, const Tensor& out) = 0;
  virtual void run_logprobs(const Tensor& logits, const int32_t* ids, float* out) = 0;
  virtual void run_top_logprobs(const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k,
                                const Tensor& out) = 0;
  virtual void run_sample(const Tensor& logits, const SampleArgs& args, int32_t* out) = 0;

  // The value checks of sample (NaN temperature, topK >= 0, topP and uniform in [0, 1]).
  static void check_sample_args(const char* op, const SampleArgs& args, int64_t rows);
  Tensor checked_expert_matmul(const char* op, const Tensor& x, const Tensor& w, const Tensor& experts,
                               int64_t expert_start, bool gated);
  // For each of the n_held experts from expert_start, the pairs routed to it (host ids [T * k], pairs in order):
  // how the host-grouped expert matmuls batch their rows. Throws when a token chooses one expert twice.
  static std::vector<std::vector<int32_t>> pairs_by_expert(const char* op, const int32_t* ids, int64_t T, int64_t k,
                                                           int64_t expert_start, int64_t n_held);
  // Throws "<op>: not allowed during graph capture (...)" while capturing.
  void no_capture(const char* op, const char* why) const;

 private:
  // attention()'s launches: rows [0, decode_rows) as decode rows, the rest as another launch (one where either is all)
  void run_attention_rows(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                          const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                          int64_t decode_rows, const Tensor& out);

  bool in_step_ = false;
  bool capturing_ = false;
  uint64_t step_ = 0;  // generation of the current or last step; step memory is stamped with it
  uint64_t serial_ = 0;  // step allocations so far (never reset: a number names one tensor of one step)
  std::vector<uint64_t> layer_marks_;  // this step's open marks, in order
  std::vector<std::pair<uint64_t, uint64_t>> released_;  // this step's freed serials, [first, last] ranges
};

// threads: total threads for heavy ops, the calling thread included (>= 1).
std::shared_ptr<Backend> make_cpu_backend(int threads);

// Throws weft::Error when this build has no CUDA backend (cuda-stub.cc).
struct CudaOptions {
  int device = 0;
  size_t arena_bytes = size_t{4} << 30;  // the step arena, allocated at the first begin_step()
  bool poison = false;                    // debug: fill every new tensor with 0xff bytes (NaN / -1)
};
std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& options);
bool have_cuda_backend();

}  // namespace weft
