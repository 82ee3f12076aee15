// Decode attention alone (split-K, attention-decode.cu) over paged KV caches of bf16, fp8 and int8: batch 1 and 8,
// contexts 2K to 32K, the Llama-2-7B shape (32 heads, 32 KV heads, hd 128) and the Llama-3-8B shape (32 / 8).
// Included by attention-bench.cu (bench-device.cuh: dev(), CK, Device, the fills); run as `attention-bench decode [max context]`.
//
// Each sequence holds `context` positions in blocks of 16 (a block table of consecutive blocks per sequence);
// the query of sequence b is at position context - 1. Bytes per launch = what one layer's decode must read:
// K and V rows (and the 1-byte caches' row scales) of every position. Enough layers' caches that one sweep
// over them is over 4x the L2 (capped at 32 layers: a real step's worth), timed as a sweep of launches, one per
// layer, median of 10 sweeps; GB/s against the device's copy bandwidth (cudaMemcpy device to device, read +
// write bytes, best of 10), and the 1-byte caches' speedup over bf16 at the largest context.

namespace {

// Valid codes of either 1-byte type: e4m3 with the top exponent bit pattern 1111 avoided (no NaN), any int8.
__global__ void fill_codes(uint8_t* p, size_t n, uint64_t seed, uint8_t mask) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uint8_t(weft::splitmix64(weft::splitmix64(seed) ^ i) >> 56) & mask;
}

// A cache [nBlocks, nKv, 16, hd] of `d` with random contents (and its scales for the 1-byte types).
Tensor decode_cache(DType d, int64_t n_blocks, int64_t n_kv, int64_t hd, uint64_t seed, cudaStream_t stream) {
  Tensor t = dev(d, {n_blocks, n_kv, 16, hd});
  if (d == DType::BF16) {
    bench::fill_bf16<<<1024, 256, 0, stream>>>(t.data<__nv_bfloat16>(), t.numel(), seed);
  } else {
    fill_codes<<<1024, 256, 0, stream>>>(t.data<uint8_t>(), t.numel(), seed, d == DType::FP8 ? 0xf7 : 0xff);
    auto scales = std::make_shared<Tensor>(dev(DType::F32, {n_blocks, n_kv, 16}));
    bench::fill_value<<<1024, 256, 0, stream>>>(scales->data<float>(), scales->numel(), d == DType::FP8 ? 1.0f / 448 : 1.0f / 127);
    t.scales = scales;
  }
  CK(cudaGetLastError());
  return t;
}

// GB/s of cudaMemcpy device to device over `bytes` (read + write), best of 10.
double copy_bandwidth(size_t bytes, cudaStream_t stream, cudaEvent_t e0, cudaEvent_t e1) {
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemsetAsync(a, 1, bytes, stream));
  float best = 1e30f;
  for (int i = 0; i < 11; ++i) {
    CK(cudaEventRecord(e0, stream));
    CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i > 0) best = std::min(best, ms);
  }
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * double(bytes) / (best * 1e6);
}

int decode_bench(int argc, char** argv) {
  const int max_context = argc > 0 ? std::atoi(argv[0]) : 32768;
  bench::Device device;
  const cudaDeviceProp& prop = device.prop;
  const cudaStream_t stream = device.stream;
  const wc::Ctx ctx = device.ctx;
  const double copy_gbs = copy_bandwidth(size_t{2} << 30, stream, device.e0, device.e1);
  const size_t l2 = size_t(prop.l2CacheSize);
  std::printf("device: %s, %d SMs, L2 %zu MiB; copy bandwidth %.0f GB/s (cudaMemcpy D2D, read + write)\n", prop.name,
              prop.multiProcessorCount, l2 >> 20, copy_gbs);
  std::printf("%-10s %5s %6s %5s %6s %10s %9s %8s %7s\n", "shape", "batch", "ctx", "kv", "layers", "us/layer",
              "GB/s", "of copy", "vs bf16");

  struct Shape_ {
    const char* name;
    int nH, nKv, hd;
  };
  bool ok = true;
  for (Shape_ m : {Shape_{"llama2-7b", 32, 32, 128}, Shape_{"llama3-8b", 32, 8, 128}})
    for (int batch : {1, 8})
      for (int context = 2048; context <= max_context; context *= 2) {
        double bf16_us = 0;
        for (DType d : {DType::BF16, DType::FP8, DType::I8}) {
          const int64_t per_seq = context / 16, n_blocks = batch * per_seq;
          const double row_bytes = m.hd * double(dtype_size(d)) + (d == DType::BF16 ? 0 : 4);
          const double layer_bytes = 2.0 * batch * double(context) * m.nKv * row_bytes;
          const int layers = int(std::min<double>(32, std::ceil(4.0 * double(l2) / layer_bytes)));
          std::vector<Tensor> k, v;
          for (int l = 0; l < layers; ++l) {
            k.push_back(decode_cache(d, n_blocks, m.nKv, m.hd, 2 * l + 1, stream));
            v.push_back(decode_cache(d, n_blocks, m.nKv, m.hd, 2 * l + 2, stream));
          }
          Tensor q = dev(DType::F32, {batch, int64_t(m.nH) * m.hd}), out = dev(DType::F32, {batch, int64_t(m.nH) * m.hd});
          Tensor seq = dev(DType::I32, {batch}), pos = dev(DType::I32, {batch}), table = dev(DType::I32, {batch, per_seq});
          bench::fill_f32<<<256, 256, 0, stream>>>(q.data<float>(), q.numel(), 7);
          std::vector<int32_t> hs(batch), hp(batch, context - 1), ht(static_cast<size_t>(n_blocks));
          for (int b = 0; b < batch; ++b) hs[b] = b;
          for (int64_t i = 0; i < n_blocks; ++i) ht[i] = int32_t(i);
          bench::upload_i32(seq, hs);
          bench::upload_i32(pos, hp);
          bench::upload_i32(table, ht);
          const int64_t scratch_floats = wc::attention_scratch_floats(q, k[0], table, m.nH, prop.multiProcessorCount);
          float* scratch;
          CK(cudaMalloc(&scratch, size_t(scratch_floats) * 4));
          auto sweep = [&] {
            for (int l = 0; l < layers; ++l)
              wc::launch_attention(ctx, q, k[l], v[l], seq, table, pos, m.nH, 1.0f / std::sqrt(float(m.hd)), out,
                                   scratch, prop.multiProcessorCount);
          };
          const double us = 1e3 * device.median_ms(3, 10, sweep) / layers, gbs = layer_bytes / (us * 1e3);
          const std::vector<float> o = bench::download(out);
          const bool finite = std::all_of(o.begin(), o.end(), [](float x) { return std::isfinite(x); });
          ok &= finite;
          if (d == DType::BF16) bf16_us = us;
          char speedup[16] = "";
          if (d != DType::BF16) std::snprintf(speedup, sizeof speedup, "%.2fx", bf16_us / us);
          std::printf("%-10s %5d %6d %5s %6d %10.1f %9.0f %7.0f%% %7s%s\n", m.name, batch, context, dtype_name(d),
                      layers, us, gbs, 100 * gbs / copy_gbs, speedup, finite ? "" : "  NaN!");
          CK(cudaFree(scratch));
        }
      }
  ok &= device.status_ok();
  return ok ? 0 : 1;
}

}  // namespace
