// Standalone check of gemv_one_token_imma (int4) against a double-precision CPU reference, compute-sanitizer friendly;
// int8 must be declined (nothing launched):
//   nvcc -std=c++17 -O3 -lineinfo -gencode arch=compute_90a,code=sm_90a -I native/src bench/kernels/gemv-imma-check.cu \
//     native/src/cuda/gemv-imma.cu native/src/cuda/device.cc -o /tmp/imma-check && /tmp/imma-check
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <cstring>
#include "cuda/gemv-imma.cuh"
using namespace weft;
static uint16_t bf16_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return uint16_t((u + 0x8000) >> 16); }
static float bf16_f(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
#define CK(c) do { cudaError_t e = (c); if (e != cudaSuccess) { printf("CUDA %s at %d: %s\n", #c, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)
int run(bool int4, bool pairs, int N, int K, int group, bool with_norm = false) {
  const int rows = pairs ? 2 * N : N;
  srand(N * 7 + K);
  std::vector<float> x(K);
  for (auto& v : x) v = (rand() / float(RAND_MAX) - 0.5f) * 4;
  std::vector<float> xres(K), ybr(K), nw(K);
  if (with_norm) {
    for (int k = 0; k < K; ++k) { xres[k] = (rand() / float(RAND_MAX) - 0.5f) * 3; ybr[k] = (rand() / float(RAND_MAX) - 0.5f); nw[k] = 0.5f + rand() / float(RAND_MAX); }
    double ss = 0; for (int k = 0; k < K; ++k) { const float sv = xres[k] + ybr[k]; ss += double(sv) * sv; }
    const float inv = 1.0f / std::sqrt(float(ss / K) + 1e-5f);
    for (int k = 0; k < K; ++k) x[k] = (xres[k] + ybr[k]) * inv * nw[k];
  }
  std::vector<int> vals(size_t(rows) * K);
  for (auto& v : vals) v = int4 ? rand() % 16 - 8 : rand() % 256 - 128;
  const int ng = int4 ? K / group : 1;
  std::vector<uint16_t> sc(size_t(rows) * ng);
  for (auto& s : sc) s = bf16_bits(0.001f + rand() / float(RAND_MAX) * 0.01f);
  std::vector<uint8_t> q(int4 ? size_t(rows) * K / 2 : size_t(rows) * K);
  for (size_t r = 0; r < size_t(rows); ++r)
    for (int k = 0; k < K; ++k) {
      const int v = vals[r * K + k];
      if (int4) { uint8_t& b = q[(r * K + k) / 2]; if (k % 2 == 0) b = uint8_t(v + 8); else b |= uint8_t((v + 8) << 4); }
      else q[r * K + k] = uint8_t(v & 255);
    }
  std::vector<double> ref(N);
  auto dot = [&](size_t r) { double s = 0; for (int k = 0; k < K; ++k) s += double(vals[r * K + k]) * bf16_f(sc[r * ng + (int4 ? k / group : 0)]) * x[k]; return s; };
  for (int n = 0; n < N; ++n) {
    if (pairs) { const double g = dot(n), u = dot(size_t(N) + n); ref[n] = g / (1 + std::exp(-g)) * u; }
    else ref[n] = dot(n);
  }
  float *dx, *dy; void* dw; uint16_t* ds;
  CK(cudaMalloc(&dx, K * 4)); CK(cudaMalloc(&dy, N * 4)); CK(cudaMalloc(&dw, q.size())); CK(cudaMalloc(&ds, sc.size() * 2));
  CK(cudaMemcpy(dx, (with_norm ? xres : x).data(), K * 4, cudaMemcpyHostToDevice));
  float *dyb = nullptr, *dnw = nullptr, *dsum = nullptr, *dnormed = nullptr;
  cuda::AddRmsNormInput nin{};
  if (with_norm) {
    CK(cudaMalloc(&dyb, K * 4)); CK(cudaMalloc(&dnw, K * 4)); CK(cudaMalloc(&dsum, K * 4)); CK(cudaMalloc(&dnormed, K * 4));
    CK(cudaMemcpy(dyb, ybr.data(), K * 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dnw, nw.data(), K * 4, cudaMemcpyHostToDevice));
    nin = cuda::AddRmsNormInput{dyb, dnw, false, 1e-5f, dsum, dnormed};
  }
  CK(cudaMemcpy(dw, q.data(), q.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ds, sc.data(), sc.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(dy, 0xff, N * 4));
  cudaStream_t st; CK(cudaStreamCreate(&st));
  cuda::Ctx ctx{nullptr, st, nullptr};
  const bool ok = cuda::gemv_one_token_imma(ctx, dx, dw, int4 ? DType::I4 : DType::I8, ds, int4 ? group : K, dy, N, K, pairs, with_norm ? &nin : nullptr);
  CK(cudaGetLastError());
  CK(cudaStreamSynchronize(st));
  if (ok != int4) {
    printf("imma %s N=%d K=%d: taken=%d, expected %d\n", int4 ? "int4" : "int8", N, K, ok, int(int4));
    return 1;
  }
  if (!ok) return 0;
  std::vector<float> y(N);
  CK(cudaMemcpy(y.data(), dy, N * 4, cudaMemcpyDeviceToHost));
  double mx = 0, err = 0;
  for (int n = 0; n < N; ++n) { mx = std::max(mx, std::fabs(ref[n])); err = std::max(err, std::isfinite(y[n]) ? std::fabs(y[n] - ref[n]) : 1e30); }
  double nerr = 0;
  if (with_norm) {
    std::vector<float> nd(K);
    CK(cudaMemcpy(nd.data(), dnormed, K * 4, cudaMemcpyDeviceToHost));
    for (int k = 0; k < K; ++k) nerr = std::max(nerr, double(std::fabs(nd[k] - x[k])));
  }
  printf("imma %s%s%s N=%d K=%d g=%d taken=%d max rel err %.2e%s\n", int4 ? "int4" : "int8", pairs ? " pairs" : "", with_norm ? " norm" : "", N, K, group, ok, err / mx, with_norm ? (nerr < 1e-5 ? " normed ok" : " NORMED WRONG") : "");
  if (with_norm && nerr >= 1e-5) return 1;
  cudaFree(dx); cudaFree(dy); cudaFree(dw); cudaFree(ds); cudaStreamDestroy(st);
  return err / mx < 1e-5 ? 0 : 1;
}
int main() {
  int bad = 0;
  bad += run(false, false, 40, 4096, 0);  // declined
  bad += run(true, false, 40, 4096, 128);
  bad += run(true, true, 40, 4096, 128);
  bad += run(true, false, 300, 11008, 128);
  bad += run(true, false, 4096, 14336, 128);
  bad += run(true, false, 64, 2048, 256);
  bad += run(true, false, 100, 4096, 128, true);
  bad += run(true, true, 100, 4096, 128, true);
  bad += run(true, true, 3000, 4096, 128, true);
  bad += run(true, false, 12288, 4096, 128, true);
  printf("%d failed\n", bad);
  return bad;
}
