// What the standalone kernel benchmarks share (bench/kernels/*-bench.cu, built with nvcc alone): the CUDA error
// check, device tensors for the backend's kernels, random values from weft's own counter-based generator
// (random-hash.h), so no bench carries a hash of its own, the fills built on them, the device / stream / status /
// events every bench opens, its median timing loop, and the norm-wise comparison of two outputs.
#pragma once

#include <cuda_runtime.h>

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cuda/device.h"
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

// Fills, grid-stride over n elements: uniform(seed, i) as f32 or rounded to bf16; a quiet NaN (outputs poisoned
// before a kernel writes them); one value.
__global__ void fill_f32(float* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uniform(seed, i);
}
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(uniform(seed, i));
}
// Quantization scales as bf16 bits, uniform in [2^-8, 2^-7): positive, and small enough that int8/int4 products stay
// near bf16's range.
__global__ void fill_scales(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16((1.5f + 0.5f * uniform(seed, i)) / 256.f);
    p[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

__global__ void poison(float* p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __int_as_float(0x7fc00000);
}
__global__ void fill_value(float* p, size_t n, float value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = value;
}

// Host i32 values into device tensor t (t holds v.size() of them at least).
// A copy from pageable memory may return before its DMA lands, and the benches' streams do not wait for the legacy
// stream: the sync keeps a kernel launched next from reading the old bytes.
inline void upload_i32(const weft::Tensor& t, const std::vector<int32_t>& v) {
  CK(cudaMemcpy(t.data<int32_t>(), v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaDeviceSynchronize());
}

// A device tensor's f32 contents on the host (after the stream's work is done).
inline std::vector<float> download(const weft::Tensor& t) {
  std::vector<float> host(size_t(t.numel()));
  CK(cudaMemcpy(host.data(), t.data<float>(), host.size() * 4, cudaMemcpyDeviceToHost));
  return host;
}

// max |got - ref| / max |ref| (norm-wise, as ops-check); `nan` is set when either holds a NaN.
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref, bool& nan) {
  double scl = 0, err = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    nan |= std::isnan(got[i]) || std::isnan(ref[i]);
    scl = std::max(scl, std::fabs(double(ref[i])));
    err = std::max(err, std::fabs(double(got[i]) - ref[i]));
  }
  return err / scl;
}

// Device 0 as a bench opens it: its properties, a stream, a zeroed status word the kernels report into, the
// launch context over them, and two events for timing.
struct Device {
  cudaDeviceProp prop;
  cudaStream_t stream;
  weft::cuda::DeviceStatus* status;
  weft::cuda::Ctx ctx;
  cudaEvent_t e0, e1;

  explicit Device(unsigned stream_flags = cudaStreamDefault) {
    CK(cudaGetDeviceProperties(&prop, 0));
    CK(cudaStreamCreateWithFlags(&stream, stream_flags));
    CK(cudaMalloc(&status, sizeof(weft::cuda::DeviceStatus)));
    CK(cudaMemset(status, 0, sizeof(weft::cuda::DeviceStatus)));
    ctx = weft::cuda::Ctx{nullptr, stream, status};
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
  }

  // ms of one call of f on the stream: `warmups` untimed calls, then the median of `runs` timed one by one.
  template <typename F>
  float median_ms(int warmups, int runs, F&& f) {
    for (int i = 0; i < warmups; ++i) f();
    std::vector<float> ms;
    for (int i = 0; i < runs; ++i) {
      CK(cudaEventRecord(e0, stream));
      f();
      CK(cudaEventRecord(e1, stream));
      CK(cudaEventSynchronize(e1));
      float m;
      CK(cudaEventElapsedTime(&m, e0, e1));
      ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }

  // ms of one replay of f captured as a CUDA graph on the stream (relaxed capture: launchers may set kernel
  // attributes on first use): median_ms of the replays.
  template <typename F>
  float graph_median_ms(int warmups, int runs, F&& f) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    f();
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    const float ms = median_ms(warmups, runs, [&] { CK(cudaGraphLaunch(exec, stream)); });
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    return ms;
  }

  // GB/s of cudaMemcpy device to device over `bytes` (read + write), best of 10 after one warm-up: the "copy
  // bandwidth" the attention benches state their kernels against.
  double copy_bandwidth(size_t bytes) {
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    CK(cudaMemsetAsync(a, 1, bytes, stream));
    float best = 1e30f;
    for (int i = 0; i < 11; ++i) {
      CK(cudaEventRecord(e0, stream));
      CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
      CK(cudaEventRecord(e1, stream));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i > 0) best = std::min(best, ms);
    }
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * double(bytes) / (best * 1e6);
  }

  // False, after printing what it says, when a kernel reported a failure into the status word (with its value
  // where the bench prints that too).
  bool status_ok(bool print_value = false) const {
    weft::cuda::DeviceStatus hs;
    CK(cudaMemcpy(&hs, status, sizeof hs, cudaMemcpyDeviceToHost));
    if (!hs.flag) return true;
    if (print_value)
      std::printf("device status reported op %d index %lld value %lld\n", hs.op, hs.index, hs.value);
    else
      std::printf("device status reported op %d index %lld\n", hs.op, hs.index);
    return false;
  }
};

}  // namespace bench
