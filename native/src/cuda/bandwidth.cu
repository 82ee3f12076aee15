// weft::cuda::measure_read_bandwidth: read-only streaming bandwidth, best of N passes over a large buffer.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/bandwidth.cuh"
#include "error.h"

namespace weft::cuda {

namespace {

// Grid-stride 16-byte loads, 4 in flight per thread; the xor of everything is written per block so the
// loads cannot be dropped.
__global__ void __launch_bounds__(512) read_kernel(const uint4* __restrict__ p, size_t n, uint32_t* out) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  uint32_t acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 a, b, c, d;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w) : "l"(p + i));
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w) : "l"(p + i + stride));
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w) : "l"(p + i + 2 * stride));
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(d.x), "=r"(d.y), "=r"(d.z), "=r"(d.w) : "l"(p + i + 3 * stride));
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = p[i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) atomicXor(out + blockIdx.x, acc);
}

}  // namespace

double measure_read_bandwidth(const Ctx& ctx, size_t bytes, int iterations) {
  const char* op = "measureBandwidth";
  cudaStream_t stream = ctx.stream;
  WEFT_CHECK(bytes >= 16 && iterations >= 1, op, "bytes ", bytes, " iterations ", iterations);
  const size_t n = bytes / 16;
  int dev = 0, sms = 0;
  check_cuda(ctx.st, cudaGetDevice(&dev), op);
  check_cuda(ctx.st, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), op);
  const int grid = sms * 4;
  uint4* buf = nullptr;
  uint32_t* out = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best_ms = 1e30;
  auto cleanup = [&] {
    if (buf) cudaFree(buf);
    if (out) cudaFree(out);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
  };
  try {
    check_cuda(ctx.st, cudaMalloc(&buf, n * 16), op);
    check_cuda(ctx.st, cudaMalloc(&out, grid * sizeof(uint32_t)), op);
    check_cuda(ctx.st, cudaMemsetAsync(buf, 0x5a, n * 16, stream), op);  // not zeros
    check_cuda(ctx.st, cudaMemsetAsync(out, 0, grid * sizeof(uint32_t), stream), op);
    check_cuda(ctx.st, cudaEventCreate(&e0), op);
    check_cuda(ctx.st, cudaEventCreate(&e1), op);
    read_kernel<<<grid, 512, 0, stream>>>(buf, n, out);  // warm-up
    check_cuda(ctx.st, cudaGetLastError(), op);
    for (int it = 0; it < iterations; ++it) {
      check_cuda(ctx.st, cudaEventRecord(e0, stream), op);
      read_kernel<<<grid, 512, 0, stream>>>(buf, n, out);
      check_cuda(ctx.st, cudaGetLastError(), op);
      check_cuda(ctx.st, cudaEventRecord(e1, stream), op);
      check_cuda(ctx.st, cudaEventSynchronize(e1), op);
      float ms = 0.f;
      check_cuda(ctx.st, cudaEventElapsedTime(&ms, e0, e1), op);
      best_ms = std::min(best_ms, static_cast<double>(ms));
    }
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
  return static_cast<double>(n * 16) / (best_ms * 1e-3) / 1e9;
}

}  // namespace weft::cuda
