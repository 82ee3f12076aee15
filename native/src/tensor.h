// weft::Tensor: dtype, shape and a backend-owned buffer.
//
// The buffer is opaque to everything but its backend: host memory for the CPU backend, device memory for the
// CUDA backend later. Copying a Tensor shares its buffer (a handle, not a deep copy); ops allocate new outputs
// through Backend::empty and never resize an existing buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace weft {

// I8 and I4 are quantized weights only (Backend::upload_quantized): int8 values, or int4 codes packed two per
// byte along K (low nibble the even column, code = value + 8); they carry their scales (Tensor::scales).
// FP8 (e4m3) and I8 are also the 1-byte KV caches, which carry f32 scales, one per cache row (kv-quant.h).
enum class DType : uint8_t { F32, F16, BF16, I32, I8, I4, FP8 };

// Bytes per element; I4 packs two elements in a byte (Tensor::nbytes counts it).
inline size_t dtype_size(DType d) {
  return d == DType::F16 || d == DType::BF16 ? 2 : d == DType::I8 || d == DType::I4 || d == DType::FP8 ? 1 : 4;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::I8: return "i8";
    case DType::I4: return "i4";
    case DType::FP8: return "fp8";
  }
  return "?";
}

inline bool parse_dtype(std::string_view s, DType* out) {
  if (s == "f32") *out = DType::F32;
  else if (s == "f16") *out = DType::F16;
  else if (s == "bf16") *out = DType::BF16;
  else if (s == "i32") *out = DType::I32;
  else if (s == "fp8") *out = DType::FP8;  // KV caches only (Backend::zeros), like "i8"
  else if (s == "i8") *out = DType::I8;
  else return false;
  return true;
}

inline bool is_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }
inline bool is_quantized(DType d) { return d == DType::I8 || d == DType::I4; }

using Shape = std::vector<int64_t>;

inline int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

inline std::ostream& operator<<(std::ostream& os, const Shape& shape) {
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  return os << ']';
}

// Step generations stamped on a buffer: kPersistent lives until its last handle goes; a step number n (>= 1)
// is valid until the backend's next begin_step(); kGraphOwned belongs to a captured graph's memory and lives
// as long as the tensor (or the graph) does.
constexpr uint64_t kPersistent = 0;
constexpr uint64_t kGraphOwned = ~uint64_t{0};

// Memory owned by a backend. data() is a host pointer for the CPU backend, a device pointer for CUDA.
class Buffer {
 public:
  explicit Buffer(size_t bytes, uint64_t step = kPersistent) : bytes_(bytes), step_(step) {}
  virtual ~Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  virtual void* data() const = 0;
  size_t bytes() const { return bytes_; }
  uint64_t step() const { return step_; }
  // Step memory's place in the order of allocation (Backend::empty numbers it): a layer's release
  // (Backend::release_layer) names what it freed as a range of these. 0 for persistent memory.
  uint64_t serial() const { return serial_; }
  void set_serial(uint64_t serial) { serial_ = serial; }
  // Whether dropping the last handle frees memory. A step arena's buffers do not (the next step reuses the
  // arena whatever the handles do), so the binding does not report them to V8 as external memory: if it did,
  // a long prefill's gigabytes of intermediates would set off a garbage collection every few ops.
  virtual bool freed_on_release() const { return true; }

 private:
  size_t bytes_;
  uint64_t step_;
  uint64_t serial_ = 0;
};

struct Tensor {
  DType dtype = DType::F32;
  Shape shape;
  std::shared_ptr<Buffer> buffer;
  // Quantized weights (I8, I4) only: [..., N, K / group] bf16, the scale of each group of `group` columns of
  // a row (value = q * scale); a persistent tensor of the same backend.
  std::shared_ptr<const Tensor> scales;
  // A quantized weight held in tiles (quant-tiles.h), codes and scales alike: the CUDA backend's layout for int4
  // where its kernels take the shape (backend.h upload_quantized); the CPU's weights are row-major.
  bool quant_tiles = false;

  int64_t numel() const { return weft::numel(shape); }
  // A 1-byte KV cache (FP8 or I8 codes with f32 scales [nBlocks, nKv, B]; kv-quant.h), not a quantized weight.
  bool is_kv_quantized() const {
    return (dtype == DType::FP8 || dtype == DType::I8) && scales && scales->dtype == DType::F32;
  }
  // Its scales [nBlocks, nKv, B] f32 when it is one, else null (the KV kernels take both kinds of cache).
  float* kv_scales() const { return is_kv_quantized() ? scales->data<float>() : nullptr; }
  size_t nbytes() const {
    return dtype == DType::I4 ? static_cast<size_t>(numel() + 1) / 2 : static_cast<size_t>(numel()) * dtype_size(dtype);
  }
  // Columns per scale of a quantized weight (K / scales' last dimension).
  int64_t group() const { return shape.back() / scales->shape.back(); }
  int64_t dim(size_t i) const { return shape[i]; }
  size_t rank() const { return shape.size(); }
  // Typed view of the buffer; only the owning backend dereferences it.
  template <typename T>
  T* data() const { return static_cast<T*>(buffer->data()); }
};

// The memory of rows [first, first + count) of another buffer: what row_range views, kept alive with it.
class RowsBuffer final : public Buffer {
 public:
  RowsBuffer(std::shared_ptr<Buffer> whole, size_t offset, size_t bytes)
      : Buffer(bytes, whole->step()), whole_(std::move(whole)), offset_(offset) {}
  void* data() const override { return static_cast<unsigned char*>(whole_->data()) + offset_; }
  bool freed_on_release() const override { return false; }

 private:
  std::shared_ptr<Buffer> whole_;
  size_t offset_;
};

// Rows [first, first + count) of a tensor whose dimension 0 counts rows of whole elements (f32, i32, ...: not
// packed int4, not carrying scales), as a tensor over the same memory: how a backend runs one op's rows in two
// launches. The caller keeps first + count within dim 0.
inline Tensor row_range(const Tensor& t, int64_t first, int64_t count) {
  const size_t row_bytes = static_cast<size_t>(t.dim(0) ? t.numel() / t.dim(0) : 0) * dtype_size(t.dtype);
  Tensor rows;
  rows.dtype = t.dtype;
  rows.shape = t.shape;
  rows.shape[0] = count;
  rows.buffer = std::make_shared<RowsBuffer>(t.buffer, row_bytes * static_cast<size_t>(first),
                                             row_bytes * static_cast<size_t>(count));
  return rows;
}

// "[3, 64] f32", the form every error message uses.
inline std::ostream& operator<<(std::ostream& os, const Tensor& t) {
  return os << t.shape << ' ' << dtype_name(t.dtype);
}

}  // namespace weft
