// Standalone benchmark of weft's quantized GEMV (gemv-quant.cuh: int8 per channel, int4 in groups) beside the bf16
// GEMV of the same shape, on the Llama-2-7B decode shapes. Build and run: bench/kernels/quant-run.sh (nvcc only).
//   quant-bench [--quick] [--sweep] [--only SHAPE FORMAT T]   (e.g. --only wqkv int8 1, for a profiler)
// Per (shape, format, T): checks the output against a double-accumulation reference of the dequantized weights,
// times with CUDA events (median of 50 after warm-up, rotating weight copies so the weights never sit in L2), and
// prints GB/s of weight + scale bytes, % of the measured read bandwidth, the bf16 GEMV's time and the speedup over
// it (issue 17's per-kernel ratio). --sweep also times each cluster size and ring depth the kernel takes.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/bandwidth.cuh"
#include "cuda/gemv-quant.cuh"
#include "cuda/matmul.cuh"
#include "error.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;

// Random bytes (the int8 values or int4 code pairs), scales in [0.5, 1.5) / 64 as bf16, x in [-1, 1).
__global__ void fill_bytes(uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(weft::splitmix64(weft::splitmix64(seed) ^ i));
}
__global__ void fill_scales(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16_rn((1.0f + 0.5f * bench::uniform(seed, i)) / 64.0f);
}
__global__ void fill_floats(float* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = bench::uniform(seed, i);
}
// ref [T, N]: one warp per output, double accumulation of q * scale * x (gated: x = silu(gate) * up).
__global__ void ref_kernel(const float* x, wc::QuantMatrix w, double* ref, int T, int N, int K, int gated) {
  const int lane = threadIdx.x & 31;
  const size_t o = (blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x) >> 5;
  if (o >= static_cast<size_t>(T) * N) return;
  const int t = static_cast<int>(o / N), n = static_cast<int>(o % N);
  const float* xr = x + static_cast<size_t>(t) * K * (gated ? 2 : 1);
  const auto* q = static_cast<const uint8_t*>(w.q);
  double s = 0;
  for (int k = lane; k < K; k += 32) {
    const float scale = __uint_as_float(static_cast<uint32_t>(w.scales[static_cast<size_t>(n) * (K / w.group) + k / w.group]) << 16);
    const int v = w.dtype == DType::I8 ? static_cast<int8_t>(q[static_cast<size_t>(n) * K + k])
                                       : ((q[(static_cast<size_t>(n) * K + k) / 2] >> ((k & 1) * 4)) & 0xf) - 8;
    const double xv = gated ? (xr[k] / (1.0 + exp(-static_cast<double>(xr[k])))) * xr[K + k] : xr[k];
    s += static_cast<double>(v) * scale * xv;
  }
  for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) ref[o] = s;
}

static double median_ms(cudaStream_t s, int copies, const std::function<void(int)>& run) {
  for (int i = 0; i < 5; ++i) run(i % copies);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < 50; ++i) {
    CK(cudaEventRecord(a, s));
    run(i % copies);
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int main(int argc, char** argv) {
  bool quick = false, sweep = false;
  std::string only_shape, only_format;
  int only_t = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    else if (!std::strcmp(argv[i], "--only") && i + 3 < argc) {
      only_shape = argv[++i];
      only_format = argv[++i];
      only_t = std::atoi(argv[++i]);
    }
  }
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const wc::Ctx ctx{nullptr, stream, nullptr};  // no engine state: errors throw
  wc::Matmul matmul(ctx);
  const double bw = wc::measure_read_bandwidth(ctx, size_t{1} << 30, 10);
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, read bandwidth %.0f GB/s\n", prop.name, bw);

  struct Shape { const char* name; int N, K; bool gated; };
  const std::vector<Shape> shapes = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false},
                                     {"w13", 22016, 4096, false}, {"w2 (gated)", 4096, 11008, true},
                                     {"lm_head", 32000, 4096, false}};
  struct Format { const char* name; DType dt; int group; };  // group 0: per channel (K)
  const std::vector<Format> formats = {{"int8", DType::I8, 0}, {"int4 g128", DType::I4, 128}, {"int4 g32", DType::I4, 32}};
  const std::vector<int> tokens = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 2, 4, 8, 16};
  int failures = 0;
  double total_q[16] = {}, total_bf16[16] = {};  // batch-1 layer sums per format (wqkv + wo + w13 + w2)
  std::printf("%-11s %-10s %3s %9s %8s %6s %9s %7s %9s  %s\n", "shape", "format", "T", "ms", "GB/s", "%bw", "bf16 ms",
              "speedup", "ring ms", "sweep best (C,U: ms)");
  for (const Shape& sh : shapes) {
    if (!only_shape.empty() && only_shape != sh.name) continue;
    const size_t x_elems = static_cast<size_t>(16) * sh.K * (sh.gated ? 2 : 1);
    float *x, *y;
    double* ref;
    CK(cudaMalloc(&x, x_elems * 4));
    CK(cudaMalloc(&y, static_cast<size_t>(16) * sh.N * 4));
    CK(cudaMalloc(&ref, static_cast<size_t>(16) * sh.N * 8));
    fill_floats<<<1024, 256, 0, stream>>>(x, x_elems, 7);
    // bf16 weights of the shape, for the ratio.
    const size_t bf16_bytes = static_cast<size_t>(sh.N) * sh.K * 2;
    const int bf16_copies = static_cast<int>(std::max<size_t>(2, (size_t{400} << 20) / bf16_bytes + 1));
    std::vector<void*> wb(bf16_copies);
    for (auto& p : wb) {
      CK(cudaMalloc(&p, bf16_bytes));
      fill_bytes<<<1024, 256, 0, stream>>>(static_cast<uint8_t*>(p), bf16_bytes, 3);  // any bits: timing only
    }
    // A bf16 pattern of random bytes may hold NaN/Inf: harmless for timing (no check on this path).
    for (size_t fi = 0; fi < formats.size(); ++fi) {
      const Format& f = formats[fi];
      if (!only_format.empty() && only_format != f.name) continue;
      const int group = f.group ? f.group : sh.K;
      const size_t qbytes = static_cast<size_t>(sh.N) * sh.K / (f.dt == DType::I4 ? 2 : 1);
      const size_t n_scales = static_cast<size_t>(sh.N) * (sh.K / group);
      const size_t bytes = qbytes + n_scales * 2;
      const int copies = static_cast<int>(std::max<size_t>(2, (size_t{400} << 20) / bytes + 1));
      std::vector<wc::QuantMatrix> ws(copies);
      for (int c = 0; c < copies; ++c) {
        void* q;
        void* s;
        CK(cudaMalloc(&q, qbytes));
        CK(cudaMalloc(&s, n_scales * 2));
        fill_bytes<<<1024, 256, 0, stream>>>(static_cast<uint8_t*>(q), qbytes, 11 + c);
        fill_scales<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(s), n_scales, 13 + c);
        ws[c] = wc::QuantMatrix{q, static_cast<const uint16_t*>(s), f.dt, group};
      }
      for (int T : tokens) {
        if (only_t && T != only_t) continue;
        // Check: the dequantized product in double against the kernel's.
        CK(cudaMemsetAsync(y, 0xff, static_cast<size_t>(T) * sh.N * 4, stream));
        wc::quant_gemv(ctx, matmul.gemv(), x, ws[0], y, T, sh.N, sh.K, sh.gated);
        ref_kernel<<<static_cast<unsigned>((static_cast<size_t>(T) * sh.N * 32 + 255) / 256), 256, 0, stream>>>(
            x, ws[0], ref, T, sh.N, sh.K, sh.gated);
        CK(cudaStreamSynchronize(stream));
        std::vector<float> got(static_cast<size_t>(T) * sh.N);
        std::vector<double> want(got.size());
        CK(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(want.data(), ref, want.size() * 8, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const double d = std::isfinite(got[i]) ? got[i] - want[i] : 1e30;
          num += d * d;
          den += want[i] * want[i];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        const bool ok = rel < 1e-5;
        failures += !ok;

        const double ms = median_ms(stream, copies, [&](int c) {
          wc::quant_gemv(ctx, matmul.gemv(), x, ws[c], y, T, sh.N, sh.K, sh.gated);
        });
        double bf16_ms = NAN;
        if (T <= wc::Gemv::kMaxTokens)
          bf16_ms = median_ms(stream, bf16_copies, [&](int c) {
            matmul.run(x, wb[c], DType::BF16, y, T, sh.N, sh.K, sh.gated);
          });
        // gemv.cu's ring kernel where the register kernel runs by default (one token): the two side by side.
        double ring_ms = NAN;
        if (T == 1)
          ring_ms = median_ms(stream, copies, [&](int c) {
            wc::quant_gemv(ctx, matmul.gemv(), x, ws[c], y, T, sh.N, sh.K, sh.gated, wc::QuantGemvPath::Ring);
          });
        // gemv.cu's ring kernel on the bf16 weights, where weft runs gemv_one_token (one token).
        double bf16_ring_ms = NAN;
        if (T == 1) {
          wc::GemvTuning ring;
          ring.one_token = false;
          bf16_ring_ms = median_ms(stream, bf16_copies, [&](int c) {
            matmul.gemv().run(x, wb[c], DType::BF16, y, 1, sh.N, sh.K, sh.gated, ring);
          });
        }
        std::string best = "-";
        if (sweep && T <= wc::Gemv::kMaxTokens) {
          double best_ms = 1e30;
          for (int C : {1, 2, 4, 8})
            for (int U : {1, 2}) {
              wc::GemvTuning tuning;
              tuning.cluster = C;
              tuning.u = U;
              if (!matmul.gemv().run_quant(x, ws[0], y, T, sh.N, sh.K, sh.gated, tuning)) continue;
              const double t = median_ms(stream, copies, [&](int c) {
                matmul.gemv().run_quant(x, ws[c], y, T, sh.N, sh.K, sh.gated, tuning);
              });
              if (t < best_ms) {
                best_ms = t;
                best = std::to_string(C) + "," + std::to_string(U) + ": " + std::to_string(t).substr(0, 6);
              }
            }
        }
        if (T == 1 && std::strcmp(sh.name, "lm_head") != 0) {
          total_q[fi] += ms;
          total_bf16[fi] += bf16_ms;
        }
        const double gbs = bytes / (ms * 1e6);
        std::printf("%-11s %-10s %3d %9.4f %8.0f %5.1f%% %9.4f %6.2fx %9.4f  %s%s\n", sh.name, f.name, T, ms, gbs,
                    100 * gbs / bw, bf16_ms, bf16_ms / ms, ring_ms, best.c_str(), ok ? "" : "  CHECK FAILED");
        if (T == 1 && fi == 0)
          std::printf("%-11s %-10s %3d %9.4f %8.0f %5.1f%% %9s %7s %9.4f\n", sh.name, "bf16", T, bf16_ms,
                      bf16_bytes / (bf16_ms * 1e6), 100 * bf16_bytes / (bf16_ms * 1e6) / bw, "", "", bf16_ring_ms);
        if (!ok) std::printf("  relative error %.3g\n", rel);
      }
      for (auto& w : ws) {
        CK(cudaFree(const_cast<void*>(w.q)));
        CK(cudaFree(const_cast<uint16_t*>(w.scales)));
      }
    }
    for (auto& p : wb) CK(cudaFree(p));
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(ref));
  }
  std::printf("\nbatch 1, one Llama-2-7B layer's four GEMVs (wqkv + wo + w13 + w2):\n");
  for (size_t fi = 0; fi < formats.size(); ++fi)
    std::printf("  %-10s %.4f ms, bf16 %.4f ms: %.2fx\n", formats[fi].name, total_q[fi], total_bf16[fi],
                total_bf16[fi] / total_q[fi]);
  std::printf("%s\n", failures ? "CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
