// The one-token GEMVs as a decode step runs them: 32 Llama-2-7B layers' wqkv, wo, w13 (SwiGLU pairs, as matmulSiluMul
// runs them) and w2 (plain: the step's SwiGLU product comes finished), each layer its own weights (13 GB in bf16, so
// nothing stays in L2), launched with programmatic dependent launch and captured in one CUDA graph; the replay's
// median per layer, beside the floor (bytes / measured read bandwidth), and each shape alone (32 launches of it).
// Weights bf16, int8 (one scale a row) or int4 (groups of 128), random codes and scales; FORMAT@llama-3-8b takes
// that model's shapes. Kernels: weft's choice (int4 on tensor cores, gemv-one-token-mma.cu; bf16 on gemv-rows-tma.cu
// where it takes the shape; else the register kernels), the batched (bf16) and the streaming register kernels
// (gemv-one-token.cu; streaming at 1, 2 and 4 rows a task), and for int8/int4 the bulk-copy rows where they take the
// shape (int4's kernel before session 27), for int8 the tensor-core kernel's int8 form (s8 mma, x in digits), and the
// tensor-core kernel on the same weights repacked in tiles (quant-tiles.h; its outputs are checked to equal the
// row-major tensor-core kernel's bit for bit). Each kernel's outputs of layer 0 are checked against the batched
// kernel's (bf16) or the streaming kernel's at 2 rows (max |y - ref| / max |ref|). The cache-hint, staging and
// occupancy variants of bench/RESULTS.md (session 10) were an experimental copy of the streaming kernel in this file
// at d9916e1.
// Build and run: bench/kernels/gemv-layer-run.sh [bf16|int8|int4[@llama-3-8b]]... (nvcc only).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/bandwidth.cuh"
#include "cuda/gemv-one-token-mma.cuh"
#include "cuda/gemv-one-token.cuh"
#include "cuda/quant-tiles.cuh"
#include "error.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;

// format: bf16, int8 or int4, optionally @llama-3-8b for that model's shapes (default Llama-2-7B's)
int run_format(bench::Device& dev, double bw, const std::string& arg) {
  const wc::Ctx& ctx = dev.ctx;
  cudaStream_t stream = dev.stream;
  const std::string format = arg.substr(0, arg.find('@'));
  const bool llama3 = arg.find("@llama-3-8b") != std::string::npos;
  const DType dt = format == "int8" ? DType::I8 : format == "int4" ? DType::I4 : DType::BF16;
  const bool quant = dt != DType::BF16;
  struct Shape { const char* name; int N, K; bool pairs; };  // pairs: N outputs of 2N rows
  const Shape llama2[] = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false}, {"w13", 11008, 4096, true},
                          {"w2", 4096, 11008, false}};
  const Shape llama3_8b[] = {{"wqkv", 6144, 4096, false}, {"wo", 4096, 4096, false}, {"w13", 14336, 4096, true},
                             {"w2", 4096, 14336, false}};
  const Shape* shapes = llama3 ? llama3_8b : llama2;
  constexpr int kMaxK = 14336, kMaxRows = 2 * 14336;
  const int layers = 32;
  const auto group_of = [&](const Shape& sh) { return dt == DType::I8 ? sh.K : dt == DType::I4 ? 128 : 0; };
  std::vector<void*> ws[4], ss[4], tiled_ws[4], tiled_ss[4];  // tiled_*: int8 / int4 codes and scales in tiles
  size_t layer_bytes = 0;
  for (int s = 0; s < 4; ++s) {
    const Shape& sh = shapes[s];
    const size_t rows = static_cast<size_t>(sh.N) * (sh.pairs ? 2 : 1);
    const size_t bytes = rows * sh.K * (dt == DType::BF16 ? 2 : 1) / (dt == DType::I4 ? 2 : 1);
    const size_t n_scales = quant ? rows * (sh.K / group_of(sh)) : 0;
    layer_bytes += bytes + n_scales * 2;
    for (int l = 0; l < layers; ++l) {
      void* p;
      CK(cudaMalloc(&p, bytes));
      bench::fill_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(p), bytes / 2, 100 * s + l);  // any bits are codes
      ws[s].push_back(p);
      void* q = nullptr;
      if (quant) {
        CK(cudaMalloc(&q, n_scales * 2));
        bench::fill_scales<<<256, 256, 0, stream>>>(static_cast<uint16_t*>(q), n_scales, 1000 + 100 * s + l);
      }
      ss[s].push_back(q);
      if (quant) {
        void *tw, *tq;
        CK(cudaMalloc(&tw, bytes));
        CK(cudaMalloc(&tq, n_scales * 2));
        wc::repack_quant_tiles(ctx, dt == DType::I4, static_cast<const uint8_t*>(p), static_cast<const uint16_t*>(q),
                              static_cast<uint8_t*>(tw), static_cast<uint16_t*>(tq), rows, sh.K, group_of(sh));
        tiled_ws[s].push_back(tw);
        tiled_ss[s].push_back(tq);
      }
    }
  }
  float *x, *y;
  CK(cudaMalloc(&x, kMaxK * 4));
  CK(cudaMalloc(&y, 4 * kMaxRows * 4));
  bench::fill_f32<<<1024, 256, 0, stream>>>(x, kMaxK, 7);
  float* ys[4] = {y, y + kMaxRows, y + 2 * kMaxRows, y + 3 * kMaxRows};

  struct Kernel { std::string name; wc::OneTokenTuning tuning; bool tiles = false; };
  const auto tuned = [](wc::OneTokenKernel k, int rows) { wc::OneTokenTuning t; t.kernel = k; t.rows = rows; return t; };
  const char* weft = dt == DType::I4 ? "weft (tensor cores)" : dt == DType::I8 ? "weft (streaming register)"
                                                                : "weft (bulk-copy rows where they take the shape)";
  std::vector<Kernel> kernels = {{weft, wc::OneTokenTuning{}}};
  if (!quant) kernels.push_back({"batched register", tuned(wc::OneTokenKernel::Batched, 0)});
  kernels.push_back({"streaming register, 2 rows", tuned(wc::OneTokenKernel::Streaming, 2)});
  kernels.push_back({"streaming register, 1 row a task", tuned(wc::OneTokenKernel::Streaming, 1)});
  kernels.push_back({"streaming register, 4 rows", tuned(wc::OneTokenKernel::Streaming, 4)});
  if (quant) kernels.push_back({"bulk-copy rows where they take the shape", tuned(wc::OneTokenKernel::Rows, 0)});
  // the tensor-core kernel on row-major codes (weft's own for int4; int8's bench form) and on tiles (quant-tiles.h)
  if (dt == DType::I8) kernels.push_back({"tensor cores (int8 bench form: s8 mma, x in 3 digits)", tuned(wc::OneTokenKernel::Mma, 0)});
  if (quant) kernels.push_back({"tensor cores, codes in tiles (quant-tiles.h)", wc::OneTokenTuning{}, true});
  const size_t row_major_mma = dt == DType::I8 ? kernels.size() - 2 : 0;
  const Kernel& reference = kernels[1];
  const auto run = [&](const Kernel& k, int s, int l) {
    const Shape& sh = shapes[s];
    const uint16_t* sc = static_cast<const uint16_t*>(ss[s][l]);
    const bool ok = k.tiles ? wc::gemv_one_token_mma(ctx, x, tiled_ws[s][l], dt, static_cast<const uint16_t*>(tiled_ss[s][l]),
                                                    group_of(sh), ys[s], sh.N, sh.K, sh.pairs, dev.prop.multiProcessorCount,
                                                    nullptr, true)
                  : sh.pairs ? wc::gemv_one_token_silu_pairs(ctx, x, ws[s][l], dt, sc, group_of(sh), ys[s], sh.N, sh.K, k.tuning)
                             : wc::gemv_one_token(ctx, x, ws[s][l], dt, sc, group_of(sh), ys[s], sh.N, sh.K, false, k.tuning);
    if (!ok) {
      std::fprintf(stderr, "gemv_one_token refused %s (%s)\n", sh.name, arg.c_str());
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
  for (int s = 0; s < 4; ++s) ref[s] = outputs(reference, s);
  if (kernels.back().tiles) {  // the same sums in the same order: tiles give the row-major kernel's outputs bit for bit
    int unequal = 0;
    for (int s = 0; s < 4; ++s) {
      const std::vector<float> a = outputs(kernels[row_major_mma], s), b = outputs(kernels.back(), s);
      for (size_t i = 0; i < a.size(); ++i) unequal += std::memcmp(&a[i], &b[i], 4) != 0;
    }
    std::printf("%s: tiles against row-major on tensor cores, outputs of layer 0 that differ: %d\n", arg.c_str(), unequal);
  }

  std::printf("\n%s: floor per layer %.1f us (%.1f MB at %.0f GB/s)\n", arg.c_str(), layer_bytes / (bw * 1e3), layer_bytes / 1e6, bw);
  std::printf("| kernel | layer us | TB/s | %% of floor | wqkv us | wo us | w13 us | w2 us | max rel err |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  // WEFT_BENCH_WEFT_ONLY: time weft's choice alone; WEFT_BENCH_TILES_ONLY: the kernel on tiles alone (int8, int4:
  // what a quantized checkpoint runs). The others still give the reference outputs.
  const bool weft_only = std::getenv("WEFT_BENCH_WEFT_ONLY") != nullptr;
  const bool tiles_only = quant && std::getenv("WEFT_BENCH_TILES_ONLY") != nullptr;
  for (const Kernel& k : kernels) {
    if (weft_only && &k != &kernels[0]) break;
    if (tiles_only && !k.tiles) continue;
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
  for (int s = 0; s < 4; ++s)
    for (int l = 0; l < layers; ++l) {
      CK(cudaFree(ws[s][l]));
      if (ss[s][l]) CK(cudaFree(ss[s][l]));
      if (quant) {
        CK(cudaFree(tiled_ws[s][l]));
        CK(cudaFree(tiled_ss[s][l]));
      }
    }
  CK(cudaFree(x));
  CK(cudaFree(y));
  return 0;
}

int main(int argc, char** argv) {
  bench::Device dev(cudaStreamNonBlocking);
  const double bw = wc::measure_read_bandwidth(dev.ctx, size_t{1} << 30, 10);
  std::printf("%s, read bandwidth %.0f GB/s\n", dev.prop.name, bw);
  if (argc < 2) return run_format(dev, bw, "bf16");
  for (int a = 1; a < argc; ++a)
    if (run_format(dev, bw, argv[a]) != 0) return 1;
  return 0;
}
