// Matmul::run (matmul.cuh): the argument checks, then the GEMV for T <= 8 tokens (bf16 where split_pays: cuBLAS on
// split x) or the cuBLAS GEMM above.
#include "cuda/matmul.cuh"

#include "error.h"

namespace weft::cuda {

void Matmul::run(const float* x, const void* w, DType w_dtype, float* y, int64_t T, int64_t N, int64_t K, bool gated,
                 const void* x_half) {
  WEFT_CHECK(!gated || fuses_silu_mul(T, K, w_dtype), "matmul", "the fused siluMul GEMV takes 1..", kGemvMaxTokens,
             " tokens and K a multiple of the weight vector, not T = ", T, ", K = ", K);
  WEFT_CHECK(w_dtype == DType::F32 || w_dtype == DType::F16 || w_dtype == DType::BF16, "matmul",
             "w dtype ", dtype_name(w_dtype), " is not a float type");
  WEFT_CHECK(T >= 0 && N >= 0 && K >= 0 && T <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "matmul",
             "shape x [", T, ", ", K, "] w [", N, ", ", K, "] is out of range");
  if (T == 0 || N == 0) return;
  if (K == 0) {
    check_cuda(st_, cudaMemsetAsync(y, 0, static_cast<size_t>(T) * N * sizeof(float), stream_), "matmul");
    return;
  }
  WEFT_CHECK(x || (x_half && T > kGemvMaxTokens), "matmul", "x [", T, ", ", K, "] is missing in f32 (the GEMV reads it)");
  const int t = static_cast<int>(T), n = static_cast<int>(N), k = static_cast<int>(K);
  if (w_dtype == DType::BF16 && split_pays(T, N, K)) gemm_.run_split(x, w, y, t, n, k, gated);
  else if (T <= kGemvMaxTokens) gemv_.run(x, w, w_dtype, y, t, n, k, gated);
  else gemm_.run(x, x_half, w, w_dtype, y, t, n, k);
}

}  // namespace weft::cuda
