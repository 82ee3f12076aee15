// Shape and dtype checks for every op, shared by all backends; then allocate the output and run the kernel.
// Messages use the JS names of ops and parameters, since that is what the caller wrote.
#include "backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "error.h"
#include "kv-quant.h"

namespace weft {
namespace {

constexpr int64_t kMaxElements = int64_t{1} << 40;  // 4 TiB of f32; larger is a caller bug, not a tensor

// A named tensor argument, printed as "x [3, 64] f32".
struct Arg {
  const char* name;
  const Tensor& t;
};
std::ostream& operator<<(std::ostream& os, const Arg& a) { return os << a.name << ' ' << a.t; }

const std::initializer_list<DType> kAny = {};
const std::initializer_list<DType> kF32 = {DType::F32};
const std::initializer_list<DType> kI32 = {DType::I32};
const std::initializer_list<DType> kFloat = {DType::F32, DType::F16, DType::BF16};
const std::initializer_list<DType> kWeight = {DType::F32, DType::F16, DType::BF16, DType::I8, DType::I4};

std::string dtypes_text(std::initializer_list<DType> dtypes) {
  if (dtypes.size() == 0) return "";
  std::string s = " ";
  for (DType d : dtypes) s += (s.size() > 1 ? "|" : "") + std::string(dtype_name(d));
  return s;
}

// Check rank and dtype: "rmsNorm: x must be [T, H] f32 (got [3, 4, 5] f32)".
void need(const char* op, const Arg& a, size_t rank, const char* pattern, std::initializer_list<DType> dtypes) {
  bool dtype_ok = dtypes.size() == 0 && !is_quantized(a.t.dtype);  // a quantized weight is only ever a matmul's w
  for (DType d : dtypes) dtype_ok = dtype_ok || a.t.dtype == d;
  WEFT_CHECK(a.t.rank() == rank && dtype_ok, op, a.name, " must be ", pattern, dtypes_text(dtypes), " (got ", a.t,
             ")");
}

void check_shape(const char* op, const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    WEFT_CHECK(d >= 0, op, "shape ", shape, " has a negative dimension");
    WEFT_CHECK(d == 0 || n <= kMaxElements / d, op, "shape ", shape, " has more than 2^40 elements");
    n *= d;
  }
}

}  // namespace

// ---- steps and graphs

void Backend::begin_step() {
  WEFT_CHECK(!capturing_, "beginStep", "a graph capture is open; call captureEnd() first");
  on_begin_step();
  in_step_ = true;
  ++step_;
  layer_marks_.clear();
  released_.clear();
}

void Backend::end_step() {
  WEFT_CHECK(!capturing_, "endStep", "a graph capture is open; call captureEnd() first");
  on_end_step();
  in_step_ = false;
}

void Backend::check_usable(const char* op, const char* name, const Tensor& t) const {
  uint64_t s = t.buffer->step();
  if (s == kPersistent || s == kGraphOwned) return;
  WEFT_CHECK(s == step_, op, name, " ", t, " is a tensor from an earlier step (made in step ", s,
             "; its memory is reused after the next beginStep()); keep it by making it outside a step, or "
             "re-make it in this step");
  WEFT_CHECK(!capturing_, op, name, " ", t, " was made in this step before captureBegin(); a replayed graph may "
             "only read persistent tensors (made outside a step; refill them with write()) or tensors made "
             "during the capture");
  for (const auto& [first, last] : released_)
    WEFT_CHECK(t.buffer->serial() < first || t.buffer->serial() > last, op, name, " ", t,
               " was released at the end of its layer (releaseLayer); only the tensors releaseLayer returned live on");
}

Tensor Backend::empty(DType dtype, const Shape& shape) {
  Tensor t = allocate(dtype, shape);
  if (t.buffer->step() != kPersistent) t.buffer->set_serial(++serial_);
  return t;
}

// ---- layers

uint64_t Backend::layer_mark() {
  if (!in_step_) return 0;  // persistent memory goes with its last handle: nothing to mark
  layer_marks_.push_back(serial_);
  on_layer_mark(serial_);
  return serial_;
}

std::vector<Tensor> Backend::release_layer(uint64_t mark, const std::vector<Tensor>& keep) {
  const char* op = "releaseLayer";
  for (const Tensor& t : keep) check_usable(op, "keep", t);
  if (!in_step_) return keep;
  auto open = std::find(layer_marks_.begin(), layer_marks_.end(), mark);
  WEFT_CHECK(open != layer_marks_.end(), op, "mark ", mark, " is not an open layerMark() of this step");
  std::vector<Tensor> moved;
  std::vector<size_t> moved_at;
  for (size_t i = 0; i < keep.size(); ++i) {
    WEFT_CHECK(!is_quantized(keep[i].dtype) && !keep[i].is_kv_quantized(), op, "keep ", keep[i],
               " is a weight or a cache, not a layer's output");
    if (keep[i].buffer->step() == step_ && keep[i].buffer->serial() > mark) {
      moved.push_back(keep[i]);
      moved_at.push_back(i);
    }
  }
  if (capturing_ || !on_release_layer(mark, moved)) return keep;
  // from here the memory after the mark is the backend's again: the copies are the first step memory made in it
  released_.emplace_back(mark + 1, serial_);
  layer_marks_.erase(open + 1, layer_marks_.end());  // the mark stays open: the next layer releases to it too
  std::vector<Tensor> out = keep, copies;
  for (size_t j = 0; j < moved.size(); ++j) {
    copies.push_back(empty(moved[j].dtype, moved[j].shape));
    run_copy(copies.back(), moved[j]);
    out[moved_at[j]] = copies.back();
  }
  on_layer_released(moved, copies);
  return out;
}

void Backend::no_capture(const char* op, const char* why) const {
  WEFT_CHECK(!capturing_, op, "not allowed during graph capture (", why, ")");
}

void Backend::capture_begin() {
  WEFT_CHECK(in_step_, "captureBegin", "capture must happen inside a step (call beginStep() first)");
  WEFT_CHECK(!capturing_, "captureBegin", "a capture is already open");
  on_capture_begin();
  capturing_ = true;
}

std::shared_ptr<Graph> Backend::capture_end() {
  WEFT_CHECK(capturing_, "captureEnd", "no capture is open (call captureBegin() first)");
  capturing_ = false;  // even if ending fails: the stream is out of capture mode either way
  return on_capture_end();
}

void Backend::replay(const Graph& graph) {
  no_capture("replay", "a graph cannot launch another graph while capturing");
  on_replay(graph);
}

void Backend::on_capture_begin() { WEFT_FAIL("captureBegin", "graphs need the cuda backend"); }
std::shared_ptr<Graph> Backend::on_capture_end() { WEFT_FAIL("captureEnd", "graphs need the cuda backend"); }
void Backend::on_replay(const Graph&) { WEFT_FAIL("replay", "graphs need the cuda backend"); }
uint64_t Backend::device_pointer(const Tensor&) { WEFT_FAIL("devicePointer", "needs the cuda backend"); }
uint64_t Backend::stream_handle() { WEFT_FAIL("streamHandle", "needs the cuda backend"); }
double Backend::measure_bandwidth(size_t, int) { WEFT_FAIL("measureBandwidth", "needs the cuda backend"); }

void Backend::write(const Tensor& t, const void* bytes, size_t n_bytes) {
  no_capture("write", "write before captureBegin() or between replays");
  WEFT_CHECK(n_bytes == t.nbytes(), "write", "bytes has length ", n_bytes, " but t ", t, " holds ", t.nbytes(),
             " bytes");
  copy_from_host(t, bytes);
}

Tensor Backend::random_uniform(DType dtype, const Shape& shape, uint64_t seed, float scale) {
  const char* op = "randomUniform";
  no_capture(op, "it allocates persistent memory");
  check_shape(op, shape);
  WEFT_CHECK(is_float(dtype), op, "dtype must be 'f32', 'f16' or 'bf16' (got '", dtype_name(dtype), "')");
  WEFT_CHECK(std::isfinite(scale) && scale >= 0, op, "scale must be a finite number >= 0 (got ", scale, ")");
  Tensor out = empty_persistent(dtype, shape);
  run_random_uniform(out, seed, scale);
  return out;
}

// ---- memory

Tensor Backend::upload(const void* bytes, size_t n_bytes, DType dtype, const Shape& shape) {
  no_capture("upload", "a graph would replay a copy of a host buffer; upload before captureBegin(), or write() "
             "a persistent tensor before replay");
  check_shape("upload", shape);
  WEFT_CHECK(!is_quantized(dtype) && dtype != DType::FP8, "upload", "dtype '", dtype_name(dtype),
             "' is a quantized type (a weight goes through uploadQuantized, a KV cache is made by zeros)");
  size_t expected = static_cast<size_t>(numel(shape)) * dtype_size(dtype);
  WEFT_CHECK(n_bytes == expected, "upload", "bytes has length ", n_bytes, " but shape ", shape, ' ',
             dtype_name(dtype), " needs ", numel(shape), " x ", dtype_size(dtype), " = ", expected, " bytes");
  Tensor t = empty(dtype, shape);
  copy_from_host(t, bytes);
  return t;
}

Tensor Backend::upload_quantized(const void* bytes, size_t n_bytes, DType dtype, const Shape& shape,
                                 const Tensor& scales) {
  const char* op = "uploadQuantized";
  no_capture(op, "a graph would replay a copy of a host buffer");
  check_shape(op, shape);
  WEFT_CHECK(is_quantized(dtype), op, "dtype must be 'i8' or 'i4' (got '", dtype_name(dtype), "')");
  WEFT_CHECK(shape.size() == 2 || shape.size() == 3, op, "shape ", shape, " must be [N, K] or [El, N, K]");
  const int64_t K = shape.back();
  WEFT_CHECK(K > 0 && (dtype == DType::I8 || K % 2 == 0), op, "shape ", shape, " needs K >= 1", dtype == DType::I4 ? " and even (two int4 per byte)" : "");
  WEFT_CHECK(scales.dtype == DType::BF16 && scales.rank() == shape.size(), op, Arg{"scales", scales}, " must be bf16 of rank ", shape.size());
  const int64_t S = scales.shape.back();
  bool lead_ok = true;
  for (size_t i = 0; i + 1 < shape.size(); ++i) lead_ok = lead_ok && scales.shape[i] == shape[i];
  WEFT_CHECK(lead_ok && S >= 1 && K % S == 0 && (dtype == DType::I8 || (K / S) % 2 == 0), op, Arg{"scales", scales},
             " does not fit w ", shape, ' ', dtype_name(dtype), " (expected [..., N, K / group] with the group dividing K",
             dtype == DType::I4 ? " and even)" : ")");
  WEFT_CHECK(scales.buffer->step() == kPersistent, op, Arg{"scales", scales}, " must be persistent (uploaded outside a step)");
  Tensor t{dtype, shape, nullptr, nullptr};
  WEFT_CHECK(n_bytes == t.nbytes(), op, "bytes has length ", n_bytes, " but w ", shape, ' ', dtype_name(dtype), " needs ",
             t.nbytes(), " bytes");
  t = empty_persistent(dtype, shape);
  copy_from_host(t, bytes);
  t.scales = std::make_shared<const Tensor>(scales);
  on_quantized_weight(t);
  return t;
}

void Backend::download(const Tensor& t, void* dst) {
  no_capture("download", "it waits for the device");
  before_use("download", "t", t);  // the binding's arguments do this; a C++ caller (weft_ops_check) reads here
  if (t.is_kv_quantized()) return download_kv_dequantized(t, static_cast<float*>(dst));
  WEFT_CHECK(!is_quantized(t.dtype), "download", "t ", t, " is a quantized weight (only matmuls read it)");
  to_host_converted(t, dst);
}

std::unique_ptr<PendingDownload> Backend::download_async(const Tensor& t) {
  no_capture("downloadAsync", "a graph would replay the copy into a host buffer");
  WEFT_CHECK(!t.is_kv_quantized(), "downloadAsync", "t ", t, " is a quantized KV cache (download gives its values)");
  WEFT_CHECK(!is_quantized(t.dtype), "downloadAsync", "t ", t, " is a quantized weight (only matmuls read it)");
  before_use("downloadAsync", "t", t);
  return start_download(t);
}

namespace {
// The host backend's download_async: the values are copied at once and handed over at finish().
class ImmediateDownload final : public PendingDownload {
 public:
  explicit ImmediateDownload(std::vector<uint32_t> values) : values_(std::move(values)) {}
  void wait() override {}
  void finish(void* dst) override { std::memcpy(dst, values_.data(), values_.size() * sizeof(uint32_t)); }

 private:
  std::vector<uint32_t> values_;  // numel f32 or i32 words
};
}  // namespace

std::unique_ptr<PendingDownload> Backend::start_download(const Tensor& t) {
  std::vector<uint32_t> values(static_cast<size_t>(t.numel()));
  to_host_converted(t, values.data());
  return std::make_unique<ImmediateDownload>(std::move(values));
}

Tensor Backend::zeros(DType dtype, const Shape& shape) {
  check_shape("zeros", shape);
  if (dtype == DType::FP8 || dtype == DType::I8) return zeros_kv_quantized(dtype, shape);
  Tensor t = empty(dtype, shape);
  fill_zero(t);
  return t;
}

// A 1-byte KV cache [nBlocks, nKv, B, hd] of zero codes and its zero scales [nBlocks, nKv, B] f32 (kv-quant.h).
Tensor Backend::zeros_kv_quantized(DType dtype, const Shape& shape) {
  WEFT_CHECK(shape.size() == 4 && shape[3] % 4 == 0, "zeros", "an ", dtype_name(dtype), " tensor is a KV cache ",
             "[nBlocks, nKv, B, hd] with hd a multiple of 4 (got ", shape, ")");
  Tensor t = empty(dtype, shape);
  fill_zero(t);
  t.scales = std::make_shared<const Tensor>(zeros(DType::F32, {shape[0], shape[1], shape[2]}));
  return t;
}

// The values a quantized KV cache holds, code * scale per element as every read sees them: the codes come back
// as raw bytes (an i32 view of the buffer: hd is a multiple of 4) and the scales as f32.
void Backend::download_kv_dequantized(const Tensor& t, float* dst) {
  const int64_t n = t.numel(), hd = t.shape.back();
  std::vector<uint8_t> codes(static_cast<size_t>(n));
  std::vector<float> scales(static_cast<size_t>(t.scales->numel()));
  if (n > 0) to_host_converted(Tensor{DType::I32, {n / 4}, t.buffer, nullptr}, codes.data());
  if (n > 0) to_host_converted(*t.scales, scales.data());
  for (int64_t i = 0; i < n; ++i)
    dst[i] = t.dtype == DType::FP8 ? kv_dequantize(codes[i], scales[i / hd])
                                   : kv_dequantize(static_cast<int8_t>(codes[i]), scales[i / hd]);
}

Tensor Backend::embedding(const Tensor& table, const Tensor& ids, int64_t vocab_start) {
  const char* op = "embedding";
  need(op, {"table", table}, 2, "[Vr, H]", kFloat);
  need(op, {"ids", ids}, 1, "[T]", kI32);
  WEFT_CHECK(vocab_start >= 0, op, "vocabStart must be >= 0 (got ", vocab_start, ")");
  Tensor out = empty(DType::F32, {ids.dim(0), table.dim(1)});
  run_embedding(table, ids, vocab_start, out);
  return out;
}

Tensor Backend::rms_norm(const Tensor& x, const Tensor& weight, float eps) {
  const char* op = "rmsNorm";
  need(op, {"x", x}, 2, "[T, H]", kF32);
  need(op, {"weight", weight}, 1, "[H]", kFloat);
  WEFT_CHECK(weight.dim(0) == x.dim(1), op, Arg{"x", x}, " and ", Arg{"weight", weight},
             " do not match (expected weight [", x.dim(1), "])");
  WEFT_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be a finite number >= 0 (got ", eps, ")");
  Tensor out = empty(DType::F32, x.shape);
  run_rms_norm(x, weight, eps, out);
  return out;
}

Tensor Backend::matmul(const Tensor& x, const Tensor& w) {
  const char* op = "matmul";
  need(op, {"x", x}, 2, "[T, K]", kF32);
  need(op, {"w", w}, 2, "[N, K]", kWeight);
  WEFT_CHECK(w.dim(1) == x.dim(1), op, Arg{"x", x}, " and ", Arg{"w", w}, " do not match (expected w [N, ",
             x.dim(1), "])");
  Tensor out = empty(DType::F32, {x.dim(0), w.dim(0)});
  run_matmul(x, w, out);
  return out;
}

Tensor Backend::add(const Tensor& a, const Tensor& b) {
  const char* op = "add";
  WEFT_CHECK(a.dtype == DType::F32 && b.dtype == DType::F32 && a.shape == b.shape, op, Arg{"a", a}, " and ",
             Arg{"b", b}, " must be f32 of the same shape");
  Tensor out = empty(DType::F32, a.shape);
  run_add(a, b, out);
  return out;
}

Tensor Backend::rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, int64_t head_dim) {
  const char* op = "rope";
  need(op, {"x", x}, 2, "[T, nHeads * headDim]", kF32);
  need(op, {"positions", positions}, 1, "[T]", kI32);
  need(op, {"invFreq", inv_freq}, 1, "[headDim / 2]", kF32);
  WEFT_CHECK(head_dim > 0 && head_dim % 2 == 0, op, "headDim must be a positive even number (got ", head_dim, ")");
  WEFT_CHECK(x.dim(1) % head_dim == 0, op, Arg{"x", x}, " has ", x.dim(1),
             " columns, not a multiple of headDim = ", head_dim);
  WEFT_CHECK(positions.dim(0) == x.dim(0), op, Arg{"x", x}, " and ", Arg{"positions", positions},
             " do not match (expected positions [", x.dim(0), "])");
  WEFT_CHECK(inv_freq.dim(0) == head_dim / 2, op, Arg{"invFreq", inv_freq}, " does not match headDim = ", head_dim,
             " (expected invFreq [", head_dim / 2, "])");
  Tensor out = empty(DType::F32, x.shape);
  run_rope(x, positions, inv_freq, head_dim, out);
  return out;
}

namespace {
// Shared by writeKv, attention and qkvRope: caches [nBlocks, nKv, B, hd] of one shape and one dtype, f32 or bf16
// (the cache's storage; arithmetic stays f32), or fp8 / i8 made by zeros (with their scales, kv-quant.h), B >= 1;
// tokenSeq and positions [T] i32; kvBlockTable [S, maxBlocksPerSeq] i32.
void check_cache(const char* op, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                 const Tensor& kv_block_table, const Tensor& positions, int64_t n_tokens) {
  for (const Arg& c : {Arg{"kCache", k_cache}, Arg{"vCache", v_cache}})  // need(kAny) would refuse i8
    WEFT_CHECK(c.t.rank() == 4, op, c.name, " must be [nBlocks, nKv, B, hd] (got ", c.t, ")");
  const bool quantized = k_cache.is_kv_quantized() && v_cache.is_kv_quantized();
  WEFT_CHECK(k_cache.dtype == v_cache.dtype && (k_cache.dtype == DType::F32 || k_cache.dtype == DType::BF16 || quantized), op,
             Arg{"kCache", k_cache}, " and ", Arg{"vCache", v_cache}, " must both be f32 or both bf16 (or both fp8 or "
             "both i8 KV caches made by zeros)");
  WEFT_CHECK(k_cache.shape == v_cache.shape, op, Arg{"kCache", k_cache}, " and ", Arg{"vCache", v_cache},
             " must have the same shape");
  WEFT_CHECK(k_cache.dim(2) >= 1, op, Arg{"kCache", k_cache}, " has blocks of ", k_cache.dim(2),
             " positions (need a block size B >= 1)");
  need(op, {"tokenSeq", token_seq}, 1, "[T]", kI32);
  need(op, {"kvBlockTable", kv_block_table}, 2, "[S, maxBlocksPerSeq]", kI32);
  need(op, {"positions", positions}, 1, "[T]", kI32);
  WEFT_CHECK(token_seq.dim(0) == n_tokens && positions.dim(0) == n_tokens, op, Arg{"tokenSeq", token_seq}, " and ",
             Arg{"positions", positions}, " must both be [", n_tokens, "] (one per token)");
}

// Shared by the attention ops after check_cache: nHeads a positive multiple of the cache's nKv, q [T, nHeads * hd],
// a finite scale.
void check_query(const char* op, const Tensor& q, const Tensor& k_cache, int64_t n_heads, float scale) {
  const int64_t n_kv = k_cache.dim(1), hd = k_cache.dim(3);
  WEFT_CHECK(n_heads > 0 && n_kv > 0 && n_heads % n_kv == 0, op, "nHeads = ", n_heads,
             " must be a positive multiple of nKv = ", n_kv, " (from ", Arg{"kCache", k_cache}, ")");
  WEFT_CHECK(q.dim(1) == n_heads * hd, op, Arg{"q", q}, " does not match nHeads = ", n_heads, " and ",
             Arg{"kCache", k_cache}, " (expected q [T, ", n_heads * hd, "])");
  WEFT_CHECK(std::isfinite(scale), op, "scale must be finite (got ", scale, ")");
}

void check_decode_rows(const char* op, int64_t decode_rows, const Tensor& q) {
  WEFT_CHECK(decode_rows >= 0 && decode_rows <= q.dim(0), op, "decodeRows = ", decode_rows, " must be in [0, ",
             q.dim(0), "] (the rows of ", Arg{"q", q}, ")");
}
}  // namespace

void Backend::write_kv(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                       const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) {
  const char* op = "writeKv";
  need(op, {"k", k}, 2, "[T, nKv * hd]", kF32);
  need(op, {"v", v}, 2, "[T, nKv * hd]", kF32);
  WEFT_CHECK(k.shape == v.shape, op, Arg{"k", k}, " and ", Arg{"v", v}, " must have the same shape");
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, k.dim(0));
  int64_t kv_width = k_cache.dim(1) * k_cache.dim(3);
  WEFT_CHECK(k.dim(1) == kv_width, op, Arg{"k", k}, " does not match ", Arg{"kCache", k_cache}, " (expected k [T, ",
             kv_width, "] = [T, nKv * hd])");
  run_write_kv(k_cache, v_cache, k, v, token_seq, kv_block_table, positions);
}

Tensor Backend::attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                          const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                          int64_t decode_rows) {
  const char* op = "attention";
  need(op, {"q", q}, 2, "[T, nHeads * hd]", kF32);
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, q.dim(0));
  check_query(op, q, k_cache, n_heads, scale);
  check_decode_rows(op, decode_rows, q);
  Tensor out = empty(DType::F32, q.shape);
  run_attention_rows(q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, decode_rows, out);
  return out;
}

// A mixed step's decode rows in a launch of their own: in the prefill kernel a 64-row tile of them would walk each
// one's whole context in turn (attention.cuh). Views, not copies: q, out, token_seq and positions are row-major.
void Backend::run_attention_rows(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                 const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                 int64_t n_heads, float scale, int64_t decode_rows, const Tensor& out) {
  const int64_t T = q.dim(0), D = decode_rows;
  if (D == 0 || D == T)
    return run_attention(q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, D == T, out);
  for (const auto& [first, count] : {std::pair{int64_t{0}, D}, std::pair{D, T - D}})
    run_attention(row_range(q, first, count), k_cache, v_cache, row_range(token_seq, first, count), kv_block_table,
                  row_range(positions, first, count), n_heads, scale, first == 0, row_range(out, first, count));
}

Tensor Backend::attention_bifurcated(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                     const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                     const Tensor& token_group, const Tensor& group_shared, int64_t n_heads,
                                     float scale) {
  const char* op = "attentionBifurcated";
  need(op, {"q", q}, 2, "[T, nHeads * hd]", kF32);
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, q.dim(0));
  check_query(op, q, k_cache, n_heads, scale);
  const int64_t hd = k_cache.dim(3);
  WEFT_CHECK(hd <= 256, op, "head dim ", hd, " is over the 256 the bifurcated kernels hold (", Arg{"kCache", k_cache}, ")");
  // the seam for quantized caches: the kernels' K and V loads (cuda/attention-bifurcated.cuh) take their scales
  WEFT_CHECK(k_cache.dtype == DType::F32 || k_cache.dtype == DType::BF16, op, Arg{"kCache", k_cache},
             ": the bifurcated kernels read f32 and bf16 caches only");
  need(op, {"tokenGroup", token_group}, 1, "[T]", kI32);
  need(op, {"groupShared", group_shared}, 1, "[G]", kI32);
  WEFT_CHECK(token_group.dim(0) == q.dim(0), op, Arg{"tokenGroup", token_group}, " must be [", q.dim(0),
             "] (one per token)");
  Tensor out = empty(DType::F32, q.shape);
  run_attention_bifurcated(q, k_cache, v_cache, token_seq, kv_block_table, positions, token_group, group_shared,
                           n_heads, scale, out);
  return out;
}

Backend::SumAndNormed Backend::add_rms_norm(const Tensor& x, const Tensor& y, const Tensor& weight, float eps) {
  const char* op = "addRmsNorm";
  need(op, {"x", x}, 2, "[T, H]", kF32);
  need(op, {"y", y}, 2, "[T, H]", kF32);
  WEFT_CHECK(x.shape == y.shape, op, Arg{"x", x}, " and ", Arg{"y", y}, " must have the same shape");
  need(op, {"weight", weight}, 1, "[H]", kFloat);
  WEFT_CHECK(weight.dim(0) == x.dim(1), op, Arg{"x", x}, " and ", Arg{"weight", weight},
             " do not match (expected weight [", x.dim(1), "])");
  WEFT_CHECK(std::isfinite(eps) && eps >= 0, op, "eps must be a finite number >= 0 (got ", eps, ")");
  SumAndNormed out{empty(DType::F32, x.shape), empty(DType::F32, x.shape)};
  run_add_rms_norm(x, y, weight, eps, out.sum, out.normed);
  return out;
}

Tensor Backend::qkv_rope(const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq, const Tensor& k_cache,
                         const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                         int64_t n_heads) {
  const char* op = "qkvRope";
  need(op, {"qkv", qkv}, 2, "[T, (nHeads + 2 nKv) hd]", kF32);
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, qkv.dim(0));
  need(op, {"invFreq", inv_freq}, 1, "[hd / 2]", kF32);
  int64_t n_kv = k_cache.dim(1), hd = k_cache.dim(3);
  WEFT_CHECK(hd > 0 && hd % 2 == 0, op, Arg{"kCache", k_cache}, " has head dimension ", hd,
             " (need a positive even number)");
  WEFT_CHECK(n_heads > 0, op, "nHeads must be > 0 (got ", n_heads, ")");
  WEFT_CHECK(qkv.dim(1) == (n_heads + 2 * n_kv) * hd, op, Arg{"qkv", qkv}, " does not match nHeads = ", n_heads,
             " and ", Arg{"kCache", k_cache}, " (expected qkv [T, ", (n_heads + 2 * n_kv) * hd,
             "] = [T, (nHeads + 2 nKv) hd])");
  WEFT_CHECK(inv_freq.dim(0) == hd / 2, op, Arg{"invFreq", inv_freq}, " does not match ", Arg{"kCache", k_cache},
             " (expected invFreq [", hd / 2, "])");
  Tensor q = empty(DType::F32, {qkv.dim(0), n_heads * hd});
  run_qkv_rope(qkv, positions, inv_freq, k_cache, v_cache, token_seq, kv_block_table, q);
  return q;
}

namespace {
// SparQ's state beside caches [nBlocks, nKv, B, hd]: kT [nBlocks, nKv, hd, B] of the caches' dtype, vSum
// [nBlocks, nKv, hd] f32.
void check_sparq_state(const char* op, const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache) {
  need(op, {"kT", k_t}, 4, "[nBlocks, nKv, hd, B]", kAny);
  need(op, {"vSum", v_sum}, 3, "[nBlocks, nKv, hd]", kF32);
  const Shape want_t{k_cache.dim(0), k_cache.dim(1), k_cache.dim(3), k_cache.dim(2)};
  WEFT_CHECK(k_t.dtype == k_cache.dtype && k_t.shape == want_t, op, Arg{"kT", k_t}, " does not match ",
             Arg{"kCache", k_cache}, " (expected the same dtype and [nBlocks, nKv, hd, B])");
  const Shape want_sum{k_cache.dim(0), k_cache.dim(1), k_cache.dim(3)};
  WEFT_CHECK(v_sum.shape == want_sum, op, Arg{"vSum", v_sum}, " does not match ", Arg{"kCache", k_cache},
             " (expected [nBlocks, nKv, hd])");
  WEFT_CHECK(k_cache.dtype == DType::F32 || k_cache.dtype == DType::BF16, op, Arg{"kCache", k_cache},
             ": the SparQ kernels read f32 and bf16 caches only");
}
}  // namespace

void Backend::sparq_append(const Tensor& k_t, const Tensor& v_sum, const Tensor& k_cache, const Tensor& v_cache,
                           const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions) {
  const char* op = "sparqAppend";
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, token_seq.dim(0));
  check_sparq_state(op, k_t, v_sum, k_cache);
  run_sparq_append(k_t, v_sum, k_cache, v_cache, token_seq, kv_block_table, positions);
}

Tensor Backend::sparq_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_t,
                                const Tensor& v_sum, const Tensor& token_seq, const Tensor& kv_block_table,
                                const Tensor& positions, const Tensor& sparq_r, const Tensor& sparq_k,
                                int64_t n_heads, float scale) {
  const char* op = "sparqAttention";
  need(op, {"q", q}, 2, "[T, nHeads * hd]", kF32);
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, q.dim(0));
  check_sparq_state(op, k_t, v_sum, k_cache);
  need(op, {"sparqR", sparq_r}, 1, "[T]", kI32);
  need(op, {"sparqK", sparq_k}, 1, "[T]", kI32);
  WEFT_CHECK(sparq_r.dim(0) == q.dim(0) && sparq_k.dim(0) == q.dim(0), op, Arg{"sparqR", sparq_r}, " and ",
             Arg{"sparqK", sparq_k}, " must both be [", q.dim(0), "] (one per token)");
  check_query(op, q, k_cache, n_heads, scale);
  Tensor out = empty(DType::F32, q.shape);
  run_sparq_attention(q, k_cache, v_cache, k_t, v_sum, token_seq, kv_block_table, positions, sparq_r, sparq_k,
                      n_heads, scale, out);
  return out;
}

// The state tensors sage_attention takes (sage-state.h): shapes and dtypes against the cache and the table.
static void check_sage_state(const char* op, const SageState& st, const Tensor& k_cache,
                             const Tensor& kv_block_table, bool fp8) {
  need(op, {"kCache", k_cache}, 4, "[nBlocks, nKv, B, hd]", {DType::F32, DType::BF16, DType::FP8, DType::I8});
  const int64_t G = k_cache.dim(1), hd = k_cache.dim(3), S = kv_block_table.dim(0);
  need(op, {"sageHeader", st.header}, 2, "[slots, 2]", kI32);
  const int64_t slots = st.header.dim(0);
  WEFT_CHECK(st.header.dim(1) == 2, op, Arg{"sageHeader", st.header}, " must be [slots, 2]");
  need(op, {"sageMeans", st.means}, 3, "[slots, nKv, hd]", kF32);
  WEFT_CHECK(st.means.shape == Shape({slots, G, hd}), op, Arg{"sageMeans", st.means}, " must be [", slots, ", ", G,
             ", ", hd, "] for ", Arg{"kCache", k_cache});
  need(op, {"sageBlocks", st.blocks}, 3, "[slots, nbMax, blockBytes / 4]", kI32);
  const int64_t block_words = sage_state_block_bytes(G, hd, fp8) / 4;
  WEFT_CHECK(st.blocks.dim(0) == slots && st.blocks.dim(2) == block_words, op, Arg{"sageBlocks", st.blocks},
             " must be [", slots, ", nbMax, ", block_words, "] (", fp8 ? "fp8" : "f16", " P V, ",
             Arg{"kCache", k_cache}, ")");
  need(op, {"sageSlots", st.slots}, 2, "[S, 3]", kI32);
  WEFT_CHECK(st.slots.dim(0) == S && st.slots.dim(1) == 3, op, Arg{"sageSlots", st.slots}, " must be [", S,
             ", 3] (a slot, afresh, vouched positions per row of ", Arg{"kvBlockTable", kv_block_table}, ")");
}

Tensor Backend::sage_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                               const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads, float scale,
                               DType pv, const SageState* state, int64_t decode_rows) {
  const char* op = "sageAttention";
  WEFT_CHECK(pv == DType::F16 || pv == DType::FP8, op, "pv must be f16 or fp8 (got ", dtype_name(pv), ")");
  need(op, {"kvBlockTable", kv_block_table}, 2, "[S, maxBlocksPerSeq]", kI32);
  need(op, {"q", q}, 2, "[T, nHeads * hd]", kF32);
  check_decode_rows(op, decode_rows, q);
  if (state) check_sage_state(op, *state, k_cache, kv_block_table, pv == DType::FP8);
  const int64_t T = q.dim(0), D = decode_rows;
  if (T - D < kSageMinTokens || T == kv_block_table.dim(0)) {  // the exact path checks the rest
    if (state) run_sage_state_reset(*state);
    return attention(q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, D);
  }
  check_cache(op, k_cache, v_cache, token_seq, kv_block_table, positions, T);
  check_query(op, q, k_cache, n_heads, scale);
  WEFT_CHECK(kv_block_table.dim(0) > D, op, "decodeRows = ", D, " leaves no row of ",
             Arg{"kvBlockTable", kv_block_table},
             " for the rows after them: a decode row's sequence has other rows in the step");
  Tensor out = empty(DType::F32, q.shape);
  if (D > 0)
    run_attention(row_range(q, 0, D), k_cache, v_cache, row_range(token_seq, 0, D), kv_block_table,
                  row_range(positions, 0, D), n_heads, scale, true, row_range(out, 0, D));
  // the decode rows' sequences (one row each) have none among the rest: its scratch holds the others' alone
  const auto rest = [&](const Tensor& t) { return D ? row_range(t, D, T - D) : t; };
  run_sage_attention(rest(q), k_cache, v_cache, rest(token_seq), kv_block_table, rest(positions), n_heads, scale, pv,
                     state, kv_block_table.dim(0) - D, rest(out));
  return out;
}


void Backend::copy(const Tensor& dst, const Tensor& src) {
  WEFT_CHECK(!is_quantized(dst.dtype), "copy", Arg{"dst", dst}, " is a quantized weight (only matmuls read it)");
  WEFT_CHECK(dst.dtype != DType::FP8, "copy", Arg{"dst", dst}, " is a quantized KV cache (only the KV ops use it)");
  WEFT_CHECK(dst.dtype == src.dtype && dst.shape == src.shape, "copy", Arg{"dst", dst}, " and ", Arg{"src", src},
             " must have the same dtype and shape");
  run_copy(dst, src);
}

void Backend::feed_tokens(const Tensor& ids, const Tensor& from, const Tensor& src) {
  const char* op = "feedTokens";
  need(op, {"ids", ids}, 1, "[N]", kI32);
  need(op, {"from", from}, 1, "[N]", kI32);
  need(op, {"src", src}, 1, "[M]", kI32);
  WEFT_CHECK(from.dim(0) == ids.dim(0), op, Arg{"from", from}, " must have one entry per id of ", Arg{"ids", ids});
  if (ids.dim(0) > 0) run_feed_tokens(ids, from, src);
}

Tensor Backend::silu_mul(const Tensor& gate_up) {
  const char* op = "siluMul";
  need(op, {"gateUp", gate_up}, 2, "[T, 2F]", kF32);
  WEFT_CHECK(gate_up.dim(1) % 2 == 0, op, Arg{"gateUp", gate_up}, " has an odd number of columns");
  Tensor out = empty(DType::F32, {gate_up.dim(0), gate_up.dim(1) / 2});
  run_silu_mul(gate_up, out);
  return out;
}

Tensor Backend::silu_mul_matmul(const Tensor& gate_up, const Tensor& w) {
  const char* op = "siluMulMatmul";
  need(op, {"gateUp", gate_up}, 2, "[T, 2K]", kF32);
  need(op, {"w", w}, 2, "[N, K]", kWeight);
  WEFT_CHECK(2 * w.dim(1) == gate_up.dim(1), op, Arg{"gateUp", gate_up}, " and ", Arg{"w", w},
             " do not match (expected w [N, ", gate_up.dim(1) / 2, "] and an even number of gateUp columns)");
  Tensor out = empty(DType::F32, {gate_up.dim(0), w.dim(0)});
  run_silu_mul_matmul(gate_up, w, out);
  return out;
}

Tensor Backend::matmul_silu_mul(const Tensor& x, const Tensor& w) {
  const char* op = "matmulSiluMul";
  need(op, {"x", x}, 2, "[T, K]", kF32);
  need(op, {"w", w}, 2, "[2F, K]", kWeight);
  WEFT_CHECK(w.dim(1) == x.dim(1) && w.dim(0) % 2 == 0, op, Arg{"x", x}, " and ", Arg{"w", w},
             " do not match (expected w [2F, ", x.dim(1), "]: gate rows, then up rows)");
  Tensor out = empty(DType::F32, {x.dim(0), w.dim(0) / 2});
  run_matmul_silu_mul(x, w, out);
  return out;
}

Tensor Backend::slice_cols(const Tensor& x, int64_t start, int64_t end) {
  const char* op = "sliceCols";
  need(op, {"x", x}, 2, "[T, N]", kAny);
  WEFT_CHECK(0 <= start && start <= end && end <= x.dim(1), op, "columns [", start, ", ", end,
             ") are not within ", Arg{"x", x}, " (need 0 <= start <= end <= ", x.dim(1), ")");
  Tensor out = empty(x.dtype, {x.dim(0), end - start});
  run_slice_cols(x, start, out);
  return out;
}

Tensor Backend::concat_cols(const std::vector<Tensor>& xs) {
  const char* op = "concatCols";
  WEFT_CHECK(!xs.empty(), op, "xs must hold at least one tensor");
  int64_t cols = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    std::string name = "xs[" + std::to_string(i) + "]";
    need(op, {name.c_str(), xs[i]}, 2, "[T, Ni]", kAny);
    WEFT_CHECK(xs[i].dtype == xs[0].dtype && xs[i].dim(0) == xs[0].dim(0), op, Arg{name.c_str(), xs[i]},
               " does not match ", Arg{"xs[0]", xs[0]}, " (expected [", xs[0].dim(0), ", Ni] ",
               dtype_name(xs[0].dtype), ")");
    cols += xs[i].dim(1);
  }
  Tensor out = empty(xs[0].dtype, {xs[0].dim(0), cols});
  run_concat_cols(xs, out);
  return out;
}

Tensor Backend::gather_rows(const Tensor& x, const Tensor& rows) {
  const char* op = "gatherRows";
  need(op, {"x", x}, 2, "[T, N]", kAny);
  need(op, {"rows", rows}, 1, "[R]", kI32);
  Tensor out = empty(x.dtype, {rows.dim(0), x.dim(1)});
  run_gather_rows(x, rows, out);
  return out;
}

Backend::Routing Backend::route_top_k(const Tensor& logits, int64_t k, const Tensor* rows_in_use) {
  const char* op = "routeTopK";
  need(op, {"logits", logits}, 2, "[T, E]", kF32);
  if (rows_in_use) {
    need(op, {"rowsInUse", *rows_in_use}, 1, "[1]", kI32);
    WEFT_CHECK(rows_in_use->dim(0) == 1, op, Arg{"rowsInUse", *rows_in_use}, " must hold one value");
  }
  const int64_t E = logits.dim(1);
  WEFT_CHECK(k >= 1 && k <= E, op, "k = ", k, " must be in [1, ", E, "] (the experts of ", Arg{"logits", logits},
             ")");
  Routing out{empty(DType::I32, {logits.dim(0), k}), empty(DType::F32, {logits.dim(0), k})};
  run_route_top_k(logits, rows_in_use, out);
  return out;
}

Tensor Backend::expert_matmul(const Tensor& x, const Tensor& w, const Tensor& experts, int64_t expert_start) {
  return checked_expert_matmul("expertMatmul", x, w, experts, expert_start, false);
}

Tensor Backend::silu_mul_expert_matmul(const Tensor& gate_up, const Tensor& w, const Tensor& experts,
                                       int64_t expert_start) {
  return checked_expert_matmul("siluMulExpertMatmul", gate_up, w, experts, expert_start, true);
}

Tensor Backend::checked_expert_matmul(const char* op, const Tensor& x, const Tensor& w, const Tensor& experts,
                                      int64_t expert_start, bool gated) {
  need(op, {gated ? "gateUp" : "x", x}, 2, gated ? "[X, 2K]" : "[X, K]", kF32);
  need(op, {"w", w}, 3, "[El, N, K]", kWeight);
  need(op, {"experts", experts}, 2, "[T, k]", kI32);
  const int64_t T = experts.dim(0), k = experts.dim(1);
  const Arg xa{gated ? "gateUp" : "x", x};
  WEFT_CHECK(x.dim(0) == T || x.dim(0) == T * k, op, xa, " must have ", T, " rows (one per token) or ", T * k,
             " (one per pair) to match ", Arg{"experts", experts});
  WEFT_CHECK(w.dim(2) * (gated ? 2 : 1) == x.dim(1), op, xa, " and ", Arg{"w", w},
             " do not match (expected w [El, N, ", gated ? x.dim(1) / 2 : x.dim(1), "]",
             gated ? " and an even number of gateUp columns)" : ")");
  WEFT_CHECK(expert_start >= 0, op, "expertStart = ", expert_start, " must be >= 0");
  Tensor out = empty(DType::F32, {T * k, w.dim(1)});
  run_expert_matmul(x, w, experts, expert_start, gated, out);
  return out;
}

std::vector<std::vector<int32_t>> Backend::pairs_by_expert(const char* op, const int32_t* ids, int64_t T, int64_t k,
                                                           int64_t expert_start, int64_t n_held) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < j; ++i)
        WEFT_CHECK(ids[t * k + i] != ids[t * k + j], op, "experts[", t, "] chooses expert ", ids[t * k + j],
                   " twice (a token's experts must be distinct)");
  std::vector<std::vector<int32_t>> pairs(static_cast<size_t>(n_held));
  for (int64_t p = 0; p < T * k; ++p) {
    const int64_t local = ids[p] - expert_start;
    if (local >= 0 && local < n_held) pairs[local].push_back(static_cast<int32_t>(p));
  }
  return pairs;
}

Tensor Backend::combine_experts(const Tensor& y, const Tensor& weights) {
  const char* op = "combineExperts";
  need(op, {"y", y}, 2, "[T * k, N]", kF32);
  need(op, {"weights", weights}, 2, "[T, k]", kF32);
  WEFT_CHECK(y.dim(0) == weights.dim(0) * weights.dim(1), op, Arg{"y", y}, " must have ",
             weights.dim(0) * weights.dim(1), " rows to match ", Arg{"weights", weights});
  Tensor out = empty(DType::F32, {weights.dim(0), y.dim(1)});
  run_combine_experts(y, weights, out);
  return out;
}

Tensor Backend::log_softmax(const Tensor& logits) {
  need("logSoftmax", {"logits", logits}, 2, "[R, V]", kF32);
  Tensor out = empty(DType::F32, logits.shape);
  run_log_softmax(logits, out);
  return out;
}

void Backend::logprobs(const Tensor& logits, const int32_t* ids, size_t n_ids, float* out) {
  const char* op = "logprobs";
  no_capture(op, "it returns host values; use logSoftmax and gatherRows");
  need(op, {"logits", logits}, 2, "[R, V]", kF32);
  int64_t R = logits.dim(0), V = logits.dim(1);
  WEFT_CHECK(static_cast<int64_t>(n_ids) == R, op, "ids has length ", n_ids, " but ", Arg{"logits", logits},
             " has ", R, " rows");
  for (int64_t r = 0; r < R; ++r)
    WEFT_CHECK(ids[r] >= 0 && ids[r] < V, op, "ids[", r, "] = ", ids[r], " is out of range for ",
               Arg{"logits", logits}, " (need 0 <= id < ", V, ")");
  run_logprobs(logits, ids, out);
}

Tensor Backend::top_logprobs(const Tensor& logits, const Tensor& rows, const Tensor& ids, int64_t k) {
  const char* op = "topLogprobs";
  need(op, {"logits", logits}, 2, "[R, V]", kF32);
  need(op, {"rows", rows}, 1, "[Q]", kI32);
  need(op, {"ids", ids}, 1, "[R]", kI32);
  WEFT_CHECK(ids.dim(0) == logits.dim(0), op, Arg{"ids", ids}, " must have one id per row of ", Arg{"logits", logits});
  WEFT_CHECK(k >= 0 && k <= 20, op, "k = ", k, " must be in [0, 20]");
  WEFT_CHECK(logits.dim(1) <= (int64_t{1} << 24), op, Arg{"logits", logits},
             " is wider than 2^24 columns: its ids would not be exact as f32");
  Tensor out = empty(DType::F32, {rows.dim(0), 1 + 2 * k});
  run_top_logprobs(logits, rows, ids, k, out);
  return out;
}

void Backend::sample(const Tensor& logits, const SampleArgs& a, size_t n_rows, int32_t* out) {
  const char* op = "sample";
  no_capture(op, "it returns host values; use sampleTensor");
  need(op, {"logits", logits}, 2, "[R, V]", kF32);
  int64_t R = logits.dim(0);
  WEFT_CHECK(static_cast<int64_t>(n_rows) == R, op, "temperature, topK, topP and uniform must each have length ", R,
             " (the rows of ", Arg{"logits", logits}, ")");
  WEFT_CHECK(logits.dim(1) > 0 || R == 0, op, Arg{"logits", logits}, " has no columns to sample from");
  check_sample_args(op, a, R);
  run_sample(logits, a, out);
}

void Backend::check_sample_args(const char* op, const SampleArgs& a, int64_t R) {
  for (int64_t r = 0; r < R; ++r) {
    WEFT_CHECK(!std::isnan(a.temperature[r]), op, "temperature[", r, "] is NaN");
    WEFT_CHECK(a.top_k[r] >= 0, op, "topK[", r, "] = ", a.top_k[r], " must be >= 0 (0 keeps all)");
    WEFT_CHECK(a.top_p[r] >= 0 && a.top_p[r] <= 1, op, "topP[", r, "] = ", a.top_p[r], " must be in [0, 1]");
    WEFT_CHECK(a.uniform[r] >= 0 && a.uniform[r] <= 1, op, "uniform[", r, "] = ", a.uniform[r],
               " must be in [0, 1]");
  }
}

Tensor Backend::sample_tensor(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                              const Tensor& top_p, const Tensor& uniform) {
  const char* op = "sampleTensor";
  need(op, {"logits", logits}, 2, "[R, V]", kF32);
  int64_t R = logits.dim(0);
  need(op, {"temperature", temperature}, 1, "[R]", kF32);
  need(op, {"topK", top_k}, 1, "[R]", kI32);
  need(op, {"topP", top_p}, 1, "[R]", kF32);
  need(op, {"uniform", uniform}, 1, "[R]", kF32);
  WEFT_CHECK(temperature.dim(0) == R && top_k.dim(0) == R && top_p.dim(0) == R && uniform.dim(0) == R, op,
             "temperature, topK, topP and uniform must each be [", R, "] (the rows of ", Arg{"logits", logits},
             ")");
  WEFT_CHECK(logits.dim(1) > 0 || R == 0, op, Arg{"logits", logits}, " has no columns to sample from");
  Tensor out = empty(DType::I32, {R});
  run_sample_tensor(logits, temperature, top_k, top_p, uniform, out);
  return out;
}

}  // namespace weft
