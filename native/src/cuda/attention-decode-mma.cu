// Decode attention on tensor cores: the partition plan, KV tiles and merge of attention-decode.cu, with the two
// products on mma.sync m16n8k16. Why: on CUDA cores a GQA group of g heads costs g FMAs per cache element for the
// scores and g more for the values, plus a conversion per element; at H200's bandwidth that is more than the SMs
// issue, so 1-byte caches ran no faster than bf16 (bench/RESULTS.md). Here the block's heads (up to 8) are the rows
// of a 16-row query tile: each warp's mma covers 8 cache rows x 16 dims for all of them.
//   - Scores: warp w takes rows 8w .. 8w + 7 of the 32-row tile, K fragments by ldmatrix from the padded tile.
//   - Values: warp w takes a quarter of the head dim, V fragments by ldmatrix.trans, the weights as the A operand.
//   - The softmax between them is the CUDA-core kernel's (one warp per head, one lane per row).
// Operands: a bf16 cache is used as stored (bf16 mma); fp8 and int8 codes are converted in shared memory to f16,
// which holds them exactly (f16 mma), their row scales folded into the scores and weights as on CUDA cores.
// Precision: the query and the weights are split into two 16-bit parts, x = hi + lo (each rounded to nearest), and
// both are multiplied by the exact cache values with f32 accumulation, so the operands carry about 16 (bf16) or 22
// (f16) significant bits instead of 8 or 11: the outputs stay within the f32 kernel's bound against the CPU.
#include "cuda/attention-decode.cuh"

namespace weft::cuda::decode {
namespace {

constexpr int kHeadRows = 8;  // query heads a block serves at most (the plan's head chunk): rows 0-7 of the tile

// c += a b for a 16 x 16 A whose rows 8-15 are zero (a1 = a3 = 0): a0 holds (row g, cols 2t, 2t + 1), a2 the same
// row at cols 2t + 8, 2t + 9 (g = lane / 4, t = lane % 4). BF16: bf16 operands, else f16.
template <bool BF16>
__device__ __forceinline__ void mma_top_rows(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  if constexpr (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// (x0, x1) as a pair of 16-bit operands hi and the pair of what rounding left, lo (element 0 in the low half).
template <bool BF16>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  if constexpr (BF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  } else {
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(x0 - hf.x, x1 - hf.y);
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
  }
}

// Two staged codes (element 0 in the low byte) -> the f16 pair of their values, exact: e4m3 by the hardware
// conversion; int8 with the sign bit flipped (b + 128) under the f16 exponent of 1024 is 1024 + b + 128, and one
// hsub2 of 1152 leaves b.
__device__ __forceinline__ uint32_t codes_to_f16x2(const __nv_fp8_e4m3*, uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
  return uint32_t(h.x) | (uint32_t(h.y) << 16);
}
__device__ __forceinline__ uint32_t codes_to_f16x2(const int8_t*, uint32_t two) {
  const uint32_t biased = __byte_perm(two ^ 0x8080u, 0x6464u, 0x4140u);
  const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(1152.0f));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Tiles and shared memory for a cache of KV and head dim HD. bf16: tiles of 32 rows in three stages, the staged
// rows (16-byte padded) are the mma operands, fragments by ldmatrix. Codes: tiles of 64 rows (the same bytes a
// step as bf16's 32) in two stages, the fragments read from the staged codes (16-byte padded rows: no bank
// conflicts) and converted in registers.
template <typename KV, int HD>
struct MmaTiles {
  static constexpr bool kCodes = kKvQuantized<KV>;
  static constexpr int kRows = kCodes ? 64 : 32;
  static constexpr int kStages = kCodes ? 2 : 3;
  static constexpr int kLd = HD + 16 / sizeof(KV);  // staged row stride, elements
  static constexpr size_t kStageBytes = size_t(kStages) * 2 * kRows * kLd * sizeof(KV);
  static size_t bytes(int P) {
    return kStageBytes + size_t(P) * sizeof(int32_t) + (kCodes ? 2 * size_t(P) * sizeof(float) : 0) +
           size_t(kHeadRows) * (kRows + 1) * sizeof(float);
  }
};

// grid (n_part, T * n_kv * n_hc); partials as attention_decode_partial (attention-decode.cu) writes them.
template <typename KV, int HD>
__global__ void __launch_bounds__(kThreads, HD <= 128 ? kBlocksPerSm : 1)
    attention_decode_partial_mma(const float* __restrict__ q, const KV* __restrict__ k_cache,
                                 const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                 const int32_t* __restrict__ positions, int nH, int P, int n_part, int n_hc,
                                 int head_chunk, float scale, float* __restrict__ part_out,
                                 float* __restrict__ part_ml, DeviceStatus* status, const float* __restrict__ k_scales,
                                 const float* __restrict__ v_scales) {
  using L = MmaTiles<KV, HD>;
  constexpr bool kCodes = L::kCodes, kBf16 = !kCodes;
  constexpr int TR = L::kRows, S = L::kStages, LD = L::kLd;
  constexpr int KSTEPS = HD / 16, NT = HD / 32;  // NT: n8 tiles of the output per warp (a quarter of HD)
  constexpr int kScoreTiles = TR / 32;           // n8 tiles of scores per warp
  constexpr int kHeadsPerWarp = kHeadRows / kWarps;
  static_assert(HD % 64 == 0, "output quarters of 16 dims or more");
  pdl_trigger();
  pdl_wait();
  DecodeUnit u;
  if (!decode_unit(kv, token_seq, positions, nH, n_part, n_hc, head_chunk, status, u)) return;

  extern __shared__ __align__(16) unsigned char smem[];
  KV* stages = reinterpret_cast<KV*>(smem);                         // [S][K, V][TR][LD]
  int32_t* rows = reinterpret_cast<int32_t*>(smem + L::kStageBytes);  // [P]
  float* k_row_scales = reinterpret_cast<float*>(rows + P);          // codes: [P]
  float* v_row_scales = k_row_scales + (kCodes ? P : 0);             // codes: [P]
  float* sc = v_row_scales + (kCodes ? P : 0);                       // [kHeadRows][TR] scores, then weights
  float* alpha = sc + kHeadRows * TR;                                // [kHeadRows]
  load_partition_rows<kCodes>(kv, u, status, k_scales, v_scales, rows, k_row_scales, v_row_scales);

  // Tile `it` into its stage, 16-byte copies (rows past the partition are zeros).
  constexpr int kCopyElems = 16 / sizeof(KV), kCopiesPerRow = HD / kCopyElems;
  auto stage_k = [&](int it) { return stages + size_t(it % S) * 2 * TR * LD; };
  auto issue = [&](int it) {
    KV* kt = stage_k(it);
    KV* vt = kt + TR * LD;
    const int r0 = it * TR;
    for (int x = threadIdx.x; x < TR * kCopiesPerRow; x += kThreads) {
      const int r = x / kCopiesPerRow, e = (x % kCopiesPerRow) * kCopyElems;
      const bool in = r0 + r < u.np;
      const size_t off = (in ? size_t(rows[r0 + r]) * HD : 0) + e;
      cp_async16(smem_u32(kt + r * LD + e), k_cache + off, in ? 16 : 0);
      cp_async16(smem_u32(vt + r * LD + e), v_cache + off, in ? 16 : 0);
    }
  };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  // The query's A fragments (head g of the chunk; heads past nh are zero), hi and lo parts.
  uint32_t qa_hi[KSTEPS][2], qa_lo[KSTEPS][2];
  {
    const float* qrow = q + (size_t(u.t) * nH + u.h_first + g) * HD;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 x = make_float2(0, 0);
        if (g < u.nh) x = *reinterpret_cast<const float2*>(qrow + ks * 16 + half * 8 + 2 * tq);
        split_pair<kBf16>(x.x, x.y, qa_hi[ks][half], qa_lo[ks][half]);
      }
  }
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
  float m_run[kHeadsPerWarp], l_run[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) m_run[i] = -INFINITY, l_run[i] = 0;

  stream_tiles<S>(static_cast<int>(ceil_div(u.np, TR)), issue, [&](int it) {
    const int r0 = it * TR, nr = min(TR, u.np - r0);
    const KV* kt = stage_k(it);
    const KV* vt = kt + TR * LD;

    // Scores of rows 8 warp + 32 j .. + 7 for the block's heads; hi and lo parts in separate accumulators (two
    // independent mma chains).
#pragma unroll
    for (int j = 0; j < kScoreTiles; ++j) {
      const int rb = 32 * j + 8 * warp;
      float s_hi[4] = {0, 0, 0, 0}, s_lo[4] = {0, 0, 0, 0};
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ks += 2) {
        uint32_t b[4];
        if constexpr (kCodes) {
          const KV* row = kt + (rb + g) * LD + ks * 16 + 2 * tq;
#pragma unroll
          for (int i = 0; i < 4; ++i)
            b[i] = codes_to_f16x2(kt, *reinterpret_cast<const uint16_t*>(row + 8 * i));
        } else {
          ldmatrix_x4(b, smem_u32(kt + (rb + (lane & 7)) * LD + ks * 16 + (lane >> 3) * 8));
        }
        mma_top_rows<kBf16>(s_hi, qa_hi[ks][0], qa_hi[ks][1], b[0], b[1]);
        mma_top_rows<kBf16>(s_lo, qa_lo[ks][0], qa_lo[ks][1], b[0], b[1]);
        mma_top_rows<kBf16>(s_hi, qa_hi[ks + 1][0], qa_hi[ks + 1][1], b[2], b[3]);
        mma_top_rows<kBf16>(s_lo, qa_lo[ks + 1][0], qa_lo[ks + 1][1], b[2], b[3]);
      }
      if (g < u.nh) {
        const int r = rb + 2 * tq;
        float s0 = (s_hi[0] + s_lo[0]) * scale, s1 = (s_hi[1] + s_lo[1]) * scale;
        if constexpr (kCodes) {
          if (r0 + r < u.np) s0 *= k_row_scales[r0 + r];
          if (r0 + r + 1 < u.np) s1 *= k_row_scales[r0 + r + 1];
        }
        sc[g * TR + r] = s0;
        sc[g * TR + r + 1] = s1;
      }
    }
    __syncthreads();
    softmax_tile<TR>(sc, alpha, kCodes ? v_row_scales + r0 : nullptr, u.nh, nr, m_run, l_run);
    __syncthreads();

    // Values: this warp's quarter of the head dim, over the tile's rows as k16 steps.
    const float a = g < u.nh ? alpha[g] : 0.0f;
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] *= a, o[n][1] *= a;
#pragma unroll
    for (int ks = 0; ks < TR / 16; ++ks) {
      float2 p0 = make_float2(0, 0), p1 = make_float2(0, 0);
      if (g < u.nh) {
        p0 = *reinterpret_cast<const float2*>(sc + g * TR + ks * 16 + 2 * tq);
        p1 = *reinterpret_cast<const float2*>(sc + g * TR + ks * 16 + 8 + 2 * tq);
      }
      uint32_t pa_hi0, pa_lo0, pa_hi2, pa_lo2;
      split_pair<kBf16>(p0.x, p0.y, pa_hi0, pa_lo0);
      split_pair<kBf16>(p1.x, p1.y, pa_hi2, pa_lo2);
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        const int col = warp * (HD / 4) + n * 8;
        uint32_t b[4];
        if constexpr (kCodes) {
          // b[0], b[1]: rows 2t, 2t + 1 and 2t + 8, 2t + 9 of the step at column col + g; b[2], b[3] at col + 8 + g.
          const unsigned char* v8 = reinterpret_cast<const unsigned char*>(vt + (ks * 16 + 2 * tq) * LD + col + g);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const unsigned char* p = v8 + (i & 1) * 8 * LD + (i >> 1) * 8;
            b[i] = codes_to_f16x2(vt, uint32_t(p[0]) | (uint32_t(p[LD]) << 8));
          }
        } else {
          ldmatrix_x4_trans(b, smem_u32(vt + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + col + (lane >> 4) * 8));
        }
        mma_top_rows<kBf16>(o[n], pa_hi0, pa_hi2, b[0], b[1]);
        mma_top_rows<kBf16>(o[n], pa_lo0, pa_lo2, b[0], b[1]);
        mma_top_rows<kBf16>(o[n + 1], pa_hi0, pa_hi2, b[2], b[3]);
        mma_top_rows<kBf16>(o[n + 1], pa_lo0, pa_lo2, b[2], b[3]);
      }
    }
  });

  if (g < u.nh) {
    float* out = part_out + ((size_t(u.t) * nH + u.h_first + g) * n_part + u.c) * HD + warp * (HD / 4) + 2 * tq;
#pragma unroll
    for (int n = 0; n < NT; ++n) *reinterpret_cast<float2*>(out + n * 8) = make_float2(o[n][0], o[n][1]);
  }
  store_partition_ml(u, nH, n_part, m_run, l_run, part_ml);
}

template <typename KV, int HD>
void launch_mma(const Ctx& ctx, const DecodePlan& plan, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                const Tensor& token_seq, const KvBlockTable& kv, const Tensor& positions, int64_t n_heads, float scale,
                float* part_out, float* part_ml) {
  auto kernel = attention_decode_partial_mma<KV, HD>;
  const size_t smem = MmaTiles<KV, HD>::bytes(plan.P);
  if (smem > 48 * 1024)
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "attention", " (cudaFuncSetAttribute)");
  const dim3 grid(plan.n_part, static_cast<unsigned>(q.dim(0) * kv.n_kv * plan.n_head_chunks));
  launch_pdl(ctx, kernel, grid, kThreads, smem, q.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), kv,
             token_seq.data<int32_t>(), positions.data<int32_t>(), int(n_heads), plan.P, plan.n_part,
             plan.n_head_chunks, plan.head_chunk, scale, part_out, part_ml, ctx.status, k_cache.kv_scales(),
             v_cache.kv_scales());
}

}  // namespace

bool launch_decode_partial_mma(const Ctx& ctx, const DecodePlan& plan, const Tensor& q, const Tensor& k_cache,
                               const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                               const Tensor& positions, int64_t n_heads, float scale, float* part_out, float* part_ml) {
  const int64_t hd = k_cache.dim(3);
  if (k_cache.dtype == DType::F32 || plan.head_chunk > kHeadRows || (hd != 64 && hd != 128 && hd != 256)) return false;
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  auto by_dim = [&](auto kv_tag) {
    using KV = decltype(kv_tag);
    if (hd == 64)
      launch_mma<KV, 64>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out, part_ml);
    else if (hd == 128)
      launch_mma<KV, 128>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out, part_ml);
    else
      launch_mma<KV, 256>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out, part_ml);
  };
  if (k_cache.dtype == DType::BF16)
    by_dim(__nv_bfloat16{});
  else if (k_cache.dtype == DType::FP8)
    by_dim(__nv_fp8_e4m3{});
  else if (k_cache.dtype == DType::I8)
    by_dim(int8_t{});
  else
    return false;
  return true;
}

}  // namespace weft::cuda::decode
