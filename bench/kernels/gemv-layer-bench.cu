// The bf16 one-token GEMVs as a decode step runs them: 32 Llama-2-7B layers' wqkv, wo, w13 and w2 (plain: the step's
// SwiGLU product comes finished from matmulSiluMul), each layer its own weights (13 GB, so nothing stays in L2),
// launched with programmatic dependent launch and captured in one CUDA graph; the replay's median per layer, beside
// the floor (bytes / measured read bandwidth), and each shape alone (32 launches of it). Kernels: weft's choice
// (gemv-rows-tma.cu for rows of up to 8 KiB, else the batched register kernel), the batched and the streaming
// register kernels (gemv-one-token.cu; streaming at 1, 2 and 4 rows a task). Each kernel's outputs of layer 0 are
// checked against the batched kernel's (max |y - ref| / max |ref|). The cache-hint, staging and occupancy variants
// of bench/RESULTS.md (session 10) were an experimental copy of the streaming kernel in this file at d9916e1.
// Build and run: bench/kernels/gemv-layer-run.sh (nvcc only).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/bandwidth.cuh"
#include "cuda/gemv-one-token.cuh"
#include "error.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;

int main() {
  bench::Device dev(cudaStreamNonBlocking);
  const wc::Ctx& ctx = dev.ctx;
  cudaStream_t stream = dev.stream;
  const double bw = wc::measure_read_bandwidth(ctx, size_t{1} << 30, 10);
  std::printf("%s, read bandwidth %.0f GB/s\n", dev.prop.name, bw);
  struct Shape { const char* name; int N, K; };
  const Shape shapes[] = {{"wqkv", 12288, 4096}, {"wo", 4096, 4096}, {"w13", 22016, 4096}, {"w2", 4096, 11008}};
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
  CK(cudaMalloc(&x, 11008 * 4));
  CK(cudaMalloc(&y, 4 * 22016 * 4));
  bench::fill_f32<<<1024, 256, 0, stream>>>(x, 11008, 7);
  float* ys[4] = {y, y + 22016, y + 2 * 22016, y + 3 * 22016};

  struct Kernel { std::string name; wc::OneTokenTuning tuning; };
  const auto tuned = [](wc::OneTokenKernel k, int rows) { wc::OneTokenTuning t; t.kernel = k; t.rows = rows; return t; };
  const std::vector<Kernel> kernels = {
      {"weft (bulk-copy rows where K <= 4096)", wc::OneTokenTuning{}},
      {"batched register", tuned(wc::OneTokenKernel::Batched, 0)},
      {"streaming register, 1 row a task", tuned(wc::OneTokenKernel::Streaming, 1)},
      {"streaming register, 2 rows", tuned(wc::OneTokenKernel::Streaming, 2)},
      {"streaming register, 4 rows", tuned(wc::OneTokenKernel::Streaming, 4)},
  };
  const auto run = [&](const Kernel& k, int s, int l) {
    if (!wc::gemv_one_token(ctx, x, ws[s][l], DType::BF16, nullptr, 0, ys[s], shapes[s].N, shapes[s].K, false, k.tuning)) {
      std::fprintf(stderr, "gemv_one_token refused %s\n", shapes[s].name);
      std::exit(2);
    }
  };
  const auto outputs = [&](const Kernel& k, int s) {
    CK(cudaMemsetAsync(ys[s], 0xff, shapes[s].N * 4, stream));
    run(k, s, 0);
    std::vector<float> got(shapes[s].N);
    CK(cudaMemcpyAsync(got.data(), ys[s], shapes[s].N * 4, cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    return got;
  };
  std::vector<float> ref[4];
  for (int s = 0; s < 4; ++s) ref[s] = outputs(kernels[1], s);

  std::printf("floor per layer %.1f us (%.1f MB at %.0f GB/s)\n", layer_bytes / (bw * 1e3), layer_bytes / 1e6, bw);
  std::printf("| kernel | layer us | TB/s | %% of floor | wqkv us | wo us | w13 us | w2 us | max rel err |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  for (const Kernel& k : kernels) {
    double err = 0;
    for (int s = 0; s < 4; ++s) {
      const std::vector<float> got = outputs(k, s);
      double scale = 0, e = 0;
      for (int i = 0; i < shapes[s].N; ++i) {
        scale = std::max(scale, static_cast<double>(std::fabs(ref[s][i])));
        e = std::max(e, std::isfinite(got[i]) ? static_cast<double>(std::fabs(got[i] - ref[s][i])) : 1e30);
      }
      err = std::max(err, e / scale);
    }
    const auto per_layer_us = [&](const auto& body) { return dev.graph_median_ms(3, 15, body) * 1e3 / layers; };
    const double all = per_layer_us([&] {
      for (int l = 0; l < layers; ++l)
        for (int s = 0; s < 4; ++s) run(k, s, l);
    });
    double alone[4];
    for (int s = 0; s < 4; ++s)
      alone[s] = per_layer_us([&] {
        for (int l = 0; l < layers; ++l) run(k, s, l);
      });
    std::printf("| %s | %.1f | %.2f | %.0f%% | %.1f | %.1f | %.1f | %.1f | %.1e |\n", k.name.c_str(), all,
                layer_bytes / (all * 1e6), 100.0 * layer_bytes / (bw * 1e3) / all, alone[0], alone[1], alone[2],
                alone[3], err);
  }
  return 0;
}
