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

// x [T, K] f32 (gated: [T, 2K], gate | up, the value silu_times(gate, up)) -> dst [2T, K] bf16: row t the nearest
// bf16 of each value, row T + t the nearest bf16 of what that left (|lo| <= 2^-9 |v|, so hi + lo is v to ~2^-17).
__global__ void split_bf16_kernel(const float* __restrict__ x, __nv_bfloat16* __restrict__ dst, int T, int K,
                                  bool gated) {
  const size_t n = static_cast<size_t>(T) * K, stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const size_t t = i / K, k = i % K;
    const float v = gated ? silu_times(x[t * 2 * K + k], x[t * 2 * K + K + k]) : x[i];
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    dst[i] = hi;
    dst[n + i] = __float2bfloat16_rn(v - __bfloat162float(hi));
  }
}

// y [n] = products [n] + products [n + i]: the hi rows' and the lo rows' products, rows in the same order.
__global__ void sum_halves_kernel(const float* __restrict__ products, float* __restrict__ y, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    y[i] = products[i] + products[n + i];
}

}  // namespace

Gemm::~Gemm() {
  if (handle_) cublas::api().destroy(handle_);
  if (workspace_) cudaFree(workspace_);
  if (cast_buf_) cudaFree(cast_buf_);
  if (split_out_) cudaFree(split_out_);
  for (void* p : retired_) cudaFree(p);
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

void Gemm::run(const float* x, const void* x_half, const void* w, DType dt, float* y, int T, int N, int K, int ldy) {
  WEFT_CHECK(ldy == 0 || ldy >= N, "matmul", "rows of y ", ldy, " floats apart cannot hold N = ", N);
  if (ldy == 0) ldy = N;
  ensure_cublas();
  const cublas::Api& a = cublas::api();
  const float alpha = 1.f, beta = 0.f;
  if (dt == DType::F32) {
    WEFT_CHECK(!x_half, "matmul", "x in a 16-bit dtype cannot meet f32 weights");
    check_cublas(a.gemm_ex(handle_, cublas::OP_T, cublas::OP_N, N, T, K, &alpha, w, CUDA_R_32F, K, x, CUDA_R_32F, K,
                           &beta, y, CUDA_R_32F, ldy, cublas::COMPUTE_32F_PEDANTIC, cublas::GEMM_DEFAULT),
                 "cublasGemmEx");
    return;
  }
  const cudaDataType type = dt == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  if (!x_half) x_half = cast(x, dt, T, K);
  check_cublas(a.gemm_ex(handle_, cublas::OP_T, cublas::OP_N, N, T, K, &alpha, w, type, K, x_half, type, K, &beta, y,
                         CUDA_R_32F, ldy, cublas::COMPUTE_32F, cublas::GEMM_DEFAULT),
               "cublasGemmEx");
}

void Gemm::grow(void** buf, size_t* bytes, size_t need, const char* what) {
  if (need <= *bytes) return;
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  check_cuda(st_, cudaStreamIsCapturing(stream_, &cs), "matmul");
  WEFT_CHECK(cs == cudaStreamCaptureStatusNone, "matmul", what, " needs ", need,
             " bytes while the stream is being captured; run it once before capture");
  check_cuda(st_, cudaStreamSynchronize(stream_), "matmul");
  // A decode graph captured with the old buffer reads it at every replay: it stays until the Gemm goes. Doubling
  // at least bounds what is kept so to the size of the last buffer.
  if (*buf) retired_.push_back(*buf);
  const size_t grown = std::max(need, 2 * *bytes);
  *buf = nullptr;
  *bytes = 0;
  check_cuda(st_, cudaMalloc(buf, grown), "matmul", (std::string(" (") + what + ")").c_str());
  *bytes = grown;
}

const void* Gemm::cast(const float* x, DType dt, int T, int K) {
  const size_t n = static_cast<size_t>(T) * K;
  grow(&cast_buf_, &cast_bytes_, n * 2, "the cast buffer of x");
  const int blocks = static_cast<int>(std::min<size_t>((n + 255) / 256, static_cast<size_t>(sms_) * 8));
  if (dt == DType::BF16)
    cast_kernel<<<blocks, 256, 0, stream_>>>(x, static_cast<__nv_bfloat16*>(cast_buf_), n);
  else
    cast_kernel<<<blocks, 256, 0, stream_>>>(x, static_cast<__half*>(cast_buf_), n);
  check_cuda(st_, cudaGetLastError(), "matmul");
  return cast_buf_;
}

void Gemm::run_split(const float* x, const void* w, float* y, int T, int N, int K, bool gated) {
  ensure_cublas();
  const size_t xn = static_cast<size_t>(T) * K, yn = static_cast<size_t>(T) * N;
  grow(&cast_buf_, &cast_bytes_, 2 * xn * 2, "the split buffer of x");
  grow(&split_out_, &split_out_bytes_, 2 * yn * 4, "the split products");
  const auto blocks = [&](size_t n) {
    return static_cast<int>(std::min<size_t>((n + 255) / 256, static_cast<size_t>(sms_) * 8));
  };
  split_bf16_kernel<<<blocks(xn), 256, 0, stream_>>>(x, static_cast<__nv_bfloat16*>(cast_buf_), T, K, gated);
  check_cuda(st_, cudaGetLastError(), "matmul");
  const float alpha = 1.f, beta = 0.f;
  check_cublas(cublas::api().gemm_ex(handle_, cublas::OP_T, cublas::OP_N, N, 2 * T, K, &alpha, w, CUDA_R_16BF, K,
                                     cast_buf_, CUDA_R_16BF, K, &beta, split_out_, CUDA_R_32F, N, cublas::COMPUTE_32F,
                                     cublas::GEMM_DEFAULT),
               "cublasGemmEx");
  sum_halves_kernel<<<blocks(yn), 256, 0, stream_>>>(static_cast<const float*>(split_out_), y, yn);
  check_cuda(st_, cudaGetLastError(), "matmul");
}

}  // namespace weft::cuda
