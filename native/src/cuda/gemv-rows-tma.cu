// gemv_rows_tma (gemv-rows-tma.cuh): the one-token GEMV (bf16 or int4 weights) with each block's rows streamed
// into shared memory by bulk asynchronous copies (TMA).
//   - One block a SM (8 warps for bf16, 16 for int4, 8 for int4 rows over ~5.5 KiB; up to 220 KiB of shared memory,
//     226 for int4) takes a contiguous run of
//     rows, M rows a warp a stage (M = 1 for bf16 and for quantized rows over 2 KiB, 2 over 1 KiB, else 4: a stage of
//     ~64 KiB at K = 4096), in a ring of 2-4 stages. Thread 0 issues a stage's rows (and, scaled a group, their scales) as bulk copies that complete on the
//     stage's mbarrier; the ring's first stages are issued before the block waits for the kernel before it (the
//     weights do not depend on it: programmatic dependent launch, common.cuh), a stage is issued again as soon as
//     every warp has read it. So a SM keeps up to 192 KiB of weights in flight with one instruction a 32 KiB.
//   - Warp w of W sums stage rows w + W m: lane l reads 16-byte vectors l, l + 32, ... of a row from shared memory (512
//     contiguous bytes a warp: no bank conflict) against x, staged once per block as f32, sub-vector-major as the
//     register kernels stage it (gemv-weight-vectors.cuh). Sums are fp32 over exact weights in the register kernels'
//     orders, so a row's sum is the same bits on either kernel: bf16 as the batched kernel (each vector's 8 products
//     summed, then added; a gated GEMV at one token still runs there), int4 as the streaming kernel (one chain a
//     row scaled at its end, or each vector's chain scaled into the row's); lanes in order, the warp's shuffle tree last.
//   - Pairs (matmulSiluMul): a stage is W M / 2 gate rows and their up rows; a pair's two sums meet in shared memory
//     and are stored as silu(gate) * up.
//   - A deferred addRmsNorm as the input (AddRmsNormInput): each block makes the normed row itself from the residual
//     and the branch output while its first stages are in flight, in place of a kernel of its own before the GEMV
//     (a one-block kernel and a dependent launch on the critical path, twice a layer).
//   Measured on H200 (bench/kernels/gemv-layer-bench.cu: 32 Llama-2-7B layers' bf16 GEMVs in one graph,
//   2026-12-02): wqkv 27.1 -> 24.9 us, wo 11.3 -> 10.1, w13 44.9 -> 42.9 against the batched register kernel
//   (w2, K = 11008, 25.1 -> 24.6 with 2-row stages, and 35.4 in chunks of 2048 columns, 8 copies a stage: bf16 K > 4096
//   stays on the register kernels). Two blocks a SM (128 threads, 112 KiB, so the next GEMV's block is resident
//   early) took the layer from 104.4 to 118.9 us: the bytes in flight a SM matter more.
#include "cuda/gemv-rows-tma.cuh"

#include <algorithm>

#include "cuda/bulk-copy.cuh"
#include "cuda/common.cuh"
#include "cuda/gemv-weight-vectors.cuh"
#include "cuda/rms-norm.cuh"

namespace weft::cuda {
namespace {

// Warps a block: 8 for bf16; 16 for int4, whose dequantization takes issue slots that 8 warps leave idle (a
// Llama-2-7B layer's int4 GEMVs 66.8 us against 72.2 with 8 warps, gemv-layer-run.sh int4).
// Long int4 rows (K = 11008 - 14336) take half the warps, so that two stages of a row a warp fit beside x.
template <Format F> constexpr int kWarpsOf = F == Format::BF16 ? 8 : 16;
constexpr int kMaxStages = 4;
constexpr size_t kSmemBytes = 220 * 1024;
// int4 asks for all but ~1 KiB of a Hopper block's 227 KiB: Llama-2-7B's down projection (K = 11008) needs 2 stages of
// 16 rows of 5.5 KiB beside x's 43 KiB. Two blocks a SM at 110 KiB each, so that the next GEMV's block is resident
// and copying early, took a layer from 64.4 to 89.5 us; 1-row stages, 6 deep, 68.9 (H200, gemv-layer-run.sh int4).
constexpr size_t kQuantSmemBytes = 226 * 1024;
constexpr int kMaxBf16RowBytes = 8 * 1024;  // bf16 K <= 4096 (longer rows lost to the register kernel, header)

// Stages x in shared memory as f32, sub-vector-major (gemv-weight-vectors.cuh): float4 i of x at xs4[(i % H) KV + i / H],
// H float4s a weight vector.
template <int H>
__device__ __forceinline__ void stage_x(const float4* __restrict__ x4, float4* xs4, int K) {
  const int KV = K / (4 * H);
  loads_ahead<4>(K / 4, [&](int i) { return x4[i]; }, [&](int i, float4 v) { xs4[(i % H) * KV + i / H] = v; });
}

// Stages addRmsNorm's normed row of x and norm.y instead (rms-norm.cuh add_rms_norm_row), sub-vector-major.
template <int kWarps, int H, typename W>
__device__ void stage_add_rms_norm(const float4* __restrict__ x4, const AddRmsNormInput& norm, float4* xs4, int K,
                                   const HeldNormWeight<kWarps * 32, W>& weight) {
  const int KV = K / (4 * H);
  add_rms_norm_row<kWarps * 32, W>(x4, norm, K, weight, [&](int i, float4 o) { xs4[(i % H) * KV + i / H] = o; });
}

// The kernel's shape beyond the template: weights w [N or 2N, K] in format F with bf16 scales [rows, n_groups]
// (quantized; group_shift = log2 of the vectors a group), rpb outputs a block, stages ring stages of stage_bytes
// (the rows, then their scales where scaled a vector), x_bytes of x before the ring.
struct RowsLaunch {
  const void* w;
  const uint16_t* scales;
  int n_groups, group_shift, N, K, rpb, stages, x_bytes, stage_bytes;
};

// y [N] (pairs: silu(gate) * up of w's rows f and N + f) = x [K] @ dequant(w)^T. Block b: outputs [b rpb, (b + 1)
// rpb), M rows a warp a stage (pairs: the stage's gate rows, then their up rows). kRowScale: one scale
// a row, applied to its sum; otherwise quantized rows scale each vector's sum (bf16: none).
template <Format F, int kWarps, int M, bool kPairs, bool kRowScale>
__global__ void __launch_bounds__(kWarps * 32, 1)
    gemv_rows_tma_kernel(const float* __restrict__ x, float* __restrict__ y, RowsLaunch p, AddRmsNormInput norm) {
  constexpr int VW = kVectorWeights<F>, H = VW / 4;
  constexpr int kRows = kWarps * M, kOuts = kPairs ? kRows / 2 : kRows;
  constexpr bool kVectorScale = F != Format::BF16 && !kRowScale;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ alignas(8) uint64_t full[kMaxStages];
  __shared__ float pair_sums[kPairs ? kRows : 1];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, N = p.N, K = p.K, KV = K / VW;
  const int out0 = blockIdx.x * p.rpb, outs = min(p.rpb, N - out0), n_stages = (outs + kOuts - 1) / kOuts;
  const size_t row_bytes = static_cast<size_t>(KV) * 16, scale_row_bytes = static_cast<size_t>(p.n_groups) * 2;
  float4* xs4 = reinterpret_cast<float4*>(smem);
  unsigned char* ring = smem + p.x_bytes;
  const unsigned char* w = static_cast<const unsigned char*>(p.w);
  const auto issue = [&](int it) {  // thread 0: outputs out0 + it kOuts .. into stage it % stages
    const int s = it % p.stages, o0 = out0 + it * kOuts, n = min(kOuts, out0 + outs - o0);
    // a stage's scales as whole 16-byte runs: the run ends up to 14 bytes past its rows' (host: still in the array)
    const uint32_t bytes = static_cast<uint32_t>(n * row_bytes),
                   scale_bytes = kVectorScale ? (n * scale_row_bytes + 15) / 16 * 16 : 0;
    mbar_expect_bytes(&full[s], (kPairs ? 2 : 1) * (bytes + scale_bytes));
    unsigned char* dst = ring + static_cast<size_t>(s) * p.stage_bytes;
    unsigned char* dst_scales = dst + kRows * row_bytes;
    bulk_copy(dst, w + o0 * row_bytes, bytes, &full[s]);
    if (kVectorScale) bulk_copy(dst_scales, p.scales + o0 * static_cast<size_t>(p.n_groups), scale_bytes, &full[s]);
    if (kPairs) {
      bulk_copy(dst + kOuts * row_bytes, w + (static_cast<size_t>(N) + o0) * row_bytes, bytes, &full[s]);
      if (kVectorScale)
        bulk_copy(dst_scales + kOuts * scale_row_bytes, p.scales + (static_cast<size_t>(N) + o0) * p.n_groups,
                  scale_bytes, &full[s]);
    }
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < p.stages; ++s) mbar_init(&full[s]);
    mbar_init_fence();
    for (int it = 0; it < min(p.stages, n_stages); ++it) issue(it);
  }
  HeldNormWeight<kWarps * 32, __nv_bfloat16> norm_bf16;  // the held norm's weight, read before the wait
  HeldNormWeight<kWarps * 32, float> norm_f32;
  if (norm.y && norm.weight_bf16) norm_bf16.load(norm, K);
  else if (norm.y) norm_f32.load(norm, K);
  pdl_wait();  // x (or norm.y) comes from the kernel before
  const float4* x4 = reinterpret_cast<const float4*>(x);
  if (!norm.y) stage_x<H>(x4, xs4, K);
  else if (norm.weight_bf16) stage_add_rms_norm<kWarps, H>(x4, norm, xs4, K, norm_bf16);
  else stage_add_rms_norm<kWarps, H>(x4, norm, xs4, K, norm_f32);
  __syncthreads();  // x staged; the barriers' init seen by every thread
  for (int it = 0; it < n_stages; ++it) {
    const int s = it % p.stages, first_out = it * kOuts, n = min(kOuts, outs - first_out);
    // Warp w's stage rows are w + kWarps m; a pair's gate row is out j, its up row out j - kOuts.
    bool valid[M];
    float row_scale[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int j = warp + kWarps * m, out = kPairs && j >= kOuts ? j - kOuts : j;
      valid[m] = out < n;
      if constexpr (kRowScale) {  // asked before the wait, so its latency hides behind the stage's copy
        const size_t row = static_cast<size_t>(out0 + first_out + out) + (kPairs && j >= kOuts ? N : 0);
        row_scale[m] = valid[m] ? bf16_bits_to_f32(__ldg(p.scales + row)) : 0.f;
      }
    }
    mbar_wait(&full[s], (it / p.stages) & 1);
    const unsigned char* stage = ring + static_cast<size_t>(s) * p.stage_bytes;
    const uint16_t* stage_scales = reinterpret_cast<const uint16_t*>(stage + kRows * row_bytes);
    float acc[M] = {};
#pragma unroll(M == 1 ? 4 : 1)
    for (int v = lane; v < KV; v += 32) {
      if constexpr (F == Format::BF16) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (!valid[m]) continue;
          const uint4 u = reinterpret_cast<const uint4*>(stage + (warp + kWarps * m) * row_bytes)[v];
          const float4 xa = xs4[v], xb = xs4[KV + v];
          float part = 0.f;  // the vector's 8 products, then added: the batched register kernel's order, bit for bit
          part = fmaf(__uint_as_float(u.x << 16), xa.x, part);
          part = fmaf(__uint_as_float(u.x & 0xffff0000u), xa.y, part);
          part = fmaf(__uint_as_float(u.y << 16), xa.z, part);
          part = fmaf(__uint_as_float(u.y & 0xffff0000u), xa.w, part);
          part = fmaf(__uint_as_float(u.z << 16), xb.x, part);
          part = fmaf(__uint_as_float(u.z & 0xffff0000u), xb.y, part);
          part = fmaf(__uint_as_float(u.w << 16), xb.z, part);
          part = fmaf(__uint_as_float(u.w & 0xffff0000u), xb.w, part);
          acc[m] += part;
        }
      } else {
        const XVector<F> xv(xs4, KV, v);  // once for the warp's M rows
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (!valid[m]) continue;
          const int j = warp + kWarps * m;
          const uint4 u = reinterpret_cast<const uint4*>(stage + j * row_bytes)[v];
          if constexpr (kRowScale) {
            acc[m] = dot_vector<F>(u, xv, acc[m]);  // the streaming kernel's order (gemv-one-token.cu)
          } else {
            const float scale = bf16_bits_to_f32(stage_scales[j * p.n_groups + (v >> p.group_shift)]);
            acc[m] = fmaf(scale, dot_vector<F>(u, xv, 0.f), acc[m]);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int j = warp + kWarps * m;
      float t = warp_sum(acc[m]);
      if constexpr (kRowScale) t *= row_scale[m];
      if (!kPairs && lane == 0 && valid[m]) y[out0 + first_out + j] = t;
      if (kPairs && lane == 0) pair_sums[j] = t;
    }
    __syncthreads();  // every warp is done with stage s (and pair_sums is written)
    if (kPairs && static_cast<int>(threadIdx.x) < n)
      y[out0 + first_out + threadIdx.x] = silu_times(pair_sums[threadIdx.x], pair_sums[threadIdx.x + kOuts]);
    if (threadIdx.x == 0 && it + p.stages < n_stages) {
      reads_before_copies();
      issue(it + p.stages);
    }
    if (kPairs) __syncthreads();  // pair_sums is read before the next stage writes it
  }
}

template <Format F, int kWarps, int M, bool kPairs, bool kRowScale>
void launch(const Ctx& ctx, const float* x, float* y, const RowsLaunch& p, const AddRmsNormInput& norm, int smem) {
  const auto kernel = gemv_rows_tma_kernel<F, kWarps, M, kPairs, kRowScale>;
  static bool smem_set = false;  // per instantiation
  if (!smem_set) {
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(F == Format::BF16 ? kSmemBytes : kQuantSmemBytes)),
               "matmul", " (cudaFuncSetAttribute)");
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            static_cast<int>(cudaSharedmemCarveoutMaxShared)),
               "matmul", " (cudaFuncSetAttribute)");
    smem_set = true;
  }
  const unsigned grid = static_cast<unsigned>((p.N + p.rpb - 1) / p.rpb);
  launch_pdl(ctx, kernel, dim3(grid), dim3(kWarps * 32), static_cast<size_t>(smem), x, y, p, norm);
}

template <Format F, int kWarps, int M>
void launch_rows(const Ctx& ctx, const float* x, float* y, const RowsLaunch& p, const AddRmsNormInput& norm, int smem,
                 bool pairs, bool row_scale) {
  if (pairs) {
    if (row_scale) launch<F, kWarps, M, true, true>(ctx, x, y, p, norm, smem);
    else launch<F, kWarps, M, true, false>(ctx, x, y, p, norm, smem);
  } else {
    if (row_scale) launch<F, kWarps, M, false, true>(ctx, x, y, p, norm, smem);
    else launch<F, kWarps, M, false, false>(ctx, x, y, p, norm, smem);
  }
}

template <Format F>
void launch_format(const Ctx& ctx, const float* x, float* y, const RowsLaunch& p, const AddRmsNormInput& norm, int smem,
                   int warps, int m, bool pairs, bool row_scale) {
  constexpr int W = kWarpsOf<F>;
  if (warps < W) launch_rows<F, W / 2, 1>(ctx, x, y, p, norm, smem, pairs, row_scale);
  else if (m == 4) launch_rows<F, W, 4>(ctx, x, y, p, norm, smem, pairs, row_scale);
  else if (m == 2) launch_rows<F, W, 2>(ctx, x, y, p, norm, smem, pairs, row_scale);
  else launch_rows<F, W, 1>(ctx, x, y, p, norm, smem, pairs, row_scale);
}

// Hopper's bulk copies and ~220 KiB of shared memory a block; asked once (a process drives one kind of GPU).
bool device_takes_it() {
  static const bool takes = [] {
    int dev = 0, smem = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
           static_cast<size_t>(smem) >= std::max(kSmemBytes, kQuantSmemBytes) + 1024;
  }();
  return takes;
}

}  // namespace

bool gemv_rows_tma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                   float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput* norm) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  // int8 stays on the streaming register kernel: a Llama-2-7B layer's int8 GEMVs took 73.0 us there against 77.6
  // here with 16 warps and 83.3 with 8 (gemv-layer-run.sh int8, H200).
  const bool bf16 = w_dtype == DType::BF16;
  if (!(bf16 || w_dtype == DType::I4)) return false;
  const int vw = bf16 ? 8 : 32;
  if (N <= 0 || K <= 0 || K % vw != 0 || (pairs && N > INT32_MAX / 2) || !aligned(x) || !aligned(w) ||
      !device_takes_it())
    return false;
  const size_t row_bytes = static_cast<size_t>(K / vw) * 16;
  if (bf16 && row_bytes > kMaxBf16RowBytes) return false;
  // Quantized: one scale a row (group K), or one a group of a power of two of vectors (scales copied beside the rows).
  const bool row_scale = !bf16 && group == K;
  const int n_groups = bf16 || row_scale ? 0 : (group > 0 && K % group == 0 ? K / group : -1);
  const int group_shift = n_groups > 0 && group % vw == 0 ? log2_exact(group / vw) : -1;
  // A stage's scales are one bulk copy (16-byte units) from row o0, a multiple of 8 (pairs: 4), and for pairs one from
  // row N + o0: each start 16-byte aligned, the run rounded up to 16 bytes still inside the array. So Llama-2-7B's
  // down projection (86 groups a row) is taken too: 17.0 -> 15.1 us a layer against the streaming kernel (H200).
  const int outs_granule = pairs ? 4 : 8;
  const size_t scale_row_bytes = static_cast<size_t>(n_groups > 0 ? n_groups : 0) * 2;
  if (!bf16 && !row_scale &&
      (n_groups <= 0 || outs_granule * scale_row_bytes % 16 != 0 || static_cast<size_t>(N) * scale_row_bytes % 16 != 0 ||
       group_shift < 0 || !scales || !aligned(scales)))
    return false;
  if (row_scale && !scales) return false;
  if (norm && !held_norm_takes(*norm, K)) return false;
  // Rows a warp a stage (M): a stage of ~64 KiB of short quantized rows takes M rows a warp.
  int warps = bf16 ? kWarpsOf<Format::BF16> : kWarpsOf<Format::I4>;
  const size_t budget = bf16 ? kSmemBytes : kQuantSmemBytes;
  int m = bf16 || row_bytes > 2048 ? 1 : row_bytes > 1024 ? 2 : 4;
  const size_t x_bytes = (static_cast<size_t>(K) * 4 + 127) / 128 * 128;
  size_t stage_bytes;
  int stages;
  for (;;) {
    stage_bytes = static_cast<size_t>(warps * m) * row_bytes + (static_cast<size_t>(warps * m) * scale_row_bytes + 15) / 16 * 16;
    stages = x_bytes >= budget ? 0 : static_cast<int>(std::min<size_t>(kMaxStages, (budget - x_bytes) / stage_bytes));
    if (stages >= 2 || bf16 || (m == 1 && warps < kWarpsOf<Format::I4>)) break;
    if (m > 1) m /= 2;
    else warps /= 2;  // int4 rows too long for two stages of a row a warp (kWarpsOf)
  }
  if (stages < 2) return false;  // a row too long to double-buffer: the register kernels
  int rpb = (N + sms - 1) / sms;
  rpb = (rpb + outs_granule - 1) / outs_granule * outs_granule;
  const RowsLaunch p{w, scales, n_groups, std::max(group_shift, 0), N, K, rpb, stages, static_cast<int>(x_bytes),
                     static_cast<int>(stage_bytes)};
  const AddRmsNormInput plain{};
  const AddRmsNormInput& in = norm ? *norm : plain;
  const int smem = static_cast<int>(x_bytes + stages * stage_bytes);
  constexpr int kBf16Warps = kWarpsOf<Format::BF16>;
  if (bf16 && pairs) launch<Format::BF16, kBf16Warps, 1, true, false>(ctx, x, y, p, in, smem);
  else if (bf16) launch<Format::BF16, kBf16Warps, 1, false, false>(ctx, x, y, p, in, smem);
  else launch_format<Format::I4>(ctx, x, y, p, in, smem, warps, m, pairs, row_scale);
  return true;
}

}  // namespace weft::cuda
