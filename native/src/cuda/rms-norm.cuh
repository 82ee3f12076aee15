// The arithmetic of addRmsNorm, shared by its own kernels (fused-layer.cu) and by the one-token GEMV that takes a
// deferred addRmsNorm as its input (gemv-rows-tma.cu), so both give the same bits: s = x + y in f32, the sum of
// squares in double, inv_rms = 1 / sqrt(f32(sum / H) + eps), normed = (s * inv_rms) * weight, each product rounded.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

__device__ __forceinline__ float inv_rms_of(double sum_sq, int64_t H, float eps) {
  float mean_sq = H > 0 ? static_cast<float>(sum_sq / static_cast<double>(H)) : 0.0f;
  return 1.0f / sqrtf(mean_sq + eps);
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) { return {a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w}; }
__device__ __forceinline__ double sq4(float4 s) {
  return static_cast<double>(s.x) * s.x + static_cast<double>(s.y) * s.y + static_cast<double>(s.z) * s.z +
         static_cast<double>(s.w) * s.w;
}

template <typename W>
struct Load4 {
  __device__ static float4 at(const W* w, int64_t i) {  // elements 4i .. 4i + 3
    return {to_f32(w[4 * i]), to_f32(w[4 * i + 1]), to_f32(w[4 * i + 2]), to_f32(w[4 * i + 3])};
  }
};
template <>
struct Load4<float> {
  __device__ static float4 at(const float* w, int64_t i) { return reinterpret_cast<const float4*>(w)[i]; }
};

__device__ __forceinline__ float4 normed4(float4 s, float inv_rms, float4 w) {
  return {__fmul_rn(__fmul_rn(s.x, inv_rms), w.x), __fmul_rn(__fmul_rn(s.y, inv_rms), w.y),
          __fmul_rn(__fmul_rn(s.z, inv_rms), w.z), __fmul_rn(__fmul_rn(s.w, inv_rms), w.w)};
}

// The longest row a kernel makes the deferred addRmsNorm's row for: addRmsNorm's own kernel runs one thread a float4,
// at most 1024 threads, and add_rms_norm_row plays those threads' trees.
constexpr int kHeldNormMaxK = 4096;

// Whether a GEMV may take the deferred addRmsNorm norm (gemv-rows-tma.cuh AddRmsNormInput) for a row of K: K within
// kHeldNormMaxK and its four vectors 16-byte aligned.
template <typename Norm>
inline bool held_norm_takes(const Norm& norm, int K) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return K <= kHeldNormMaxK && aligned(norm.y) && aligned(norm.sum) && aligned(norm.normed) && aligned(norm.weight);
}

// The norm weight's float4s that thread t of kThreads plays in add_rms_norm_row (t + kThreads j), read before the
// kernel waits for the one before: the weight is a model tensor, which no kernel writes (common.cuh), so its round
// trip overlaps that wait instead of following the sum of squares.
template <int kThreads, typename W>
struct HeldNormWeight {
  static constexpr int kPlays = kHeldNormMaxK / 4 / kThreads;
  float4 v[kPlays];
  template <typename Norm>
  __device__ __forceinline__ void load(const Norm& norm, int K) {
#pragma unroll
    for (int j = 0; j < kPlays; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < K / 4) v[j] = Load4<W>::at(static_cast<const W*>(norm.weight), i);
    }
  }
};

// addRmsNorm's normed row of x and norm.y [K <= kHeldNormMaxK] made inside a kernel of kThreads threads (the one-token
// GEMVs that take a deferred addRmsNorm, gemv-rows-tma.cuh AddRmsNormInput), with the weight already loaded:
// store(i, normed float4 i) for every i, and this block's share of norm.sum and norm.normed written (float4 i where
// i % gridDim.x is the block). addRmsNorm's kernel for a row of K <= 4096 runs one thread a float4 (fused-layer.cu,
// K / 4 threads rounded up to a warp), warp-sums their squares and then warp 0 sums the warps' sums; thread t here
// plays its threads t + kThreads j in the same trees, so inv_rms and every normed value are that kernel's bits. Every
// warp here sums the warps' sums in warp 0's tree (a butterfly gives every lane the same bits), so one block barrier
// where the kernel takes two. Every thread calls it.
template <int kThreads, typename W, typename Norm, typename Store>
__device__ void add_rms_norm_row(const float4* __restrict__ x4, const Norm& norm, int K,
                                 const HeldNormWeight<kThreads, W>& weight, Store&& store) {
  constexpr int kWarps = kThreads / 32, kPlays = HeldNormWeight<kThreads, W>::kPlays;
  static_assert(kWarps * kPlays <= 32, "warp 0 sums at most 32 warp sums");
  __shared__ double warp_sums[32];
  const int n4 = K / 4, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float4* y4 = reinterpret_cast<const float4*>(norm.y);
  float4 s[kPlays];
  // every play's loads issued before the first sum (common.cuh loads_ahead: staging x after the wait)
#pragma unroll
  for (int j = 0; j < kPlays; ++j)
    if (const int i = threadIdx.x + j * kThreads; i < n4) s[j] = add4(x4[i], y4[i]);
#pragma unroll
  for (int j = 0; j < kPlays; ++j) {
    const int i = threadIdx.x + j * kThreads;
    double sq = 0.0;
    if (i < n4) sq = sq4(s[j]);
    sq = warp_sum(sq);
    if (lane == 0) warp_sums[warp + j * kWarps] = sq;
  }
  __syncthreads();
  const float inv_rms = inv_rms_of(warp_sum(lane < kWarps * kPlays ? warp_sums[lane] : 0.0), K, norm.eps);
#pragma unroll
  for (int j = 0; j < kPlays; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if (i >= n4) continue;
    const float4 o = normed4(s[j], inv_rms, weight.v[j]);
    store(i, o);
    if (i % gridDim.x == blockIdx.x) {
      reinterpret_cast<float4*>(norm.sum)[i] = s[j];
      reinterpret_cast<float4*>(norm.normed)[i] = o;
    }
  }
}

}  // namespace weft::cuda
