// The quantized prefill attention's pre-pass (attention-sage.cuh states the algorithm): the sequences' ends,
// partial K sums over spans of 512 positions, the K means, then one block per (sequence, kv head, 64 positions)
// that writes int8 smoothed K with its scale and the V operand. Each cache row is read twice (sums, quantize).
#include <type_traits>

#include "cuda/attention-query-tiles.cuh"
#include "cuda/attention-sage.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

using detail::SageScratch;
constexpr int kSpanRows = SageScratch::kSpanRows;
constexpr int kSumThreads = 256;
constexpr int kThreads = 128;
constexpr int kB = kSageBlock;

// ---- pre-pass

__global__ void sage_seq_end(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                             const int32_t* __restrict__ positions, int T, int* __restrict__ seq_end) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int seq = token_seq[t], pos = positions[t];
  if (seq >= 0 && seq < kv.n_seqs && pos >= 0 && pos < kv.capacity()) atomicMax(&seq_end[seq], pos + 1);
}

// grid (spans, G, S): sums[s, g, span, :] = the K rows of span (warp w takes rows w, w + 8, ...; then the warps
// in order), the order the CPU reference sums in.
template <int HD, typename KV>
__global__ void __launch_bounds__(kSumThreads)
    sage_key_sums(const KV* __restrict__ k_cache, const float* __restrict__ k_scales, KvBlockTable kv,
                  const int* __restrict__ seq_end, int spans, float* __restrict__ sums, DeviceStatus* status) {
  constexpr int VEC = HD / 32, WARPS = kSumThreads / 32;
  __shared__ float part[WARPS][HD];
  const int span = blockIdx.x, g = blockIdx.y, s = blockIdx.z, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int end = seq_end[s], p0 = span * kSpanRows, p1 = min(end, p0 + kSpanRows);
  if (p0 >= end) return;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0;
  for (int p = p0 + warp; p < p1; p += WARPS) {
    const int64_t row = kv_read_row(kv, 0, s, g, p, status);
    float sc = 1.0f;
    if constexpr (kKvQuantized<KV>) sc = k_scales[row];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], kv_value(k_cache[row * HD + lane * VEC + i], sc));
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < HD; d += kSumThreads) {
    float x = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) x = __fadd_rn(x, part[w][d]);
    sums[((int64_t(s) * gridDim.y + g) * spans + span) * HD + d] = x;
  }
}

// grid (G, S), hd threads: mean[s, g, :] = (the spans' sums, in order) / end_s.
__global__ void sage_key_mean(const float* __restrict__ sums, const int* __restrict__ seq_end, int spans, int hd,
                              float* __restrict__ mean) {
  const int g = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
  const int end = seq_end[s];
  if (end == 0) return;
  const int64_t sg = int64_t(s) * gridDim.x + g;
  float x = 0;
  for (int i = 0; i < (end + kSpanRows - 1) / kSpanRows; ++i) x = __fadd_rn(x, sums[(sg * spans + i) * hd + d]);
  mean[sg * hd + d] = __fdiv_rn(x, static_cast<float>(end));
}


// The e4m3 slot of position r (0..63) of a tile in the transposed V tile: within each 32 positions, the order in
// which the S accumulators of a thread quad become the A operand of m16n8k32 (slot 4 tq + i holds position
// 2 tq + (i & 1) + 8 (i >> 1), slot 16 + 4 tq + i the same plus 16), so P needs no shuffles.
__device__ __forceinline__ int fp8_slot(int r) {
  const int c = r & 31, u = c & 15;
  return (r & ~31) + (c & 16) + 4 * ((u & 7) >> 1) + 2 * (u >> 3) + (u & 1);
}

// grid (nb, G, S): block j of (s, g): int8 of K - mean with its scale; V as f16 rows, or e4m3 with its scale,
// transposed ([hd][64 slots]). Rows past end_s are zero.
template <int HD, typename KV, bool FP8>
__global__ void __launch_bounds__(kThreads)
    sage_quantize_kv(const KV* __restrict__ k_cache, const KV* __restrict__ v_cache, const float* __restrict__ k_scales,
                     const float* __restrict__ v_scales, KvBlockTable kv, const int* __restrict__ seq_end,
                     const float* __restrict__ mean, int nb, int cp, int8_t* __restrict__ k8,
                     float* __restrict__ k_scale_out, unsigned char* __restrict__ v_out,
                     float* __restrict__ v_scale_out, DeviceStatus* status) {
  constexpr int CPR = HD / 8, CH = kB * CPR / kThreads;  // 8-element chunks per row, per thread
  static_assert(kThreads % CPR == 0, "a thread's chunks share their columns");
  __shared__ int64_t rows[kB];
  __shared__ float k_rs[kB], v_rs[kB], red[kThreads / 32];
  const int j = blockIdx.x, g = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
  const int end = seq_end[s], p0 = j * kB;
  if (p0 >= end) return;
  const int64_t sg = int64_t(s) * gridDim.y + g;
  if (tid < kB) {
    const int p = p0 + tid;
    const int64_t row = p < end ? kv_read_row(kv, 0, s, g, p, status) : -1;
    rows[tid] = row;
    if constexpr (kKvQuantized<KV>) {
      k_rs[tid] = row >= 0 ? k_scales[row] : 0.0f;
      v_rs[tid] = row >= 0 ? v_scales[row] : 0.0f;
    } else {
      k_rs[tid] = v_rs[tid] = 1.0f;
    }
  }
  __syncthreads();
  const int col = (tid % CPR) * 8;
  float x[CH][8];
  float amax = 0;
  // x = value(row, r, e) of the thread's chunks (0 past end_s), amax = their largest |x|.
  auto load = [&](auto value) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int r = (i * kThreads + tid) / CPR;
      const int64_t row = rows[r];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        x[i][e] = row >= 0 ? value(row, r, e) : 0.0f;
        amax = fmaxf(amax, fabsf(x[i][e]));
      }
    }
  };
  load([&](int64_t row, int r, int e) {
    return __fsub_rn(kv_value(k_cache[row * HD + col + e], k_rs[r]), mean[sg * HD + col + e]);
  });
  KvRowScale sc = kv_row_scale(block_max(amax, red), kInt8Max);
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int r = (i * kThreads + tid) / CPR;
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 8; ++e)
      w[e >> 2] |= uint32_t(uint8_t(f32_to_int8_code(__fmul_rn(x[i][e], sc.inv)))) << (8 * (e & 3));
    *reinterpret_cast<uint2*>(k8 + (sg * cp + p0 + r) * HD + col) = make_uint2(w[0], w[1]);
  }
  if (tid == 0) k_scale_out[sg * nb + j] = sc.scale;

  amax = 0;
  load([&](int64_t row, int r, int e) { return kv_value(v_cache[row * HD + col + e], v_rs[r]); });
  if constexpr (FP8) {
    sc = kv_row_scale(block_max(amax, red), kFp8Max);
    unsigned char* tile = v_out + (sg * nb + j) * HD * kB;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int slot = fp8_slot((i * kThreads + tid) / CPR);
#pragma unroll
      for (int e = 0; e < 8; ++e) tile[(col + e) * kB + slot] = f32_to_e4m3(__fmul_rn(x[i][e], sc.inv));
    }
    if (tid == 0) v_scale_out[sg * nb + j] = sc.scale;
  } else {
    __half* vh = reinterpret_cast<__half*>(v_out);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int r = (i * kThreads + tid) / CPR;
      *reinterpret_cast<uint4*>(vh + (sg * cp + p0 + r) * HD + col) =
          make_uint4(pack_f16(x[i][0], x[i][1]), pack_f16(x[i][2], x[i][3]), pack_f16(x[i][4], x[i][5]),
                     pack_f16(x[i][6], x[i][7]));
    }
  }
}

template <int HD, typename KV, bool FP8>
void launch_prepass(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                    const Tensor& positions, const KvBlockTable& kv, const SageScratch& sc, unsigned char* scratch) {
  const int T = static_cast<int>(token_seq.dim(0)), S = static_cast<int>(kv.n_seqs), G = static_cast<int>(kv.n_kv);
  int* seq_end = reinterpret_cast<int*>(scratch + sc.seq_end);
  float* sums = reinterpret_cast<float*>(scratch + sc.sums);
  float* mean = reinterpret_cast<float*>(scratch + sc.mean);
  const int nb = static_cast<int>(sc.nb), cp = static_cast<int>(sc.cp), spans = static_cast<int>(sc.spans);
  check_cuda(ctx.st, cudaMemsetAsync(seq_end, 0, size_t(S) * sizeof(int), ctx.stream), "sageAttention", " (memset)");
  sage_seq_end<<<blocks_for(T, 256), 256, 0, ctx.stream>>>(kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
                                                          T, seq_end);
  sage_key_sums<HD, KV><<<dim3(spans, G, S), kSumThreads, 0, ctx.stream>>>(
      k_cache.data<KV>(), k_cache.kv_scales(), kv, seq_end, spans, sums, ctx.status);
  sage_key_mean<<<dim3(G, S), HD, 0, ctx.stream>>>(sums, seq_end, spans, HD, mean);
  sage_quantize_kv<HD, KV, FP8><<<dim3(nb, G, S), kThreads, 0, ctx.stream>>>(
      k_cache.data<KV>(), v_cache.data<KV>(), k_cache.kv_scales(), v_cache.kv_scales(), kv, seq_end, mean, nb, cp,
      reinterpret_cast<int8_t*>(scratch + sc.k8), reinterpret_cast<float*>(scratch + sc.k_scale), scratch + sc.v,
      reinterpret_cast<float*>(scratch + sc.v_scale), ctx.status);
}

}  // namespace

namespace detail {
void launch_sage_prepass(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                         const Tensor& kv_block_table, const Tensor& positions, bool fp8, const SageScratch& sc,
                         unsigned char* scratch) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  auto run = [&](auto head_dim, auto fp8_mode) {
    constexpr int HD = decltype(head_dim)::value;
    constexpr bool FP8 = decltype(fp8_mode)::value;
    WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                         launch_prepass<HD, KV, FP8>(ctx, k_cache, v_cache, token_seq, positions, kv, sc, scratch));
  };
  using H64 = std::integral_constant<int, 64>;
  using H128 = std::integral_constant<int, 128>;
  if (k_cache.dim(3) == 128)
    fp8 ? run(H128{}, std::true_type{}) : run(H128{}, std::false_type{});
  else
    fp8 ? run(H64{}, std::true_type{}) : run(H64{}, std::false_type{});
}
}  // namespace detail

}  // namespace weft::cuda
