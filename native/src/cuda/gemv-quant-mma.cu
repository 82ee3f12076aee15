// quant_gemv_mma (gemv-quant-mma.cuh): the quantized GEMV on tensor cores, for 1..64 tokens a pass.
//   Why: the fp32 kernels (gemv.cu, gemv-one-token.cu) spend ~3 instructions per weight (unpack, subtract, FMA per
//   token) and are bound by instruction issue, not bytes (bench/RESULTS.md: int4 read at ~0.85 TB/s). Here a lane
//   turns two weights into an f16 pair with one or two logic ops and one f16x2 subtract, and one mma.sync
//   m16n8k16 takes 256 weights x 8 tokens: ~50 instructions per 16 bytes of int4 for any T <= 8, ~28 for int8.
//   - Work item: a 16-row tile x one 64-byte chunk of each row (64 int8 or 128 int4 columns). Lane (g = lane / 4,
//     t = lane % 4) loads 16 bytes of rows g and g + 8 at byte 16 t of the chunk straight into registers (no
//     shared-memory ring); each warp keeps `depth` items in flight, reloading a slot as soon as it is consumed.
//   - The A fragment wants 4 columns per row per step at k slots {2t, 2t+1, 2t+8, 2t+9}; which physical columns
//     fill them is free as long as B (x) agrees, so each lane feeds its own 16 bytes: int8 word s (columns
//     16t + 4s .. +3) is one step; int4 word i (columns 32t + 8i .. +7) two steps, as the f16 pairs the magic-number
//     unpack yields: (c0, c4), (c1, c5) | (c2, c6), (c3, c7). The block stages x (f16) in that order, so each
//     lane's B fragments are 16-byte shared loads, and lanes past T load nothing.
//   - Unpack: int8 byte b ^ 0x80 into the low byte of f16 0x64uu = 1024 + b + 128 (one byte permute per pair),
//     minus 1152; int4 (w & 0x000f000f) | 0x64006400 = 1024 + c, minus 1032, and the high nibbles
//     (w & 0x00f000f0) | 0x64006400 = 1024 + 16 c, times 1/16 minus 72. All exact.
//   - Scales: where a chunk lies inside one group (int8 group % 64, int4 group % 128), its mma sums (fp32) are
//     multiplied by the two rows' bf16 scales once, in fp32. Smaller groups (int8 16 or 32, int4 32 or 64: each
//     lane's 16 bytes still inside one group) multiply the unpacked f16 pairs by the lane's scales in f16 before
//     the mma (one more f16x2 op per pair, and each weight rounded to f16: relative 2^-11), as every group does
//     from 17 tokens (then the mma sums go straight into the accumulators: no second set of 16 or 32 registers).
//   - K is split over a cluster of C blocks (partial sums summed through distributed shared memory in a fixed
//     order, as gemv.cu does: deterministic, no atomics); a block's 8 warps take its tiles round-robin.
//   - 9..64 tokens: 2, 4 or 8 n-tiles of 8 share each dequantized fragment (the weights are read once a pass); at
//     17..32 tokens a warp takes two 16-row tiles at once, so each B fragment it reads feeds two mma.
//     From 17 tokens a block has a SM to itself (up to 224 KiB of x and sums): decode batches of 17..64 rows had
//     dequantized every weight into bf16 for the GEMM each step (Llama-3-8B int4 ~18.5 ms a step at 33..64 rows
//     against 4.2 ms at 8, H200, bench/RESULTS.md session 28).
//   - K need only be a multiple of the lane vector: a partial last chunk loads zero words past K (their x is zero).
#include "cuda/gemv-quant-mma.cuh"

#include <cooperative_groups.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda/cluster-split.cuh"
#include "cuda/common.cuh"
#include "cuda/gemv-quant-mma-fragments.cuh"
#include "error.h"
#include "quant-tiles.h"

namespace cg = cooperative_groups;

namespace weft::cuda {
namespace {

using namespace quant_mma;  // the fragment helpers (gemv-quant-mma-fragments.cuh)

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkBytes = 64;             // bytes of a row per work item (4 lanes x 16)
constexpr size_t kMaxXBytes = 64 * 1024;    // staged x (f16) per block, up to 16 tokens
constexpr size_t kMaxPartBytes = 64 * 1024; // partial sums per block (cluster path), up to 16 tokens
constexpr size_t kMaxSmemBytes = 100 * 1024; // x and partial sums up to 16 tokens: two blocks a SM
constexpr size_t kMaxSmemBytesOneBlock = 224 * 1024;  // 17..64 tokens: one block a SM, x as large as it fits
constexpr int kMaxClusterSize = 8;

// Up to 16 tokens two blocks share a SM; from 17 (n-tiles of 32 or 64 tokens: 4 or 8 accumulator sets a warp, and
// their x slices) one block has it, and a split K sums its slices in rounds (quant_mma_kernel).
__host__ __device__ constexpr int blocks_per_sm(int NT) { return NT <= 2 ? 2 : 1; }
__host__ __device__ constexpr bool sums_in_rounds(int NT) { return NT > 2; }
// From 17 tokens: the 16-row tiles a warp works on together (MT: each B fragment read from shared memory feeds MT
// mma) and the ring's depth (U, in items of MT tiles) of the 32- and 64-token classes. Session 30 (H200, Llama-3-8B
// shapes, bench/RESULTS.md): two tiles took w13 at 17-32 tokens 64 -> 56 us (int4) and 91 -> 69 (int8); at 33-64
// tokens they forced a split of 8 (the doubled sums beside x) and lost (w13 int4 at 64: 131.6 -> 151.0 us).
constexpr int kMTiles32 = 2, kDepth32 = 4, kMTiles64 = 1, kDepth64 = 6;
__host__ __device__ constexpr int m_tiles(int NT) { return NT == 8 ? kMTiles64 : NT == 4 ? kMTiles32 : 1; }

struct QuantMmaParams {
  const float* x;          // [T, K] or gated [T, 2K]
  const uint8_t* w;        // [N, K] int8 or [N, K / 2] int4 codes
  const uint16_t* scales;  // [N, K / group] bf16 bits
  float* y;                // [T, N]
  int T, N, K, group, gated;
  int C;                   // cluster size: K slices
  int chunks_per_slice;
  int tiles_per_block;     // 16-row tiles of a block (and of its cluster)
  int x_stride;            // halves per token row of the staged x
  float vectors_per_group_inv;  // 1 / (group / columns per lane vector): a lane vector is 16 int8 or 32 int4
};

// Grid: C * G blocks, cluster (C, 1, 1); block b: K slice b % C (chunks [c * cps, ...)), tiles
// [(b / C) * tiles_per_block, ...). Dynamic shared memory: x [T][x_stride] f16 (the block's K slice, chunk by chunk,
// unit (l, t) of a chunk at halves (4 l + t) * 8 so that a quad's loads are 64 contiguous bytes; x_stride = 32 mod
// 64 halves so that the two token rows of a load phase use different banks), then (C > 1) partial sums
// [tiles_per_block * 16][8 NT] f32, summed over the cluster at the end. From 17 tokens (sums_in_rounds) the block's
// tiles go in rounds of kWarps groups of MT tiles instead (round r: group 8 r + warp, tiles tile0 + MT (8 r + warp)
// + m), so that 32 or 64 tokens' sums fit beside x whatever the block's share of N: warp w's group of a round is
// summed by block w % C, to whose shared memory each block writes its slice's sums ([2][kWarps / C owned groups][C
// slices][16 MT][8 NT], round r's in buffer r & 1; remote stores, which do not stall the warp as the remote reads of
// the end-of-kernel sum do), and which adds them in slice order once a cluster barrier has passed (one a round: a
// buffer is written again two rounds on, after every block has passed the barrier that ends its reads). (Up to 16
// tokens the rounds cost registers: the kernel kept at 128 spilled.)
// kTiles: codes and scales in tiles (quant-tiles.h), which differ only in where a lane's 16 bytes and its two scales
// are read.
template <bool kInt4, bool kScalesInWeights, int NT, int U, bool kTiles = false>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(NT)) quant_mma_kernel(const QuantMmaParams p) {
  constexpr int kCols = kInt4 ? 128 : 64;  // columns per chunk
  constexpr int kLoads = kCols / 32;       // 16-byte x loads per lane per chunk
  constexpr int kUnits = kCols / 8;        // 8-column units per chunk
  constexpr int TT = 8 * NT;
  constexpr bool kRounds = sums_in_rounds(NT);
  constexpr int MT = m_tiles(NT);
  extern __shared__ uint4 smem[];
  __shared__ float x_scale[TT], x_unscale[TT];
  __shared__ unsigned x_absmax[TT];
  __shared__ int x_out_of_range;
  pdl_trigger();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int C = p.C;
  const int c = C > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const int tile0 = (blockIdx.x / C) * p.tiles_per_block;
  const int nchunks = (p.K + kCols - 1) / kCols;  // the last one may be partial (K % 16 or % 32 lane vectors)
  const int ch0 = c * p.chunks_per_slice;
  const int nch = max(0, min(p.chunks_per_slice, nchunks - ch0));
  const int ntiles = max(0, min(p.tiles_per_block, (p.N + 15) / 16 - tile0));
  const int ngroups = (ntiles + MT - 1) / MT;  // a warp's unit: MT tiles (a last group's tile past ntiles: not stored)
  const int my_groups = ngroups > warp ? (ngroups - warp + kWarps - 1) / kWarps : 0;
  const int rounds = (ngroups + kWarps - 1) / kWarps;
  const int nitems = my_groups * nch;
  const size_t row_bytes = kInt4 ? p.K / 2 : p.K;
  const int n_groups = p.K / p.group;
  const int T = p.T;

  __half* xs = reinterpret_cast<__half*>(smem);
  float* part = reinterpret_cast<float*>(smem) + static_cast<size_t>(T) * p.x_stride / 2;

  if (threadIdx.x < TT) {
    x_scale[threadIdx.x] = 1.f;
    x_unscale[threadIdx.x] = 1.f;
    x_absmax[threadIdx.x] = 0u;
  }
  if (threadIdx.x == 0) x_out_of_range = 0;
  if (!kRounds && C > 1 && nch == 0)  // an empty K slice (K / 64 or K / 128 chunks < C * chunks_per_slice): zero sums
    for (int i = threadIdx.x; i < ntiles * 16 * TT; i += kThreads) part[i] = 0.f;

  // Slot j, tile m of the group: rows g and g + 8, 16 bytes each, and their bf16 scales (low: row g, high: g + 8).
  uint4 w_lo[U][MT], w_hi[U][MT];
  uint32_t sc[U][MT];
  int load_group = warp, load_ch = 0, load_item = 0;
  const auto load = [&](int j) {
    if (load_item >= nitems) return;
    const int chunk = ch0 + load_ch;
    const uint8_t* base = p.w + static_cast<size_t>(chunk) * (kTiles ? kTileBytes : kChunkBytes) + t * 16;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int load_tile = tile0 + load_group * MT + m;
      // Rows past N read row N - 1 and are not stored; in tiles (no partial tile) a tile past N reads the last one,
      // so that the lane's two scales stay one aligned word.
      const int r_lo = kTiles ? min(load_tile, p.N / 16 - 1) * 16 + g : min(load_tile * 16 + g, p.N - 1);
      const int r_hi = kTiles ? r_lo + 8 : min(load_tile * 16 + g + 8, p.N - 1);
      // A lane vector past K (a partial last chunk, which only groups smaller than a chunk allow, so the zero scale
      // multiplies this lane's weights alone): x is zero there.
      if ((chunk * 4 + t) * (kCols / 4) >= p.K) {
        w_lo[j][m] = w_hi[j][m] = make_uint4(0, 0, 0, 0);
        sc[j][m] = 0;
      } else {
        // Tiles (quant-tiles.h; K a multiple of the chunk, rows of 16): row r of chunk c at tile (r / 16)'s unit c,
        // row r % 16 of it; a warp's 8 rows are 512 contiguous bytes.
        const size_t row_at = kTiles ? (r_lo / 16) * (row_bytes / kChunkBytes) * kTileBytes : 0;
        w_lo[j][m] = load_stream(base + (kTiles ? row_at + (r_lo % 16) * kChunkBytes : r_lo * row_bytes));
        w_hi[j][m] = load_stream(base + (kTiles ? row_at + (r_hi % 16) * kChunkBytes : r_hi * row_bytes));
        // The group of this lane's vector (chunk * 4 + t; exact: the float is within 2^-22 relative of the quotient).
        const int gi =
          n_groups == 1 ? 0 : static_cast<int>((static_cast<float>(chunk * 4 + t) + 0.5f) * p.vectors_per_group_inv);
        if constexpr (kTiles)  // rows g and g + 8 side by side: the low and high halves of one word
          sc[j][m] = __ldg(reinterpret_cast<const uint32_t*>(p.scales + tile_scale_index(r_lo, gi, n_groups)));
        else
          sc[j][m] = static_cast<uint32_t>(__ldg(p.scales + static_cast<size_t>(r_lo) * n_groups + gi)) |
                     static_cast<uint32_t>(__ldg(p.scales + static_cast<size_t>(r_hi) * n_groups + gi)) << 16;
      }
    }
    ++load_item;
    if (++load_ch == nch) {
      load_ch = 0;
      load_group += kWarps;
    }
  };
#pragma unroll
  for (int j = 0; j < U; ++j) load(j);  // the weights do not depend on the kernel before
  pdl_wait();                           // x does

  // Stage x (silu(gate) * up when gated) as f16 in the lanes' order; flags values beyond f16's range.
  const int units_per_token = nch * kUnits;
  const auto stage = [&](bool rescaled) {
#pragma unroll 4
    for (int i = threadIdx.x; i < T * units_per_token; i += kThreads) {
      const int tok = i / units_per_token, u = i - tok * units_per_token;
      const int chunk = u / kUnits, unit = u - chunk * kUnits;
      const int col = ch0 * kCols + u * 8;
      const float* xr = p.x + static_cast<size_t>(tok) * (p.gated ? 2 * p.K : p.K) + col;
      float v[8] = {};  // columns past K (a partial last chunk): zero
      if (col < p.K) x_columns8(xr, p.K, p.gated, v);
      float m = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        m = fmaxf(m, fabsf(v[e]));
        v[e] *= x_scale[tok];
      }
      if (!rescaled && m > 65504.f) x_out_of_range = 1;
      if (rescaled) atomicMax(&x_absmax[tok], __float_as_uint(m));  // non-negative floats order as their bits
      const int l = unit % kLoads, tq = unit / kLoads;  // this unit feeds lane quad position tq, load l
      reinterpret_cast<uint4*>(xs + static_cast<size_t>(tok) * p.x_stride + chunk * kCols)[l * 4 + tq] = pack_x<kInt4>(v);
    }
  };
  __syncthreads();  // the flags above are set
  stage(false);
  __syncthreads();
  if (x_out_of_range) {  // rare: per token, a power of two that brings the slice's largest |x| below 2^15
    stage(true);         // (x_scale is still 1: this pass only measures)
    __syncthreads();
    if (threadIdx.x < T) {
      int e = 0;
      frexpf(__uint_as_float(x_absmax[threadIdx.x]), &e);  // absmax < 2^e
      if (e > 15 && e < 255) {
        x_scale[threadIdx.x] = ldexpf(1.f, 15 - e);
        x_unscale[threadIdx.x] = ldexpf(1.f, e - 15);
      }
    }
    __syncthreads();
    stage(true);
    __syncthreads();
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.f;
  int group = warp, ch = 0, round = 0;
  // Rounds: where warp w's sums of this round go (block w % C's buffer, its owned group w / C, slice c), and the
  // round's end: the sums of the groups' tiles this block owns.
  const auto round_sums = [&](int w) {
    return cg::this_cluster().map_shared_rank(part, w % C) +
           ((((round & 1) * (kWarps / C) + w / C) * C + c) * 16 * MT) * TT;
  };
  const auto end_round = [&] {
    cg::this_cluster().sync();
    const float* sums = part + (round & 1) * kWarps * 16 * MT * TT;
    for (int i = threadIdx.x; i < kWarps / C * 16 * MT * TT; i += kThreads) {
      const int owned = i / (16 * MT * TT), r = (i / TT) % (16 * MT), tok = i % TT, w = owned * C + c;
      const int local = (kWarps * round + w) * MT + r / 16, row = (tile0 + local) * 16 + r % 16;
      if (local >= ntiles || tok >= T || row >= p.N) continue;
      float s = 0.f;
      for (int q = 0; q < C; ++q) s += sums[((owned * C + q) * 16 * MT + r) * TT + tok];
      p.y[static_cast<size_t>(tok) * p.N + row] = s;
    }
    ++round;
  };
  // The B fragments of chunk `chl` for n-tile n: this lane's token g + 8n; past T, token T - 1 again (the sums of
  // columns past T are never stored; a load with no branch, where a zero past T cost a branch a load).
  const uint4* x_rows[NT];  // this lane's B row (token) of each n-tile
#pragma unroll
  for (int n = 0; n < NT; ++n)
    x_rows[n] = reinterpret_cast<const uint4*>(xs + static_cast<size_t>(min(g + 8 * n, T - 1)) * p.x_stride) + t;
  const auto load_x = [&](int chl, int n, int l) { return x_rows[n][chl * (kCols / 8) + l * 4]; };
  const auto compute = [&](int j) {
    // Scales in the weights: each tile's two scales as f16 pairs, multiplied into every unpacked pair.
    uint32_t s2_lo[MT] = {}, s2_hi[MT] = {};
    if constexpr (kScalesInWeights) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const __half2 lo2 = __float2half2_rn(__uint_as_float(sc[j][m] << 16)),
                      hi2 = __float2half2_rn(__uint_as_float(sc[j][m] & 0xffff0000u));
        s2_lo[m] = *reinterpret_cast<const uint32_t*>(&lo2);
        s2_hi[m] = *reinterpret_cast<const uint32_t*>(&hi2);
      }
    }
    const auto scaled = [&](uint32_t pair, uint32_t s2) { return kScalesInWeights ? mul_f16x2(pair, s2) : pair; };
    // Scales on fp32 sums: this unit's sums apart, then scaled into acc; scales in the weights: straight into acc.
    float part_acc[MT][NT][4];
    float(&sums)[MT][NT][4] = kScalesInWeights ? acc : part_acc;
    if constexpr (!kScalesInWeights) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) part_acc[m][n][e] = 0.f;
    }
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      uint4 xb[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) xb[n] = load_x(ch, n, l);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if constexpr (kInt4) {  // word l of the 16 bytes: two steps
          uint32_t lo[4], hi[4];
          unpack_int4((&w_lo[j][m].x)[l], lo);
          unpack_int4((&w_hi[j][m].x)[l], hi);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            lo[i] = scaled(lo[i], s2_lo[m]);
            hi[i] = scaled(hi[i], s2_hi[m]);
          }
          // k-step by k-step: the NT mma of a step are independent (one n-tile's two steps back to back waited
          // on each other)
#pragma unroll
          for (int n = 0; n < NT; ++n) mma_16816(sums[m][n], lo[0], hi[0], lo[1], hi[1], xb[n].x, xb[n].y);
#pragma unroll
          for (int n = 0; n < NT; ++n) mma_16816(sums[m][n], lo[2], hi[2], lo[3], hi[3], xb[n].z, xb[n].w);
        } else {  // words 2l and 2l + 1: one step each
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            uint32_t lo01, lo23, hi01, hi23;
            unpack_int8((&w_lo[j][m].x)[2 * l + s], lo01, lo23);
            unpack_int8((&w_hi[j][m].x)[2 * l + s], hi01, hi23);
            lo01 = scaled(lo01, s2_lo[m]);
            lo23 = scaled(lo23, s2_lo[m]);
            hi01 = scaled(hi01, s2_hi[m]);
            hi23 = scaled(hi23, s2_hi[m]);
#pragma unroll
            for (int n = 0; n < NT; ++n)
              mma_16816(sums[m][n], lo01, hi01, lo23, hi23, s ? xb[n].z : xb[n].x, s ? xb[n].w : xb[n].y);
          }
        }
      }
    }
    if constexpr (!kScalesInWeights) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float s_lo = __uint_as_float(sc[j][m] << 16), s_hi = __uint_as_float(sc[j][m] & 0xffff0000u);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[m][n][0] = fmaf(s_lo, part_acc[m][n][0], acc[m][n][0]);
          acc[m][n][1] = fmaf(s_lo, part_acc[m][n][1], acc[m][n][1]);
          acc[m][n][2] = fmaf(s_hi, part_acc[m][n][2], acc[m][n][2]);
          acc[m][n][3] = fmaf(s_hi, part_acc[m][n][3], acc[m][n][3]);
        }
      }
    }
    if (++ch < nch) return;
    // The group's slice is done. acc[m][n][e]: row g (e < 2) or g + 8 of its tile m, token 8n + 2t + (e & 1).
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int local = group * MT + m;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = 8 * n + 2 * t + (e & 1), r = g + (e >> 1) * 8, row = (tile0 + local) * 16 + r;
          const float v = acc[m][n][e] * x_unscale[tok];
          if (C == 1) {
            if (tok < T && row < p.N && local < ntiles) p.y[static_cast<size_t>(tok) * p.N + row] = v;
          } else {
            if constexpr (kRounds) round_sums(warp)[(m * 16 + r) * TT + tok] = v;
            else part[(local * 16 + r) * TT + tok] = v;
          }
          acc[m][n][e] = 0.f;
        }
    }
    ch = 0;
    group += kWarps;
    if (kRounds && C > 1) end_round();
  };

  run_ring<U>(nitems, compute, load);

  if (C > 1) {
    if constexpr (kRounds) {
      for (; round < rounds; end_round())  // rounds in which this warp had no item: a tile here means an empty slice
        if (kWarps * round + warp < ngroups)
          for (int i = lane; i < 16 * MT * TT; i += 32) round_sums(warp)[i] = 0.f;
    } else {
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();
      for (int idx = threadIdx.x * C + c; idx < ntiles * 16 * TT; idx += kThreads * C) {
        const int tok = idx % TT, row = tile0 * 16 + idx / TT;
        if (tok >= T || row >= p.N) continue;
        float s = 0.f;
        for (int q = 0; q < C; ++q) s += cluster.map_shared_rank(part, q)[idx];
        p.y[static_cast<size_t>(tok) * p.N + row] = s;
      }
      cluster.sync();  // no block leaves while another reads its sums
    }
  }
}

// ---- launch

struct Plan {
  int C = 0, chunks_per_slice = 0, tiles_per_block = 0, blocks = 0, x_stride = 0;
  size_t smem = 0;
};

constexpr int kMaxDevices = 64;
int current_device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < kMaxDevices ? dev : 0;
}

int sm_count() {
  static int counts[kMaxDevices] = {};
  const int dev = current_device();
  if (counts[dev] == 0 && cudaDeviceGetAttribute(&counts[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    counts[dev] = 132;
  return counts[dev];
}

// The shared memory a block of 17..64 tokens may ask for on this GPU, up to kMaxSmemBytesOneBlock.
size_t smem_one_block() {
  static size_t limits[kMaxDevices] = {};
  const int dev = current_device();
  int optin = 0;
  if (limits[dev] == 0 && cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess)
    limits[dev] = std::min(static_cast<size_t>(optin) - 1024, kMaxSmemBytesOneBlock);  // 1 KiB: the static arrays
  return limits[dev];
}

int tokens_in_n_tiles(int T) { return T <= 8 ? 8 : T <= 16 ? 16 : T <= 32 ? 32 : 64; }

// Lets an instantiation ask for its class's shared memory (x and the partial sums may pass 48 KiB), once a device.
template <bool kInt4, bool kScalesInWeights, int NT, int U, bool kTiles = false>
cudaError_t allow_smem() {
  static bool attribute_set[kMaxDevices] = {};
  const int dev = current_device();
  if (attribute_set[dev]) return cudaSuccess;
  const size_t smem_max = blocks_per_sm(NT) == 2 ? kMaxSmemBytes : smem_one_block();
  const cudaError_t e = cudaFuncSetAttribute(quant_mma_kernel<kInt4, kScalesInWeights, NT, U, kTiles>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_max));
  attribute_set[dev] = e == cudaSuccess;
  return e;
}

// Clusters of C blocks resident at once, C > 1. A GPC holds whole clusters, so fewer than SMs / C fit: on H200 at
// one block a SM, 30 clusters of 4 where a grid of 33 ran its last 3 as a second wave (a 33..64-token GEMV twice as
// long as at 32 tokens; ncu's "Max Active Clusters"). Asked of the occupancy API once a device for each class (the
// largest shared memory of the class: blocks a SM are set by the class's registers, not by its exact bytes).
int resident_clusters(int C, bool two_a_sm) {
  static int counts[kMaxDevices][2][kMaxClusterSize + 1] = {};
  int& n = counts[current_device()][two_a_sm ? 1 : 0][C];
  if (n > 0) return n;
  const auto kernel = two_a_sm ? quant_mma_kernel<true, false, 2, 4> : quant_mma_kernel<true, true, 8, kDepth64>;
  const cudaError_t allowed = two_a_sm ? allow_smem<true, false, 2, 4>() : allow_smem<true, true, 8, kDepth64>();
  ClusterLaunchConfig launch(dim3(C * 64), kThreads, two_a_sm ? kMaxSmemBytes : smem_one_block(), C);
  int found = 0;
  if (allowed != cudaSuccess || cudaOccupancyMaxActiveClusters(&found, kernel, &launch.cfg) != cudaSuccess || found <= 0) {
    cudaGetLastError();  // no answer: assume every SM's blocks can form clusters
    found = blocks_per_sm(two_a_sm ? 2 : 8) * sm_count() / C;
  }
  return n = found;
}

// The cluster size (K split) with the least modelled time: one wave of blocks_per_sm blocks per SM; a warp's time is
// its items (ceil(tiles per block / 8) x chunks per slice) plus staging its share of x and, split, of the reduction.
// Ties go to the smaller split. C = 0 in the answer: nothing fits.
Plan plan_for(bool int4, int T, int N, int K, int forced_cluster) {
  const int cols = int4 ? 128 : 64, nchunks = (K + cols - 1) / cols, ntiles = (N + 15) / 16, TT = tokens_in_n_tiles(T);
  const bool two_a_sm = blocks_per_sm(TT / 8) == 2;
  const size_t x_max = two_a_sm ? kMaxXBytes : smem_one_block(), smem_max = two_a_sm ? kMaxSmemBytes : smem_one_block();
  const int slots = blocks_per_sm(TT / 8) * sm_count();
  Plan best;
  double best_cost = 1e30;
  for (int C = 1; C <= kMaxClusterSize; C *= 2) {
    if ((forced_cluster > 0 && C != forced_cluster) || C > nchunks) continue;
    Plan pl;
    pl.C = C;
    pl.chunks_per_slice = (nchunks + C - 1) / C;
    pl.x_stride = (pl.chunks_per_slice * cols + 63) / 64 * 64 + 32;
    const size_t x_bytes = static_cast<size_t>(T) * pl.x_stride * 2;
    int G = std::max(1, C == 1 ? slots : std::min(slots / C, resident_clusters(C, two_a_sm)));
    const int MT = m_tiles(TT / 8);  // a block's tiles: whole groups of a warp's MT
    pl.tiles_per_block = (ntiles + G - 1) / G;
    pl.tiles_per_block = (pl.tiles_per_block + MT - 1) / MT * MT;
    G = (ntiles + pl.tiles_per_block - 1) / pl.tiles_per_block;
    pl.blocks = G * C;
    const size_t part_bytes =
        C == 1 ? 0 : static_cast<size_t>(sums_in_rounds(TT / 8) ? 2 * kWarps * MT : pl.tiles_per_block) * 16 * TT * 4;
    if (x_bytes > x_max || (two_a_sm && part_bytes > kMaxPartBytes) || x_bytes + part_bytes > smem_max) continue;
    pl.smem = x_bytes + part_bytes;
    const double cost = static_cast<double>((pl.tiles_per_block + kWarps * MT - 1) / (kWarps * MT)) * MT *
                            pl.chunks_per_slice +
                        static_cast<double>(T) * pl.chunks_per_slice * cols / 2048.0 +
                        (C > 1 ? static_cast<double>(pl.tiles_per_block) * 16 * TT / kThreads : 0.0);
    if (cost < best_cost) {
      best_cost = cost;
      best = pl;
    }
  }
  return best;
}

template <bool kInt4, bool kScalesInWeights, int NT, int U, bool kTiles>
cudaError_t launch(const QuantMmaParams& p, const Plan& pl, bool pdl, cudaStream_t stream) {
  const cudaError_t e = allow_smem<kInt4, kScalesInWeights, NT, U, kTiles>();
  if (e != cudaSuccess) return e;
  return launch_in_clusters(quant_mma_kernel<kInt4, kScalesInWeights, NT, U, kTiles>, p, dim3(pl.blocks), kThreads, pl.smem, pl.C,
                            pdl, stream);
}

template <bool kInt4, bool kTiles>
cudaError_t dispatch(int T, int depth, bool small_group, const QuantMmaParams& p, const Plan& pl, bool pdl,
                     cudaStream_t stream) {
  // From 17 tokens the scales always go into the f16 weights: 4 or 8 n-tiles' unit sums apart would take 16 or 32
  // more registers a lane and serialise each unit's mma chains behind the last unit's scaling.
  if (T > 32) return launch<kInt4, true, 8, kDepth64, kTiles>(p, pl, pdl, stream);
  if (T > 16) return launch<kInt4, true, 4, kDepth32, kTiles>(p, pl, pdl, stream);
  if (small_group)
    return T > 8 ? launch<kInt4, true, 2, 4, kTiles>(p, pl, pdl, stream) : launch<kInt4, true, 1, 8, kTiles>(p, pl, pdl, stream);
  if (T > 8) return launch<kInt4, false, 2, 4, kTiles>(p, pl, pdl, stream);
  return depth == 4 ? launch<kInt4, false, 1, 4, kTiles>(p, pl, pdl, stream) : launch<kInt4, false, 1, 8, kTiles>(p, pl, pdl, stream);
}

}  // namespace

bool quant_gemv_mma_takes(const QuantMatrix& w, int T, int N, int K, const QuantMmaTuning& tuning) {
  const bool int4 = w.dtype == DType::I4;
  if (!(int4 || w.dtype == DType::I8) || T < 1 || T > kQuantMmaMaxTokens || N < 1 || K < 1) return false;
  const int cols = int4 ? 128 : 64, vec = cols / 4;  // a chunk's columns, a lane vector's
  if (w.group <= 0 || w.group % vec != 0 || K % w.group != 0 || reinterpret_cast<uintptr_t>(w.q) % 16 != 0) return false;
  return plan_for(int4, T, N, K, tuning.cluster).C > 0;
}

bool quant_gemv_mma(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K, bool gated,
                    const QuantMmaTuning& tuning) {
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || !quant_gemv_mma_takes(w, T, N, K, tuning)) return false;
  const bool int4 = w.dtype == DType::I4;
  const Plan pl = plan_for(int4, T, N, K, tuning.cluster);
  const int cols = int4 ? 128 : 64, vec = cols / 4;
  const QuantMmaParams p{x, static_cast<const uint8_t*>(w.q), w.scales, y, T, N, K, w.group, gated ? 1 : 0, pl.C,
                         pl.chunks_per_slice, pl.tiles_per_block, pl.x_stride,
                         static_cast<float>(vec) / static_cast<float>(w.group)};
  const int depth = tuning.depth == 4 ? 4 : 8;
  const bool small_group = w.group % cols != 0;  // the scales go into the f16 weights (gemv-quant-mma.cuh)
  const cudaError_t e = int4 ? (w.tiles ? dispatch<true, true>(T, depth, small_group, p, pl, tuning.pdl, ctx.stream)
                                        : dispatch<true, false>(T, depth, small_group, p, pl, tuning.pdl, ctx.stream))
                             : (w.tiles ? dispatch<false, true>(T, depth, small_group, p, pl, tuning.pdl, ctx.stream)
                                        : dispatch<false, false>(T, depth, small_group, p, pl, tuning.pdl, ctx.stream));
  check_cuda(ctx.st, e, "matmul", " (quantized tensor-core GEMV launch)");
  check_cuda(ctx.st, cudaGetLastError(), "matmul");
  return true;
}

bool quant_gemv_mma_passes(const Ctx& ctx, const float* x, const QuantMatrix& w, float* y, int T, int N, int K,
                           bool gated) {
  if (T < 1) return false;
  for (const int most : {kQuantMmaMaxTokens, kQuantMmaMaxTokens / 2, kQuantMmaMaxTokens / 4}) {
    const int passes = (T + most - 1) / most, each = (T + passes - 1) / passes, last = T - (passes - 1) * each;
    if (!quant_gemv_mma_takes(w, each, N, K) || !quant_gemv_mma_takes(w, last, N, K)) continue;
    const size_t x_width = static_cast<size_t>(K) * (gated ? 2 : 1);
    for (int t0 = 0; t0 < T; t0 += each)
      if (!quant_gemv_mma(ctx, x + t0 * x_width, w, y + static_cast<size_t>(t0) * N, std::min(each, T - t0), N, K, gated))
        return false;  // only on the first pass (a misaligned x): the passes' shapes were taken above
    return true;
  }
  return false;
}

}  // namespace weft::cuda
