// Standalone benchmark of weft::cuda::Matmul (GEMV for small T, cuBLAS for large T) on the shapes of
// Llama-2-7B / Llama-3-8B. Build and run: bench/kernels/run.sh (nvcc only, no Node.js).
//   matmul-bench [--quick] [--sweep] [--gated] [--no-pdl] [--json PATH]
// --sweep times the GEMV at each cluster size and ring depth; --gated times the fused SwiGLU GEMV (siluMulMatmul:
// x [T, 2K], silu(gate) * up formed while x is staged) beside the plain GEMV of the same weights, the cost the
// fusion adds against the siluMul kernel it saves (weft fuses up to Gemv::kMaxTokens tokens); --no-pdl launches
// every GEMV without programmatic dependent launch (weft launches with it: GemvTuning in gemv.cuh), to compare.
// Checks every (shape, T) against a double-accumulation reference kernel on fresh random data (output poisoned
// with NaN first), times with CUDA events (warm-up, median of >= 50 runs, rotating weight copies so the
// weights never sit in L2), and prints GB/s of weight bytes and % of the measured read bandwidth, TFLOP/s
// beside a plain cuBLAS bf16 GEMM of the same shape (x already bf16, fp32 out). Exit 1 on any failed check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/bandwidth.cuh"
#include "cuda/cublas-loader.h"
#include "cuda/matmul.cuh"
#include "error.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;

__device__ __forceinline__ uint32_t hash32(uint64_t v) {
  v ^= v >> 33; v *= 0xff51afd7ed558ccdull; v ^= v >> 33; v *= 0xc4ceb9fe1a85ec53ull; v ^= v >> 33;
  return static_cast<uint32_t>(v);
}
__device__ __forceinline__ float urand(uint64_t seed, size_t i) {  // uniform in [-1, 1)
  return (hash32(seed * 0x9e3779b97f4a7c15ull + i) >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

template <typename T>
__global__ void fill_kernel(T* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float v = urand(seed, i) * scale;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) p[i] = __float2bfloat16_rn(v);
    else if constexpr (std::is_same_v<T, __half>) p[i] = __float2half_rn(v);
    else p[i] = v;
  }
}
__global__ void poison_kernel(float* p, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = __int_as_float(0x7fc00000);
}
__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* o, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    o[i] = __float2bfloat16_rn(x[i]);
}

__device__ __forceinline__ double wval(const void* w, DType dt, size_t i) {
  if (dt == DType::BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
  if (dt == DType::F16) return __half2float(static_cast<const __half*>(w)[i]);
  return static_cast<const float*>(w)[i];
}
// xround: 0 exact fp32 x, 1 round x to bf16, 2 round x to f16 (what the GEMM path computes with).
__device__ __forceinline__ double xval(float v, int xround) {
  if (xround == 1) return __bfloat162float(__float2bfloat16_rn(v));
  if (xround == 2) return __half2float(__float2half_rn(v));
  return v;
}
// ref [nt, N] for tokens toks[0..nt): one warp per output, double accumulation.
__global__ void ref_kernel(const float* x, const void* w, DType dt, double* ref, const int* toks, int nt, int N, int K, int xround) {
  const int lane = threadIdx.x & 31;
  const size_t o = (blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x) >> 5;
  if (o >= static_cast<size_t>(nt) * N) return;
  const int ti = static_cast<int>(o / N), n = static_cast<int>(o % N);
  const float* xr = x + static_cast<size_t>(toks[ti]) * K;
  double s = 0;
  for (int k = lane; k < K; k += 32) s += wval(w, dt, static_cast<size_t>(n) * K + k) * xval(xr[k], xround);
  for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) ref[o] = s;
}

static size_t dsize(DType d) { return d == DType::F32 ? 4 : 2; }
static cudaStream_t g_stream;  // everything runs on the Matmul's stream (non-blocking: no implicit ordering)
static void fill(void* p, DType dt, size_t n, uint64_t seed, float scale) {
  if (dt == DType::BF16) fill_kernel<<<1024, 256, 0, g_stream>>>(static_cast<__nv_bfloat16*>(p), n, seed, scale);
  else if (dt == DType::F16) fill_kernel<<<1024, 256, 0, g_stream>>>(static_cast<__half*>(p), n, seed, scale);
  else fill_kernel<<<1024, 256, 0, g_stream>>>(static_cast<float*>(p), n, seed, scale);
  CK(cudaGetLastError());
  CK(cudaStreamSynchronize(g_stream));
}

static uint64_t g_seed = 12345;
static int g_failures = 0;
static const int kGemvMaxT = wc::Gemv::kMaxTokens;

// Relative error ||y - ref|| / ||ref|| over the checked tokens; NaN/unwritten outputs fail.
template <typename Run>
static double check(Run&& run, cudaStream_t s, const float* x, const void* w, DType dt, float* y, int T, int N, int K, int xround) {
  poison_kernel<<<1024, 256, 0, s>>>(y, static_cast<size_t>(T) * N);
  run(x, w, dt, y, T, N, K);
  std::vector<int> toks;
  if (T <= 16) for (int t = 0; t < T; ++t) toks.push_back(t);
  else toks = {0, 1, T / 2, T - 1};
  const int nt = static_cast<int>(toks.size());
  int* dtoks; double* dref;
  CK(cudaMalloc(&dtoks, nt * sizeof(int)));
  CK(cudaMalloc(&dref, static_cast<size_t>(nt) * N * sizeof(double)));
  CK(cudaMemcpy(dtoks, toks.data(), nt * sizeof(int), cudaMemcpyHostToDevice));
  const size_t warps = static_cast<size_t>(nt) * N;
  ref_kernel<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, s>>>(x, w, dt, dref, dtoks, nt, N, K, xround);
  CK(cudaGetLastError());
  CK(cudaStreamSynchronize(s));
  std::vector<double> ref(static_cast<size_t>(nt) * N);
  std::vector<float> out(static_cast<size_t>(T) * N);
  CK(cudaMemcpy(ref.data(), dref, ref.size() * sizeof(double), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(out.data(), y, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CK(cudaFree(dtoks)); CK(cudaFree(dref));
  double num = 0, den = 0;
  bool nan = false;
  for (int ti = 0; ti < nt; ++ti)
    for (int n = 0; n < N; ++n) {
      const double r = ref[static_cast<size_t>(ti) * N + n], v = out[static_cast<size_t>(toks[ti]) * N + n];
      if (!std::isfinite(v)) nan = true;
      num += (v - r) * (v - r);
      den += r * r;
    }
  // Every token written (not only the checked ones).
  for (float v : out) if (!std::isfinite(v)) nan = true;
  return nan ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}

struct Timing { double med_ms = 0; };
template <typename F>
static double time_median(cudaStream_t s, int reps, F&& f) {
  for (int i = 0; i < 5; ++i) f(i);
  std::vector<cudaEvent_t> ev(reps + 1);
  for (auto& e : ev) CK(cudaEventCreate(&e));
  CK(cudaEventRecord(ev[0], s));
  // Events between launches: each interval is one launch (the queue stays full, launch gaps excluded).
  for (int i = 0; i < reps; ++i) {
    f(i);
    CK(cudaEventRecord(ev[i + 1], s));
  }
  CK(cudaStreamSynchronize(s));
  std::vector<double> ms(reps);
  for (int i = 0; i < reps; ++i) {
    float m; CK(cudaEventElapsedTime(&m, ev[i], ev[i + 1])); ms[i] = m;
  }
  for (auto& e : ev) CK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return ms[reps / 2];
}

// Time of one run inside a CUDA graph of `per` runs (rotating weights), median of 20 replays.
template <typename F>
static double time_graph(cudaStream_t s, int per, F&& f) {
  cudaGraph_t g; cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < per; ++i) f(i);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, s));
  double m = time_median(s, 20, [&](int) { CK(cudaGraphLaunch(ge, s)); });
  CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
  return m / per;
}

struct Row { int N, K, T; std::string path; double ms, gbs, pct, tflops, graph_gbs, graph_pct, anchor_ms, anchor_tflops, err; };

int main(int argc, char** argv) {
  bool quick = false, sweep = false, gated = false, pdl = true;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    else if (!std::strcmp(argv[i], "--gated")) gated = true;
    else if (!std::strcmp(argv[i], "--no-pdl")) pdl = false;
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
  }
  try {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    g_stream = s;
    const wc::Ctx ctx{nullptr, s, nullptr};  // no engine: errors throw without marking anything dead
    const double bw = wc::measure_read_bandwidth(ctx, size_t(2) << 30, 20);
    std::printf("device: %s, %d SMs, L2 %d MB; measured read bandwidth %.0f GB/s\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20, bw);
    wc::Matmul mm(ctx);
    wc::Gemv gemv_only(nullptr, s);  // the GEMV alone, with the tuning under test
    // mm.run as weft runs it, except that the GEMV path (T <= 8) takes the tuning of --no-pdl.
    auto run = [&](const float* x, const void* w, DType dt, float* y, int T, int N, int K) {
      if (pdl || T > kGemvMaxT) mm.run(x, w, dt, y, T, N, K);
      else gemv_only.run(x, w, dt, y, T, N, K, false, wc::GemvTuning{0, 0, 0, false});
    };
    const auto& cb = wc::cublas::api();
    wc::cublas::Handle anchor;
    if (cb.create(&anchor) != 0) throw weft::Error("bench", "cublasCreate failed");
    void* ws; CK(cudaMalloc(&ws, 32 << 20));
    cb.set_workspace(anchor, ws, 32 << 20);
    cb.set_stream(anchor, s);

    // ---- correctness of odd shapes, f16/f32 weights, scalar fallback, graph capture ----
    struct Odd { int N, K, T; DType dt; };
    std::vector<Odd> odd = {{1000, 1000, 3, DType::BF16}, {1000, 1000, 1, DType::F32}, {4100, 4104, 5, DType::BF16},
                            {777, 4096, 7, DType::F16},    {4096, 4096, 8, DType::F16}, {4096, 4096, 2, DType::F32},
                            {4096, 4096, 8, DType::F32},   {1, 8, 1, DType::BF16},      {33, 14336, 8, DType::BF16},
                            {4096, 4096, 64, DType::F16},  {1000, 1000, 40, DType::F32}, {513, 2056, 24, DType::BF16},
                            {4096, 4092, 6, DType::F32},   {300, 4096, 4, DType::F16},  {5, 16, 8, DType::BF16},
                            {7, 24, 3, DType::F32},        {3, 8, 2, DType::F16}};
    for (const Odd& o : odd) {
      void* w; float *x, *y;
      CK(cudaMalloc(&w, size_t(o.N) * o.K * dsize(o.dt)));
      CK(cudaMalloc(&x, size_t(o.T) * o.K * 4));
      CK(cudaMalloc(&y, size_t(o.T) * o.N * 4));
      fill(w, o.dt, size_t(o.N) * o.K, g_seed++, 0.05f);
      fill(x, DType::F32, size_t(o.T) * o.K, g_seed++, 1.0f);
      const bool gemm = o.T > kGemvMaxT;
      const int xround = gemm ? (o.dt == DType::BF16 ? 1 : o.dt == DType::F16 ? 2 : 0) : 0;
      const double err = check(run, s, x, w, o.dt, y, o.T, o.N, o.K, xround);
      const double tol = gemm && o.dt != DType::F32 ? 1e-4 : 1e-5;
      const bool ok = err <= tol;
      if (!ok) ++g_failures;
      std::printf("check %-5s N=%-6d K=%-6d T=%-3d %s rel err %.2e (tol %.0e)\n", weft::dtype_name(o.dt), o.N, o.K, o.T,
                  ok ? "ok  " : "FAIL", err, tol);
      CK(cudaFree(w)); CK(cudaFree(x)); CK(cudaFree(y));
    }
    {  // graph capture of the GEMV path, then replay and compare
      const int N = 4096, K = 4096, T = 4;
      void* w; float *x, *y;
      CK(cudaMalloc(&w, size_t(N) * K * 2)); CK(cudaMalloc(&x, size_t(T) * K * 4)); CK(cudaMalloc(&y, size_t(T) * N * 4));
      fill(w, DType::BF16, size_t(N) * K, g_seed++, 0.05f);
      fill(x, DType::F32, size_t(T) * K, g_seed++, 1.0f);
      const double e1 = check(run, s, x, w, DType::BF16, y, T, N, K, 0);
      cudaGraph_t g; cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      run(x, w, DType::BF16, y, T, N, K);
      CK(cudaStreamEndCapture(s, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      std::vector<float> a(size_t(T) * N), b(size_t(T) * N);
      CK(cudaMemcpy(a.data(), y, a.size() * 4, cudaMemcpyDeviceToHost));
      poison_kernel<<<1024, 256, 0, s>>>(y, size_t(T) * N);
      CK(cudaGraphLaunch(ge, s));
      CK(cudaStreamSynchronize(s));
      CK(cudaMemcpy(b.data(), y, b.size() * 4, cudaMemcpyDeviceToHost));
      const bool same = std::memcmp(a.data(), b.data(), a.size() * 4) == 0;  // also: deterministic
      if (!same || e1 > 1e-5) ++g_failures;
      std::printf("check graph capture T=%d: %s (bitwise equal to the eager run)\n", T, same ? "ok" : "FAIL");
      CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
      CK(cudaFree(w)); CK(cudaFree(x)); CK(cudaFree(y));
    }

    struct Shape { int N, K; const char* name; };
    std::vector<Shape> shapes = {{4096, 4096, "o 7B/8B"},      {12288, 4096, "qkv 7B"},  {6144, 4096, "qkv 8B"},
                                 {22016, 4096, "gate/up 7B"},  {28672, 4096, "gate/up 8B"}, {4096, 11008, "down 7B"},
                                 {4096, 14336, "down 8B"},     {32000, 4096, "head 7B"}, {128256, 4096, "head 8B"}};
    std::vector<int> Ts = {1, 2, 4, 8, 16, 64, 1024};
    if (quick) Ts = {1, 8, 16, 1024};
    const int reps = 60;
    const size_t rotate_bytes = size_t(320) << 20;  // > 6x L2: rotating copies keep weights out of L2

    if (sweep) {
      std::printf("\nsweep: GEMV GB/s by cluster size C (K splits, 0 = auto) and 16-byte steps per ring stage u\n");
      std::vector<Shape> sw = {shapes[0], shapes[1], shapes[3], shapes[5], shapes[6], shapes[8]};
      for (const Shape& sh : sw) {
        const size_t wbytes = size_t(sh.N) * sh.K * 2;
        const int copies = static_cast<int>(std::min<size_t>(8, std::max<size_t>(1, (rotate_bytes + wbytes - 1) / wbytes)));
        std::vector<void*> ws_(copies);
        for (auto& p : ws_) { CK(cudaMalloc(&p, wbytes)); fill(p, DType::BF16, size_t(sh.N) * sh.K, g_seed++, 0.05f); }
        float *x, *y;
        CK(cudaMalloc(&x, size_t(8) * sh.K * 4)); CK(cudaMalloc(&y, size_t(8) * sh.N * 4));
        fill(x, DType::F32, size_t(8) * sh.K, g_seed++, 1.0f);
        for (int T : {1, 4, 8}) {
          std::printf("%-6dx%-6d T=%d:", sh.N, sh.K, T);
          for (int C : {0, 1, 2, 4, 8})
            for (int bps : {1, 2}) {  // u
              const wc::GemvTuning tuning{C, 0, bps, pdl};
              try {
                const double ms = time_median(s, 40, [&](int i) {
                  gemv_only.run(x, ws_[i % copies], DType::BF16, y, T, sh.N, sh.K, false, tuning);
                });
                std::printf(" C%d/u%d %.0f", C, bps, wbytes / (ms * 1e-3) / 1e9);
              } catch (const weft::Error&) {
                std::printf(" C%d/u%d -", C, bps);
              }
            }
          std::printf("\n");
        }
        for (auto p : ws_) CK(cudaFree(p));
        CK(cudaFree(x)); CK(cudaFree(y));
      }
    }

    if (gated) {
      std::printf("\ngated: fused siluMul GEMV (x [T, 2K]) against the plain GEMV (x [T, K]), bf16 weights\n");
      const wc::GemvTuning tuning{0, 0, 0, pdl};
      for (const Shape& sh : {shapes[5], shapes[6]}) {  // the down projections: K is the SwiGLU width
        const size_t wbytes = size_t(sh.N) * sh.K * 2;
        const int copies = static_cast<int>(std::min<size_t>(8, std::max<size_t>(1, (rotate_bytes + wbytes - 1) / wbytes)));
        std::vector<void*> wg(copies);
        for (auto& p : wg) { CK(cudaMalloc(&p, wbytes)); fill(p, DType::BF16, size_t(sh.N) * sh.K, g_seed++, 0.05f); }
        float *x, *y;
        CK(cudaMalloc(&x, size_t(kGemvMaxT) * 2 * sh.K * 4)); CK(cudaMalloc(&y, size_t(kGemvMaxT) * sh.N * 4));
        fill(x, DType::F32, size_t(kGemvMaxT) * 2 * sh.K, g_seed++, 1.0f);
        for (int T = 1; T <= kGemvMaxT; T *= 2) {
          const double fused = time_median(s, reps, [&](int i) {
            gemv_only.run(x, wg[i % copies], DType::BF16, y, T, sh.N, sh.K, true, tuning);
          });
          const double plain = time_median(s, reps, [&](int i) {
            gemv_only.run(x, wg[i % copies], DType::BF16, y, T, sh.N, sh.K, false, tuning);
          });
          std::printf("%-11s %6dx%-6d T=%d: fused %.4f ms, plain %.4f ms (+%.4f ms)\n", sh.name, sh.N, sh.K, T, fused,
                      plain, fused - plain);
        }
        for (auto p : wg) CK(cudaFree(p));
        CK(cudaFree(x)); CK(cudaFree(y));
      }
    }

    std::vector<Row> rows;
    std::printf("\n");
    for (const Shape& sh : shapes) {
      const size_t wbytes = size_t(sh.N) * sh.K * 2;
      const int copies = static_cast<int>(std::min<size_t>(8, std::max<size_t>(1, (rotate_bytes + wbytes - 1) / wbytes)));
      std::vector<void*> wsv(copies);
      for (auto& p : wsv) { CK(cudaMalloc(&p, wbytes)); fill(p, DType::BF16, size_t(sh.N) * sh.K, g_seed++, 0.05f); }
      const int Tmax = Ts.back();
      float *x, *y; __nv_bfloat16* xb;
      CK(cudaMalloc(&x, size_t(Tmax) * sh.K * 4)); CK(cudaMalloc(&y, size_t(Tmax) * sh.N * 4));
      CK(cudaMalloc(&xb, size_t(Tmax) * sh.K * 2));
      for (int T : Ts) {
        fill(x, DType::F32, size_t(T) * sh.K, g_seed++, 1.0f);
        to_bf16_kernel<<<1024, 256, 0, s>>>(x, xb, size_t(T) * sh.K);
        const bool gemv = T <= kGemvMaxT;
        Row r{sh.N, sh.K, T, gemv ? "gemv" : "cublas"};
        r.err = check(run, s, x, wsv[0], DType::BF16, y, T, sh.N, sh.K, gemv ? 0 : 1);
        const double tol = gemv ? 1e-5 : 1e-4;
        if (!(r.err <= tol)) {
          ++g_failures;
          std::printf("FAIL %dx%d T=%d rel err %.2e (tol %.0e)\n", sh.N, sh.K, T, r.err, tol);
        }
        r.ms = time_median(s, reps, [&](int i) { run(x, wsv[i % copies], DType::BF16, y, T, sh.N, sh.K); });
        const float alpha = 1.f, beta = 0.f;
        auto anchor_run = [&](int i) {
          if (cb.gemm_ex(anchor, wc::cublas::OP_T, wc::cublas::OP_N, sh.N, T, sh.K, &alpha, wsv[i % copies], CUDA_R_16BF, sh.K,
                         xb, CUDA_R_16BF, sh.K, &beta, y, CUDA_R_32F, sh.N, wc::cublas::COMPUTE_32F, wc::cublas::GEMM_DEFAULT) != 0)
            throw weft::Error("bench", "anchor cublasGemmEx failed");
        };
        r.anchor_ms = time_median(s, reps, anchor_run);
        const double flops = 2.0 * T * sh.N * sh.K;
        r.gbs = wbytes / (r.ms * 1e-3) / 1e9;
        r.pct = 100.0 * r.gbs / bw;
        r.tflops = flops / (r.ms * 1e-3) / 1e12;
        r.anchor_tflops = flops / (r.anchor_ms * 1e-3) / 1e12;
        r.graph_gbs = r.graph_pct = 0;
        if (gemv) {
          const double gms = time_graph(s, 20, [&](int i) { run(x, wsv[i % copies], DType::BF16, y, T, sh.N, sh.K); });
          r.graph_gbs = wbytes / (gms * 1e-3) / 1e9;
          r.graph_pct = 100.0 * r.graph_gbs / bw;
        }
        rows.push_back(r);
        std::printf("%-11s %6dx%-6d T=%-5d %-6s %8.4f ms %6.0f GB/s %5.1f%% | graph %6.0f GB/s %5.1f%% | %7.1f TFLOP/s | cuBLAS bf16 %8.4f ms %7.1f TFLOP/s | err %.1e\n",
                    sh.name, sh.N, sh.K, T, r.path.c_str(), r.ms, r.gbs, r.pct, r.graph_gbs, r.graph_pct, r.tflops, r.anchor_ms,
                    r.anchor_tflops, r.err);
        std::fflush(stdout);
      }
      for (auto p : wsv) CK(cudaFree(p));
      CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(xb));
    }

    // ---- final table ----
    std::printf("\n## %s, measured read bandwidth %.0f GB/s (bf16 weights; GB/s = weight bytes / median time)\n", prop.name, bw);
    std::printf("| N x K | T | path | time ms | GB/s | %% of BW | graph GB/s (%% BW) | TFLOP/s | cuBLAS bf16 ms | cuBLAS TFLOP/s | rel err |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : rows)
      std::printf("| %dx%d | %d | %s | %.4f | %.0f | %.1f | %s | %.1f | %.4f | %.1f | %.1e |\n", r.N, r.K, r.T, r.path.c_str(), r.ms,
                  r.gbs, r.pct, r.graph_gbs > 0 ? (std::to_string(int(r.graph_gbs + 0.5)) + " (" + std::to_string(int(r.graph_pct * 10 + 0.5) / 10.0).substr(0, 4) + ")").c_str() : "-",
                  r.tflops, r.anchor_ms, r.anchor_tflops, r.err);
    std::string json = "{\"device\":\"" + std::string(prop.name) + "\",\"read_bw_gbs\":" + std::to_string(bw) + ",\"failures\":" +
                       std::to_string(g_failures) + ",\"rows\":[";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      char buf[400];
      std::snprintf(buf, sizeof buf, "%s{\"N\":%d,\"K\":%d,\"T\":%d,\"path\":\"%s\",\"ms\":%.5f,\"gbs\":%.1f,\"pct_bw\":%.2f,\"graph_gbs\":%.1f,\"tflops\":%.2f,\"cublas_ms\":%.5f,\"cublas_tflops\":%.2f,\"err\":%.2e}",
                    i ? "," : "", r.N, r.K, r.T, r.path.c_str(), r.ms, r.gbs, r.pct, r.graph_gbs, r.tflops, r.anchor_ms, r.anchor_tflops, r.err);
      json += buf;
    }
    json += "]}";
    std::printf("%s\n", json.c_str());
    if (!json_path.empty()) {
      FILE* f = std::fopen(json_path.c_str(), "w");
      if (f) { std::fprintf(f, "%s\n", json.c_str()); std::fclose(f); }
    }
    std::printf("%s: %d failed checks\n", g_failures ? "FAIL" : "OK", g_failures);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return g_failures ? 1 : 0;
}
