// What the standalone kernel benchmarks share (bench/kernels/*-bench.cu, built with nvcc alone): the CUDA error
// check, device tensors for the backend's kernels, and random values from weft's own counter-based generator
// (random-hash.h), so no bench carries a hash of its own.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "random-hash.h"
#include "tensor.h"

#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                                \
    }                                                                                              \
  } while (0)

namespace bench {

struct DevBuffer : weft::Buffer {
  void* p = nullptr;
  explicit DevBuffer(size_t bytes) : weft::Buffer(bytes) { CK(cudaMalloc(&p, bytes)); }
  ~DevBuffer() override { cudaFree(p); }
  void* data() const override { return p; }
};

// A device tensor of dtype d and shape s (4 bytes at least, so an empty one still has an address).
inline weft::Tensor dev(weft::DType d, weft::Shape s) {
  weft::Tensor t;
  t.dtype = d;
  t.shape = s;
  t.buffer = std::make_shared<DevBuffer>(std::max<size_t>(t.nbytes(), 4));
  return t;
}

// Element i of stream `seed`, uniform in [-1, 1).
__device__ __forceinline__ float uniform(uint64_t seed, size_t i) { return weft::uniform_value(seed, i, 1.0f); }

}  // namespace bench
