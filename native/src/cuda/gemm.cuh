// weft::cuda::Gemm: y [T, N] f32 = x [T, K] f32 @ w [N, K]^T for prefill (T > 8) through cuBLAS, loaded at run
// time (cublas-loader.h). Not capturable when it must grow its cast buffer. Throws weft::Error.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cublas-loader.h"
#include "cuda/device.h"
#include "tensor.h"  // weft::DType

namespace weft::cuda {

class Gemm {  // one per engine; owns the cuBLAS handle, its workspace and the cast buffer
 public:
  Gemm(DeviceState* st, cudaStream_t stream) : st_(st), stream_(stream) {}  // st may be null (see fail_cuda)
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  // bf16/f16 weights: x is cast to the weight dtype, then a tensor-core GEMM with fp32 output and compute;
  // f32 weights: a full-fp32 GEMM (pedantic, no TF32).
  void run(const float* x, const void* w, DType w_dtype, float* y, int T, int N, int K);

 private:
  void ensure_cublas();
  // A failed cuBLAS call: through fail_cuda when the CUDA context is gone, else "matmul: <call> failed: <status>".
  void check_cublas(cublas::Status status, const char* call);

  DeviceState* st_;
  cudaStream_t stream_;
  int sms_ = 0;
  cublas::Handle handle_ = nullptr;
  void* workspace_ = nullptr;
  void* cast_buf_ = nullptr;  // x cast to bf16/f16
  size_t cast_bytes_ = 0;
};

}  // namespace weft::cuda
