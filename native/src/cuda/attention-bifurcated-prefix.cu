// Bifurcated attention's prefix on tensor cores (flash-decoding over a group's shared positions): a block takes
// one (group, kv head, chunk of P shared positions) and up to 64 of the group's query rows (members x the kv
// head's GQA heads, the tile's rows past them zero and ignored), and walks the chunk's K/V tiles of 64 positions
// once for all of them with the tiles of mma-tile.cuh: cp.async into staging areas while the warps compute on
// the f16 tiles of the one before (a bf16 cache: two areas, so that two tiles are in flight while one computes;
// the kernel is meant to be bound by bytes), S = Q K^T on mma, online softmax in f32 registers (exp2), O += P V
// on mma.
// Warps go to rows first, then to positions: the block's 4 warps hold RT = 1, 2 or 4 row tiles of 16 (the
// batch's tokens x GQA heads bound the rows on the host) and split each K/V tile's positions KS = 4 / RT ways, so
// a group of few rows (MHA: one row per member) still keeps every warp's tensor cores busy; the KS partials of a row are
// merged in shared memory at the end. The chunk's partial (max, sum, unnormalized out) goes to the slot the fp32
// prefix kernel would write, in natural-log units, so the merge kernel takes both.
#include <type_traits>

#include "cuda/attention-bifurcated-prefix.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda::bifurcated {
namespace {

constexpr int kThreads = 128, kWarps = 4;
constexpr int kBK = 64;  // positions per K/V tile
constexpr float kLn2 = 0.6931471805599453f;

template <int HD, typename KV>
using Layout = KvTileLayout<HD, kBK, KV>;

// Staging areas: two for a bf16 cache (99 KB of tiles at hd 128: two blocks an SM, each with two tiles in
// flight), one for f32 (99 KB already).
template <typename KV>
constexpr int kStages = sizeof(KV) == 2 ? 2 : 1;

// Dynamic shared memory: the staging areas, the f16 tiles, key row offsets [P] i64, the group's members [T].
template <int HD, typename KV>
size_t smem_for(int P, int64_t T) {
  using L = Layout<HD, KV>;
  return kStages<KV> * L::kStage + 2 * L::kHalfTile + size_t(P) * sizeof(int64_t) + size_t(T) * sizeof(int32_t);
}

// grid (n_row_blocks * slots, G * n_kv): block (rb + n_row_blocks * c, task * n_kv + g) takes group `task`'s
// rows rb * 16 RT .. + 16 RT over chunk c, positions [c P, min(c P + P, shared)) read through the first member's
// table row. qscale = scale * log2(e). smem as smem_for.
template <int HD, int KS, typename KV>
__global__ void __launch_bounds__(kThreads, 2)
    prefix_mma(const float* __restrict__ q, const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,
               KvBlockTable kv, const int32_t* __restrict__ token_seq, const int32_t* __restrict__ token_group,
               const int32_t* __restrict__ group_shared, int T, int G, int nH, int P, int n_row_blocks, int n_slots,
               float qscale, float* __restrict__ part_out, float* __restrict__ part_ml, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  using L = Layout<HD, KV>;
  constexpr int LD = L::kLd, KT = HD / 16, NO = HD / 8;
  constexpr int RT = kWarps / KS, ROWS = 16 * RT;  // row tiles and query rows of the block
  constexpr int KW = kBK / KS, NS = KW / 8;        // positions of a tile per warp, its n8 tiles of S
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int S = kStages<KV>;
  KV* stage = reinterpret_cast<KV*>(smem);  // [S][2][kBK][HD] of KV: K, V; tile j in area j % S
  __half* kh = reinterpret_cast<__half*>(smem + S * L::kStage);  // [kBK][LD]; the Q tile first
  __half* vh = kh + kBK * LD;                                      // [kBK][LD]
  int64_t* rows = reinterpret_cast<int64_t*>(vh + kBK * LD);      // [P]: the chunk's key row offsets (elements)
  int* members = reinterpret_cast<int*>(rows + P);                 // [T]
  __shared__ int row_th[ROWS];  // (token * nH + head) of each row, -1 past the group's rows
  __shared__ int n_members;

  const int n_kv = static_cast<int>(kv.n_kv), group = nH / n_kv;
  const int rb = blockIdx.x % n_row_blocks, c = blockIdx.x / n_row_blocks;
  const int task = blockIdx.y / n_kv, g = blockIdx.y % n_kv;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, tq = lane & 3;
  const int rt = warp % RT, ks = warp / RT;  // the warp's row tile and its share of each tile's positions

  const int shared = shared_of(group_shared, task, kv.capacity()), lo = c * P;
  if (lo >= shared) return;
  find_members(token_group, T, G, task, members, &n_members);
  __syncthreads();
  const int n_rows = min(ROWS, n_members * group - rb * ROWS);
  if (n_rows <= 0) return;
  const int reporter_t = members[0], seq = token_seq[reporter_t], np = min(lo + P, shared) - lo;
  if (!kv_token_in_range(kv, reporter_t, seq, lo + np - 1, kKvRead, status, c == 0 && g == 0 && tid == 0)) return;
  for (int i = tid; i < np; i += kThreads) rows[i] = kv_read_row(kv, reporter_t, seq, g, lo + i, status) * HD;
  for (int r = tid; r < ROWS; r += kThreads) {
    const int x = rb * ROWS + r;
    row_th[r] = r < n_rows ? members[x / group] * nH + g * group + x % group : -1;
  }
  __syncthreads();
  // Tile j's K and V rows: fetched into area j % S (each thread fetches and converts the same chunks of every
  // tile, so an area is free for the thread once it converted the tile before: no barrier), converted to kh, vh
  // with the tiles fetched after it still in flight.
  const int n_tiles = ceil_div(np, kBK);
  auto fetch = [&](int j) {
    fetch_kv_tile<HD, kBK, kThreads>(stage + (j % S) * (2 * kBK * HD), k_cache, v_cache, rows + j * kBK,
                                     np - j * kBK, tid);
  };
  auto convert = [&](int j) {
    convert_kv_tile<HD, kBK, kThreads>(stage + (j % S) * (2 * kBK * HD), kh, vh, rows + j * kBK, np - j * kBK,
                                       nullptr, nullptr, tid, j + 1 < min(n_tiles, j + S));
  };
  for (int j = 0; j < S && j < n_tiles; ++j) fetch(j);

  // Q tile (scaled, f16) -> kh -> each warp's A fragments of its row tile, while tile 0 is in flight.
  for (int i = tid; i < ROWS * HD / 4; i += kThreads) {
    const int r = i / (HD / 4), col = (i % (HD / 4)) * 4;
    q4_to_f16(row_th[r] >= 0 ? q + size_t(row_th[r]) * HD + col : nullptr, qscale, kh + r * LD + col);
  }
  __syncthreads();
  uint32_t qf[KT][4];
  {
    const uint32_t a = a_frag_addr<LD>(kh + rt * 16 * LD, lane);
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qf[kk], a + kk * 16 * sizeof(__half));
  }
  __syncthreads();  // every warp has its Q fragments before kh is overwritten
  convert(0);
  __syncthreads();

  const uint32_t k_addr = k_frag_addr<LD>(kh + ks * KW * LD, lane), v_addr = v_frag_addr<LD>(vh + ks * KW * LD, lane);
  const bool active = rt * 16 < n_rows;  // warp-uniform: the row tile holds some of the group's rows
  float o_acc[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;  // log2 units; l: this thread's partial row sums
  for (int j = 0; j < n_tiles; ++j) {
    const int first = j * kBK + ks * KW;  // the warp's first position of the tile in the chunk
    if (j + S < n_tiles) fetch(j + S);
    if (active && first < np) {
      float s[NS][4];
      mma_qk<KT, NS, LD>(s, qf, k_addr);
      if (first + KW > np) {  // the chunk ends among the warp's positions
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (first + n * 8 + 2 * tq + (e & 1) >= np) s[n][e] = -INFINITY;
      }
      uint32_t pf[NS / 2][4];
      softmax_step<NS, NO>(s, m0, m1, l0, l1, o_acc, pf);
      mma_pv<NS, NO, LD>(o_acc, pf, v_addr);
    }
    if (j + 1 < n_tiles) {
      __syncthreads();  // every warp is done with kh, vh
      convert(j + 1);
      __syncthreads();
    }
  }

  if constexpr (KS > 1) {
    // The row tile's KS partials -> warp ks = 0. The staging areas are free: the last convert waited for every
    // copy and a barrier followed it. Layout [(KS - 1) RT][NO * 4 + 4][32]: lane-major, no bank conflicts.
    constexpr int kPart = (NO * 4 + 4) * 32;
    static_assert((KS - 1) * RT * kPart * sizeof(float) <= L::kStage, "partials fit the staging area");
    float* part = reinterpret_cast<float*>(smem);
    if (ks > 0) {
      float* p = part + ((ks - 1) * RT + rt) * kPart + lane;
#pragma unroll
      for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[(n * 4 + e) * 32] = o_acc[n][e];
      p[NO * 4 * 32] = m0;
      p[(NO * 4 + 1) * 32] = m1;
      p[(NO * 4 + 2) * 32] = l0;
      p[(NO * 4 + 3) * 32] = l1;
    }
    __syncthreads();
    if (ks > 0 || !active) return;
    for (int k = 1; k < KS; ++k) {
      const float* p = part + ((k - 1) * RT + rt) * kPart + lane;
      const float pm0 = p[NO * 4 * 32], pm1 = p[(NO * 4 + 1) * 32];
      const float mx0 = fmaxf(m0, pm0), mx1 = fmaxf(m1, pm1);  // warp ks = 0 saw a position: finite
      const float a0 = fast_exp2(m0 - mx0), a1 = fast_exp2(m1 - mx1);
      const float b0 = fast_exp2(pm0 - mx0), b1 = fast_exp2(pm1 - mx1);  // 0 for a warp that saw none
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o_acc[n][0] = o_acc[n][0] * a0 + p[(n * 4) * 32] * b0;
        o_acc[n][1] = o_acc[n][1] * a0 + p[(n * 4 + 1) * 32] * b0;
        o_acc[n][2] = o_acc[n][2] * a1 + p[(n * 4 + 2) * 32] * b1;
        o_acc[n][3] = o_acc[n][3] * a1 + p[(n * 4 + 3) * 32] * b1;
      }
      l0 = l0 * a0 + p[(NO * 4 + 2) * 32] * b0;
      l1 = l1 * a1 + p[(NO * 4 + 3) * 32] * b1;
      m0 = mx0;
      m1 = mx1;
    }
  }
  if (!active) return;

#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = rt * 16 + gr + 8 * half;
    if (r >= n_rows) continue;
    const size_t x = size_t(row_th[r]) * n_slots + c;
    float* o = part_out + x * HD + 2 * tq;
#pragma unroll
    for (int n = 0; n < NO; ++n)
      *reinterpret_cast<float2*>(o + n * 8) = make_float2(o_acc[n][2 * half], o_acc[n][2 * half + 1]);
    if (tq == 0) {
      part_ml[2 * x] = (half ? m1 : m0) * kLn2;
      part_ml[2 * x + 1] = half ? l1 : l0;
    }
  }
}

template <int HD, int KS, typename KV>
void launch(const Ctx& ctx, dim3 grid, size_t smem, const float* q, const KV* k, const KV* v, const KvBlockTable& kv,
            const int32_t* token_seq, const int32_t* token_group, const int32_t* group_shared, int T, int G, int nH,
            int P, int n_row_blocks, int n_slots, float qscale, float* part_out, float* part_ml) {
  auto kernel = prefix_mma<HD, KS, KV>;
  if (smem > 48 * 1024)
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "attentionBifurcated", " (cudaFuncSetAttribute)");
  launch_pdl(ctx, kernel, grid, kThreads, smem, q, k, v, kv, token_seq, token_group, group_shared, T, G, nH, P,
             n_row_blocks, n_slots, qscale, part_out, part_ml, ctx.status);
}

}  // namespace

size_t prefix_mma_smem(int64_t hd, DType kv_dtype, int P, int64_t T) {
  const bool bf16 = kv_dtype == DType::BF16;
  if (hd == 64) return bf16 ? smem_for<64, __nv_bfloat16>(P, T) : smem_for<64, float>(P, T);
  return bf16 ? smem_for<128, __nv_bfloat16>(P, T) : smem_for<128, float>(P, T);
}

void launch_prefix_mma(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& token_group,
                       const Tensor& group_shared, int64_t n_heads, float scale, int P, int slots_a, int n_slots,
                       float* part_out, float* part_ml) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int64_t T = q.dim(0), n_kv = k_cache.dim(1), G = group_shared.dim(0), hd = k_cache.dim(3);
  // A group's rows are at most every token x the GQA heads: the row tiles a block holds, and the blocks a chunk
  // needs; the positions of each tile are split among the warps a row tile leaves over.
  const int64_t rows_max = T * (n_heads / n_kv);
  const int rt = rows_max <= 16 ? 1 : (rows_max <= 32 ? 2 : 4), n_row_blocks = ceil_div(rows_max, 16 * rt);
  const size_t smem = prefix_mma_smem(hd, k_cache.dtype, P, T);
  WEFT_CHECK(smem <= 227 * 1024, "attentionBifurcated", "a batch of ", T,
             " tokens does not fit the prefix kernel's shared memory (", q, ", ", k_cache, ")");
  const dim3 grid(static_cast<unsigned>(n_row_blocks * slots_a), static_cast<unsigned>(G * n_kv));
  WEFT_DISPATCH_KV(k_cache.dtype, KV, {
    auto go = [&](auto head_dim, auto splits) {
      launch<decltype(head_dim)::value, decltype(splits)::value, KV>(
          ctx, grid, smem, q.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), kv, token_seq.data<int32_t>(),
          token_group.data<int32_t>(), group_shared.data<int32_t>(), int(T), int(G), int(n_heads), P, n_row_blocks,
          n_slots, scale * 1.4426950408889634f, part_out, part_ml);
    };
    auto with_splits = [&](auto head_dim) {
      if (rt == 1)
        go(head_dim, std::integral_constant<int, 4>{});
      else if (rt == 2)
        go(head_dim, std::integral_constant<int, 2>{});
      else
        go(head_dim, std::integral_constant<int, 1>{});
    };
    if (hd == 64)
      with_splits(std::integral_constant<int, 64>{});
    else
      with_splits(std::integral_constant<int, 128>{});
  });
}

}  // namespace weft::cuda::bifurcated
