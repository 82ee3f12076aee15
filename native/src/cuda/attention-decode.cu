// Decode attention: split-K flash-decoding over the KV block table (attention.cuh has the plan). Scores are
// dot(q, k) * scale as in the CPU; softmax in fp32 with exp of (score - max). The cache is f32 or bf16, widened
// to f32 as it is read, or fp8 / int8 codes whose row scales are folded in once per row rather than per element:
// a key's into its score (dot(q, codes) * scale * k_scale), a value's into its softmax weight
// (exp(score - max) * v_scale; the sum of the weights is taken before). Each K/V element is read once per kv
// head, for the whole GQA group.
//
// Why it is shaped this way: at batch 1 and long contexts decode attention is a stream of KV bytes, so the kernel
// is built to keep many bytes in flight. A block takes one (token, kv head, partition of P positions); its 128
// threads copy tiles of 32 key rows and 32 value rows into shared memory with cp.async, three tiles in flight, and
// use each tile while the next two arrive. Sixteen lanes share a key row (8 elements each, one 16-byte read of
// bf16), so a warp covers two rows per step with the query held in registers; the running max and sum of each
// head live in the registers of one warp (online softmax across tiles). The partitions are merged by a second
// kernel in partition order, so the result does not depend on the schedule: same bits every replay. f32 and bf16
// caches are read with the same element order, so a bf16 cache equals an f32 cache of the same values bit for
// bit; a paged cache equals a one-block cache of the same capacity (the plan depends on shapes only).
#include <algorithm>

#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"

namespace weft::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;       // key (and value) rows per pipeline stage: one per lane in the softmax
constexpr int kStages = 3;          // tiles in flight: two arriving while one is used
constexpr int kChunk = 8;           // cache elements a lane reads at a time (16 bytes of bf16)
constexpr int kMaxRowLanes = 16;    // lanes that share one row
constexpr int kMaxPartition = 1024; // positions per block at most: their row indices (and scales) stay in shared memory
// About this many blocks resident per SM is what the plan aims the grid at (smem allows 4 for bf16, head dim 128).
constexpr int kBlocksPerSm = 4;
static_assert(kTileRows == 32, "the softmax gives each lane of a warp one row of a tile");

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DecodePlan {
  int P;               // positions per partition, a multiple of kTileRows
  int n_part;          // ceil(C / P)
  int head_chunk;      // HC: query heads a block holds in registers (1, 2, 4 or 8)
  int n_head_chunks;   // ceil(group / HC): blocks per (token, kv head, partition)
  int row_lanes;       // RL: lanes per row, a power of two covering hd / kChunk chunks (at most 16)
  int chunks_per_lane; // CPL: 1, or 2 for head dims over 128
  size_t stage_bytes;  // the K and V tiles of all stages (reused for the final reduction)
  size_t smem;
};

DecodePlan decode_plan(int64_t T, int64_t n_kv, int64_t group, int64_t C, int64_t hd, size_t kv_bytes, int num_sms,
                       bool quantized) {
  DecodePlan p{};
  p.head_chunk = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  p.n_head_chunks = static_cast<int>(ceil_div(group, p.head_chunk));
  const int64_t chunks = hd / kChunk;
  p.row_lanes = 1;
  while (p.row_lanes < kMaxRowLanes && p.row_lanes < chunks) p.row_lanes *= 2;
  p.chunks_per_lane = static_cast<int>(ceil_div(chunks, p.row_lanes));
  const int64_t units = T * n_kv * p.n_head_chunks;
  const int64_t parts_wanted = std::max<int64_t>(1, ceil_div(int64_t{kBlocksPerSm} * num_sms, units));
  const int64_t tiles = ceil_div(C, kTileRows);
  const int64_t tiles_per_part = std::clamp<int64_t>(ceil_div(tiles, parts_wanted), 1, kMaxPartition / kTileRows);
  p.P = static_cast<int>(tiles_per_part * kTileRows);
  p.n_part = static_cast<int>(ceil_div(C, p.P));
  p.stage_bytes = std::max<size_t>(size_t{kStages} * 2 * kTileRows * hd * kv_bytes,
                                   size_t{kWarps} * p.head_chunk * hd * sizeof(float));
  p.smem = p.stage_bytes + size_t(p.P) * sizeof(int32_t) + (quantized ? 2 * size_t(p.P) * sizeof(float) : 0) +
           size_t(p.head_chunk) * (kTileRows + 1) * sizeof(float);
  return p;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// `bytes` (16 or 8) global -> shared; src_bytes 0 fills zeros (rows past the partition: a poisoned cache row must
// not reach P V as NaN * 0).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool in) {
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(in ? 16 : 0)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(in ? 8 : 0)
                 : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

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
  const int n_kv = static_cast<int>(kv.n_kv);
  const int c = blockIdx.x, t = blockIdx.y / (n_kv * n_hc), g = blockIdx.y / n_hc % n_kv, hc = blockIdx.y % n_hc;
  const int seq = token_seq[t], pos = positions[t];
  if (!kv_token_in_range(kv, t, seq, pos, kKvRead, status, c == 0 && g == 0 && hc == 0 && threadIdx.x == 0)) return;
  const int len = pos + 1, p0 = c * P;
  if (p0 >= len) return;
  const int np = min(P, len - p0);
  const int group = nH / n_kv, h_first = g * group + hc * HC, nh = min(HC, group - hc * HC);

  extern __shared__ __align__(16) unsigned char smem[];
  const int tile_elems = kTileRows * hd;
  KV* tiles = reinterpret_cast<KV*>(smem);  // [kStages][K tile, V tile][kTileRows][hd]
  int32_t* rows = reinterpret_cast<int32_t*>(smem + stage_bytes);  // [P] each position's cache row
  float* row_scales = reinterpret_cast<float*>(rows + P);          // quantized: [P] k scales, [P] v scales
  float* sc = row_scales + (quantized ? 2 * P : 0);                // [HC][kTileRows] scores, then weights
  float* alpha = sc + HC * kTileRows;                              // [HC] this tile's rescale of the sums
  float* reduce = reinterpret_cast<float*>(smem);                  // [kWarps][HC][hd] at the end (over tiles)

  for (int i = threadIdx.x; i < np; i += kThreads) {
    const int64_t row = kv_read_row(kv, t, seq, g, p0 + i, status);
    rows[i] = static_cast<int32_t>(row);
    if constexpr (quantized) {
      row_scales[i] = k_scales[row];
      row_scales[P + i] = v_scales[row];
    }
  }
  __syncthreads();

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
      copy_async<kCopyBytes>(kt + r * hd + e, k_cache + off, in);
      copy_async<kCopyBytes>(vt + r * hd + e, v_cache + off, in);
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
        qr[j][h][e] = d0 < hd && h < nh ? q[(size_t(t) * nH + h_first + h) * hd + d0 + e] : 0.0f;
        acc[j][h][e] = 0;
      }
  }
  float m_run[kHeadsPerWarp], l_run[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) m_run[i] = -INFINITY, l_run[i] = 0;

  const int n_tiles = static_cast<int>(ceil_div(np, kTileRows));
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) issue(s);
    copy_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    copy_async_wait<kStages - 2>();
    __syncthreads();  // tile `it` landed for every thread; the stage tile it - 1 used is free again
    if (it + kStages - 1 < n_tiles) issue(it + kStages - 1);
    copy_async_commit();
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

    // Online softmax, one warp per head (lane = row): the new max, the rescale of what was summed before, the
    // weights of this tile (times the value row's scale for codes).
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      const int h = warp + i * kWarps;
      if (h >= nh) continue;
      const bool in = lane < nr;
      const float s = in ? sc[h * kTileRows + lane] : -INFINITY;
      const float m_new = fmaxf(m_run[i], warp_max(s));
      const float e = in ? expf(s - m_new) : 0.0f;
      const float a = expf(m_run[i] - m_new);  // 0 on the first tile (m_run = -inf)
      l_run[i] = l_run[i] * a + warp_sum(e);
      m_run[i] = m_new;
      sc[h * kTileRows + lane] = quantized && in ? e * row_scales[P + r0 + lane] : e;
      if (lane == 0) alpha[h] = a;
    }
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
  }
  copy_async_wait<0>();
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
    part_out[((size_t(t) * nH + h_first + h) * n_part + c) * hd + d] = sum;
  }
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    const int h = warp + i * kWarps;
    if (h < nh && lane == 0) {
      const size_t r = (size_t(t) * nH + h_first + h) * n_part + c;
      part_ml[2 * r] = m_run[i];
      part_ml[2 * r + 1] = l_run[i];
    }
  }
}

// grid (T * nH): merge the partitions of one (token, head) in partition order.
__global__ void attention_decode_merge(KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                       const int32_t* __restrict__ positions, int nH, int hd, int P, int n_part,
                                       const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                       float* __restrict__ out) {
  pdl_trigger();
  pdl_wait();
  int th = blockIdx.x, t = th / nH;
  int seq = token_seq[t], pos = positions[t];
  float* o = out + size_t(th) * hd;
  if (seq < 0 || seq >= kv.n_seqs || pos < 0 || pos >= kv.capacity()) {  // reported by the partial kernel
    for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0;
    return;
  }
  int n_valid = (pos + 1 + P - 1) / P;
  const float* ml = part_ml + size_t(th) * n_part * 2;
  float M = -INFINITY;
  for (int c = 0; c < n_valid; ++c) M = fmaxf(M, ml[2 * c]);
  float L = 0;
  for (int c = 0; c < n_valid; ++c) L += expf(ml[2 * c] - M) * ml[2 * c + 1];
  float inv_L = 1.0f / L;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int c = 0; c < n_valid; ++c) acc += expf(ml[2 * c] - M) * part_out[(size_t(th) * n_part + c) * hd + d];
    o[d] = acc * inv_L;
  }
}

}  // namespace

namespace detail {
int64_t attention_decode_scratch_floats(int64_t T, int64_t n_heads, int64_t n_kv, int64_t C, int64_t hd, int num_sms,
                                        bool quantized) {
  // The partitions depend on the shapes and the SM count alone (not on the element size), so f32 and bf16 caches
  // sum in the same order.
  const DecodePlan plan = decode_plan(T, n_kv, n_heads / n_kv, C, hd, 1, num_sms, quantized);
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
  const DecodePlan plan =
      decode_plan(T, n_kv, n_heads / n_kv, C, hd, dtype_size(k_cache.dtype), num_sms, quantized);
  WEFT_CHECK(plan.smem <= 227 * 1024, "attention", "a GQA group of ", n_heads / n_kv, " heads of ", hd,
             " dims does not fit the decode kernel's shared memory (", q, ", ", k_cache, ")");
  float* part_out = scratch;
  float* part_ml = scratch + T * n_heads * plan.n_part * hd;
  dim3 grid(plan.n_part, static_cast<unsigned>(T * n_kv * plan.n_head_chunks));
  auto partial = [&](auto kernel, const auto* k, const auto* v) {
    if (plan.smem > 48 * 1024)
      check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)),
                 "attention", " (cudaFuncSetAttribute)");
    launch_pdl(ctx, kernel, grid, kThreads, plan.smem, q.data<float>(), k, v, kv, token_seq.data<int32_t>(),
               positions.data<int32_t>(), int(n_heads), int(hd), plan.P, plan.n_part, plan.n_head_chunks,
               plan.row_lanes, plan.stage_bytes, scale, part_out, part_ml, ctx.status, k_cache.kv_scales(),
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
    if (plan.chunks_per_lane == 1)
      by_heads(std::integral_constant<int, 1>{}, k, v);
    else
      by_heads(std::integral_constant<int, 2>{}, k, v);
  });
  check_launch(ctx, "attention", args);
  launch_pdl(ctx, attention_decode_merge, static_cast<unsigned>(T * n_heads), 128, 0,
      kv, token_seq.data<int32_t>(), positions.data<int32_t>(), int(n_heads), int(hd), plan.P, plan.n_part,
      part_out, part_ml, out.data<float>());
  check_launch(ctx, "attention", args);
}
}  // namespace detail

}  // namespace weft::cuda
