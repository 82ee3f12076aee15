// Standalone benchmarks of weft::cuda attention. Build and run with nvcc alone, from the repository root:
//   bench/kernels/attention-run.sh            # prefill
//   bench/kernels/attention-run.sh decode     # decode, KV bf16 / fp8 / int8
// prefill: the tensor-core flash-attention kernel that launch_attention takes for T > 64 and head dims 64 / 128,
// against the fp32 CUDA-core kernel it replaced (detail::launch_attention_prefill_fp32, still the fallback for
// other head dims). Per case: one sequence in slot 0 at positions 0..T-1 (a fresh causal prompt), random q / k /
// v in [-1, 1), output poisoned with NaN first; times with CUDA events (3 warm-ups, median of 20 runs), TFLOP/s
// with the causal count 2 * 2 * T^2 / 2 * hd * heads; error = max |new - fp32| / max |fp32| (norm-wise, as
// ops-check). Exit 1 when an error is over 1e-3 or the output has a NaN.
// decode: attention-decode-bench.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cuda/attention.cuh"
#include "bench-device.cuh"

using namespace weft;
namespace wc = weft::cuda;

namespace {

using bench::dev;

__global__ void fill(float* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    p[i] = bench::uniform(seed, i);
  }
}
__global__ void poison(float* p, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __int_as_float(0x7fc00000);
}

}  // namespace

#include "attention-decode-bench.cuh"

namespace {

int prefill_bench() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  wc::DeviceStatus* status;
  CK(cudaMalloc(&status, sizeof(wc::DeviceStatus)));
  CK(cudaMemset(status, 0, sizeof(wc::DeviceStatus)));
  wc::Ctx ctx{nullptr, stream, status};
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  struct Case {
    int T, nH, nKv, hd;
  };
  bool ok = true;
  std::printf("%6s %7s %4s %10s %8s %10s %8s %8s %9s\n", "T", "heads", "hd", "mma ms", "TFLOP/s", "fp32 ms",
              "TFLOP/s", "speedup", "rel err");
  for (Case c : {Case{256, 32, 32, 128}, Case{1024, 32, 32, 128}, Case{1024, 32, 8, 128}, Case{4096, 32, 32, 128},
                 Case{1024, 32, 32, 64}}) {
    const int T = c.T, C = T, hd = c.hd;
    Tensor q = dev(DType::F32, {T, int64_t(c.nH) * hd}), kc = dev(DType::F32, {1, c.nKv, C, hd}),
           vc = dev(DType::F32, {1, c.nKv, C, hd}), o_new = dev(DType::F32, {T, int64_t(c.nH) * hd}),
           o_ref = dev(DType::F32, {T, int64_t(c.nH) * hd}), slots = dev(DType::I32, {T}),
           pos = dev(DType::I32, {T}), table = dev(DType::I32, {1, 1});  // slots: tokenSeq, all sequence 0 in block 0
    fill<<<1024, 256, 0, stream>>>(q.data<float>(), q.numel(), 1);
    fill<<<1024, 256, 0, stream>>>(kc.data<float>(), kc.numel(), 2);
    fill<<<1024, 256, 0, stream>>>(vc.data<float>(), vc.numel(), 3);
    poison<<<1024, 256, 0, stream>>>(o_new.data<float>(), o_new.numel());
    poison<<<1024, 256, 0, stream>>>(o_ref.data<float>(), o_ref.numel());
    std::vector<int32_t> hs(T, 0), hp(T);
    for (int t = 0; t < T; ++t) hp[t] = t;
    CK(cudaMemcpy(slots.data<int32_t>(), hs.data(), T * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(pos.data<int32_t>(), hp.data(), T * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(table.data<int32_t>(), 0, 4));
    const float scale = 1.0f / std::sqrt(float(hd));
    auto run_new = [&] { wc::launch_attention(ctx, q, kc, vc, slots, table, pos, c.nH, scale, o_new, nullptr, prop.multiProcessorCount); };
    auto run_ref = [&] { wc::detail::launch_attention_prefill_fp32(ctx, q, kc, vc, slots, table, pos, c.nH, scale, o_ref); };
    auto time = [&](auto&& f) {
      for (int i = 0; i < 3; ++i) f();
      std::vector<float> ms;
      for (int i = 0; i < 20; ++i) {
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
    };
    run_new();
    run_ref();
    CK(cudaStreamSynchronize(stream));
    std::vector<float> a(q.numel()), b(q.numel());
    CK(cudaMemcpy(a.data(), o_new.data<float>(), a.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), o_ref.data<float>(), b.size() * 4, cudaMemcpyDeviceToHost));
    double scl = 0, err = 0;
    bool nan = false;
    for (size_t i = 0; i < a.size(); ++i) {
      nan |= std::isnan(a[i]) || std::isnan(b[i]);
      scl = std::max(scl, std::fabs(double(b[i])));
      err = std::max(err, std::fabs(double(a[i]) - b[i]));
    }
    double rel = err / scl;
    float t_new = time(run_new), t_ref = time(run_ref);
    double flops = 2.0 * 2.0 * double(T) * T / 2 * hd * c.nH;
    std::printf("%6d %4d/%-2d %4d %10.4f %8.1f %10.4f %8.1f %7.1fx %9.2e%s\n", T, c.nH, c.nKv, hd, t_new,
                flops / t_new / 1e9, t_ref, flops / t_ref / 1e9, t_ref / t_new, rel,
                nan ? "  NaN!" : (rel > 1e-3 ? "  FAIL" : ""));
    ok &= !nan && rel <= 1e-3;
  }
  wc::DeviceStatus hs;
  CK(cudaMemcpy(&hs, status, sizeof hs, cudaMemcpyDeviceToHost));
  if (hs.flag) {
    std::printf("device status reported op %d index %lld\n", hs.op, hs.index);
    ok = false;
  }
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "decode") return decode_bench(argc - 2, argv + 2);
  return prefill_bench();
}
