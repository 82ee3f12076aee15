// Shared by every CUDA op: the engine context a launcher receives, launch checks that throw weft::Error,
// device-side index reports, and f16/bf16 -> f32 loads.
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <string>

#include "cuda/device.h"
#include "error.h"
#include "tensor.h"

namespace weft::cuda {

// ---- launch checks (through fail_cuda, device.h: the one CUDA error path)

// A named tensor for error messages: "x [3, 64] f32".
struct Named {
  const char* name;
  const Tensor& t;
};

// " (x [3, 64] f32, w [128, 64] bf16)", or "" for no tensors.
std::string describe(std::initializer_list<Named> args);

// After a launch: cudaGetLastError through fail_cuda, "<op>: CUDA error <text> (x [3, 64] f32, ...)"; a sticky
// error also marks the engine dead.
inline void check_launch(const Ctx& ctx, const char* op, std::initializer_list<Named> args) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail_cuda(ctx.st, op, e, describe(args));
}

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535LL * 16) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > cap ? cap : b));
}

}  // namespace weft::cuda

// Device helpers: only for .cu files (launcher headers are also included by .cc files).
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace weft::cuda {

// ---- device-side index reports (first one wins; the host reads it at the next synchronising call)

__device__ inline void report(DeviceStatus* s, StatusOp op, long long index, long long value, long long limit) {
  if (atomicCAS(&s->flag, 0, 1) == 0) {
    s->op = static_cast<int>(op);
    s->index = index;
    s->value = value;
    s->limit = limit;
    __threadfence_system();
  }
}

// ---- programmatic dependent launch (sm_90). The GEMV is launched so that it may start while the kernel
// before it still runs: it issues its first weight loads (weights are never written during a step), then
// pdl_wait()s for that kernel to finish and its writes to be visible before it reads x. The short kernels
// that precede GEMVs call pdl_trigger() first thing, which lets the GEMV's blocks take the idle SMs at once
// instead of after the short kernel drains. Both are no-ops for kernels launched the ordinary way.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

// Launches a short kernel of the decode path as a programmatic dependent of the kernel before it: its blocks are
// placed while that kernel runs (once every block of it called pdl_trigger), so the launch latency between the
// two, a few microseconds each in a graph of ~300 kernels, overlaps. The kernel must call pdl_wait() before its
// first read of anything a kernel of the step writes and before its first write, and every thread runs it (so that
// the kernel ends only after the one before it: a kernel after it waits for it alone). What the host uploads before
// a step (its positions, token rows, block table) may be read before pdl_wait, and the decode attention does
// (attention-decode-mma.cu): no kernel may write those. Checked afterwards with check_launch.
template <typename... Params, typename... Args>
void launch_pdl(const Ctx& ctx, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = ctx.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// ---- loads

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// use(i, load(i)) for i = threadIdx.x + j blockDim.x < n, a thread's kAhead loads issued before it uses any of them.
// For the GEMVs' staging of x after pdl_wait, where a loop of one load a trip waits a round trip a trip (the
// one-token int4 GEMV's layer bench on H100: 51.0 -> 46.0 us a layer with two ahead, bench/RESULTS.md session 61).
template <int kAhead, typename Load, typename Use>
__device__ __forceinline__ void loads_ahead(int n, Load&& load, Use&& use) {
  for (int i0 = threadIdx.x; i0 < n; i0 += kAhead * blockDim.x) {
    decltype(load(0)) v[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u)
      if (const int i = i0 + u * blockDim.x; i < n) v[u] = load(i);
#pragma unroll
    for (int u = 0; u < kAhead; ++u)
      if (const int i = i0 + u * blockDim.x; i < n) use(i, v[u]);
  }
}

// ---- stores: f32 -> E, round to nearest even (what a separate cast kernel writes)

template <typename E>
__device__ __forceinline__ E from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Runs `body` with W bound to the element type of a float dtype.
#define WEFT_DISPATCH_FLOAT(dtype, W, ...)      \
  switch (dtype) {                             \
    case ::weft::DType::F16: {                 \
      using W = __half;                        \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case ::weft::DType::BF16: {                \
      using W = __nv_bfloat16;                 \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    default: {                                 \
      using W = float;                         \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
  }

// A shared-memory pointer as the 32-bit address PTX's shared-state instructions take (cp.async, mbarrier, ldmatrix).
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// silu(g) * u with one rounding rule everywhere it is formed (siluMul and the GEMVs that fuse it), so a fused
// product equals the two separate ops bit for bit.
__device__ __forceinline__ float silu_times(float g, float u) { return __fmul_rn(g / (1.0f + expf(-g)), u); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ inline double block_sum(double v) {
  __shared__ double partial[32];
  __shared__ double total;
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    double s = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0;
    s = warp_sum(s);
    if (threadIdx.x == 0) total = s;
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace weft::cuda
#endif  // __CUDACC__
