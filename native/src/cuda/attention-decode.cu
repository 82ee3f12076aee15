// Decode attention on CUDA cores, and the launch of both decode kernels (attention-decode.cuh has the plan, the
// tensor-core kernel is attention-decode-mma.cu and runs wherever it takes the cache). Scores are dot(q, k) * scale
// as in the CPU; softmax in fp32 with exp of (score - max). The cache is f32 or bf16, widened to f32 as it is read,
// or fp8 / int8 codes whose row scales are folded in once per row rather than per element: a key's into its score
// (dot(q, codes) * scale * k_scale), a value's into its softmax weight (exp(score - max) * v_scale; the sum of the
// weights is taken before). Each K/V element is read once per kv head, for the whole GQA group.
//
// Why it is shaped this way: at batch 1 and long contexts decode attention is a stream of KV bytes, so the kernel
// is built to keep many bytes in flight. A block takes one (token, kv head, partition); its 128 threads copy tiles
// of 32 key rows and 32 value rows into shared memory with cp.async, three tiles in flight, and use each tile while
// the next two arrive. Sixteen lanes share a key row (8 elements each, one 16-byte read of bf16), so a warp covers
// two rows per step with the query held in registers; the running max and sum of each head live in the registers
// of one warp (online softmax across tiles). The partitions are merged by a second kernel in partition order, so
// the result does not depend on the schedule: same bits every replay (the tensor-core kernel merges them in its
// last block instead, in the same order, and needs the merge kernel only where its tickets do not reach). A paged
// cache equals a one-block cache of the same capacity (the plan depends on shapes only).
#include <algorithm>

#include "cuda/attention-decode.cuh"

namespace weft::cuda {
namespace {
using namespace decode;

constexpr int kChunk = 8;         // cache elements a lane reads at a time (16 bytes of bf16)
constexpr int kMaxRowLanes = 16;  // lanes that share one row

// The CUDA-core kernel's lanes and shared memory for a plan.
struct CoreLayout {
  int row_lanes;        // RL: lanes per row, a power of two covering hd / kChunk chunks (at most 16)
  int chunks_per_lane;  // CPL: 1, or 2 for head dims over 128
  size_t stage_bytes;   // the K and V tiles of all stages (reused for the final reduction)
  size_t smem;
};

CoreLayout core_layout(const DecodePlan& plan, int64_t hd, size_t kv_bytes, bool quantized) {
  CoreLayout l{};
  const int64_t chunks = hd / kChunk;
  l.row_lanes = 1;
  while (l.row_lanes < kMaxRowLanes && l.row_lanes < chunks) l.row_lanes *= 2;
  l.chunks_per_lane = static_cast<int>(ceil_div(chunks, l.row_lanes));
  l.stage_bytes = std::max<size_t>(size_t{kStages} * 2 * kTileRows * hd * kv_bytes,
                                   size_t{kWarps} * plan.head_chunk * hd * sizeof(float));
  l.smem = l.stage_bytes + size_t(plan.P) * sizeof(int32_t) + (quantized ? 2 * size_t(plan.P) * sizeof(float) : 0) +
           size_t(plan.head_chunk) * (kTileRows + 1) * sizeof(float);
  return l;
}

// kChunk consecutive cache elements in shared memory as f32 (codes as their values before the row scale).
__device__ __forceinline__ void chunk_as_f32(const float* p, float (&f)[kChunk]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}
__device__ __forceinline__ void chunk_as_f32(const __nv_bfloat16* p, float (&f)[kChunk]) {
  const uint4 x = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);  // element 2i in the low half (little-endian)
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void chunk_as_f32(const __nv_fp8_e4m3* p, float (&f)[kChunk]) {
  const uint2 x = *reinterpret_cast<const uint2*>(p);
  const uint32_t w[2] = {x.x, x.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float2 a = e4m3x2_to_float2(w[i] & 0xffffu), b = e4m3x2_to_float2(w[i] >> 16);
    f[4 * i] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = b.x, f[4 * i + 3] = b.y;
  }
}
// int8: byte b as the float 2^23 + (b + 128) (one byte permute into 0x4B0000uu after flipping the sign bit),
// minus 2^23 + 128: exact, and cheaper than an int-to-float conversion.
__device__ __forceinline__ void chunk_as_f32(const int8_t* p, float (&f)[kChunk]) {
  const uint2 x = *reinterpret_cast<const uint2*>(p);
  const uint32_t w[2] = {x.x ^ 0x80808080u, x.y ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    f[i] = __uint_as_float(__byte_perm(w[i / 4], 0x4B000000u, 0x7650u | (i % 4))) - 8388736.0f;
}

// grid (n_part, T * n_kv * n_head_chunks). part_out [T * nH, n_part, hd], part_ml [T * nH, n_part, 2] (max,
// sum). KV: the cache's element type (f32, bf16, or the 1-byte codes with k_scales, v_scales [rows]). HC: query
// heads held in registers; CPL: chunks per lane of a row.
template <typename KV, int HC, int CPL>
__global__ void __launch_bounds__(kThreads)
    attention_decode_partial(const float* __restrict__ q, const KV* __restrict__ k_cache,
                             const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                             const int32_t* __restrict__ positions, int nH, int hd, int P, int n_part, int n_hc,
                             int RL, size_t stage_bytes, float scale, float* __restrict__ part_out,
                             float* __restrict__ part_ml, DeviceStatus* status, const float* __restrict__ k_scales,
                             const float* __restrict__ v_scales) {
  constexpr bool quantized = kKvQuantized<KV>;
  constexpr int kHeadsPerWarp = (HC + kWarps - 1) / kWarps;
  pdl_trigger();
  pdl_wait();
  DecodeUnit u;
  if (!decode_unit(kv, token_seq, positions, nH, n_part, n_hc, HC, status, u)) return;
  const int np = u.np, nh = u.nh;

  extern __shared__ __align__(16) unsigned char smem[];
  const int tile_elems = kTileRows * hd;
  KV* tiles = reinterpret_cast<KV*>(smem);  // [kStages][K tile, V tile][kTileRows][hd]
  int32_t* rows = reinterpret_cast<int32_t*>(smem + stage_bytes);  // [P] each position's cache row
  float* row_scales = reinterpret_cast<float*>(rows + P);          // quantized: [P] k scales, [P] v scales
  float* sc = row_scales + (quantized ? 2 * P : 0);                // [HC][kTileRows] scores, then weights
  float* alpha = sc + HC * kTileRows;                              // [HC] this tile's rescale of the sums
  float* reduce = reinterpret_cast<float*>(smem);                  // [kWarps][HC][hd] at the end (over tiles)
  load_partition_rows<quantized>(kv, u, status, k_scales, v_scales, rows, row_scales, row_scales + P);

  // Tile `it` into its stage: rows past the partition are zeros.
  constexpr int kCopyBytes = sizeof(KV) == 1 ? 8 : 16;  // a code row is hd bytes: a multiple of 8
  constexpr int kCopyElems = kCopyBytes / sizeof(KV);
  const int copies_per_row = hd / kCopyElems;
  auto issue = [&](int it) {
    KV* kt = tiles + size_t(it % kStages) * 2 * tile_elems;
    KV* vt = kt + tile_elems;
    const int r0 = it * kTileRows;
    for (int x = threadIdx.x; x < kTileRows * copies_per_row; x += kThreads) {
      const int r = x / copies_per_row, e = (x % copies_per_row) * kCopyElems;
      const bool in = r0 + r < np;
      const size_t off = (in ? size_t(rows[r0 + r]) * hd : 0) + e;
      if constexpr (kCopyBytes == 16) {
        cp_async16(smem_u32(kt + r * hd + e), k_cache + off, in ? 16 : 0);
        cp_async16(smem_u32(vt + r * hd + e), v_cache + off, in ? 16 : 0);
      } else {
        cp_async8(smem_u32(kt + r * hd + e), k_cache + off, in);
        cp_async8(smem_u32(vt + r * hd + e), v_cache + off, in);
      }
    }
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int li = threadIdx.x % RL, rg = threadIdx.x / RL, row_groups = kThreads / RL;
  float qr[CPL][HC][kChunk], acc[CPL][HC][kChunk];
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    const int d0 = (li + RL * j) * kChunk;
#pragma unroll
    for (int h = 0; h < HC; ++h)
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        qr[j][h][e] = d0 < hd && h < nh ? q[(size_t(u.t) * nH + u.h_first + h) * hd + d0 + e] : 0.0f;
        acc[j][h][e] = 0;
      }
  }
  float m_run[kHeadsPerWarp], l_run[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) m_run[i] = -INFINITY, l_run[i] = 0;

  stream_tiles<kStages>(static_cast<int>(ceil_div(np, kTileRows)), issue, [&](int it) {
    const KV* kt = tiles + size_t(it % kStages) * 2 * tile_elems;
    const KV* vt = kt + tile_elems;
    const int r0 = it * kTileRows, nr = min(kTileRows, np - r0);

    // Scores: the row group's RL lanes each take CPL chunks of the row, then sum over the RL lanes. Every row
    // group runs the same number of rows (zeros past nr), so the shuffles stay convergent.
    for (int r = rg; r < kTileRows; r += row_groups) {
      float dot[HC];
#pragma unroll
      for (int h = 0; h < HC; ++h) dot[h] = 0;
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int d0 = (li + RL * j) * kChunk;
        if (d0 >= hd) continue;
        float k8[kChunk];
        chunk_as_f32(kt + r * hd + d0, k8);
#pragma unroll
        for (int h = 0; h < HC; ++h)
#pragma unroll
          for (int e = 0; e < kChunk; ++e) dot[h] += qr[j][h][e] * k8[e];
      }
#pragma unroll
      for (int h = 0; h < HC; ++h)
        for (int o = RL / 2; o > 0; o >>= 1) dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], o);
      if (li == 0 && r < nr) {
        const float row_scale = quantized ? scale * row_scales[r0 + r] : scale;
#pragma unroll
        for (int h = 0; h < HC; ++h) sc[h * kTileRows + r] = dot[h] * row_scale;
      }
    }
    __syncthreads();

    softmax_tile<kTileRows>(sc, alpha, quantized ? row_scales + P + r0 : nullptr, nh, nr, m_run, l_run);
    __syncthreads();

    // Values: the same lanes and chunks as the keys; each row group sums its rows, added up after the last tile.
#pragma unroll
    for (int h = 0; h < HC; ++h) {
      const float a = h < nh ? alpha[h] : 0.0f;
#pragma unroll
      for (int j = 0; j < CPL; ++j)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) acc[j][h][e] *= a;
    }
    for (int r = rg; r < nr; r += row_groups) {
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int d0 = (li + RL * j) * kChunk;
        if (d0 >= hd) continue;
        float v8[kChunk];
        chunk_as_f32(vt + r * hd + d0, v8);
#pragma unroll
        for (int h = 0; h < HC; ++h) {
          const float p = sc[h * kTileRows + r];
#pragma unroll
          for (int e = 0; e < kChunk; ++e) acc[j][h][e] += p * v8[e];
        }
      }
    }
  });
  __syncthreads();  // every tile used: the stages become the reduction buffer

  // The row groups' sums: first the ones inside a warp (lanes RL, 2 RL, ... apart), then the warps in order.
#pragma unroll
  for (int j = 0; j < CPL; ++j)
#pragma unroll
    for (int h = 0; h < HC; ++h)
#pragma unroll
      for (int e = 0; e < kChunk; ++e)
        for (int o = RL; o < 32; o <<= 1) acc[j][h][e] += __shfl_xor_sync(0xffffffffu, acc[j][h][e], o);
  if (lane < RL) {
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int d0 = (li + RL * j) * kChunk;
      if (d0 >= hd) continue;
#pragma unroll
      for (int h = 0; h < HC; ++h)
#pragma unroll
        for (int e = 0; e < kChunk; ++e) reduce[(warp * HC + h) * hd + d0 + e] = acc[j][h][e];
    }
  }
  __syncthreads();
  for (int x = threadIdx.x; x < nh * hd; x += kThreads) {
    const int h = x / hd, d = x % hd;
    float sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += reduce[(w * HC + h) * hd + d];
    part_out[((size_t(u.t) * nH + u.h_first + h) * n_part + u.c) * hd + d] = sum;
  }
  store_partition_ml(u, nH, n_part, m_run, l_run, part_ml);
}

// grid (T * nH), kThreads threads, n_part floats of shared memory: merge the partitions of one (token, head)
// (merge_partitions, attention-decode.cuh).
__global__ void __launch_bounds__(kThreads)
    attention_decode_merge(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                           const int32_t* __restrict__ positions, int nH, int hd, int n_part,
                           const float* __restrict__ part_out, const float* __restrict__ part_ml,
                           float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  extern __shared__ float weights[];  // [n_part] (rounded up to float4s), then [kWarps][hd] sums
  __shared__ float block_red[kWarps];
  const int th = blockIdx.x, t = th / nH;
  const int seq = token_seq[t], pos = positions[t];
  float* o = out + size_t(th) * hd;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {  // reported by the partial kernel
    for (int d = threadIdx.x; d < hd; d += kThreads) o[d] = 0;
    return;
  }
  const int rows_each = partition_rows(pos, n_part), n_valid = (pos + rows_each) / rows_each;
  merge_partitions(part_ml + size_t(th) * n_part * 2, part_out + size_t(th) * n_part * hd, n_part, n_valid, hd,
                   [](int k) { return k; }, weights, block_red, o);
}

}  // namespace

namespace detail {
int64_t attention_decode_scratch_floats(int64_t T, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms,
                                        bool quantized) {
  const DecodePlan plan = decode_plan(T, n_kv, n_heads / n_kv, C, num_sms, quantized);
  return T * n_heads * plan.n_part * (hd + 2);
}

void launch_attention_decode(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                             int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  int64_t T = q.dim(0), n_kv = k_cache.dim(1), C = kv.capacity(), hd = k_cache.dim(3);
  auto args = {Named{"q", q}, Named{"kCache", k_cache}, Named{"tokenSeq", token_seq},
               Named{"kvBlockTable", kv_block_table}, Named{"positions", positions}};
  WEFT_CHECK(hd % kChunk == 0 && hd <= 2 * kMaxRowLanes * kChunk, "attention",
             "the decode kernel takes head dims that are multiples of ", kChunk, " up to ",
             2 * kMaxRowLanes * kChunk, " (", q, ", ", k_cache, ")");
  WEFT_CHECK(kv.n_blocks * n_kv * kv.block_size < (int64_t{1} << 31), "attention", "a cache of over 2^31 rows (",
             k_cache, ")");
  const bool quantized = k_cache.is_kv_quantized();
  const DecodePlan plan = decode_plan(T, n_kv, n_heads / n_kv, C, num_sms, quantized);
  float* part_out = scratch;
  float* part_ml = scratch + T * n_heads * plan.n_part * hd;
  auto launch_merge = [&] {
    launch_pdl(ctx, attention_decode_merge, static_cast<unsigned>(T * n_heads), kThreads,
               ((plan.n_part + 3) / 4 * 4 + kWarps * hd) * sizeof(float), kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
               int(n_heads), int(hd), plan.n_part, part_out, part_ml, out.data<float>());
    check_launch(ctx, "attention", args);
  };
  const MmaLaunch mma = decode::launch_decode_partial_mma(ctx, plan, q, k_cache, v_cache, token_seq, kv_block_table,
                                                          positions, n_heads, scale, part_out, part_ml,
                                                          out.data<float>());
  if (mma != MmaLaunch::kNotTaken) {
    check_launch(ctx, "attention", args);
    if (mma == MmaLaunch::kPartials) launch_merge();
    return;
  }
  // The CUDA-core kernel: f32 caches and the head dims the tensor-core kernel does not take.
  const CoreLayout layout = core_layout(plan, hd, dtype_size(k_cache.dtype), quantized);
  WEFT_CHECK(layout.smem <= 227 * 1024, "attention", "a GQA group of ", n_heads / n_kv, " heads of ", hd,
             " dims does not fit the decode kernel's shared memory (", q, ", ", k_cache, ")");
  dim3 grid(plan.n_part, static_cast<unsigned>(T * n_kv * plan.n_head_chunks));
  auto partial = [&](auto kernel, const auto* k, const auto* v) {
    if (layout.smem > 48 * 1024)
      check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(layout.smem)),
                 "attention", " (cudaFuncSetAttribute)");
    launch_pdl(ctx, kernel, grid, kThreads, layout.smem, q.data<float>(), k, v, kv, token_seq.data<int32_t>(),
               positions.data<int32_t>(), int(n_heads), int(hd), plan.P, plan.n_part, plan.n_head_chunks,
               layout.row_lanes, layout.stage_bytes, scale, part_out, part_ml, ctx.status, k_cache.kv_scales(),
               v_cache.kv_scales());
  };
  auto by_heads = [&](auto cpl, const auto* k, const auto* v) {
    using KV = std::remove_cv_t<std::remove_pointer_t<decltype(k)>>;
    constexpr int CPL = decltype(cpl)::value;
    switch (plan.head_chunk) {
      case 1: partial(attention_decode_partial<KV, 1, CPL>, k, v); break;
      case 2: partial(attention_decode_partial<KV, 2, CPL>, k, v); break;
      case 4: partial(attention_decode_partial<KV, 4, CPL>, k, v); break;
      default: partial(attention_decode_partial<KV, 8, CPL>, k, v); break;
    }
  };
  WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV, {
    const KV *k = k_cache.data<KV>(), *v = v_cache.data<KV>();
    if (layout.chunks_per_lane == 1)
      by_heads(std::integral_constant<int, 1>{}, k, v);
    else
      by_heads(std::integral_constant<int, 2>{}, k, v);
  });
  check_launch(ctx, "attention", args);
  launch_merge();
}
}  // namespace detail

}  // namespace weft::cuda
