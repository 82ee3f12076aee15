// The quantized GEMV and dequantization (gemv-quant.cuh). Layout follows gemv.cu's vector kernel, simplified:
//   - A block of 8 warps owns 8 R consecutive rows (R = 4, or 2 at 16 tokens to keep R x TT accumulators in
//     registers); each warp R rows. Lane l reads 16 bytes of each of its rows at vector v = 32 s + l (16 int8 or
//     32 int4 weights), so a warp reads 512 contiguous bytes per row per step; U = 2 steps are loaded before the
//     first is used.
//   - Each 16-byte vector lies inside one group (the group is a multiple of the vector's columns), so it takes
//     one scale: sum_i q_i x_i is formed in fp32 and multiplied by the scale once per vector and token.
//   - int4 codes become floats with the exponent trick: 0x4B000000 | c is the float 2^23 + c, minus 2^23 + 8
//     gives c - 8 exactly (one OR and one subtract per weight).
//   - x is staged in shared memory as fp32 in chunks of K ([TT][VW / 4][nvec] float4, split so a warp's float4
//     reads are contiguous), all rows of the block reusing it; gated rows stage silu(gate) * up.
//   - The R x TT sums of a warp are reduced over its lanes with shuffles, once (a warp's rows span all of K).
//   - Expert rows (expertMatmul at decode): a grid row of blocks per held expert, as in gemv.cu; a block reads
//     only the pairs routed to its expert, and experts nobody chose are not read.
//   Fallback (K or the group not a multiple of the vector's columns, misaligned pointers): one warp per row,
//   scalar loads.
#include "cuda/gemv-quant.cuh"

#include <cuda_bf16.h>

#include "cuda/common.cuh"
#include "cuda/expert-slots.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kU = 2;                        // 16-byte steps loaded per row before the first is used
constexpr size_t kChunkBytes = 32 * 1024;    // target bytes of x staged per chunk

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }

// silu(g) * u exactly as siluMul computes it (elementwise.cu), so the fused product equals the two ops.
__device__ __forceinline__ float silu_times(float g, float u) { return __fmul_rn(g / (1.0f + expf(-g)), u); }

// Weights of a 16-byte vector: 16 int8 or 32 int4, as floats, four at a time (f: sub-vector h of 4 weights).
template <bool INT4>
__device__ __forceinline__ void unpack4(const uint4& u, int h, float (&f)[4]) {
  if constexpr (INT4) {
    const uint32_t word = (&u.x)[h >> 1];
    const int shift = (h & 1) * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      f[i] = __uint_as_float(0x4B000000u | ((word >> (shift + 4 * i)) & 0xfu)) - 8388616.0f;  // 2^23 + 8
  } else {
    const uint32_t word = (&u.x)[h];
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = static_cast<float>(static_cast<int8_t>((word >> (8 * i)) & 0xffu));
  }
}

struct Params {
  const float* x;
  const uint8_t* q;
  const uint16_t* scales;
  float* y;
  int T, N, K, group, gated;
  int chunk_vecs;  // vectors of K per staged chunk
  // Expert mode (experts != nullptr): q and scales hold gridDim.y experts [El][N][...] and blockIdx.y is the
  // block's expert; its "tokens" are the pairs routed to it (at most TT, in pair order): x row pair / topk (or
  // pair, per_pair_x), y row pair. y rows of pairs routed elsewhere are left as they are (zeroed before).
  const int32_t* experts;
  int n_pairs, topk, per_pair_x, expert_start;
  DeviceStatus* status;
};

// Grid: ceil(N / (8 R)) blocks of 256 threads. Dynamic shared memory: the x chunk [TT][H][chunk_vecs] float4.
template <bool INT4, int TT, int R>
__global__ void __launch_bounds__(kThreads) quant_gemv_kernel(const Params p) {
  constexpr int VW = INT4 ? 32 : 16;  // weights per 16-byte vector
  constexpr int H = VW / 4;           // float4 of x per vector
  extern __shared__ float4 xs[];
  pdl_trigger();
  pdl_wait();  // x (and the routing) come from the kernels before

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ int x_row[TT], y_row[TT], n_tokens;
  if (p.experts) {
    const int e = static_cast<int>(blockIdx.y) + p.expert_start;
    if (warp == 0) expert_slots<TT>(p.experts, p.n_pairs, p.topk, p.per_pair_x, e, lane, x_row, y_row, n_tokens, p.status);
    __syncthreads();
    if (n_tokens == 0) return;  // an expert no pair chose: its weights are never read
  }
  const int T = p.experts ? n_tokens : p.T;
  const int row0 = (blockIdx.x * kWarps + warp) * R;
  const int KV = p.K / VW;  // vectors per row
  const size_t row_bytes = static_cast<size_t>(p.K) / (INT4 ? 2 : 1);
  const int S = p.K / p.group;  // scales per row
  const uint8_t* q_base = p.q + static_cast<size_t>(blockIdx.y) * p.N * row_bytes;
  const uint16_t* scales = p.scales + static_cast<size_t>(blockIdx.y) * p.N * S;
  const uint4* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r)
    wrow[r] = reinterpret_cast<const uint4*>(q_base + static_cast<size_t>(min(row0 + r, p.N - 1)) * row_bytes);

  float acc[R][TT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[r][t] = 0.f;

  for (int c0 = 0; c0 < KV; c0 += p.chunk_vecs) {
    const int nvec = min(p.chunk_vecs, KV - c0);
    __syncthreads();  // the previous chunk is no longer read
    for (int i = threadIdx.x; i < TT * H * nvec; i += kThreads) {
      const int t = i / (H * nvec), f = i - t * (H * nvec);
      const int v = f / H, h = f - v * H;
      float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
      if (t < T) {
        const int xt = p.experts ? x_row[t] : t;
        const float* xr = p.x + static_cast<size_t>(xt) * (p.gated ? 2 * p.K : p.K) + (c0 + v) * VW + h * 4;
        val = *reinterpret_cast<const float4*>(xr);
        if (p.gated) {
          const float4 up = *reinterpret_cast<const float4*>(xr + p.K);
          val = make_float4(silu_times(val.x, up.x), silu_times(val.y, up.y), silu_times(val.z, up.z),
                            silu_times(val.w, up.w));
        }
      }
      xs[(t * H + h) * nvec + v] = val;
    }
    __syncthreads();
    if (row0 >= p.N) continue;  // no rows here (the barriers above still need every warp)

    for (int s0 = 0; s0 < nvec; s0 += 32 * kU) {
      uint4 wv[kU][R];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int v = s0 + u * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = v < nvec ? __ldg(wrow[r] + c0 + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int v = s0 + u * 32 + lane;
        if (v >= nvec) continue;
        const int g = ((c0 + v) * VW) / p.group;
        float part[R][TT];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int t = 0; t < TT; ++t) part[r][t] = 0.f;
#pragma unroll
        for (int h = 0; h < H; ++h) {
          float wf[R][4];
#pragma unroll
          for (int r = 0; r < R; ++r) unpack4<INT4>(wv[u][r], h, wf[r]);
#pragma unroll
          for (int t = 0; t < TT; ++t) {
            const float4 xv = xs[(t * H + h) * nvec + v];
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float s = part[r][t];
              s = fmaf(wf[r][0], xv.x, s);
              s = fmaf(wf[r][1], xv.y, s);
              s = fmaf(wf[r][2], xv.z, s);
              s = fmaf(wf[r][3], xv.w, s);
              part[r][t] = s;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float scale = bf16_bits_to_f32(__ldg(scales + static_cast<size_t>(min(row0 + r, p.N - 1)) * S + g));
#pragma unroll
          for (int t = 0; t < TT; ++t) acc[r][t] = fmaf(scale, part[r][t], acc[r][t]);
        }
      }
    }
  }
  if (row0 >= p.N) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      float s = acc[r][t];
#pragma unroll
      for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && t < T && row0 + r < p.N) p.y[static_cast<size_t>(p.experts ? y_row[t] : t) * p.N + row0 + r] = s;
    }
  }
}

__device__ __forceinline__ float quant_value(const QuantMatrix& w, size_t row, int K, int k) {
  const float scale = bf16_bits_to_f32(w.scales[row * (K / w.group) + k / w.group]);
  const uint8_t* q = static_cast<const uint8_t*>(w.q);
  if (w.dtype == DType::I8) return static_cast<float>(static_cast<int8_t>(q[row * K + k])) * scale;
  const uint8_t b = q[row * (K / 2) + k / 2];
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

template <bool INT4, int TT>
void launch(const Ctx& ctx, const Params& p, int n_experts) {
  constexpr int R = TT >= 16 ? 2 : 4;
  constexpr int VW = INT4 ? 32 : 16;
  const size_t smem = static_cast<size_t>(TT) * p.chunk_vecs * VW * sizeof(float);
  static bool attribute_set = false;  // per instantiation: the chunk may take up to 64 KiB (above the default 48)
  if (!attribute_set) {
    check_cuda(ctx.st, cudaFuncSetAttribute(quant_gemv_kernel<INT4, TT, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024),
               "matmul", " (cudaFuncSetAttribute)");
    attribute_set = true;
  }
  const dim3 grid((p.N + kWarps * R - 1) / (kWarps * R), n_experts);
  launch_pdl(ctx, quant_gemv_kernel<INT4, TT, R>, grid, dim3(kThreads), smem, p);
}

template <bool INT4>
void dispatch(const Ctx& ctx, int TT, const Params& p, int n_experts) {
  switch (TT) {
    case 1: return launch<INT4, 1>(ctx, p, n_experts);
    case 2: return launch<INT4, 2>(ctx, p, n_experts);
    case 4: return launch<INT4, 4>(ctx, p, n_experts);
    case 8: return launch<INT4, 8>(ctx, p, n_experts);
    default: return launch<INT4, 16>(ctx, p, n_experts);
  }
}

// The vector kernel, dense (ex null) or expert rows; false when the shape or pointers need the scalar kernel.
bool launch_vector(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated,
                   const ExpertRows* ex) {
  if (!quant_gemv_vector_ok(x, w, K)) return false;
  const int TT = T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : T <= 8 ? 8 : 16;
  const int vw = w.dtype == DType::I4 ? 32 : 16;
  // Chunk: about kChunkBytes of x, at least one step of the warp (32 vectors), whole K when it fits.
  const int per_chunk = std::max(32, static_cast<int>(kChunkBytes / (static_cast<size_t>(TT) * vw * sizeof(float))));
  Params p{x, static_cast<const uint8_t*>(w.q), w.scales, y, T, N, K, w.group, gated ? 1 : 0,
           std::min(per_chunk, K / vw), nullptr, 0, 1, 0, 0, nullptr};
  if (ex) set_expert_rows(p, *ex);
  const int n_experts = ex ? ex->n_local : 1;
  if (w.dtype == DType::I4) dispatch<true>(ctx, TT, p, n_experts);
  else dispatch<false>(ctx, TT, p, n_experts);
  return true;
}

}  // namespace

bool quant_gemv_vector_ok(const float* x, const QuantMatrix& w, int K) {
  const int vw = w.dtype == DType::I4 ? 32 : 16;
  return K % vw == 0 && w.group % vw == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w.q) % 16 == 0;
}

void quant_gemv(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated) {
  WEFT_CHECK(T >= 1 && T <= kQuantGemvMaxTokens, "matmul", "the quantized GEMV takes 1..", kQuantGemvMaxTokens,
             " tokens, not ", T);
  WEFT_CHECK(w.dtype == DType::I8 || w.dtype == DType::I4, "matmul", "w dtype ", dtype_name(w.dtype), " is not quantized");
  if (N == 0) return;
  if (launch_vector(ctx, x, w, y, T, N, K, gated, nullptr)) return;
  launch_pdl(ctx, quant_gemv_scalar_kernel, dim3((N + 7) / 8), dim3(256), 0, x, w, y, T, N, K, gated ? 1 : 0);
}

void quant_expert_gemv(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                       const ExpertRows& ex, bool gated) {
  WEFT_CHECK(T >= 1 && T <= kQuantGemvMaxTokens, "expertMatmul", "the quantized expert GEMV takes 1..",
             kQuantGemvMaxTokens, " tokens, not ", T);
  WEFT_CHECK(ex.n_local <= 65535, "expertMatmul", ex.n_local, " experts are out of range");
  // Rows of pairs this rank's experts do not serve stay zero; the kernels write the others.
  check_cuda(ctx.st, cudaMemsetAsync(y, 0, static_cast<size_t>(ex.n_pairs) * N * sizeof(float), ctx.stream), "expertMatmul");
  if (N == 0 || ex.n_pairs == 0 || ex.n_local == 0) return;
  if (launch_vector(ctx, x, w, y, T, N, K, gated, &ex)) return;
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
