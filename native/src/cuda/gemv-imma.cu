// gemv_one_token_imma (gemv-imma.cuh): the one-token int4 GEMV on the integer tensor cores (mma.sync m16n8k32, u8
// codes by s8 digits).
//   - x is taken apart into three signed bytes a column: x ~ s (65536 d0 + 256 d1 + d2), each digit in [-128, 127]
//     (balanced base 256: 24 bits against the row's largest |x|, s = that max / (127 * 65536), one s a block). The
//     three digits are the columns 0-2 of the mma's B operand, so one mma multiplies 16 rows x 32 columns of codes by
//     all three exactly (s32), each item's sums are scaled into f32 by its group's scale, and a row's sum is put
//     together (and scaled by s) at its end: no conversion of a weight to a float, where the register and bulk-copy
//     kernels spend a nibble mask, a conversion and an FMA on each (bench/RESULTS.md, session 12: those GEMVs were
//     bound by instruction issue).
//   - Every block makes the digits for itself once, from x or, for a held addRmsNorm, from the normed row it makes
//     (rms-norm.cuh add_rms_norm_rows, the norm kernel's bits; the row's largest value found in the same pass).
//   - A block of 8 warps takes 16 rows (pairs: 16 gate and 16 up rows) at a time; warp w reads the items w, w + 8,
//     ... of them (128 columns), lane (g, t) 16 bytes of rows g and g + 8 an item (the mma's columns are taken in
//     that order, and x's digits are stored in the same order: digit_at), through a ring of U items in registers
//     that runs on across the block's row tiles. The warps' f32 sums are added in warp order in shared memory, one
//     barrier a tile.
//   - Codes are value + 8 (groups a power of two from 128): each code word split into its low and high nibbles as
//     unsigned bytes (one and, one shift-and), so the mma is u8 x s8, and an item's sums less 8 x its digits' sums.
#include "cuda/gemv-imma.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/rms-norm.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kBlocksPerSm = 2;
constexpr int kItem = 128;                     // columns an item (a warp's 32 lanes x 16 bytes of two rows)
constexpr int kMaxK = 16384;                   // x's digits (4 bytes a column) beside the sums in shared memory
constexpr int kMaxNormK = 4096;                // add_rms_norm_rows plays addRmsNorm's <= 1024 threads
constexpr float kDigitRange = 127.0f * 65536.0f;  // |x| / s at most: the top digit within [-127, 127]

__device__ __forceinline__ void imma_u8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int S, int U, typename Step>
__device__ __forceinline__ bool every_slot(Step& f) {
  if constexpr (S == U) return false;
  else return f(std::integral_constant<int, S>{}) || every_slot<S + 1, U>(f);
}

// Byte offset in the digits' shared array of digit p of column k: [item][mma j][digit 0-3][t][8 columns], so that
// the lanes' B fragments of one mma are 16 consecutive 8-byte words (digit 3 is zero: lanes of columns 3-7). Lane t's
// 32 columns of an item are at 32t; mma j takes its columns 8j .. 8j + 7 as the low nibbles (even columns: b0) and
// the high (b1).
__device__ __forceinline__ int digit_at(int k, int p) {
  const int c = k >> 7, r = k & 127, t = r >> 5, j = (r >> 3) & 3, e = r & 7;
  return ((((c * 4 + j) * 4 + p) * 4 + t) << 3) + (e & 1) * 4 + (e >> 1);
}

// Digits of x's float4 i (columns 4i .. 4i + 3) at inv = 1 / s, called by whole warps (a warp's 32 float4s are one
// item): into digit_at's bytes (2 + 2 a digit, the low and high nibbles' halves), and the item's digit sums into
// digit_sums (codes are value + 8: an item's sums take 8 x these off).
__device__ __forceinline__ void stage_digits(int i, float4 v, float inv, int lane, unsigned char* digits,
                                             int* digit_sums) {
  const int k = 4 * i;
  const float xs[4] = {v.x, v.y, v.z, v.w};
  uint32_t word[3] = {0, 0, 0};
  int dsum[3] = {0, 0, 0};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int X = __float2int_rn(fminf(fmaxf(xs[e] * inv, -kDigitRange), kDigitRange));
    const int d2 = ((X + 128) & 255) - 128, x1 = (X - d2) >> 8;
    const int d1 = ((x1 + 128) & 255) - 128, d0 = (x1 - d1) >> 8;
    const int d[3] = {d0, d1, d2};
    const int byte = (e & 1) * 2 + (e >> 1);
#pragma unroll
    for (int p = 0; p < 3; ++p) {
      word[p] |= uint32_t(d[p] & 255) << (8 * byte);
      dsum[p] += d[p];
    }
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t wd = p < 3 ? word[p] : 0u;
    *reinterpret_cast<uint16_t*>(digits + digit_at(k, p)) = static_cast<uint16_t>(wd);
    *reinterpret_cast<uint16_t*>(digits + digit_at(k + 1, p)) = static_cast<uint16_t>(wd >> 16);
  }
  const int s0 = warp_sum_int(dsum[0]), s1 = warp_sum_int(dsum[1]), s2 = warp_sum_int(dsum[2]);
  if (lane == 0) {
    int* ds = digit_sums + (k >> 7) * 4;
    ds[0] = s0, ds[1] = s1, ds[2] = s2, ds[3] = 0;
  }
}

// R row tiles a task (1, or 2: gate and up), U ring slots. Grid: at most kBlocksPerSm a SM, block b takes tasks
// b, b + gridDim.x, ... Shared memory: the digits (4 bytes a column), the digits' sums [K / 128][4] int, then the
// warps' sums [2][kWarps][R][32] float4.
template <int R, int U>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gemv_imma_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                     int group_shift, float* __restrict__ y, int N, int K, AddRmsNormInput norm) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float block_scale;
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int KC = K / kItem, n_tasks = (N + 15) / 16, n_groups = K >> group_shift;
  const size_t row_bytes = K / 2;
  const int n_w = (KC - warp + kWarps - 1) / kWarps;  // this warp's items of a tile (KC >= kWarps)
  const int my_tasks = (n_tasks - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  unsigned char* digits = smem;
  int* digit_sums = reinterpret_cast<int*>(smem + size_t(K) * 4);                   // [K / 128][4]
  float4* sums = reinterpret_cast<float4*>(smem + size_t(K) * 4 + size_t(KC) * 16);  // [2][kWarps][R][32]

  // Row g (+ 8 half) of tile r of a task, clamped to the matrix: rows past N are read and not stored.
  const auto row_of = [&](int task, int r, int half) { return min(task * 16 + g + 8 * half, N - 1) + r * N; };
  uint4 wv[U][R][2];
  uint32_t sc[U][R][2];                       // the group scales of rows g, g + 8 (bf16 bits)
  int lt = blockIdx.x, lj = 0, requested = 0;  // next item to request: task lt, item warp + 8 lj of its rows
  const int n_items = my_tasks * n_w;
  const auto request = [&](auto slot) {
    constexpr int s = decltype(slot)::value;
    if (requested < n_items) {
      const int item = warp + kWarps * lj;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row_of(lt, r, h);
          wv[s][r][h] = __ldg(reinterpret_cast<const uint4*>(w + size_t(row) * row_bytes + size_t(item) * (kItem / 2)) + t);
          sc[s][r][h] = __ldg(scales + size_t(row) * n_groups + ((item * kItem) >> group_shift));
        }
      if (++lj == n_w) lj = 0, lt += gridDim.x;
    }
    ++requested;
  };
  auto first_requests = [&](auto slot) {
    request(slot);
    return false;
  };
  every_slot<0, U>(first_requests);  // weights first: they do not depend on x

  pdl_wait();
  // x's digits against the row's largest |x|: the held norm finds it in the pass that sums the squares; plain x
  // takes a pass of its own (x is in L2, and the ring's loads are in flight meanwhile).
  if (norm.y) {
    const auto stage = [&](int i, float4 v, float amax) {
      stage_digits(i, v, amax > 0 ? kDigitRange / amax : 0.0f, lane, digits, digit_sums);
      if (threadIdx.x == 0) block_scale = amax / kDigitRange;
    };
    if (norm.weight_bf16)
      add_rms_norm_rows<kThreads, kMaxNormK, __nv_bfloat16, true>(reinterpret_cast<const float4*>(x), norm, K, stage);
    else
      add_rms_norm_rows<kThreads, kMaxNormK, float, true>(reinterpret_cast<const float4*>(x), norm, K, stage);
  } else {
    __shared__ float warp_maxes[kWarps];
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float m = 0.0f;
    for (int i = threadIdx.x; i < K / 4; i += kThreads) {
      const float4 v = x4[i];
      m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    m = warp_max(m);
    if (lane == 0) warp_maxes[warp] = m;
    __syncthreads();
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) amax = fmaxf(amax, warp_maxes[i]);
    const float inv = amax > 0 ? kDigitRange / amax : 0.0f;
    for (int i = threadIdx.x; i < K / 4; i += kThreads) stage_digits(i, x4[i], inv, lane, digits, digit_sums);
    if (threadIdx.x == 0) block_scale = amax / kDigitRange;
  }
  __syncthreads();

  float fsum[R][4] = {};  // the C fragment's sums, each item's exact s32 sums scaled into them by its group's scale
  int ct = blockIdx.x, cj = 0, tile = 0;  // the item to use next
  const uint2* b_words = reinterpret_cast<const uint2*>(digits) + ((g & 3) * 4 + t);
  const auto step = [&](auto slot) {
    constexpr int s = decltype(slot)::value;
    if (ct >= n_tasks) return true;
    const int item = warp + kWarps * cj;
    const int4 dsum = reinterpret_cast<const int4*>(digit_sums)[item];
    // lane t's columns 2t, 2t + 1 are digits (2t) & 3 and (2t + 1) & 3 (digit 3: zero)
    const int corr0 = 8 * ((t & 1) ? dsum.z : dsum.x), corr1 = 8 * ((t & 1) ? dsum.w : dsum.y);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int c[4] = {0, 0, 0, 0};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t w0 = (&wv[s][r][0].x)[j], w1 = (&wv[s][r][1].x)[j];
        imma_u8(c, w0 & 0x0f0f0f0fu, w1 & 0x0f0f0f0fu, (w0 >> 4) & 0x0f0f0f0fu, (w1 >> 4) & 0x0f0f0f0fu,
                b_words[(item * 4 + j) * 16]);
      }
      const float s0 = __uint_as_float(sc[s][r][0] << 16), s1 = __uint_as_float(sc[s][r][1] << 16);
      fsum[r][0] = fmaf(s0, float(c[0] - corr0), fsum[r][0]);
      fsum[r][1] = fmaf(s0, float(c[1] - corr1), fsum[r][1]);
      fsum[r][2] = fmaf(s1, float(c[2] - corr0), fsum[r][2]);
      fsum[r][3] = fmaf(s1, float(c[3] - corr1), fsum[r][3]);
    }
    request(slot);
    if (++cj < n_w) return false;
    // The tile's end: this warp's sums into shared memory, then warp 0 adds the 8 warps' and stores the rows.
    float4* buf = sums + size_t(tile & 1) * kWarps * R * 32;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      buf[(warp * R + r) * 32 + lane] = make_float4(fsum[r][0], fsum[r][1], fsum[r][2], fsum[r][3]);
      fsum[r][0] = fsum[r][1] = fsum[r][2] = fsum[r][3] = 0;
    }
    __syncthreads();
    if (warp == 0) {
      float v[R][2];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // lane t = 0: digits 0, 1 of rows g (x, y) and g + 8 (z, w); lane t = 1: digit 2 of them (x, z)
        float p[4] = {0, 0, 0, 0};  // the warps' sums in warp order
#pragma unroll
        for (int i = 0; i < kWarps; ++i) {
          const float4 o = buf[(i * R + r) * 32 + lane];
          p[0] += o.x, p[1] += o.y, p[2] += o.z, p[3] += o.w;
        }
        const float d2_lo = __shfl_down_sync(0xffffffffu, p[0], 1), d2_hi = __shfl_down_sync(0xffffffffu, p[2], 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float d0 = h ? p[2] : p[0], d1 = h ? p[3] : p[1], d2 = h ? d2_hi : d2_lo;
          v[r][h] = (d0 * 65536.0f + (d1 * 256.0f + d2)) * block_scale;
        }
      }
      if (t == 0)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = ct * 16 + g + 8 * h;
          if (row < N) y[row] = R == 2 ? silu_times(v[0][h], v[R - 1][h]) : v[0][h];
        }
    }
    cj = 0;
    ct += gridDim.x;
    ++tile;
    return ct >= n_tasks;
  };
  while (!every_slot<0, U>(step)) {
  }
}

// Experiment knob (not for the product): WEFT_GEMV_IMMA=off|plain|norm|all (default all) picks which one-token int4
// GEMVs take this kernel: plain = those without a held norm, norm = those with one.
int imma_scope() {
  static const int scope = [] {
    const char* e = std::getenv("WEFT_GEMV_IMMA");
    const std::string v = e ? e : "all";
    return v == "off" ? 0 : v == "plain" ? 1 : v == "norm" ? 2 : 3;
  }();
  return scope;
}
// Experiment knob: WEFT_IMMA_BLOCKS_PER_SM=1 launches one block a SM (32K registers, half the register file free for
// the next kernel's blocks), default 2.
int imma_blocks_per_sm() {
  static const int n = [] {
    const char* e = std::getenv("WEFT_IMMA_BLOCKS_PER_SM");
    return e && std::string(e) == "1" ? 1 : kBlocksPerSm;
  }();
  return n;
}

}  // namespace

bool gemv_one_token_imma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                         int group, float* y, int N, int K, bool pairs, const AddRmsNormInput* norm) {
  if (w_dtype != DType::I4 || K % kItem != 0 || K / kItem < kWarps || K > kMaxK || N <= 0) return false;
  if (group % 128 != 0 || (group & (group - 1)) != 0 || K % group != 0) return false;
  if (!(imma_scope() & (norm ? 2 : 1))) return false;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(w) || !aligned(x)) return false;
  if (norm && (K > kMaxNormK || !(aligned(norm->y) && aligned(norm->sum) && aligned(norm->normed) && aligned(norm->weight))))
    return false;
  int group_shift = 0;
  while ((1 << group_shift) < group) ++group_shift;
  const int n_tasks = (N + 15) / 16;
  const int R = pairs ? 2 : 1;
  const size_t smem = size_t(K) * 4 + size_t(K / kItem) * 16 + size_t(2) * kWarps * R * 32 * sizeof(float4);
  const AddRmsNormInput plain{};
  const int grid = std::min(n_tasks, imma_blocks_per_sm() * sm_count(ctx));
  auto launch = [&](auto kernel) {
    // the kernel's static shared memory counts against the default 48 KiB too: always raise the limit
    static size_t allowed[2] = {};  // per instantiation (pairs): the most set so far
    if (smem > allowed[pairs]) {
      check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "gemv",
                 " (cudaFuncSetAttribute)");
      allowed[pairs] = smem;
    }
    launch_pdl(ctx, kernel, dim3(grid), dim3(kThreads), smem, x, static_cast<const uint8_t*>(w), scales, group_shift,
               y, N, K, norm ? *norm : plain);
  };
  if (pairs) launch(gemv_imma_kernel<2, 3>);
  else launch(gemv_imma_kernel<1, 8>);
  return true;
}

}  // namespace weft::cuda
