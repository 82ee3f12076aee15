// Standalone benchmark of the quantized prefill attention (cuda/attention-sage.cuh) against the exact tensor-core
// prefill kernel (launch_attention for T > 64). Build and run with nvcc alone, from the repository root:
//   bench/kernels/sage-run.sh
// One layer of Llama-2-7B (32 query and 32 kv heads) and Llama-3-8B (32 / 8), head dim 128, bf16 caches (weft's
// cuda default) holding one sequence in one block: a fresh causal prompt of T = 4K, 8K, 16K, 32K tokens attended
// in one step, the last 1K-token chunk of a 32K prompt (--max-num-batched-tokens 1024, the default), the last 1185
// tokens (a chunk the grid fills badly), and the last 1K at 16 and 8 heads (one rank of TP 2 and 4). Random q,
// k, v in [-1, 1), k plus a per-channel offset (what the smoothing removes); outputs poisoned with NaN first.
// Times with CUDA events (2 warm-ups, median of 7 runs; int8 and fp8 include their pre-pass); TFLOP/s with the
// causal count 2 * 2 * T * (keys before it) * hd * heads; error = max and mean |sage - exact| over the output
// (inputs in [-1, 1): |out| < 1); "pre ms" the fp8 pre-pass alone, and a hash of the bytes the pre-pass writes
// (both modes), to hold two builds of it equal. Exit 1 on a NaN or a device report. About 10 s of GPU time on an H200.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "bench-device.cuh"
#include "cuda/attention-sage.cuh"
#include "cuda/attention.cuh"

using namespace weft;
namespace wc = weft::cuda;

namespace {

using bench::dev;

// bf16 cache values in [-1, 1) plus `offset` * (channel % 3) (hd = 128 channels per row).
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint64_t seed, float offset) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16(bench::uniform(seed, i) + offset * float((i % 128) % 3));
}

struct Case {
  const char* model;
  int nKv, T, first;  // T query tokens at positions first..first + T - 1
  int nH = 32;        // query heads (one rank's, under tensor parallelism)
};

}  // namespace

int main() {
  bench::Device device;
  const cudaStream_t stream = device.stream;
  const int sms = device.prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", device.prop.name, sms);
  const int hd = 128;
  const float scale = 1.0f / std::sqrt(float(hd));
  bool ok = true;
  std::printf("%-11s %6s %6s %9s %7s | %9s %7s %6s %9s %9s | %9s %7s %6s %9s %9s %7s %s\n", "model", "T", "keys", "exact ms",
              "TFLOP/s", "int8 ms", "TFLOP/s", "x", "max err", "mean err", "fp8 ms", "TFLOP/s", "x", "max err",
              "mean err", "pre ms", "pre-pass bytes (hash)");
  std::vector<Case> cases;
  for (const char* model : {"llama-2-7b", "llama-3-8b"}) {
    const int nKv = model[6] == '2' ? 32 : 8;
    for (int T : {4096, 8192, 16384, 32768}) cases.push_back({model, nKv, T, 0});
    cases.push_back({model, nKv, 1024, 32768 - 1024});
  }
  // The grid is (heads, 64-token query tiles) at 2 blocks an SM: a chunk of 1185 tokens (19 tiles) over 32 heads is
  // 2.3 rounds of an H200's 264 slots, and one rank's 16 or 8 heads (tensor parallelism 2, 4) leave SMs idle.
  cases.push_back({"llama-2-7b", 32, 1185, 32768 - 1185});
  cases.push_back({"l2-7b tp2", 16, 1024, 32768 - 1024, 16});
  cases.push_back({"l2-7b tp4", 8, 1024, 32768 - 1024, 8});
  for (const Case& c : cases) {
    const int T = c.T, C = c.first + c.T, nH = c.nH;
    Tensor q = dev(DType::F32, {T, int64_t(nH) * hd}), kc = dev(DType::BF16, {1, c.nKv, C, hd}),
           vc = dev(DType::BF16, {1, c.nKv, C, hd}), slots = dev(DType::I32, {T}), pos = dev(DType::I32, {T}),
           table = dev(DType::I32, {1, 1});
    Tensor outs[3] = {dev(DType::F32, q.shape), dev(DType::F32, q.shape), dev(DType::F32, q.shape)};
    bench::fill_f32<<<1024, 256, 0, stream>>>(q.data<float>(), q.numel(), 1);
    fill_bf16<<<1024, 256, 0, stream>>>(kc.data<__nv_bfloat16>(), kc.numel(), 2, 2.0f);
    fill_bf16<<<1024, 256, 0, stream>>>(vc.data<__nv_bfloat16>(), vc.numel(), 3, 0.0f);
    for (Tensor& o : outs) bench::poison<<<1024, 256, 0, stream>>>(o.data<float>(), o.numel());
    std::vector<int32_t> hs(T, 0), hp(T);
    for (int t = 0; t < T; ++t) hp[t] = c.first + t;
    bench::upload_i32(slots, hs);
    bench::upload_i32(pos, hp);
    CK(cudaMemset(table.data<int32_t>(), 0, 4));
    void* scratch;
    CK(cudaMalloc(&scratch, wc::sage_scratch_bytes(q, kc, table, false)));  // the f16 V operand's is the larger
    float* exact_scratch = nullptr;  // the exact kernel's key splits' partials, where its grid takes splits
    if (const int64_t floats = wc::attention_scratch_floats(q, kc, table, nH, sms)) CK(cudaMalloc(&exact_scratch, floats * 4));
    auto run = [&](int which) {
      if (which == 0)
        wc::launch_attention(device.ctx, q, kc, vc, slots, table, pos, nH, scale, outs[0], exact_scratch, sms);
      else
        wc::launch_sage_attention(device.ctx, q, kc, vc, slots, table, pos, nH, scale, which == 2, outs[which], scratch, sms, {});
    };
    float ms[3];
    for (int w = 0; w < 3; ++w) ms[w] = device.median_ms(2, 7, [&] { run(w); });
    // the fp8 mode's pre-pass alone (K means, int8 K, e4m3 V): part of its column, read at every prefill step
    const wc::detail::SageScratch sc = wc::detail::SageScratch::of(1, c.nKv, C, hd, true);
    const float pre_ms = device.median_ms(2, 7, [&] {
      wc::detail::launch_sage_prepass(device.ctx, kc, vc, slots, table, pos, true, sc, static_cast<unsigned char*>(scratch), {});
    });
    // what the pre-pass wrote (K means, int8 K and scales, the V operand and scales), fp8 then int8 mode, hashed:
    // equal hashes from two builds of the pre-pass mean equal bytes
    uint64_t pre_hash = 1469598103934665603ull;  // FNV-1a
    for (bool fp8 : {true, false}) {
      const wc::detail::SageScratch m = wc::detail::SageScratch::of(1, c.nKv, C, hd, fp8);
      wc::detail::launch_sage_prepass(device.ctx, kc, vc, slots, table, pos, fp8, m, static_cast<unsigned char*>(scratch), {});
      CK(cudaStreamSynchronize(stream));
      const int64_t G = c.nKv;
      for (auto [off, bytes] : {std::pair{m.mean, G * hd * 4}, {m.k_scale, G * m.nb * 4}, {m.v_scale, G * m.nb * 4},
                                {m.k8, G * m.cp * hd}, {m.v, G * m.cp * hd * (fp8 ? 1 : 2)}}) {
        std::vector<unsigned char> h(bytes);
        CK(cudaMemcpy(h.data(), static_cast<unsigned char*>(scratch) + off, bytes, cudaMemcpyDeviceToHost));
        for (unsigned char b : h) pre_hash = (pre_hash ^ b) * 1099511628211ull;
      }
    }
    CK(cudaStreamSynchronize(stream));
    std::vector<float> host[3];
    for (int w = 0; w < 3; ++w) host[w] = bench::download(outs[w]);
    double max_err[3] = {0, 0, 0}, mean_err[3] = {0, 0, 0};
    bool nan = false;
    for (int w = 1; w < 3; ++w) {
      for (size_t i = 0; i < host[0].size(); ++i) {
        nan |= std::isnan(host[0][i]) || std::isnan(host[w][i]);
        const double e = std::fabs(double(host[w][i]) - host[0][i]);
        max_err[w] = std::max(max_err[w], e);
        mean_err[w] += e;
      }
      mean_err[w] /= double(host[0].size());
    }
    const double flops = 2.0 * 2.0 * double(T) * (c.first + (T + 1) / 2.0) * hd * nH;
    std::printf("%-11s %6d %6d %9.3f %7.1f | %9.3f %7.1f %5.2fx %9.2e %9.2e | %9.3f %7.1f %5.2fx %9.2e %9.2e %7.3f %016llx%s\n",
                c.model, T, C, ms[0], flops / ms[0] / 1e9, ms[1], flops / ms[1] / 1e9, ms[0] / ms[1], max_err[1],
                mean_err[1], ms[2], flops / ms[2] / 1e9, ms[0] / ms[2], max_err[2], mean_err[2], pre_ms, static_cast<unsigned long long>(pre_hash), nan ? "  NaN!" : "");
    ok &= !nan;
    CK(cudaFree(scratch));
    if (exact_scratch) CK(cudaFree(exact_scratch));
  }
  ok &= device.status_ok();
  return ok ? 0 : 1;
}
