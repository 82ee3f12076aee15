// The quantized prefill attention's pre-pass (attention-sage.cuh states the algorithm): the sequences' ends and
// starts, where each one's operands go (the step's scratch, or its state slot), partial K sums over spans of 512
// positions and the K means where a sequence has none kept, then one block per (sequence, kv head, 64 positions)
// that writes int8 smoothed K with its scale and the V operand: in a slot, only the blocks from the first one the
// step's rows (or rows the caller no longer vouches for) touch. A cache row is read twice (sums, quantize) where
// the mean is computed, once where the slot keeps it.
#include <type_traits>

#include "cuda/attention-query-tiles.cuh"
#include "cuda/attention-sage.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

using detail::SageScratch;
using detail::SageSeqOperands;
constexpr int kSpanRows = SageScratch::kSpanRows;
constexpr int kSumThreads = 256;
constexpr int kThreads = 128;
constexpr int kB = kSageBlock;

// ---- pre-pass

// N consecutive cache elements of a row as f32 (kv_value's values: a code times the row's scale), in wide loads (8
// bf16: one 16-byte load; p aligned to them) where one load an element kept the pre-pass far from its bytes' floor.
template <int N, typename KV>
__device__ __forceinline__ void load_row_values(const KV* p, float scale, float (&x)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  if constexpr (std::is_same_v<KV, __nv_bfloat16>) {
    uint32_t w[N / 2];  // element 2 i in the low half of w[i] (little-endian)
    if constexpr (N == 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (N == 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x, w[1] = v.y;
    } else {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    }
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<KV, float>) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 v = *reinterpret_cast<const float2*>(p + i);
      x[i] = v.x, x[i + 1] = v.y;
    }
  } else {
    float c[N];
    if constexpr (N == 2) {
      load_as_f32(p, c);
    } else {
#pragma unroll
      for (int i = 0; i < N; i += 4) {
        float c4[4];
        load_as_f32(p + i, c4);
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i + e] = c4[e];
      }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = __fmul_rn(c[i], scale);
  }
}

__global__ void sage_seq_end(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                             const int32_t* __restrict__ positions, int T, int* __restrict__ seq_end,
                             int* __restrict__ seq_start) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int seq = token_seq[t], pos = positions[t];
  if (seq >= 0 && seq < kv.n_seqs && pos >= 0 && pos < kv.capacity()) {
    atomicMax(&seq_end[seq], pos + 1);
    atomicMin(&seq_start[seq], pos);
  }
}

// A slot that starts afresh keeps nothing (its positions quantized: 0).
__device__ __forceinline__ void reset_if_fresh(const SageStateArgs& st, int s) {
  const int slot = st.slots[3 * s];
  if (slot >= 0 && slot < st.n_slots && st.slots[3 * s + 1]) st.header[2 * slot] = 0;
}

__global__ void sage_state_reset(SageStateArgs st, int S) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < S) reset_if_fresh(st, s);
}

// One thread per table row: where its operands go. A row with a slot reuses the slot's blocks below the least of
// its quantized positions, the positions the caller vouches for and the row's first position in the step (each
// floored to a block), and its mean when that leaves any; then the slot holds the row's positions [0, end). A row
// with tokens takes the next of the Q places of quantized sequences in scratch (its K sums and mean; without a slot,
// its operands); one past Q is reported and shares place 0, so that the launch stays within its memory.
__global__ void sage_seq_operands(SageStateArgs st, const int* __restrict__ seq_end, const int* __restrict__ seq_start,
                                  int S, int Q, int G, int hd, int nb, int cp, bool fp8, unsigned char* scratch_k8,
                                  unsigned char* scratch_v, unsigned char* scratch_k_scale, int64_t v_scale_off,
                                  int* __restrict__ count, SageSeqOperands* ops, DeviceStatus* status) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int vb = fp8 ? 1 : 2;  // V operand bytes an element
  SageSeqOperands d{};
  d.slot = -1;
  const int end = seq_end[s];
  if (end > 0) {
    d.index = atomicAdd(count, 1);
    if (d.index >= Q) {
      report(status, StatusOp::SageSeqs, s, d.index + 1, Q);
      d.index = 0;
    }
  }
  if (st.slots) {
    reset_if_fresh(st, s);
    const int slot = st.slots[3 * s];
    if (slot >= 0 && slot < st.n_slots && end > 0 && (end + kSageBlock - 1) / kSageBlock <= st.nb_max) {
      const int kept = min(min(st.header[2 * slot], st.slots[3 * s + 2]), seq_start[s]);
      d.slot = slot;
      d.from_block = max(kept, 0) / kSageBlock;
      d.needs_mean = d.from_block == 0;
      unsigned char* base = st.blocks + int64_t(slot) * st.nb_max * st.block_bytes;
      d.k8 = base;
      d.k8_tile = d.v_tile = d.sc_tile = st.block_bytes;
      d.k8_head = int64_t(kSageBlock) * hd;
      d.v = base + int64_t(G) * kSageBlock * hd;
      d.v_head = int64_t(kSageBlock) * hd * vb;
      d.scales = d.v + int64_t(G) * kSageBlock * hd * vb;
      d.sc_head = 4;
      d.v_scale_off = int64_t(G) * 4;
      st.header[2 * slot] = end;
      ops[s] = d;
      return;
    }
  }
  const int64_t sg0 = int64_t(d.index) * G;
  d.needs_mean = 1;
  d.k8 = scratch_k8 + sg0 * cp * hd;
  d.k8_tile = int64_t(kSageBlock) * hd;
  d.k8_head = int64_t(cp) * hd;
  d.v = scratch_v + (fp8 ? sg0 * nb * hd * kSageBlock : sg0 * cp * hd * 2);
  d.v_tile = int64_t(kSageBlock) * hd * vb;
  d.v_head = fp8 ? int64_t(nb) * hd * kSageBlock : int64_t(cp) * hd * 2;
  d.scales = scratch_k_scale + sg0 * nb * 4;
  d.sc_tile = 4;
  d.sc_head = int64_t(nb) * 4;
  d.v_scale_off = v_scale_off;
  ops[s] = d;
}

// grid (spans, G, S): sums[s, g, span, :] = the K rows of span (warp w takes rows w, w + 8, ...; then the warps
// in order), the order the CPU reference sums in. The span's cache rows are looked up first, all at once, into
// shared memory, so that a warp's loads wait on no lookup: four rows a warp, each load after its own lookup, kept
// the kernel at a third of its bytes' rate (bench/RESULTS.md, session 41).
template <int HD, typename KV>
__global__ void __launch_bounds__(kSumThreads)
    sage_key_sums(const KV* __restrict__ k_cache, const float* __restrict__ k_scales, KvBlockTable kv,
                  const int* __restrict__ seq_end, const SageSeqOperands* __restrict__ ops, int spans,
                  float* __restrict__ sums, DeviceStatus* status) {
  constexpr int VEC = HD / 32, WARPS = kSumThreads / 32, kAhead = 8;
  static_assert(kSpanRows % (WARPS * kAhead) == 0, "a warp's rows in whole batches");
  __shared__ float part[WARPS][HD];
  __shared__ int64_t rows[kSpanRows];
  const int span = blockIdx.x, g = blockIdx.y, s = blockIdx.z, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int end = seq_end[s], p0 = span * kSpanRows, p1 = min(end, p0 + kSpanRows);
  if (p0 >= end || !ops[s].needs_mean) return;
  for (int r = threadIdx.x; r < kSpanRows; r += kSumThreads)
    rows[r] = p0 + r < p1 ? kv_read_row(kv, 0, s, g, p0 + r, status) : -1;
  __syncthreads();
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0;
  for (int r = warp; r < p1 - p0; r += kAhead * WARPS) {
    float x[kAhead][VEC];
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      const int64_t row = rows[r + a * WARPS];  // -1 past p1 (r + a * WARPS < kSpanRows: whole batches)
      if (row >= 0)
        load_row_values(k_cache + row * HD + lane * VEC, kKvQuantized<KV> ? k_scales[row] : 1.0f, x[a]);
    }
#pragma unroll
    for (int a = 0; a < kAhead; ++a)
      if (rows[r + a * WARPS] >= 0)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], x[a][i]);
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < HD; d += kSumThreads) {
    float x = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) x = __fadd_rn(x, part[w][d]);
    sums[((int64_t(ops[s].index) * gridDim.y + g) * spans + span) * HD + d] = x;
  }
}

// grid (G, S), hd threads: mean[s, g, :] = (the spans' sums, in order) / end_s, kept in the row's slot; or the
// slot's kept mean.
__global__ void sage_key_mean(const float* __restrict__ sums, const int* __restrict__ seq_end,
                              const SageSeqOperands* __restrict__ ops, float* __restrict__ kept_means, int spans,
                              int hd, float* __restrict__ mean) {
  const int g = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
  const int end = seq_end[s];
  if (end == 0) return;
  const SageSeqOperands& op = ops[s];
  const int64_t sg = int64_t(op.index) * gridDim.x + g;
  float* kept = op.slot >= 0 ? kept_means + (int64_t(op.slot) * gridDim.x + g) * hd : nullptr;
  if (!op.needs_mean) {
    mean[sg * hd + d] = kept[d];
    return;
  }
  float x = 0;
  for (int i = 0; i < (end + kSpanRows - 1) / kSpanRows; ++i) x = __fadd_rn(x, sums[(sg * spans + i) * hd + d]);
  mean[sg * hd + d] = __fdiv_rn(x, static_cast<float>(end));
  if (kept) kept[d] = mean[sg * hd + d];
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
                     const float* __restrict__ mean, const SageSeqOperands* __restrict__ ops,
                     DeviceStatus* status) {
  constexpr int CPR = HD / 8, CH = kB * CPR / kThreads;  // 8-element chunks per row, per thread
  static_assert(kThreads % CPR == 0, "a thread's chunks share their columns");
  __shared__ int64_t rows[kB];
  __shared__ float k_rs[kB], v_rs[kB], red[kThreads / 32];
  const int j = blockIdx.x, g = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
  const int end = seq_end[s], p0 = j * kB;
  const SageSeqOperands& op = ops[s];
  if (p0 >= end || j < op.from_block) return;
  const int64_t sg = int64_t(op.index) * gridDim.y + g;
  int8_t* const k8 = reinterpret_cast<int8_t*>(op.k8 + j * op.k8_tile + g * op.k8_head);  // this tile's
  unsigned char* const v_out = op.v + j * op.v_tile + g * op.v_head;
  float* const k_scale_out = reinterpret_cast<float*>(op.scales + j * op.sc_tile + g * op.sc_head);
  float* const v_scale_out = reinterpret_cast<float*>(op.scales + op.v_scale_off + j * op.sc_tile + g * op.sc_head);
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
  // x = the thread's chunks of `cache` (0 past end_s), less `sub` (the K mean), amax = their largest |x|.
  auto load = [&](const KV* cache, const float* row_scales, const float* sub) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int r = (i * kThreads + tid) / CPR;
      const int64_t row = rows[r];
      if (row >= 0) {
        load_row_values(cache + row * HD + col, row_scales[r], x[i]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) x[i][e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (sub && row >= 0) x[i][e] = __fsub_rn(x[i][e], sub[e]);
        amax = fmaxf(amax, fabsf(x[i][e]));
      }
    }
  };
  float k_mean[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) k_mean[e] = mean[sg * HD + col + e];
  load(k_cache, k_rs, k_mean);
  KvRowScale sc = kv_row_scale(block_max(amax, red), kInt8Max);
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int r = (i * kThreads + tid) / CPR;
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 8; ++e)
      w[e >> 2] |= uint32_t(uint8_t(f32_to_int8_code(__fmul_rn(x[i][e], sc.inv)))) << (8 * (e & 3));
    *reinterpret_cast<uint2*>(k8 + r * HD + col) = make_uint2(w[0], w[1]);
  }
  if (tid == 0) *k_scale_out = sc.scale;

  amax = 0;
  load(v_cache, v_rs, nullptr);
  if constexpr (FP8) {
    // the transposed tile is built in shared memory (rows of kB + 1 bytes: a warp's bytes of 16 columns fall in
    // distinct banks) and written out in 16-byte pieces: written byte by byte it took a global store an element
    __shared__ unsigned char v_tile[HD * (kB + 1)];
    sc = kv_row_scale(block_max(amax, red), kFp8Max);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int slot = fp8_slot((i * kThreads + tid) / CPR);
#pragma unroll
      for (int e = 0; e < 8; ++e)  // the hardware conversion: f32_to_e4m3's rule, bit for bit (kv-quant.h)
        v_tile[(col + e) * (kB + 1) + slot] = __nv_cvt_float_to_fp8(__fmul_rn(x[i][e], sc.inv), __NV_SATFINITE, __NV_E4M3);
    }
    __syncthreads();
    uint4* tile = reinterpret_cast<uint4*>(v_out);
    for (int c = tid; c < HD * kB / 16; c += kThreads) {
      const unsigned char* src = v_tile + (c / (kB / 16)) * (kB + 1) + (c % (kB / 16)) * 16;
      uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
      for (int b = 0; b < 16; ++b) w[b >> 2] |= uint32_t(src[b]) << (8 * (b & 3));
      tile[c] = make_uint4(w[0], w[1], w[2], w[3]);
    }
    if (tid == 0) *v_scale_out = sc.scale;
  } else {
    __half* vh = reinterpret_cast<__half*>(v_out);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int r = (i * kThreads + tid) / CPR;
      *reinterpret_cast<uint4*>(vh + r * HD + col) =
          make_uint4(pack_f16(x[i][0], x[i][1]), pack_f16(x[i][2], x[i][3]), pack_f16(x[i][4], x[i][5]),
                     pack_f16(x[i][6], x[i][7]));
    }
  }
}

template <int HD, typename KV, bool FP8>
void launch_prepass(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                    const Tensor& positions, const KvBlockTable& kv, const SageScratch& sc, unsigned char* scratch,
                    const SageStateArgs& state) {
  const int T = static_cast<int>(token_seq.dim(0)), S = static_cast<int>(kv.n_seqs), G = static_cast<int>(kv.n_kv);
  int* seq_end = reinterpret_cast<int*>(scratch + sc.seq_end);
  int* seq_start = reinterpret_cast<int*>(scratch + sc.seq_start);
  auto* ops = reinterpret_cast<SageSeqOperands*>(scratch + sc.operands);
  float* sums = reinterpret_cast<float*>(scratch + sc.sums);
  float* mean = reinterpret_cast<float*>(scratch + sc.mean);
  const int nb = static_cast<int>(sc.nb), cp = static_cast<int>(sc.cp), spans = static_cast<int>(sc.spans);
  int* count = reinterpret_cast<int*>(scratch + sc.count);
  check_cuda(ctx.st, cudaMemsetAsync(count, 0, sizeof(int), ctx.stream), "sageAttention", " (memset)");
  check_cuda(ctx.st, cudaMemsetAsync(seq_end, 0, size_t(S) * sizeof(int), ctx.stream), "sageAttention", " (memset)");
  check_cuda(ctx.st, cudaMemsetAsync(seq_start, 0x7f, size_t(S) * sizeof(int), ctx.stream), "sageAttention",
             " (memset)");
  sage_seq_end<<<blocks_for(T, 256), 256, 0, ctx.stream>>>(kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
                                                          T, seq_end, seq_start);
  sage_seq_operands<<<blocks_for(S, 128), 128, 0, ctx.stream>>>(
      state, seq_end, seq_start, S, static_cast<int>(sc.seqs), G, HD, nb, cp, FP8, scratch + sc.k8, scratch + sc.v,
      scratch + sc.k_scale, sc.v_scale - sc.k_scale, count, ops, ctx.status);
  sage_key_sums<HD, KV><<<dim3(spans, G, S), kSumThreads, 0, ctx.stream>>>(
      k_cache.data<KV>(), k_cache.kv_scales(), kv, seq_end, ops, spans, sums, ctx.status);
  sage_key_mean<<<dim3(G, S), HD, 0, ctx.stream>>>(sums, seq_end, ops, state.means, spans, HD, mean);
  sage_quantize_kv<HD, KV, FP8><<<dim3(nb, G, S), kThreads, 0, ctx.stream>>>(
      k_cache.data<KV>(), v_cache.data<KV>(), k_cache.kv_scales(), v_cache.kv_scales(), kv, seq_end, mean, ops,
      ctx.status);
}

}  // namespace

namespace detail {
void launch_sage_prepass(const Ctx& ctx, const Tensor& k_cache, const Tensor& v_cache, const Tensor& token_seq,
                         const Tensor& kv_block_table, const Tensor& positions, bool fp8, const SageScratch& sc,
                         unsigned char* scratch, const SageStateArgs& state) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  auto run = [&](auto head_dim, auto fp8_mode) {
    constexpr int HD = decltype(head_dim)::value;
    constexpr bool FP8 = decltype(fp8_mode)::value;
    WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                         launch_prepass<HD, KV, FP8>(ctx, k_cache, v_cache, token_seq, positions, kv, sc, scratch, state));
  };
  using H64 = std::integral_constant<int, 64>;
  using H128 = std::integral_constant<int, 128>;
  if (k_cache.dim(3) == 128)
    fp8 ? run(H128{}, std::true_type{}) : run(H128{}, std::false_type{});
  else
    fp8 ? run(H64{}, std::true_type{}) : run(H64{}, std::false_type{});
}
}  // namespace detail

void launch_sage_state_reset(const Ctx& ctx, const SageStateArgs& state, int64_t n_seqs) {
  if (!state.slots || n_seqs == 0) return;
  sage_state_reset<<<blocks_for(n_seqs, 128), 128, 0, ctx.stream>>>(state, static_cast<int>(n_seqs));
}

}  // namespace weft::cuda
