// How fast can any one kernel launch read a decode attention layer's bytes? The attention bench's cases (bench/
// kernels/attention-decode-bench.cuh: the Llama-2-7B and Llama-3-8B shapes, batch 1 and 8, contexts 2K-32K, bf16
// and 1-byte caches; bytes = the K and V rows, and the 1-byte caches' row scales, every position of a layer), timed
// the same way (enough layers' buffers to exceed 4x the L2, capped at 32; a sweep of at least 8 launches, one a
// layer, in one CUDA graph; median of 10), for a kernel that does nothing but read those bytes: 4 blocks of 256
// threads a SM, 16-byte loads grid-stride, four in flight a thread, launched as programmatic dependents as the
// attention kernel is, reading after its pdl_wait (as the attention kernel reads its caches) or before it (the
// most a launch could overlap). "of copy": bytes / time against cudaMemcpy's device-to-device bandwidth (read +
// write), the attention bench's yardstick; issue 18 asks the bf16 attention kernel for 85% of it.
// Build and run: bench/kernels/read-floor-run.sh (nvcc only).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "bench-device.cuh"
#include "cuda/common.cuh"

namespace wc = weft::cuda;

namespace {

template <bool kReadFirst>
__global__ void __launch_bounds__(256) read_bytes(const uint4* __restrict__ p, size_t n, unsigned* out) {
  wc::pdl_trigger();
  if (!kReadFirst) wc::pdl_wait();
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride), d = __ldcs(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = __ldcs(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (kReadFirst) wc::pdl_wait();
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // keeps the loads; (almost) never stores
}

}  // namespace

int main() {
  bench::Device device(cudaStreamNonBlocking);
  const double copy_gbs = device.copy_bandwidth(size_t{2} << 30);
  const size_t l2 = size_t(device.prop.l2CacheSize);
  const int sms = device.prop.multiProcessorCount;
  std::printf("%s, %d SMs, copy bandwidth %.0f GB/s (cudaMemcpy D2D, read + write)\n", device.prop.name, sms, copy_gbs);
  unsigned* out;
  CK(cudaMalloc(&out, 4 * sms * 4));
  struct Shape { const char* name; int nKv, hd; };
  std::printf("| shape | batch | context | cache | MB a layer | read after wait us | of copy | read before wait us | of copy |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  for (Shape m : {Shape{"llama2-7b", 32, 128}, Shape{"llama3-8b", 8, 128}})
    for (int batch : {1, 8})
      for (int context = 2048; context <= 32768; context *= 2)
        for (int one_byte = 0; one_byte < 2; ++one_byte) {
          if (one_byte && context < 32768) continue;  // the 1-byte caches at 32K only (issue 18's 1.8x)
          const double row_bytes = one_byte ? m.hd + 4 : 2.0 * m.hd;
          const size_t bytes = size_t(2.0 * batch * double(context) * m.nKv * row_bytes) / 16 * 16;
          const int layers = int(std::min<double>(32, std::ceil(4.0 * double(l2) / double(bytes))));
          const int launches = std::max(8, layers);
          std::vector<uint4*> bufs(layers);
          for (auto& b : bufs) {
            CK(cudaMalloc(&b, bytes));
            CK(cudaMemsetAsync(b, 1, bytes, device.stream));
          }
          double us[2];
          for (int first = 0; first < 2; ++first) {
            const auto kernel = first ? read_bytes<true> : read_bytes<false>;
            us[first] = 1e3 * device.graph_median_ms(3, 10, [&] {
              for (int l = 0; l < launches; ++l)
                wc::launch_pdl(device.ctx, kernel, dim3(4 * sms), dim3(256), 0, static_cast<const uint4*>(bufs[l % layers]),
                               bytes / 16, out);
            }) / launches;
          }
          const auto of_copy = [&](double t) { return 100.0 * double(bytes) / (t * 1e3) / copy_gbs; };
          std::printf("| %s | %d | %d | %s | %.1f | %.2f | %.0f%% | %.2f | %.0f%% |\n", m.name, batch, context,
                      one_byte ? "1-byte" : "bf16", bytes / 1e6, us[0], of_copy(us[0]), us[1], of_copy(us[1]));
          for (auto b : bufs) CK(cudaFree(b));
        }
  CK(cudaFree(out));
  return 0;
}
