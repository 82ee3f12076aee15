// Prefill attention: FlashAttention-2 on tensor cores for head dims 64 and 128, tiled fp32 on CUDA cores for
// the others, both reading the cache through the KV block table (attention.cuh has the plan). Scores are
// dot(q, k) * scale as in the CPU; softmax in fp32 (the tensor-core kernel: exp2 of log2-scaled scores).
#include <algorithm>
#include <climits>
#include <type_traits>

#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"
#include "cuda/attention-query-tiles.cuh"
#include "cuda/mma-tile.cuh"

namespace weft::cuda {
namespace {

// ---- prefill: tensor-core flash attention (FlashAttention-2 on mma.sync m16n8k16, f16 operands, f32 accumulators)
//
// Block = 64 query tokens x one query head, 4 warps of 16 query rows each. Per key tile of 64 positions:
//   - the next tile's K and V rows (f32 or bf16 in the cache) are fetched by cp.async, 16-byte chunks, into a
//     staging area of the cache's type while the warps compute on the current one; each thread then converts
//     the chunks it fetched itself to f16 in two padded tiles (16 B row pad: ldmatrix without bank conflicts),
//     so each cache element is converted once per block and the staging area needs no second buffer. A bf16
//     value goes through its exact f32, so a bf16 cache gives the f32 cache's result bit for bit when the two
//     hold the same values;
//   - S = Q K^T on mma (Q, pre-multiplied by scale * log2(e), stays in registers as A fragments), causal mask
//     from the rows' positions, online softmax in f32 registers with exp2, P (f16) reused in registers as the
//     A operand of O += P V (V fragments by ldmatrix.trans).
// A block needs ceil((max position + 1) / 64) key tiles; a warp skips the tiles past its own largest position
// and masks only the tiles that reach past its smallest. Tokens of a tile from several sequences (ragged
// batches) are served one sequence per pass, like the fp32 kernel. The grid runs the last (longest) query tiles
// first. Key rows are found through the KV block table once per row and tile: the offsets of tile j + 2 are
// loaded (table read, one division) while tile j computes and stored in a double buffer at the barrier that
// ends it, so fetching a tile reads its row offsets from shared memory.
//
// f16, not bf16, for the operands: q, k, v and p of Llama-class models are far inside f16's range (|x| <
// 65504; conversions saturate rather than overflow), and its 11-bit significand is 8x finer than bf16's, which
// is what bounds the logit error. tf32 would keep the f32 range but halves the mma rate and cannot feed the
// S accumulators back as the P operand without shuffles.

constexpr int kFaBQ = 64;  // query tokens per block
constexpr int kFaBK = 64;  // keys per tile
constexpr int kFaThreads = 128;

template <int HD, typename KV>
using FaLayout = KvTileLayout<HD, kFaBK, KV>;

// Key splits: a grid of (heads, query tiles) under a few rounds of the SMs' 2 blocks each leaves SMs idle for the
// whole walk over the keys (H200, one chunk of 1024 tokens at 32K positions: one tensor-parallel rank's 8 heads, 128
// blocks, ran at 123 TFLOP/s where 32 heads ran at 185; a chunk of 1185 tokens over 32 heads, 2.3 rounds, at 144:
// bench/RESULTS.md). Then each (head, query tile) is served by n_split blocks, each over its share of the pass's key
// tiles, which write the rows' unnormalized outputs and (max, sum) to scratch; prefill_merge_splits adds them.
constexpr int kMaxKeySplits = 8, kMinSplitTiles = 8;

// grid (nH, ceil(T / (kFaBQ MT)), n_split); qscale = scale * log2(e). MT: m16 tiles of query rows a warp (1 or 2):
// two give each K and V fragment read from shared memory to two mma and each warp two independent chains (the Sage
// kernel, attention-sage.cu, took 10% less time so at 32K on H200; this one 23%: Llama-2-7B's fresh 32K prompt, bf16
// cache, 46.4 -> 35.9 ms a layer, bench/RESULTS.md session 25); their Q fragments are read from shared memory at
// every tile, since holding them would spill. KV: the cache's element type, f32 or bf16, or the
// 1-byte codes with k_scales, v_scales [rows] (16 codes a chunk, dequantized as they are converted to f16).
// n_split > 1: part [n_split][T][nH][HD] outputs, then part_ml [n_split][T][nH] (max in log2 units, sum).
template <int HD, typename KV, int MT>
__global__ void __launch_bounds__(kFaThreads, 2)
    attention_prefill_mma(const float* __restrict__ q, const KV* __restrict__ k_cache,
                          const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                          const int32_t* __restrict__ positions, int T, int nH, float qscale, float* __restrict__ out,
                          DeviceStatus* status, const float* __restrict__ k_scales,
                          const float* __restrict__ v_scales, int n_split, float* __restrict__ part) {
  using L = FaLayout<HD, KV>;
  constexpr int LD = L::kLd;
  constexpr int KT = HD / 16;                            // k16 steps over the head dim (S = Q K^T)
  constexpr int NO = HD / 8;                             // n8 tiles of O
  constexpr int NS = kFaBK / 8;                          // n8 tiles of S
  constexpr int BQ = kFaBQ * MT;                         // query rows of a block
  extern __shared__ __align__(16) unsigned char fa_smem[];
  KV* stage = reinterpret_cast<KV*>(fa_smem);                       // [2][kFaBK][HD] of KV: K, V
  __half* kh = reinterpret_cast<__half*>(fa_smem + L::kStage);    // [kFaBK][LD]; MT = 1: the Q tile first
  __half* vh = kh + kFaBK * LD;                                     // [kFaBK][LD]
  __half* qh = MT == 1 ? kh : vh + kFaBK * LD;                      // MT = 2: [BQ][LD], the Q tile for good
  __shared__ int tok_seq[BQ], tok_pos[BQ], tok_done[BQ];
  __shared__ int cur_seq, cur_tok, kv_end;
  __shared__ int64_t tile_rows[2][kFaBK];  // cache offsets (elements) of the key rows of tiles j and j + 1
  // 1-byte caches: those rows' K and V scales, read with the row offsets a tile ahead. Read in the conversion, each
  // tile waited a global round trip between its two barriers: Llama-2-7B's TTFT at 32000 tokens with an fp8 cache
  // 3233 -> 2238 ms (bf16 cache 2371), int8 3239 -> 2556 (H200, bench/RESULTS.md session 25).
  __shared__ float2 tile_scales[2][kKvQuantized<KV> ? kFaBK : 1];

  const int h = blockIdx.x, t0 = (gridDim.y - 1 - blockIdx.y) * BQ, g = h / (nH / static_cast<int>(kv.n_kv));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gr = lane >> 2, tq = lane & 3;  // fragment row (and row + 8), thread of the quad

  load_tile_tokens(BQ, t0, T, kv, token_seq, positions, nH, h, HD, out, status, tok_seq, tok_pos, tok_done);
  // Q tile (scaled, f16) -> qh -> A fragments (MT = 1: held in registers).
  for (int c = tid; c < BQ * HD / 4; c += kFaThreads) {
    int row = c / (HD / 4), col = (c % (HD / 4)) * 4, t = t0 + row;
    q4_to_f16(t < T ? q + (size_t(t) * nH + h) * HD + col : nullptr, qscale, qh + row * LD + col);
  }
  __syncthreads();
  auto q_addr = [&](int m) { return a_frag_addr<LD>(qh + (warp * MT + m) * 16 * LD, lane); };
  uint32_t qf[1][KT][4];
  if constexpr (MT == 1) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qf[0][kk], q_addr(0) + kk * 16 * sizeof(__half));
  }
  // m-tile m's A fragment of k step kk: held (MT = 1), or read from qh at every tile (MT = 2)
  auto q_frag = [&](int m, int kk, uint32_t (&a)[4]) {
    if constexpr (MT == 1)
      held_frags(qf)(m, kk, a);
    else
      ldmatrix_x4(a, q_addr(m) + kk * 16 * sizeof(__half));
  };
  // ldmatrix lane addresses: K (B of Q K^T, non-transposed) and V (B of P V, transposed).
  const uint32_t k_addr = k_frag_addr<LD>(kh, lane);
  const uint32_t v_addr = v_frag_addr<LD>(vh, lane);

  for (;;) {
    __syncthreads();  // also: every warp has its Q fragments before kh is overwritten
    next_pass(BQ, t0, tok_seq, tok_pos, tok_done, &cur_seq, &cur_tok, &kv_end);
    __syncthreads();
    const int seq = cur_seq, end = kv_end;
    if (seq < 0) break;
    PassRows rows[MT];
    int wmin, wmax;
    warp_pass_rows(rows, wmin, wmax, warp, gr, seq, tok_seq, tok_pos, tok_done);

    // Thread tid < kFaBK: the cache offset of key row tid of the tile at kv0 (0 past end: not fetched).
    auto tile_row = [&](int kv0) -> int64_t {
      const int p = kv0 + tid;
      return p < end ? kv_read_row(kv, cur_tok, seq, g, p, status) * HD : 0;
    };
    auto fetch = [&](int kv0, const int64_t* rows) {
      fetch_kv_tile<HD, kFaBK, kFaThreads>(stage, k_cache, v_cache, rows, end - kv0, tid);
    };
    // Thread tid < kFaBK, 1-byte caches: row offset `row`'s (K, V) scales.
    auto row_scales = [&](int64_t row) -> float2 {
      if constexpr (kKvQuantized<KV>)
        return make_float2(k_scales[row / HD], v_scales[row / HD]);
      else
        return make_float2(0.0f, 0.0f);
    };
    auto store_tile_row = [&](int buf, int64_t row, float2 scales) {
      tile_rows[buf][tid] = row;
      if constexpr (kKvQuantized<KV>) tile_scales[buf][tid] = scales;
    };
    auto convert = [&](int kv0, int buf) {  // the chunks this thread fetched: no barrier between them
      convert_kv_tile<HD, kFaBK, kFaThreads>(stage, kh, vh, end - kv0, tile_scales[buf], tid);
    };

    float o_acc[MT][NO][4];
    float m0[MT], m1[MT], l0[MT], l1[MT];  // l: this thread's partial row sums
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int n = 0; n < NO; ++n) o_acc[m][n][0] = o_acc[m][n][1] = o_acc[m][n][2] = o_acc[m][n][3] = 0;
      m0[m] = m1[m] = -INFINITY;
      l0[m] = l1[m] = 0;
    }
    // This block's key tiles of the pass: all of them, or split blockIdx.z's share, at least kMinSplitTiles (a
    // short walk, as a fresh prompt's first query tiles have, is not worth a block's start: later splits get none).
    const int n_tiles = (end + kFaBK - 1) / kFaBK;
    const int per_split = max((n_tiles + n_split - 1) / n_split, n_split > 1 ? kMinSplitTiles : 1);
    const int j_begin = min(n_tiles, int(blockIdx.z) * per_split), j_end = min(n_tiles, j_begin + per_split);

    if (j_begin < j_end) {
      if (tid < kFaBK)
        for (int j = j_begin; j < j_begin + 2; ++j) {
          const int64_t row = tile_row(j * kFaBK);
          store_tile_row(j & 1, row, row_scales(row));
        }
      __syncthreads();
      fetch(j_begin * kFaBK, tile_rows[j_begin & 1]);
      convert(j_begin * kFaBK, j_begin & 1);
      __syncthreads();
    }
    for (int j = j_begin; j < j_end; ++j) {
      const int kv0 = j * kFaBK;
      if (j + 1 < j_end) fetch(kv0 + kFaBK, tile_rows[(j + 1) & 1]);
      // Tile j + 2's row offsets: the table is read now, stored after this tile (its buffer held tile j's rows).
      const int64_t row_after_next = tid < kFaBK && j + 2 < j_end ? tile_row(kv0 + 2 * kFaBK) : 0;
      const float2 scales_after_next = tid < kFaBK && j + 2 < j_end ? row_scales(row_after_next) : float2{};
      if (kv0 <= wmax) {  // warp-uniform: some row of this warp attends to a key of this tile
        float s[MT][NS][4];
        mma_qk<KT, NS, LD, MT>(s, q_frag, k_addr);
        uint32_t pf[MT][NS / 2][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (kv0 + kFaBK - 1 > wmin) {  // causal mask (also: rows of other sequences, keys past end)
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                if (kv0 + n * 8 + 2 * tq + (e & 1) > (e < 2 ? rows[m].pos0 : rows[m].pos1)) s[m][n][e] = -INFINITY;
          }
          softmax_step<NS, NO>(s[m], m0[m], m1[m], l0[m], l1[m], o_acc[m], pf[m]);
        }
        mma_pv<NS, NO, LD, MT>(o_acc, pf, v_addr);
      }
      if (j + 1 < j_end) {
        __syncthreads();  // every warp is done with kh, vh (and every thread has issued fetch(j + 1))
        convert(kv0 + kFaBK, (j + 1) & 1);
        if (tid < kFaBK) store_tile_row(j & 1, row_after_next, scales_after_next);
        __syncthreads();
      }
    }

    if (n_split == 1) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
        finish_pass<HD>(o_acc[m], l0[m], l1[m], 1.0f, rows[m], tq, BQ, t0, nH, h, seq, tok_seq, tok_done, out);
      continue;
    }
    // A split's partial rows: O unnormalized, (max, sum); a row with no key in this split has (-inf, 0) and O = 0.
    float* part_ml = part + size_t(n_split) * T * nH * HD;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      sum_quad_rows(l0[m], l1[m]);
      auto put = [&](int r, int e, float mx, float l) {
        const size_t row = (size_t(blockIdx.z) * T + t0 + r) * nH + h;
        float* o = part + row * HD + 2 * tq;
#pragma unroll
        for (int n = 0; n < NO; ++n)
          *reinterpret_cast<float2*>(o + n * 8) = make_float2(o_acc[m][n][e], o_acc[m][n][e + 1]);
        if (tq == 0) *reinterpret_cast<float2*>(part_ml + 2 * row) = make_float2(mx, l);
      };
      if (rows[m].pos0 >= 0) put(rows[m].r0, 0, m0[m], l0[m]);
      if (rows[m].pos1 >= 0) put(rows[m].r1, 2, m1[m], l1[m]);
    }
    end_pass(BQ, seq, tok_seq, tok_done);
  }
}

// out[t, h] = the splits' outputs weighed by 2^(max - the largest max), over their weighed sums; one thread a
// (token, head, dim). Tokens out of range were written (zeros) by the split kernel and are left as they are.
template <int HD>
__global__ void prefill_merge_splits(const float* __restrict__ part, KvBlockTable kv,
                                     const int32_t* __restrict__ token_seq, const int32_t* __restrict__ positions,
                                     int T, int nH, int n_split, float* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(T) * nH * HD) return;
  const int64_t row = i / HD;
  const int t = static_cast<int>(row / nH);
  if (!kv_token_in_range(kv, t, token_seq[t], positions[t], kKvRead, nullptr, false)) return;
  const float* part_ml = part + size_t(n_split) * T * nH * HD;
  float M = -INFINITY;
  for (int z = 0; z < n_split; ++z) M = fmaxf(M, part_ml[2 * (size_t(z) * T * nH + row)]);
  float sum_o = 0, sum_l = 0;
  for (int z = 0; z < n_split; ++z) {
    const size_t zr = size_t(z) * T * nH + row;
    const float w = exp2f(part_ml[2 * zr] - M);  // 0 for a split with no key (max -inf)
    sum_o += w * part[zr * HD + i % HD];
    sum_l += w * part_ml[2 * zr + 1];
  }
  out[i] = sum_o / sum_l;
}

template <int HD, typename KV>
void launch_prefill_mma(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                        int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms) {
  int T = static_cast<int>(q.dim(0));
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int n_split = scratch ? detail::prefill_key_splits(T, n_heads, kv.capacity(), HD, num_sms) : 1;
  auto launch = [&](auto kernel, int BQ, size_t smem) {
    allow_dynamic_smem(ctx, kernel, smem, "attention");
    dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>((T + BQ - 1) / BQ), n_split);
    kernel<<<grid, kFaThreads, smem, ctx.stream>>>(
        q.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), kv, token_seq.data<int32_t>(),
        positions.data<int32_t>(), T, int(n_heads), scale * 1.4426950408889634f, out.data<float>(), ctx.status,
        k_cache.kv_scales(), v_cache.kv_scales(), n_split, scratch);
  };
  // Two m-tiles a warp by two_m_tiles' rule, as the Sage kernel: never with key splits, which are for grids of a few
  // rounds; not for an f32 cache, whose staging area leaves no room for a second block beside the Q tile.
  constexpr size_t smem = FaLayout<HD, KV>::kBytes;
  if constexpr (sizeof(KV) <= 2) {
    if (n_split == 1 && two_m_tiles(T, n_heads, num_sms))
      return launch(attention_prefill_mma<HD, KV, 2>, 2 * kFaBQ,
                    smem + size_t{2 * kFaBQ} * FaLayout<HD, KV>::kLd * sizeof(__half));
  }
  launch(attention_prefill_mma<HD, KV, 1>, kFaBQ, smem);
  if (n_split > 1) {
    const int64_t n = int64_t(T) * n_heads * HD;
    prefill_merge_splits<HD><<<static_cast<unsigned>((n + 255) / 256), 256, 0, ctx.stream>>>(
        scratch, kv, token_seq.data<int32_t>(), positions.data<int32_t>(), T, int(n_heads), n_split, out.data<float>());
  }
}

// ---- prefill fallback for head dims other than 64 and 128: tiled flash attention on CUDA cores, fp32

constexpr int kBQ = 16;               // query tokens per tile
constexpr int kPrefillThreads = 128;  // 8 threads per query row
constexpr int kRowThreads = kPrefillThreads / kBQ;

// grid (ceil(T / kBQ), nH). MAXJ = head-dim elements per thread (hd <= 8 * MAXJ); BK = keys per tile; KV: the
// cache's element type (f32 or bf16, widened as the tile is loaded; or the 1-byte codes with k_scales, v_scales
// [rows], code * scale as the tile is loaded).
template <int MAXJ, int BK, typename KV>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill(const float* __restrict__ q, const KV* __restrict__ k_cache,
                      const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                      const int32_t* __restrict__ positions, int T, int nH, int hd, float scale,
                      float* __restrict__ out, DeviceStatus* status, const float* __restrict__ k_scales,
                      const float* __restrict__ v_scales) {
  extern __shared__ float smem[];
  const int ld = hd + 1;  // padded rows: no bank conflicts across the rows a warp reads
  float* qs = smem;                 // [kBQ][ld]
  float* ks = qs + kBQ * ld;        // [BK][ld]
  float* vs = ks + BK * ld;         // [BK][hd]
  float* ps = vs + BK * hd;         // [kBQ][BK]
  __shared__ int tok_seq[kBQ], tok_pos[kBQ], tok_done[kBQ];
  __shared__ int cur_seq, cur_tok, kv_end;
  __shared__ int64_t tile_rows[BK];  // cache offsets (elements) of the tile's key rows, via the block table
  __shared__ float tile_k_scale[BK], tile_v_scale[BK];  // the 1-byte caches: those rows' scales

  int t0 = blockIdx.x * kBQ, h = blockIdx.y, g = h / (nH / static_cast<int>(kv.n_kv));
  int tid = threadIdx.x, r = tid / kRowThreads, l8 = tid % kRowThreads;
  load_tile_tokens(kBQ, t0, T, kv, token_seq, positions, nH, h, hd, out, status, tok_seq, tok_pos, tok_done);
  for (int i = tid; i < kBQ * hd; i += blockDim.x) {
    int row = i / hd, d = i % hd, t = t0 + row;
    qs[row * ld + d] = t < T ? q[(size_t(t) * nH + h) * hd + d] : 0.0f;
  }

  for (;;) {
    __syncthreads();
    next_pass(kBQ, t0, tok_seq, tok_pos, tok_done, &cur_seq, &cur_tok, &kv_end);
    __syncthreads();
    if (cur_seq < 0) break;
    bool active = !tok_done[r] && tok_seq[r] == cur_seq;
    int my_pos = tok_pos[r];
    float m_i = -INFINITY, l_i = 0;
    float o[MAXJ];
#pragma unroll
    for (int j = 0; j < MAXJ; ++j) o[j] = 0;

    for (int kv0 = 0; kv0 < kv_end; kv0 += BK) {
      __syncthreads();
      if (tid < BK && kv0 + tid < kv_end) {
        const int64_t row = kv_read_row(kv, cur_tok, cur_seq, g, kv0 + tid, status);
        tile_rows[tid] = row * hd;
        if constexpr (kKvQuantized<KV>) {
          tile_k_scale[tid] = k_scales[row];
          tile_v_scale[tid] = v_scales[row];
        }
      }
      __syncthreads();
      for (int i = tid; i < BK * hd; i += blockDim.x) {
        int row = i / hd, d = i % hd;
        bool in = kv0 + row < kv_end;
        const float k_scale = kKvQuantized<KV> ? tile_k_scale[row] : 1.0f, v_scale = kKvQuantized<KV> ? tile_v_scale[row] : 1.0f;
        ks[row * ld + d] = in ? kv_value(k_cache[tile_rows[row] + d], k_scale) : 0.0f;
        vs[row * hd + d] = in ? kv_value(v_cache[tile_rows[row] + d], v_scale) : 0.0f;
      }
      __syncthreads();
      float s[BK / kRowThreads];
      float m_tile = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < BK / kRowThreads; ++jj) {
        int kc = l8 + kRowThreads * jj, p = kv0 + kc;
        float dot = 0;
        for (int d = 0; d < hd; ++d) dot += qs[r * ld + d] * ks[kc * ld + d];
        s[jj] = active && p <= my_pos && p < kv_end ? dot * scale : -INFINITY;
        m_tile = fmaxf(m_tile, s[jj]);
      }
#pragma unroll
      for (int o8 = kRowThreads / 2; o8 > 0; o8 >>= 1) m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, o8));
      float m_new = fmaxf(m_i, m_tile);
      float alpha = m_i == -INFINITY ? 0.0f : expf(m_i - m_new);
      float l_tile = 0;
#pragma unroll
      for (int jj = 0; jj < BK / kRowThreads; ++jj) {
        float p = s[jj] == -INFINITY ? 0.0f : expf(s[jj] - m_new);
        ps[r * BK + l8 + kRowThreads * jj] = p;
        l_tile += p;
      }
#pragma unroll
      for (int o8 = kRowThreads / 2; o8 > 0; o8 >>= 1) l_tile += __shfl_xor_sync(0xffffffffu, l_tile, o8);
      l_i = l_i * alpha + l_tile;
      m_i = m_new;
      __syncwarp();
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        int d = l8 + kRowThreads * j;
        if (d < hd) {
          float acc = o[j] * alpha;
          for (int kc = 0; kc < BK; ++kc) acc += ps[r * BK + kc] * vs[kc * hd + d];
          o[j] = acc;
        }
      }
    }
    if (active) {
      float inv_l = 1.0f / l_i;
      size_t base = (size_t(t0 + r) * nH + h) * hd;
#pragma unroll
      for (int j = 0; j < MAXJ; ++j) {
        int d = l8 + kRowThreads * j;
        if (d < hd) out[base + d] = o[j] * inv_l;
      }
    }
    __syncthreads();
    if (tid < kBQ && !tok_done[tid] && tok_seq[tid] == cur_seq) tok_done[tid] = 1;
  }
}

template <int MAXJ, int BK>
void launch_prefill(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                    const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads,
                    float scale, const Tensor& out) {
  int hd = static_cast<int>(k_cache.dim(3)), T = static_cast<int>(q.dim(0));
  size_t smem = static_cast<size_t>(kBQ * (hd + 1) + BK * (hd + 1) + BK * hd + kBQ * BK) * sizeof(float);
  WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV, {
    auto kernel = attention_prefill<MAXJ, BK, KV>;
    allow_dynamic_smem(ctx, kernel, smem, "attention");
    dim3 grid((T + kBQ - 1) / kBQ, static_cast<unsigned>(n_heads));
    kernel<<<grid, kPrefillThreads, smem, ctx.stream>>>(
        q.data<float>(), k_cache.data<KV>(), v_cache.data<KV>(), KvBlockTable::of(k_cache, kv_block_table),
        token_seq.data<int32_t>(), positions.data<int32_t>(), T, int(n_heads), hd, scale, out.data<float>(),
        ctx.status, k_cache.kv_scales(), v_cache.kv_scales());
  });
}

}  // namespace

namespace detail {
void launch_attention_prefill_fp32(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                   const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                                   int64_t n_heads, float scale, const Tensor& out) {
  int64_t hd = k_cache.dim(3);
  if (hd <= 64)
    launch_prefill<8, 32>(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, out);
  else if (hd <= 128)
    launch_prefill<16, 32>(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, out);
  else if (hd <= 256)
    launch_prefill<32, 16>(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale, out);
  else
    WEFT_FAIL("attention", "headDim ", hd, " is over 256, the most the cuda prefill kernel takes (", q, ", ", k_cache,
              ")");
  check_launch(ctx, "attention",
               {Named{"q", q}, Named{"kCache", k_cache}, Named{"tokenSeq", token_seq},
                Named{"kvBlockTable", kv_block_table}, Named{"positions", positions}});
}

int prefill_key_splits(int64_t T, int64_t n_heads, int64_t C, int64_t hd, int num_sms) {
  if (hd != 64 && hd != 128) return 1;  // the fp32 fallback does not split
  // Rounds of resident blocks times each block's share of the key tiles, smallest; a split costs its partials'
  // write and the merge (taken as an eighth of a round), and keeps at least 8 key tiles a block. Grids of more than
  // 4 rounds keep one block a (head, query tile): a fresh causal prompt's blocks walk from 1 to T / 64 tiles, and
  // splitting them (5 splits at 4096 tokens, 2 at 32768) made Llama-2-7B's prompt attention 1.14-1.77x slower (H200).
  const int64_t blocks = n_heads * ((T + kFaBQ - 1) / kFaBQ), slots = 2 * int64_t(num_sms), tiles = (C + kFaBK - 1) / kFaBK;
  const int64_t rounds = (blocks + slots - 1) / slots;
  if (rounds > 4) return 1;
  int best = 1;
  double best_cost = double(rounds);
  for (int n = 2; n <= kMaxKeySplits && tiles / n >= kMinSplitTiles; ++n) {
    const double cost = double((blocks * n + slots - 1) / slots) / n + 0.125;
    if (cost < best_cost) best = n, best_cost = cost;
  }
  return best;
}

int64_t attention_prefill_scratch_floats(int64_t T, int64_t n_heads, int64_t C, int64_t hd, int num_sms) {
  const int n = prefill_key_splits(T, n_heads, C, hd, num_sms);
  return n == 1 ? 0 : int64_t(n) * T * n_heads * (hd + 2);
}

void launch_attention_prefill(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                              int64_t n_heads, float scale, const Tensor& out, float* scratch, int num_sms) {
  int64_t T = q.dim(0), hd = k_cache.dim(3);
  WEFT_CHECK((T + kFaBQ - 1) / kFaBQ <= 65535, "attention", "too many query tokens (", q, ")");
  auto mma = [&](auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    WEFT_DISPATCH_KV_ALL(k_cache.dtype, KV,
                     launch_prefill_mma<HD, KV>(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions,
                                                n_heads, scale, out, scratch, num_sms));
  };
  if (hd == 128)
    mma(std::integral_constant<int, 128>{});
  else if (hd == 64)
    mma(std::integral_constant<int, 64>{});
  else
    launch_attention_prefill_fp32(ctx, q, k_cache, v_cache, token_seq, kv_block_table, positions, n_heads, scale,
                                  out);
  check_launch(ctx, "attention",
               {Named{"q", q}, Named{"kCache", k_cache}, Named{"tokenSeq", token_seq},
                Named{"kvBlockTable", kv_block_table}, Named{"positions", positions}});
}
}  // namespace detail

}  // namespace weft::cuda
