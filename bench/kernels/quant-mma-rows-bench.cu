// An experiment for issue 17 (not weft's kernel yet): the one-token int4 (groups of 128) and int8 (per channel)
// GEMVs with each block's rows streamed into shared memory by bulk copies, as gemv-rows-tma.cu does, but summed on
// tensor cores.
//   Why: on H200 the one-token int4 and int8 GEMVs run at ~35% and ~61% of their floor, bound by instruction issue
//   (ncu, 2026-12-02: 0.16-0.22 warp instructions a weight, DRAM at 21-47% of its peak; bench/RESULTS.md session
//   12). Here a weight costs about half a logic op and half an f16x2 op (to an exact f16 pair) and one mma.sync
//   m16n8k16 takes 256 weights: an estimated ~0.05 warp instructions a weight.
//   - x keeps fp32's precision: B's column 0 is x rounded to f16 (hi), column 1 is x - hi in f16 (lo); the
//     products are exact in the MMA's f32 accumulator and a row's sum is hi + lo. Columns 2-7 repeat them, unused.
//   - A stage is ~64 KiB: two m16 tiles of int4 rows (and their scales), one tile of int8 rows. A tile's 128-column
//     "superchunks" are split over the warps that share it; per superchunk lane (g, t) loads its 32 columns of rows
//     g and g + 8 and makes 16 f16 pairs a row; MMA j takes pairs 2j and 2j + 1 at k-slots 2t .. 2t + 1 and
//     2t + 8 .. 2t + 9, and B takes x's pairs for the same columns, staged once a block in that order
//     (pair_column). int4 scales each superchunk's MMA sums (fresh accumulators) into the row's f32 sums, int8 its
//     row's total. A tile's warps meet in shared memory, summed in a fixed order.
//   - The fragment mapping was checked on the host against plain dot products (an emulation of mma.m16n8k16's
//     fragment layout); the kernel itself has not run yet.
// It runs 32 Llama-2-7B layers' wqkv, wo and w13 (as 22016 plain rows) in one graph with programmatic dependent
// launch, beside weft's one-token kernel (gemv_one_token), and checks every output against weft's:
//   bench/kernels/quant-mma-rows-run.sh
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <utility>
#include <vector>

#include "bench-device.cuh"
#include "cuda/bandwidth.cuh"
#include "cuda/bulk-copy.cuh"
#include "cuda/common.cuh"
#include "cuda/gemv-one-token.cuh"
#include "cuda/gemv-weight-vectors.cuh"

using weft::DType;
namespace wc = weft::cuda;

namespace {

constexpr int kWarps = 8, kThreads = kWarps * 32;
constexpr int kGroup = 128;  // columns a "superchunk": one int4 scale, and 8 MMAs a row tile
constexpr int kStages = 3;
constexpr int kSmemBytes = 220 * 1024;

// int4: a word's four f16 pairs (c, c + 4), (c + 1, c + 5), (c + 2, c + 6), (c + 3, c + 7), exact.
// int8: a word's two f16 pairs (c, c + 1), (c + 2, c + 3): byte b ^ 0x80 under 0x64 is 1024 + b + 128, minus 1152.
template <bool kInt8>
__device__ __forceinline__ void f16_pairs(uint32_t word, uint32_t* p) {
  if constexpr (kInt8) {
    const uint32_t u = word ^ 0x80808080u;
    const __half2 h1152 = __float2half2_rn(1152.f);
    const uint32_t b[2] = {__byte_perm(u, 0x64646464u, 0x5140), __byte_perm(u, 0x64646464u, 0x7362)};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&b[i]), h1152);
      p[i] = *reinterpret_cast<const uint32_t*>(&r);
    }
  } else {
    __half2 r[4];
    wc::int4_half2_pairs(word, r);  // the one-token kernels' unpacking (gemv-weight-vectors.cuh)
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = *reinterpret_cast<const uint32_t*>(&r[i]);
  }
}

// The first column of lane column t's pair p (0..15) in superchunk q; the pair is (c, c + step).
template <bool kInt8>
__host__ __device__ __forceinline__ int pair_column(int q, int t, int p) {
  return kInt8 ? kGroup * q + 32 * t + 4 * (p / 2) + 2 * (p % 2) : kGroup * q + 32 * t + 8 * (p / 4) + p % 4;
}
template <bool kInt8> constexpr int kPairStep = kInt8 ? 1 : 4;

__device__ __forceinline__ void mma_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// y [N] = x [K] @ dequant(w)^T: int4 codes [N, K / 2] with bf16 scales [N, K / 128] (kInt8 false), or int8 [N, K]
// with one bf16 scale a row. K a multiple of 1024; rpb rows a block. A stage is kTiles m16 tiles (int4 2, int8 1:
// ~64 KiB either way); the tile's K is split over kWarps / kTiles warps. Dynamic shared memory: x pairs hi [K / 2]
// and lo [K / 2] (f16x2 words in the lanes' order), then kStages stages (rows, then int4's scales).
template <bool kInt8>
__global__ void __launch_bounds__(kThreads, 1)
    mma_rows_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const uint16_t* __restrict__ scales,
                    float* __restrict__ y, int N, int K, int rpb) {
  constexpr int kTiles = kInt8 ? 1 : 2, kStageRows = 16 * kTiles, kParts = kWarps / kTiles;
  constexpr int kLaneBytes = kInt8 ? 32 : 16, kWords = kLaneBytes / 4, kPairsPerWord = 16 / kWords;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ alignas(8) uint64_t full[kStages];
  __shared__ float partial[kWarps][16];
  wc::pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row_bytes = kInt8 ? K : K / 2, n_groups = K / kGroup, scale_bytes = kInt8 ? 0 : kStageRows * n_groups * 2;
  const int stage_bytes = kStageRows * row_bytes + scale_bytes;
  const int out0 = blockIdx.x * rpb, outs = min(rpb, N - out0), n_stages = (outs + kStageRows - 1) / kStageRows;
  uint32_t* x_hi = reinterpret_cast<uint32_t*>(smem);
  uint32_t* x_lo = x_hi + K / 2;
  unsigned char* ring = smem + K * 4;
  const auto issue = [&](int it) {
    const int s = it % kStages, o0 = out0 + it * kStageRows, n = min(kStageRows, out0 + outs - o0);
    unsigned char* dst = ring + s * stage_bytes;
    wc::mbar_expect_bytes(&full[s], n * row_bytes + (kInt8 ? 0 : n * n_groups * 2));
    wc::bulk_copy(dst, w + static_cast<size_t>(o0) * row_bytes, n * row_bytes, &full[s]);
    if (!kInt8) wc::bulk_copy(dst + kStageRows * row_bytes, scales + static_cast<size_t>(o0) * n_groups, n * n_groups * 2, &full[s]);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) wc::mbar_init(&full[s]);
    wc::mbar_init_fence();
    for (int it = 0; it < min(kStages, n_stages); ++it) issue(it);
  }
  wc::pdl_wait();
  // x as f16 hi and lo pairs, word i = (superchunk q, lane column t, pair p): the columns pair_column(q, t, p) and
  // + kPairStep, in the order the lanes' B fragments take them.
  for (int i = threadIdx.x; i < K / 2; i += kThreads) {
    const int c = pair_column<kInt8>(i / 64, (i / 16) % 4, i % 16);
    const float a = x[c], b = x[c + kPairStep<kInt8>];
    const __half ha = __float2half_rn(a), hb = __float2half_rn(b);
    const __half2 hi = __halves2half2(ha, hb);
    const __half2 lo = __halves2half2(__float2half_rn(a - __half2float(ha)), __float2half_rn(b - __half2float(hb)));
    x_hi[i] = *reinterpret_cast<const uint32_t*>(&hi);
    x_lo[i] = *reinterpret_cast<const uint32_t*>(&lo);
  }
  __syncthreads();
  const int tile = warp % kTiles, part = warp / kTiles, per_part = n_groups / kParts;
  const uint32_t* xs = (g & 1) ? x_lo : x_hi;  // B's column g: hi in even columns, lo in odd
  for (int it = 0; it < n_stages; ++it) {
    const int s = it % kStages, first = it * kStageRows, n = min(kStageRows, outs - first);
    wc::mbar_wait(&full[s], (it / kStages) & 1);
    const unsigned char* stage = ring + s * stage_bytes;
    const uint16_t* stage_scales = reinterpret_cast<const uint16_t*>(stage + kStageRows * row_bytes);
    const unsigned char* row_a = stage + (tile * 16 + g) * row_bytes;  // rows g and g + 8 of the tile
    const unsigned char* row_b = row_a + 8 * row_bytes;
    float acc[4] = {};
    for (int q = part * per_part; q < (part + 1) * per_part; ++q) {
      uint32_t wa[kWords], wb[kWords];
#pragma unroll
      for (int v = 0; v < kLaneBytes / 16; ++v) {
        *reinterpret_cast<uint4*>(wa + 4 * v) = *reinterpret_cast<const uint4*>(row_a + (kLaneBytes * 4) * q + kLaneBytes * t + 16 * v);
        *reinterpret_cast<uint4*>(wb + 4 * v) = *reinterpret_cast<const uint4*>(row_b + (kLaneBytes * 4) * q + kLaneBytes * t + 16 * v);
      }
      const uint4* xq = reinterpret_cast<const uint4*>(xs + q * 64 + t * 16);
      float d[4] = {};
#pragma unroll
      for (int v = 0; v < 4; ++v) {  // pairs 4v .. 4v + 3: MMAs 2v and 2v + 1
        uint32_t pa[4], pb[4];
#pragma unroll
        for (int k = 0; k < 4 / kPairsPerWord; ++k) {
          f16_pairs<kInt8>(wa[v * (4 / kPairsPerWord) + k], pa + k * kPairsPerWord);
          f16_pairs<kInt8>(wb[v * (4 / kPairsPerWord) + k], pb + k * kPairsPerWord);
        }
        const uint4 xv = xq[v];
        mma_f16(d, pa[0], pb[0], pa[1], pb[1], xv.x, xv.y);
        mma_f16(d, pa[2], pb[2], pa[3], pb[3], xv.z, xv.w);
      }
      if constexpr (kInt8) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += d[i];
      } else {
        const float sa = wc::bf16_bits_to_f32(stage_scales[(tile * 16 + g) * n_groups + q]);
        const float sb = wc::bf16_bits_to_f32(stage_scales[(tile * 16 + g + 8) * n_groups + q]);
        acc[0] = fmaf(sa, d[0], acc[0]);
        acc[1] = fmaf(sa, d[1], acc[1]);
        acc[2] = fmaf(sb, d[2], acc[2]);
        acc[3] = fmaf(sb, d[3], acc[3]);
      }
    }
    if (t == 0) {  // columns 0 (hi) and 1 (lo) of rows g and g + 8
      partial[warp][g] = acc[0] + acc[1];
      partial[warp][g + 8] = acc[2] + acc[3];
    }
    __syncthreads();  // every warp is done with stage s and has written its partial sums
    if (static_cast<int>(threadIdx.x) < n) {
      const int r = threadIdx.x, tl = r / 16, rr = r % 16;
      float sum = 0.f;
      for (int p = 0; p < kParts; ++p) sum += partial[tl + kTiles * p][rr];
      if (kInt8) sum *= wc::bf16_bits_to_f32(__ldg(scales + out0 + first + r));
      y[out0 + first + r] = sum;
    }
    if (threadIdx.x == 0 && it + kStages < n_stages) {
      wc::reads_before_copies();
      issue(it + kStages);
    }
    __syncthreads();  // partial is read before the next stage writes it
  }
}

template <bool kInt8>
bool launch_mma_rows(const wc::Ctx& ctx, const float* x, const uint8_t* w, const uint16_t* scales, float* y, int N, int K,
                     int sms) {
  constexpr int kStageRows = kInt8 ? 16 : 32;
  if (K % (kWarps * kGroup) != 0) return false;
  const int stage_bytes = kStageRows * (kInt8 ? K : K / 2) + (kInt8 ? 0 : kStageRows * (K / kGroup) * 2);
  const int smem = K * 4 + kStages * stage_bytes;
  if (smem > kSmemBytes) return false;
  static bool set = false;
  if (!set) {
    CK(cudaFuncSetAttribute(mma_rows_kernel<kInt8>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    set = true;
  }
  const int rpb = (N + sms - 1) / sms;
  wc::launch_pdl(ctx, mma_rows_kernel<kInt8>, dim3((N + rpb - 1) / rpb), dim3(kThreads), static_cast<size_t>(smem), x, w,
                 scales, y, N, K, rpb);
  return true;
}

}  // namespace

template <bool kInt8>
void run_format(bench::Device& dev, double bw, int sms) {
  const wc::Ctx& ctx = dev.ctx;
  cudaStream_t stream = dev.stream;
  struct Shape { const char* name; int N, K; };
  const Shape shapes[] = {{"wqkv", 12288, 4096}, {"wo", 4096, 4096}, {"w13", 22016, 4096}};
  const int layers = 32;
  const DType dt = kInt8 ? DType::I8 : DType::I4;
  std::vector<uint8_t*> ws[3];
  std::vector<uint16_t*> ss[3];
  size_t layer_bytes = 0;
  for (int s = 0; s < 3; ++s) {
    const size_t n = shapes[s].N, k = shapes[s].K;
    const size_t bytes = kInt8 ? n * k : n * k / 2, n_scales = kInt8 ? n : n * k / kGroup;
    layer_bytes += bytes + 2 * n_scales;
    for (int l = 0; l < layers; ++l) {
      uint8_t* p;
      uint16_t* q;
      CK(cudaMalloc(&p, bytes));
      CK(cudaMalloc(&q, 2 * n_scales));
      bench::fill_bf16<<<1024, 256, 0, stream>>>(reinterpret_cast<__nv_bfloat16*>(p), bytes / 2, 100 * s + l);  // any bits are codes
      bench::fill_scales<<<256, 256, 0, stream>>>(q, n_scales, 1000 + 100 * s + l);
      ws[s].push_back(p);
      ss[s].push_back(q);
    }
  }
  float *x, *y;
  CK(cudaMalloc(&x, 4096 * 4));
  CK(cudaMalloc(&y, 3 * 22016 * 4));
  bench::fill_f32<<<64, 256, 0, stream>>>(x, 4096, 7);
  float* ys[3] = {y, y + 22016, y + 2 * 22016};
  const auto weft = [&](int s, int l) {
    if (!wc::gemv_one_token(ctx, x, ws[s][l], dt, ss[s][l], kInt8 ? shapes[s].K : kGroup, ys[s], shapes[s].N, shapes[s].K, false))
      std::exit(3);
  };
  const auto mma = [&](int s, int l) {
    if (!launch_mma_rows<kInt8>(ctx, x, ws[s][l], ss[s][l], ys[s], shapes[s].N, shapes[s].K, sms)) std::exit(4);
  };
  const auto outputs = [&](const std::function<void(int, int)>& run, int s) {
    CK(cudaMemsetAsync(ys[s], 0xff, shapes[s].N * 4, stream));
    run(s, 0);
    std::vector<float> got(shapes[s].N);
    CK(cudaMemcpyAsync(got.data(), ys[s], shapes[s].N * 4, cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    return got;
  };
  double err = 0;
  for (int s = 0; s < 3; ++s) {
    const std::vector<float> want = outputs(weft, s), got = outputs(mma, s);
    double scale = 0, e = 0;
    for (int i = 0; i < shapes[s].N; ++i) {
      scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
      e = std::max(e, std::isfinite(got[i]) ? static_cast<double>(std::fabs(got[i] - want[i])) : 1e30);
    }
    err = std::max(err, e / scale);
  }
  std::printf("\n%s (wqkv, wo, w13): floor per layer %.1f us (%.1f MB); max |mma - weft| / max |weft| %.1e\n",
              kInt8 ? "int8 per channel" : "int4 g128", layer_bytes / (bw * 1e3), layer_bytes / 1e6, err);
  std::printf("| kernel | layer us | %% of floor | wqkv us | wo us | w13 us |\n|---|---|---|---|---|---|\n");
  const std::pair<const char*, std::function<void(int, int)>> kernels[] = {{"weft (gemv_one_token)", weft},
                                                                          {"tensor-core rows (experiment)", mma}};
  for (const auto& [name, run] : kernels) {
    const auto per_layer_us = [&](const auto& body) { return dev.graph_median_ms(3, 15, body) * 1e3 / layers; };
    const double all = per_layer_us([&] {
      for (int l = 0; l < layers; ++l)
        for (int s = 0; s < 3; ++s) run(s, l);
    });
    double alone[3];
    for (int s = 0; s < 3; ++s)
      alone[s] = per_layer_us([&] {
        for (int l = 0; l < layers; ++l) run(s, l);
      });
    std::printf("| %s | %.1f | %.0f%% | %.1f | %.1f | %.1f |\n", name, all, 100.0 * layer_bytes / (bw * 1e3) / all, alone[0],
                alone[1], alone[2]);
  }
  for (int s = 0; s < 3; ++s)
    for (int l = 0; l < layers; ++l) {
      CK(cudaFree(ws[s][l]));
      CK(cudaFree(ss[s][l]));
    }
  CK(cudaFree(x));
  CK(cudaFree(y));
}

int main() {
  bench::Device dev(cudaStreamNonBlocking);
  const double bw = wc::measure_read_bandwidth(dev.ctx, size_t{1} << 30, 10);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::printf("%s, read bandwidth %.0f GB/s, %d SMs\n", dev.prop.name, bw, sms);
  run_format<false>(dev, bw, sms);
  run_format<true>(dev, bw, sms);
  return 0;
}
