// gemv_one_token_mma (gemv-one-token-mma.cuh): the one-token int4 and int8 GEMV on tensor cores, one block a SM;
// gemv_tokens_mma: the same kernel for 2..8 int4 or int8 tokens; gemv_experts_mma: for stacked quantized experts.
//   Why: the fp32 one-token kernels (gemv-one-token.cu, gemv-rows-tma.cu) spend ~6 instructions a weight (unpack,
//   convert, FMA, addresses) and are bound by issue. Here two weights become an f16 pair with one lop3 and one f16x2
//   op, and one mma.sync m16n8k16 takes 256 of them (an estimated ~100 instructions a lane for 64 weights; the first
//   form's SASS had 216, bench/RESULTS.md session 27). The 1..16-token
//   tensor-core kernel (gemv-quant-mma.cu) gives each warp whole tiles, so at one token most of a block's warps idle
//   on a layer's shapes and every block restages x; here each block stages x once and its warps split every tile's
//   K between them.
//   - Work: 16-row tiles (pairs: 8 gate rows and their 8 up rows, so one lane holds both sums of an output); block b
//     of G takes tiles b, b + G, ..., each cut into 64-byte chunks of its rows (128 columns, one group of 128); the
//     block's (tile, chunk) units go round-robin to its 16 warps, so its warps stay within a unit of each other
//     whatever K is.
//   - Lane (g = lane / 4, t = lane % 4) loads 16 bytes of rows g and g + 8 at byte 16 t of the chunk straight into
//     registers, 6 units ahead a warp (the first 6 before the kernel waits for the one before: the weights do not
//     depend on it, common.cuh); the A fragments are gemv-quant-mma.cu's (gemv-quant-mma-fragments.cuh).
//   - int8 in tiles (quant-tiles.h) by bulk copies instead: a unit's 1 KiB (one contiguous run where a warp's units
//     come in runs of 4, else two of 512 bytes), which lane 0 copies into the warp's ring of 4 slots in shared
//     memory, each completing on its own mbarrier (a warp's first run of 4 in one copy); the lanes
//     read their 16 bytes of it (512 contiguous bytes a warp load, no bank conflict) and copy the next unit into it.
//     x's digits are staged over its own f32 copy to leave the room. H100, us a Llama-2-7B layer (session 46-47):
//     75.8-78.1 with 6 slots against the register ring's 83.2-85.3; 10 and 12 slots 82.3 and 97.8. End to end the
//     block's shared memory decides what runs beside it: with its few registers (74-111 a thread, against the
//     register ring's 114-128) the rope and decode attention started on its SMs 20-23 us before its end and ran
//     2.5-3.3x longer (the step 3.311 ms against 3.207 with the register ring, where they start 5 us before the
//     GEMV's end), so it asks for all the shared memory. Int8 step at batch 1 on H100 (session 48): 3.063 ms against
//     3.176 for the register ring (+3.7% tok/s), batch 8 equal. int4 gained nothing (55.3 against 54.3 us a layer)
//     and keeps the register ring (with its s8 form below too: Llama-2-7B batch 1 -7%, H100 session 53).
//   - x at one token: staged once a block (or made from the deferred addRmsNorm, rms-norm.cuh), scaled by a power of
//     two below 2^22 and rounded, as three signed base-256 digits (B's columns 0-2, s8; the other 5 are zero: at one
//     token they are free); a lane's words are mma.sync m16n8k32 s8 steps with exact s32 sums, and a row's sum is
//     65536 c0 + 256 c1 + c2, taken to fp32 once a tile (one scale a row) or once a chunk (groups). Any order of K's
//     columns gives the same sum, so the digits are staged in the order the lanes' words take.
//   - A warp's unit sums (fp32, scaled by the two rows' bf16 group scales) accumulate while it stays in one tile and
//     go to shared memory when it leaves; the block then sums each row's 16 warp partials in warp order
//     (deterministic, no atomics).
//   - int8 codes need no unpacking: each 16-byte word pair of a lane is two s8 k-steps. A lane's unit (2 x 16
//     bytes): 2 loads, 1 shared load, 2 mma, where the f16 form took 4 x (10 unpacking + 1 mma) (its SASS: 30
//     instructions a unit against 65). H100 (session 45): 89.0 / 83.3 us a Llama-2-7B layer (row-major / tiles)
//     against the f16 form's 89.9 / 83.8 and the streaming kernel's 87.6: bound by its loads there.
//   - int4 codes (code = weight + 8) become s8 bytes with one lop3 a word for its odd columns (the high nibbles: the
//     top bit flipped makes a code its weight in two's complement, the low nibble cleared 16 times it) and a shift
//     more for its even ones: 3 instructions for 8 weights and 4 s8 k-steps a unit, where x as f16 hi + lo (before
//     session 53) took 9 for 8 (f16 pairs by the magic-number trick) and 8 f16 k-steps: 52 SASS instructions a unit
//     against 109. H100, tok/s at batch 1: Llama-2-7B 449.6 -> 466.0, Mixtral 8 layers 836.8 -> 856.1; a ring 8 deep
//     (6 here) lost 1-4%. The unit's bookkeeping is kept small (tile offsets in 32 bits, lanes t and t ^ 1 combined
//     once a tile, sums from the mma's zero C): ~142 -> ~110 SASS instructions a w13 unit (static count); H100
//     (session 59), int4 Llama-2-7B 51.5 -> 50.8 us a layer, batch 1 472.0 -> 477.5 tok/s.
//   - 2..8 tokens (kTokens; int4, and int8 as f16 pairs): x's tokens are B's columns in f16 (as gemv-quant-mma.cu
//     stages them) and each row's partial sums 8 wide; the same mma a unit, so the weights' pass costs what one
//     token's does, where the 1..16-token kernel gave a warp whole tiles and split K over clusters (Llama-3-8B's w2
//     at 8 tokens: 34.0 us, 29% of its floor, against this kernel's 16.1 at one token; H100, session 49). Where T
//     tokens of x and the sums do not fit the block's shared memory (at 8 tokens K 14336 does not), K's chunks go in
//     2 or 4 runs, each with its x columns staged before it (kPhased, a kernel of its own).
//     Decode, H100 (sessions 49-50), tok/s: Llama-2-7B int4 batch 2 685 -> 888, 4 1235 -> 1636, 8 2268 -> 2973;
//     int8 batch 2 485 -> 627, 4 922 -> 1179, 8 1594 -> 2178; Llama-3-8B batch 8 with w2 in two runs (kPhased)
//     against one run and the other kernel for w2: int8 1659 -> 1944, int4 2313 -> 2569.
//   - Experts (kExperts: expertMatmul / siluMulExpertMatmul, int4 or int8 stacked experts, row-major or in tiles
//     (El N rows, N a multiple of 16, so an expert's rows start a tile)): blockIdx.y is the block's expert and its
//     columns the pairs routed to it (expert-slots.cuh), 8 a pass, so each chosen expert's weights are read once for
//     every 8 of its pairs (passes of 8 tokens, before session 52, read every chosen expert once a pass); the routing
//     comes from the kernel before, so the block waits for it before its first weight load. int8 tiles at one token
//     take the bulk-copy ring as the dense GEMV does. H100 Mixtral 8 layers (session 50, row-major, against gemv.cu's
//     vector kernel): int4 batch 1 569 -> 814 tok/s, batch 8 819 -> 2226; int8 469 -> 536 and 684 -> 1503; in tiles
//     (session 51, against row-major): int8 batch 1 518-541 -> 576, batch 8 1400 -> 1523; int4 811-817 -> 847-852,
//     2083 -> 2234; 8 pairs an expert a read (session 52, against passes of 8 tokens and, past 16, experts
//     dequantized for cuBLAS): int4 batch 16 2489 -> 3557, 32 811 -> 4661, 64 1602 -> 5078.
//   Measured on H200 (bench/kernels/gemv-layer-run.sh, 32 layers' one-token GEMVs in a graph, us a layer): Llama-2-7B
//   int4 g128 51.5 (floor 23.0) against 64.1 on the bulk-copy rows; int8's f16 form 82.8 against the streaming
//   kernel's 72.9 (session 27). The same loads with no arithmetic take 39 us: most of the gap to the floor is the
//   load pattern (64 bytes of each of 8 rows a warp load; 512 contiguous bytes a load took ~10% off, timing only: it
//   needs the weights repacked) and each kernel's fixed costs, the rest the arithmetic beside the loads.
#include "cuda/gemv-one-token-mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/bulk-copy.cuh"
#include "cuda/common.cuh"
#include "cuda/expert-slots.cuh"
#include "cuda/gemv-quant-mma-fragments.cuh"
#include "cuda/gemv-weight-vectors.cuh"  // log2_exact
#include "cuda/rms-norm.cuh"
#include "error.h"
#include "quant-tiles.h"

namespace weft::cuda {
namespace {

using namespace quant_mma;  // the fragment helpers

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// int8 tiles by bulk copies take twice the warps (64 registers a thread is enough for them): with their ring of
// kRingDepth slots a warp, a SM then keeps 128 KiB of weights in flight, not 64. H200, Llama-2-7B int8 batch 1: 380.3
// tok/s against 365.5 (session 55, with every form at 32 warps; the register-ring forms lost 18-28% at 8 tokens).
// With only this form at 32, H100 (session 59): batch 1 318.8 -> 324.7 tok/s; batch 8 unchanged (measured with this
// int8 form inside a variant that also changed int4's pairs).
constexpr int kBulkWarps = 32;
__host__ __device__ constexpr int warps_of(bool bulk) { return bulk ? kBulkWarps : kWarps; }
constexpr int kDepth = 6;             // units a warp keeps in flight (8 spilled: 53.4 against 51.5 us a layer)
// int8 tiles by bulk copies: units a warp keeps in flight in shared memory. Four, not six: with the block asking for
// all the shared memory (gemv_one_token_mma), 4 slots gave 3.137 ms a Llama-2-7B int8 step on H100, 6 slots 3.218.
constexpr int kRingDepth = 4;
constexpr int kChunkBytes = 64;       // bytes of a row a unit (4 lanes x 16)
constexpr int kMaxK = 16384;
constexpr int kXExponent = 14;        // kTokens: a token scaled below 2^14 where f16 does not hold it as it is
constexpr int kXExponentDigits = 22;  // one token: x scaled below 2^22, three signed base-256 digits
constexpr size_t kMaxPartBytes = 64 * 1024;
constexpr size_t kMaxSmemBytes = 226 * 1024;  // all but the static arrays' room of Hopper's 227 KiB
constexpr int kMaxTokens = 8;         // kTokens: B's 8 columns, a token each
constexpr int kMaxPhases = 4;         // kTokens: K in at most 4 runs (8 tokens of x at K 16384: 64 KB a run)

struct Params {
  const float* x;
  const uint8_t* w;         // [rows, K / 2] int4 codes
  const uint16_t* scales;   // [rows, n_groups] bf16 bits
  float* y;
  int N, K, n_groups;
  int group_shift;          // chunk c's group is c >> group_shift (one group a row: 30)
  int n_tiles;
  int part_offset;          // bytes of shared memory before the warps' partial sums
  int ring_offset;          // bulk copies: bytes before the warps' rings (kBulkWarps x kRingDepth units, then barriers)
  int gated;                // x is [gate | up] (2K) and the product reads silu(gate) * up
  int T;                    // tokens: 1, or 2..kMaxTokens (kTokens: x [T, K], y [T, N])
  int phases;               // kTokens: K in this many parts, x's tokens staged a part at a time (else 1)
  // kExperts: w and scales hold gridDim.y experts [n_local][N][...] (row-major), blockIdx.y the block's; its tokens
  // (B's columns) are the pairs routed to it (expert_slots.cuh: x row pair / topk, or pair with per_pair_x; y row
  // pair), at most T of them. Blocks of expert 0 also zero the y rows of pairs routed to no expert in w.
  const int32_t* experts;   // [n_pairs] global expert ids
  int n_pairs, topk, per_pair_x, expert_start;
  DeviceStatus* status;     // where a token that chose one expert twice is reported
};

// Bytes of staged x at one token: f32 [K], then (over_x: over it, once read) three s8 digit rows [K], each 64 bytes
// after the one before (rows 0 and 1's quads in different banks).
__host__ __device__ constexpr int digit_row_bytes(int K) { return K + 64; }
__host__ __device__ constexpr int x_stage_bytes(int K, bool over_x) {
  return over_x ? (K * 4 > 3 * digit_row_bytes(K) ? K * 4 : 3 * digit_row_bytes(K)) : K * 4 + 3 * digit_row_bytes(K);
}
// kTokens: token r's f16 row of x at r * token_row_bytes(K) (64 bytes apart: neighbouring tokens' quads in different
// banks), then 256 zero bytes.
__host__ __device__ constexpr int token_row_bytes(int K) { return K * 2 + 64; }
__host__ __device__ constexpr int token_stage_bytes(int K, int T) { return T * token_row_bytes(K) + 256; }

// One f32 integer value |v| < 2^23 as three signed base-256 digits d0 * 65536 + d1 * 256 + d2 (d1, d2 in -128..127).
__device__ __forceinline__ void int_digits(float v, int (&d)[3]) {
  const int x = __float2int_rn(v);
  d[2] = static_cast<int8_t>(x & 0xff);
  const int x1 = (x - d[2]) >> 8;
  d[1] = static_cast<int8_t>(x1 & 0xff);
  d[0] = (x1 - d[1]) >> 8;
}

__device__ __forceinline__ float abs_max4(float4 v) { return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))); }

// NormW: void (x as it is), or the addRmsNorm weight's type (float or __nv_bfloat16). kInt8: int8 codes (a chunk
// of 64 columns; lane t's 16 bytes are columns 16 t .. 16 t + 15 of its rows, two s8 k-steps of 32) instead of int4
// (128 columns; each word two f16 k-steps of 16); x is then staged as digit rows in column order.
// kBulk (tiles only): a unit's 1 KiB arrives by bulk copies (one: rows 0-15 of the tile's chunk, where grouped; or
// two of 512 bytes: rows 0-7 and 8-15, or the gate and up halves) into the warp's ring of kRingDepth slots in shared
// memory, each completing on its own mbarrier, in place of the lanes' register ring of kDepth.
// kTokens (no norm): p.T tokens, x's token g as B's column g in f16 (scaled per token by a power of two only where a
// value passes f16's range), so the same mma a unit serves 2..8 tokens; each row's partial sums are then 8 columns
// wide. int8 codes are then unpacked to f16 pairs (as gemv-quant-mma.cu does), not multiplied as s8 digits.
// One pass of the block over its tiles. kExperts: the pass serves the block's expert's pairs from its `first`-th
// (B's columns: at most p.T of them); true where the expert has pairs after them, for a pass of its own.
template <bool kPairs, bool kTiles, typename NormW, bool kInt8 = false, bool kBulk = false, bool kTokens = false,
          bool kPhased = false, bool kExperts = false>
__device__ __forceinline__ bool gemv_one_token_mma_pass(const Params& p, const AddRmsNormInput& norm, int first) {
  static_assert(!kBulk || (kTiles && kInt8), "bulk copies take a unit's rows as two contiguous runs: int8 tiles only");
  static_assert(!kTokens || (!kBulk && std::is_void_v<NormW>), "several tokens: the register ring, x as it is");
  static_assert(!kPhased || kTokens, "K in runs: several tokens only");
  static_assert(!kExperts || (!kPairs && std::is_void_v<NormW>), "experts: plain rows, x as it is");
  constexpr bool kDigits = !kTokens;  // one token: x as s8 digits (below); several tokens: f16
  constexpr int kPartCols = kTokens ? kMaxTokens : 1;  // a row's partial sums: one a token (kTokens), else one
  constexpr int D = kBulk ? kRingDepth : kDepth;
  constexpr int kW = warps_of(kBulk), kT = kW * 32;  // the block's warps and threads
  constexpr int kCols = kInt8 ? 64 : 128;  // columns a chunk
  constexpr int kLoads = 4;                // a lane's 4 words a chunk
  constexpr int kChunkX = kCols / 8;       // 16-byte units of staged x (f16) a chunk
  constexpr int kXLoads = kChunkX / 4;     // kTokens: a lane's 16-byte loads of x a chunk (int4 4, int8 2)
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned x_absmax;
  __shared__ unsigned tok_absmax[kTokens ? kMaxTokens : 1];
  __shared__ float tok_scale[kTokens ? kMaxTokens : 1], tok_unscale[kTokens ? kMaxTokens : 1];
  __shared__ int tok_out_of_range;
  __shared__ int slot_x_row[kExperts ? kMaxTokens : 1], slot_y_row[kExperts ? kMaxTokens : 1], n_slots, n_after;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int K = p.K, nch = K / kCols, G = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const uint8_t* w_base = p.w;
  const uint16_t* s_base = p.scales;
  if constexpr (kExperts) {
    pdl_wait();  // the routing comes from the kernel before: which weights to read depends on it
    const int local = static_cast<int>(blockIdx.y);
    if (warp == 0)
      expert_slots<kMaxTokens>(p.experts, p.n_pairs, p.topk, p.per_pair_x, local + p.expert_start, lane, slot_x_row,
                               slot_y_row, n_slots, p.status, p.T, first, &n_after);
    if (local == 0 && first == 0) {  // rows of pairs routed to experts w does not hold are zero (a warp a pair)
      for (int q = b * kW + warp; q < p.n_pairs; q += G * kW) {
        const int held = p.experts[q] - p.expert_start;
        if (held < 0 || held >= static_cast<int>(gridDim.y))
          for (int n = lane; n < p.N; n += 32) p.y[static_cast<size_t>(q) * p.N + n] = 0.f;
      }
    }
    __syncthreads();
    if (n_slots == 0) return false;  // an expert no pair chose: its weights are not read
    w_base += static_cast<size_t>(local) * p.N * (kInt8 ? K : K / 2);
    s_base += static_cast<size_t>(local) * p.N * p.n_groups;
  }
  const int T = kExperts ? n_slots : p.T;  // B's columns in use (the one-token form: 1)
  // x's row of column c and y's row of token c (kExperts: of the pair in slot c)
  const auto x_row_of = [&](int c) { return kExperts ? slot_x_row[c] : c; };
  const auto y_row_of = [&](int c) { return kExperts ? slot_y_row[c] : c; };
  // kPhased: where T tokens of x do not fit at once, K's chunks in n_phases runs of nch_ph (K_ph columns), the
  // block's tiles once a run, x's columns of the run staged before it. A kernel of its own: in the one-run kernel the
  // runs' code cost 2-3% at Llama-2-7B's batches 2-8 (H100, session 50).
  const int n_phases = kPhased ? p.phases : 1, nch_ph = nch / n_phases, K_ph = K / n_phases;
  int cbase = 0;  // the run's first chunk
  // Block b's tiles are b, b + G, b + 2G, ...: the blocks read neighbouring tiles at once (a layer's int4 GEMVs
  // 2.5% faster than with a contiguous run of tiles a block, H200).
  const int n_tiles = (p.n_tiles - b + G - 1) / G;
  const int n_units = n_tiles * nch_ph;  // a run's
  // The bulk ring without pairs, where a tile's chunks come in whole runs of D: a warp's units are runs of D
  // neighbouring chunks of a tile (D KiB in a row), the runs dealt to the warps in turn, and the ring's first fill is
  // one copy a warp (and a unit one copy); else unit u goes to warp u % kW. Llama-2-7B int8 batch 1 +0.7% on H100
  // against unit u % kW in two copies, where one copy a unit alone lost 0.6% (bench/RESULTS.md, session 69).
  constexpr bool kRunsOfD = kBulk && kTiles && !kPairs && !kTokens && !kExperts && !kPhased;
  const bool grouped = kRunsOfD && nch_ph % D == 0;
  const int n_runs = n_units / D;
  const int my_units = grouped ? (n_runs > warp ? (n_runs - warp + kW - 1) / kW * D : 0)
                               : n_units > warp ? (n_units - warp + kW - 1) / kW : 0;
  // the cursor's step after the done-th unit of the warp (done counted from 1)
  const auto unit_step = [&](int done) { return !grouped ? kW : done % D ? 1 : (kW - 1) * D + 1; };
  const size_t row_bytes = kInt8 ? K : K / 2;

  float* xf = reinterpret_cast<float*>(smem);
  unsigned char* x_stage = smem + (kBulk || kTokens ? 0 : K * 4);  // kBulk: over xf, once it is read
  uint4* zeros = reinterpret_cast<uint4*>(x_stage + p.T * token_row_bytes(K_ph));  // kTokens: B's unused columns
  float* part = reinterpret_cast<float*>(smem + p.part_offset);  // [n_tiles][kW][16]

  // The load cursor: unit (tile lt, chunk lc), and its rows' pointers (lane: rows g and g + 8 at byte 16 t, or a
  // gate row and its up row; rows past N read row N - 1 and are not stored).
  int lt = 0, lc = grouped ? warp * D : warp;
  while (lc >= nch_ph) {
    lc -= nch_ph;
    ++lt;
  }
  // Tiles (quant-tiles.h; rows a multiple of 16, no tile past N): chunk c of the lane's row is 1024 bytes further
  // on than chunk c - 1, and group j's scale 16 scales further on.
  constexpr size_t kChunkStride = kTiles ? kTileBytes : kChunkBytes;
  constexpr int kScaleStride = kTiles ? kTileRows : 1;
  const uint8_t *w_row_lo, *w_row_hi;
  const uint16_t *s_row_lo, *s_row_hi;
  const auto point_rows = [&] {
    const int tile = b + G * lt;
    int r_lo, r_hi;
    if constexpr (kPairs) {
      r_lo = min(tile * 8 + g, p.N - 1);
      r_hi = p.N + r_lo;
    } else {
      r_lo = min(tile * 16 + g, p.N - 1);
      r_hi = min(tile * 16 + 8 + g, p.N - 1);
    }
    if constexpr (kTiles) {  // in 32 bits (a matrix under 4 GiB, gemv_mma): 64-bit offsets took ~50 instructions
      w_row_lo = w_base + tile_code_offset<uint32_t>(r_lo, t * 16, static_cast<uint32_t>(row_bytes));
      w_row_hi = w_base + tile_code_offset<uint32_t>(r_hi, t * 16, static_cast<uint32_t>(row_bytes));
      s_row_lo = s_base + tile_scale_index<uint32_t>(r_lo, 0, p.n_groups);
      s_row_hi = s_base + tile_scale_index<uint32_t>(r_hi, 0, p.n_groups);
    } else {
      w_row_lo = w_base + static_cast<size_t>(r_lo) * row_bytes + t * 16;
      w_row_hi = w_base + static_cast<size_t>(r_hi) * row_bytes + t * 16;
      s_row_lo = s_base + static_cast<size_t>(r_lo) * p.n_groups;
      s_row_hi = s_base + static_cast<size_t>(r_hi) * p.n_groups;
    }
  };
  point_rows();

  // Slot j: 16 bytes of each of the lane's two rows (kBulk: the unit's 1 KiB in the warp's ring) and their bf16
  // scales (kept apart: a combining op right after the loads would wait for them, 5% a layer).
  uint4 w_lo[kBulk ? 1 : D], w_hi[kBulk ? 1 : D];
  uint32_t sc_lo[D], sc_hi[D];
  unsigned char* ring = smem + p.ring_offset + warp * D * kTileBytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + p.ring_offset + kW * D * kTileBytes) + warp * D;
  if constexpr (kBulk) {
    if (lane == 0) {
      for (int j = 0; j < D; ++j) mbar_init(&bars[j]);
      mbar_init_fence();
    }
    __syncwarp();
  }
  uint32_t phases = 0;  // kBulk: bit j is slot j's mbarrier phase parity to wait for
  int loaded = 0;
  const auto load = [&](int j, bool copy = true) {
    if (loaded >= my_units) return;
    if constexpr (kBulk) {
      __syncwarp();  // every lane has read slot j (compute) before it is copied into again
      if (lane == 0 && copy) {  // lane (0, 0)'s pointers start the unit's runs of 8 rows x 64 bytes (quant-tiles.h)
        reads_before_copies();
        mbar_expect_bytes(&bars[j], kTileBytes);
        // grouped: rows 8-15 follow rows 0-7 in the tile's chunk (quant-tiles.h), one copy. Else two runs of 512
        // bytes: the gate and up rows (pairs are never grouped), or rows 0-7 and 8-15 where units are dealt one at a
        // time (one copy lost 0.6% there, session 69).
        if (!grouped) {
          bulk_copy(ring + j * kTileBytes, w_row_lo + (cbase + lc) * kChunkStride, kTileBytes / 2, &bars[j]);
          bulk_copy(ring + j * kTileBytes + kTileBytes / 2, w_row_hi + (cbase + lc) * kChunkStride, kTileBytes / 2,
                    &bars[j]);
        } else {
          bulk_copy(ring + j * kTileBytes, w_row_lo + (cbase + lc) * kChunkStride, kTileBytes, &bars[j]);
        }
      }
    } else {
      w_lo[j] = load_stream(w_row_lo + (cbase + lc) * kChunkStride);
      w_hi[j] = load_stream(w_row_hi + (cbase + lc) * kChunkStride);
    }
    const int gi = (cbase + lc) >> p.group_shift;
    if constexpr (kTiles && !kPairs) {  // rows g and g + 8 side by side: one word, split where it is used
      sc_lo[j] = __ldg(reinterpret_cast<const uint32_t*>(s_row_lo + gi * kScaleStride));
    } else {
      sc_lo[j] = __ldg(s_row_lo + gi * kScaleStride);
      sc_hi[j] = __ldg(s_row_hi + gi * kScaleStride);
    }
    ++loaded;
    lc += unit_step(loaded);
    if (lc >= nch_ph) {
      do {
        lc -= nch_ph;
        ++lt;
      } while (lc >= nch_ph);
      point_rows();
    }
  };
  const int first_chunk = lc, first_tile = lt;
  // grouped: the first fill is one copy of the warp's first run into its D slots, counted on slot 0's barrier; the
  // other slots' first phases complete at once (compute waits on slot 0 before them).
  if (grouped && my_units > 0 && lane == 0) {
    mbar_expect_bytes(&bars[0], D * kTileBytes);
    bulk_copy(ring, w_row_lo + (cbase + lc) * kChunkStride, D * kTileBytes, &bars[0]);
    for (int j = 1; j < D; ++j) mbar_arrive(&bars[j]);
  }
#pragma unroll
  for (int j = 0; j < D; ++j) load(j, !grouped);  // the weights do not depend on the kernel before

  HeldNormWeight<kT, std::conditional_t<std::is_void_v<NormW>, float, NormW>> norm_weight;
  if constexpr (!std::is_void_v<NormW>) norm_weight.load(norm, K);  // a model tensor too

  if constexpr (kTokens)
    for (int i = threadIdx.x; i < 16; i += kT) zeros[i] = make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i < n_tiles * kW * 16 * kPartCols; i += kT)
    part[i] = 0.f;  // warps that skip a tile
  // kTokens: every token unscaled and none past f16's range, until staging finds one (each run's, kPhased)
  const auto reset_token_scales = [&] {
    if (threadIdx.x == 0) tok_out_of_range = 0;
    if (kTokens && threadIdx.x < kMaxTokens) {
      tok_absmax[threadIdx.x] = 0u;
      tok_scale[threadIdx.x] = tok_unscale[threadIdx.x] = 1.f;
    }
  };
  if (threadIdx.x == 0) x_absmax = 0u;
  reset_token_scales();
  __syncthreads();
  if constexpr (!kExperts) pdl_wait();  // x (or norm.y) comes from the kernel before (kExperts: waited for above)

  float x_unscale = 1.f;
  unsigned char* x_digits = x_stage;  // one token: digit row r at r * digit_row_bytes(K)
  // kTokens: each token's row of the run in f16 as it is; where a value passes f16's range (rare), again with each
  // token scaled by a power of two that brings its largest |x| below 2^kXExponent (kPhased: the run's sums are
  // unscaled as they are added to shared memory; else at the end).
  const auto stage_tokens = [&] {
    const int units = K_ph / 8;
    const size_t x_width = static_cast<size_t>(p.gated ? 2 * K : K);
    struct Columns8 {
      float v[8];
    };
    const auto load_unit = [&](int i) {  // columns 8u .. 8u + 7 of token tok
      const int tok = i / units, u = i - tok * units;
      Columns8 c;
      x_columns8(p.x + x_row_of(tok) * x_width + cbase * kCols + 8 * u, K, p.gated, c.v);
      return c;
    };
    const auto stage_unit = [&](int i, float (&v)[8], bool measure) {
      const int tok = i / units, u = i - tok * units;
      float m = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        m = fmaxf(m, fabsf(v[e]));
        v[e] *= tok_scale[tok];
      }
      if (measure) atomicMax(&tok_absmax[tok], __float_as_uint(m));  // non-negative floats order as their bits
      else if (!(m <= 65504.f)) tok_out_of_range = 1;  // (fmaxf passes over a NaN: it reaches y as NaN)
      // columns 8u .. 8u + 7 feed lane quad position tq's load l (int8: in order, int4: pack_x's pairs)
      const int chunk = u / kChunkX, unit = u % kChunkX, l = unit % kXLoads, tq = unit / kXLoads;
      reinterpret_cast<uint4*>(x_stage + tok * token_row_bytes(K_ph))[chunk * kChunkX + l * 4 + tq] =
          pack_x<!kInt8>(v);
    };
    // int8: two units' loads ahead (common.cuh loads_ahead; Llama-2-7B batch 8 +2.6-2.9% on H100, bench/RESULTS.md
    // session 61). int4 through loads_ahead lost 2% at two ahead and 4% at one, so it keeps this loop.
    const auto stage = [&](bool measure) {
      if constexpr (kInt8) {
        loads_ahead<2>(T * units, load_unit, [&](int i, Columns8 c) { stage_unit(i, c.v, measure); });
      } else {
        for (int i = threadIdx.x; i < T * units; i += kT) {
          Columns8 c = load_unit(i);
          stage_unit(i, c.v, measure);
        }
      }
    };
    stage(false);
    __syncthreads();
    if (tok_out_of_range) {
      stage(true);  // (the scales are still 1: this pass only measures)
      __syncthreads();
      if (threadIdx.x < T) {
        const float a = __uint_as_float(tok_absmax[threadIdx.x]);
        int e = 0;
        if (a > 0.f && a < INFINITY) frexpf(a, &e);  // a < 2^e
        if (e > kXExponent) {
          tok_scale[threadIdx.x] = ldexpf(1.f, kXExponent - e);
          tok_unscale[threadIdx.x] = ldexpf(1.f, e - kXExponent);
        }
      }
      __syncthreads();
      stage(false);
      __syncthreads();
    }
  };
  if constexpr (kTokens && !kPhased) {
    stage_tokens();
  } else if constexpr (!kTokens) {  // (kPhased: staged a run at a time, in the loop over the runs below)
    // x (or addRmsNorm's normed row) into xf, and the block's largest |x|.
    const float4* x4 = reinterpret_cast<const float4*>(p.x + x_row_of(0) * static_cast<size_t>(p.gated ? 2 * K : K));
    float4* xf4 = reinterpret_cast<float4*>(xf);
    float m = 0.f;
    if constexpr (std::is_void_v<NormW>) {
      // a load: float4 i of x and, gated, of up
      struct XUp {
        float4 x, up;
      };
      loads_ahead<2>(
          K / 4, [&](int i) { return XUp{x4[i], p.gated ? x4[K / 4 + i] : float4{}}; },
          [&](int i, const XUp& v) {
            const float4 o = p.gated ? make_float4(silu_times(v.x.x, v.up.x), silu_times(v.x.y, v.up.y),
                                                   silu_times(v.x.z, v.up.z), silu_times(v.x.w, v.up.w))
                                     : v.x;
            xf4[i] = o;
            m = fmaxf(m, abs_max4(o));
          });
    } else {
      add_rms_norm_row<kT, NormW>(x4, norm, K, norm_weight, [&](int i, float4 o) {
        xf4[i] = o;
        m = fmaxf(m, abs_max4(o));
      });
    }
    m = warp_max(m);
    if (lane == 0) atomicMax(&x_absmax, __float_as_uint(m));  // non-negative floats order as their bits
    __syncthreads();
    const float absmax = __uint_as_float(x_absmax);
    int e = 0;
    if (absmax > 0.f && absmax < INFINITY) frexpf(absmax, &e);  // absmax < 2^e
    const int shift = absmax > 0.f && absmax < INFINITY ? min(126, kXExponentDigits - e) : 0;
    const float x_scale = ldexpf(1.f, shift);
    x_unscale = ldexpf(1.f, -shift);
    // Three digit rows, written a unit of columns at a time. int8: columns 4u .. 4u + 3 are word u of each row.
    // int4: columns 8u .. 8u + 7 are word u % 16 of a lane's 16 bytes in chunk u / 16 (quad position t = u % 16 / 4,
    // its word u % 4); that word's even columns (low nibbles) are one k-step's 4 bytes and its odd columns another's
    // (compute below), so a digit row keeps a chunk's even columns in its first 64 bytes, in the lanes' word order,
    // and the odd columns in the next 64. kBulk writes the digits over f32 x (the room the ring needs at K = 11008 -
    // 14336), so every thread reads its columns of x first.
    constexpr int kUnitCols = kInt8 ? 4 : 8, kUnitF4 = kUnitCols / 4;
    const auto write_digits = [&](int u, const float4 (&v)[kUnitF4]) {
      uint32_t even[3] = {0u, 0u, 0u}, odd[3] = {0u, 0u, 0u};  // int8: the word in `even`
#pragma unroll
      for (int k = 0; k < kUnitCols; ++k) {
        int d[3];
        int_digits((&v[k / 4].x)[k % 4] * x_scale, d);
#pragma unroll
        for (int r = 0; r < 3; ++r) {
          const uint32_t byte = static_cast<uint32_t>(d[r]) & 0xffu;
          if (kInt8) even[r] |= byte << (8 * k);
          else (k & 1 ? odd : even)[r] |= byte << (4 * (k & 6));
        }
      }
      const int at = kInt8 ? u : (u >> 4) * 32 + (u & 15);  // the (even) word's index in a digit row
#pragma unroll
      for (int r = 0; r < 3; ++r) {
        uint32_t* row = reinterpret_cast<uint32_t*>(x_digits + r * digit_row_bytes(K));
        row[at] = even[r];
        if (!kInt8) row[at + 16] = odd[r];
      }
    };
    const int n_units = K / kUnitCols;
    if constexpr (kBulk) {
      constexpr int kPerThread = kMaxK / kUnitCols / kT;
      float4 xv[kPerThread][kUnitF4];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (const int u = threadIdx.x + i * kT; u < n_units)
#pragma unroll
          for (int h = 0; h < kUnitF4; ++h) xv[i][h] = xf4[u * kUnitF4 + h];
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i)
        if (const int u = threadIdx.x + i * kT; u < n_units) write_digits(u, xv[i]);
    } else {
      for (int u = threadIdx.x; u < n_units; u += kT) {
        float4 v[kUnitF4];
#pragma unroll
        for (int h = 0; h < kUnitF4; ++h) v[h] = xf4[u * kUnitF4 + h];
        write_digits(u, v);
      }
    }
    __syncthreads();
  }

  // This lane's B fragments: column g of B, digit row g (g < 3; lanes g >= 3 read row 2 as well: their columns of
  // the sums are weighed 0 below, so they need no zeros or predicates); kTokens: token g's row (g < T) or zero.
  const bool x_column = g < T;  // kTokens
  const uint4* x_token = reinterpret_cast<const uint4*>(x_stage + g * token_row_bytes(K_ph));
  const uint4* xb_lane = kDigits ? reinterpret_cast<const uint4*>(x_digits + min(g, 2) * digit_row_bytes(K)) + t
                                 : (x_column ? x_token : zeros) + t;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int isum[4] = {0, 0, 0, 0};  // one token: the exact s32 sums since the last flush, columns 2t and 2t + 1
  // One token: column c's sum weighs 256^(2 - c): lane t = 0 holds digits 0 and 1, t = 1 digit 2 (its column 3, and
  // lanes t = 2, 3's columns, are not x's: weighed 0). Each lane keeps its rows' part in acc; lanes t and t ^ 1 add
  // theirs once a tile, when the warp leaves it.
  constexpr float kUnit = kInt8 ? 1.f : 1.f / 16;  // int4's codes are 16 times the weights (compute)
  const float digit_w0 = t == 0 ? 65536.f * kUnit : t == 1 ? kUnit : 0.f, digit_w1 = t == 0 ? 256.f * kUnit : 0.f;
  const auto add_digit_sums = [&](const int (&v)[4], float s_lo, float s_hi) {
    acc[0] = fmaf(s_lo, fmaf(static_cast<float>(v[0]), digit_w0, static_cast<float>(v[1]) * digit_w1), acc[0]);
    acc[2] = fmaf(s_hi, fmaf(static_cast<float>(v[2]), digit_w0, static_cast<float>(v[3]) * digit_w1), acc[2]);
  };
  int ct = first_tile, cc = first_chunk, used = 0;
  const auto scales_of = [&](int j, float& s_lo, float& s_hi) {
    s_lo = __uint_as_float(sc_lo[j] << 16);
    if constexpr (kTiles && !kPairs)  // tiles: rows g and g + 8's scales share a word (quant-tiles.h)
      s_hi = __uint_as_float(sc_lo[j] & 0xffff0000u);
    else
      s_hi = __uint_as_float(sc_hi[j] << 16);
  };
  const auto compute = [&](int j) {
    float s_lo, s_hi;
    scales_of(j, s_lo, s_hi);
    uint4 wl, wh;
    if constexpr (kBulk) {
      mbar_wait(&bars[j], (phases >> j) & 1u);
      phases ^= 1u << j;
      wl = *reinterpret_cast<const uint4*>(ring + j * kTileBytes + g * kChunkBytes + t * 16);
      wh = *reinterpret_cast<const uint4*>(ring + j * kTileBytes + kTileBytes / 2 + g * kChunkBytes + t * 16);
      load(j);  // the slot again, as soon as it is read
    } else {
      wl = w_lo[j];
      wh = w_hi[j];
    }
    if constexpr (kDigits && kInt8) {
      // The lane's 16 bytes of each row are columns 16 t .. 16 t + 15 of the chunk: words 0-1 are one k-step's A
      // (columns 4 t .. and 16 + 4 t .. of its 32), words 2-3 the next's; B is the same columns of the digit row.
      const uint4 bx = xb_lane[cc * 4];
      mma_16832_s8(isum, wl.x, wh.x, wl.y, wh.y, bx.x, bx.y);
      mma_16832_s8(isum, wl.z, wh.z, wl.w, wh.w, bx.z, bx.w);
    } else if constexpr (kDigits) {
      // int4: the lane's 16 bytes of each row are columns 32 t .. 32 t + 31, word i columns 32 t + 8 i ..; its odd
      // columns (high nibbles) are 16 (code - 8) as s8 bytes with one lop3, its even ones the same once shifted up,
      // so 4 s8 k-steps take the unit (even words 0-1, 2-3, odd words 0-1, 2-3) and each sum is 16 times the
      // weights' (taken out at the flush). B: the digit row's even columns (staged in the lanes' word order), then
      // its odd ones, 64 bytes on. A unit's sums start from zero (the mma's C), so in groups (a unit each) they need
      // no clearing.
      const uint4 be = xb_lane[cc * 8], bo = xb_lane[cc * 8 + 4];
      uint32_t el[4], eh[4], ol[4], oh[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        el[i] = int4_as_s8_times16((&wl.x)[i] << 4);
        eh[i] = int4_as_s8_times16((&wh.x)[i] << 4);
        ol[i] = int4_as_s8_times16((&wl.x)[i]);
        oh[i] = int4_as_s8_times16((&wh.x)[i]);
      }
      int unit_sum[4] = {0, 0, 0, 0};
      mma_16832_s8(unit_sum, el[0], eh[0], el[1], eh[1], be.x, be.y);
      mma_16832_s8(unit_sum, el[2], eh[2], el[3], eh[3], be.z, be.w);
      mma_16832_s8(unit_sum, ol[0], oh[0], ol[1], oh[1], bo.x, bo.y);
      mma_16832_s8(unit_sum, ol[2], oh[2], ol[3], oh[3], bo.z, bo.w);
      if (p.group_shift != 30) {
        add_digit_sums(unit_sum, s_lo, s_hi);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) isum[i] += unit_sum[i];
      }
    } else {
      const uint4* xb = xb_lane + (x_column ? cc * kChunkX : 0);  // the zero lanes read one place
      float pa[4] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (kInt8) {  // several tokens: word s (columns 16 t + 4 s ..) one f16 k-step, as gemv-quant-mma.cu
#pragma unroll
        for (int l = 0; l < 2; ++l) {
          const uint4 bx = xb[l * 4];
#pragma unroll
          for (int s2 = 0; s2 < 2; ++s2) {
            uint32_t lo01, lo23, hi01, hi23;
            unpack_int8((&wl.x)[2 * l + s2], lo01, lo23);
            unpack_int8((&wh.x)[2 * l + s2], hi01, hi23);
            mma_16816(pa, lo01, hi01, lo23, hi23, s2 ? bx.z : bx.x, s2 ? bx.w : bx.y);
          }
        }
      } else {
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
          const uint4 bx = xb[l * 4];
          uint32_t lo[4], hi[4];  // word l: two k-steps
          unpack_int4((&wl.x)[l], lo);
          unpack_int4((&wh.x)[l], hi);
          mma_16816(pa, lo[0], hi[0], lo[1], hi[1], bx.x, bx.y);
          mma_16816(pa, lo[2], hi[2], lo[3], hi[3], bx.z, bx.w);
        }
      }
      acc[0] = fmaf(s_lo, pa[0], acc[0]);
      acc[1] = fmaf(s_lo, pa[1], acc[1]);
      acc[2] = fmaf(s_hi, pa[2], acc[2]);
      acc[3] = fmaf(s_hi, pa[3], acc[3]);
    }
    const int tile = ct;
    cc += unit_step(used + 1);
    while (cc >= nch_ph) {
      cc -= nch_ph;
      ++ct;
    }
    ++used;
    const bool leaving = ct != tile || used == my_units;
    if constexpr (kDigits) {
      // One scale a row keeps the s32 sums for the whole tile; groups take theirs at every chunk (int4: above).
      if (kInt8 ? leaving || p.group_shift != 30 : leaving && p.group_shift == 30) {
        add_digit_sums(isum, s_lo, s_hi);
        isum[0] = isum[1] = isum[2] = isum[3] = 0;
      }
    }
    if (leaving && kPhased) {  // leaving the tile: rows g and g + 8, tokens 2t and 2t + 1, added to shared memory
      float* pp = part + (tile * kW + warp) * 16 * kPartCols;
      const float u0 = tok_unscale[min(2 * t, kPartCols - 1)], u1 = tok_unscale[min(2 * t + 1, kPartCols - 1)];
      pp[g * kPartCols + 2 * t] += acc[0] * u0;
      pp[g * kPartCols + 2 * t + 1] += acc[1] * u1;
      pp[(g + 8) * kPartCols + 2 * t] += acc[2] * u0;
      pp[(g + 8) * kPartCols + 2 * t + 1] += acc[3] * u1;
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    } else if (leaving && kTokens) {  // leaving the tile: rows g and g + 8, tokens 2t and 2t + 1, to shared memory
      float* pp = part + (tile * kW + warp) * 16 * kPartCols;
      pp[g * kPartCols + 2 * t] = acc[0];
      pp[g * kPartCols + 2 * t + 1] = acc[1];
      pp[(g + 8) * kPartCols + 2 * t] = acc[2];
      pp[(g + 8) * kPartCols + 2 * t + 1] = acc[3];
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    } else if (leaving) {  // leaving the tile: rows g and g + 8, lanes t and t ^ 1's parts, to shared memory
      const float lo = acc[0] + __shfl_xor_sync(0xffffffffu, acc[0], 1);
      const float hi = acc[2] + __shfl_xor_sync(0xffffffffu, acc[2], 1);
      if (t == 0) {
        float* pp = part + (tile * kW + warp) * 16;
        pp[g] = lo;
        pp[g + 8] = hi;
      }
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    }
  };
  if constexpr (kBulk) {
    run_ring<D>(my_units, compute, [](int) {});  // compute refills its slot
  } else if constexpr (kPhased) {
    for (int ph = 0; ph < n_phases; ++ph) {
      if (ph > 0) {
        // The next run: its first units' weights before the wait for every warp's sums of the last one, then its x.
        cbase = ph * nch_ph;
        lt = 0, lc = first_chunk;
        point_rows();
        loaded = 0;
#pragma unroll
        for (int j = 0; j < D; ++j) load(j);
        ct = first_tile, cc = first_chunk, used = 0;
        __syncthreads();  // the last run's x is read and its sums are in shared memory
        reset_token_scales();
        __syncthreads();
      }
      stage_tokens();
      run_ring<D>(my_units, compute, load);
    }
  } else {
    run_ring<D>(my_units, compute, load);
  }
  __syncthreads();

  // Each row's 16 warp partials (kTokens: a token's), in warp order.
  const auto row_sum = [&](int tl, int r, int tok) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) s += part[((tl * kW + w) * 16 + r) * kPartCols + tok];
    return kPhased ? s : s * (kTokens ? tok_unscale[tok] : x_unscale);  // kPhased: unscaled as each run was added
  };
  if constexpr (kTokens) {  // the token fastest, so that a warp's partial sums are consecutive words
    for (int i = threadIdx.x; i < n_tiles * 16 * T; i += kT) {
      const int tok = i % T, ir = i / T, tl = ir >> 4, r = ir & 15, tile = b + G * tl;
      float* y = p.y + static_cast<size_t>(y_row_of(tok)) * p.N;
      if constexpr (kPairs) {
        const int out = tile * 8 + r;
        if (r < 8 && out < p.N) y[out] = silu_times(row_sum(tl, r, tok), row_sum(tl, r + 8, tok));
      } else {
        const int row = tile * 16 + r;
        if (row < p.N) y[row] = row_sum(tl, r, tok);
      }
    }
  } else {
    float* y = p.y + static_cast<size_t>(y_row_of(0)) * p.N;
    for (int i = threadIdx.x; i < n_tiles * 16; i += kT) {
      const int tl = i >> 4, r = i & 15, tile = b + G * tl;
      if constexpr (kPairs) {
        const int out = tile * 8 + r;
        if (r < 8 && out < p.N) y[out] = silu_times(row_sum(tl, r, 0), row_sum(tl, r + 8, 0));
      } else {
        const int row = tile * 16 + r;
        if (row < p.N) y[row] = row_sum(tl, r, 0);
      }
    }
  }
  return kExperts && n_after > 0;
}

template <bool kPairs, bool kTiles, typename NormW, bool kInt8 = false, bool kBulk = false, bool kTokens = false,
          bool kPhased = false, bool kExperts = false>
__global__ void __launch_bounds__(warps_of(kBulk) * 32, 1)
    gemv_one_token_mma_kernel(const Params p, const AddRmsNormInput norm) {
  pdl_trigger();
  gemv_one_token_mma_pass<kPairs, kTiles, NormW, kInt8, kBulk, kTokens, kPhased, kExperts>(p, norm, 0);
}

// Experts at more tokens than B has columns (9..64): an expert that more than 8 pairs chose is read again by the
// same block for its next 8, once its shared memory is free. A kernel of its own: the loop cost the one-pass kernel
// 1-3% of Mixtral's batch 1 and 8 (H100, session 52).
template <bool kTiles, bool kInt8, bool kPhased>
__global__ void __launch_bounds__(kThreads, 1) gemv_experts_passes_kernel(const Params p, const AddRmsNormInput norm) {
  pdl_trigger();
  for (int first = 0; gemv_one_token_mma_pass<false, kTiles, void, kInt8, false, true, kPhased, true>(p, norm, first);
       first += p.T)
    __syncthreads();
}

// The shared memory a block may ask for on this GPU, up to kMaxSmemBytes (asked once: a process drives one kind of
// GPU); a shape that needs more is refused.
int smem_limit() {
  static const int limit = [] {
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      return 0;
    return std::min(optin - 1024, static_cast<int>(kMaxSmemBytes));  // 1 KiB: the static variables
  }();
  return limit;
}

template <bool kPairs, bool kTiles, typename NormW, bool kInt8, bool kBulk, bool kTokens = false, bool kPhased = false,
          bool kExperts = false, bool kPasses = false>
void launch(const Ctx& ctx, const Params& p, const AddRmsNormInput& norm, dim3 grid, int smem) {
  static_assert(!kPasses || (kExperts && kTokens), "passes: experts at several tokens");
  const auto kernel = [] {
    if constexpr (kPasses) return gemv_experts_passes_kernel<kTiles, kInt8, kPhased>;
    else return gemv_one_token_mma_kernel<kPairs, kTiles, NormW, kInt8, kBulk, kTokens, kPhased, kExperts>;
  }();
  static bool smem_set = false;  // per instantiation
  if (!smem_set) {
    check_cuda(ctx.st, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit()),
               "matmul", " (cudaFuncSetAttribute)");
    smem_set = true;
  }
  launch_pdl(ctx, kernel, grid, dim3(warps_of(kBulk) * 32), static_cast<size_t>(smem), p, norm);
}

template <bool kPairs, bool kTiles, bool kInt8, bool kBulk>
void launch_norm(const Ctx& ctx, const Params& p, const AddRmsNormInput* norm, dim3 grid, int smem) {
  if (!norm) launch<kPairs, kTiles, void, kInt8, kBulk>(ctx, p, AddRmsNormInput{}, grid, smem);
  else if (norm->weight_bf16) launch<kPairs, kTiles, __nv_bfloat16, kInt8, kBulk>(ctx, p, *norm, grid, smem);
  else launch<kPairs, kTiles, float, kInt8, kBulk>(ctx, p, *norm, grid, smem);
}

template <bool kInt8, bool kPhased>
void launch_tokens(const Ctx& ctx, const Params& p, bool pairs, bool tiles, dim3 grid, int smem) {
  const AddRmsNormInput none{};
  if (pairs && tiles) launch<true, true, void, kInt8, false, true, kPhased>(ctx, p, none, grid, smem);
  else if (pairs) launch<true, false, void, kInt8, false, true, kPhased>(ctx, p, none, grid, smem);
  else if (tiles) launch<false, true, void, kInt8, false, true, kPhased>(ctx, p, none, grid, smem);
  else launch<false, false, void, kInt8, false, true, kPhased>(ctx, p, none, grid, smem);
}

template <bool kPairs, bool kTiles>
void launch_format(const Ctx& ctx, const Params& p, const AddRmsNormInput* norm, dim3 grid, int smem, bool int8) {
  if (int8) launch_norm<kPairs, kTiles, true, false>(ctx, p, norm, grid, smem);
  else launch_norm<kPairs, kTiles, false, false>(ctx, p, norm, grid, smem);
}

// Experts: no norm; one token (x's digits; int8 tiles by bulk copies), or 2..8 columns of pairs
// (passes: more tokens than that, an expert's pairs 8 at a time).
template <bool kInt8, bool kTiles>
void launch_experts(const Ctx& ctx, const Params& p, bool tokens, bool phased, bool bulk, bool passes, dim3 grid,
                    int smem) {
  const AddRmsNormInput none{};
  if (phased && passes) launch<false, kTiles, void, kInt8, false, true, true, true, true>(ctx, p, none, grid, smem);
  else if (passes) launch<false, kTiles, void, kInt8, false, true, false, true, true>(ctx, p, none, grid, smem);
  else if (phased) launch<false, kTiles, void, kInt8, false, true, true, true>(ctx, p, none, grid, smem);
  else if (tokens) launch<false, kTiles, void, kInt8, false, true, false, true>(ctx, p, none, grid, smem);
  else if constexpr (kInt8 && kTiles) {
    if (bulk) launch<false, true, void, true, true, false, false, true>(ctx, p, none, grid, smem);
    else launch<false, true, void, true, false, false, false, true>(ctx, p, none, grid, smem);
  } else {
    launch<false, kTiles, void, kInt8, false, false, false, true>(ctx, p, none, grid, smem);
  }
}

void launch_experts_format(const Ctx& ctx, const Params& p, bool int8, bool tiles, bool tokens, bool phased, bool bulk,
                           bool passes, dim3 grid, int smem) {
  if (int8 && tiles) launch_experts<true, true>(ctx, p, tokens, phased, bulk, passes, grid, smem);
  else if (int8) launch_experts<true, false>(ctx, p, tokens, phased, bulk, passes, grid, smem);
  else if (tiles) launch_experts<false, true>(ctx, p, tokens, phased, bulk, passes, grid, smem);
  else launch_experts<false, false>(ctx, p, tokens, phased, bulk, passes, grid, smem);
}

}  // namespace

bool quant_tiles_pay(DType dtype, int64_t rows, int64_t K, int64_t group) {
  const bool int4 = dtype == DType::I4;
  if ((!int4 && dtype != DType::I8) || K > kMaxK || !quant_tiles_take(rows, K, group, int4)) return false;
  // int8 per channel alone: the form measured and tested on a GPU (session 45); int8 in groups stays row-major.
  return group == K || (int4 && group % 128 == 0 && log2_exact(static_cast<int>(group / 128)) >= 0);
}

namespace {

bool gemv_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
              float* y, int T, int N, int K, bool pairs, int sms, const AddRmsNormInput* norm, bool tiles, bool gated,
              const ExpertRows* ex = nullptr) {
  // B's columns: T tokens; experts: up to 8 of an expert's pairs a pass (the kernel's loop takes the rest)
  const int cols_T = ex ? std::min(T, kMaxTokens) : T;
  const bool int8 = w_dtype == DType::I8, tokens = cols_T > 1;
  if ((w_dtype != DType::I4 && !int8) || (gated && (pairs || norm))) return false;
  if (T < 1 || (!ex && T > kMaxTokens) || (tokens && norm)) return false;
  // experts in tiles: N a multiple of 16, so that expert e's rows start tile e N / 16
  if (ex && (pairs || norm || (tiles && N % kTileRows != 0) || ex->n_local < 1 || ex->n_local > 65535 ||
             ex->topk < 1 || ex->n_pairs != static_cast<long long>(T) * ex->topk ||
             static_cast<long long>(ex->n_pairs) * N > INT32_MAX))
    return false;
  if (tiles && !quant_tiles_take(static_cast<long long>(N) * (pairs ? 2 : 1), K, group, !int8)) return false;
  if (tiles && pairs && N % 8 != 0) return false;  // the up rows' halves start at a tile's row 0 or 8
  // tiles: the lanes' offsets in 32 bits (an expert's matrix under 4 GiB)
  if (tiles && static_cast<long long>(N) * (pairs ? 2 : 1) * (int8 ? K : K / 2) >= (1ll << 32)) return false;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int cols = int8 ? 64 : 128;  // a chunk
  if (N <= 0 || K <= 0 || K % cols != 0 || K > kMaxK || !scales || group <= 0 || K % group != 0 ||
      group % cols != 0 || (pairs && N > INT32_MAX / 2) || !aligned(x) || !aligned(w) || sms <= 0)
    return false;
  const int group_shift = group == K ? 30 : log2_exact(group / cols);
  if (group_shift < 0) return false;
  if (norm && !held_norm_takes(*norm, K)) return false;
  const int n_tiles = pairs ? (N + 7) / 8 : (N + 15) / 16;
  const unsigned n_experts = ex ? static_cast<unsigned>(ex->n_local) : 1u;  // the grid's y: a block's expert
  const auto part_bytes_of = [&](int grid, int warps = kWarps) {
    return static_cast<size_t>((n_tiles + grid - 1) / grid) * warps * 16 * (tokens ? kMaxTokens : 1) * sizeof(float);
  };
  // Experts: the experts a step's pairs choose share the SMs (a wave of blocks where they fit: Mixtral's 2 of 8 at
  // one token), else a block a SM for each.
  int grid = std::min(n_tiles, sms);
  if (ex) {
    const int chosen = std::min(ex->n_pairs, ex->n_local);
    const int shared = std::min(n_tiles, (sms + chosen - 1) / chosen);
    // the partial sums alone: for 2..8 tokens within half the block's shared memory, x's rows taking the rest (the
    // tokens form checks the two together below)
    const auto fits_alone = [&](int G) {
      return part_bytes_of(G) <= (tokens ? static_cast<size_t>(smem_limit()) / 2 : kMaxPartBytes);
    };
    grid = fits_alone(shared) ? shared : grid;
  }
  size_t part_bytes = part_bytes_of(grid);  // the register ring's warps (the bulk-copy ring's: below)
  const dim3 g(static_cast<unsigned>(grid), n_experts);
  Params p{x, static_cast<const uint8_t*>(w), scales, y, N, K, K / group, group_shift, n_tiles, 0, 0, gated ? 1 : 0,
           cols_T, 1};
  if (ex) set_expert_rows(p, *ex);
  if (tokens) {  // x's tokens in f16 rows (a run of K's chunks at a time where all of K does not fit), then the sums
    const int nch = K / cols;
    int phases = 1;
    const auto staged = [&](int ph) { return static_cast<size_t>(token_stage_bytes(K / ph, cols_T) + 15) / 16 * 16; };
    const auto fits = [&](int ph) {
      return nch % ph == 0 && staged(ph) + part_bytes <= static_cast<size_t>(smem_limit());
    };
    while (phases <= kMaxPhases && !fits(phases)) phases *= 2;
    if (phases > kMaxPhases) return false;
    p.part_offset = static_cast<int>(staged(phases));
    p.phases = phases;
    const int smem = static_cast<int>(p.part_offset + part_bytes);
    if (ex) launch_experts_format(ctx, p, int8, tiles, true, phases > 1, false, T > cols_T, g, smem);
    else if (phases > 1 && int8) launch_tokens<true, true>(ctx, p, pairs, tiles, g, smem);
    else if (phases > 1) launch_tokens<false, true>(ctx, p, pairs, tiles, g, smem);
    else if (int8) launch_tokens<true, false>(ctx, p, pairs, tiles, g, smem);
    else launch_tokens<false, false>(ctx, p, pairs, tiles, g, smem);
    return true;
  }
  // int8 tiles take the bulk-copy ring where it fits after x's digits (over f32 x) and the partial sums (H100
  // session 46: int4 gained nothing from it; session 53, on s8 tensor cores: batch 1 5-8% slower).
  const size_t bulk_part_bytes = part_bytes_of(grid, kBulkWarps);
  const size_t ring_offset = (x_stage_bytes(K, true) + bulk_part_bytes + 127) / 128 * 128;
  const size_t ring_end = ring_offset + static_cast<size_t>(kBulkWarps) * kRingDepth * (kTileBytes + sizeof(uint64_t));
  const bool bulk = tiles && int8 && bulk_part_bytes <= kMaxPartBytes && ring_end <= static_cast<size_t>(smem_limit());
  if (bulk) part_bytes = bulk_part_bytes;
  p.part_offset = x_stage_bytes(K, bulk);
  p.ring_offset = static_cast<int>(ring_offset);
  if (part_bytes > kMaxPartBytes || p.part_offset + part_bytes > static_cast<size_t>(smem_limit())) return false;
  // The bulk kernel asks for all the shared memory: with only what it uses, the rope and decode attention were
  // placed on its SMs and ran 2.5-3.3x longer there (the header; H100, the step 3.311 ms against 3.182).
  const int smem = bulk ? smem_limit() : static_cast<int>(p.part_offset + part_bytes);
  if (ex) launch_experts_format(ctx, p, int8, tiles, false, false, bulk, false, g, smem);
  else if (bulk && pairs) launch_norm<true, true, true, true>(ctx, p, norm, g, smem);
  else if (bulk) launch_norm<false, true, true, true>(ctx, p, norm, g, smem);
  else if (pairs && tiles) launch_format<true, true>(ctx, p, norm, g, smem, int8);
  else if (pairs) launch_format<true, false>(ctx, p, norm, g, smem, int8);
  else if (tiles) launch_format<false, true>(ctx, p, norm, g, smem, int8);
  else launch_format<false, false>(ctx, p, norm, g, smem, int8);
  return true;
}

}  // namespace

bool gemv_one_token_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                        int group, float* y, int N, int K, bool pairs, int sms, const AddRmsNormInput* norm,
                        bool tiles, bool gated) {
  return gemv_mma(ctx, x, w, w_dtype, scales, group, y, 1, N, K, pairs, sms, norm, tiles, gated);
}

bool gemv_tokens_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales, int group,
                     float* y, int T, int N, int K, bool pairs, int sms, bool tiles, bool gated) {
  return T > 1 && gemv_mma(ctx, x, w, w_dtype, scales, group, y, T, N, K, pairs, sms, nullptr, tiles, gated);
}

bool gemv_experts_mma(const Ctx& ctx, const float* x, const void* w, DType w_dtype, const uint16_t* scales,
                      int group, float* y, int T, int N, int K, const ExpertRows& ex, int sms, bool gated,
                      bool tiles) {
  return gemv_mma(ctx, x, w, w_dtype, scales, group, y, T, N, K, false, sms, nullptr, tiles, gated, &ex);
}

}  // namespace weft::cuda
