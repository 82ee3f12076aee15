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
#include <cuda_profiler_api.h>
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

}  // namespace

#include "attention-decode-bench.cuh"

namespace {

int prefill_bench() {
  bench::Device device;
  const cudaStream_t stream = device.stream;
  const wc::Ctx ctx = device.ctx;
  const int sms = device.prop.multiProcessorCount;
  std::printf("device: %s, %d SMs\n", device.prop.name, sms);

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
    bench::fill_f32<<<1024, 256, 0, stream>>>(q.data<float>(), q.numel(), 1);
    bench::fill_f32<<<1024, 256, 0, stream>>>(kc.data<float>(), kc.numel(), 2);
    bench::fill_f32<<<1024, 256, 0, stream>>>(vc.data<float>(), vc.numel(), 3);
    bench::poison<<<1024, 256, 0, stream>>>(o_new.data<float>(), o_new.numel());
    bench::poison<<<1024, 256, 0, stream>>>(o_ref.data<float>(), o_ref.numel());
    std::vector<int32_t> hs(T, 0), hp(T);
    for (int t = 0; t < T; ++t) hp[t] = t;
    bench::upload_i32(slots, hs);
    bench::upload_i32(pos, hp);
    CK(cudaMemset(table.data<int32_t>(), 0, 4));
    const float scale = 1.0f / std::sqrt(float(hd));
    auto run_new = [&] { wc::launch_attention(ctx, q, kc, vc, slots, table, pos, c.nH, scale, o_new, nullptr, sms); };
    auto run_ref = [&] { wc::detail::launch_attention_prefill_fp32(ctx, q, kc, vc, slots, table, pos, c.nH, scale, o_ref); };
    run_new();
    run_ref();
    CK(cudaStreamSynchronize(stream));
    bool nan = false;
    double rel = bench::rel_err(bench::download(o_new), bench::download(o_ref), nan);
    float t_new = device.median_ms(3, 20, run_new), t_ref = device.median_ms(3, 20, run_ref);
    double flops = 2.0 * 2.0 * double(T) * T / 2 * hd * c.nH;
    std::printf("%6d %4d/%-2d %4d %10.4f %8.1f %10.4f %8.1f %7.1fx %9.2e%s\n", T, c.nH, c.nKv, hd, t_new,
                flops / t_new / 1e9, t_ref, flops / t_ref / 1e9, t_ref / t_new, rel,
                nan ? "  NaN!" : (rel > 1e-3 ? "  FAIL" : ""));
    ok &= !nan && rel <= 1e-3;
  }
  ok &= device.status_ok();
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "decode") return decode_bench(argc - 2, argv + 2);
  return prefill_bench();
}
