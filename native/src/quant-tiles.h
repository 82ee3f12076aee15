// Quantized weights in tiles: a layout of a [rows, K] int4 or int8 matrix (gemv.cuh QuantMatrix's codes, two or one
// a byte, and bf16 scales per group of columns) in which a warp's loads are contiguous.
//   Why: the tensor-core GEMVs (gemv-one-token-mma.cu, gemv-quant-mma.cu) give lane (g, t) 16 bytes of rows g and
//   g + 8 of a 16-row tile at byte 16 t of a 64-byte chunk (the mma.sync A layout), so in row-major codes one warp
//   load touches 8 rows (8 lines of 128 bytes for 512 bytes), and its scale loads 16 rows' lines more. With no
//   arithmetic at all the int4 loads reach 62% of the read bandwidth on H200 (bench/RESULTS.md, session 34), while a
//   bare contiguous read reaches ~100%; a timing-only test of 512 contiguous bytes a load took ~10% off the int4
//   kernel (session 27).
//   - Codes: the 16 rows x 64 bytes (128 int4 or 64 int8 columns) of tile i, chunk c are 1024 contiguous bytes, row by
//     row, tiles in row order and each tile's chunks in column order: a warp's load of rows g (or g + 8) is 512
//     contiguous bytes.
//   - Scales: tile i's 16 scales of group j are 32 contiguous bytes, rows r and r + 8 side by side (r < 8), so a
//     lane's two scales are one 4-byte word and a warp's are one line.
// rows must be a multiple of 16 (every Llama, Mistral and Mixtral projection and its TP shards are) and a row's bytes
// of 64.
#pragma once

#include <cstddef>

#include "host-device.h"

namespace weft {

constexpr int kTileRows = 16;
constexpr int kTileChunkBytes = 64;
constexpr int kTileBytes = kTileRows * kTileChunkBytes;

// Whether a [rows, K] matrix of int4 (else int8) codes in groups of `group` columns fits tiles.
WEFT_HD bool quant_tiles_take(long long rows, long long K, long long group, bool int4) {
  const long long row_bytes = int4 ? K / 2 : K;
  return rows > 0 && rows % kTileRows == 0 && K > 0 && (!int4 || K % 2 == 0) && row_bytes % kTileChunkBytes == 0 &&
         group > 0 && K % group == 0;
}

// Where byte `byte` of row `row` of the row-major codes (row_bytes a row) lies in the tiled codes. I: the integer
// type of the arithmetic (the one-token GEMV's per-lane pointers take 32 bits: a matrix under 4 GiB, checked at
// launch).
// (The arguments do not deduce I: a call without one computes in size_t whatever its arguments' types.)
template <typename T> struct NotDeduced { using type = T; };
template <typename I = size_t>
WEFT_HD I tile_code_offset(typename NotDeduced<I>::type row, typename NotDeduced<I>::type byte,
                           typename NotDeduced<I>::type row_bytes) {
  const I tile = row / kTileRows, chunk = byte / kTileChunkBytes;
  return (tile * (row_bytes / kTileChunkBytes) + chunk) * kTileBytes + (row % kTileRows) * kTileChunkBytes +
         byte % kTileChunkBytes;
}

// Where scale [row, group] of the row-major scales [rows, n_groups] lies in the tiled scales.
template <typename I = size_t>
WEFT_HD I tile_scale_index(typename NotDeduced<I>::type row, typename NotDeduced<I>::type group,
                           typename NotDeduced<I>::type n_groups) {
  return ((row / kTileRows) * n_groups + group) * kTileRows + (row % 8) * 2 + (row % kTileRows) / 8;
}

}  // namespace weft
