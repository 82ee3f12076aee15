// weft::cuda::Gemm: y [T, N] f32 = x [T, K] f32 @ w [N, K]^T for prefill (T > 8) through cuBLAS, loaded at run
// time (cublas-loader.h). Not capturable when it must grow its cast buffer. Throws weft::Error.
// weft::cuda::HalfCopies: prefill GEMM inputs that their producer also wrote in the weight dtype (no cast).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <unordered_map>
#include <vector>

#include "cuda/cublas-loader.h"
#include "cuda/device.h"
#include "tensor.h"  // weft::DType, weft::Tensor

namespace weft::cuda {

class Gemm {  // one per engine; owns the cuBLAS handle, its workspace and the cast buffer
 public:
  Gemm(DeviceState* st, cudaStream_t stream) : st_(st), stream_(stream) {}  // st may be null (see fail_cuda)
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  // bf16/f16 weights: x is cast to the weight dtype (unless x_half, x already in it, is given), then a
  // tensor-core GEMM with fp32 output and compute; f32 weights: a full-fp32 GEMM (pedantic, no TF32; x_half null).
  // ldy: floats from one row of y to the next (0: N), so that runs of w's rows fill column ranges of one y.
  void run(const float* x, const void* x_half, const void* w, DType w_dtype, float* y, int T, int N, int K, int ldy = 0);
  // Decode batches on bf16 weights (Matmul routes 3..8 tokens here where split_pays): x (gated: [T, 2K], silu(gate) *
  // up as siluMul forms it) split into bf16 hi + lo rows, one GEMM over the 2T rows, y = hi + lo products. The
  // split holds x to ~2^-17 relative, so the GEMV's 1e-5 holds where a single bf16 rounding would give 2e-3. Reads
  // the weights once, as the GEMV; capturable once a first run has sized its buffers.
  void run_split(const float* x, const void* w, float* y, int T, int N, int K, bool gated);

 private:
  void ensure_cublas();
  // x [T, K] f32 cast to dt (bf16/f16) into the cast buffer, grown first if needed (a sync; refused while capturing).
  const void* cast(const float* x, DType dt, int T, int K);
  // Grows *buf to hold `need` bytes (a sync; refused while capturing: `what` names it), keeping the old buffer for
  // the graphs captured with it.
  void grow(void** buf, size_t* bytes, size_t need, const char* what);
  // A failed cuBLAS call: through fail_cuda when the CUDA context is gone, else "matmul: <call> failed: <status>".
  void check_cublas(cublas::Status status, const char* call);

  DeviceState* st_;
  cudaStream_t stream_;
  int sms_ = 0;
  cublas::Handle handle_ = nullptr;
  void* workspace_ = nullptr;
  void* cast_buf_ = nullptr;  // x cast to bf16/f16
  size_t cast_bytes_ = 0;
  void* split_out_ = nullptr;  // run_split's products of the hi and lo rows, [2T, N] f32
  size_t split_out_bytes_ = 0;
  std::vector<void*> retired_;  // buffers outgrown, kept for the graphs captured with them
};

// Prefill matmul inputs in the weight dtype, written by the kernel that writes the f32 tensor (the norms) so
// that the matmul reading it skips the cast pass: an f32 write, an f32 read and a launch fewer per input.
// Same bytes as the cast (round to nearest), so the same products. Keyed by the f32 tensor's buffer, held
// until the next step (step memory is not reused before); an in-place write to that buffer drops its copy.
class HalfCopies {
 public:
  const Tensor& add(const Tensor& x, Tensor half) {
    Entry& entry = entries_[x.buffer.get()];
    entry = Entry{x.buffer, std::move(half)};
    return entry.half;
  }
  // x's copy in `dtype`, or null.
  const Tensor* find(const Tensor& x, DType dtype) const {
    auto it = entries_.find(x.buffer.get());
    return it != entries_.end() && it->second.half.dtype == dtype ? &it->second.half : nullptr;
  }
  // x's copy in whichever dtype it has one, or null.
  const Tensor* any(const Tensor& x) const {
    auto it = entries_.find(x.buffer.get());
    return it != entries_.end() ? &it->second.half : nullptr;
  }
  void drop(const Tensor& x) { entries_.erase(x.buffer.get()); }
  void clear() { entries_.clear(); }

 private:
  struct Entry {
    std::shared_ptr<Buffer> x;  // keeps the key's address from being reused while the entry lives
    Tensor half;                // x [T, K] f16|bf16
  };
  std::unordered_map<const Buffer*, Entry> entries_;
};

}  // namespace weft::cuda
