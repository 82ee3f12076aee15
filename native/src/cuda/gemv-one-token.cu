// gemv_one_token (gemv-one-token.cuh): the one-token GEMV with the weights loaded straight into registers.
//   - Each warp owns 2 rows; lane l loads vectors l, l + 32, ... of both rows (16 bytes each: 8 bf16 or 16 int8
//     weights, with the int8 group's bf16 scale) into registers, 8 vectors a row at a time, so nothing but x
//     passes through shared memory; 16 warps a SM keep ~128 KiB of weights in flight.
//   - x (or silu(gate) * up) is staged once per block in shared memory as f32, after the first weights were
//     requested (they do not depend on the kernel before: programmatic dependent launch, common.cuh).
//   - Products are summed in fp32 per vector; int8 vectors are multiplied by their scale once.
//   Measured on H200 (bench/RESULTS.md): 12% less time than gemv.cu's ring kernel over a Llama-2-7B layer's bf16
//   GEMVs at one token, 4-15% on int8. gemv.cu keeps 2..8 tokens, f32/f16 weights, int4 and the expert GEMVs.
#include "cuda/gemv-one-token.cuh"

#include "cuda/common.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr int kDirectWarps = 8;
constexpr int kDirectRows = 2;                 // rows per warp
constexpr int kDirectSteps = 8;                // 16-byte vectors per row loaded before the first is used
constexpr size_t kDirectMaxX = 64 * 1024;      // bytes of x (one token, f32) a block stages: K <= 16384

enum class Format { BF16, I8 };
template <Format F> constexpr int kVectorWeights = F == Format::BF16 ? 8 : 16;

// Weight i of a 16-byte vector as a float. int8: byte b as the float 2^23 + (b + 128) (a byte permute into
// 0x4B0000uu, sign bit flipped), minus 2^23 + 128: exact, and cheaper than an int-to-float conversion. (int4 is
// not taken: unpacking a nibble at a time made this kernel 1.4x slower than gemv.cu's on H200.)
template <Format F>
__device__ __forceinline__ float weight_of(const uint4& u, int i) {
  const uint32_t word = (&u.x)[i * 4 / kVectorWeights<F>];
  if constexpr (F == Format::BF16) return __uint_as_float(i & 1 ? word & 0xffff0000u : word << 16);
  else return __uint_as_float(__byte_perm(word ^ 0x80808080u, 0x4B000000u, 0x7650u | (i & 3))) - 8388736.0f;
}

// y [1, N] = x [1, K] @ dequant(w)^T (gated: x = silu(gate) * up of a [1, 2K] row). Grid ceil(N / 16) blocks of
// 256 threads; dynamic shared memory: x [K] f32. K a multiple of the vector (lanes past a row's end load nothing).
// Rows past N read row N - 1 and store nothing.
template <Format F>
__global__ void __launch_bounds__(kDirectWarps * 32, 2) gemv_one_token_kernel(const float* __restrict__ x, const void* __restrict__ w,
                                                                           const uint16_t* __restrict__ scales, int group,
                                                                           float* __restrict__ y, int N, int K, int gated) {
  constexpr int VW = kVectorWeights<F>;
  constexpr bool kScaled = F != Format::BF16;
  constexpr int R = kDirectRows, U = kDirectSteps;
  extern __shared__ float4 xs4[];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * kDirectWarps + warp) * R;
  const int KV = K / VW, n_groups = kScaled ? K / group : 0;
  const uint4* wrow[R];
  const uint16_t* srow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, N - 1);  // rows past N read row N - 1 and are not stored
    wrow[r] = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(w) + static_cast<size_t>(row) * KV * 16);
    srow[r] = scales + static_cast<size_t>(row) * n_groups;
  }
  uint4 wv[R][U];
  float sc[R][U];
  const auto load = [&](int s0) {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int v = s0 + j * 32 + lane;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[r][j] = v < KV ? __ldg(wrow[r] + v) : make_uint4(0, 0, 0, 0);
        if constexpr (kScaled)
          sc[r][j] = v < KV ? __uint_as_float(static_cast<uint32_t>(__ldg(srow[r] + v * VW / group)) << 16) : 0.f;
      }
    }
  };
  load(0);     // the weights do not depend on the kernel before: requested before waiting for it
  pdl_wait();  // x comes from the kernel before
  for (int i = threadIdx.x; i < K / 4; i += kDirectWarps * 32) {
    float4 v = reinterpret_cast<const float4*>(x)[i];
    if (gated) {
      const float4 up = reinterpret_cast<const float4*>(x + K)[i];
      v = make_float4(silu_times(v.x, up.x), silu_times(v.y, up.y), silu_times(v.z, up.z), silu_times(v.w, up.w));
    }
    xs4[i] = v;
  }
  __syncthreads();
  float acc[R] = {};
  for (int s0 = 0; s0 < KV; s0 += U * 32) {
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int v = s0 + j * 32 + lane;
      if (v >= KV) break;
      float part[R] = {};
#pragma unroll
      for (int h = 0; h < VW / 4; ++h) {
        const float4 xv = xs4[v * (VW / 4) + h];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          part[r] = fmaf(weight_of<F>(wv[r][j], 4 * h), xv.x, part[r]);
          part[r] = fmaf(weight_of<F>(wv[r][j], 4 * h + 1), xv.y, part[r]);
          part[r] = fmaf(weight_of<F>(wv[r][j], 4 * h + 2), xv.z, part[r]);
          part[r] = fmaf(weight_of<F>(wv[r][j], 4 * h + 3), xv.w, part[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = kScaled ? fmaf(sc[r][j], part[r], acc[r]) : acc[r] + part[r];
    }
    if (s0 + U * 32 < KV) load(s0 + U * 32);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = acc[r];
#pragma unroll
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0 && row0 + r < N) y[row0 + r] = s;
  }
}

template <Format F>
void launch(const Ctx& ctx, const float* x, const void* w, const uint16_t* scales, int group, float* y, int N, int K,
            bool gated) {
  static bool attribute_set = false;  // per instantiation: x may take up to kDirectMaxX (above the default 48 KiB)
  if (!attribute_set) {
    check_cuda(ctx.st, cudaFuncSetAttribute(gemv_one_token_kernel<F>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kDirectMaxX)),
               "matmul", " (cudaFuncSetAttribute)");
    attribute_set = true;
  }
  const dim3 grid((N + kDirectWarps * kDirectRows - 1) / (kDirectWarps * kDirectRows)), block(kDirectWarps * 32);
  launch_pdl(ctx, gemv_one_token_kernel<F>, grid, block, static_cast<size_t>(K) * sizeof(float), x, w, scales, group,
             y, N, K, gated ? 1 : 0);
}

}  // namespace

bool gemv_one_token(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                    float* y, int N, int K, bool gated) {
  const bool int8 = w_dtype == DType::I8;
  if (!(int8 || w_dtype == DType::BF16)) return false;
  const int vw = int8 ? 16 : 8;
  if (K % vw != 0 || (int8 && (group <= 0 || group % vw != 0 || K % group != 0)) ||
      static_cast<size_t>(K) * sizeof(float) > kDirectMaxX || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0 || N <= 0)
    return false;
  if (int8) launch<Format::I8>(ctx, x, w, scales, group, y, N, K, gated);
  else launch<Format::BF16>(ctx, x, w, nullptr, 0, y, N, K, gated);
  return true;
}

}  // namespace weft::cuda
