// Decode attention alone (split-K, attention-decode.cu) over paged KV caches of bf16, fp8 and int8: batch 1 and 8,
// contexts 2K to 32K, the Llama-2-7B shape (32 heads, 32 KV heads, hd 128) and the Llama-3-8B shape (32 / 8).
// Included by attention-bench.cu (bench-device.cuh: dev(), CK, Device, the fills); run as `attention-bench decode [max context]`.
//
// Each sequence holds `context` positions in blocks of 16 (WEFT_BENCH_KV_BLOCK; a block table of consecutive blocks per sequence);
// the query of sequence b is at position context - 1. Bytes per launch = what one layer's decode must read:
// K and V rows (and the 1-byte caches' row scales) of every position. Enough layers' caches that one sweep
// over them is over 4x the L2 (capped at 32 layers: a real step's worth), timed as a sweep of launches, one per
// layer and at least 8 (WEFT_BENCH_MIN_LAUNCHES; the layers taken in turn again: one launch a sweep at 32K put the
// graph launch's and the events' own few microseconds on each 80-140 us layer), median of 10 sweeps, two ways:
// launched one by one from the host (`eager`, as RESULTS.md's tables before
// session 7) and as one CUDA graph of the sweep (`graph`, as weft's decode steps run: no host launch cost). GB/s
// against the device's copy bandwidth (cudaMemcpy device to device, read + write bytes, best of 10), and the 1-byte
// caches' speedup over bf16; rel err: max |out - ref| / max |ref| against the CUDA-core kernel over an f32 cache of
// the same values (exit 1 above ops-check's 1e-5, on a NaN, or where the graph's output differs from the eager
// launches'). The last lines are a table of it all.
#include "cuda/kv-block-table.cuh"

namespace {

// Valid codes of either 1-byte type: e4m3 with the top exponent bit pattern 1111 avoided (no NaN), any int8.
__global__ void fill_codes(uint8_t* p, size_t n, uint64_t seed, uint8_t mask) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uint8_t(weft::splitmix64(weft::splitmix64(seed) ^ i) >> 56) & mask;
}

// A cache [nBlocks, nKv, block, hd] of `d` with random contents (and its scales for the 1-byte types).
Tensor decode_cache(DType d, int64_t n_blocks, int64_t n_kv, int64_t hd, uint64_t seed, cudaStream_t stream,
                    int64_t block = 16) {
  Tensor t = dev(d, {n_blocks, n_kv, block, hd});
  if (d == DType::BF16) {
    bench::fill_bf16<<<1024, 256, 0, stream>>>(t.data<__nv_bfloat16>(), t.numel(), seed);
  } else {
    fill_codes<<<1024, 256, 0, stream>>>(t.data<uint8_t>(), t.numel(), seed, d == DType::FP8 ? 0xf7 : 0xff);
    auto scales = std::make_shared<Tensor>(dev(DType::F32, {n_blocks, n_kv, block}));
    bench::fill_value<<<1024, 256, 0, stream>>>(scales->data<float>(), scales->numel(), d == DType::FP8 ? 1.0f / 448 : 1.0f / 127);
    t.scales = scales;
  }
  CK(cudaGetLastError());
  return t;
}

// The values of a cache (its f32 copy: bf16 widened, a code times its row's scale, as kv_value reads them).
template <typename KV>
__global__ void cache_values(const KV* c, const float* scales, float* out, size_t n, int hd) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = wc::kv_value(c[i], scales != nullptr ? scales[i / hd] : 1.0f);
}
Tensor f32_values(const Tensor& c, cudaStream_t stream) {
  Tensor t = dev(DType::F32, c.shape);
  const int hd = int(c.dim(3));
  if (c.dtype == DType::BF16)
    cache_values<<<1024, 256, 0, stream>>>(c.data<__nv_bfloat16>(), nullptr, t.data<float>(), c.numel(), hd);
  else if (c.dtype == DType::FP8)
    cache_values<<<1024, 256, 0, stream>>>(c.data<__nv_fp8_e4m3>(), c.kv_scales(), t.data<float>(), c.numel(), hd);
  else
    cache_values<<<1024, 256, 0, stream>>>(c.data<int8_t>(), c.kv_scales(), t.data<float>(), c.numel(), hd);
  CK(cudaGetLastError());
  return t;
}

// Exactness at the shapes the timed sweep does not reach: head dims 64 (GQA 8), 128 (MHA) and 256, tokens at
// positions 0, 5 and random ones (one partition, written directly; several, merged by the last block), paged
// blocks in reverse order. Each against the CUDA-core kernel over an f32 cache of the same values (1e-5), and a
// second launch gives the same bits. False on a failure.
bool decode_checks(bench::Device& device) {
  const cudaStream_t stream = device.stream;
  const int sms = device.prop.multiProcessorCount;
  struct Case {
    int T, nH, nKv, hd, C;
  };
  bool ok = true;
  uint64_t seed = 100;
  for (DType d : {DType::BF16, DType::FP8, DType::I8})
    for (Case c : {Case{5, 16, 2, 64, 4096}, Case{3, 32, 32, 128, 8192}, Case{4, 8, 2, 256, 8192},
                   Case{2, 32, 8, 128, 30000}}) {
      const int per_seq = (c.C + 15) / 16, n_blocks = c.T * per_seq;
      Tensor k = decode_cache(d, n_blocks, c.nKv, c.hd, ++seed, stream), v = decode_cache(d, n_blocks, c.nKv, c.hd, ++seed, stream);
      Tensor q = dev(DType::F32, {c.T, int64_t(c.nH) * c.hd}), out = dev(DType::F32, q.shape), out2 = dev(DType::F32, q.shape),
             ref = dev(DType::F32, q.shape);
      Tensor seq = dev(DType::I32, {c.T}), pos = dev(DType::I32, {c.T}), table = dev(DType::I32, {c.T, per_seq});
      bench::fill_f32<<<256, 256, 0, stream>>>(q.data<float>(), q.numel(), ++seed);
      std::vector<int32_t> hs(c.T), hp(c.T), ht(static_cast<size_t>(n_blocks));
      for (int t = 0; t < c.T; ++t) {
        hs[t] = t;
        hp[t] = t == 0 ? c.C - 1 : t == 1 ? 5 : t == 2 ? 0 : int(weft::splitmix64(seed + t) % uint64_t(c.C));
      }
      for (int i = 0; i < n_blocks; ++i) ht[i] = n_blocks - 1 - i;
      bench::upload_i32(seq, hs);
      bench::upload_i32(pos, hp);
      bench::upload_i32(table, ht);
      float* scratch;
      CK(cudaMalloc(&scratch, size_t(wc::attention_scratch_floats(q, k, table, c.nH, sms)) * 4));
      const float scale = 1.0f / std::sqrt(float(c.hd));
      bench::poison<<<256, 256, 0, stream>>>(out.data<float>(), out.numel());
      wc::launch_attention(device.ctx, q, k, v, seq, table, pos, c.nH, scale, out, scratch, sms);
      wc::launch_attention(device.ctx, q, k, v, seq, table, pos, c.nH, scale, out2, scratch, sms);
      Tensor kf = f32_values(k, stream), vf = f32_values(v, stream);
      wc::launch_attention(device.ctx, q, kf, vf, seq, table, pos, c.nH, scale, ref, scratch, sms);
      bool nan = false;
      const std::vector<float> got = bench::download(out);
      const double err = bench::rel_err(got, bench::download(ref), nan);
      const bool same = got == bench::download(out2), pass = !nan && same && err <= 1e-5;
      std::printf("check %-5s T=%d %d/%d x%d C=%d: rel err %.1e%s%s\n", dtype_name(d), c.T, c.nH, c.nKv, c.hd, c.C,
                  err, same ? "" : ", second launch differs", pass ? "" : "  FAIL");
      ok &= pass;
      CK(cudaFree(scratch));
    }
  return ok & device.status_ok();
}

// decode [MAX_CONTEXT [SHAPE [BATCH [MIN_CONTEXT]]]]: SHAPE llama2-7b or llama3-8b, BATCH 1 or 8 (default: both of
// each, contexts 2048 .. 32768). With WEFT_PROFILE_RANGE set, one more sweep of each row and cache type runs between
// cudaProfilerStart and cudaProfilerStop, for `ncu --profile-from-start off`.
int decode_bench(int argc, char** argv) {
  const int max_context = argc > 0 ? std::atoi(argv[0]) : 32768;
  const std::string only_shape = argc > 1 ? argv[1] : "";
  const int only_batch = argc > 2 ? std::atoi(argv[2]) : 0, min_context = argc > 3 ? std::atoi(argv[3]) : 2048;
  const bool profile_range = std::getenv("WEFT_PROFILE_RANGE") != nullptr;
  // Positions a paged block holds (WEFT_BENCH_KV_BLOCK, default 16: the product's default).
  const int kv_block = std::getenv("WEFT_BENCH_KV_BLOCK") ? std::atoi(std::getenv("WEFT_BENCH_KV_BLOCK")) : 16;
  const int min_launches = std::getenv("WEFT_BENCH_MIN_LAUNCHES") ? std::atoi(std::getenv("WEFT_BENCH_MIN_LAUNCHES")) : 8;
  bench::Device device;
  const cudaDeviceProp& prop = device.prop;
  const cudaStream_t stream = device.stream;
  const wc::Ctx ctx = device.ctx;
  const double copy_gbs = device.copy_bandwidth(size_t{2} << 30);
  const size_t l2 = size_t(prop.l2CacheSize);
  std::printf("device: %s, %d SMs, L2 %zu MiB; copy bandwidth %.0f GB/s (cudaMemcpy D2D, read + write)\n", prop.name,
              prop.multiProcessorCount, l2 >> 20, copy_gbs);
  bool ok = decode_checks(device);
  std::printf("%-10s %5s %6s %5s %6s %10s %8s %7s %10s %8s %7s %9s\n", "shape", "batch", "ctx", "kv", "layers",
              "eager us", "of copy", "vs bf16", "graph us", "of copy", "vs bf16", "rel err");

  struct Shape_ {
    const char* name;
    int nH, nKv, hd;
  };
  struct Row {  // one (shape, batch, context): us per layer of bf16, fp8, int8, eager and in a graph
    const char* name;
    int batch, context;
    double eager[3], graph[3], bytes[3];
  };
  std::vector<Row> table;
  for (Shape_ m : {Shape_{"llama2-7b", 32, 32, 128}, Shape_{"llama3-8b", 32, 8, 128}})
    for (int batch : {1, 8})
      for (int context = min_context; context <= max_context; context *= 2) {
        if ((!only_shape.empty() && only_shape != m.name) || (only_batch != 0 && only_batch != batch)) continue;
        Row row{m.name, batch, context, {}, {}, {}};
        int di = 0;
        for (DType d : {DType::BF16, DType::FP8, DType::I8}) {
          const int64_t per_seq = context / kv_block, n_blocks = batch * per_seq;
          const double row_bytes = m.hd * double(dtype_size(d)) + (d == DType::BF16 ? 0 : 4);
          const double layer_bytes = 2.0 * batch * double(context) * m.nKv * row_bytes;
          const int layers = int(std::min<double>(32, std::ceil(4.0 * double(l2) / layer_bytes)));
          const int launches = std::max(min_launches, layers);
          std::vector<Tensor> k, v;
          for (int l = 0; l < layers; ++l) {
            k.push_back(decode_cache(d, n_blocks, m.nKv, m.hd, 2 * l + 1, stream, kv_block));
            v.push_back(decode_cache(d, n_blocks, m.nKv, m.hd, 2 * l + 2, stream, kv_block));
          }
          Tensor q = dev(DType::F32, {batch, int64_t(m.nH) * m.hd}), out = dev(DType::F32, {batch, int64_t(m.nH) * m.hd});
          Tensor seq = dev(DType::I32, {batch}), pos = dev(DType::I32, {batch}), table_t = dev(DType::I32, {batch, per_seq});
          bench::fill_f32<<<256, 256, 0, stream>>>(q.data<float>(), q.numel(), 7);
          std::vector<int32_t> hs(batch), hp(batch, context - 1), ht(static_cast<size_t>(n_blocks));
          for (int b = 0; b < batch; ++b) hs[b] = b;
          for (int64_t i = 0; i < n_blocks; ++i) ht[i] = int32_t(i);
          bench::upload_i32(seq, hs);
          bench::upload_i32(pos, hp);
          bench::upload_i32(table_t, ht);
          const int64_t scratch_floats = wc::attention_scratch_floats(q, k[0], table_t, m.nH, prop.multiProcessorCount);
          float* scratch;
          CK(cudaMalloc(&scratch, size_t(scratch_floats) * 4));
          auto sweep = [&] {
            for (int l = 0; l < launches; ++l)
              wc::launch_attention(ctx, q, k[l % layers], v[l % layers], seq, table_t, pos, m.nH, 1.0f / std::sqrt(float(m.hd)), out,
                                   scratch, prop.multiProcessorCount);
          };
          const double us = 1e3 * device.median_ms(3, 10, sweep) / launches, gbs = layer_bytes / (us * 1e3);
          const std::vector<float> o = bench::download(out);
          const double gus = 1e3 * device.graph_median_ms(3, 10, sweep) / launches;
          const std::vector<float> og = bench::download(out);
          if (profile_range) {
            CK(cudaStreamSynchronize(stream));
            CK(cudaProfilerStart());
            sweep();
            CK(cudaStreamSynchronize(stream));
            CK(cudaProfilerStop());
          }
          // Against the CUDA-core kernel (and the merge kernel) over an f32 cache of the same values, the last
          // launch's layer: within ops-check's 1e-5 of max|out| (check_kv_bf16, check_kv_quant).
          double err;
          {
            Tensor kf = f32_values(k[(launches - 1) % layers], stream), vf = f32_values(v[(launches - 1) % layers], stream);
            Tensor ref = dev(DType::F32, out.shape);
            wc::launch_attention(ctx, q, kf, vf, seq, table_t, pos, m.nH, 1.0f / std::sqrt(float(m.hd)), ref, scratch,
                                 prop.multiProcessorCount);
            bool nan = false;
            err = bench::rel_err(og, bench::download(ref), nan);
          }
          const bool finite = std::all_of(o.begin(), o.end(), [](float x) { return std::isfinite(x); });
          const bool same = o == og;  // a graph replay gives the eager launches' bits
          ok &= finite && same && err <= 1e-5;
          row.eager[di] = us, row.graph[di] = gus, row.bytes[di] = layer_bytes;
          char speedup[16] = "", gspeedup[16] = "";
          if (di > 0) {
            std::snprintf(speedup, sizeof speedup, "%.2fx", row.eager[0] / us);
            std::snprintf(gspeedup, sizeof gspeedup, "%.2fx", row.graph[0] / gus);
          }
          std::printf("%-10s %5d %6d %5s %6d %10.1f %7.0f%% %7s %10.1f %7.0f%% %7s %9.1e%s%s%s\n", m.name, batch,
                      context, dtype_name(d), layers, us, 100 * gbs / copy_gbs, speedup, gus,
                      100 * layer_bytes / (gus * 1e3) / copy_gbs, gspeedup, err, finite ? "" : "  NaN!",
                      same ? "" : "  graph != eager!", err <= 1e-5 ? "" : "  FAIL");
          CK(cudaFree(scratch));
          ++di;
        }
        table.push_back(row);
      }
  ok &= device.status_ok();

  // The table: us per layer (percent of the copy bandwidth), and the 1-byte caches' speedup over bf16.
  auto of_copy = [&](double bytes, double us) { return 100 * bytes / (us * 1e3) / copy_gbs; };
  std::printf("\ncopy bandwidth %.0f GB/s; us per layer (of copy); eager = launched from the host, graph = one CUDA graph\n",
              copy_gbs);
  std::printf("| shape | batch | context | bf16 eager | fp8 eager (vs bf16) | int8 eager (vs bf16) | bf16 graph | "
              "fp8 graph (vs bf16) | int8 graph (vs bf16) |\n|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : table) {
    std::printf("| %s | %d | %d |", r.name, r.batch, r.context);
    for (const double* t : {r.eager, r.graph})
      for (int i = 0; i < 3; ++i) {
        if (i == 0)
          std::printf(" %.1f (%.0f%%) |", t[0], of_copy(r.bytes[0], t[0]));
        else
          std::printf(" %.1f (%.0f%%, %.2fx) |", t[i], of_copy(r.bytes[i], t[i]), t[0] / t[i]);
      }
    std::printf("\n");
  }
  return ok ? 0 : 1;
}

}  // namespace
