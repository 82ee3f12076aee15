// weft::cuda::repack_quant_tiles: a row-major int4 or int8 matrix (gemv.cuh QuantMatrix's codes [rows, K / 2] or
// [rows, K] and bf16 scales [rows, K / group]) into the tiled layout of quant-tiles.h, on the device (quant-tiles.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device.h"

namespace weft::cuda {

// tiled_codes and tiled_scales are new buffers of the same sizes (the repack is not in place). Throws weft::Error
// ("repackQuantTiles: ...") where quant_tiles_take refuses the shape or a pointer is not 16-byte aligned. Capturable.
void repack_quant_tiles(const Ctx& ctx, bool int4, const uint8_t* codes, const uint16_t* scales, uint8_t* tiled_codes,
                        uint16_t* tiled_scales, int64_t rows, int64_t K, int group);

}  // namespace weft::cuda
