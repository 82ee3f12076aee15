// gemv_rows_tma (gemv-rows-tma.cuh): the one-token bf16 GEMV with each block's rows streamed into shared memory by
// bulk asynchronous copies (TMA).
//   - One block a SM (256 threads, ~208 KiB of shared memory at K = 4096) takes a contiguous run of rows, 8 rows a
//     stage, in a ring of up to 4 stages. Thread 0 issues a stage's rows as one or two bulk copies that complete on
//     the stage's mbarrier; the ring's first stages are issued before the block waits for the kernel before it (the
//     weights do not depend on it: programmatic dependent launch, common.cuh), a stage is issued again as soon as
//     every warp has read it. So a SM keeps up to 192 KiB of weights in flight with one instruction a 32 KiB.
//   - Warp w sums stage row w: lane l reads 16-byte vectors l, l + 32, ... of the row from shared memory (512
//     contiguous bytes a warp: no bank conflict) against x, staged once per block as f32, sub-vector-major as the
//     register kernels stage it (gemv-one-token.cu). The sum of a row is in fp32 over exact weights, each vector's
//     8 products summed and then added, lanes in order and the warp's shuffle tree last: the batched register
//     kernel's order, so a row's sum is the same bits on either kernel (a gated GEMV at one token still runs
//     there) and a pair's gate and up sums equal the plain GEMV's.
//   - Pairs (matmulSiluMul): a stage is 4 gate rows and their 4 up rows (two copies); warps w and w + 4 sum a pair,
//     which is stored as silu(gate) * up.
//   - A deferred addRmsNorm as the input (AddRmsNormInput): each block makes the normed row itself from the residual
//     and the branch output while its first stages are in flight, in place of a kernel of its own before the GEMV
//     (a one-block kernel and a dependent launch on the critical path, twice a layer).
//   Measured on H200 (bench/kernels/gemv-layer-bench.cu: 32 Llama-2-7B layers' bf16 GEMVs in one graph,
//   2026-12-02): wqkv 27.1 -> 24.9 us, wo 11.3 -> 10.1, w13 44.9 -> 42.9 against the batched register kernel
//   (w2, K = 11008, 25.1 -> 24.6 with 2-row stages, and 35.4 in chunks of 2048 columns, 8 copies a stage: K > 4096
//   stays on the register kernels). Two blocks a SM (128 threads, 112 KiB, so the next GEMV's block is resident
//   early) took the layer from 104.4 to 118.9 us: the bytes in flight a SM matter more.
#include "cuda/gemv-rows-tma.cuh"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/rms-norm.cuh"

namespace weft::cuda {
namespace {

constexpr int kThreads = 256, kWarps = 8;
constexpr int kStageRows = kWarps;       // a warp a row
constexpr int kMaxStages = 4;
constexpr int kMaxRowBytes = 8 * 1024;   // K <= 4096: a stage of 8 rows is at most 64 KiB
constexpr size_t kSmemBytes = 220 * 1024;
constexpr uint32_t kCopyBytes = 32 * 1024;  // the most one bulk copy moves here

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem_u32(bar)));
}
__device__ __forceinline__ void mbar_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
}
// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), completing on bar.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  for (uint32_t o = 0; o < bytes; o += kCopyBytes)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(static_cast<char*>(dst) + o)), "l"(static_cast<const char*>(src) + o),
                 "r"(min(kCopyBytes, bytes - o)), "r"(smem_u32(bar)) : "memory");
}

// Stages x in shared memory as f32, sub-vector-major as the register kernels stage it (gemv-one-token.cu): float4 i
// of x at xs4[(i % 2) KV + i / 2].
__device__ __forceinline__ void stage_x(const float4* __restrict__ x4, float4* xs4, int K) {
  const int KV = K / 8;
  for (int i = threadIdx.x; i < K / 4; i += kThreads) xs4[(i % 2) * KV + i / 2] = x4[i];
}

// Stages addRmsNorm's normed row of x and norm.y instead, and writes this block's share of sum and normed (float4 i
// where i % gridDim.x is the block). addRmsNorm's kernel for a row of K <= 4096 runs one thread a float4 (fused-layer.cu,
// K / 4 threads rounded up to a warp), warp-sums their squares and then warp 0 sums the warps' sums; thread t here
// plays its threads t + 256 j, j < 4, in the same trees, so inv_rms and every normed value are that kernel's bits.
template <typename W>
__device__ void stage_add_rms_norm(const float4* __restrict__ x4, const AddRmsNormInput& norm, float4* xs4, int K) {
  constexpr int kPlays = 1024 / kThreads;
  __shared__ double warp_sums[32];
  __shared__ float inv_rms;
  const int n4 = K / 4, KV = K / 8, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float4* y4 = reinterpret_cast<const float4*>(norm.y);
  float4 s[kPlays];
#pragma unroll
  for (int j = 0; j < kPlays; ++j) {
    const int i = threadIdx.x + j * kThreads;
    double sq = 0.0;
    if (i < n4) {
      s[j] = add4(x4[i], y4[i]);
      sq = sq4(s[j]);
    }
    sq = warp_sum(sq);
    if (lane == 0) warp_sums[warp + j * kWarps] = sq;
  }
  __syncthreads();
  if (warp == 0) {
    const double total = warp_sum(warp_sums[lane]);
    if (lane == 0) inv_rms = inv_rms_of(total, K, norm.eps);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPlays; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if (i >= n4) continue;
    const float4 o = normed4(s[j], inv_rms, Load4<W>::at(static_cast<const W*>(norm.weight), i));
    xs4[(i % 2) * KV + i / 2] = o;
    if (i % gridDim.x == blockIdx.x) {
      reinterpret_cast<float4*>(norm.sum)[i] = s[j];
      reinterpret_cast<float4*>(norm.normed)[i] = o;
    }
  }
}

// y [N] (pairs: silu(gate) * up of w's rows f and N + f) = x [K] @ w^T. Block b: outputs [b rpb, (b + 1) rpb).
// Dynamic shared memory: x [K] f32 (x_bytes, rounded to 128), then stages stages of 8 rows.
template <bool kPairs>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_rows_tma_kernel(const float* __restrict__ x, const uint16_t* __restrict__ w, float* __restrict__ y, int N,
                         int K, int rpb, int stages, int x_bytes, AddRmsNormInput norm) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ alignas(8) uint64_t full[kMaxStages];
  __shared__ float pair_sums[kWarps];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, KV = K / 8;
  constexpr int kOutsPerStage = kPairs ? kStageRows / 2 : kStageRows;
  const int out0 = blockIdx.x * rpb, outs = min(rpb, N - out0), n_stages = (outs + kOutsPerStage - 1) / kOutsPerStage;
  const size_t row_bytes = static_cast<size_t>(K) * 2, stage_bytes = kStageRows * row_bytes;
  float4* xs4 = reinterpret_cast<float4*>(smem);
  unsigned char* ring = smem + x_bytes;
  const auto issue = [&](int it) {  // thread 0: outputs out0 + it kOutsPerStage .. into stage it % stages
    const int s = it % stages, o0 = out0 + it * kOutsPerStage, n = min(kOutsPerStage, out0 + outs - o0);
    const uint32_t bytes = static_cast<uint32_t>(n * row_bytes);
    mbar_expect_bytes(&full[s], kPairs ? 2 * bytes : bytes);
    unsigned char* dst = ring + s * stage_bytes;
    bulk_copy(dst, w + static_cast<size_t>(o0) * K, bytes, &full[s]);
    if (kPairs) bulk_copy(dst + kOutsPerStage * row_bytes, w + (static_cast<size_t>(N) + o0) * K, bytes, &full[s]);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) mbar_init(&full[s]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int it = 0; it < min(stages, n_stages); ++it) issue(it);
  }
  pdl_wait();  // x (or norm.y) comes from the kernel before
  const float4* x4 = reinterpret_cast<const float4*>(x);
  if (!norm.y) stage_x(x4, xs4, K);
  else if (norm.weight_bf16) stage_add_rms_norm<__nv_bfloat16>(x4, norm, xs4, K);
  else stage_add_rms_norm<float>(x4, norm, xs4, K);
  __syncthreads();  // x staged; the barriers' init seen by every thread
  // Warp w's row in a stage: w (pairs: gate rows 0-3, their up rows 4-7, so output w % 4).
  const int out_in_stage = kPairs ? warp % kOutsPerStage : warp;
  for (int it = 0; it < n_stages; ++it) {
    const int s = it % stages, o = it * kOutsPerStage + out_in_stage;
    mbar_wait(&full[s], (it / stages) & 1);
    float acc = 0.f;
    if (o < outs) {
      const uint4* wr = reinterpret_cast<const uint4*>(ring + s * stage_bytes + warp * row_bytes);
#pragma unroll 4
      for (int v = lane; v < KV; v += 32) {
        const uint4 u = wr[v];
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
        acc += part;
      }
    }
    acc = warp_sum(acc);
    if (!kPairs && lane == 0 && o < outs) y[out0 + o] = acc;
    if (kPairs && lane == 0) pair_sums[warp] = acc;
    __syncthreads();  // every warp is done with stage s (and pair_sums is written)
    if (kPairs && threadIdx.x < kOutsPerStage && it * kOutsPerStage + static_cast<int>(threadIdx.x) < outs)
      y[out0 + it * kOutsPerStage + threadIdx.x] = silu_times(pair_sums[threadIdx.x], pair_sums[threadIdx.x + kOutsPerStage]);
    if (threadIdx.x == 0 && it + stages < n_stages) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the warps' reads of the stage before the copy's writes
      issue(it + stages);
    }
    if (kPairs) __syncthreads();  // pair_sums is read before the next stage writes it
  }
}

template <bool kPairs>
void launch(const Ctx& ctx, const float* x, const uint16_t* w, float* y, int N, int K, int sms,
            const AddRmsNormInput& norm) {
  static bool smem_set = false;  // per instantiation
  if (!smem_set) {
    check_cuda(ctx.st, cudaFuncSetAttribute(gemv_rows_tma_kernel<kPairs>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(kSmemBytes)),
               "matmul", " (cudaFuncSetAttribute)");
    smem_set = true;
  }
  const size_t row_bytes = static_cast<size_t>(K) * 2, stage_bytes = kStageRows * row_bytes;
  const size_t x_bytes = (static_cast<size_t>(K) * 4 + 127) / 128 * 128;
  const int stages = static_cast<int>(std::min<size_t>(kMaxStages, (kSmemBytes - x_bytes) / stage_bytes));
  constexpr int outs_per_stage = kPairs ? kStageRows / 2 : kStageRows;
  int rpb = (N + sms - 1) / sms;
  rpb = (rpb + outs_per_stage - 1) / outs_per_stage * outs_per_stage;
  const unsigned grid = static_cast<unsigned>((N + rpb - 1) / rpb);
  launch_pdl(ctx, gemv_rows_tma_kernel<kPairs>, dim3(grid), dim3(kThreads), x_bytes + stages * stage_bytes, x, w, y,
             N, K, rpb, stages, static_cast<int>(x_bytes), norm);
}

// Hopper's bulk copies and ~220 KiB of shared memory a block; asked once (a process drives one kind of GPU).
bool device_takes_it() {
  static const bool takes = [] {
    int dev = 0, smem = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
           static_cast<size_t>(smem) >= kSmemBytes + 1024;
  }();
  return takes;
}

}  // namespace

bool gemv_rows_tma(const Ctx& ctx, const float* x, const void* w, float* y, int N, int K, bool pairs, int sms,
                   const AddRmsNormInput* norm) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (N <= 0 || K <= 0 || K % 8 != 0 || static_cast<size_t>(K) * 2 > kMaxRowBytes || (pairs && N > INT32_MAX / 2) ||
      !aligned(x) || !aligned(w) || !device_takes_it())
    return false;
  if (norm && !(aligned(norm->y) && aligned(norm->sum) && aligned(norm->normed) && aligned(norm->weight)))
    return false;
  const AddRmsNormInput plain{};
  if (pairs) launch<true>(ctx, x, static_cast<const uint16_t*>(w), y, N, K, sms, norm ? *norm : plain);
  else launch<false>(ctx, x, static_cast<const uint16_t*>(w), y, N, K, sms, norm ? *norm : plain);
  return true;
}

}  // namespace weft::cuda
