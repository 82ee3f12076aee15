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

}  // namespace weft::cuda
