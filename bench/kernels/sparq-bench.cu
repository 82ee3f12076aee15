// SparQ decode attention (cuda/attention-sparq.cuh) against weft's dense split-K decode kernel
// (attention-decode.cu), decode attention alone: batch 1, one sequence of L positions, bf16 caches paged in blocks
// of B positions (64 unless --block), the grid of the SparQ seed: L in 4K, 8K, 16K, 32K; Llama-2-7B (32 query /
// 32 kv heads) and Llama-3-8B (32 / 8), hd 128; SparQ at compression 1/4 (r = 32, k = L / 8) and 1/8 (r = 16,
// k = L / 16), the bytes ratio r / 2hd + k / L. Per layer: each is captured 10 times into one CUDA graph and the
// graph replayed (3 warm-ups, median of 15), ms per call; speedup = dense / SparQ. The bars (issue 20): >= 1.7x
// at 32K on Llama-2-7B and >= 1.15x on Llama-3-8B, at 1/8. Checks: SparQ with k = L equals dense within 1e-3
// of max |out| (exit 1 otherwise, or on a device report). Build and run from the repository root:
//   bench/kernels/sparq-run.sh [--block B]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "cuda/attention-sparq.cuh"
#include "cuda/attention.cuh"
#include "bench-device.cuh"

using namespace weft;
namespace wc = weft::cuda;

namespace {

using bench::dev;

// Values in [-1, 1); the first `heavy` of every hd components scaled by 4 (trained models' q and k have a few
// large components, which is what SparQ's column choice exploits).
template <typename E>
__global__ void fill(E* p, size_t n, uint64_t seed, int hd, int heavy) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float x = bench::uniform(seed, i) * (int(i % hd) < heavy ? 4.0f : 1.0f);
    if constexpr (sizeof(E) == 2) p[i] = __float2bfloat16_rn(x); else p[i] = x;
  }
}

using bench::upload_i32;

}  // namespace

int main(int argc, char** argv) {
  int B = 64;
  for (int i = 1; i + 1 < argc; ++i)
    if (!std::strcmp(argv[i], "--block")) B = std::atoi(argv[i + 1]);
  bench::Device device(cudaStreamNonBlocking);
  const cudaStream_t stream = device.stream;
  const wc::Ctx ctx = device.ctx;
  const cudaEvent_t e0 = device.e0, e1 = device.e1;
  const int sms = device.prop.multiProcessorCount;
  std::printf("device: %s, %d SMs; bf16 KV, blocks of %d positions, batch 1, decode attention of one layer\n",
              device.prop.name, sms, B);
  constexpr int kPerGraph = 10;
  auto time_graph = [&](const std::function<void()>& f) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < kPerGraph; ++i) f();
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    std::vector<float> ms;
    for (int i = 0; i < 18; ++i) {
      CK(cudaEventRecord(e0, stream));
      CK(cudaGraphLaunch(exec, stream));
      CK(cudaEventRecord(e1, stream));
      CK(cudaEventSynchronize(e1));
      float m;
      CK(cudaEventElapsedTime(&m, e0, e1));
      if (i >= 3) ms.push_back(m / kPerGraph);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };

  struct Model {
    const char* name;
    int nH, nKv;
  };
  const int hd = 128;
  bool ok = true;
  std::printf("%-11s %6s %10s %12s %8s %12s %8s %10s\n", "model", "L", "dense ms", "sparq1/4 ms", "speedup",
              "sparq1/8 ms", "speedup", "exact err");
  for (Model m : {Model{"Llama-2-7B", 32, 32}, Model{"Llama-3-8B", 32, 8}}) {
    for (int L : {4096, 8192, 16384, 32768}) {
      const int nb = (L + B - 1) / B;
      Tensor q = dev(DType::F32, {1, int64_t(m.nH) * hd}), kc = dev(DType::BF16, {nb, m.nKv, B, hd}),
             vc = dev(DType::BF16, {nb, m.nKv, B, hd}), kt = dev(DType::BF16, {nb, m.nKv, hd, B}),
             vsum = dev(DType::F32, {nb, m.nKv, hd}), o_dense = dev(DType::F32, {1, int64_t(m.nH) * hd}),
             o_sparq = dev(DType::F32, {1, int64_t(m.nH) * hd}), table = dev(DType::I32, {1, nb}),
             seq1 = dev(DType::I32, {1}), pos1 = dev(DType::I32, {1}), r1 = dev(DType::I32, {1}),
             k1 = dev(DType::I32, {1}), seqL = dev(DType::I32, {L}), posL = dev(DType::I32, {L});
      fill<<<1024, 256, 0, stream>>>(q.data<float>(), q.numel(), 1, hd, 8);
      fill<<<1024, 256, 0, stream>>>(kc.data<__nv_bfloat16>(), kc.numel(), 2, hd, 8);
      fill<<<1024, 256, 0, stream>>>(vc.data<__nv_bfloat16>(), vc.numel(), 3, hd, 0);
      std::vector<int32_t> blocks(nb), zeros(L, 0), ps(L);
      for (int j = 0; j < nb; ++j) blocks[j] = nb - 1 - j;  // scattered: the sequence's blocks in reverse
      for (int p = 0; p < L; ++p) ps[p] = p;
      upload_i32(table, blocks);
      upload_i32(seq1, {0});
      upload_i32(pos1, {L - 1});
      upload_i32(seqL, zeros);
      upload_i32(posL, ps);
      wc::launch_sparq_append(ctx, kt, vsum, kc, vc, seqL, table, posL);  // the state of a prefilled prompt
      const float scale = 1.0f / std::sqrt(float(hd));
      const int64_t dense_floats = wc::attention_scratch_floats(q, kc, table, m.nH, sms);
      const int64_t sparq_floats = wc::sparq_scratch_floats(q, kc, table, m.nH, sms);
      Tensor dense_scratch = dev(DType::F32, {std::max<int64_t>(dense_floats, 1)});
      Tensor sparq_scratch = dev(DType::F32, {sparq_floats});
      auto dense = [&] {
        wc::launch_attention(ctx, q, kc, vc, seq1, table, pos1, m.nH, scale, o_dense, dense_scratch.data<float>(), sms);
      };
      auto sparq = [&] {
        wc::launch_sparq_attention(ctx, q, kc, vc, kt, vsum, seq1, table, pos1, r1, k1, m.nH, scale, o_sparq,
                                   sparq_scratch.data<float>(), sms);
      };
      // k = L: the exact path, equal to dense
      upload_i32(r1, {16});
      upload_i32(k1, {L});
      dense();
      sparq();
      CK(cudaStreamSynchronize(stream));
      const std::vector<float> a = bench::download(o_dense), b = bench::download(o_sparq);
      double scl = 0, err = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        scl = std::max(scl, std::fabs(double(a[i])));
        err = std::max(err, std::isnan(b[i]) ? INFINITY : std::fabs(double(a[i]) - b[i]));
      }
      const double rel = err / scl;
      ok &= rel <= 1e-3;
      const float t_dense = time_graph(dense);
      float t[2];
      for (int s = 0; s < 2; ++s) {
        const int div = s == 0 ? 4 : 8;  // compression 1/div: r = hd / div, k = L / (2 div)
        upload_i32(r1, {hd / div});
        upload_i32(k1, {L / (2 * div)});
        t[s] = time_graph(sparq);
      }
      std::printf("%-11s %6d %10.4f %12.4f %7.2fx %12.4f %7.2fx %10.2e%s\n", m.name, L, t_dense, t[0],
                  t_dense / t[0], t[1], t_dense / t[1], rel, rel > 1e-3 ? "  FAIL" : "");
    }
  }
  ok &= device.status_ok(true);
  return ok ? 0 : 1;
}
