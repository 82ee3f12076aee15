// The quantized GEMV's entry points and dequantization (gemv-quant.cuh).
//   - int4 at 1..16 tokens, int8 at 4..16, groups of whole 16-byte vectors (16 int8 or 32 int4 columns): quant_gemv_mma
//     (gemv-quant-mma.cu), the weights dequantized to f16 in registers for tensor cores; the kernels below take
//     every other shape (x too long for its shared memory, misaligned pointers, other groups).
//   - One int8 or int4 token (decode at batch 1): gemv_one_token (gemv-one-token.cu): int4 in groups of 128 on tensor
//     cores with one block a SM (gemv-one-token-mma.cu), int8 and other int4 groups with the weights straight into
//     registers (groups a power of two of 16-byte vectors, or the row).
//   - Otherwise gemv.cu's vector kernel (Gemv::run_quant): each 16-byte vector (16 int8 or 32 int4 weights, inside
//     one group) is unpacked with exponent tricks, its products summed in fp32 and multiplied by the group's scale.
//     It takes up to Gemv::kMaxTokens tokens; 9..16 tokens run as two halves, each reading the weights once (at 16
//     tokens on H200 two passes cost less than one pass of a 16-token kernel: bench/RESULTS.md).
//   - Fallback (K or the group not a multiple of the vector's columns, misaligned pointers, tiles (quant-tiles.h) that
//     the tensor-core kernels refuse): one warp per row, scalar loads, the value formed as the CPU forms it.
//   - Longer steps dequantize into a bf16 matrix for the cuBLAS GEMM (dequantize_bf16).
#include "cuda/gemv-quant.cuh"

#include <cuda_bf16.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/gemv-one-token.cuh"
#include "cuda/gemv-quant-mma.cuh"
#include "error.h"
#include "quant-tiles.h"

namespace weft::cuda {
namespace {

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }

__device__ __forceinline__ float quant_value(const QuantMatrix& w, size_t row, int K, int k) {
  const size_t n_groups = K / w.group;
  const float scale = bf16_bits_to_f32(w.tiles ? w.scales[tile_scale_index(row, k / w.group, n_groups)]
                                               : w.scales[row * n_groups + k / w.group]);
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  if (w.dtype == DType::I8)
    return static_cast<float>(static_cast<int8_t>(w.tiles ? q[tile_code_offset(row, k, K)] : q[row * K + k])) * scale;
  const uint8_t b = w.tiles ? q[tile_code_offset(row, k / 2, K / 2)] : q[row * (K / 2) + k / 2];
  return static_cast<float>(static_cast<int>((k & 1) ? b >> 4 : b & 0xf) - 8) * scale;
}

// Fallback: one warp per row, all tokens, scalar loads (the value as the CPU forms it: q * scale, then FMA).
__global__ void quant_gemv_scalar_kernel(const float* __restrict__ x, const QuantMatrix w, float* __restrict__ y,
                                         int T, int N, int K, int gated) {
  pdl_trigger();
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= N) return;
  for (int t = 0; t < T; ++t) {
    float s = 0.f;
    const float* xr = x + static_cast<size_t>(t) * (gated ? 2 * K : K);
    for (int k = lane; k < K; k += 32) s = fmaf(quant_value(w, row, K, k), gated ? silu_times(xr[k], xr[K + k]) : xr[k], s);
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) y[static_cast<size_t>(t) * N + row] = s;
  }
}

// Expert fallback: one warp per (row, pair), grid (ceil(N / 8), n_pairs); pairs of experts not held are skipped.
__global__ void quant_expert_gemv_scalar_kernel(const float* __restrict__ x, const QuantMatrix w, float* __restrict__ y,
                                                const int32_t* __restrict__ experts, int topk, int per_pair_x,
                                                int expert_start, int n_local, int N, int K, int gated) {
  pdl_trigger();
  pdl_wait();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int q = blockIdx.y;
  const int local = experts[q] - expert_start;
  if (row >= N || local < 0 || local >= n_local) return;
  const float* xr = x + static_cast<size_t>(per_pair_x ? q : q / topk) * (gated ? 2 * K : K);
  float s = 0.f;
  for (int k = lane; k < K; k += 32)
    s = fmaf(quant_value(w, static_cast<size_t>(local) * N + row, K, k), gated ? silu_times(xr[k], xr[K + k]) : xr[k], s);
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) y[static_cast<size_t>(q) * N + row] = s;
}

// out [N, K] bf16: one thread per (row, 8 columns).
__global__ void dequantize_kernel(const QuantMatrix w, __nv_bfloat16* __restrict__ out, int64_t N, int K) {
  const int64_t per_row = K / 8;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * per_row;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    const int k0 = static_cast<int>(i - row * per_row) * 8;
    __align__(16) __nv_bfloat16 v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __float2bfloat16_rn(quant_value(w, static_cast<size_t>(row), K, k0 + j));
    *reinterpret_cast<uint4*>(out + row * K + k0) = *reinterpret_cast<const uint4*>(v);
  }
}

__global__ void dequantize_scalar_kernel(const QuantMatrix w, __nv_bfloat16* __restrict__ out, int64_t N, int K) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * K;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(quant_value(w, static_cast<size_t>(i / K), K, static_cast<int>(i % K)));
}

// Runs `pass(t0, n)` over tokens [0, T) in passes of at most Gemv::kMaxTokens; false if a pass was refused.
template <typename Pass>
bool in_passes(int T, Pass&& pass) {
  for (int t0 = 0; t0 < T; t0 += Gemv::kMaxTokens)
    if (!pass(t0, std::min(Gemv::kMaxTokens, T - t0))) return false;
  return true;
}

// Runs pass(x rows, y rows, n, part) over an expert GEMV's T tokens in passes of at most Gemv::kMaxTokens: pass
// [t0, t0 + n) is pairs [t0 topk, (t0 + n) topk) and their x rows (x_width floats a row). False if a pass was
// refused, which (as in_passes) comes on the first.
template <typename Pass>
bool in_expert_passes(const float* x, size_t x_width, float* y, int T, int N, const ExpertRows& ex, Pass&& pass) {
  return ex.n_pairs == T * ex.topk && in_passes(T, [&](int t0, int n) {
           ExpertRows part = ex;
           part.experts = ex.experts + t0 * ex.topk;
           part.n_pairs = n * ex.topk;
           const size_t x_row0 = static_cast<size_t>(ex.per_pair_x ? t0 * ex.topk : t0);
           return pass(x + x_row0 * x_width, y + static_cast<size_t>(t0) * ex.topk * N, n, part);
         });
}

}  // namespace

constexpr int kInt8MmaMinTokens = 4;

void quant_gemv(const Ctx& ctx, Gemv& gemv, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                bool gated, QuantGemvPath path) {
  WEFT_CHECK(T >= 1 && T <= kQuantGemvMaxTokens, "matmul", "the quantized GEMV takes 1..", kQuantGemvMaxTokens,
             " tokens, not ", T);
  WEFT_CHECK(w.dtype == DType::I8 || w.dtype == DType::I4, "matmul", "w dtype ", dtype_name(w.dtype), " is not quantized");
  if (N == 0) return;
  // Auto leaves int8 at 1-3 tokens to the older kernels: on H200 one Llama-2-7B layer's int8 GEMVs took 0.170 ms on
  // tensor cores against 0.141 ms on the one-token kernel at T = 1 (0.185 against 0.163 at T = 2; the tensor cores
  // win from T = 4: 0.191 against 0.212). int4 is faster on tensor cores than on gemv.cu's kernel at every T (T = 1:
  // 0.121 against 0.128).
  // One token: gemv_one_token (H200, a Llama-2-7B layer: int4 g128 0.094 ms streaming against 0.117 on this file's
  // tensor-core kernel, whose warps take whole tiles; gemv_one_token's own tensor-core kernel, which splits each
  // tile's K over a block's warps, 0.052; bench/kernels/quant-run.sh --one-token, gemv-layer-run.sh).
  if (path == QuantGemvPath::Auto && T == 1 && gemv_one_token(ctx, x, w.q, w.dtype, w.scales, w.group, y, N, K, gated, {}, w.tiles))
    return;
  // 2..8 int4 or int8 tokens: the one-token kernel with the tokens as its mma's columns (its 16 warps split each
  // tile's K where the 1..16-token tensor-core kernel gives a warp whole tiles; H100, Llama-2-7B int4 decode at
  // batch 8 2268 -> 2973 tok/s, bench/RESULTS.md session 49).
  if (path == QuantGemvPath::Auto && T > 1 &&  // (gemv_tokens refuses the formats it does not take)
      gemv_tokens(ctx, x, w.q, w.dtype, w.scales, w.group, y, T, N, K, gated, false, w.tiles))
    return;
  const bool mma_pays = w.dtype == DType::I4 || T >= kInt8MmaMinTokens || w.tiles;  // tiles: the tensor cores' alone
  if ((path == QuantGemvPath::Mma || (path == QuantGemvPath::Auto && mma_pays)) &&
      quant_gemv_mma(ctx, x, w, y, T, N, K, gated))
    return;
  if (path != QuantGemvPath::Ring && T == 1 && gemv_one_token(ctx, x, w.q, w.dtype, w.scales, w.group, y, N, K, gated, {}, w.tiles))
    return;
  const size_t x_width = static_cast<size_t>(K) * (gated ? 2 : 1);
  // A refusal depends on the shape and pointers alone, so it comes on the first pass, before anything is written.
  if (in_passes(T, [&](int t0, int n) { return gemv.run_quant(x + t0 * x_width, w, y + static_cast<size_t>(t0) * N, n, N, K, gated); }))
    return;
  launch_pdl(ctx, quant_gemv_scalar_kernel, dim3((N + 7) / 8), dim3(256), 0, x, w, y, T, N, K, gated ? 1 : 0);
}

void quant_expert_gemv(const Ctx& ctx, Gemv& gemv, const float* x, const QuantMatrix& w, float* y, int T, int N,
                       int K, const ExpertRows& ex, bool gated) {
  WEFT_CHECK(T >= 1 && T <= kQuantExpertGemvMaxTokens, "expertMatmul", "the quantized expert GEMV takes 1..",
             kQuantExpertGemvMaxTokens, " tokens, not ", T);
  WEFT_CHECK(ex.n_local <= 65535, "expertMatmul", ex.n_local, " experts are out of range");
  if (N == 0 || ex.n_pairs == 0 || ex.n_local == 0) {
    check_cuda(ctx.st, cudaMemsetAsync(y, 0, static_cast<size_t>(ex.n_pairs) * N * sizeof(float), ctx.stream),
               "expertMatmul");
    return;
  }
  // The one-token tensor-core kernel (a block row an expert, the pairs routed to it its mma's columns, 8 at a time:
  // gemv-one-token-mma.cuh), each chosen expert read once for every 8 of its pairs; else gemv.cu's vector kernel in
  // passes of at most 8 tokens, each reading every expert its tokens chose. Both write every row (zeros for pairs
  // routed to experts w does not hold).
  if (gemv_experts(ctx, x, w, y, T, N, K, ex, gated)) return;
  const size_t x_width = static_cast<size_t>(K) * (gated ? 2 : 1);
  if (in_expert_passes(x, x_width, y, T, N, ex, [&](const float* xp, float* yp, int n, const ExpertRows& part) {
        return gemv.run_quant_experts(xp, w, yp, n, N, K, part, gated);
      }))
    return;
  // Rows of pairs this rank's experts do not serve stay zero; the kernel writes the others.
  check_cuda(ctx.st, cudaMemsetAsync(y, 0, static_cast<size_t>(ex.n_pairs) * N * sizeof(float), ctx.stream), "expertMatmul");
  launch_pdl(ctx, quant_expert_gemv_scalar_kernel, dim3((N + 7) / 8, ex.n_pairs), dim3(256), 0, x, w, y, ex.experts,
             ex.topk, ex.per_pair_x, ex.expert_start, ex.n_local, N, K, gated ? 1 : 0);
}

void dequantize_bf16(const Ctx& ctx, const QuantMatrix& w, void* out, int64_t N, int64_t K) {
  WEFT_CHECK(K <= INT32_MAX, "matmul", "K = ", K, " is out of range for dequantization");
  if (N == 0 || K == 0) return;
  auto* o = static_cast<__nv_bfloat16*>(out);
  if (K % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0)
    dequantize_kernel<<<blocks_for(N * (K / 8), 256), 256, 0, ctx.stream>>>(w, o, N, static_cast<int>(K));
  else
    dequantize_scalar_kernel<<<blocks_for(N * K, 256), 256, 0, ctx.stream>>>(w, o, N, static_cast<int>(K));
}

}  // namespace weft::cuda
