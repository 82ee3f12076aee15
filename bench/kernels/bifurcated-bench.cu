// Standalone benchmark of bifurcated decode attention (weft::cuda::launch_attention_bifurcated) on seed 000's
// grid: n samples of one prompt of m positions, each 64 positions past it; ms per decode step of attention over
// 32 layers for (a) the bifurcated op on a table whose rows share the prompt's blocks and (b) the plain paged
// kernel over the same n sequences without sharing (each its own copy of the prompt), beside the byte floor of
// each (bytes the step must read / the measured read bandwidth); and the prefix kernel alone (the shared prompt's
// K and V, read once per group: the tensor-core kernel's prefix blocks alone), its ms per step and achieved GB/s beside the
// measured read bandwidth, which say whether it is bound by bytes. Build and run with nvcc alone, from the
// repository root:
//   bench/kernels/bifurcated-run.sh
// Shapes: Llama-2-7B (MHA, 32 heads of 128) and Llama-3-8B (GQA, 32 query / 8 kv heads of 128); bf16 caches in
// blocks of 16; m in {2K, 8K, 16K, 32K}; n in {1, 4, 16, 32} (n = 1: a group of one). Each layer has caches of
// its own (up to 32 distinct, never fewer than make 512 MiB, so the L2 holds none), the 32 calls of a step
// cycle through them; CUDA events, median of 5 steps after 2 warm-ups. The bifurcated result is checked against
// the plain kernel on the shared table (norm-wise error, as ops-check). Exit 1 on an error over 1e-3 (the
// tensor-core kernel rounds q, k, v and p to f16: the prefill kernel's bound in ops-check), a NaN, or a device
// report; the issue's bars (8K, n = 16: <= 1.3x the plain n = 1 step, >= 3x faster than unshared) close the output.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <vector>

#include "cuda/attention-bifurcated.cuh"
#include "cuda/attention.cuh"
#include "cuda/bandwidth.cuh"
#include "bench-device.cuh"

using namespace weft;
namespace wc = weft::cuda;

namespace {

using bench::dev;

constexpr int64_t kBlock = 16, kPrivate = 64, kLayers = 32, kHd = 128;

Tensor dev_i(const std::vector<int32_t>& v, Shape s) {
  Tensor t = dev(DType::I32, s);
  bench::upload_i32(t, v);
  return t;
}

// Random bf16 in [-1, 1) (as bits, truncated; q is bench::fill_f32's).
__global__ void fill_bf16(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    p[i] = static_cast<uint16_t>(__float_as_uint(bench::uniform(seed, i)) >> 16);
  }
}

// A decode step's inputs: the block table of n sequences, shared (rows begin with the prompt's blocks) or not
// (each row its own blocks), and per-layer caches of the blocks used.
struct Setup {
  std::vector<Tensor> k, v;  // per distinct layer [blocks, nKv, 16, 128] bf16
  Tensor table, seq, pos, group, shared;
  int64_t bytes_per_layer;  // K and V bytes the step reads per layer
  int64_t prefix_bytes_per_layer;  // of which the shared prompt's (sharing), read once
};

Setup make_setup(int64_t n, int64_t m, int64_t n_kv, bool sharing, uint64_t seed) {
  const int64_t len = m + kPrivate, width = (len + kBlock - 1) / kBlock, prompt_blocks = m / kBlock;
  std::vector<int32_t> rows(static_cast<size_t>(n * width)), seq(n), pos(n), group(n, sharing ? 0 : -1);
  int32_t next = sharing ? static_cast<int32_t>(prompt_blocks) : 0;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < width; ++j) rows[s * width + j] = sharing && j < prompt_blocks ? static_cast<int32_t>(j) : next++;
    seq[s] = static_cast<int32_t>(s);
    pos[s] = static_cast<int32_t>(len - 1);
  }
  const int64_t blocks = next, layer_bytes = 2 * blocks * n_kv * kBlock * kHd * 2;
  const int64_t distinct = std::min<int64_t>(kLayers, std::max<int64_t>(2, ((int64_t{512} << 20) + layer_bytes - 1) / layer_bytes));
  Setup s;
  for (int64_t l = 0; l < distinct; ++l)
    for (auto* caches : {&s.k, &s.v}) {
      Tensor t = dev(DType::BF16, {blocks, n_kv, kBlock, kHd});
      fill_bf16<<<2048, 256>>>(static_cast<uint16_t*>(t.buffer->data()), t.numel(), seed + 2 * l + (caches == &s.v));
      caches->push_back(t);
    }
  s.table = dev_i(rows, {n, width});
  s.seq = dev_i(seq, {n});
  s.pos = dev_i(pos, {n});
  s.group = dev_i(group, {n});
  s.shared = dev_i({static_cast<int32_t>(m)}, {1});
  // bytes a step must read: the shared prompt once and the private positions (bifurcated), or every row whole
  s.bytes_per_layer = 2 * n_kv * kHd * 2 * (sharing ? m + n * kPrivate : n * len);
  s.prefix_bytes_per_layer = sharing ? 2 * n_kv * kHd * 2 * m : 0;
  return s;
}

}  // namespace

int main() {
  bench::Device device;
  const cudaDeviceProp& prop = device.prop;
  const cudaStream_t stream = device.stream;
  const wc::Ctx ctx = device.ctx;
  const double gbps = wc::measure_read_bandwidth(ctx, size_t{1} << 30, 10);
  std::printf("device: %s, %d SMs; read bandwidth %.0f GB/s (1 GiB, best of 10)\n", prop.name, prop.multiProcessorCount, gbps);
  std::printf("ms per decode step of attention over %lld layers, bf16 KV, %lld private positions per sample; pfx: the\n"
              "prefix kernel alone, its GB/s = the prompt's K and V bytes / its time (bytes-bound near %.0f)\n",
              static_cast<long long>(kLayers), static_cast<long long>(kPrivate), gbps);
  auto step_ms = [&](auto&& layer) {
    return static_cast<double>(device.median_ms(2, 5, [&] {
      for (int64_t l = 0; l < kLayers; ++l) layer(l);
    }));
  };
  bool ok = true;
  struct Bar {
    const char* model;
    double bif_ms, n1_ms, unshared_ms;
  };
  std::vector<Bar> bars;
  std::printf("%-10s %6s %3s %9s %9s %9s %9s %8s %8s %9s %9s %9s\n", "model", "m", "n", "bif ms", "floor", "plain ms",
              "floor", "vs n=1", "speedup", "rel err", "pfx ms", "pfx GB/s");
  struct Shape2 {
    const char* name;
    int64_t nH, nKv;
  };
  for (Shape2 sh : {Shape2{"7B MHA", 32, 32}, Shape2{"L3-8B GQA", 32, 8}})
    for (int64_t m : {int64_t{2048}, int64_t{8192}, int64_t{16384}, int64_t{32768}}) {
      double n1_ms = 0;
      for (int64_t n : {int64_t{1}, int64_t{4}, int64_t{16}, int64_t{32}}) {
        const float scale = 1.0f / std::sqrt(float(kHd));
        Tensor q = dev(DType::F32, {n, sh.nH * kHd}), out = dev(DType::F32, {n, sh.nH * kHd}),
               ref = dev(DType::F32, {n, sh.nH * kHd});
        bench::fill_f32<<<256, 256>>>(q.data<float>(), q.numel(), 7);
        // the plain kernel is the split-K decode half of launch_attention (n <= 64 tokens), called directly
        auto plain_floats = [&](const Setup& s) {
          return wc::detail::attention_decode_scratch_floats(n, sh.nH, sh.nKv, s.table.dim(1) * kBlock, kHd,
                                                             prop.multiProcessorCount, false);  // bf16 KV
        };
        double bif_ms, plain_ms, bif_floor, plain_floor, rel, prefix_ms, prefix_gbps;
        bool nan = false;
        {
          Setup s = make_setup(n, m, sh.nKv, true, 100);
          Tensor scratch = dev(DType::F32, {wc::attention_bifurcated_scratch_floats(q, s.k[0], s.table, s.shared, sh.nH, prop.multiProcessorCount)});
          Tensor plain_scratch = dev(DType::F32, {plain_floats(s)});
          auto bif = [&](int64_t l) {
            const size_t i = static_cast<size_t>(l) % s.k.size();
            wc::launch_attention_bifurcated(ctx, q, s.k[i], s.v[i], s.seq, s.table, s.pos, s.group, s.shared, sh.nH,
                                            scale, out, scratch.data<float>(), prop.multiProcessorCount);
          };
          bif_ms = step_ms(bif);
          bif_floor = kLayers * double(s.bytes_per_layer) / (gbps * 1e6);
          prefix_ms = step_ms([&](int64_t l) {
            const size_t i = static_cast<size_t>(l) % s.k.size();
            wc::detail::launch_attention_bifurcated_prefix(ctx, q, s.k[i], s.v[i], s.seq, s.table, s.pos, s.group,
                                                           s.shared, sh.nH, scale, scratch.data<float>(),
                                                           prop.multiProcessorCount);
          });
          prefix_gbps = kLayers * double(s.prefix_bytes_per_layer) / (prefix_ms * 1e6);
          wc::detail::launch_attention_decode(ctx, q, s.k[0], s.v[0], s.seq, s.table, s.pos, sh.nH, scale, ref,
                                              plain_scratch.data<float>(), prop.multiProcessorCount);
          bif(0);
          CK(cudaStreamSynchronize(stream));
          rel = bench::rel_err(bench::download(out), bench::download(ref), nan);
        }
        {
          Setup s = make_setup(n, m, sh.nKv, false, 200);
          Tensor scratch = dev(DType::F32, {plain_floats(s)});
          plain_ms = step_ms([&](int64_t l) {
            const size_t i = static_cast<size_t>(l) % s.k.size();
            wc::detail::launch_attention_decode(ctx, q, s.k[i], s.v[i], s.seq, s.table, s.pos, sh.nH, scale, out,
                                                scratch.data<float>(), prop.multiProcessorCount);
          });
          plain_floor = kLayers * double(s.bytes_per_layer) / (gbps * 1e6);
        }
        if (n == 1) n1_ms = plain_ms;  // the n = 1 step: the plain kernel (a request of one sample forms no group)
        std::printf("%-10s %6lld %3lld %9.3f %9.3f %9.3f %9.3f %7.2fx %7.1fx %9.2e %9.3f %9.0f%s\n", sh.name,
                    static_cast<long long>(m), static_cast<long long>(n), bif_ms, bif_floor, plain_ms, plain_floor,
                    bif_ms / n1_ms, plain_ms / bif_ms, rel, prefix_ms, prefix_gbps,
                    nan ? "  NaN!" : (rel > 1e-3 ? "  FAIL" : ""));
        ok &= !nan && rel <= 1e-3;
        if (m == 8192 && n == 16) bars.push_back({sh.name, bif_ms, n1_ms, plain_ms});
      }
    }
  std::printf("\nbars at 8K, n = 16 (issue 19): a step <= 1.3x the plain n = 1 step, >= 3x faster than 16 unshared\n");
  std::printf("%-10s %9s %11s %7s %8s %11s %8s %8s\n", "model", "n=16 ms", "plain n=1", "ratio", "<= 1.3", "unshared",
              "speedup", ">= 3");
  for (const Bar& b : bars)
    std::printf("%-10s %9.3f %11.3f %6.2fx %8s %11.3f %7.1fx %8s\n", b.model, b.bif_ms, b.n1_ms, b.bif_ms / b.n1_ms,
                b.bif_ms / b.n1_ms <= 1.3 ? "met" : "NOT met", b.unshared_ms, b.unshared_ms / b.bif_ms,
                b.unshared_ms / b.bif_ms >= 3 ? "met" : "NOT met");
  ok &= device.status_ok();
  return ok ? 0 : 1;
}
