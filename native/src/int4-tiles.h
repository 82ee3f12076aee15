// int4 weights in tiles: a layout of a quantized [rows, K] int4 matrix (gemv.cuh QuantMatrix's codes, two a byte,
// and bf16 scales per group of columns) in which a warp's loads are contiguous.
//   Why: the one-token int4 GEMV on tensor cores (gemv-one-token-mma.cu) gives lane (g, t) 16 bytes of rows g and
//   g + 8 of a 16-row tile at byte 16 t of a 64-byte chunk (the mma.sync A layout), so in row-major codes one warp
//   load touches 8 rows (8 lines of 128 bytes for 512 bytes), and its scale loads 16 rows' lines more. With no
//   arithmetic at all those loads reach 62% of the read bandwidth on H200 (bench/RESULTS.md, session 34), while a
//   bare contiguous read reaches ~100%; a timing-only test of 512 contiguous bytes a load took ~10% off the kernel
//   (session 27).
//   - Codes: the 16 rows x 64 bytes (128 columns) of tile i, chunk c are 1024 contiguous bytes, row by row, tiles in
//     row order and each tile's chunks in column order: a warp's load of rows g (or g + 8) is 512 contiguous bytes.
//   - Scales: tile i's 16 scales of group j are 32 contiguous bytes, rows r and r + 8 side by side (r < 8), so a
//     lane's two scales are one 4-byte word and a warp's are one line.
// rows must be a multiple of 16 (every Llama, Mistral and Mixtral projection and its TP shards are) and K of 128.
#pragma once

#include <cstddef>

#include "host-device.h"

namespace weft {

constexpr int kInt4TileRows = 16;
constexpr int kInt4TileChunkBytes = 64;  // 128 columns of a row
constexpr int kInt4TileBytes = kInt4TileRows * kInt4TileChunkBytes;

WEFT_HD bool int4_tiles_take(long long rows, long long K, long long group) {
  return rows > 0 && rows % kInt4TileRows == 0 && K > 0 && K % 128 == 0 && group > 0 && K % group == 0;
}

// Where byte `byte` of row `row` (its columns 2 byte and 2 byte + 1) of the row-major codes (row_bytes = K / 2) lies
// in the tiled codes.
WEFT_HD size_t int4_tile_code_offset(size_t row, size_t byte, size_t row_bytes) {
  const size_t tile = row / kInt4TileRows, chunk = byte / kInt4TileChunkBytes;
  return (tile * (row_bytes / kInt4TileChunkBytes) + chunk) * kInt4TileBytes + (row % kInt4TileRows) * kInt4TileChunkBytes +
         byte % kInt4TileChunkBytes;
}

// Where scale [row, group] of the row-major scales [rows, n_groups] lies in the tiled scales.
WEFT_HD size_t int4_tile_scale_index(size_t row, size_t group, size_t n_groups) {
  return ((row / kInt4TileRows) * n_groups + group) * kInt4TileRows + (row % 8) * 2 + (row % kInt4TileRows) / 8;
}

}  // namespace weft
