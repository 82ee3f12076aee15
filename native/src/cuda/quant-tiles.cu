// repack_quant_tiles (quant-tiles.cuh): one thread a 16-byte word of codes (a word never straddles a 64-byte chunk,
// so it moves whole), then one a scale.
#include "cuda/quant-tiles.cuh"

#include "cuda/common.cuh"
#include "error.h"
#include "quant-tiles.h"

namespace weft::cuda {
namespace {

__global__ void repack_codes_kernel(const uint4* __restrict__ codes, uint8_t* __restrict__ tiled, int64_t rows,
                                    int64_t row_bytes) {
  const int64_t words = rows * (row_bytes / 16);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / (row_bytes / 16), byte = (i % (row_bytes / 16)) * 16;
    *reinterpret_cast<uint4*>(tiled + tile_code_offset(row, byte, row_bytes)) = codes[i];
  }
}

__global__ void repack_scales_kernel(const uint16_t* __restrict__ scales, uint16_t* __restrict__ tiled, int64_t rows,
                                     int64_t n_groups) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * n_groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    tiled[tile_scale_index(i / n_groups, i % n_groups, n_groups)] = scales[i];
}

}  // namespace

void repack_quant_tiles(const Ctx& ctx, bool int4, const uint8_t* codes, const uint16_t* scales, uint8_t* tiled_codes,
                        uint16_t* tiled_scales, int64_t rows, int64_t K, int group) {
  WEFT_CHECK(quant_tiles_take(rows, K, group, int4), "repackQuantTiles", "an ", int4 ? "int4" : "int8", " matrix [",
             rows, ", ", K, "] in groups of ", group, " does not fit tiles of 16 rows x 64 bytes");
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  WEFT_CHECK(aligned(codes) && aligned(tiled_codes), "repackQuantTiles", "codes are not 16-byte aligned");
  const int64_t row_bytes = int4 ? K / 2 : K, n_groups = K / group;
  repack_codes_kernel<<<blocks_for(rows * (row_bytes / 16), 256), 256, 0, ctx.stream>>>(
      reinterpret_cast<const uint4*>(codes), tiled_codes, rows, row_bytes);
  repack_scales_kernel<<<blocks_for(rows * n_groups, 256), 256, 0, ctx.stream>>>(scales, tiled_scales, rows, n_groups);
  check_launch(ctx, "repackQuantTiles", {});
}

}  // namespace weft::cuda
