// The device's read bandwidth (Engine.measureBandwidth, and the kernel benchmark's reference).
#pragma once

#include <cstddef>

#include "cuda/device.h"

namespace weft::cuda {

// Read-only streaming bandwidth of the device in GB/s over a buffer of `bytes`, best of `iterations`, on
// ctx.stream (ctx.st may be null: a benchmark without an engine).
double measure_read_bandwidth(const Ctx& ctx, size_t bytes, int iterations);

}  // namespace weft::cuda
