// Gemm (gemm.cuh): cuBLAS GemmEx in a column-major view: y^T [N, T] = w^T' [N, K] x^T [K, T], i.e. C = op(A) B with
// A = w (col-major [K, N], op T, lda K), B = x (col-major [K, T], op N, ldb K), C = y (col-major [N, T], ldc N).
#include "cuda/gemm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/common.cuh"  // from_f32
#include "error.h"

namespace weft::cuda {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;

// x [n] f32 -> dst [n] bf16/f16.
template <typename WT>
__global__ void cast_kernel(const float* __restrict__ x, WT* __restrict__ dst, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    dst[i] = from_f32<WT>(x[i]);
}

}  // namespace

Gemm::~Gemm() {
  if (handle_) cublas::api().destroy(handle_);
  if (workspace_) cudaFree(workspace_);
  if (cast_buf_) cudaFree(cast_buf_);
  for (void* p : retired_casts_) cudaFree(p);
}

void Gemm::check_cublas(cublas::Status status, const char* call) {
  if (status == cublas::kSuccess) return;
  const cudaError_t e = cudaGetLastError();
  if (is_sticky(e)) fail_cuda(st_, "matmul", e, std::string(" (in ") + call + ": " + cublas::status_name(status) + ")");
  WEFT_FAIL("matmul", call, " failed: ", cublas::status_name(status));
}

void Gemm::ensure_cublas() {
  if (handle_) return;
  const cublas::Api& a = cublas::api();
  int dev = 0;
  check_cuda(st_, cudaGetDevice(&dev), "matmul");
  check_cuda(st_, cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev), "matmul");
  check_cublas(a.create(&handle_), "cublasCreate");
  check_cuda(st_, cudaMalloc(&workspace_, kWorkspaceBytes), "matmul", " (the cuBLAS workspace)");
  check_cublas(a.set_workspace(handle_, workspace_, kWorkspaceBytes), "cublasSetWorkspace");
  check_cublas(a.set_stream(handle_, stream_), "cublasSetStream");
}

void Gemm::run(const float* x, const void* x_half, const void* w, DType dt, float* y, int T, int N, int K) {
  ensure_cublas();
  const cublas::Api& a = cublas::api();
  const float alpha = 1.f, beta = 0.f;
  if (dt == DType::F32) {
    WEFT_CHECK(!x_half, "matmul", "x in a 16-bit dtype cannot meet f32 weights");
    check_cublas(a.gemm_ex(handle_, cublas::OP_T, cublas::OP_N, N, T, K, &alpha, w, CUDA_R_32F, K, x, CUDA_R_32F, K,
                           &beta, y, CUDA_R_32F, N, cublas::COMPUTE_32F_PEDANTIC, cublas::GEMM_DEFAULT),
                 "cublasGemmEx");
    return;
  }
  const cudaDataType type = dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  if (!x_half) x_half = cast(x, dt, T, K);
  check_cublas(a.gemm_ex(handle_, cublas::OP_T, cublas::OP_N, N, T, K, &alpha, w, type, K, x_half, type, K, &beta, y,
                         CUDA_R_32F, N, cublas::COMPUTE_32F, cublas::GEMM_DEFAULT),
               "cublasGemmEx");
}

const void* Gemm::cast(const float* x, DType dt, int T, int K) {
  const size_t n = static_cast<size_t>(T) * K;
  const size_t need = n * 2;
  if (need > cast_bytes_) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    check_cuda(st_, cudaStreamIsCapturing(stream_, &cs), "matmul");
    WEFT_CHECK(cs == cudaStreamCaptureStatusNone, "matmul",
               "x [", T, ", ", K, "] needs a larger cast buffer while the stream is being captured; run it once before capture");
    check_cuda(st_, cudaStreamSynchronize(stream_), "matmul");
    // A decode graph captured above 8 rows reads the old buffer at every replay: it stays until the Gemm goes.
    // Doubling at least bounds what is kept so to the size of the last buffer.
    if (cast_buf_) retired_casts_.push_back(cast_buf_);
    const size_t bytes = std::max(need, 2 * cast_bytes_);
    cast_buf_ = nullptr;
    cast_bytes_ = 0;
    check_cuda(st_, cudaMalloc(&cast_buf_, bytes), "matmul", " (the cast buffer of x)");
    cast_bytes_ = bytes;
  }
  const int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, static_cast<size_t>(sms_) * 8));
  if (dt == DType::BF16)
    cast_kernel<<<blocks, 256, 0, stream_>>>(x, static_cast<__nv_bfloat16*>(cast_buf_), n);
  else
    cast_kernel<<<blocks, 256, 0, stream_>>>(x, static_cast<__half*>(cast_buf_), n);
  check_cuda(st_, cudaGetLastError(), "matmul");
  return cast_buf_;
}

}  // namespace weft::cuda
