// Decode attention on tensor cores: the partition plan of attention-decode.cuh, the two products on mma.sync
// m16n8k16. Why tensor cores: on CUDA cores a GQA group of g heads costs g FMAs per cache element for the scores and
// g more for the values, plus a conversion per element; at H200's bandwidth that is more than the SMs issue
// (bench/RESULTS.md).
//
// Why each warp streams its own tiles: with the block's four warps sharing every tile, each tile cost a fixed chain
// of waits (copy, scores, barrier, softmax, barrier, values, barrier) that no other work of the block hid, so a tile
// of half the bytes (fp8, int8) took the same time as bf16's, and batch 1 ran at 16-75% of the copy bandwidth
// (RESULTS.md, session 6). Here warp w of a block takes the tiles w, w + 4, ... of the block's partition, each tile
// through its own cp.async ring in shared memory (bf16: 3 stages of 4 KiB of K and 4 KiB of V, 16 rows at head dim
// 128), and runs the scores, an online softmax in registers (the scores' accumulator layout is the values' A
// operand layout: no shared-memory round trip) and the values with no barrier but its own __syncwarp. The four
// warps' maxes, sums and outputs are combined once, at the end, in shared memory. The 1-byte caches take smaller
// rings (2 stages of 2 KiB tiles: 16 rows at head dim 128) so that 4 blocks fit an SM, not 2: their tiles cost twice
// bf16's instructions a byte, and each warp's dependent chain set the time (attention-decode.cuh, kCodePlanLimits).
//
// The merge: a block writes its partition's partial (as the CUDA-core kernel does), then takes a ticket; the last
// block of a (token, kv head, head chunk) to finish merges all of its partitions in partition order (so the bits
// do not depend on which block is last) and resets the ticket. That saves the merge kernel's launch and the grid
// boundary between the two. A token whose position has one partition is written directly.
//
// Operands: a bf16 cache is used as stored (bf16 mma), fp8 and int8 codes are converted to f16 in registers (exact),
// their row scales folded into the scores and the weights once per row. bf16: the block's heads (up to 8) are the
// rows 0-7 of the A operand of both products (scores Q K^T, values P V). Codes: the cache is the M side of both,
// keys in S^T = K Q^T and dims in O^T = V^T P^T, with the heads (four to an n8 tile) as columns: half the mma of
// heads on M (16 keys or 16 dims a step instead of 8), the query's fragments in registers instead of shared memory,
// and half the output accumulators (session 18: 2-8% faster than heads on M; four shuffles a 16-key step move the
// scores' layout to the weights'). The codes' fragments are loaded by ldmatrix as if they were 16-bit pairs: a key
// fragment then holds dims 4t .. 4t + 3 of a row (the query's fragment is built in the same order), a value fragment
// (.trans) two dims of two rows, the even and odd dims making two m16 tiles (the output's dims are put back when
// written).
// Precision: the query and the weights are split into two 16-bit parts, x = hi + lo (each rounded to nearest), carried
// in the operand's rows 8-15 (bf16: the A operand's lo rows) or odd columns (codes: B's), so one mma multiplies both
// by the exact cache values with f32 accumulation: the operands carry about 16 (bf16) or 22 (f16) significant bits
// instead of 8 or 11, and the outputs stay within the f32 kernel's bound against the CPU.
#include "cuda/attention-decode.cuh"

namespace weft::cuda::decode {

// One ticket per grid row (token, kv head, head chunk): zero when the module loads, and zero again after every launch
// (the merging block resets its own). Launches on one stream are ordered (each kernel's pdl_wait waits for the one
// before it), so one array serves them all.
__device__ unsigned int g_merge_tickets[kMaxMergeTickets];

namespace {

// Query heads a block serves at most (the plan's head chunk): the A operand's rows 0-7 (bf16), B's columns (codes).
constexpr int kHeadRows = 8;
// Codes: the weights p * (value row's scale) are taken 2^8 times larger into their f16 parts, and the outputs 2^8
// smaller (exact): a row scale of about 1e-3 (values near 1) put most weights below f16's normal range (6.1e-5),
// where the hi/lo split keeps only 2^-25 of absolute precision (about 2e-5 of max|out| at 16K positions in fp8).
constexpr float kCodeWeightScale = 256.0f;

// c += a b, m16n8k16, f32 accumulators; BF16: bf16 operands, else f16. a = (a0, a1, a2, a3) as the m16n8k16 A fragment.
template <bool BF16>
__device__ __forceinline__ void mma16(float (&c)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  if constexpr (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// The A fragment of the pairs (x0, x1) at k = 2t, 2t + 1 and (x2, x3) at k = 2t + 8, 2t + 9: hi parts in row g, lo
// parts in row g + 8.
template <bool BF16>
__device__ __forceinline__ uint4 split_fragment(float x0, float x1, float x2, float x3) {
  uint4 a;
  split_pair<BF16>(x0, x1, a.x, a.y);
  split_pair<BF16>(x2, x3, a.z, a.w);
  return a;
}

// Bytes I and J of a word of four codes -> the f16 pair of their values (byte I in the low half), exact: e4m3 by the
// hardware conversion (cvt.rn.f16x2.e4m3x2); int8 with the sign bit flipped (b + 128) under the f16 exponent of
// 1024 is 1024 + b + 128, and one hsub2 of 1152 leaves b.
template <int I, int J>
__device__ __forceinline__ uint32_t codes_to_f16x2(const __nv_fp8_e4m3*, uint32_t w) {
  const uint32_t two = (I == 0 && J == 1) ? w : (I == 2 && J == 3) ? w >> 16 : __byte_perm(w, 0, I | (J << 4));
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return uint32_t(h.x) | (uint32_t(h.y) << 16);
}
template <int I, int J>
__device__ __forceinline__ uint32_t codes_to_f16x2(const int8_t*, uint32_t w) {
  const uint32_t biased = __byte_perm(w ^ 0x80808080u, 0x64646464u, I | (4 << 4) | (J << 8) | (4 << 12));
  const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&biased), __float2half2_rn(1152.0f));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A warp's tiles for a cache of KV and head dim HD: bf16, 4 KiB of K (and of V) a tile, 16 to 64 rows, in 3 stages
// (2 where a tile is larger: head dim 256); codes, tiles of at least 16 rows and 2 KiB, in 2 stages, each stage with
// its rows' K and V scales beside them. Rows are stored unpadded, their 16-byte chunks swizzled (chunk c of row r at
// c ^ f(r)) so that the 8 rows an ldmatrix reads lie in distinct banks.
template <typename KV, int HD>
struct WarpTiles {
  static constexpr bool kCodes = kKvQuantized<KV>;
  static constexpr int kRowBytes = HD * int(sizeof(KV));
  static constexpr int kChunks = kRowBytes / 16;  // 16-byte chunks a row: 4 to 32
  // Codes: tiles of 2 KiB (16 rows at head dim 128) in 2 stages, so that 4 blocks fit an SM (kCodePlanLimits).
  static constexpr int kRows = kCodes ? std::max(16, 2048 / kRowBytes) : std::min(64, std::max(16, 4096 / kRowBytes));
  static constexpr int kTileBytes = kRows * kRowBytes;  // the K (or V) rows of a tile
  static constexpr int kStages = kCodes || kTileBytes > 4096 ? 2 : 3;
  static constexpr int kScaleBytes = kCodes ? 2 * kRows * int(sizeof(float)) : 0;  // a stage's K, then V row scales
  static constexpr int kSlotBytes = 2 * kTileBytes + kScaleBytes;                   // a stage
  static constexpr size_t kWarpBytes = size_t(kStages) * kSlotBytes;
  static constexpr size_t kStageBytes = kWarps * kWarpBytes;
  static constexpr size_t kQBytes = kCodes ? 0 : size_t(HD / 16) * 32 * sizeof(uint4);  // bf16: the query's A fragments
  static_assert(kChunks >= 4 && (kRows * kChunks) % 32 == 0 && kRows % 16 == 0, "tile shape");
  // Each warp's results ([kHeadRows][HD] outputs, then the maxes and sums) fit in its own stages.
  static_assert(size_t(kHeadRows) * (HD + 2) * sizeof(float) <= kWarpBytes, "warp results");
  static size_t bytes(int P) { return kStageBytes + size_t(P) * sizeof(int32_t) + kQBytes; }
  // The merging block's weights [kHeadRows][n_part], sums [kWarps][kHeadRows][HD] and 1 / sums [kHeadRows], over
  // the stages.
  static bool merge_fits(int n_part) {
    return (size_t(kHeadRows) * n_part + size_t(kWarps) * kHeadRows * HD + kHeadRows) * sizeof(float) <= kStageBytes;
  }
  // Byte offset of chunk c of row r in a tile.
  static __device__ __forceinline__ uint32_t at(int r, int c) {
    const int f = kChunks >= 8 ? (r & 7) : ((r >> 1) & 3);
    return uint32_t(r * kRowBytes + 16 * (c ^ f));
  }
};

// grid (n_part, T * n_kv * n_hc), kThreads threads. Partials as attention_decode_partial (attention-decode.cu) writes
// them; out (nullptr: partials only, the merge kernel follows) [T * nH, HD]: the merged output.
template <typename KV, int HD, int NT>
__global__ void __launch_bounds__(kThreads,
                                  HD > 128 ? 1 : kKvQuantized<KV> ? kCodePlanLimits.blocks_per_sm : kBlocksPerSm)
    attention_decode_partial_mma(const float* __restrict__ q, const KV* __restrict__ k_cache,
                                 const KV* __restrict__ v_cache, KvBlockTable kv, const int32_t* __restrict__ token_seq,
                                 const int32_t* __restrict__ positions, int nH, int P, int n_part, int n_hc,
                                 int head_chunk, float scale, float* __restrict__ part_out,
                                 float* __restrict__ part_ml, DeviceStatus* status, const float* __restrict__ k_scales,
                                 const float* __restrict__ v_scales, float* __restrict__ out,
                                 bool trigger_after_tiles) {
  using L = WarpTiles<KV, HD>;
  constexpr bool kCodes = L::kCodes, kBf16 = !kCodes;
  constexpr int WR = L::kRows, S = L::kStages, CH = L::kChunks;
  constexpr int KS = HD / 16, NJ = WR / 8, NO = HD / 8;  // k16 steps of the head dim, n8 tiles of keys and of dims
  // codes: 16-key blocks of a tile (the m16 of both products), and the output's m16 tiles of dims (CH of them) by NT
  // n8 tiles of heads
  constexpr int MB = WR / 16, NOC = kCodes ? CH * NT : 1;
  if (!trigger_after_tiles) pdl_trigger();
  // Before the kernel ahead of this one has finished: the block's unit and its rows' lookups, which read only what no
  // kernel of a step writes (token_seq, positions and the block table are the step's inputs, written before its graph
  // runs). The query and the newest position's K and V rows and scales come from the kernel ahead (qkv_rope): they
  // are read after pdl_wait, and so is everything this kernel writes.
  DecodeUnit u;
  const bool has_work = decode_unit(kv, token_seq, positions, nH, n_part, n_hc, head_chunk, status, u);

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* stages = smem;  // [kWarps][S][K, V rows][codes: K, V scales]
  // [P]: the cache row of each tile's first position where tiles lie in paged blocks, else of each position
  int32_t* rows = reinterpret_cast<int32_t*>(smem + L::kStageBytes);
  uint4* qf = reinterpret_cast<uint4*>(rows + P);  // bf16: [KS][32 lanes]
  int* last_flag = rows;  // the merge's ticket flag, once the tiles are done with the rows
  // A tile inside one paged block (blocks of a multiple of WR positions: partitions and tiles start at multiples of
  // WR) is WR consecutive cache rows: one row lookup a tile, where a lookup and a 64-bit address for each 16-byte
  // copy were a third of the fp8 kernel's instructions (ncu, bench/RESULTS.md session 25), and the block's start
  // looked up every position (and, for codes, its two scales: 6.4 of a 73 us launch at 32K, session 26).
  const bool tiles_in_blocks = kv.block_size % WR == 0;
  if (has_work)  // the same for every thread of the block (the barrier inside)
    load_partition_rows<false>(kv, u, status, nullptr, nullptr, rows, nullptr, nullptr, tiles_in_blocks ? WR : 1);
  pdl_wait();
  if (!has_work) {
    // Partition 0 of every token in range has work: here its token is out of range (reported); its output is zeros.
    if (out != nullptr && blockIdx.x == 0) {
      const int n_kv = static_cast<int>(kv.n_kv), group = nH / n_kv, t = blockIdx.y / (n_kv * n_hc);
      const int g = blockIdx.y / n_hc % n_kv, hc = blockIdx.y % n_hc;
      const int h0 = g * group + hc * head_chunk, nh = min(head_chunk, group - hc * head_chunk);
      for (int x = threadIdx.x; x < nh * HD; x += kThreads) out[(size_t(t) * nH + h0) * HD + x] = 0;
    }
    return;
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  unsigned char* mine = stages + warp * L::kWarpBytes;
  const int n_tiles = static_cast<int>(ceil_div(u.np, WR));
  const int my_tiles = warp < n_tiles ? (n_tiles - 1 - warp) / kWarps + 1 : 0;
  auto k_tile = [&](int i) { return mine + (i % S) * L::kSlotBytes; };
  // This warp's tile i (the block's tile warp + 4 i) into its stage, codes with their rows' scales; rows past the
  // partition are zeros.
  auto issue = [&](int i) {
    unsigned char* kt = k_tile(i);
    unsigned char* vt = kt + L::kTileBytes;
    const int tile = warp + i * kWarps, r0 = tile * WR;
    auto row_of = [&](int r) { return tiles_in_blocks ? rows[tile] + r : rows[r0 + r]; };  // r0 + r < np
    if constexpr (kCodes) {
      float* scales = reinterpret_cast<float*>(vt + L::kTileBytes);  // [K: WR][V: WR]
      for (int x = lane; x < 2 * WR; x += 32) {
        const int r = x % WR;
        const bool in = r0 + r < u.np;
        cp_async4(smem_u32(scales + x), (x < WR ? k_scales : v_scales) + (in ? row_of(r) : 0), in);
      }
    }
    if (tiles_in_blocks && r0 + WR <= u.np) {
      const size_t first = size_t(rows[tile]) * L::kRowBytes;
      const unsigned char* k_src = reinterpret_cast<const unsigned char*>(k_cache) + first;
      const unsigned char* v_src = reinterpret_cast<const unsigned char*>(v_cache) + first;
#pragma unroll
      for (int k = 0; k < WR * CH / 32; ++k) {
        const int x = lane + 32 * k, r = x / CH, c = x % CH;
        cp_async16(smem_u32(kt + L::at(r, c)), k_src + 16 * x, 16);
        cp_async16(smem_u32(vt + L::at(r, c)), v_src + 16 * x, 16);
      }
      return;
    }
#pragma unroll
    for (int k = 0; k < WR * CH / 32; ++k) {
      const int x = lane + 32 * k, r = x / CH, c = x % CH;
      const bool in = r0 + r < u.np;
      const size_t off = (in ? size_t(row_of(r)) * L::kRowBytes : 0) + 16 * c;
      cp_async16(smem_u32(kt + L::at(r, c)), reinterpret_cast<const unsigned char*>(k_cache) + off, in ? 16 : 0);
      cp_async16(smem_u32(vt + L::at(r, c)), reinterpret_cast<const unsigned char*>(v_cache) + off, in ? 16 : 0);
    }
  };
  // The first tiles' copies go out before the query is read: the two round trips overlap.
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < my_tiles) issue(s);
    cp_async_commit();
  }

  // The query's A fragments, hi and lo parts, head g of the chunk (heads past nh are zero). For codes, lane t's key
  // fragment holds dims 4t .. 4t + 3 of its k16 step: the query's pairs at k = 2t and 2t + 8 are taken the same way.
  if constexpr (kBf16)
    for (int x = threadIdx.x; x < KS * 32; x += kThreads) {
      const int ks = x / 32, head = (x % 32) >> 2, quad = x & 3;
      float4 v = make_float4(0, 0, 0, 0);
      if (head < u.nh) {
        const float* qrow = q + (size_t(u.t) * nH + u.h_first + head) * HD + ks * 16;
        const float2 a = *reinterpret_cast<const float2*>(qrow + 2 * quad);
        const float2 b = *reinterpret_cast<const float2*>(qrow + 8 + 2 * quad);
        v = make_float4(a.x, a.y, b.x, b.y);
      }
      qf[x] = split_fragment<kBf16>(v.x, v.y, v.z, v.w);
    }
  if constexpr (kBf16) __syncthreads();  // qf is read by every warp
  // Codes: the query as the B operand of the scores (keys on M), in registers: column g of n8 tile nt is head
  // 4 nt + g / 2, its hi part (g even) or lo part; chunk c's k16 step holds dims 16 c + 4t .. + 3 in the key
  // fragment's order (k 2t, 2t + 1: dims 4t, 4t + 1; k 2t + 8, 2t + 9: dims 4t + 2, 4t + 3).
  uint32_t q_frag[kCodes ? CH : 1][NT][2];
  if constexpr (kCodes) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int h = 4 * nt + (g >> 1);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float4 v = make_float4(0, 0, 0, 0);
        const float* qrow = q + (size_t(u.t) * nH + u.h_first + h) * HD;
        if (h < u.nh) v = *reinterpret_cast<const float4*>(qrow + 16 * c + 4 * tq);
        uint32_t hi, lo;
        split_pair<false>(v.x, v.y, hi, lo);
        q_frag[c][nt][0] = (g & 1) ? lo : hi;
        split_pair<false>(v.z, v.w, hi, lo);
        q_frag[c][nt][1] = (g & 1) ? lo : hi;
      }
    }
  }

  // bf16: o[n], rows g: the hi parts' sums of head g, rows g + 8: the lo parts'. Codes: o[mt * NT + nt], the output
  // transposed (dims on M): columns 2t, 2t + 1 the hi and lo parts' sums of head 4 nt + t at the dims of rows g, g + 8.
  float o[kBf16 ? NO : NOC][4];
#pragma unroll
  for (int n = 0; n < (kBf16 ? NO : NOC); ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0;
  // bf16: head g's running max (the same in the quad) and this lane's part of its sum; codes: head 4 nt + t's (the
  // same in the lanes of that t)
  float m_run[NT], l_run[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) m_run[nt] = -INFINITY, l_run[nt] = 0;

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait(S - 2 > 0);
    __syncwarp();  // tile i landed for every lane; the stage tile i - 1 used is free again
    if (i + S - 1 < my_tiles) issue(i + S - 1);
    cp_async_commit();
    const unsigned char* kt = k_tile(i);
    const unsigned char* vt = kt + L::kTileBytes;
    const float* tile_scales = reinterpret_cast<const float*>(vt + L::kTileBytes);  // codes: K [WR], then V [WR]
    const int r0 = (warp + i * kWarps) * WR, nr = min(WR, u.np - r0);

    if constexpr (kBf16) {
      // Scores of the tile's keys 8 j + 2t, 8 j + 2t + 1 for head g: s[j][0, 1] the hi parts, s[j][2, 3] the lo parts.
      float s[NJ][4];
#pragma unroll
      for (int j = 0; j < NJ; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0;
#pragma unroll
      for (int ks = 0; ks < KS; ks += 2) {
        const uint4 qa = qf[ks * 32 + lane], qb = qf[(ks + 1) * 32 + lane];
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          uint32_t b[4];  // b[0], b[1]: step ks; b[2], b[3]: step ks + 1
          ldmatrix_x4(b, smem_u32(kt + L::at(8 * j + (lane & 7), 2 * ks + (lane >> 3))));
          mma16<true>(s[j], qa, b[0], b[1]);
          mma16<true>(s[j], qb, b[2], b[3]);
        }
      }

      // Online softmax of head g over the tile (the quad of lanes 4g .. 4g + 3 holds its keys): p = exp(s - max).
      float p[NJ][2], tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 8 * j + 2 * tq + e;
          p[j][e] = r < nr ? (s[j][e] + s[j][2 + e]) * scale : -INFINITY;
          tile_max = fmaxf(tile_max, p[j][e]);
        }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float m_new = fmaxf(m_run[0], tile_max), alpha = expf(m_run[0] - m_new);
      float sum = 0;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          p[j][e] = expf(p[j][e] - m_new);
          sum += p[j][e];
        }
      l_run[0] = l_run[0] * alpha + sum;
      m_run[0] = m_new;
#pragma unroll
      for (int n = 0; n < NO; ++n) o[n][0] *= alpha, o[n][1] *= alpha, o[n][2] *= alpha, o[n][3] *= alpha;

      // Values: k16 steps of the tile's keys; the weights of keys 16 kk + 2t, + 1 (n8 tile 2 kk) and 16 kk + 8 + 2t,
      // + 1 (tile 2 kk + 1) are the A fragment as they stand.
#pragma unroll
      for (int kk = 0; kk < WR / 16; ++kk) {
        const uint4 a = split_fragment<true>(p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]);
        const int vr = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8;  // this lane's ldmatrix row
#pragma unroll
        for (int n = 0; n < NO; n += 2) {  // dims 8 n .. 8 n + 15
          uint32_t b[4];
          ldmatrix_x4_trans(b, smem_u32(vt + L::at(vr, n + (lane >> 4))));
          mma16<true>(o[n], a, b[0], b[1]);
          mma16<true>(o[n + 1], a, b[2], b[3]);
        }
      }
    } else {
      // Codes, keys on M in both products. Scores S^T = K q^T: lane (g, t) gets s[kb][nt][0, 1] = the hi and lo
      // parts' sums of key 16 kb + g for head 4 nt + t, s[kb][nt][2, 3] those of key 16 kb + g + 8. Half the mma of
      // the query on M (16 keys a k16 step instead of 8), and no shared-memory loads of the query.
      float s[MB][NT][4];
#pragma unroll
      for (int kb = 0; kb < MB; ++kb)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) s[kb][nt][0] = s[kb][nt][1] = s[kb][nt][2] = s[kb][nt][3] = 0;
#pragma unroll
      for (int kb = 0; kb < MB; ++kb)
#pragma unroll
        for (int c = 0; c < CH; c += 2) {
          // r[0], r[1]: keys 16 kb + g, + 8 at chunk c (bytes 4t .. 4t + 3); r[2], r[3]: the same at chunk c + 1
          uint32_t r[4];
          ldmatrix_x4(r, smem_u32(kt + L::at(16 * kb + (lane & 15), c + (lane >> 4))));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 a = {codes_to_f16x2<0, 1>(k_cache, r[2 * h]), codes_to_f16x2<0, 1>(k_cache, r[2 * h + 1]),
                             codes_to_f16x2<2, 3>(k_cache, r[2 * h]), codes_to_f16x2<2, 3>(k_cache, r[2 * h + 1])};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma16<false>(s[kb][nt], a, q_frag[c + h][nt][0], q_frag[c + h][nt][1]);
          }
        }

      // Online softmax of head 4 nt + t over the tile: its keys are spread over the 8 lanes of that t.
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float p[MB][2], tile_max = -INFINITY;
#pragma unroll
        for (int kb = 0; kb < MB; ++kb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 16 * kb + g + 8 * e;
            p[kb][e] = r < nr ? (s[kb][nt][2 * e] + s[kb][nt][2 * e + 1]) * scale * tile_scales[r] : -INFINITY;
            tile_max = fmaxf(tile_max, p[kb][e]);
          }
        tile_max = max_over_rows(tile_max);
        const float m_new = fmaxf(m_run[nt], tile_max), alpha = expf(m_run[nt] - m_new);
        float sum = 0;
#pragma unroll
        for (int kb = 0; kb < MB; ++kb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int r = 16 * kb + g + 8 * e;
            p[kb][e] = expf(p[kb][e] - m_new);
            sum += p[kb][e];
            p[kb][e] *= r < nr ? tile_scales[WR + r] * kCodeWeightScale : 0.0f;  // the value row's scale, after sum
          }
        l_run[nt] = l_run[nt] * alpha + sum;
        m_run[nt] = m_new;
#pragma unroll
        for (int mt = 0; mt < CH; ++mt)
#pragma unroll
          for (int i = 0; i < 4; ++i) o[mt * NT + nt][i] *= alpha;

        // Values, O^T = V^T P^T: the B operand is P^T, columns the hi and lo parts of heads 4 nt .. 4 nt + 3
        // (weights_as_b). The A operand is V^T, dims on M: ldmatrix.trans gives keys 2t, 2t + 1 at the byte pair of
        // dims 16 c + 2g, + 1; the even dims (bytes 0, 2) and odd dims (1, 3) make two m16 tiles.
#pragma unroll
        for (int kb = 0; kb < MB; ++kb) {
          uint32_t b0, b1;
          weights_as_b<false>(p[kb][0], p[kb][1], b0, b1);
          // this lane's ldmatrix row: matrices (keys 0-7, chunk c), (0-7, c + 1), (8-15, c), (8-15, c + 1)
          const int vr = 16 * kb + (lane & 7) + (lane >> 4) * 8;
#pragma unroll
          for (int c = 0; c < CH; c += 2) {
            uint32_t r[4];
            ldmatrix_x4_trans(r, smem_u32(vt + L::at(vr, c + ((lane >> 3) & 1))));
            const uint4 even = {codes_to_f16x2<0, 2>(v_cache, r[0]), codes_to_f16x2<0, 2>(v_cache, r[1]),
                                codes_to_f16x2<0, 2>(v_cache, r[2]), codes_to_f16x2<0, 2>(v_cache, r[3])};
            const uint4 odd = {codes_to_f16x2<1, 3>(v_cache, r[0]), codes_to_f16x2<1, 3>(v_cache, r[1]),
                               codes_to_f16x2<1, 3>(v_cache, r[2]), codes_to_f16x2<1, 3>(v_cache, r[3])};
            mma16<false>(o[c * NT + nt], even, b0, b1);
            mma16<false>(o[(c + 1) * NT + nt], odd, b0, b1);
          }
        }
      }
    }
  }
  cp_async_wait_all();
  __syncwarp();  // every lane's copies landed: the warp's stages hold its results now

  // This warp's outputs (hi + lo), maxes and sums, into its own stages.
  float* res = reinterpret_cast<float*>(mine);  // [kHeadRows][HD], then max [kHeadRows], sum [kHeadRows]
  if constexpr (kBf16) {  // head g: dims 8 n + 2t, + 1
    l_run[0] += __shfl_xor_sync(0xffffffffu, l_run[0], 1);
    l_run[0] += __shfl_xor_sync(0xffffffffu, l_run[0], 2);
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      res[g * HD + 8 * n + 2 * tq] = o[n][0] + o[n][2];
      res[g * HD + 8 * n + 2 * tq + 1] = o[n][1] + o[n][3];
    }
    if (tq == 0) res[kHeadRows * HD + g] = m_run[0], res[kHeadRows * HD + kHeadRows + g] = l_run[0];
  } else {  // head 4 nt + t: m16 tile mt = c + odd (c even) holds dims 16 c + 2g + odd (row g), 16 (c + 1) + 2g + odd
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int h = 4 * nt + tq;
      const float l = sum_over_rows(l_run[nt]);
#pragma unroll
      for (int mt = 0; mt < CH; ++mt) {
        const int d = 16 * (mt & ~1) + 2 * g + (mt & 1);
        res[h * HD + d] = (o[mt * NT + nt][0] + o[mt * NT + nt][1]) * (1.0f / kCodeWeightScale);
        res[h * HD + d + 16] = (o[mt * NT + nt][2] + o[mt * NT + nt][3]) * (1.0f / kCodeWeightScale);
      }
      if (g == 0) res[kHeadRows * HD + h] = m_run[nt], res[kHeadRows * HD + kHeadRows + h] = l;
    }
  }
  // One token: the next kernel's blocks (wo), with the weights they load before their wait, come once this block's
  // loads are done. H100, Llama-2-7B int4 batch 1: +0.6% (sessions 62 and 63). Triggered here at every batch size,
  // batch 8 lost 1.6-2.8% (session 62), so more tokens keep the early trigger (bench/RESULTS.md).
  if (trigger_after_tiles) pdl_trigger();
  __syncthreads();

  // The block's partition: the warps combined in order (a warp with no tile has max -inf and adds nothing).
  const bool direct = out != nullptr && u.p0 + u.np > positions[u.t] && u.c == 0;  // one partition: no merge
  auto warp_res = [&](int w) { return reinterpret_cast<const float*>(stages + w * L::kWarpBytes); };
  for (int x = threadIdx.x; x < u.nh * HD; x += kThreads) {
    const int h = x / HD, d = x % HD;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, warp_res(w)[kHeadRows * HD + h]);
    float sum_o = 0, sum_l = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float e = expf(warp_res(w)[kHeadRows * HD + h] - M);
      sum_o += e * warp_res(w)[h * HD + d];
      sum_l += e * warp_res(w)[kHeadRows * HD + kHeadRows + h];
    }
    const size_t r = (size_t(u.t) * nH + u.h_first + h);
    if (direct) {
      out[r * HD + d] = sum_o / sum_l;
    } else {
      part_out[(r * n_part + u.c) * HD + d] = sum_o;
      if (d == 0) part_ml[2 * (r * n_part + u.c)] = M, part_ml[2 * (r * n_part + u.c) + 1] = sum_l;
    }
  }
  if (direct || out == nullptr) return;

  // The ticket: the last block of this grid row to get here merges its n_valid partitions.
  const int pos = positions[u.t], rows_each = partition_rows(pos, n_part), n_valid = (pos + rows_each) / rows_each;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned ticket = atomicAdd(&g_merge_tickets[blockIdx.y], 1u);
    *last_flag = ticket == unsigned(n_valid - 1);
    if (*last_flag) g_merge_tickets[blockIdx.y] = 0;
  }
  __syncthreads();
  if (!*last_flag) return;
  __threadfence();

  float* weights = reinterpret_cast<float*>(stages);       // [kHeadRows][n_part]
  float* sums = weights + size_t(kHeadRows) * n_part;       // [kWarps][kHeadRows][HD]
  float* inv_l = sums + size_t(kWarps) * kHeadRows * HD;    // [kHeadRows]
  for (int h = warp; h < u.nh; h += kWarps) {
    // (max, sum) of partition c; the first 64 read once, kept in registers for the weights
    const float2* ml = reinterpret_cast<const float2*>(part_ml) + (size_t(u.t) * nH + u.h_first + h) * n_part;
    float2 first[2];
#pragma unroll
    for (int k = 0; k < 2; ++k)
      first[k] = lane + 32 * k < n_valid ? __ldcg(ml + lane + 32 * k) : make_float2(-INFINITY, 0.0f);
    float m = fmaxf(first[0].x, first[1].x);
    for (int c = lane + 64; c < n_valid; c += 32) m = fmaxf(m, __ldcg(ml + c).x);
    m = warp_max(m);
    float l = 0;
    auto weigh = [&](int c, float2 x) {
      const float e = expf(x.x - m);
      weights[h * n_part + c] = e;
      l += e * x.y;
    };
#pragma unroll
    for (int k = 0; k < 2; ++k)
      if (lane + 32 * k < n_valid) weigh(lane + 32 * k, first[k]);
    for (int c = lane + 64; c < n_valid; c += 32) weigh(c, __ldcg(ml + c));
    l = warp_sum(l);
    if (lane == 0) inv_l[h] = 1.0f / l;
  }
  __syncthreads();
  // Slice w (w < kWarps) of a column (head h, dims 4 d4 .. 4 d4 + 3) is the sum of the partitions w, w + kWarps, ...
  // in partition order; the slices are then added in order (merge_partitions's order). All the columns' slices at
  // once, PC threads sharing a column, each with kWarps / PC slices: every load of a group of kWarps partitions is
  // issued before the first is used (past the last partition a load repeats it and weighs 0), where a loop over the
  // heads waited for each head's (session 19, H200: Llama-3-8B batch 1, fp8, 4K 14.6 -> 11.7 us a layer, 32K 31.5
  // -> 28.6). Four groups in flight, not two: Llama-3-8B's 66 partitions a row, batch 1, 1.5-4.5% faster at 2K-32K
  // (session 26; eight no better).
  const int cols = u.nh * (HD / 4);
  auto sum_slices = [&](auto threads_per_col) {
    constexpr int PC = decltype(threads_per_col)::value, NS = kWarps / PC;
    for (int item = threadIdx.x; item < cols * PC; item += kThreads) {
      const int col = item % cols, sub = item / cols, h = col / (HD / 4), d4 = col % (HD / 4);
      const float4* part4 =
          reinterpret_cast<const float4*>(part_out + (size_t(u.t) * nH + u.h_first + h) * n_part * HD) + d4;
      const float* w_h = weights + h * n_part;
      float4 acc[NS];
#pragma unroll
      for (int j = 0; j < NS; ++j) acc[j] = make_float4(0, 0, 0, 0);
#pragma unroll 4
      for (int c0 = 0; c0 < n_valid; c0 += kWarps) {
        float w[NS];
        float4 x[NS];
#pragma unroll
        for (int j = 0; j < NS; ++j) {
          const int c = c0 + sub + j * PC;
          w[j] = c < n_valid ? w_h[c] : 0.0f;
          x[j] = __ldcg(part4 + size_t(min(c, n_valid - 1)) * (HD / 4));
        }
#pragma unroll
        for (int j = 0; j < NS; ++j)
          acc[j].x += w[j] * x[j].x, acc[j].y += w[j] * x[j].y, acc[j].z += w[j] * x[j].z, acc[j].w += w[j] * x[j].w;
      }
#pragma unroll
      for (int j = 0; j < NS; ++j)
        *reinterpret_cast<float4*>(sums + ((sub + j * PC) * kHeadRows + h) * HD + 4 * d4) = acc[j];
    }
  };
  static_assert(kWarps == 4, "threads a column: 1, 2 or 4");
  if (cols * 4 <= kThreads)
    sum_slices(std::integral_constant<int, 4>{});
  else if (cols * 2 <= kThreads)
    sum_slices(std::integral_constant<int, 2>{});
  else
    sum_slices(std::integral_constant<int, 1>{});
  __syncthreads();
  for (int x = threadIdx.x; x < u.nh * HD; x += kThreads) {
    const int h = x / HD, d = x % HD;
    float sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sums[(w * kHeadRows + h) * HD + d];
    out[(size_t(u.t) * nH + u.h_first + h) * HD + d] = sum * inv_l[h];
  }
}

template <typename KV, int HD>
MmaLaunch launch_mma(const Ctx& ctx, const DecodePlan& plan, const Tensor& q, const Tensor& k_cache,
                     const Tensor& v_cache, const Tensor& token_seq, const KvBlockTable& kv, const Tensor& positions,
                     int64_t n_heads, float scale, float* part_out, float* part_ml, float* out) {
  using L = WarpTiles<KV, HD>;
  // codes: the heads of a block are the columns of n8 tiles, four heads (hi and lo parts) a tile
  auto kernel = attention_decode_partial_mma<KV, HD, 1>;
  if constexpr (kKvQuantized<KV>)
    if (plan.head_chunk > 4) kernel = attention_decode_partial_mma<KV, HD, 2>;
  const size_t smem = L::bytes(plan.P);
  if (smem > 48 * 1024) {
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "attention", " (cudaFuncSetAttribute)");
    // The largest shared-memory carveout for blocks this large (bf16's ~110 KiB, 2 an SM). The 1-byte caches' blocks
    // (41 KiB at 2048 positions, 4 an SM) stay under 48 KiB and leave the carveout to the driver.
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            static_cast<int>(cudaSharedmemCarveoutMaxShared)),
               "attention", " (cudaFuncSetAttribute)");
  }
  const int64_t grid_rows = q.dim(0) * kv.n_kv * plan.n_head_chunks;
  const bool merge = grid_rows <= kMaxMergeTickets && L::merge_fits(plan.n_part);
  launch_pdl(ctx, kernel, dim3(plan.n_part, static_cast<unsigned>(grid_rows)), kThreads, smem, q.data<float>(),
             k_cache.data<KV>(), v_cache.data<KV>(), kv, token_seq.data<int32_t>(), positions.data<int32_t>(),
             int(n_heads), plan.P, plan.n_part, plan.n_head_chunks, plan.head_chunk, scale, part_out, part_ml,
             ctx.status, k_cache.kv_scales(), v_cache.kv_scales(), merge ? out : nullptr, q.dim(0) == 1);
  return merge ? MmaLaunch::kMerged : MmaLaunch::kPartials;
}

}  // namespace

MmaLaunch launch_decode_partial_mma(const Ctx& ctx, const DecodePlan& plan, const Tensor& q, const Tensor& k_cache,
                                    const Tensor& v_cache, const Tensor& token_seq, const Tensor& kv_block_table,
                                    const Tensor& positions, int64_t n_heads, float scale, float* part_out,
                                    float* part_ml, float* out) {
  const int64_t hd = k_cache.dim(3);
  if (k_cache.dtype == DType::F32 || plan.head_chunk > kHeadRows || (hd != 64 && hd != 128 && hd != 256))
    return MmaLaunch::kNotTaken;
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  auto by_dim = [&](auto kv_tag) {
    using KV = decltype(kv_tag);
    if (hd == 64)
      return launch_mma<KV, 64>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out,
                                part_ml, out);
    if (hd == 128)
      return launch_mma<KV, 128>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out,
                                 part_ml, out);
    return launch_mma<KV, 256>(ctx, plan, q, k_cache, v_cache, token_seq, kv, positions, n_heads, scale, part_out,
                               part_ml, out);
  };
  if (k_cache.dtype == DType::BF16) return by_dim(__nv_bfloat16{});
  if (k_cache.dtype == DType::FP8) return by_dim(__nv_fp8_e4m3{});
  if (k_cache.dtype == DType::I8) return by_dim(int8_t{});
  return MmaLaunch::kNotTaken;
}

}  // namespace weft::cuda::decode
