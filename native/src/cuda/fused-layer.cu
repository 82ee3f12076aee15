// addRmsNorm and rmsNorm (the same kernels without y and sum): one block per row. Rows with H % 4 == 0 and up to 8
// float4 per thread (H <= 32768) keep the sum in registers between the two passes, every load of a thread issued
// before the first is used; other rows re-read it. Sum of squares in double, as the CPU. When given normed_w, the
// normed rows are also written there in the weight's dtype (a prefill GEMM's input, gemm.cuh).
// qkvRope: short steps a block a (token, head), a thread a rotated pair; steps of 64 tokens and more a block a token,
// a warp a head, each lane's angles computed once for all its heads. Angle = fp32(position * invFreq[j]) and
// full-precision sincosf, as rope, in both. The k and v rows are found through the KV block table; bad sequence
// rows, positions and table entries skip the cache write and are reported on the device (as writeKv's; a negative
// position as rope's). Caches written as writeKv writes them (fp8 / int8: a rotated k row goes through shared
// memory, then the threads of its head quantize it).
#include "cuda/fused-layer.cuh"

#include <algorithm>

#include "cuda/kv-block-table.cuh"
#include "cuda/rms-norm.cuh"

namespace weft::cuda {
namespace {

constexpr int kMaxThreads = 1024;

template <typename W>
__device__ __forceinline__ void store4(W* p, int64_t i, float4 v) {  // elements 4i .. 4i + 3
  p[4 * i] = from_f32<W>(v.x);
  p[4 * i + 1] = from_f32<W>(v.y);
  p[4 * i + 2] = from_f32<W>(v.z);
  p[4 * i + 3] = from_f32<W>(v.w);
}

// kPer float4 per thread, held in registers; blockDim.x * kPer >= H / 4. y and sum null: rmsNorm of x.
template <typename W, int kPer>
__global__ void __launch_bounds__(kMaxThreads)
    add_rms_norm_vec(const float* __restrict__ x, const float* __restrict__ y, const W* __restrict__ weight,
                     float* __restrict__ sum, float* __restrict__ normed, W* __restrict__ normed_w, int64_t H,
                     float eps) {
  pdl_trigger();
  pdl_wait();
  const int64_t n4 = H / 4, row = blockIdx.x * H;
  const float4* x4 = reinterpret_cast<const float4*>(x + row);
  const float4* y4 = y ? reinterpret_cast<const float4*>(y + row) : nullptr;
  float4* s4 = sum ? reinterpret_cast<float4*>(sum + row) : nullptr;
  float4* o4 = reinterpret_cast<float4*>(normed + row);
  float4 s[kPer];
  double ss = 0;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < n4) {
      s[k] = y4 ? add4(x4[i], y4[i]) : x4[i];
      if (s4) s4[i] = s[k];
      ss += sq4(s[k]);
    }
  }
  float inv_rms = inv_rms_of(block_sum(ss), H, eps);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    int64_t i = threadIdx.x + int64_t{k} * blockDim.x;
    if (i < n4) {
      float4 w = Load4<W>::at(weight, i);
      float4 o = normed4(s[k], inv_rms, w);
      o4[i] = o;
      if (normed_w) store4(normed_w + row, i, o);
    }
  }
}

// Any H: the sum goes to memory in pass 1 and is read back (by the thread that wrote it) in pass 2 (x itself where
// y and sum are null: rmsNorm).
template <typename W>
__global__ void __launch_bounds__(kMaxThreads)
    add_rms_norm_any(const float* __restrict__ x, const float* __restrict__ y, const W* __restrict__ weight,
                     float* sum, float* __restrict__ normed, W* __restrict__ normed_w, int64_t H, float eps) {
  pdl_trigger();
  pdl_wait();
  const int64_t row = blockIdx.x * H;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float s = y ? x[row + i] + y[row + i] : x[row + i];
    if (sum) sum[row + i] = s;
    ss += static_cast<double>(s) * s;
  }
  float inv_rms = inv_rms_of(block_sum(ss), H, eps);
  const float* summed = sum ? sum : x;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float o = __fmul_rn(__fmul_rn(summed[row + i], inv_rms), to_f32(weight[i]));
    normed[row + i] = o;
    if (normed_w) normed_w[row + i] = from_f32<W>(o);
  }
}

// The cos and sin of the angles of the pairs j = threadIdx.x + blockDim.x i that rotate_head_by_block takes (head
// dims up to 2 * kRopeBlockPairs * blockDim.x).
constexpr int kRopeBlockPairs = 2;
struct PairAngles {
  float c[kRopeBlockPairs], s[kRopeBlockPairs];
};
__device__ __forceinline__ PairAngles pair_angles(const float* __restrict__ inv_freq, int32_t pos, int64_t half) {
  PairAngles a{};
#pragma unroll
  for (int i = 0; i < kRopeBlockPairs; ++i)
    if (const int64_t j = threadIdx.x + int64_t{blockDim.x} * i; j < half)
      sincosf(__fmul_rn(static_cast<float>(pos), inv_freq[j]), &a.s[i], &a.c[i]);
  return a;
}

// Threads of the block rotate head xh [hd] into oh (q in f32, or a cache row of f32 or bf16 elements) by their
// pairs' angles.
template <typename O>
__device__ __forceinline__ void rotate_head_by_block(const float* __restrict__ xh, const PairAngles& a, int64_t half,
                                                     O* __restrict__ oh) {
#pragma unroll
  for (int i = 0; i < kRopeBlockPairs; ++i) {
    const int64_t j = threadIdx.x + int64_t{blockDim.x} * i;
    if (j >= half) break;
    const float x1 = xh[j], x2 = xh[j + half];
    store_kv(oh + j, __fsub_rn(__fmul_rn(x1, a.c[i]), __fmul_rn(x2, a.s[i])));
    store_kv(oh + j + half, __fadd_rn(__fmul_rn(x2, a.c[i]), __fmul_rn(x1, a.s[i])));
  }
}

// grid (T, heads of q|k|v): a block a (token, head), a thread a rotated pair (two past head dim 512): short steps
// (decode) as fast as a launch allows, where the token blocks' kernel took 3.4 us a call against 2.1 (H100,
// bench/RESULTS.md, session 41).
// What depends on the step's host data alone (the position, the cache row through the block table, the angles) is
// done before the wait for the GEMV that writes qkv (common.cuh: no kernel writes that data), so that after it only
// qkv's round trip and the stores remain; a bad row is reported after the wait (the first write). Llama-2-7B batch 1
// (H100, bench/RESULTS.md session 60): int4 472.1 -> 478.4 tok/s, int8 323.2 -> 327.7, bf16 189.5 -> 190.2.
template <typename KV>
__global__ void qkv_rope_head_blocks(const float* __restrict__ qkv, const int32_t* __restrict__ positions,
                                     const float* __restrict__ inv_freq, KV* __restrict__ k_cache,
                                     KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                     float* __restrict__ q, int64_t n_heads, int64_t hd, DeviceStatus* status,
                                     float* __restrict__ k_scales, float* __restrict__ v_scales) {
  pdl_trigger();
  const int64_t t = blockIdx.x, h = blockIdx.y, half = hd / 2, n_kv = kv.n_kv;
  const float* xh = qkv + (t * (n_heads + 2 * n_kv) + h) * hd;
  const int32_t pos = positions[t];
  const bool v_head = h >= n_heads + n_kv;
  const int64_t kv_head = h < n_heads ? -1 : v_head ? h - n_heads - n_kv : h - n_heads;
  const int64_t row = kv_head < 0 ? -1 : kv_write_row(kv, t, token_seq[t], pos, kv_head, status, false);
  const PairAngles angles = v_head ? PairAngles{} : pair_angles(inv_freq, pos, half);
  pdl_wait();
  if (h < n_heads) {
    if (pos < 0 && h == 0 && threadIdx.x == 0) report(status, StatusOp::RopePosition, t, pos, 0);
    rotate_head_by_block(xh, angles, half, q + (t * n_heads + h) * hd);
    return;
  }
  if (row < 0) {  // the report, now that the kernel may write
    if (h == n_heads && threadIdx.x == 0) kv_write_row(kv, t, token_seq[t], pos, kv_head, status, true);
    return;
  }
  const int64_t dst = row * hd;
  if constexpr (kKvQuantized<KV>) {  // k_scales, v_scales [rows]; shared memory: the rotated k row [hd] f32
    extern __shared__ float k_rotated[];
    if (!v_head) {
      rotate_head_by_block(xh, angles, half, k_rotated);
      __syncthreads();
    }
    store_kv_row_quantized(v_head ? xh : k_rotated, hd, (v_head ? v_cache : k_cache) + dst,
                           (v_head ? v_scales : k_scales) + row);
  } else {
    if (v_head) {  // a v head: copied
      for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) store_kv(v_cache + dst + d, xh[d]);
      return;
    }
    rotate_head_by_block(xh, angles, half, k_cache + dst);
  }
}

constexpr int kRopeTokenBlocksFrom = 64;  // steps of this many tokens (head dims up to 256) take the token blocks
constexpr int kRopeWarps = 8;             // its block: a warp a head at a time
constexpr int kRopeLanePairs = 4;         // rotated pairs (j, j + hd/2) a lane: head dims up to 256

// Lane `lane` of a warp rotates head xh [hd] into oh (q in f32, or a cache row of f32 or bf16 elements): pairs
// j = lane + 32 i, their angles' cos and sin in c[i], s[i].
template <typename O>
__device__ __forceinline__ void rotate_head_by_warp(const float* __restrict__ xh, const float (&c)[kRopeLanePairs],
                                                    const float (&s)[kRopeLanePairs], int64_t half, int lane,
                                                    O* __restrict__ oh) {
#pragma unroll
  for (int i = 0; i < kRopeLanePairs; ++i) {
    const int64_t j = lane + 32 * i;
    if (j >= half) break;
    const float x1 = xh[j], x2 = xh[j + half];
    store_kv(oh + j, __fsub_rn(__fmul_rn(x1, c[i]), __fmul_rn(x2, s[i])));
    store_kv(oh + j + half, __fadd_rn(__fmul_rn(x2, c[i]), __fmul_rn(x1, s[i])));
  }
}

// Steps of 64 tokens and more: grid (T, groups): block (t, g) takes token t's heads g * 8 + w, then + 8 * groups,
// ... (warp w), each lane with its pairs' angles computed once. One block a (token, head) of 64 threads took
// Llama-2-7B's 1024-token step 117 us on H100 (bench/RESULTS.md, session 41): each short block waited out its chain
// of loads. Shared memory (1-byte caches): a rotated k row [hd] a warp.
template <typename KV>
__global__ void __launch_bounds__(kRopeWarps * 32)
    qkv_rope_token_blocks(const float* __restrict__ qkv, const int32_t* __restrict__ positions,
                          const float* __restrict__ inv_freq, KV* __restrict__ k_cache, KV* __restrict__ v_cache,
                          KvBlockTable kv, const int32_t* __restrict__ token_seq, float* __restrict__ q,
                          int64_t n_heads, int64_t hd, DeviceStatus* status, float* __restrict__ k_scales,
                          float* __restrict__ v_scales) {
  extern __shared__ float rope_smem[];
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x, half = hd / 2, n_kv = kv.n_kv, heads = n_heads + 2 * n_kv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t pos = positions[t], seq = token_seq[t];
  if (pos < 0 && blockIdx.y == 0 && threadIdx.x == 0) report(status, StatusOp::RopePosition, t, pos, 0);
  float cos_a[kRopeLanePairs], sin_a[kRopeLanePairs];
#pragma unroll
  for (int i = 0; i < kRopeLanePairs; ++i)
    if (lane + 32 * i < half)
      sincosf(__fmul_rn(static_cast<float>(pos), inv_freq[lane + 32 * i]), &sin_a[i], &cos_a[i]);
  for (int64_t h = int64_t(blockIdx.y) * kRopeWarps + warp; h < heads; h += int64_t(gridDim.y) * kRopeWarps) {
    const float* xh = qkv + (t * heads + h) * hd;
    if (h < n_heads) {
      rotate_head_by_warp(xh, cos_a, sin_a, half, lane, q + (t * n_heads + h) * hd);
      continue;
    }
    const bool v_head = h >= n_heads + n_kv;
    const int64_t kv_head = v_head ? h - n_heads - n_kv : h - n_heads;
    const int64_t row = kv_write_row(kv, t, seq, pos, kv_head, status, h == n_heads && lane == 0);
    if (row < 0) continue;
    KV* dst = (v_head ? v_cache : k_cache) + row * hd;
    if constexpr (kKvQuantized<KV>) {  // k_scales, v_scales [rows]: the k row rotated into the warp's shared row
      float* k_rotated = rope_smem + warp * hd;
      if (!v_head) {
        rotate_head_by_warp(xh, cos_a, sin_a, half, lane, k_rotated);
        __syncwarp();
      }
      store_kv_row_quantized(v_head ? xh : k_rotated, hd, dst, (v_head ? v_scales : k_scales) + row, lane, 32,
                             [](float v) { return warp_max(v); });
      __syncwarp();  // the shared row is read before the warp's next head writes it
    } else if (v_head) {  // copied
      for (int64_t d = lane; d < hd; d += 32) store_kv(dst + d, xh[d]);
    } else {
      rotate_head_by_warp(xh, cos_a, sin_a, half, lane, dst);
    }
  }
}

// y and sum null: rmsNorm.
template <typename W>
void launch_add_rms_norm_typed(const Ctx& ctx, int64_t T, int64_t H, const float* x, const float* y, const W* weight,
                               float eps, float* sum, float* normed, W* normed_w) {
  const int64_t n4 = H / 4;
  const unsigned blocks = static_cast<unsigned>(T);
  auto vec = [&](auto kernel, int per) {
    int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ((n4 + per - 1) / per + 31) / 32 * 32));
    launch_pdl(ctx, kernel, blocks, threads, 0, x, y, weight, sum, normed, normed_w, H, eps);
  };
  const bool aligned = H % 4 == 0;  // tensors start 256-byte aligned (arena and cudaMallocAsync)
  if (aligned && n4 <= kMaxThreads)
    vec(add_rms_norm_vec<W, 1>, 1);
  else if (aligned && n4 <= 2 * kMaxThreads)
    vec(add_rms_norm_vec<W, 2>, 2);
  else if (aligned && n4 <= 4 * kMaxThreads)
    vec(add_rms_norm_vec<W, 4>, 4);
  else if (aligned && n4 <= 8 * kMaxThreads)
    vec(add_rms_norm_vec<W, 8>, 8);
  else
    launch_pdl(ctx, add_rms_norm_any<W>, blocks, kMaxThreads, 0, x, y, weight, sum, normed, normed_w, H, eps);
}

}  // namespace

void launch_add_rms_norm(const Ctx& ctx, const Tensor& x, const Tensor& y, const Tensor& weight, float eps,
                         const Tensor& sum, const Tensor& normed, const Tensor* normed_w) {
  if (x.numel() == 0) return;
  WEFT_CHECK(!normed_w || (normed_w->dtype == weight.dtype && normed_w->shape == normed.shape), "addRmsNorm",
             "the copy of the normed rows must have their shape and the weight's dtype, ", dtype_name(weight.dtype));
  WEFT_DISPATCH_FLOAT(weight.dtype, W,
                      launch_add_rms_norm_typed<W>(ctx, x.dim(0), x.dim(1), x.data<float>(), y.data<float>(),
                                                   static_cast<const W*>(weight.buffer->data()), eps, sum.data<float>(),
                                                   normed.data<float>(), normed_w ? normed_w->data<W>() : nullptr));
  check_launch(ctx, "addRmsNorm", {{"x", x}, {"y", y}, {"weight", weight}});
}

void launch_rms_norm(const Ctx& ctx, const Tensor& x, const Tensor& weight, float eps, const Tensor& out,
                     const Tensor* out_w) {
  if (x.numel() == 0) return;
  WEFT_CHECK(!out_w || (out_w->dtype == weight.dtype && out_w->shape == out.shape), "rmsNorm",
             "the copy of the rows must have their shape and the weight's dtype, ", dtype_name(weight.dtype));
  WEFT_DISPATCH_FLOAT(weight.dtype, W,
                      launch_add_rms_norm_typed<W>(ctx, x.dim(0), x.dim(1), x.data<float>(), nullptr,
                                                   static_cast<const W*>(weight.buffer->data()), eps, nullptr,
                                                   out.data<float>(), out_w ? out_w->data<W>() : nullptr));
  check_launch(ctx, "rmsNorm", {{"x", x}, {"weight", weight}});
}

void launch_qkv_rope(const Ctx& ctx, const Tensor& qkv, const Tensor& positions, const Tensor& inv_freq,
                     const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                     const Tensor& kv_block_table, const Tensor& q) {
  const int64_t T = qkv.dim(0), hd = k_cache.dim(3), n_kv = k_cache.dim(1), n_heads = q.dim(1) / hd;
  if (T == 0) return;
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  if (T < kRopeTokenBlocksFrom || hd > 2 * 32 * kRopeLanePairs) {
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (hd / 2 + 31) / 32 * 32)));
    WEFT_CHECK(hd / 2 <= int64_t{kRopeBlockPairs} * threads, "qkvRope", "head dim ", hd, " of kCache is over the ",
               2 * kRopeBlockPairs * threads, " its kernel holds");
    const size_t smem = k_cache.is_kv_quantized() ? static_cast<size_t>(hd) * sizeof(float) : 0;
    WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                         launch_pdl(ctx, qkv_rope_head_blocks<KV>,
                                    dim3(static_cast<unsigned>(T), static_cast<unsigned>(n_heads + 2 * n_kv)), threads,
                                    smem, qkv.data<float>(), positions.data<int32_t>(), inv_freq.data<float>(),
                                    k_cache.data<KV>(), v_cache.data<KV>(), kv, token_seq.data<int32_t>(),
                                    q.data<float>(), n_heads, hd, ctx.status, k_cache.kv_scales(),
                                    v_cache.kv_scales()));
  } else {
    // enough blocks to fill the GPU (~256) for the shorter steps, down to one block a token
    const int64_t warp_rounds = (n_heads + 2 * n_kv + kRopeWarps - 1) / kRopeWarps;
    const int64_t groups = std::clamp<int64_t>((256 + T - 1) / T, 1, warp_rounds);
    const size_t smem = k_cache.is_kv_quantized() ? static_cast<size_t>(kRopeWarps * hd) * sizeof(float) : 0;
    WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                         launch_pdl(ctx, qkv_rope_token_blocks<KV>,
                                    dim3(static_cast<unsigned>(T), static_cast<unsigned>(groups)),
                                    dim3(kRopeWarps * 32), smem, qkv.data<float>(), positions.data<int32_t>(),
                                    inv_freq.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), kv,
                                    token_seq.data<int32_t>(), q.data<float>(), n_heads, hd, ctx.status,
                                    k_cache.kv_scales(), v_cache.kv_scales()));
  }
  check_launch(ctx, "qkvRope",
               {{"qkv", qkv}, {"kCache", k_cache}, {"tokenSeq", token_seq}, {"kvBlockTable", kv_block_table},
                {"positions", positions}});
}

}  // namespace weft::cuda
