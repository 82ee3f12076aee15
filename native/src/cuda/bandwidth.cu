// weft::cuda::measure_read_bandwidth: read-only streaming bandwidth, best of N passes over a large buffer.
#include <cuda_runtime.h>

#include <algorithm>

#include "../error.h"
#include "bandwidth.cuh"

namespace weft::cuda {

namespace {

#define WEFT_BW_CHECK(call)                                                                              \
  do {                                                                                                   \
    cudaError_t err_ = (call);                                                                           \
    if (err_ != cudaSuccess) WEFT_FAIL("measure_read_bandwidth", #call, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

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

double measure_read_bandwidth(size_t bytes, int iterations, cudaStream_t stream) {
  WEFT_CHECK(bytes >= 16 && iterations >= 1, "measure_read_bandwidth", "bytes ", bytes, " iterations ", iterations);
  const size_t n = bytes / 16;
  int dev = 0, sms = 0;
  WEFT_BW_CHECK(cudaGetDevice(&dev));
  WEFT_BW_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
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
    WEFT_BW_CHECK(cudaMalloc(&buf, n * 16));
    WEFT_BW_CHECK(cudaMalloc(&out, grid * sizeof(uint32_t)));
    WEFT_BW_CHECK(cudaMemsetAsync(buf, 0x5a, n * 16, stream));  // not zeros
    WEFT_BW_CHECK(cudaMemsetAsync(out, 0, grid * sizeof(uint32_t), stream));
    WEFT_BW_CHECK(cudaEventCreate(&e0));
    WEFT_BW_CHECK(cudaEventCreate(&e1));
    read_kernel<<<grid, 512, 0, stream>>>(buf, n, out);  // warm-up
    WEFT_BW_CHECK(cudaGetLastError());
    for (int it = 0; it < iterations; ++it) {
      WEFT_BW_CHECK(cudaEventRecord(e0, stream));
      read_kernel<<<grid, 512, 0, stream>>>(buf, n, out);
      WEFT_BW_CHECK(cudaGetLastError());
      WEFT_BW_CHECK(cudaEventRecord(e1, stream));
      WEFT_BW_CHECK(cudaEventSynchronize(e1));
      float ms = 0.f;
      WEFT_BW_CHECK(cudaEventElapsedTime(&ms, e0, e1));
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
