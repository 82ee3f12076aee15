// gemv_one_token (gemv-one-token.cuh): the one-token GEMV with the weights loaded straight into registers.
//   - Streaming (int8, and int4 rows gemv-rows-tma.cu does not take): a grid of at most 2 blocks a SM; each warp takes tasks of R rows x all of K in
//     turn (task t, t + warps in the grid, ...). Lane l reads vectors l, l + 32, ... of each of the task's rows (16
//     bytes: 8 bf16, 16 int8 or 32 int4 weights) into a ring of U register slots a row: the slot just used is
//     refilled at once with the vector U ahead, across task boundaries, so U vectors a row stay in flight while the
//     lane computes (the batched kernel requests its next 8 only after using all 8, and each of its blocks stages x
//     for 16 rows).
//   - x (or silu(gate) * up) is staged once per block in shared memory as f32, after the first weights were
//     requested (they do not depend on the kernel before: programmatic dependent launch, common.cuh); the
//     streaming kernel stores it sub-vector-major (xs4[h * KV + v]: the h-th 4 columns of vector v), so the 32
//     lanes' reads of one sub-vector are consecutive (vector-major, they were 2-8 way bank conflicts).
//   - Products are summed in fp32 from exact weights; int8 per output channel (the group is the row) scales each
//     row's sum once at its end, smaller groups each vector's sum.
//   - Batched (bf16 rows over 8 KiB, and int8 in groups that are not a power of two of vectors): 2 rows a warp, grid
//     ceil(N / 16). bf16 rows of up to 8 KiB and most int4 rows: gemv-rows-tma.cu. A vector's products are
//     gemv-weight-vectors.cuh's, shared with it.
//   Measured on H200 (bench/kernels/quant-run.sh --one-token, 2026-12-02): a Llama-2-7B layer's four GEMVs at one
//   token, int8 per channel 0.138 -> 0.099 ms (batched -> streaming), int4 g128 0.117 -> 0.094 ms (tensor cores ->
//   streaming); bf16 0.135 ms batched, 0-6% slower a shape streaming. gemv.cu keeps 2..8 tokens, f32/f16 weights and the
//   expert GEMVs.
#include "cuda/gemv-one-token.cuh"

#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/gemv-one-token-mma.cuh"
#include "cuda/gemv-rows-tma.cuh"
#include "cuda/gemv-weight-vectors.cuh"
#include "error.h"

namespace weft::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kBlocksPerSm = 2;           // 16 warps a SM, so at most 128 registers a thread
constexpr size_t kMaxX = 64 * 1024;       // bytes of x (one token, f32) a block stages: K <= 16384

// f(integral_constant<int, s>) for s = S .. U - 1 in order, until one returns true (then true): the ring's slots
// as compile-time indices, which a plain unrolled loop around an early exit did not always give (the ring then
// went to local memory).
template <int S, int U, typename Step>
__device__ __forceinline__ bool every_slot(Step& f) {
  if constexpr (S == U) return false;
  else return f(std::integral_constant<int, S>{}) || every_slot<S + 1, U>(f);
}

// y [1, N] = x [1, K] @ dequant(w)^T (gated: x = silu(gate) * up of a [1, 2K] row), the streaming kernel (header
// comment). R rows a task, U ring slots a row; kRowScale: one scale a row (the group is K), else one a vector
// (group_shift = log2 of the vectors a group). Dynamic shared memory: x [K] f32, sub-vector-major. K a multiple of
// the vector (lanes past a row's end load nothing); rows past N read row N - 1 and store nothing. pairs: w is
// [2N, K] (gate rows, then up rows), R is 2, task t takes rows t and N + t and stores y[t] = silu(gate) * up.
template <Format F, int R, int U, bool kRowScale>
__global__ void __launch_bounds__(kWarps * 32, kBlocksPerSm)
    gemv_one_token_streaming_kernel(const float* __restrict__ x, const void* __restrict__ w,
                                    const uint16_t* __restrict__ scales, int group_shift, float* __restrict__ y,
                                    int N, int K, int gated, int pairs) {
  constexpr int VW = kVectorWeights<F>, H = VW / 4;
  constexpr bool kVectorScale = F != Format::BF16 && !kRowScale;
  extern __shared__ float4 xs4[];
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int KV = K / VW, L = (KV + 31) / 32;  // vectors a row; ring items a lane per task
  const int n_tasks = pairs ? N : (N + R - 1) / R, stride = gridDim.x * kWarps, first = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int n_groups = kVectorScale ? KV >> group_shift : 1;
  const uint4* w4 = static_cast<const uint4*>(w);
  const auto row_of = [&](int task, int r) -> size_t {
    return pairs ? static_cast<size_t>(min(task, N - 1)) + static_cast<size_t>(r) * N : min(task * R + r, N - 1);
  };

  uint4 wv[R][U];
  float sc[R][kVectorScale ? U : 1];
  int lt = first, lj = 0;  // the next item to request: task lt, item lj (vector lj * 32 + lane of each row)
  const auto request = [&](int s) {
    const int v = lj * 32 + lane;
    const bool ok = lt < n_tasks && v < KV;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const size_t row = row_of(lt, r);
      wv[r][s] = ok ? __ldg(w4 + row * KV + v) : make_uint4(0, 0, 0, 0);
      if constexpr (kVectorScale)
        sc[r][s] = ok ? bf16_bits_to_f32(__ldg(scales + row * n_groups + (v >> group_shift))) : 0.f;
    }
    if (++lj == L) {
      lj = 0;
      lt += stride;
    }
  };
#pragma unroll
  for (int s = 0; s < U; ++s) request(s);  // the weights do not depend on the kernel before: requested first

  pdl_wait();  // x comes from the kernel before
  const float4* x4 = reinterpret_cast<const float4*>(x);
  for (int i = threadIdx.x; i < K / 4; i += kWarps * 32) {
    float4 v = x4[i];
    if (gated) {
      const float4 up = x4[K / 4 + i];
      v = make_float4(silu_times(v.x, up.x), silu_times(v.y, up.y), silu_times(v.z, up.z), silu_times(v.w, up.w));
    }
    xs4[(i % H) * KV + i / H] = v;
  }
  __syncthreads();

  int ct = first, cj = 0;  // the item to use next
  if (ct >= n_tasks) return;
  float acc[R] = {}, rs[R];
  const auto row_scales = [&] {
    if constexpr (kRowScale)
#pragma unroll
      for (int r = 0; r < R; ++r) rs[r] = bf16_bits_to_f32(__ldg(scales + row_of(ct, r)));
  };
  row_scales();
  // One ring item: use slot s, refill it, and at a task's last item store its rows; true once the warp's tasks
  // are done. Slots are compile-time indices (every_slot), so the ring stays in registers.
  const auto step = [&](auto slot) {
    constexpr int s = decltype(slot)::value;
    const int v = cj * 32 + lane;
    if (v < KV) {
      if constexpr (F == Format::BF16) {
#pragma unroll
        for (int h = 0; h < H; ++h) {
          const float4 xv = xs4[h * KV + v];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float f[4];
            weights4<F>(wv[r][s], h, f);
            acc[r] = fmaf(f[0], xv.x, acc[r]);
            acc[r] = fmaf(f[1], xv.y, acc[r]);
            acc[r] = fmaf(f[2], xv.z, acc[r]);
            acc[r] = fmaf(f[3], xv.w, acc[r]);
          }
        }
      } else {
        const XVector<F> xv(xs4, KV, v);
#pragma unroll
        for (int r = 0; r < R; ++r)  // int4, and int8 in groups: each vector's sum scaled into the row's
          if constexpr (kVectorScale) acc[r] = fmaf(sc[r][s], dot_vector<F>(wv[r][s], xv, 0.f), acc[r]);
          else acc[r] = dot_vector<F>(wv[r][s], xv, acc[r]);
      }
    }
    request(s);  // the slot just used takes the item U ahead
    if (++cj < L) return false;
    float sums[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float t = acc[r];
#pragma unroll
      for (int o = 16; o; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (kRowScale) t *= rs[r];
      sums[r] = t;
      if (!pairs && lane == 0 && ct * R + r < N) y[ct * R + r] = t;
      acc[r] = 0.f;
    }
    if (pairs && lane == 0) y[ct] = silu_times(sums[0], sums[R - 1]);
    cj = 0;
    ct += stride;
    if (ct >= n_tasks) return true;
    row_scales();
    return false;
  };
  while (!every_slot<0, U>(step)) {
  }
}

// ---- the batched kernel (weft's for bf16 and for int8 in groups the streaming kernel does not take)

constexpr int kBatchedRows = 2;   // rows per warp
constexpr int kBatchedSteps = 8;  // 16-byte vectors per row loaded before the first is used

// Weight i of a 16-byte vector as a float (bf16 or int8, as weights4; kept as it was, so the bf16 product path's
// code stays what was measured).
template <Format F>
__device__ __forceinline__ float weight_of(const uint4& u, int i) {
  const uint32_t word = (&u.x)[i * 4 / kVectorWeights<F>];
  if constexpr (F == Format::BF16) return __uint_as_float(i & 1 ? word & 0xffff0000u : word << 16);
  else return __uint_as_float(__byte_perm(word ^ 0x80808080u, 0x4B000000u, 0x7650u | (i & 3))) - 8388736.0f;
}

// Grid ceil(N / 16) blocks of 256 threads (pairs: ceil(N / 8)); dynamic shared memory: x [K] f32. 2 rows a warp,
// 8 vectors a row requested, all used, then the next 8 requested. pairs as the streaming kernel's.
template <Format F, bool kPairs>
__global__ void __launch_bounds__(kWarps * 32, 2) gemv_one_token_batched_kernel(const float* __restrict__ x, const void* __restrict__ w,
                                                                              const uint16_t* __restrict__ scales, int group,
                                                                              float* __restrict__ y, int N, int K, int gated) {
  constexpr int VW = kVectorWeights<F>;
  constexpr bool kScaled = F != Format::BF16;
  constexpr int R = kBatchedRows, U = kBatchedSteps;
  extern __shared__ float4 xs4[];
  pdl_trigger();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int task = blockIdx.x * kWarps + warp, row0 = task * R;
  const int KV = K / VW, n_groups = kScaled ? K / group : 0;
  const uint4* wrow[R];
  const uint16_t* srow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    // rows past N read row N - 1 and are not stored
    const int row = kPairs ? min(task, N - 1) + r * N : min(row0 + r, N - 1);  // 2N <= INT32_MAX
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
  load(0);
  pdl_wait();
  for (int i = threadIdx.x; i < K / 4; i += kWarps * 32) {
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
  float sums[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = acc[r];
#pragma unroll
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    sums[r] = s;
    if (!kPairs && lane == 0 && row0 + r < N) y[row0 + r] = s;
  }
  if (kPairs && lane == 0 && task < N) y[task] = silu_times(sums[0], sums[R - 1]);
}

// ---- launchers

// The engine's SM count (DeviceState); the bench runs without an engine and asks its current device once.
int sm_count(const Ctx& ctx) {
  if (ctx.st && ctx.st->num_sms > 0) return ctx.st->num_sms;
  static int count = 0;
  int dev = 0;
  if (count == 0 && (cudaGetDevice(&dev) != cudaSuccess ||
                     cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess))
    count = 132;
  return count;
}

template <typename Kernel>
void allow_x_smem(const Ctx& ctx, Kernel* kernel, bool& done) {  // x may take up to kMaxX (above the default 48 KiB)
  if (done) return;
  check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kMaxX)),
             "matmul", " (cudaFuncSetAttribute)");
  done = true;
}

template <Format F, int R, int U, bool kRowScale>
void launch_streaming(const Ctx& ctx, const float* x, const void* w, const uint16_t* scales, int group_shift, float* y,
                      int N, int K, bool gated, bool pairs) {
  static bool smem_set = false;  // per instantiation
  allow_x_smem(ctx, gemv_one_token_streaming_kernel<F, R, U, kRowScale>, smem_set);
  const int64_t blocks = ((pairs ? N : (N + R - 1) / R) + kWarps - 1) / kWarps;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(blocks, static_cast<int64_t>(kBlocksPerSm) * sm_count(ctx))));
  launch_pdl(ctx, gemv_one_token_streaming_kernel<F, R, U, kRowScale>, grid, dim3(kWarps * 32),
             static_cast<size_t>(K) * sizeof(float), x, w, scales, group_shift, y, N, K, gated ? 1 : 0, pairs ? 1 : 0);
}

// 2 rows a task (ring depth 8) for every format, or the tuning's: on H200 rows 1 and 4 moved a layer's sum by
// 2-9% either way, no choice winning every shape (quant-run.sh --one-token --sweep). Pairs take 2.
template <Format F, bool kRowScale>
void dispatch_streaming(const Ctx& ctx, const OneTokenTuning& tuning, const float* x, const void* w,
                        const uint16_t* scales, int group_shift, float* y, int N, int K, bool gated, bool pairs) {
  const int rows = tuning.rows && !pairs ? tuning.rows : 2;
  switch (rows) {
    case 1: return launch_streaming<F, 1, 16, kRowScale>(ctx, x, w, scales, group_shift, y, N, K, gated, false);
    case 4: return launch_streaming<F, 4, 4, kRowScale>(ctx, x, w, scales, group_shift, y, N, K, gated, false);
    default: return launch_streaming<F, 2, 8, kRowScale>(ctx, x, w, scales, group_shift, y, N, K, gated, pairs);
  }
}

template <Format F>
void launch_batched(const Ctx& ctx, const float* x, const void* w, const uint16_t* scales, int group, float* y, int N,
                    int K, bool gated, bool pairs) {
  static bool smem_set[2] = {};
  const auto kernel = pairs ? gemv_one_token_batched_kernel<F, true> : gemv_one_token_batched_kernel<F, false>;
  allow_x_smem(ctx, kernel, smem_set[pairs]);
  const int rows_a_block = kWarps * (pairs ? 1 : kBatchedRows);
  const dim3 grid((N + rows_a_block - 1) / rows_a_block), block(kWarps * 32);
  launch_pdl(ctx, kernel, grid, block, static_cast<size_t>(K) * sizeof(float), x, w, scales, group, y, N, K,
             gated ? 1 : 0);
}

// gemv_one_token and gemv_one_token_silu_pairs: N outputs, of N rows (or of N pairs of rows).
bool one_token(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
               float* y, int N, int K, bool gated, bool pairs, const OneTokenTuning& tuning, bool tiles) {
  if (tiles)  // the tensor-core kernel alone reads tiles (gated too, so the gated form keeps x to ~2^-22)
    return (tuning.kernel == OneTokenKernel::Weft || tuning.kernel == OneTokenKernel::Mma) &&
           gemv_one_token_mma(ctx, x, w, w_dtype, scales, group, y, N, K, pairs, sm_count(ctx), nullptr, true, gated);
  const bool bf16 = w_dtype == DType::BF16, int8 = w_dtype == DType::I8, int4 = w_dtype == DType::I4;
  if (!(bf16 || int8 || int4)) return false;
  const int vw = bf16 ? 8 : int8 ? 16 : 32;
  if (K <= 0 || K % vw != 0 || (!bf16 && (group <= 0 || group % vw != 0 || K % group != 0)) ||
      static_cast<size_t>(K) * sizeof(float) > kMaxX || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0 || N <= 0 || (pairs && (gated || N > INT32_MAX / 2)))
    return false;
  const bool row_scale = !bf16 && group == K;
  const int group_shift = bf16 || row_scale ? 0 : log2_exact(group / vw);
  // weft's (row-major codes; tiles went to the tensor-core kernel above): int4 on tensor cores where the group is a
  // multiple of 128 (gemv-one-token-mma.cu: a Llama-2-7B layer's int4 GEMVs 51.5 us against 64.1 on the bulk-copy
  // rows, H200; row-major int8 there took 81.1 against the streaming kernel's 72.9, session 45), rows streamed by
  // bulk copies where they take the shape (gemv-rows-tma.cu: bf16 6% less than the batched kernel on a Llama-2-7B
  // layer's wqkv, wo and w13), other bf16 on the batched kernel (the streaming one took 0-6% longer a shape:
  // quant-run.sh --one-token), other int8 and int4 streaming where it takes the group.
  if (tuning.kernel == OneTokenKernel::Mma || (tuning.kernel == OneTokenKernel::Weft && int4)) {
    if (!gated && gemv_one_token_mma(ctx, x, w, w_dtype, scales, group, y, N, K, pairs, sm_count(ctx))) return true;
    if (tuning.kernel == OneTokenKernel::Mma) return false;
  }
  if (!gated && (tuning.kernel == OneTokenKernel::Weft || tuning.kernel == OneTokenKernel::Rows) &&
      gemv_rows_tma(ctx, x, w, w_dtype, bf16 ? nullptr : scales, bf16 ? 0 : group, y, N, K, pairs, sm_count(ctx)))
    return true;
  const bool batched = tuning.kernel == OneTokenKernel::Batched ||
                       (tuning.kernel == OneTokenKernel::Weft && bf16) || group_shift < 0;
  if (batched) {  // bf16, and int8 in any group of whole vectors
    if (int4) return false;
    if (int8) launch_batched<Format::I8>(ctx, x, w, scales, group, y, N, K, gated, pairs);
    else launch_batched<Format::BF16>(ctx, x, w, nullptr, 0, y, N, K, gated, pairs);
    return true;
  }
  if (bf16) dispatch_streaming<Format::BF16, false>(ctx, tuning, x, w, nullptr, 0, y, N, K, gated, pairs);
  else if (int8 && row_scale) dispatch_streaming<Format::I8, true>(ctx, tuning, x, w, scales, 0, y, N, K, gated, pairs);
  else if (int8) dispatch_streaming<Format::I8, false>(ctx, tuning, x, w, scales, group_shift, y, N, K, gated, pairs);
  else if (row_scale) dispatch_streaming<Format::I4, true>(ctx, tuning, x, w, scales, 0, y, N, K, gated, pairs);
  else dispatch_streaming<Format::I4, false>(ctx, tuning, x, w, scales, group_shift, y, N, K, gated, pairs);
  return true;
}

}  // namespace

bool gemv_one_token(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                    float* y, int N, int K, bool gated, const OneTokenTuning& tuning, bool tiles) {
  return one_token(ctx, x, w, w_dtype, scales, group, y, N, K, gated, false, tuning, tiles);
}

bool gemv_one_token_silu_pairs(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                               int group, float* y, int F, int K, const OneTokenTuning& tuning, bool tiles) {
  return one_token(ctx, x, w, w_dtype, scales, group, y, F, K, false, true, tuning, tiles);
}

bool gemv_tokens(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                 float* y, int T, int N, int K, bool gated, bool pairs, bool tiles) {
  return gemv_tokens_mma(ctx, x, w, w_dtype, scales, group, y, T, N, K, pairs, sm_count(ctx), tiles, gated);
}

bool gemv_experts(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                  const ExpertRows& ex, bool gated) {
  return gemv_experts_mma(ctx, x, w.q, w.dtype, w.scales, w.group, y, T, N, K, ex, sm_count(ctx), gated, w.tiles);
}

bool gemv_one_token_normed(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                           int group, float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput& norm,
                           bool tiles) {
  // The kernel one_token picks for the same call, so that a held norm changes no sum's order: row-major int8 runs
  // on the bulk-copy rows there, not on the tensor cores.
  if ((tiles || w_dtype == DType::I4) &&
      gemv_one_token_mma(ctx, x, w, w_dtype, scales, group, y, N, K, pairs, sms, &norm, tiles))
    return true;
  return !tiles && gemv_rows_tma(ctx, x, w, w_dtype, scales, group, y, N, K, pairs, sms, &norm);
}

}  // namespace weft::cuda
