// The bf16 one-token GEMVs as a decode step runs them: 32 Llama-2-7B layers' wqkv, wo, w13 and w2 (plain: the
// step's SwiGLU product comes finished from matmulSiluMul), each layer its own weights (13 GB, so nothing stays in
// L2), launched with programmatic dependent launch and captured in one CUDA graph; the replay's median per layer,
// beside the floor (bytes / measured read bandwidth), and each shape alone (32 launches of it). Variants: weft's
// choice (gemv-rows-tma.cu for rows of up to 8 KiB), its batched and streaming register kernels (gemv_one_token),
// and an experimental register kernel with R rows a task, a ring of U vectors a row, W warps a block, launch bounds
// for BPS blocks a SM and a grid of G blocks a SM, its loads' cache hints (HINT: __ldg, L1::no_allocate, L2::256B or
// L2::128B prefetch) and x staged by a loop (STAGE 0), by one bulk async copy (1) or not at all (2: a constant x,
// wrong outputs, the time without staging). Each variant's outputs of layer 0 are checked against the batched
// kernel's. Build and run: bench/kernels/gemv-layer-run.sh (nvcc only).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/bandwidth.cuh"
#include "cuda/common.cuh"
#include "cuda/gemv-one-token.cuh"
#include "error.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;
using wc::pdl_trigger;
using wc::pdl_wait;
using wc::silu_times;

template <int HINT>
__device__ __forceinline__ uint4 ld16(const uint4* p) {
  uint4 v;
  if constexpr (HINT == 0) v = __ldg(p);
  else if constexpr (HINT == 1)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else if constexpr (HINT == 2)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <int S, int U, typename Step>
__device__ __forceinline__ bool every_slot(Step& f) {
  if constexpr (S == U) return false;
  else return f(std::integral_constant<int, S>{}) || every_slot<S + 1, U>(f);
}

// bf16 streaming: R rows a task, ring of U vectors a row, W warps a block.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

template <int R, int U, int W, int BPS, int HINT, int STAGE = 0>
__global__ void __launch_bounds__(W * 32, BPS)
    exp_kernel(const float* __restrict__ x, const uint4* __restrict__ w4, float* __restrict__ y, int N, int K, int gated) {
  constexpr int H = 2;
  extern __shared__ float4 xs4[];
  pdl_trigger();
  const int lane = threadIdx.x & 31;
  const int KV = K / 8, L = (KV + 31) / 32;
  const int n_tasks = (N + R - 1) / R, stride = gridDim.x * W, first = blockIdx.x * W + (threadIdx.x >> 5);
  uint4 wv[R][U];
  int lt = first, lj = 0;
  const auto request = [&](int s) {
    const int v = lj * 32 + lane;
    const bool ok = lt < n_tasks && v < KV;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const size_t row = static_cast<size_t>(min(lt * R + r, N - 1));
      wv[r][s] = ok ? ld16<HINT>(w4 + row * KV + v) : make_uint4(0, 0, 0, 0);
    }
    if (++lj == L) {
      lj = 0;
      lt += stride;
    }
  };
#pragma unroll
  for (int s = 0; s < U; ++s) request(s);
  __shared__ alignas(8) uint64_t mbar;
  if constexpr (STAGE == 1) {
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(smem_addr(&mbar)));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
  }
  pdl_wait();
  const float4* x4 = reinterpret_cast<const float4*>(x);
  if constexpr (STAGE == 0) {
    for (int i = threadIdx.x; i < K / 4; i += W * 32) {
      float4 v = x4[i];
      if (gated) {
        const float4 up = x4[K / 4 + i];
        v = make_float4(silu_times(v.x, up.x), silu_times(v.y, up.y), silu_times(v.z, up.z), silu_times(v.w, up.w));
      }
      xs4[(i % H) * KV + i / H] = v;
    }
    __syncthreads();
  } else if constexpr (STAGE == 1) {
    const uint32_t bytes = static_cast<uint32_t>(K) * 4 * (gated ? 2 : 1);
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(smem_addr(&mbar)), "r"(bytes) : "memory");
      for (uint32_t off = 0; off < bytes; off += 16384) {
        const uint32_t n = min(16384u, bytes - off);
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(smem_addr(reinterpret_cast<char*>(xs4) + off)), "l"(reinterpret_cast<const char*>(x) + off), "r"(n), "r"(smem_addr(&mbar)) : "memory");
      }
    }
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }" : "=r"(done) : "r"(smem_addr(&mbar)) : "memory");
    if (gated) {
      for (int i = threadIdx.x; i < K / 4; i += W * 32) {
        const float4 v = xs4[i], up = xs4[K / 4 + i];
        xs4[i] = make_float4(silu_times(v.x, up.x), silu_times(v.y, up.y), silu_times(v.z, up.z), silu_times(v.w, up.w));
      }
      __syncthreads();
    }
  }
  int ct = first, cj = 0;
  if (ct >= n_tasks) return;
  float acc[R] = {};
  const auto step = [&](auto slot) {
    constexpr int s = decltype(slot)::value;
    const int v = cj * 32 + lane;
    if (v < KV) {
#pragma unroll
      for (int h = 0; h < H; ++h) {
        const float4 xv = STAGE == 0 ? xs4[h * KV + v] : STAGE == 1 ? xs4[v * 2 + h] : make_float4(1.f, 0.5f, 0.25f, 1.f);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t a = (&wv[r][s].x)[2 * h], b = (&wv[r][s].x)[2 * h + 1];
          acc[r] = fmaf(__uint_as_float(a << 16), xv.x, acc[r]);
          acc[r] = fmaf(__uint_as_float(a & 0xffff0000u), xv.y, acc[r]);
          acc[r] = fmaf(__uint_as_float(b << 16), xv.z, acc[r]);
          acc[r] = fmaf(__uint_as_float(b & 0xffff0000u), xv.w, acc[r]);
        }
      }
    }
    request(s);
    if (++cj < L) return false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float t = acc[r];
#pragma unroll
      for (int o = 16; o; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0 && ct * R + r < N) y[ct * R + r] = t;
      acc[r] = 0.f;
    }
    cj = 0;
    ct += stride;
    return ct >= n_tasks;
  };
  while (!every_slot<0, U>(step)) {
  }
}

static int g_sms = 132;

template <int R, int U, int W, int BPS, int HINT, int STAGE = 0, int G = BPS>
void launch_exp(const wc::Ctx& ctx, const float* x, const void* w, float* y, int N, int K, bool gated) {
  static bool set = false;
  if (!set) {
    CK(cudaFuncSetAttribute(exp_kernel<R, U, W, BPS, HINT, STAGE>, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
    set = true;
  }
  const long blocks = ((N + R - 1) / R + W - 1) / W;
  const dim3 grid(static_cast<unsigned>(std::min<long>(blocks, static_cast<long>(G) * g_sms)));
  wc::launch_pdl(ctx, exp_kernel<R, U, W, BPS, HINT, STAGE>, grid, dim3(W * 32), static_cast<size_t>(K) * 4 * (gated && STAGE == 1 ? 2 : 1), x,
                 static_cast<const uint4*>(w), y, N, K, gated ? 1 : 0);
}

using Launch = std::function<void(const wc::Ctx&, const float*, const void*, float*, int, int, bool)>;

int main(int argc, char** argv) {
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const wc::Ctx ctx{nullptr, stream, nullptr};
  CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  const double bw = wc::measure_read_bandwidth(ctx, size_t{1} << 30, 10);
  std::printf("read bandwidth %.0f GB/s, %d SMs\n", bw, g_sms);
  struct Shape { const char* name; int N, K; bool gated; };
  const Shape shapes[] = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false}, {"w13", 22016, 4096, false},
                          {"w2", 4096, 11008, false}};
  const int layers = 32;
  std::vector<void*> ws[4];
  size_t layer_bytes = 0;
  for (int s = 0; s < 4; ++s) {
    const size_t bytes = static_cast<size_t>(shapes[s].N) * shapes[s].K * 2;
    layer_bytes += bytes;
    for (int l = 0; l < layers; ++l) {
      void* p;
      CK(cudaMalloc(&p, bytes));
      bench::fill_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(p), bytes / 2, 100 * s + l);
      ws[s].push_back(p);
    }
  }
  float *x, *y;
  CK(cudaMalloc(&x, 2 * 11008 * 4));
  CK(cudaMalloc(&y, 22016 * 4 * 4));
  bench::fill_f32<<<1024, 256, 0, stream>>>(x, 2 * 11008, 7);
  float* ys[4] = {y, y + 22016, y + 2 * 22016, y + 3 * 22016};

  struct Variant { std::string name; Launch run; };
  std::vector<Variant> variants = {
      {"weft (bulk-copy rows for K <= 4096)", [](const wc::Ctx& c, const float* x, const void* w, float* y, int N, int K, bool g) {
         wc::gemv_one_token(c, x, w, DType::BF16, nullptr, 0, y, N, K, g); }},
      {"batched", [](const wc::Ctx& c, const float* x, const void* w, float* y, int N, int K, bool g) {
         wc::OneTokenTuning t; t.kernel = wc::OneTokenKernel::Batched; wc::gemv_one_token(c, x, w, DType::BF16, nullptr, 0, y, N, K, g, t); }},
      {"streaming R2U8", [](const wc::Ctx& c, const float* x, const void* w, float* y, int N, int K, bool g) {
         wc::OneTokenTuning t; t.kernel = wc::OneTokenKernel::Streaming; wc::gemv_one_token(c, x, w, DType::BF16, nullptr, 0, y, N, K, g, t); }},
      {"exp R2U8W8B2 ldg", launch_exp<2, 8, 8, 2, 0>},
      {"exp R2U8W8B2 noalloc", launch_exp<2, 8, 8, 2, 1>},
      {"exp R2U8W8B2 L2:256", launch_exp<2, 8, 8, 2, 2>},
      {"exp R2U8W8B2 L2:128", launch_exp<2, 8, 8, 2, 3>},
      {"exp R2U8W8B2 tma", launch_exp<2, 8, 8, 2, 0, 1>},
      {"exp R2U8W8B2 no x", launch_exp<2, 8, 8, 2, 0, 2>},
      {"exp R1U16W8B2 tma", launch_exp<1, 16, 8, 2, 0, 1>},
      {"exp R4U4W8B2 L2:256", launch_exp<4, 4, 8, 2, 2>},
      {"exp R2U4W8B4 L2:256", launch_exp<2, 4, 8, 4, 2>},
      {"exp R2U16W8B1 tma", launch_exp<2, 16, 8, 1, 0, 1>},
      {"exp R2U8W8 b2 g1 tma", launch_exp<2, 8, 8, 2, 0, 1, 1>},
      {"exp R2U8W4 b4 g2 tma", launch_exp<2, 8, 4, 4, 0, 1, 2>},
  };
  // correctness: each variant's y against batched, layer 0
  std::vector<float> ref[4];
  for (int s = 0; s < 4; ++s) {
    variants[1].run(ctx, x, ws[s][0], ys[s], shapes[s].N, shapes[s].K, shapes[s].gated);
    CK(cudaStreamSynchronize(stream));
    ref[s].resize(shapes[s].N);
    CK(cudaMemcpy(ref[s].data(), ys[s], shapes[s].N * 4, cudaMemcpyDeviceToHost));
  }
  const auto time_graph = [&](const std::function<void()>& body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(stream, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, stream));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ms;
    for (int i = 0; i < 15; ++i) {
      CK(cudaEventRecord(a, stream));
      CK(cudaGraphLaunch(ge, stream));
      CK(cudaEventRecord(b, stream));
      CK(cudaEventSynchronize(b));
      float t;
      CK(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return static_cast<double>(ms[ms.size() / 2]);
  };
  std::printf("floor per layer %.1f us (%.1f MB at %.0f GB/s)\n", layer_bytes / (bw * 1e3), layer_bytes / 1e6, bw);
  std::printf("| variant | layer us | TB/s | %% floor | wqkv us | wo us | w13 us | w2 us | max rel err |\n|---|---|---|---|---|---|---|---|---|\n");
  for (auto& v : variants) {
    double err = 0;
    for (int s = 0; s < 4; ++s) {
      CK(cudaMemsetAsync(ys[s], 0xff, shapes[s].N * 4, stream));
      v.run(ctx, x, ws[s][0], ys[s], shapes[s].N, shapes[s].K, shapes[s].gated);
      CK(cudaStreamSynchronize(stream));
      std::vector<float> got(shapes[s].N);
      CK(cudaMemcpy(got.data(), ys[s], shapes[s].N * 4, cudaMemcpyDeviceToHost));
      double m = 0, e = 0;
      for (int i = 0; i < shapes[s].N; ++i) { m = std::max(m, (double)std::fabs(ref[s][i])); e = std::max(e, std::isfinite(got[i]) ? (double)std::fabs(got[i] - ref[s][i]) : 1e30); }
      err = std::max(err, e / m);
    }
    const double all = time_graph([&] {
      for (int l = 0; l < layers; ++l)
        for (int s = 0; s < 4; ++s) v.run(ctx, x, ws[s][l], ys[s], shapes[s].N, shapes[s].K, shapes[s].gated);
    }) * 1e3 / layers;
    double per[4];
    for (int s = 0; s < 4; ++s)
      per[s] = time_graph([&] {
        for (int l = 0; l < layers; ++l) v.run(ctx, x, ws[s][l], ys[s], shapes[s].N, shapes[s].K, shapes[s].gated);
      }) * 1e3 / layers;
    std::printf("| %s | %.1f | %.2f | %.0f%% | %.1f | %.1f | %.1f | %.1f | %.1e |\n", v.name.c_str(), all,
                layer_bytes / (all * 1e6), 100.0 * layer_bytes / (bw * 1e3) / all, per[0], per[1], per[2], per[3], err);
  }
  return 0;
}
