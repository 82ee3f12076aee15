// Standalone benchmark of weft's quantized GEMV (gemv-quant.cuh: int8 per channel, int4 in groups) beside the bf16
// GEMV of the same shape, on the Llama-2-7B decode shapes. Build and run: bench/kernels/quant-run.sh (nvcc only).
//   quant-bench [--quick] [--sweep] [--only SHAPE FORMAT T] [--batches]   (e.g. --only wqkv int8 1, for a profiler)
//   quant-bench --one-token [--sweep]   (the one-token table alone: see one_token_table)
//   quant-bench --split                 (bf16 batches 1-8: the GEMV against cuBLAS on split x, split_table)
// Per (shape, format, T): the path before the tensor-core kernel ("old": gemv_one_token for one int8 or int4 token, else
// gemv.cu's ring kernel) and the tensor-core kernel ("new": gemv-quant-mma.cu; "-" where it refuses the shape),
// each timed with CUDA events (median of 50 after warm-up, rotating weight copies so the weights never sit in L2)
// as ms and TB/s of weight + scale bytes, beside the bf16 GEMV's ms and TB/s; and each checked against a
// double-accumulation reference of the dequantized weights: max |y - ref| / max |ref| (old within 1e-5, new within
// 2e-3: x rounded to f16, and for groups smaller than its chunk the scaled weights too). --sweep also times the new kernel at each cluster size and depth it takes.
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
#include "cuda/gemv-one-token.cuh"
#include "cuda/gemv-quant-mma.cuh"
#include "cuda/gemv-quant.cuh"
#include "cuda/matmul.cuh"
#include "cuda/quant-tiles.cuh"
#include "error.h"
#include "quant-tiles.h"
#include "bench-device.cuh"

using weft::DType;
namespace wc = weft::cuda;

// Random bytes (the int8 values or int4 code pairs), scales in [0.5, 1.5) / 64 as bf16; x in [-1, 1) is
// bench::fill_f32's.
__global__ void fill_bytes(uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(weft::splitmix64(weft::splitmix64(seed) ^ i));
}
__global__ void fill_scales(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16_rn((1.0f + 0.5f * bench::uniform(seed, i)) / 64.0f);
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
  const size_t row_bytes = w.dtype == DType::I8 ? K : K / 2, n_groups = K / w.group;
  for (int k = lane; k < K; k += 32) {
    const size_t si = w.tiles ? weft::tile_scale_index(n, k / w.group, n_groups) : n * n_groups + k / w.group;
    const float scale = __uint_as_float(static_cast<uint32_t>(w.scales[si]) << 16);
    const size_t byte = w.dtype == DType::I8 ? k : k / 2;
    const uint8_t b = q[w.tiles ? weft::tile_code_offset(n, byte, row_bytes) : n * row_bytes + byte];
    const int v = w.dtype == DType::I8 ? static_cast<int8_t>(b) : ((b >> ((k & 1) * 4)) & 0xf) - 8;
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

// max |got - want| / max |want| (a non-finite output counts as an error of 1e30).
static double max_rel_err(const float* y, const double* ref, size_t n) {
  std::vector<float> got(n);
  std::vector<double> want(n);
  CK(cudaMemcpy(got.data(), y, n * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(want.data(), ref, n * 8, cudaMemcpyDeviceToHost));
  double err = 0, scale = 0;
  for (size_t i = 0; i < n; ++i) {
    err = std::max(err, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : 1e30);
    scale = std::max(scale, std::fabs(want[i]));
  }
  return err / std::max(scale, 1e-30);
}

// The one-token table (the end of every run; alone with --one-token): per shape and format (bf16, int8 per channel,
// int4 g128) at T = 1, the previous kernel (gemv_one_token's batched kernel for bf16 and int8; the tensor-core
// kernel for int4, which weft ran there) beside the streaming kernel (weft's for int8 and int4; bf16 stays on the
// batched one), ms and GB/s of weight + scale bytes, and the streaming kernel's max |y - ref| / max |ref|
// (quantized: the double reference; bf16: the batched kernel, both fp32 sums), bound 1e-5. With sweep, also each
// rows-per-task choice (1, 2, 4).
static int one_token_table(const wc::Ctx& ctx, cudaStream_t stream, double bw, bool sweep) {
  struct Shape { const char* name; int N, K; bool gated; };
  const Shape shapes[] = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false}, {"w13", 22016, 4096, false},
                          {"w2 (gated)", 4096, 11008, true}, {"lm_head", 32000, 4096, false}};
  struct Format { const char* name; DType dt; int group; };  // group 0: per channel
  const Format formats[] = {{"bf16", DType::BF16, 0}, {"int8", DType::I8, 0}, {"int4 g128", DType::I4, 128}};
  int failures = 0;
  double layer_prev[3] = {}, layer_new[3] = {}, layer_bytes[3] = {};
  std::printf("\none token (T = 1): the previous kernel (bf16/int8: batched one-token kernel; int4: tensor cores) "
              "beside the streaming one-token kernel (read bandwidth %.0f GB/s)\n", bw);
  std::printf("%-11s %-10s %9s %7s %9s %7s %8s %9s  %s\n", "shape", "format", "prev ms", "GB/s", "new ms", "GB/s",
              "new/prev", "new err", sweep ? "rows 1 / 2 / 4 ms" : "");
  for (const Shape& sh : shapes) {
    const size_t x_elems = static_cast<size_t>(sh.K) * (sh.gated ? 2 : 1);
    float *x, *y, *y_prev;
    double* ref;
    CK(cudaMalloc(&x, x_elems * 4));
    CK(cudaMalloc(&y, static_cast<size_t>(sh.N) * 4));
    CK(cudaMalloc(&y_prev, static_cast<size_t>(sh.N) * 4));
    CK(cudaMalloc(&ref, static_cast<size_t>(sh.N) * 8));
    bench::fill_f32<<<1024, 256, 0, stream>>>(x, x_elems, 7);
    for (size_t fi = 0; fi < 3; ++fi) {
      const Format& f = formats[fi];
      const bool quant = f.dt != DType::BF16;
      const int group = f.group ? f.group : sh.K;
      const size_t wbytes = static_cast<size_t>(sh.N) * sh.K * (f.dt == DType::BF16 ? 2 : 1) / (f.dt == DType::I4 ? 2 : 1);
      const size_t n_scales = quant ? static_cast<size_t>(sh.N) * (sh.K / group) : 0;
      const size_t bytes = wbytes + n_scales * 2;
      const int copies = static_cast<int>(std::max<size_t>(2, (size_t{400} << 20) / bytes + 1));
      std::vector<wc::QuantMatrix> ws(copies);
      for (int c = 0; c < copies; ++c) {
        void* q;
        void* s = nullptr;
        CK(cudaMalloc(&q, wbytes));
        if (f.dt == DType::BF16) bench::fill_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(q), wbytes / 2, 5 + c);
        else fill_bytes<<<1024, 256, 0, stream>>>(static_cast<uint8_t*>(q), wbytes, 11 + c);
        if (quant) {
          CK(cudaMalloc(&s, n_scales * 2));
          fill_scales<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(s), n_scales, 13 + c);
        }
        ws[c] = wc::QuantMatrix{q, static_cast<const uint16_t*>(s), f.dt, group};
      }
      const auto run_new = [&](int c, wc::OneTokenTuning tuning) {
        tuning.kernel = wc::OneTokenKernel::Streaming;
        const wc::QuantMatrix& w = ws[c];
        if (!wc::gemv_one_token(ctx, x, w.q, w.dtype, w.scales, w.group, y, sh.N, sh.K, sh.gated, tuning)) {
          std::fprintf(stderr, "gemv_one_token refused %s %s\n", sh.name, f.name);
          std::exit(2);
        }
      };
      const auto run_prev = [&](int c, float* out) {
        const wc::QuantMatrix& w = ws[c];
        wc::OneTokenTuning batched;
        batched.kernel = wc::OneTokenKernel::Batched;
        if (f.dt == DType::I4) wc::quant_gemv_mma(ctx, x, w, out, 1, sh.N, sh.K, sh.gated);
        else if (!wc::gemv_one_token(ctx, x, w.q, w.dtype, w.scales, w.group, out, sh.N, sh.K, sh.gated, batched)) std::exit(2);
      };
      // The check: the streaming kernel against the reference.
      CK(cudaMemsetAsync(y, 0xff, static_cast<size_t>(sh.N) * 4, stream));
      run_new(0, wc::OneTokenTuning{});
      double err;
      if (quant) {
        ref_kernel<<<static_cast<unsigned>((static_cast<size_t>(sh.N) * 32 + 255) / 256), 256, 0, stream>>>(x, ws[0], ref, 1, sh.N, sh.K, sh.gated);
        CK(cudaStreamSynchronize(stream));
        err = max_rel_err(y, ref, sh.N);
      } else {
        run_prev(0, y_prev);
        CK(cudaStreamSynchronize(stream));
        std::vector<float> a(sh.N), b(sh.N);
        CK(cudaMemcpy(a.data(), y, sh.N * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), y_prev, sh.N * 4, cudaMemcpyDeviceToHost));
        bool nan = false;
        err = bench::rel_err(a, b, nan);
        if (nan) err = 1e30;
      }
      const bool ok = err <= 1e-5;
      failures += !ok;
      const double prev_ms = median_ms(stream, copies, [&](int c) { run_prev(c, y_prev); });
      const double new_ms = median_ms(stream, copies, [&](int c) { run_new(c, wc::OneTokenTuning{}); });
      std::string rows = "";
      if (sweep)
        for (int r : {1, 2, 4}) {
          wc::OneTokenTuning t;
          t.rows = r;
          rows += std::to_string(median_ms(stream, copies, [&](int c) { run_new(c, t); })).substr(0, 6) + (r < 4 ? " / " : "");
        }
      if (std::strcmp(sh.name, "lm_head") != 0) {
        layer_prev[fi] += prev_ms;
        layer_new[fi] += new_ms;
        layer_bytes[fi] += bytes;
      }
      std::printf("%-11s %-10s %9.4f %7.0f %9.4f %7.0f %7.2fx %9.2g  %s%s\n", sh.name, f.name, prev_ms, bytes / (prev_ms * 1e6),
                  new_ms, bytes / (new_ms * 1e6), prev_ms / new_ms, err, rows.c_str(), ok ? "" : "  CHECK FAILED");
      for (auto& w : ws) {
        CK(cudaFree(const_cast<void*>(w.q)));
        if (w.scales) CK(cudaFree(const_cast<uint16_t*>(w.scales)));
      }
    }
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(y_prev));
    CK(cudaFree(ref));
  }
  std::printf("\none Llama-2-7B layer's four GEMVs at one token (wqkv + wo + w13 + w2):\n");
  std::printf("| format | previous ms | GB/s | streaming ms | GB/s | speedup | floor ms at %.0f GB/s |\n|---|---|---|---|---|---|---|\n", bw);
  for (size_t fi = 0; fi < 3; ++fi)
    std::printf("| %s | %.4f | %.0f | %.4f | %.0f | %.2fx | %.4f |\n", formats[fi].name, layer_prev[fi],
                layer_bytes[fi] / (layer_prev[fi] * 1e6), layer_new[fi], layer_bytes[fi] / (layer_new[fi] * 1e6),
                layer_prev[fi] / layer_new[fi], layer_bytes[fi] / (bw * 1e6));
  return failures;
}

// --split: bf16 decode batches, gemv.cu's GEMV against cuBLAS on split x (Gemm::run_split, which Matmul takes where
// split_pays), on one Llama-2-7B layer's four products; each pair's outputs compared (both hold x to
// ~2^-17, so they agree to ~1e-6 of max|y|).
static int split_table(cudaStream_t stream, wc::Matmul& matmul, double bw) {
  struct Shape { const char* name; int N, K; bool gated; };
  const Shape shapes[] = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false}, {"w13", 22016, 4096, false},
                          {"w2 (gated)", 4096, 11008, true}};
  const int tokens[] = {1, 2, 3, 4, 5, 6, 8};
  double layer_gemv[9] = {}, layer_split[9] = {}, layer_bytes = 0;
  int failures = 0;
  std::printf("\nbf16 decode batches: gemv.cu's GEMV against cuBLAS on split x (Gemm::run_split), ms\n");
  std::printf("%-11s %2s %9s %7s %9s %7s %8s %9s\n", "shape", "T", "gemv ms", "TB/s", "split ms", "TB/s", "gemv/split", "rel diff");
  for (const Shape& sh : shapes) {
    const size_t bytes = static_cast<size_t>(sh.N) * sh.K * 2;
    layer_bytes += bytes;
    const int copies = static_cast<int>(std::max<size_t>(2, (size_t{400} << 20) / bytes + 1));
    std::vector<void*> ws(copies);
    for (int c = 0; c < copies; ++c) {
      CK(cudaMalloc(&ws[c], bytes));
      bench::fill_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(ws[c]), bytes / 2, 21 + c);
    }
    const size_t x_elems = static_cast<size_t>(8) * sh.K * (sh.gated ? 2 : 1);
    float *x, *ya, *yb;
    CK(cudaMalloc(&x, x_elems * 4));
    CK(cudaMalloc(&ya, static_cast<size_t>(8) * sh.N * 4));
    CK(cudaMalloc(&yb, static_cast<size_t>(8) * sh.N * 4));
    bench::fill_f32<<<1024, 256, 0, stream>>>(x, x_elems, 9);
    for (int T : tokens) {
      const auto gemv = [&](int c, float* y) { matmul.gemv().run(x, ws[c], DType::BF16, y, T, sh.N, sh.K, sh.gated); };
      const auto split = [&](int c, float* y) { matmul.gemm().run_split(x, ws[c], y, T, sh.N, sh.K, sh.gated); };
      gemv(0, ya);
      split(0, yb);
      CK(cudaStreamSynchronize(stream));
      const size_t outs = static_cast<size_t>(T) * sh.N;
      std::vector<float> a(outs), b(outs);
      CK(cudaMemcpy(a.data(), ya, outs * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(b.data(), yb, outs * 4, cudaMemcpyDeviceToHost));
      bool nan = false;
      const double diff = bench::rel_err(b, a, nan);
      const bool ok = !nan && diff <= 1e-5;
      failures += !ok;
      const double g = median_ms(stream, copies, [&](int c) { gemv(c, ya); });
      const double sp = median_ms(stream, copies, [&](int c) { split(c, yb); });
      layer_gemv[T] += g;
      layer_split[T] += sp;
      std::printf("%-11s %2d %9.4f %7.2f %9.4f %7.2f %9.2fx %9.2g%s\n", sh.name, T, g, bytes / (g * 1e9), sp,
                  bytes / (sp * 1e9), g / sp, diff, ok ? "" : "  CHECK FAILED");
    }
    for (void* p : ws) CK(cudaFree(p));
    CK(cudaFree(x));
    CK(cudaFree(ya));
    CK(cudaFree(yb));
  }
  std::printf("\none Llama-2-7B layer's four bf16 products (floor %.4f ms at %.0f GB/s):\n| T | gemv ms | split ms | gemv/split |\n|---|---|---|---|\n",
              layer_bytes / (bw * 1e6), bw);
  for (int T : tokens)
    std::printf("| %d | %.4f | %.4f | %.2fx |\n", T, layer_gemv[T], layer_split[T], layer_gemv[T] / layer_split[T]);
  return failures;
}

// Copies of one quantized weight [N, K] (random codes, scales near 1/64), as many as fill ~400 MB so that timed runs
// cycle through more than the L2 holds; `bytes` is one copy's codes and scales; tiles: each repacked into tiles
// (quant-tiles.h). free_copies releases them.
struct QuantCopies {
  std::vector<wc::QuantMatrix> ws;
  size_t bytes = 0;
};
static QuantCopies quant_copies(const wc::Ctx& ctx, cudaStream_t stream, DType dt, int group, int N, int K,
                                bool tiles = false) {
  const size_t qbytes = static_cast<size_t>(N) * K / (dt == DType::I4 ? 2 : 1), n_scales = static_cast<size_t>(N) * (K / group);
  QuantCopies out;
  out.bytes = qbytes + n_scales * 2;
  out.ws.resize(std::max<size_t>(2, (size_t{400} << 20) / out.bytes + 1));
  for (size_t c = 0; c < out.ws.size(); ++c) {
    void* q;
    void* s;
    CK(cudaMalloc(&q, qbytes));
    CK(cudaMalloc(&s, n_scales * 2));
    fill_bytes<<<1024, 256, 0, stream>>>(static_cast<uint8_t*>(q), qbytes, 11 + c);
    fill_scales<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(s), n_scales, 13 + c);
    if (tiles) {
      void *tq, *ts;
      CK(cudaMalloc(&tq, qbytes));
      CK(cudaMalloc(&ts, n_scales * 2));
      wc::repack_quant_tiles(ctx, dt == DType::I4, static_cast<const uint8_t*>(q), static_cast<const uint16_t*>(s),
                             static_cast<uint8_t*>(tq), static_cast<uint16_t*>(ts), N, K, group);
      CK(cudaStreamSynchronize(stream));
      CK(cudaFree(q));
      CK(cudaFree(s));
      q = tq;
      s = ts;
    }
    out.ws[c] = wc::QuantMatrix{q, static_cast<const uint16_t*>(s), dt, group, tiles};
  }
  return out;
}
static void free_copies(QuantCopies& copies) {
  for (auto& w : copies.ws) {
    CK(cudaFree(const_cast<void*>(w.q)));
    CK(cudaFree(const_cast<uint16_t*>(w.scales)));
  }
  copies.ws.clear();
}

// --batches: the tensor-core GEMV alone (quant_gemv_mma: one pass, or the product's passes where one does not fit)
// at decode batches of 1-64 tokens on Llama-3-8B's w13 and w2 shapes, µs and its rates (bench/RESULTS.md session
// 29: the 17-64 token n-tiles), each output checked against ref_kernel's double-precision sums (2e-3 of the largest:
// x and the scaled weights in f16); at 2-8 tokens also the one-token kernel's form for several tokens
// (gemv_tokens, which the product takes there where it takes the shape; rows marked "one-token kernel").
static int batches_table(const wc::Ctx& ctx, cudaStream_t stream, double bw) {
  struct Shape { const char* name; int N, K; };
  const Shape shapes[] = {{"w13", 28672, 4096}, {"w2", 4096, 14336}};
  struct Format { const char* name; DType dt; int group; bool tiles; };
  const Format formats[] = {{"int4 g128", DType::I4, 128, false}, {"int4 g128 tiles", DType::I4, 128, true},
                            {"int8", DType::I8, 0, false}, {"int8 tiles", DType::I8, 0, true}};
  float* x;
  CK(cudaMalloc(&x, size_t{64} * 14336 * 4));
  bench::fill_f32<<<1024, 256, 0, stream>>>(x, size_t{64} * 14336, 7);
  float* y;
  CK(cudaMalloc(&y, size_t{64} * 28672 * 4));
  double* ref;
  CK(cudaMalloc(&ref, size_t{64} * 28672 * 8));
  int failures = 0;
  std::printf("\n| shape | format | T | us | of floor | GB/s | TFMA/s | error |\n|---|---|---|---|---|---|---|---|\n");
  for (const Format& f : formats)
    for (const Shape& sh : shapes) {
      QuantCopies w = quant_copies(ctx, stream, f.dt, f.group ? f.group : sh.K, sh.N, sh.K, f.tiles);
      const auto& ws = w.ws;
      const int copies = static_cast<int>(ws.size());
      const size_t bytes = w.bytes;
      for (int T : {1, 2, 4, 8, 16, 17, 32, 33, 48, 64}) {
        // Where one pass's x slice does not fit, the product runs passes of fewer tokens (quant_gemv_mma_passes):
        // timed as such, marked in the T column.
        const bool one_pass = wc::quant_gemv_mma_takes(ws[0], T, sh.N, sh.K);
        const auto run = [&](int c) {
          if (one_pass) wc::quant_gemv_mma(ctx, x, ws[c], y, T, sh.N, sh.K, false);
          else wc::quant_gemv_mma_passes(ctx, x, ws[c], y, T, sh.N, sh.K, false);
        };
        const size_t outs = static_cast<size_t>(T) * sh.N;
        ref_kernel<<<static_cast<unsigned>((outs * 32 + 255) / 256), 256, 0, stream>>>(x, ws[0], ref, T, sh.N, sh.K, 0);
        CK(cudaMemsetAsync(y, 0xff, outs * 4, stream));
        run(0);
        CK(cudaStreamSynchronize(stream));
        const double err = max_rel_err(y, ref, outs);
        failures += !(err <= 2e-3);
        const double ms = median_ms(stream, copies, run);
        std::printf("| %s | %s | %d%s | %.1f | %.0f%% | %.0f | %.1f | %.2g%s |\n", sh.name, f.name, T, one_pass ? "" : " (passes)", ms * 1e3,
                    100.0 * bytes / (bw * 1e6) / ms, bytes / (ms * 1e6), static_cast<double>(sh.N) * sh.K * T / (ms * 1e9),
                    err, err <= 2e-3 ? "" : " CHECK FAILED");
        if (T < 2 || T > 8) continue;
        const auto tokens = [&](int c) {
          return wc::gemv_tokens(ctx, x, ws[c].q, ws[c].dtype, ws[c].scales, ws[c].group, y, T, sh.N, sh.K, false,
                                 false, ws[c].tiles);
        };
        CK(cudaMemsetAsync(y, 0xff, outs * 4, stream));
        if (!tokens(0)) continue;  // a shape or format it refuses
        CK(cudaStreamSynchronize(stream));
        const double terr = max_rel_err(y, ref, outs);
        failures += !(terr <= 2e-3);
        const double tms = median_ms(stream, copies, [&](int c) { tokens(c); });
        std::printf("| %s | %s, one-token kernel | %d | %.1f | %.0f%% | %.0f | %.1f | %.2g%s |\n", sh.name, f.name, T,
                    tms * 1e3, 100.0 * bytes / (bw * 1e6) / tms, bytes / (tms * 1e6),
                    static_cast<double>(sh.N) * sh.K * T / (tms * 1e9), terr, terr <= 2e-3 ? "" : " CHECK FAILED");
      }
      free_copies(w);
    }
  CK(cudaFree(x));
  CK(cudaFree(y));
  CK(cudaFree(ref));
  return failures;
}

int main(int argc, char** argv) {
  bool quick = false, sweep = false, one_token_only = false, split_only = false, batches_only = false;
  std::string only_shape, only_format;
  int only_t = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    else if (!std::strcmp(argv[i], "--one-token")) one_token_only = true;
    else if (!std::strcmp(argv[i], "--split")) split_only = true;
    else if (!std::strcmp(argv[i], "--batches")) batches_only = true;
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
  if (one_token_only) return one_token_table(ctx, stream, bw, sweep) ? 1 : 0;
  if (split_only) return split_table(stream, matmul, bw) ? 1 : 0;
  if (batches_only) return batches_table(ctx, stream, bw);

  struct Shape { const char* name; int N, K; bool gated; };
  const std::vector<Shape> shapes = {{"wqkv", 12288, 4096, false}, {"wo", 4096, 4096, false},
                                     {"w13", 22016, 4096, false}, {"w2 (gated)", 4096, 11008, true},
                                     {"lm_head", 32000, 4096, false}};
  struct Format { const char* name; DType dt; int group; };  // group 0: per channel (K)
  const std::vector<Format> formats = {{"int8", DType::I8, 0}, {"int4 g128", DType::I4, 128}, {"int4 g32", DType::I4, 32}};
  const std::vector<int> tokens = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 2, 4, 8, 16};
  constexpr int kTs = 17;
  int failures = 0;
  // Layer sums (wqkv + wo + w13 + w2) per format and T: old, new (old where new refuses), bf16.
  double total_old[3][kTs] = {}, total_new[3][kTs] = {}, total_bf16[3][kTs] = {};
  std::printf("%-11s %-10s %3s %9s %6s %9s %6s %9s %6s %8s %8s %9s %9s  %s\n", "shape", "format", "T", "old ms", "TB/s",
              "new ms", "TB/s", "bf16 ms", "TB/s", "new/bf16", "new/old", "old err", "new err", "sweep best (C,depth: ms)");
  for (const Shape& sh : shapes) {
    if (!only_shape.empty() && only_shape != sh.name) continue;
    const size_t x_elems = static_cast<size_t>(16) * sh.K * (sh.gated ? 2 : 1);
    float *x, *y;
    double* ref;
    CK(cudaMalloc(&x, x_elems * 4));
    CK(cudaMalloc(&y, static_cast<size_t>(16) * sh.N * 4));
    CK(cudaMalloc(&ref, static_cast<size_t>(16) * sh.N * 8));
    bench::fill_f32<<<1024, 256, 0, stream>>>(x, x_elems, 7);
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
      QuantCopies w = quant_copies(ctx, stream, f.dt, f.group ? f.group : sh.K, sh.N, sh.K);
      const auto& ws = w.ws;
      const int copies = static_cast<int>(ws.size());
      const size_t bytes = w.bytes;
      for (int T : tokens) {
        if (only_t && T != only_t) continue;
        const size_t outs = static_cast<size_t>(T) * sh.N;
        ref_kernel<<<static_cast<unsigned>((outs * 32 + 255) / 256), 256, 0, stream>>>(x, ws[0], ref, T, sh.N, sh.K, sh.gated);
        const auto run_path = [&](int c, wc::QuantGemvPath path) {
          wc::quant_gemv(ctx, matmul.gemv(), x, ws[c], y, T, sh.N, sh.K, sh.gated, path);
        };
        const auto check = [&](wc::QuantGemvPath path) {
          CK(cudaMemsetAsync(y, 0xff, outs * 4, stream));
          run_path(0, path);
          CK(cudaStreamSynchronize(stream));
          return max_rel_err(y, ref, outs);
        };
        const bool has_new = wc::quant_gemv_mma_takes(ws[0], T, sh.N, sh.K);
        const double old_err = check(wc::QuantGemvPath::Legacy);
        const double new_err = has_new ? check(wc::QuantGemvPath::Mma) : NAN;
        const bool ok = old_err <= 1e-5 && (!has_new || new_err <= 2e-3);
        failures += !ok;

        const double old_ms = median_ms(stream, copies, [&](int c) { run_path(c, wc::QuantGemvPath::Legacy); });
        const double new_ms =
            has_new ? median_ms(stream, copies, [&](int c) { run_path(c, wc::QuantGemvPath::Mma); }) : NAN;
        double bf16_ms = NAN;
        if (T <= wc::Gemv::kMaxTokens)
          bf16_ms = median_ms(stream, bf16_copies, [&](int c) {
            matmul.run(x, wb[c], DType::BF16, y, T, sh.N, sh.K, sh.gated);
          });
        std::string best = "-";
        if (sweep && has_new) {
          double best_ms = 1e30;
          for (int C : {1, 2, 4, 8})
            for (int depth : {4, 8}) {
              wc::QuantMmaTuning tuning;
              tuning.cluster = C;
              tuning.depth = depth;
              if (!wc::quant_gemv_mma_takes(ws[0], T, sh.N, sh.K, tuning)) continue;
              const double t = median_ms(stream, copies, [&](int c) {
                wc::quant_gemv_mma(ctx, x, ws[c], y, T, sh.N, sh.K, sh.gated, tuning);
              });
              if (t < best_ms) {
                best_ms = t;
                best = std::to_string(C) + "," + std::to_string(depth) + ": " + std::to_string(t).substr(0, 6);
              }
            }
        }
        if (T < kTs && std::strcmp(sh.name, "lm_head") != 0) {
          total_old[fi][T] += old_ms;
          total_new[fi][T] += has_new ? new_ms : old_ms;
          total_bf16[fi][T] += bf16_ms;
        }
        const auto tbs = [](double b, double ms) { return b / (ms * 1e9); };
        std::printf("%-11s %-10s %3d %9.4f %6.2f %9.4f %6.2f %9.4f %6.2f %7.2fx %7.2fx %9.2g %9.2g  %s%s\n", sh.name, f.name,
                    T, old_ms, tbs(bytes, old_ms), new_ms, tbs(bytes, new_ms), bf16_ms, tbs(bf16_bytes, bf16_ms),
                    bf16_ms / new_ms, old_ms / new_ms, old_err, new_err, best.c_str(), ok ? "" : "  CHECK FAILED");
      }
      free_copies(w);
    }
    for (auto& p : wb) CK(cudaFree(p));
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(ref));
  }
  std::printf("\none Llama-2-7B layer's four GEMVs (wqkv + wo + w13 + w2), ms (new: old where it refuses):\n");
  for (size_t fi = 0; fi < formats.size(); ++fi)
    for (int T : tokens)
      if (T < kTs && total_old[fi][T] > 0)
        std::printf("  %-10s T=%-2d old %.4f, new %.4f, bf16 %.4f: new %.2fx bf16, %.2fx old\n", formats[fi].name, T,
                    total_old[fi][T], total_new[fi][T], total_bf16[fi][T], total_bf16[fi][T] / total_new[fi][T],
                    total_old[fi][T] / total_new[fi][T]);
  if (only_shape.empty()) failures += one_token_table(ctx, stream, bw, sweep);
  std::printf("%s\n", failures ? "CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
