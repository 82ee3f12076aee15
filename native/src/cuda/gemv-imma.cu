// gemv_one_token_imma (gemv-imma.cuh): the one-token int8 and int4 GEMVs on the integer tensor cores (mma.sync
// m16n8k32 with s8 or u8 codes and s8 digits).
//   - x is taken apart into three signed bytes a column: x ~ s (65536 d0 + 256 d1 + d2), each digit in [-128, 127]
//     (balanced base 256: 24 bits against the largest |x| of the column's run of 128, s = that max / (127 * 65536)).
//     The three digits are the columns 0-2 of the mma's B operand, so one mma multiplies 16 rows x 32 columns of codes
//     by all three exactly (s32), each item's sums are scaled into f32 (the run's s, int4 also its group's scale),
//     and a row's sum is put together at its end: no conversion of a weight to a float, where the register kernels
//     spend a byte permute or a nibble mask, a subtraction and an FMA on each (bench/RESULTS.md, session 12: those
//     GEMVs were bound by instruction issue).
//   - Every block makes the digits for itself once (a warp's 32 float4s are one run: a warp-wide max, no barrier), from
//     x or, for a held addRmsNorm, from the normed row it makes (rms-norm.cuh add_rms_norm_rows, the norm kernel's bits).
//   - A block of 8 warps takes 16 rows (pairs: 16 gate and 16 up rows) at a time; warp w reads the items w, w + 8,
//     ... of them (int8: 64 columns, int4: 128), lane (g, t) 16 bytes of rows g and g + 8 an item (the mma's columns
//     are taken in that order, and x's digits are stored in the same order: digit_at), through a ring of U items in
//     registers that runs on across the block's row tiles. The warps' f32 sums are added in warp order in shared
//     memory, one barrier a tile.
//   - int4 (codes value + 8, groups a power of two from 128): each code word split into its low and high nibbles as
//     unsigned bytes (one and, one shift-and), so the mma is u8 x s8, and an item's sums less 8 x its digits' sums.
#include "cuda/gemv-imma.cuh"

#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/rms-norm.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32, kBlocksPerSm = 2;
constexpr int kMaxK = 16384;                   // x's digits (4 bytes a column) beside the sums in shared memory
constexpr int kMaxNormK = 4096;                // add_rms_norm_rows plays addRmsNorm's <= 1024 threads
constexpr float kDigitRange = 127.0f * 65536.0f;  // |x| / s at most: the top digit within [-127, 127]

__device__ __forceinline__ void imma(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
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

__device__ __forceinline__ void imma_u8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
}

// Byte offset in the digits' shared array of digit p of column k: [item][mma j][digit 0-3][t][8 columns], so that
// the lanes' B fragments of one mma are 16 consecutive 8-byte words (digit 3 is zero: lanes of columns 3-7).
// int8: item of 64 columns, lane t's 16 at 16t, mma j = 0, 1 its columns 8j .. 8j + 7 in order. int4: item of 128,
// lane t's 32 at 32t, mma j its columns 8j .. 8j + 7 as the low nibbles (even columns: b0) and the high (b1).
template <bool kInt4>
__device__ __forceinline__ int digit_at(int k, int p) {
  if constexpr (kInt4) {
    const int c = k >> 7, r = k & 127, t = r >> 5, j = (r >> 3) & 3, e = r & 7;
    return ((((c * 4 + j) * 4 + p) * 4 + t) << 3) + (e & 1) * 4 + (e >> 1);
  } else {
    const int c = k >> 6, r = k & 63, t = r >> 4, m = (r >> 3) & 1, i = r & 7;
    return ((((c * 2 + m) * 4 + p) * 4 + t) << 3) + i;
  }
}

// Digits of x's float4 i (columns 4i .. 4i + 3), called by whole warps: the warp's 32 float4s are one run of 128
// columns (an int4 item, two int8 items) with the scale max|x| / kDigitRange over the run (run_scales[4i / 128]);
// their digits go to digit_at's bytes (4 consecutive for int8; for int4 2 + 2, the low and high nibbles' halves), and
// for int4 the run's digit sums to digit_sums (codes are value + 8: the sums take 8 x these off).
template <bool kInt4>
__device__ __forceinline__ void stage_digits(int i, float4 v, int lane, unsigned char* digits, int* digit_sums,
                                             float* run_scales) {
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float inv = amax > 0 ? kDigitRange / amax : 0.0f;
  const int k = 4 * i;
  if (lane == 0) run_scales[k >> 7] = amax / kDigitRange;
  const float xs[4] = {v.x, v.y, v.z, v.w};
  uint32_t word[3] = {0, 0, 0};
  int dsum[3] = {0, 0, 0};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int X = __float2int_rn(fminf(fmaxf(xs[e] * inv, -kDigitRange), kDigitRange));
    const int d2 = ((X + 128) & 255) - 128, x1 = (X - d2) >> 8;
    const int d1 = ((x1 + 128) & 255) - 128, d0 = (x1 - d1) >> 8;
    const int d[3] = {d0, d1, d2};
    const int byte = kInt4 ? (e & 1) * 2 + (e >> 1) : e;
#pragma unroll
    for (int p = 0; p < 3; ++p) {
      word[p] |= uint32_t(d[p] & 255) << (8 * byte);
      dsum[p] += d[p];
    }
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t wd = p < 3 ? word[p] : 0u;
    if constexpr (kInt4) {
      *reinterpret_cast<uint16_t*>(digits + digit_at<kInt4>(k, p)) = static_cast<uint16_t>(wd);
      *reinterpret_cast<uint16_t*>(digits + digit_at<kInt4>(k + 1, p)) = static_cast<uint16_t>(wd >> 16);
    } else {
      *reinterpret_cast<uint32_t*>(digits + digit_at<kInt4>(k, p)) = wd;
    }
  }
  if constexpr (kInt4) {
    const int s0 = warp_sum_int(dsum[0]), s1 = warp_sum_int(dsum[1]), s2 = warp_sum_int(dsum[2]);
    if (lane == 0) {
      int* ds = digit_sums + (k >> 7) * 4;
      ds[0] = s0, ds[1] = s1, ds[2] = s2, ds[3] = 0;
    }
  }
}

// R row tiles a task (1, or 2: gate and up), U ring slots. Grid: at most kBlocksPerSm a SM, block b takes tasks
// b, b + gridDim.x, ... Shared memory: the digits (4 bytes a column), int4: the digits' sums [K / G][4] int, then the
// warps' sums [2][kWarps][R][32] int4 (int8: s32) or float4 (int4).
template <bool kInt4, int R, int U>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    gemv_imma_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                     int group_shift, float* __restrict__ y, int N, int K, AddRmsNormInput norm) {
  constexpr int kItem = kInt4 ? 128 : 64;  // columns an item
  extern __shared__ __align__(16) unsigned char smem[];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int KC = K / kItem, n_tasks = (N + 15) / 16, n_groups = kInt4 ? K >> group_shift : 1;
  const size_t row_bytes = kInt4 ? K / 2 : K;
  const int n_w = (KC - warp + kWarps - 1) / kWarps;  // this warp's items of a tile (KC >= kWarps)
  const int my_tasks = (n_tasks - static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) - 1) / static_cast<int>(gridDim.x);
  unsigned char* digits = smem;
  int* digit_sums = reinterpret_cast<int*>(smem + size_t(K) * 4);  // int4: [K / 128][4], an item's
  float4* sums = reinterpret_cast<float4*>(smem + size_t(K) * 4 + (kInt4 ? size_t(KC) * 16 : 0));  // [2][kWarps][R][32]
  float* run_scales = reinterpret_cast<float*>(sums + size_t(2) * kWarps * R * 32);  // [K / 128]

  // Row g (+ 8 half) of tile r of a task, clamped to the matrix: rows past N are read and not stored.
  const auto row_of = [&](int task, int r, int half) { return min(task * 16 + g + 8 * half, N - 1) + r * N; };
  uint4 wv[U][R][2];
  uint32_t sc[U][kInt4 ? R : 1][kInt4 ? 2 : 1];  // int4: the group scales of rows g, g + 8 (bf16 bits)
  int lt = blockIdx.x, lj = 0, requested = 0;      // next item to request: task lt, item warp + 8 lj of its rows
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
          wv[s][r][h] = __ldg(reinterpret_cast<const uint4*>(w + size_t(row) * row_bytes + size_t(item) * (kItem / (kInt4 ? 2 : 1))) + t);
          if constexpr (kInt4) sc[s][r][h] = __ldg(scales + size_t(row) * n_groups + ((item * kItem) >> group_shift));
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
  // x's digits, 128 columns (a warp's 32 float4s) at a time, each run with its own scale: no block-wide maximum to
  // wait for, and the norm's normed values go straight into digits.
  const auto stage = [&](int i, float4 v) { stage_digits<kInt4>(i, v, lane, digits, digit_sums, run_scales); };
  if (norm.y && norm.weight_bf16)
    add_rms_norm_rows<kThreads, kMaxNormK, __nv_bfloat16>(reinterpret_cast<const float4*>(x), norm, K, stage);
  else if (norm.y)
    add_rms_norm_rows<kThreads, kMaxNormK, float>(reinterpret_cast<const float4*>(x), norm, K, stage);
  else
    for (int i = threadIdx.x; i < K / 4; i += kThreads) stage(i, reinterpret_cast<const float4*>(x)[i]);
  __syncthreads();

  float fsum[R][4] = {};  // the C fragment's sums, each item's exact s32 sums scaled into them
  int ct = blockIdx.x, cj = 0, tile = 0;  // the item to use next
  const uint2* b_words = reinterpret_cast<const uint2*>(digits) + ((g & 3) * 4 + t);
  const auto step = [&](auto slot) {
    constexpr int s = decltype(slot)::value;
    if (ct >= n_tasks) return true;
    const int item = warp + kWarps * cj;
    if constexpr (kInt4) {
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
        const float rs = run_scales[item];
        const float s0 = __uint_as_float(sc[s][r][0] << 16) * rs, s1 = __uint_as_float(sc[s][r][1] << 16) * rs;
        fsum[r][0] = fmaf(s0, float(c[0] - corr0), fsum[r][0]);
        fsum[r][1] = fmaf(s0, float(c[1] - corr1), fsum[r][1]);
        fsum[r][2] = fmaf(s1, float(c[2] - corr0), fsum[r][2]);
        fsum[r][3] = fmaf(s1, float(c[3] - corr1), fsum[r][3]);
      }
    } else {
      const uint2 b0 = b_words[(item * 2) * 16], b1 = b_words[(item * 2 + 1) * 16];
      const float rs = run_scales[item >> 1];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        int c[2][4] = {};
        imma(c[0], wv[s][r][0].x, wv[s][r][1].x, wv[s][r][0].y, wv[s][r][1].y, b0);
        imma(c[1], wv[s][r][0].z, wv[s][r][1].z, wv[s][r][0].w, wv[s][r][1].w, b1);
#pragma unroll
        for (int i = 0; i < 4; ++i) fsum[r][i] = fmaf(rs, float(c[0][i] + c[1][i]), fsum[r][i]);
      }
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
          const float scale = kInt4 ? 1.0f : __uint_as_float(uint32_t(scales[row_of(ct, r, h)]) << 16);
          v[r][h] = (d0 * 65536.0f + (d1 * 256.0f + d2)) * scale;
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

}  // namespace

bool gemv_one_token_imma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                         int group, float* y, int N, int K, bool pairs, const AddRmsNormInput* norm) {
  const bool int4 = w_dtype == DType::I4;
  const int item = int4 ? 128 : 64;
  if ((w_dtype != DType::I8 && !int4) || K % 128 != 0 || K / item < kWarps || K > kMaxK || N <= 0) return false;
  if (int4 ? group % 128 != 0 || (group & (group - 1)) != 0 || K % group != 0 : group != K) return false;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(w) || !aligned(x)) return false;
  if (norm && (K > kMaxNormK || !(aligned(norm->y) && aligned(norm->sum) && aligned(norm->normed) && aligned(norm->weight))))
    return false;
  int group_shift = 0;
  while (int4 && (1 << group_shift) < group) ++group_shift;
  const int n_tasks = (N + 15) / 16;
  const int R = pairs ? 2 : 1;
  const size_t smem = size_t(K) * 4 + (int4 ? size_t(K / 128) * 16 : 0) + size_t(2) * kWarps * R * 32 * sizeof(float4) +
                      size_t(K / 128) * sizeof(float);
  const AddRmsNormInput plain{};
  const int grid = std::min(n_tasks, kBlocksPerSm * sm_count(ctx));
  auto launch = [&](auto kernel) {
    // the kernel's static shared memory (~0.5 KiB) counts against the default 48 KiB too: always raise the limit
    static size_t allowed[2][2] = {};  // per instantiation (int4, pairs): the most set so far
    if (smem > allowed[int4][pairs]) {
      check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "gemv",
                 " (cudaFuncSetAttribute)");
      allowed[int4][pairs] = smem;
    }
    launch_pdl(ctx, kernel, dim3(grid), dim3(kThreads), smem, x, static_cast<const uint8_t*>(w), scales, group_shift,
               y, N, K, norm ? *norm : plain);
  };
  if (int4) {
    if (pairs) launch(gemv_imma_kernel<true, 2, 3>);
    else launch(gemv_imma_kernel<true, 1, 8>);
  } else {
    if (pairs) launch(gemv_imma_kernel<false, 2, 4>);
    else launch(gemv_imma_kernel<false, 1, 8>);
  }
  return true;
}

}  // namespace weft::cuda
