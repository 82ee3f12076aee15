// weft_ops_check: every op on the CPU backend (the reference) and the CUDA backend, on seeded random inputs
// at small and real widths (hidden 4096, heads 32/8, headDim 128, T = 1, 3, 8, 64, 300, cache C = 2048).
// CUDA outputs are poisoned (CudaOptions::poison fills every new tensor with 0xff bytes, NaN in f32) so that
// unwritten elements show. Prints op x shape x max error x bound x pass/fail; exits 1 on any failure.
// Needs a GPU, no Node:  cmake -S native -B /tmp/b -DWEFT_CUDA=ON -DWEFT_ADDON=OFF &&
//                        cmake --build /tmp/b -j --target weft_ops_check && /tmp/b/weft_ops_check
//
// Bounds are norm-wise: |gpu - cpu| <= rtol * max|cpu| (+ atol), with rtol per op: copies and integer
// results exact; elementwise fp32 1e-6; reductions over a row (rmsNorm, matmul over K = 4096, logSoftmax)
// 1e-5 (matmul over 8 tokens with f16/bf16 weights, x rounded for the tensor cores: 2e-3); attention: decode
// (T <= 64: fp32 softmax over up to 2048 positions, split-K merge) 1e-4, prefill (T > 64: f16 tensor cores)
// 1e-3, derived in check_attention. The KV ops run on one block per sequence (kvBlockTable [S, 1]) and on paged
// caches (check_paged: blocks of B = 16, 7, 64 positions scattered through the pool), where the kernels must also
// equal their one-block results bit for bit when the capacities match (same rows, same order). bf16 caches
// (check_kv_bf16, check_graph): equal to f32 caches holding the same bf16 values, bit for bit (decode attention
// within 1e-5: bf16 caches run on tensor cores, f32 caches on CUDA cores).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "backend.h"
#include "bf16-round.h"
#include "error.h"

using namespace weft;

namespace {

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  float uniform(float lo = -1, float hi = 1) { return lo + (hi - lo) * static_cast<float>(next() >> 40) / 16777216.0f; }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
  std::vector<float> floats(size_t n, float lo = -1, float hi = 1) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
};

struct Row {
  std::string op, shape, note;
  double err, bound;
  bool pass;
};
std::vector<Row> rows;

std::shared_ptr<Backend> cpu, gpu;

Tensor up(Backend& b, const std::vector<float>& v, const Shape& shape) {
  return b.upload(v.data(), v.size() * 4, DType::F32, shape);
}
Tensor up_i(Backend& b, const std::vector<int32_t>& v) {
  return b.upload(v.data(), v.size() * 4, DType::I32, {static_cast<int64_t>(v.size())});
}
// f32 values -> bf16/f16 bits (truncation is fine: both backends get the same bits).
Tensor up_narrow(Backend& b, const std::vector<float>& v, const Shape& shape, DType d) {
  if (d == DType::F32) return up(b, v, shape);
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    uint32_t x;
    std::memcpy(&x, &v[i], 4);
    if (d == DType::BF16) {
      bits[i] = static_cast<uint16_t>(x >> 16);
    } else {  // f16 of a value in [-1, 1): sign, exponent, 10 mantissa bits
      float a = std::fabs(v[i]);
      int e;
      float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
      uint16_t sign = v[i] < 0 ? 0x8000 : 0;
      if (a < 6.2e-5f)
        bits[i] = sign;
      else
        bits[i] = static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | (static_cast<int>((m * 2 - 1) * 1024) & 0x3ff));
    }
  }
  return b.upload(bits.data(), bits.size() * 2, d, shape);
}
std::vector<float> down(Backend& b, const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  b.download(t, v.data());
  return v;
}
std::vector<int32_t> down_i(Backend& b, const Tensor& t) {
  std::vector<int32_t> v(static_cast<size_t>(t.numel()));
  b.download(t, v.data());
  return v;
}

void compare(const std::string& op, const std::string& shape, const std::vector<float>& got,
             const std::vector<float>& want, double rtol, double atol = 0, const std::string& note = "") {
  double scale = 0, err = 0;
  bool finite = got.size() == want.size();
  for (float w : want) scale = std::max(scale, std::fabs(static_cast<double>(w)));
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) finite = false;
    if (std::isnan(want[i])) continue;
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
  }
  double bound = rtol * scale + atol;
  rows.push_back({op, shape, note, finite ? err : INFINITY, bound, finite && err <= bound});
}
void compare_i(const std::string& op, const std::string& shape, const std::vector<int32_t>& got,
               const std::vector<int32_t>& want, const std::string& note = "") {
  double err = 0;
  for (size_t i = 0; i < got.size(); ++i) err = std::max(err, std::fabs(double(got[i]) - want[i]));
  rows.push_back({op, shape, note, got.size() == want.size() ? err : INFINITY, 0, got == want});
}
void fail_row(const std::string& op, const std::string& shape, const std::string& what) {
  rows.push_back({op, shape, what, INFINITY, 0, false});
}

// Runs one case; an exception becomes a failed row. GPU work runs inside a step (arena outputs).
void run_case(const std::string& op, const std::string& shape, const std::function<void()>& body) {
  try {
    gpu->begin_step();
    body();
    gpu->end_step();
  } catch (const std::exception& e) {
    try {
      gpu->end_step();
    } catch (...) {
    }
    fail_row(op, shape, e.what());
  }
}

// Reference HF llama inverse frequencies.
std::vector<float> inv_freq(int hd, double base = 500000) {
  std::vector<float> f(hd / 2);
  for (int j = 0; j < hd / 2; ++j) f[j] = static_cast<float>(1.0 / std::pow(base, 2.0 * j / hd));
  return f;
}

void check_elementwise(Rng& rng) {
  const int64_t H = 4096;
  for (int64_t T : {1, 3, 8, 64, 300}) {
    std::string sh = "T=" + std::to_string(T) + " H=4096";
    run_case("add", sh, [&] {
      auto a = rng.floats(T * H), b = rng.floats(T * H);
      compare("add", sh, down(*gpu, gpu->add(up(*gpu, a, {T, H}), up(*gpu, b, {T, H}))),
              down(*cpu, cpu->add(up(*cpu, a, {T, H}), up(*cpu, b, {T, H}))), 0);
    });
    for (DType wd : {DType::F32, DType::BF16}) {
      std::string s2 = sh + " w " + dtype_name(wd);
      run_case("rmsNorm", s2, [&] {
        auto x = rng.floats(T * H, -3, 3), w = rng.floats(H, 0.5, 1.5);
        compare("rmsNorm", s2,
                down(*gpu, gpu->rms_norm(up(*gpu, x, {T, H}), up_narrow(*gpu, w, {H}, wd), 1e-5f)),
                down(*cpu, cpu->rms_norm(up(*cpu, x, {T, H}), up_narrow(*cpu, w, {H}, wd), 1e-5f)), 1e-5);
      });
    }
    std::string s3 = "T=" + std::to_string(T) + " F=3584";
    run_case("siluMul", s3, [&] {
      int64_t F = 3584;
      auto g = rng.floats(T * 2 * F, -6, 6);
      compare("siluMul", s3, down(*gpu, gpu->silu_mul(up(*gpu, g, {T, 2 * F}))),
              down(*cpu, cpu->silu_mul(up(*cpu, g, {T, 2 * F}))), 1e-6);
    });
    std::string s4 = "T=" + std::to_string(T) + " 32x128";
    run_case("rope", s4, [&] {
      auto x = rng.floats(T * 4096);
      std::vector<int32_t> pos(T);
      for (auto& p : pos) p = rng.below(2048);
      auto f = inv_freq(128);
      compare("rope", s4, down(*gpu, gpu->rope(up(*gpu, x, {T, 4096}), up_i(*gpu, pos), up(*gpu, f, {64}), 128)),
              down(*cpu, cpu->rope(up(*cpu, x, {T, 4096}), up_i(*cpu, pos), up(*cpu, f, {64}), 128)), 1e-5);
    });
    run_case("embedding", sh, [&] {
      int64_t Vr = 1000;
      auto table = rng.floats(Vr * H);
      std::vector<int32_t> ids(T);
      for (auto& i : ids) i = 500 + rng.below(1200);  // some outside [500, 1500): zero rows
      compare("embedding", sh + " bf16",
              down(*gpu, gpu->embedding(up_narrow(*gpu, table, {Vr, H}, DType::BF16), up_i(*gpu, ids), 500)),
              down(*cpu, cpu->embedding(up_narrow(*cpu, table, {Vr, H}, DType::BF16), up_i(*cpu, ids), 500)), 0);
    });
    run_case("slice/concat/gather", sh, [&] {
      auto x = rng.floats(T * H);
      std::vector<int32_t> r(std::max<int64_t>(1, T / 2));
      for (auto& i : r) i = rng.below(static_cast<int>(T));
      auto run = [&](Backend& b) {
        Tensor xt = up(b, x, {T, H});
        Tensor a = b.slice_cols(xt, 100, 1124), c = b.slice_cols(xt, 7, 8);
        Tensor cat = b.concat_cols({a, c, a});
        return down(b, b.gather_rows(cat, up_i(b, r)));
      };
      compare("slice/concat/gather", sh, run(*gpu), run(*cpu), 0);
    });
  }
  // siluMul at widths that are not whole 16-byte runs (the kernel's scalar path); own inputs, so that the
  // checks after this one draw the same random inputs as before
  Rng odd_rng(41);
  for (int64_t F : {1001, 6}) {
    std::string sh = "T=3 F=" + std::to_string(F);
    run_case("siluMul", sh, [&] {
      auto g = odd_rng.floats(3 * 2 * F, -6, 6);
      compare("siluMul", sh, down(*gpu, gpu->silu_mul(up(*gpu, g, {3, 2 * F}))),
              down(*cpu, cpu->silu_mul(up(*cpu, g, {3, 2 * F}))), 1e-6);
    });
  }
}

// Mixture of experts: routing (exact experts, weights 1e-6), expertMatmul on the device-routed GEMV (T <= 8)
// and the grouped path (T > 8), with expert parallelism (experts 2..5 of 8 held: other pairs give zero rows),
// x per token and per pair, a K that forces the scalar fallback, then combineExperts.
void check_moe(Rng& rng) {
  const int64_t E = 8, k = 2, El = 4, start = 2;
  for (int64_t T : {1, 3, 8, 64, 300})
    for (int64_t K : {1024, 1000}) {
      const int64_t N = 512;
      std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(K) + " N=512 El=4 bf16";
      run_case("moe", sh, [&] {
        auto logits = rng.floats(T * E, -4, 4), x = rng.floats(T * K), xp = rng.floats(T * k * K),
             w = rng.floats(El * N * K);
        auto route = [&](Backend& b) { return b.route_top_k(up(b, logits, {T, E}), k); };
        Backend::Routing rg = route(*gpu), rc = route(*cpu);
        compare_i("routeTopK", sh, down_i(*gpu, rg.experts), down_i(*cpu, rc.experts));
        compare("routeTopK weights", sh, down(*gpu, rg.weights), down(*cpu, rc.weights), 1e-6);
        auto run = [&](Backend& b, const Backend::Routing& r, const std::vector<float>& xv, int64_t rows_x) {
          Tensor y = b.expert_matmul(up(b, xv, {rows_x, K}), up_narrow(b, w, {El, N, K}, DType::BF16), r.experts, start);
          return std::make_pair(down(b, y), down(b, b.combine_experts(y, r.weights)));
        };
        // Over 8 tokens the grouped path's cuBLAS rounds x to bf16 (as matmul).
        const double rtol = T > 8 ? 2e-3 : 1e-5;
        auto g = run(*gpu, rg, x, T), c = run(*cpu, rc, x, T);
        compare("expertMatmul", sh + " x/token", g.first, c.first, rtol);
        compare("combineExperts", sh, g.second, c.second, rtol);
        compare("expertMatmul", sh + " x/pair", run(*gpu, rg, xp, T * k).first, run(*cpu, rc, xp, T * k).first, rtol);
        auto gate_up = rng.floats(T * k * 2 * K, -4, 4);
        auto gated = [&](Backend& b, const Backend::Routing& r) {
          return down(b, b.silu_mul_expert_matmul(up(b, gate_up, {T * k, 2 * K}), up_narrow(b, w, {El, N, K}, DType::BF16),
                                                  r.experts, start));
        };
        compare("siluMulExpertMatmul", sh, gated(*gpu, rg), gated(*cpu, rc), rtol);
      });
    }
}

void check_matmul(Rng& rng) {
  const int64_t K = 4096;
  for (int64_t T : {1, 3, 8, 64, 300})
    for (DType wd : {DType::F32, DType::BF16, DType::F16}) {
      int64_t N = T >= 64 ? 1024 : 4096;
      std::string sh = "T=" + std::to_string(T) + " K=4096 N=" + std::to_string(N) + " " + dtype_name(wd);
      run_case("matmul", sh, [&] {
        auto x = rng.floats(T * K), w = rng.floats(N * K);
        // Over 8 tokens with f16/bf16 weights the product runs on tensor cores with x rounded to the weight
        // dtype (bf16: 2^-9 relative per term, random signs): ~2^-9 * sqrt(K) * mean|x w| against outputs of
        // scale ~100, so 2e-3 of the scale, as test/gpu/ops.test.ts.
        double rtol = T > 8 && wd != DType::F32 ? 2e-3 : 1e-5;
        compare("matmul", sh, down(*gpu, gpu->matmul(up(*gpu, x, {T, K}), up_narrow(*gpu, w, {N, K}, wd))),
                down(*cpu, cpu->matmul(up(*cpu, x, {T, K}), up_narrow(*cpu, w, {N, K}, wd))), rtol);
        auto gate_up = rng.floats(T * 2 * K, -4, 4);
        compare("siluMulMatmul", sh,
                down(*gpu, gpu->silu_mul_matmul(up(*gpu, gate_up, {T, 2 * K}), up_narrow(*gpu, w, {N, K}, wd))),
                down(*cpu, cpu->silu_mul_matmul(up(*cpu, gate_up, {T, 2 * K}), up_narrow(*cpu, w, {N, K}, wd))), rtol);
      });
    }
}

// The GEMV at the widths of a 7B decode step (bf16 weights, 1 and 8 tokens): q/k/v, o, gate/up, the LM head,
// and the down projection formed from [gate | up] (K = 11008), where the split over K and the cluster size
// differ from the 4096-square case above.
void check_matmul_7b_shapes(Rng& rng) {
  struct Shape2 {
    int64_t N, K;
    bool gated;
  };
  for (Shape2 s : {Shape2{12288, 4096, false}, Shape2{4096, 4096, false}, Shape2{22016, 4096, false},
                   Shape2{32000, 4096, false}, Shape2{4096, 11008, true}})
    for (int64_t T : {1, 8}) {
      std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(s.K) + " N=" + std::to_string(s.N) + " bf16";
      const char* op = s.gated ? "siluMulMatmul" : "matmul";
      run_case(op, sh, [&] {
        auto w = rng.floats(s.N * s.K);
        if (s.gated) {
          auto gate_up = rng.floats(T * 2 * s.K, -4, 4);
          compare(op, sh,
                  down(*gpu, gpu->silu_mul_matmul(up(*gpu, gate_up, {T, 2 * s.K}), up_narrow(*gpu, w, {s.N, s.K}, DType::BF16))),
                  down(*cpu, cpu->silu_mul_matmul(up(*cpu, gate_up, {T, 2 * s.K}), up_narrow(*cpu, w, {s.N, s.K}, DType::BF16))),
                  1e-5);
        } else {
          auto x = rng.floats(T * s.K);
          compare(op, sh, down(*gpu, gpu->matmul(up(*gpu, x, {T, s.K}), up_narrow(*gpu, w, {s.N, s.K}, DType::BF16))),
                  down(*cpu, cpu->matmul(up(*cpu, x, {T, s.K}), up_narrow(*cpu, w, {s.N, s.K}, DType::BF16))), 1e-5);
        }
      });
    }
}

// Quantized weights (upload_quantized) at 7B widths: the CUDA GEMV that dequantizes as it reads (T = 1, 2, 8,
// 16, and 64 on tensor cores in one pass or, at K = 11008, two) and the dequantize-then-GEMM path (T = 300, past
// the 64 rows the tensor cores take) against the CPU, which dequantizes each row into fp32 first.
// int8 per channel and in groups of 128, int4 in groups of 128 and 32; codes uniform over their range, scales
// ~1 / (sqrt(K) * qmax) so outputs are O(1). The GEMV runs on tensor cores with x rounded to f16 (quant_rtol).
// The GEMM path rounds x to bf16 as the dense GEMM does (2e-3 there) and also each dequantized weight, which the CPU keeps in fp32: two independent roundings of the same size, so the error
// grows by about sqrt(2) (measured on the H200: up to 1.25x the dense 2e-3), hence kQuantGemmRtol = 3e-3.
constexpr double kQuantGemmRtol = 3e-3;
// The GEMV on tensor cores (gemv-quant-mma.cuh: T <= 16, and 17..64 in one pass or two; groups of whole
// 16-byte vectors, 16 int8 or 32 int4 columns; K up to 16384 at 16 tokens) rounds x to f16: a relative error up to 2^-11 per element (rms 2^-11 / sqrt(3) = 2.8e-4),
// independent per term, with the products exact in fp32, so the output's error is ~3e-4 of its scale. Groups
// smaller than its 64-byte chunk (int8 g16/g32 or K % 64 != 0, int4 g32/g64) round each scaled weight to f16 as
// well: ~sqrt(2) more (up to 5.2e-4 in a Python emulation of the kernel's arithmetic). The bounds: 1e-3 and 2e-3.
// The other shapes run gemv.cu's kernels (x in fp32): 1e-5.
constexpr double kQuantMmaRtol = 1e-3, kQuantMmaSmallGroupRtol = 2e-3;
// One token where gemv-one-token.cu takes the group (whole 16-byte vectors, a power of two of them or the row, K <=
// 16384): exact weights times fp32 x, summed in fp32, as the CPU does (int4 in groups of 128 and int8 per channel on s8
// tensor cores with x as three base-256 digits, ~22 bits, and exact integer sums): 1e-5.
double quant_rtol(DType dt, int64_t K, int64_t group, int64_t T) {
  const bool int4 = dt == DType::I4;
  if (T > 64 || (T > 16 && (group % (int4 ? 32 : 16) != 0 || K > 16384))) return kQuantGemmRtol;
  if (T > 16) return kQuantMmaSmallGroupRtol;  // from 17 tokens every group's scales go into the f16 weights
  const int64_t vectors = group / (int4 ? 32 : 16);
  if (T == 1 && group % (int4 ? 32 : 16) == 0 && K <= 16384 && (group == K || (vectors & (vectors - 1)) == 0))
    return 1e-5;
  if (group % (int4 ? 32 : 16) != 0 || K > 16384) return 1e-5;
  return group % (int4 ? 128 : 64) == 0 ? kQuantMmaRtol : kQuantMmaSmallGroupRtol;
}
struct QuantPair {
  Tensor cpu_w, gpu_w;
};
QuantPair upload_quant_pair(Rng& rng, DType dt, int64_t N, int64_t K, int64_t group, int64_t El = 0) {
  const int64_t S = K / group, M = El ? El * N : N;  // El > 0: stacked experts [El, N, K]
  std::vector<uint8_t> q(static_cast<size_t>(dt == DType::I4 ? M * K / 2 : M * K));
  for (auto& b : q) b = static_cast<uint8_t>(rng.next() >> 56);
  std::vector<uint16_t> scales(static_cast<size_t>(M * S));
  const float typical = 1.0f / (std::sqrt(static_cast<float>(K)) * (dt == DType::I4 ? 7.0f : 127.0f));
  for (auto& s : scales) {
    float v = typical * rng.uniform(0.5f, 1.5f);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    s = static_cast<uint16_t>(bits >> 16);
  }
  auto pair = [&](Backend& b) {
    Tensor sc = b.upload(scales.data(), scales.size() * 2, DType::BF16, El ? Shape{El, N, S} : Shape{N, S});
    return b.upload_quantized(q.data(), q.size(), dt, El ? Shape{El, N, K} : Shape{N, K}, sc);
  };
  return {pair(*cpu), pair(*gpu)};
}

void check_quant_matmul(Rng& rng) {
  struct Case {
    DType dt;
    int64_t group;  // 0: per channel
  };
  struct Shape2 {
    int64_t N, K;
    bool gated;
  };
  for (Case c : {Case{DType::I8, 0}, Case{DType::I8, 128}, Case{DType::I4, 128}, Case{DType::I4, 32}})
    for (Shape2 s : {Shape2{12288, 4096, false}, Shape2{4096, 4096, false}, Shape2{22016, 4096, false},
                     Shape2{4096, 11008, true}}) {
      const int64_t group = c.group ? c.group : s.K;
      QuantPair w;
      try {
        w = upload_quant_pair(rng, c.dt, s.N, s.K, group);
      } catch (const std::exception& e) {
        fail_row("uploadQuantized", dtype_name(c.dt), e.what());
        continue;
      }
      for (int64_t T : {1, 2, 8, 16, 64, 300}) {
        const char* op = s.gated ? "siluMulMatmul" : "matmul";
        std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(s.K) + " N=" + std::to_string(s.N) + " " +
                         dtype_name(c.dt) + " g" + (c.group ? std::to_string(c.group) : std::string("K"));
        run_case(op, sh, [&] {
          const double rtol = quant_rtol(c.dt, s.K, group, T);
          auto x = rng.floats(T * (s.gated ? 2 : 1) * s.K, s.gated ? -4 : -1, s.gated ? 4 : 1);
          const Shape xs{T, (s.gated ? 2 : 1) * s.K};
          if (s.gated)
            compare(op, sh, down(*gpu, gpu->silu_mul_matmul(up(*gpu, x, xs), w.gpu_w)),
                    down(*cpu, cpu->silu_mul_matmul(up(*cpu, x, xs), w.cpu_w)), rtol);
          else
            compare(op, sh, down(*gpu, gpu->matmul(up(*gpu, x, xs), w.gpu_w)),
                    down(*cpu, cpu->matmul(up(*cpu, x, xs), w.cpu_w)), rtol);
        });
      }
    }
}

// Quantized experts (Mixtral): the expert GEMV (T <= 64, routing on the device: the one-token tensor-core kernel, x
// in f16 from 2 tokens, up to 8 of an expert's pairs a pass: from 9 tokens a crowded case gives one expert every
// token's first choice, so its block makes further passes) and the grouped path (T = 80, each expert dequantized to
// bf16 for the GEMM) against the CPU, per token and per pair, gated and not; then Mixtral's down projection (K 14336:
// at 8 tokens x is staged in runs) with every expert held.
void check_quant_moe(Rng& rng) {
  struct Case {
    int64_t El, start, N, K;
    std::vector<int64_t> Ts;
  };
  const int64_t E = 8, k = 2;
  for (const Case& c : {Case{4, 2, 1024, 4096, {1, 2, 8, 12, 16, 32, 64, 80}},
                        Case{8, 0, 4096, 14336, {1, 3, 8, 12, 16, 32}},
                        Case{4, 2, 1000, 4096, {1, 8, 12, 40}}})
    for (DType dt : {DType::I8, DType::I4}) {
      const int64_t group = dt == DType::I4 ? 128 : c.K, K = c.K;
      QuantPair w;
      try {
        w = upload_quant_pair(rng, dt, c.N, K, group, c.El);
      } catch (const std::exception& e) {
        fail_row("uploadQuantized", "experts", e.what());
        continue;
      }
      for (int64_t T : c.Ts) {
        for (bool crowded : {false, true}) {  // crowded: every token's first choice one expert (9..16 tokens)
          if (crowded && (T <= 8 || T > 64)) continue;
          std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(K) + " N=" + std::to_string(c.N) +
                           " El=" + std::to_string(c.El) + " " + dtype_name(dt) + (crowded ? " one expert's" : "");
          run_case("quantExperts", sh, [&] {
            auto logits = rng.floats(T * E, -4, 4), xp = rng.floats(T * k * K);
            // each token's first choice a held expert (random draws can route a step's every pair elsewhere); crowded:
            // the same one, so that more pairs chose it than the one-token kernel's 8 columns (a second pass)
            for (int64_t t = 0; t < T; ++t) logits[t * E + c.start + (crowded ? 0 : t % c.El)] += 8.f;
            // up to 64 tokens the expert GEMV (its kernel as at 16), past that the grouped path
            const double rtol = T > 64 ? kQuantGemmRtol : quant_rtol(dt, K, group, std::min<int64_t>(T, 16));
            auto run = [&](Backend& b, const Tensor& wq, bool gated, const std::vector<float>& xv, int64_t rows_x) {
              Tensor experts = b.route_top_k(up(b, logits, {T, E}), k).experts;
              Tensor x = up(b, xv, {rows_x, static_cast<int64_t>(xv.size()) / rows_x});
              return down(b, gated ? b.silu_mul_expert_matmul(x, wq, experts, c.start)
                                   : b.expert_matmul(x, wq, experts, c.start));
            };
            if (c.K == 4096) {
              auto gate_up = rng.floats(T * 2 * K, -4, 4);
              compare("expertMatmul", sh + " x/pair", run(*gpu, w.gpu_w, false, xp, T * k),
                      run(*cpu, w.cpu_w, false, xp, T * k), rtol);
              compare("siluMulExpertMatmul", sh + " x/token", run(*gpu, w.gpu_w, true, gate_up, T),
                      run(*cpu, w.cpu_w, true, gate_up, T), rtol);
            } else {  // as Mixtral's w2 reads the gate and up products of each pair
              auto gate_up = rng.floats(T * k * 2 * K, -4, 4);
              compare("siluMulExpertMatmul", sh + " x/pair", run(*gpu, w.gpu_w, true, gate_up, T * k),
                      run(*cpu, w.cpu_w, true, gate_up, T * k), rtol);
            }
          });
        }
      }
    }
}

// Prefill matmul inputs written in the weight dtype by their producer (rmsNorm, addRmsNorm: a copy beside the
// f32 rows; siluMulMatmul: the product only in that dtype): the products must equal, bit for bit, the matmul
// of the same f32 rows uploaded afresh (cast by a separate kernel). Also: the copy is not used after the rows
// are overwritten in place (write, copy), nor when the norm's weight dtype differs from the matrix's.
void check_prefill_inputs(Rng& rng) {
  const int64_t H = 4096, N = 1024;
  for (int64_t T : {9, 64, 300})
    for (DType wd : {DType::BF16, DType::F16, DType::F32}) {
      std::string sh = "T=" + std::to_string(T) + " K=4096 N=1024 " + dtype_name(wd);
      run_case("prefill inputs", sh, [&] {
        auto x = rng.floats(T * H, -3, 3), y = rng.floats(T * H, -3, 3), g = rng.floats(H, 0.5, 1.5);
        Tensor w = up_narrow(*gpu, rng.floats(N * H), {N, H}, wd), norm_w = up_narrow(*gpu, g, {H}, wd);
        // the matmul of x's f32 values in a fresh tensor: no 16-bit copy, the cast path
        auto plain = [&](const Tensor& rows, const Tensor& m) {
          return down(*gpu, gpu->matmul(up(*gpu, down(*gpu, rows), rows.shape), m));
        };
        Tensor normed = gpu->rms_norm(up(*gpu, x, {T, H}), norm_w, 1e-5f);
        compare("rmsNorm -> matmul", sh, down(*gpu, gpu->matmul(normed, w)), plain(normed, w), 0, 0, "vs cast");
        Backend::SumAndNormed r = gpu->add_rms_norm(up(*gpu, x, {T, H}), up(*gpu, y, {T, H}), norm_w, 1e-5f);
        compare("addRmsNorm -> matmul", sh, down(*gpu, gpu->matmul(r.normed, w)), plain(r.normed, w), 0, 0, "vs cast");
        auto gate_up = rng.floats(T * 2 * H, -4, 4);
        Tensor gu = up(*gpu, gate_up, {T, 2 * H});
        compare("siluMulMatmul", sh, down(*gpu, gpu->silu_mul_matmul(gu, w)),
                down(*gpu, gpu->matmul(gpu->silu_mul(gu), w)), 0, 0, "vs siluMul + matmul");
        gpu->write(normed, y.data(), y.size() * 4);
        compare("write -> matmul", sh, down(*gpu, gpu->matmul(normed, w)), plain(up(*gpu, y, {T, H}), w), 0, 0,
                "rows rewritten: no stale copy");
        gpu->copy(r.normed, up(*gpu, x, {T, H}));
        compare("copy -> matmul", sh, down(*gpu, gpu->matmul(r.normed, w)), plain(up(*gpu, x, {T, H}), w), 0, 0,
                "rows rewritten: no stale copy");
        if (wd == DType::F32) return;
        DType other_dtype = wd == DType::BF16 ? DType::F16 : DType::BF16;
        Tensor other = gpu->rms_norm(up(*gpu, x, {T, H}), up_narrow(*gpu, g, {H}, other_dtype), 1e-5f);
        compare("rmsNorm -> matmul", sh, down(*gpu, gpu->matmul(other, w)), plain(other, w), 0, 0,
                "norm weight in the other 16-bit dtype: cast");
      });
    }
}

// kvBlockTable [rows.size() / per_seq, per_seq] i32.
// Block ids for `count` table entries: the first `count` of a seeded shuffle of the pool's n_blocks (the others
// spare, never in a table), so the tables are scattered and out of order.
std::vector<int32_t> scattered_blocks(Rng& rng, int64_t n_blocks, int64_t count) {
  std::vector<int32_t> ids(static_cast<size_t>(n_blocks));
  for (int64_t i = 0; i < n_blocks; ++i) ids[i] = static_cast<int32_t>(i);
  for (int64_t i = n_blocks - 1; i > 0; --i) std::swap(ids[i], ids[rng.below(static_cast<int>(i + 1))]);
  ids.resize(static_cast<size_t>(count));
  return ids;
}

Tensor up_table(Backend& b, const std::vector<int32_t>& rows, int64_t per_seq) {
  return b.upload(rows.data(), rows.size() * 4, DType::I32, {static_cast<int64_t>(rows.size()) / per_seq, per_seq});
}
// One block per sequence: row s of the table is block s ([S, 1]).
Tensor one_block_table(Backend& b, int64_t S) {
  std::vector<int32_t> rows(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) rows[s] = static_cast<int32_t>(s);
  return up_table(b, rows, 1);
}

// Caches [S, nKv, C, hd] of dtype d (f32 or bf16) with random contents on both backends.
struct Caches {
  Tensor kc, vc, kg, vg;
};
Caches make_caches(Rng& rng, int64_t S, int64_t nKv, int64_t C, int64_t hd, DType d = DType::F32) {
  auto k = rng.floats(S * nKv * C * hd), v = rng.floats(S * nKv * C * hd);
  Shape s{S, nKv, C, hd};
  return {up_narrow(*cpu, k, s, d), up_narrow(*cpu, v, s, d), up_narrow(*gpu, k, s, d), up_narrow(*gpu, v, s, d)};
}

void check_attention(Rng& rng) {
  const int64_t S = 4, C = 2048, hd = 128;
  struct Cfg {
    int64_t T, nH, nKv;
    // "decode": random slots/lengths; "prefill": one sequence after 1000 cached positions; "ragged": two
    // sequences; "causal": one fresh prompt at positions 0..T-1
    const char* kind;
  };
  for (Cfg c : {Cfg{1, 32, 8, "decode"}, Cfg{3, 32, 8, "decode"}, Cfg{8, 32, 8, "decode"}, Cfg{64, 32, 8, "decode"},
                Cfg{3, 32, 32, "decode"}, Cfg{1, 64, 8, "decode"}, Cfg{300, 32, 8, "prefill"},
                Cfg{300, 32, 8, "ragged"}, Cfg{65, 8, 8, "decode"}, Cfg{200, 32, 32, "causal"},
                // few heads over a long cache: the prefill kernel splits the key range (prefill_key_splits), and
                // splits past a short pass's keys hold no key for its rows
                Cfg{300, 4, 4, "prefill"}, Cfg{300, 4, 2, "ragged"}, Cfg{200, 4, 4, "causal"}}) {
    std::string sh = "T=" + std::to_string(c.T) + " " + std::to_string(c.nH) + "/" + std::to_string(c.nKv) +
                     "x128 C=2048 " + c.kind;
    Caches caches = make_caches(rng, S, c.nKv, C, hd);
    std::vector<int32_t> slots(c.T), pos(c.T);  // slots: each token's sequence row, one block each
    for (int64_t t = 0; t < c.T; ++t) {
      if (!std::strcmp(c.kind, "decode")) {
        slots[t] = rng.below(S);
        pos[t] = t == 0 ? 0 : (t == 1 ? C - 1 : rng.below(C));
      } else if (!std::strcmp(c.kind, "prefill")) {
        slots[t] = 2;
        pos[t] = 1000 + t;
      } else if (!std::strcmp(c.kind, "causal")) {
        slots[t] = 0;
        pos[t] = static_cast<int32_t>(t);
      } else {
        slots[t] = t < 100 ? 1 : 3;
        pos[t] = t < 100 ? t : 500 + t;
      }
    }
    auto k = rng.floats(c.T * c.nKv * hd), v = rng.floats(c.T * c.nKv * hd), q = rng.floats(c.T * c.nH * hd);
    bool unique = !std::strcmp(c.kind, "decode") ? false : true;  // decode: (slot, pos) may repeat; skip writeKv
    float scale = 1.0f / std::sqrt(128.0f);
    run_case("writeKv", sh, [&] {
      if (!unique) return;
      Shape ks{c.T, c.nKv * hd};
      cpu->write_kv(caches.kc, caches.vc, up(*cpu, k, ks), up(*cpu, v, ks), up_i(*cpu, slots), one_block_table(*cpu, S),
                    up_i(*cpu, pos));
      gpu->write_kv(caches.kg, caches.vg, up(*gpu, k, ks), up(*gpu, v, ks), up_i(*gpu, slots), one_block_table(*gpu, S),
                    up_i(*gpu, pos));
      compare("writeKv", sh, down(*gpu, caches.kg), down(*cpu, caches.kc), 0);
      compare("writeKv", sh + " v", down(*gpu, caches.vg), down(*cpu, caches.vc), 0);
    });
    run_case("attention", sh, [&] {
      Shape qs{c.T, c.nH * hd};
      auto want = down(*cpu, cpu->attention(up(*cpu, q, qs), caches.kc, caches.vc, up_i(*cpu, slots),
                                            one_block_table(*cpu, S), up_i(*cpu, pos), c.nH, scale));
      auto got = down(*gpu, gpu->attention(up(*gpu, q, qs), caches.kg, caches.vg, up_i(*gpu, slots),
                                           one_block_table(*gpu, S), up_i(*gpu, pos), c.nH, scale));
      // Decode (T <= 64) runs in fp32: 1e-4. Prefill (T > 64) runs on tensor cores with q * scale * log2(e), k, v
      // and the softmax weights p rounded to f16 (11 significant bits, relative error <= 2^-12 each). An output
      // row is a p-weighted mean of v rows, so v's and p's roundings add at most 2 * 2^-12 = 4.9e-4 of max|v|;
      // a score s = q.k carries about 2^-12 * sqrt(sum (q_i k_i)^2) of error, ~1e-4 relative in p at these
      // inputs. Measured on an H100 (2026-11-23): 2.4e-4 to 3.9e-4 of max|out|, so 1e-3 leaves 2.5x margin;
      // bf16 operands (8 significant bits) would be 8x worse.
      compare("attention", sh, got, want, c.T > 64 ? 1e-3 : 1e-4);
    });
  }
}

// Paged caches: the logical contents of one-block caches [S, nKv, C, hd] laid out in blocks of B positions,
// scattered and out of order in a pool with spare blocks. Attention (decode, prefill, ragged; tensor-core and
// fp32 prefill kernels) and writeKv against the CPU, and attention against the one-block layout: exact where the
// capacity ceil(C / B) * B equals C (the kernels then see the same shapes and read the same rows in order).
void check_paged(Rng& rng) {
  const int64_t S = 3, C = 2048;
  struct Cfg {
    int64_t T, nH, nKv, hd;
    const char* kind;  // "decode": sequence t % S at random positions; "prefill": one sequence after 1000 positions;
                       // "ragged": two sequences in one batch
  };
  for (Cfg c : {Cfg{1, 32, 8, 128, "decode"}, Cfg{8, 32, 8, 128, "decode"}, Cfg{64, 32, 8, 128, "decode"},
                Cfg{300, 32, 8, 128, "prefill"}, Cfg{300, 32, 8, 64, "ragged"}, Cfg{100, 16, 4, 96, "ragged"}})
    for (int64_t B : {int64_t{16}, int64_t{7}, int64_t{64}}) {
      const int64_t per_seq = (C + B - 1) / B, n_blocks = S * per_seq + 3, hd = c.hd;
      std::string sh = "T=" + std::to_string(c.T) + " " + std::to_string(c.nH) + "/" + std::to_string(c.nKv) + "x" +
                       std::to_string(hd) + " B=" + std::to_string(B) + " " + c.kind;
      run_case("paged", sh, [&] {
        auto k = rng.floats(S * c.nKv * C * hd), v = rng.floats(S * c.nKv * C * hd);
        std::vector<int32_t> rows = scattered_blocks(rng, n_blocks, S * per_seq);
        std::vector<float> pk(static_cast<size_t>(n_blocks * c.nKv * B * hd)), pv(pk.size());
        for (int64_t s = 0; s < S; ++s)
          for (int64_t h = 0; h < c.nKv; ++h)
            for (int64_t p = 0; p < C; ++p) {
              int64_t from = ((s * c.nKv + h) * C + p) * hd;
              int64_t to = ((rows[s * per_seq + p / B] * c.nKv + h) * B + p % B) * hd;
              std::copy(k.begin() + from, k.begin() + from + hd, pk.begin() + to);
              std::copy(v.begin() + from, v.begin() + from + hd, pv.begin() + to);
            }
        std::vector<int32_t> seq(c.T), pos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          if (!std::strcmp(c.kind, "decode")) {
            seq[t] = static_cast<int32_t>(t % S);
            pos[t] = t == 0 ? C - 1 : (t == 1 ? 0 : rng.below(C));
          } else if (!std::strcmp(c.kind, "prefill")) {
            seq[t] = 2;
            pos[t] = static_cast<int32_t>(1000 + t);
          } else {
            seq[t] = t < c.T / 3 ? 1 : 0;
            pos[t] = static_cast<int32_t>(t < c.T / 3 ? t : 500 + t);
          }
        }
        auto q = rng.floats(c.T * c.nH * hd);
        const float scale = 1.0f / std::sqrt(float(hd));
        Shape ps{n_blocks, c.nKv, B, hd}, os{S, c.nKv, C, hd};
        auto attend = [&](Backend& b, const std::vector<float>& kc, const std::vector<float>& vc, const Shape& cs,
                          const Tensor& table) {
          return down(b, b.attention(up(b, q, {c.T, c.nH * hd}), up(b, kc, cs), up(b, vc, cs), up_i(b, seq), table,
                                     up_i(b, pos), c.nH, scale));
        };
        auto got = attend(*gpu, pk, pv, ps, up_table(*gpu, rows, per_seq));
        compare("paged attention", sh, got, attend(*cpu, pk, pv, ps, up_table(*cpu, rows, per_seq)),
                c.T > 64 ? 1e-3 : 1e-4);
        if (per_seq * B == C)
          compare("paged attention", sh + " vs 1 block", got, attend(*gpu, k, v, os, one_block_table(*gpu, S)), 0, 0,
                  "vs one block per sequence on cuda");
        // writeKv into the paged pool: distinct (sequence, position) pairs, spare blocks untouched.
        std::vector<int32_t> wpos(c.T);
        for (int64_t t = 0; t < c.T; ++t) wpos[t] = static_cast<int32_t>((t / S) * 5 + 3);
        auto kt = rng.floats(c.T * c.nKv * hd), vt = rng.floats(c.T * c.nKv * hd);
        auto written = [&](Backend& b) {
          Tensor kc = up(b, pk, ps), vc = up(b, pv, ps);
          std::vector<int32_t> wseq(c.T);
          for (int64_t t = 0; t < c.T; ++t) wseq[t] = static_cast<int32_t>(t % S);
          b.write_kv(kc, vc, up(b, kt, {c.T, c.nKv * hd}), up(b, vt, {c.T, c.nKv * hd}), up_i(b, wseq),
                     up_table(b, rows, per_seq), up_i(b, wpos));
          return std::make_pair(down(b, kc), down(b, vc));
        };
        auto wg = written(*gpu), wc = written(*cpu);
        compare("paged writeKv", sh, wg.first, wc.first, 0);
        compare("paged writeKv", sh + " v", wg.second, wc.second, 0);
      });
    }
}

// bf16 KV caches through a paged table (blocks of B = 16, scattered): writeKv and qkvRope store the f32 path's
// values rounded to nearest even (bf16-round.h) and attention (decode split-K; prefill on tensor cores for hd 64
// and 128, the fp32 kernel for hd 96) reads them as f32. Against the same CUDA op on an f32 cache that holds the
// bf16-rounded values: exact for prefill (the kernels convert each element to the same f32 and sum in the same
// order); decode within 1e-5 (the bf16 cache on tensor cores, its query and weights split into two bf16 parts each,
// attention-decode-mma.cu; the f32 cache on CUDA cores).
// Against the CPU on bf16 caches: the f32 bounds of check_attention, and for qkvRope's kCache one bf16 step
// (2^-7 of the value: where the CPU's and CUDA's rotated k differ by an f32 rounding, the nearest bf16 may differ).
void check_kv_bf16(Rng& rng) {
  const int64_t S = 3, C = 512, B = 16, per_seq = C / B, n_blocks = S * per_seq + 2;
  struct Cfg {
    int64_t T, nH, nKv, hd;
    const char* kind;  // "decode": sequence t % S at random positions; "prefill": one sequence after 200 positions
  };
  auto rounded = [](std::vector<float> v) {  // f32 -> the f32 value of its bf16, nearest even
    for (float& x : v) {
      uint32_t b = static_cast<uint32_t>(f32_to_bf16_rn(x)) << 16;
      std::memcpy(&x, &b, 4);
    }
    return v;
  };
  // The last: 176 heads x 3 tiles of 128 rows fill two rounds of an H200's block slots, so a bf16 cache takes the
  // prefill kernel with two m16 tiles a warp (attention-prefill.cu) where the f32 cache keeps one: bit-equal.
  for (Cfg c : {Cfg{1, 32, 8, 128, "decode"}, Cfg{8, 32, 8, 128, "decode"}, Cfg{64, 32, 32, 128, "decode"},
                Cfg{5, 16, 4, 96, "decode"}, Cfg{300, 32, 8, 128, "prefill"}, Cfg{200, 16, 4, 64, "prefill"},
                Cfg{100, 16, 4, 96, "prefill"}, Cfg{300, 176, 8, 128, "prefill"}}) {
    const int64_t hd = c.hd, width = (c.nH + 2 * c.nKv) * hd;
    std::string sh = "T=" + std::to_string(c.T) + " " + std::to_string(c.nH) + "/" + std::to_string(c.nKv) + "x" +
                     std::to_string(hd) + " B=16 " + c.kind;
    run_case("kv bf16", sh, [&] {
      std::vector<int32_t> rows = scattered_blocks(rng, n_blocks, S * per_seq), seq(c.T), pos(c.T);
      for (int64_t t = 0; t < c.T; ++t) {
        const bool decode = !std::strcmp(c.kind, "decode");
        seq[t] = decode ? static_cast<int32_t>(t % S) : 1;
        pos[t] = decode ? (t == 0 ? static_cast<int32_t>(C - 1) : rng.below(C)) : static_cast<int32_t>(200 + t);
      }
      const Shape cs{n_blocks, c.nKv, B, hd};
      const auto k0 = rng.floats(n_blocks * c.nKv * B * hd), v0 = rng.floats(n_blocks * c.nKv * B * hd);
      const auto k0r = rounded(k0), v0r = rounded(v0);
      auto q = rng.floats(c.T * c.nH * hd), qkv = rng.floats(c.T * width), f = inv_freq(static_cast<int>(hd));
      const float scale = 1.0f / std::sqrt(float(hd));
      // caches: bf16 ones hold bf16(k0), bf16(v0) (up_narrow truncates; k0r is already bf16, so exactly those)
      auto caches = [&](Backend& b, DType d) { return std::make_pair(up_narrow(b, k0r, cs, d), up_narrow(b, v0r, cs, d)); };
      auto attend = [&](Backend& b, const std::pair<Tensor, Tensor>& kv) {
        return down(b, b.attention(up(b, q, {c.T, c.nH * hd}), kv.first, kv.second, up_i(b, seq),
                                   up_table(b, rows, per_seq), up_i(b, pos), c.nH, scale));
      };
      const double rtol = c.T > 64 ? 1e-3 : 1e-4;
      auto gb = caches(*gpu, DType::BF16), gf = caches(*gpu, DType::F32), cb = caches(*cpu, DType::BF16);
      auto got = attend(*gpu, gb);
      const double same_values = c.T > 64 ? 0 : 1e-5;
      compare("kv bf16 attention", sh, got, attend(*gpu, gf), same_values, 0, "vs f32 cache of bf16 values on cuda");
      compare("kv bf16 attention", sh, got, attend(*cpu, cb), rtol, 0, "vs cpu, bf16 cache");
      // writeKv (distinct rows: positions t / S * 5 + 3 of sequence t % S) of f32 values that are not bf16
      std::vector<int32_t> wseq(c.T), wpos(c.T);
      for (int64_t t = 0; t < c.T; ++t) {
        wseq[t] = static_cast<int32_t>(t % S);
        wpos[t] = static_cast<int32_t>((t / S) * 5 % C);
      }
      auto kt = rng.floats(c.T * c.nKv * hd), vt = rng.floats(c.T * c.nKv * hd);
      auto write = [&](Backend& b, const std::pair<Tensor, Tensor>& kv, const std::vector<float>& kw,
                       const std::vector<float>& vw) {
        b.write_kv(kv.first, kv.second, up(b, kw, {c.T, c.nKv * hd}), up(b, vw, {c.T, c.nKv * hd}), up_i(b, wseq),
                   up_table(b, rows, per_seq), up_i(b, wpos));
        return std::make_pair(down(b, kv.first), down(b, kv.second));
      };
      auto wg = write(*gpu, gb, kt, vt), wf = write(*gpu, gf, rounded(kt), rounded(vt)), wc = write(*cpu, cb, kt, vt);
      compare("kv bf16 writeKv", sh, wg.first, wf.first, 0, 0, "vs f32 cache given bf16-rounded k");
      compare("kv bf16 writeKv", sh + " v", wg.second, wf.second, 0, 0, "vs f32 cache given bf16-rounded v");
      compare("kv bf16 writeKv", sh, wg.first, wc.first, 0, 0, "vs cpu, bf16 cache");
      // qkvRope at the query positions (distinct (sequence, position) pairs in "prefill"; decode may repeat a
      // pair, so it writes at wpos): q exact vs the f32 cache's run; the caches as the f32 run's, rounded
      const std::vector<int32_t>& qpos = !std::strcmp(c.kind, "decode") ? wpos : pos;
      const std::vector<int32_t>& qseq = !std::strcmp(c.kind, "decode") ? wseq : seq;
      auto rope = [&](Backend& b, const std::pair<Tensor, Tensor>& kv) {
        auto qo = down(b, b.qkv_rope(up(b, qkv, {c.T, width}), up_i(b, qpos), up(b, f, {hd / 2}), kv.first, kv.second,
                                     up_i(b, qseq), up_table(b, rows, per_seq), c.nH));
        return std::make_tuple(qo, down(b, kv.first), down(b, kv.second));
      };
      auto [qg, kg, vg] = rope(*gpu, gb);
      auto [qf, kf, vf] = rope(*gpu, gf);
      auto [qc, kc, vc] = rope(*cpu, cb);
      compare("kv bf16 qkvRope q", sh, qg, qf, 0, 0, "vs f32 cache on cuda");
      compare("kv bf16 qkvRope k", sh, kg, rounded(kf), 0, 0, "vs f32 cache on cuda, rounded");
      compare("kv bf16 qkvRope v", sh, vg, rounded(vf), 0, 0, "vs f32 cache on cuda, rounded");
      compare("kv bf16 qkvRope k", sh, kg, kc, 1.0 / 128, 0, "vs cpu, bf16 cache");
      compare("kv bf16 qkvRope v", sh, vg, vc, 0, 0, "vs cpu, bf16 cache");
      // and attention after those writes, on both cache types (the f32 one now holds f32 values: bf16 rounded)
      auto wf2 = caches(*gpu, DType::F32);
      gpu->write(wf2.first, kg.data(), kg.size() * 4);
      gpu->write(wf2.second, vg.data(), vg.size() * 4);
      compare("kv bf16 attention", sh + " after writes", attend(*gpu, gb), attend(*gpu, wf2), same_values, 0,
              "vs f32 cache of the same values on cuda");
    });
  }
}

// The fused ops against the CPU, and against the separate CUDA ops they replace (same arithmetic: exact).
void check_fused(Rng& rng) {
  for (int64_t H : {4096, 5120, 8192, 37})
    for (int64_t T : {1, 3, 8, 64, 300}) {
      if (H != 4096 && T != 3) continue;
      for (DType wd : {DType::F32, DType::BF16, DType::F16}) {
        std::string sh = "T=" + std::to_string(T) + " H=" + std::to_string(H) + " w " + dtype_name(wd);
        run_case("addRmsNorm", sh, [&] {
          auto x = rng.floats(T * H, -3, 3), y = rng.floats(T * H, -3, 3), w = rng.floats(H, 0.5, 1.5);
          auto run = [&](Backend& b) {
            Backend::SumAndNormed r = b.add_rms_norm(up(b, x, {T, H}), up(b, y, {T, H}), up_narrow(b, w, {H}, wd), 1e-5f);
            return std::make_pair(down(b, r.sum), down(b, r.normed));
          };
          auto g = run(*gpu), c = run(*cpu);
          compare("addRmsNorm sum", sh, g.first, c.first, 0);
          compare("addRmsNorm normed", sh, g.second, c.second, 1e-5);
          Tensor s = gpu->add(up(*gpu, x, {T, H}), up(*gpu, y, {T, H}));
          compare("addRmsNorm vs cuda", sh, g.second, down(*gpu, gpu->rms_norm(s, up_narrow(*gpu, w, {H}, wd), 1e-5f)),
                  1e-6, 0, "vs add + rmsNorm on cuda");
        });
      }
    }
  struct Cfg {
    int64_t T, nH, nKv;
  };
  const int64_t S = 4, C = 2048, hd = 128;
  for (Cfg c : {Cfg{1, 32, 8}, Cfg{3, 32, 8}, Cfg{8, 32, 8}, Cfg{64, 32, 8}, Cfg{300, 32, 8}, Cfg{1, 32, 32},
                Cfg{8, 32, 32}, Cfg{3, 64, 8}}) {
    std::string sh = "T=" + std::to_string(c.T) + " " + std::to_string(c.nH) + "/" + std::to_string(c.nKv) +
                     "x128 C=2048";
    run_case("qkvRope", sh, [&] {
      const int64_t width = (c.nH + 2 * c.nKv) * hd;
      Caches fused = make_caches(rng, S, c.nKv, C, hd);
      auto k0 = down(*gpu, fused.kg), v0 = down(*gpu, fused.vg);
      Shape cs{S, c.nKv, C, hd};
      Tensor sep_k = up(*gpu, k0, cs), sep_v = up(*gpu, v0, cs);
      std::vector<int32_t> slots(c.T), pos(c.T);  // distinct (slot, position) pairs
      for (int64_t t = 0; t < c.T; ++t) {
        slots[t] = static_cast<int32_t>(t % S);
        pos[t] = t == 1 ? static_cast<int32_t>(C - 1) : static_cast<int32_t>((t * 7 + 3) % C);
      }
      auto qkv = rng.floats(c.T * width);
      auto f = inv_freq(hd);
      auto run = [&](Backend& b, const Tensor& kc, const Tensor& vc) {
        return down(b, b.qkv_rope(up(b, qkv, {c.T, width}), up_i(b, pos), up(b, f, {hd / 2}), kc, vc, up_i(b, slots),
                                  one_block_table(b, S), c.nH));
      };
      auto gq = run(*gpu, fused.kg, fused.vg), cq = run(*cpu, fused.kc, fused.vc);
      compare("qkvRope q", sh, gq, cq, 1e-5);
      compare("qkvRope kCache", sh, down(*gpu, fused.kg), down(*cpu, fused.kc), 1e-5);
      compare("qkvRope vCache", sh, down(*gpu, fused.vg), down(*cpu, fused.vc), 0);
      // The separate CUDA ops on copies of the same caches: bit for bit.
      Tensor x = up(*gpu, qkv, {c.T, width}), p = up_i(*gpu, pos), fr = up(*gpu, f, {hd / 2}), sl = up_i(*gpu, slots);
      int64_t q_end = c.nH * hd, k_end = q_end + c.nKv * hd;
      Tensor q = gpu->rope(gpu->slice_cols(x, 0, q_end), p, fr, hd);
      gpu->write_kv(sep_k, sep_v, gpu->rope(gpu->slice_cols(x, q_end, k_end), p, fr, hd),
                    gpu->slice_cols(x, k_end, width), sl, one_block_table(*gpu, S), p);
      compare("qkvRope vs cuda", sh, gq, down(*gpu, q), 0, 0, "q vs sliceCols + rope");
      compare("qkvRope vs cuda", sh + " k", down(*gpu, fused.kg), down(*gpu, sep_k), 0, 0, "kCache vs rope + writeKv");
      compare("qkvRope vs cuda", sh + " v", down(*gpu, fused.vg), down(*gpu, sep_v), 0, 0, "vCache vs writeKv");
    });
  }
}

void check_softmax_sample(Rng& rng) {
  for (int64_t V : {50, 32000, 128256}) {
    int64_t R = 8;
    std::string sh = "R=8 V=" + std::to_string(V);
    auto l = rng.floats(R * V, -12, 12);
    // Ties at the max in row 1 (greedy must take the lowest index) and a flat row 2.
    l[1 * V + 7] = 30;
    l[1 * V + 3] = 30;
    for (int64_t i = 0; i < V; ++i) l[2 * V + i] = 1.5f;
    run_case("logSoftmax", sh, [&] {
      compare("logSoftmax", sh, down(*gpu, gpu->log_softmax(up(*gpu, l, {R, V}))),
              down(*cpu, cpu->log_softmax(up(*cpu, l, {R, V}))), 1e-5);
    });
    run_case("logprobs", sh, [&] {
      std::vector<int32_t> ids(R);
      for (auto& i : ids) i = rng.below(static_cast<int>(V));
      std::vector<float> a(R), b(R);
      gpu->logprobs(up(*gpu, l, {R, V}), ids.data(), R, a.data());
      cpu->logprobs(up(*cpu, l, {R, V}), ids.data(), R, b.data());
      compare("logprobs", sh, a, b, 1e-5);
    });
    run_case("sample greedy", sh, [&] {
      std::vector<float> temp(R, 0), tp(R, 1), u(R, 0.5);
      std::vector<int32_t> tk(R, 0), a(R), b(R);
      gpu->sample(up(*gpu, l, {R, V}), {temp.data(), tk.data(), tp.data(), u.data()}, R, a.data());
      cpu->sample(up(*cpu, l, {R, V}), {temp.data(), tk.data(), tp.data(), u.data()}, R, b.data());
      compare_i("sample greedy", sh, a, b);
      Tensor t = gpu->sample_tensor(up(*gpu, l, {R, V}), up(*gpu, temp, {R}), up_i(*gpu, tk), up(*gpu, tp, {R}),
                                    up(*gpu, u, {R}));
      compare_i("sampleTensor greedy", sh, down_i(*gpu, t), b);
    });
  }
  // The distribution: N rows of the same logits with stratified uniforms (i + 0.5) / N. Inverse-CDF counts per
  // token then differ between any two orders of the candidates by at most 1 (+1 for rounding).
  struct Dist {
    int64_t V;
    float temperature;
    int32_t top_k;
    float top_p;
  };
  for (Dist d : {Dist{50, 1.0f, 0, 1.0f}, Dist{50, 0.7f, 3, 1.0f}, Dist{50, 1.0f, 0, 0.6f}, Dist{50, 1.3f, 5, 0.8f},
                 Dist{50, 2.0f, 20, 0.3f}, Dist{32000, 1.0f, 0, 0.9f}, Dist{32000, 0.8f, 50, 0.95f}}) {
    const int64_t N = 4096, V = d.V;
    std::string sh = "V=" + std::to_string(V) + " t=" + std::to_string(d.temperature).substr(0, 3) +
                     " k=" + std::to_string(d.top_k) + " p=" + std::to_string(d.top_p).substr(0, 4);
    run_case("sampleTensor dist", sh, [&] {
      auto row = rng.floats(V, -4, 4);
      for (int i = 0; i < 6; ++i) row[rng.below(static_cast<int>(V))] = 2.5f;  // ties
      std::vector<float> l(N * V), temp(N, d.temperature), tp(N, d.top_p), u(N);
      std::vector<int32_t> tk(N, d.top_k), a(N);
      for (int64_t i = 0; i < N; ++i) {
        std::copy(row.begin(), row.end(), l.begin() + i * V);
        u[i] = (static_cast<float>(i) + 0.5f) / N;
      }
      cpu->sample(up(*cpu, l, {N, V}), {temp.data(), tk.data(), tp.data(), u.data()}, N, a.data());
      Tensor t = gpu->sample_tensor(up(*gpu, l, {N, V}), up(*gpu, temp, {N}), up_i(*gpu, tk), up(*gpu, tp, {N}),
                                    up(*gpu, u, {N}));
      auto b = down_i(*gpu, t);
      std::vector<int> ca(V, 0), cb(V, 0);
      for (int64_t i = 0; i < N; ++i) {
        ca[a[i]]++;
        cb[b[i]]++;
      }
      int worst = 0;
      for (int64_t i = 0; i < V; ++i) worst = std::max(worst, std::abs(ca[i] - cb[i]));
      rows.push_back({"sampleTensor dist", sh, "max |count diff| of 4096", double(worst), 2, worst <= 2});
    });
  }
}

void check_random() {
  for (DType d : {DType::F32, DType::BF16, DType::F16}) {
    std::string sh = std::string("[1000, 4096] ") + dtype_name(d);
    run_case("randomUniform", sh, [&] {
      auto a = down(*gpu, gpu->random_uniform(d, {1000, 4096}, 42, 0.02f));
      auto b = down(*cpu, cpu->random_uniform(d, {1000, 4096}, 42, 0.02f));
      compare("randomUniform", sh, a, b, 0);
      float lo = *std::min_element(a.begin(), a.end()), hi = *std::max_element(a.begin(), a.end());
      rows.push_back({"randomUniform range", sh, "", 0, 0, lo >= -0.02f && hi < 0.02f && lo < -0.019f && hi > 0.019f});
    });
  }
}

// A decode step captured once, replayed after write() of new positions and a new kvBlockTable, equals eager CPU
// results. fused: the step uses qkvRope and addRmsNorm instead of sliceCols, rope, writeKv, add and rmsNorm. B:
// positions per block (C: one block per sequence; smaller: paged, each step moving the sequences' blocks). kv:
// the caches' dtype; with bf16 the final caches may differ from the CPU's by one bf16 step (2^-7 of a value)
// where the rotated k differs by an f32 rounding across a rounding boundary.
void check_graph(Rng& rng, bool fused, int64_t B, DType kv = DType::F32) {
  const int64_t S = 4, nKv = 8, nH = 32, C = 2048, hd = 128, T = 8, H = 4096;
  const int64_t per_seq = C / B, n_blocks = S * per_seq;
  std::string sh = std::string("T=8 32/8x128 C=2048 B=") + std::to_string(B) + (fused ? " fused" : "") +
                   (kv == DType::BF16 ? " kv bf16" : "");
  // Step `step`'s table: the pool's blocks in a rotation by step * 5 (step 0: block i at index i).
  auto blocks = [&](int step) {
    std::vector<int32_t> rows(static_cast<size_t>(n_blocks));
    for (int64_t i = 0; i < n_blocks; ++i) rows[i] = static_cast<int32_t>((i + step * 5) % n_blocks);
    return rows;
  };
  try {
    Caches caches = make_caches(rng, n_blocks, nKv, B, hd, kv);
    auto w = rng.floats(H), f = inv_freq(hd);
    auto qkv_w = rng.floats((nH + 2 * nKv) * hd * H, -0.05f, 0.05f);
    auto x0 = rng.floats(T * H);
    auto make_inputs = [&](Backend& b) {
      std::vector<int32_t> seq(T), pos0(T);  // distinct (sequence, position) pairs: no write races
      for (int64_t t = 0; t < T; ++t) {
        seq[t] = static_cast<int32_t>(t % S);
        pos0[t] = static_cast<int32_t>(t);
      }
      return std::vector<Tensor>{up(b, x0, {T, H}), up_table(b, blocks(0), per_seq), up_i(b, pos0),
                                 up_narrow(b, qkv_w, {(nH + 2 * nKv) * hd, H}, DType::BF16), up(b, w, {H}),
                                 up(b, f, {hd / 2}), up_i(b, seq)};
    };
    auto forward = [&](Backend& b, const std::vector<Tensor>& in, const Tensor& kc, const Tensor& vc) {
      if (fused) {
        Backend::SumAndNormed h = b.add_rms_norm(in[0], in[0], in[4], 1e-5f);
        Tensor q = b.qkv_rope(b.matmul(h.normed, in[3]), in[2], in[5], kc, vc, in[6], in[1], nH);
        return b.attention(q, kc, vc, in[6], in[1], in[2], nH, 1.0f / std::sqrt(float(hd)));
      }
      Tensor h = b.rms_norm(in[0], in[4], 1e-5f);
      Tensor qkv = b.matmul(h, in[3]);
      Tensor q = b.rope(b.slice_cols(qkv, 0, nH * hd), in[2], in[5], hd);
      Tensor k = b.rope(b.slice_cols(qkv, nH * hd, (nH + nKv) * hd), in[2], in[5], hd);
      Tensor v = b.slice_cols(qkv, (nH + nKv) * hd, (nH + 2 * nKv) * hd);
      b.write_kv(kc, vc, k, v, in[6], in[1], in[2]);
      return b.attention(q, kc, vc, in[6], in[1], in[2], nH, 1.0f / std::sqrt(float(hd)));
    };
    auto gin = make_inputs(*gpu), cin = make_inputs(*cpu);
    gpu->begin_step();
    forward(*gpu, gin, caches.kg, caches.vg);  // warm-up
    gpu->end_step();
    gpu->begin_step();
    gpu->capture_begin();
    Tensor out = forward(*gpu, gin, caches.kg, caches.vg);
    std::shared_ptr<Graph> graph = gpu->capture_end();
    gpu->end_step();
    forward(*cpu, cin, caches.kc, caches.vc);  // the GPU warm-up's cache writes (the capture runs nothing)
    for (int step = 0; step < 3; ++step) {
      std::vector<int32_t> table = blocks(step + 1), pos(T);
      for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(100 * step + 7 * t + (t < S ? 0 : 1000));
      gpu->begin_step();
      gpu->write(gin[1], table.data(), table.size() * 4);
      gpu->write(gin[2], pos.data(), T * 4);
      gpu->replay(*graph);
      auto got = down(*gpu, out);
      gpu->end_step();
      cpu->write(cin[1], table.data(), table.size() * 4);
      cpu->write(cin[2], pos.data(), T * 4);
      auto want = down(*cpu, forward(*cpu, cin, caches.kc, caches.vc));
      // bf16 caches: a key the GPU rotates from a differently summed q/k/v product can round to the neighbouring
      // bf16 value (the kCache check below allows one bf16 step, 2^-7), and the attention output inherits that
      // step through its scores: the same one-step bound, not f32's 1e-4.
      compare("graph replay", sh + " step " + std::to_string(step), got, want, kv == DType::BF16 ? 1.0 / 128 : 1e-4);
    }
    compare("graph kCache", sh, down(*gpu, caches.kg), down(*cpu, caches.kc), kv == DType::BF16 ? 1.0 / 128 : 1e-5);
  } catch (const std::exception& e) {
    try {
      gpu->end_step();
    } catch (...) {
    }
    fail_row("graph replay", sh, e.what());
  }
}

// Errors that must be thrown (not crashes): stale tensors, device index checks, capture rules.
void check_errors() {
  auto expect = [](const std::string& what, const std::string& pattern, const std::function<void()>& f) {
    try {
      f();
      fail_row("errors", what, "no error thrown");
    } catch (const Error& e) {
      bool ok = std::string(e.what()).find(pattern) != std::string::npos;
      rows.push_back({"errors", what, ok ? "" : e.what(), 0, 0, ok});
    }
  };
  std::vector<float> x(8, 1.0f);
  expect("stale tensor", "tensor from an earlier step", [&] {
    gpu->begin_step();
    Tensor a = up(*gpu, x, {2, 4});
    gpu->begin_step();
    gpu->end_step();
    gpu->check_usable("add", "a", a);
  });
  expect("writeKv block on device", "writeKv: the KV block of token 0 (kvBlockTable[tokenSeq[0]][positions[0] / B]) = 9 "
         "is out of range", [&] {
    Tensor kc = gpu->zeros(DType::F32, {2, 1, 4, 4});
    gpu->write_kv(kc, kc, up(*gpu, std::vector<float>(4, 1), {1, 4}), up(*gpu, std::vector<float>(4, 1), {1, 4}),
                  up_i(*gpu, {0}), up_table(*gpu, {9}, 1), up_i(*gpu, {0}));
    gpu->synchronize();
  });
  expect("qkvRope sequence on device", "writeKv: tokenSeq[0] = 9 is out of range", [&] {
    Tensor kc = gpu->zeros(DType::F32, {2, 1, 4, 4});
    gpu->qkv_rope(up(*gpu, std::vector<float>(12, 1), {1, 12}), up_i(*gpu, {0}), up(*gpu, std::vector<float>(2, 1), {2}),
                  kc, kc, up_i(*gpu, {9}), one_block_table(*gpu, 2), 1);
    gpu->synchronize();
  });
  expect("attention block on device", "attention: a KV block read by token 0", [&] {
    Tensor kc = gpu->zeros(DType::F32, {2, 1, 4, 8});  // head dim 8: the decode kernel takes multiples of 8
    gpu->attention(up(*gpu, std::vector<float>(8, 1), {1, 8}), kc, kc, up_i(*gpu, {0}), up_table(*gpu, {0, -1}, 2),
                   up_i(*gpu, {5}), 1, 0.5f);
    gpu->synchronize();
  });
  expect("upload during capture", "not allowed during graph capture", [&] {
    gpu->begin_step();
    gpu->capture_begin();
    try {
      up(*gpu, x, {2, 4});
    } catch (...) {
      gpu->capture_end();
      gpu->end_step();
      throw;
    }
  });
  expect("arena exhausted", "step arena is exhausted", [&] {
    gpu->begin_step();
    try {
      gpu->zeros(DType::F32, {int64_t{1} << 40 >> 8});
    } catch (...) {
      gpu->end_step();
      throw;
    }
  });
}

}  // namespace

// topLogprobs: CUDA vs the CPU reference, ties at the top (the lower id first) and a row asked for twice.
void check_top_logprobs(Rng& rng) {
  for (int64_t V : {50, 32000, 128256}) {
    const int64_t R = 6, k = 20;
    std::string sh = "R=6 Q=4 k=20 V=" + std::to_string(V);
    auto l = rng.floats(R * V, -12, 12);
    l[1 * V + 9] = 25;
    l[1 * V + 4] = 25;
    std::vector<int32_t> rows = {5, 1, 0, 1}, ids(R);
    for (auto& i : ids) i = rng.below(static_cast<int>(V));
    run_case("topLogprobs", sh, [&] {
      auto g = down(*gpu, gpu->top_logprobs(up(*gpu, l, {R, V}), up_i(*gpu, rows), up_i(*gpu, ids), k));
      auto c = down(*cpu, cpu->top_logprobs(up(*cpu, l, {R, V}), up_i(*cpu, rows), up_i(*cpu, ids), k));
      // the ids exactly, the log-probs (column 0 and the last k) as logSoftmax's
      std::vector<int32_t> g_ids, c_ids;
      std::vector<float> g_lp, c_lp;
      for (size_t i = 0; i < g.size() && i < c.size(); ++i) {
        const int64_t col = static_cast<int64_t>(i) % (1 + 2 * k);
        if (col >= 1 && col <= k) {
          g_ids.push_back(static_cast<int32_t>(g[i]));
          c_ids.push_back(static_cast<int32_t>(c[i]));
        } else {
          g_lp.push_back(g[i]);
          c_lp.push_back(c[i]);
        }
      }
      compare_i("topLogprobs ids", sh, g_ids, c_ids);
      compare("topLogprobs", sh, g_lp, c_lp, 1e-5);
    });
  }
}

// Bifurcated decode attention: n samples in `groups` groups (sample t in group t % groups), the table rows of a
// group beginning with the same m_blocks blocks of B = 16 (its prompt; groupShared = m_blocks B - cut: a prefix
// that ends inside a block and inside a 32-row tile), each with private blocks of its own (ragged continuations of
// 1..priv positions: priv 1000 gives a private range of many tiles cut into several partitions), and a token of no
// group with a context of its own (its private range is all of it); GQA 32/8, MHA 32/32, 8/2, hd 128, 64 and 96
// (96: 48 pair slots a row, so the value pass splits the query rows among thread groups), f32 and bf16 caches, up
// to 32 samples; a group of one (n = 1). Against the CPU reference and against the CUDA plain paged attention.
// f32 caches and head dims other than 64 and 128 run on CUDA cores (attention-bifurcated.cu): fp32 reductions
// over the same terms in another order, the decode bound, 1e-4. bf16 at head dims 64 and 128 runs on tensor cores
// (attention-bifurcated-mma.cu), whose f16 operands round q, k, v and the softmax weights as the prefill kernel
// does: the prefill's bound, 1e-3 (check_attention derives it). Its row tiles MT (16 MT query rows a block, from
// T x the GQA heads): 1 (MHA n <= 15, n = 1), 2 (MHA n = 16 with the lone token: 17 rows; 8/2 n = 6: 28 rows, a
// row tile partly past the group's rows), 4 (GQA 17 x 4 rows and more: chunks of 64 rows; with 4 groups most
// chunks hold no rows).
void check_attention_bifurcated(Rng& rng) {
  const int64_t B = 16;
  struct Cfg {
    int64_t n, nH, nKv, hd, m_blocks;
    DType kv;
    int64_t groups = 1, cut = 0, priv = 100;
  };
  for (Cfg c : {Cfg{4, 32, 8, 128, 64, DType::F32}, Cfg{16, 32, 8, 128, 64, DType::BF16},
                Cfg{16, 32, 32, 128, 32, DType::BF16}, Cfg{3, 8, 8, 64, 5, DType::F32}, Cfg{5, 16, 4, 96, 9, DType::BF16},
                Cfg{32, 32, 8, 128, 16, DType::BF16}, Cfg{8, 32, 32, 128, 40, DType::BF16},
                Cfg{6, 8, 2, 64, 21, DType::BF16}, Cfg{1, 32, 32, 128, 37, DType::BF16, 1, 7},
                Cfg{1, 32, 8, 128, 20, DType::BF16, 1, 0, 1000}, Cfg{12, 32, 8, 128, 23, DType::BF16, 4, 9},
                Cfg{7, 16, 16, 64, 11, DType::BF16, 2, 3, 1000}, Cfg{9, 32, 32, 128, 3, DType::BF16, 3, 15}}) {
    const int64_t T = c.n + 1, hd = c.hd, priv_blocks = (c.priv + B - 1) / B;
    const int64_t width = c.m_blocks + priv_blocks + 2;
    const int64_t n_blocks = c.groups * c.m_blocks + T * width + 1;
    std::string sh = "n=" + std::to_string(c.n) + " " + std::to_string(c.nH) + "/" + std::to_string(c.nKv) + "x" +
                     std::to_string(hd) + " m=" + std::to_string(c.m_blocks * B - c.cut) +
                     (c.groups > 1 ? " g=" + std::to_string(c.groups) : "") +
                     (c.priv != 100 ? " priv<=" + std::to_string(c.priv) : "") + (c.kv == DType::BF16 ? " bf16" : " f32");
    run_case("attnBifurcated", sh, [&] {
      // rows: group k's members share blocks k m_blocks .. + m_blocks - 1, then blocks of their own; the lone token
      // owns all of its row
      std::vector<int32_t> rows(static_cast<size_t>(T * width)), seq(T), pos(T), group(T);
      int32_t next = static_cast<int32_t>(c.groups * c.m_blocks);
      for (int64_t t = 0; t < T; ++t) {
        group[t] = static_cast<int32_t>(t % c.groups);
        for (int64_t j = 0; j < width; ++j)
          rows[t * width + j] = t < c.n && j < c.m_blocks ? static_cast<int32_t>(group[t] * c.m_blocks + j) : next++;
        seq[t] = static_cast<int32_t>(t);
        pos[t] = static_cast<int32_t>(c.m_blocks * B + rng.below(static_cast<int>(c.priv)));  // 1..priv past the blocks
      }
      group[c.n] = -1;
      pos[c.n] = static_cast<int32_t>(rng.below(static_cast<int>(width * B)));
      std::vector<int32_t> shared(static_cast<size_t>(c.groups), static_cast<int32_t>(c.m_blocks * B - c.cut));
      shared.push_back(0);  // an unused slot
      Shape cs{n_blocks, c.nKv, B, hd}, qs{T, c.nH * hd};
      auto k = rng.floats(n_blocks * c.nKv * B * hd), v = rng.floats(n_blocks * c.nKv * B * hd), q = rng.floats(T * c.nH * hd);
      const float scale = 1.0f / std::sqrt(float(hd));
      auto attend = [&](Backend& b, bool bifurcated) {
        Tensor kc = up_narrow(b, k, cs, c.kv), vc = up_narrow(b, v, cs, c.kv), table = up_table(b, rows, width);
        Tensor out = bifurcated ? b.attention_bifurcated(up(b, q, qs), kc, vc, up_i(b, seq), table, up_i(b, pos),
                                                         up_i(b, group), up_i(b, shared), c.nH, scale)
                                : b.attention(up(b, q, qs), kc, vc, up_i(b, seq), table, up_i(b, pos), c.nH, scale);
        return down(b, out);
      };
      auto got = attend(*gpu, true);
      const bool mma = c.kv == DType::BF16 && (hd == 64 || hd == 128);  // tensor cores: the prefill's bound
      const double bound = mma ? 1e-3 : 1e-4;
      compare("attnBifurcated", sh, got, attend(*cpu, true), bound, 0, "vs cpu");
      compare("attnBifurcated", sh + " plain", got, attend(*gpu, false), bound, 0, "vs cuda plain paged");
    });
  }
}

// SparQ (cuda/attention-sparq.cuh): sparqAppend's transposed K exact and its block V sums at 1e-6; sparqAttention
// against the CPU reference at the decode bound 1e-4 (on tie-free random data the selections are the same, so only
// the fp32 summation order differs), on paged caches (scattered blocks, partial last blocks, blocks of 6: the
// select's position-by-position path), GQA groups of 1, 2, 3, 4 and 8 (the kernels keep 1, 4 or 8 heads), head
// dims 64, 96 (the gather's strided lanes) and 128, f32 and bf16, odd lengths up to 5001 (slices of the select's
// cluster in several kT blocks each), capacities of 16384 (slices under 48 KB that need the opt-in beside the
// select's static shared memory) and 40960 (the slices too large for shared memory), k not a power of two, with one
// token per sequence plus three of one sequence (speculative verification: a selection per token), r and k per
// token, a short sequence within its k in the same batch, and k >= length (the exact path) against the dense kernel
// at 1e-4.
void check_sparq(Rng& rng) {
  struct Case {
    int64_t nKv, group, hd, B;
    std::vector<int32_t> lens;
    DType d;
    int32_t k_even = 100, k_odd = 64;  // k of the even and odd tokens
    int64_t capacity = 0;              // positions a sequence row holds at least (the select's slices size by it)
  };
  for (const Case& c : {Case{4, 1, 128, 64, {700, 1000, 65}, DType::BF16}, Case{2, 4, 128, 16, {1500, 333}, DType::F32},
                        Case{1, 8, 64, 32, {2048}, DType::BF16}, Case{2, 4, 64, 64, {5001, 4097, 37}, DType::BF16, 333, 1001},
                        Case{3, 2, 96, 16, {999, 130}, DType::BF16, 77, 129}, Case{2, 1, 128, 6, {1201, 50}, DType::F32, 150, 61},
                        Case{1, 3, 128, 64, {3001}, DType::F32, 500, 257, 16384},  // 32 KB of slices, 23 KB static
                        Case{1, 8, 64, 64, {3000}, DType::F32, 300, 129, 40960}}) {  // slices in global memory
    const int64_t S = static_cast<int64_t>(c.lens.size()), hd = c.hd, nH = c.nKv * c.group;
    int64_t per_seq = 0;
    for (int32_t l : c.lens) per_seq = std::max<int64_t>(per_seq, (l + c.B - 1) / c.B);
    per_seq = std::max<int64_t>(per_seq, (c.capacity + c.B - 1) / c.B);
    const int64_t n_blocks = S * per_seq + 3;
    std::vector<int32_t> table_rows(S * per_seq), seq_all, pos_all;
    for (int64_t i = 0; i < S * per_seq; ++i) table_rows[i] = static_cast<int32_t>((i * 7 + 2) % n_blocks);  // scattered
    for (int64_t s = 0; s < S; ++s)
      for (int32_t p = 0; p < c.lens[s]; ++p) seq_all.push_back(int32_t(s)), pos_all.push_back(p);
    const std::string sh = "nKv " + std::to_string(c.nKv) + " group " + std::to_string(c.group) + " hd " +
                           std::to_string(hd) + " B " + std::to_string(c.B) + (c.d == DType::BF16 ? " bf16" : " f32");
    Caches caches = make_caches(rng, n_blocks, c.nKv, c.B, hd, c.d);
    // decode tokens: the last position of each sequence, then three more of sequence 0 (a verification step)
    std::vector<int32_t> seq, pos, r, k;
    for (int64_t s = 0; s < S; ++s) seq.push_back(int32_t(s)), pos.push_back(c.lens[s] - 1);
    for (int32_t back : {4, 3, 2}) seq.push_back(0), pos.push_back(c.lens[0] - back);
    const int64_t T = static_cast<int64_t>(seq.size());
    for (int64_t t = 0; t < T; ++t) r.push_back(t % 2 ? int32_t(hd / 8) : int32_t(hd / 4)), k.push_back(t % 2 ? c.k_odd : c.k_even);
    auto q = rng.floats(T * nH * hd);
    run_case("sparq", sh, [&] {
      auto state = [&](Backend& b, const Tensor& kc, const Tensor& vc) {
        Tensor kt = b.zeros(c.d, {n_blocks, c.nKv, hd, c.B}), vs = b.zeros(DType::F32, {n_blocks, c.nKv, hd});
        b.sparq_append(kt, vs, kc, vc, up_i(b, seq_all), up_table(b, table_rows, per_seq), up_i(b, pos_all));
        return std::make_pair(kt, vs);
      };
      auto sc = state(*cpu, caches.kc, caches.vc), sg = state(*gpu, caches.kg, caches.vg);
      compare("sparqAppend kT", sh, down(*gpu, sg.first), down(*cpu, sc.first), 0);
      compare("sparqAppend vSum", sh, down(*gpu, sg.second), down(*cpu, sc.second), 1e-6);
      const float scale = 1.0f / std::sqrt(float(hd));
      auto attend = [&](Backend& b, const Tensor& kc, const Tensor& vc, const std::pair<Tensor, Tensor>& st,
                        const std::vector<int32_t>& kk) {
        return down(b, b.sparq_attention(up(b, q, {T, nH * hd}), kc, vc, st.first, st.second, up_i(b, seq),
                                         up_table(b, table_rows, per_seq), up_i(b, pos), up_i(b, r), up_i(b, kk), nH,
                                         scale));
      };
      compare("sparqAttention", sh, attend(*gpu, caches.kg, caches.vg, sg, k), attend(*cpu, caches.kc, caches.vc, sc, k),
              1e-4);
      const std::vector<int32_t> exact(static_cast<size_t>(T), 1 << 30);
      const auto dense = down(*gpu, gpu->attention(up(*gpu, q, {T, nH * hd}), caches.kg, caches.vg, up_i(*gpu, seq),
                                                   up_table(*gpu, table_rows, per_seq), up_i(*gpu, pos), nH, scale));
      compare("sparqAttention", sh + " k>=len", attend(*gpu, caches.kg, caches.vg, sg, exact), dense, 1e-4, 0,
              "vs dense on cuda");
    });
  }
}

// fp8 and int8 KV caches (kv-quant.h) through a paged table (blocks of 16, scattered). writeKv: the CUDA cache
// holds the CPU cache's bytes, codes and scales alike (one rounding rule; e4m3 by the hardware conversion on
// CUDA, by f32_to_e4m3 on the CPU). qkvRope: v rows byte for byte as the CPU's; k rows byte for byte as the CPU's
// writeKv of CUDA's own rope of k (the CPU's and CUDA's rotations may differ by an f32 rounding, then by a code).
// attention reads the codes directly: prefill (tensor cores for hd 64 and 128, the fp32 kernel for 96) exactly as
// over an f32 cache of the dequantized values, decode (scales folded per row) within 1e-5 of it; against the CPU,
// check_attention's f32 bounds (prefill 2e-3: below).
void check_kv_quant(Rng& rng) {
  const int64_t S = 3, C = 512, B = 16, per_seq = C / B, n_blocks = S * per_seq + 2;
  struct Cfg {
    int64_t T, nH, nKv, hd;
    bool decode;  // sequence t % S at random positions, else one sequence after 200 positions
  };
  for (DType dtype : {DType::FP8, DType::I8})
    for (Cfg c : {Cfg{1, 32, 8, 128, true}, Cfg{8, 32, 32, 128, true}, Cfg{64, 32, 8, 128, true},
                  Cfg{5, 16, 4, 96, true}, Cfg{8, 8, 8, 64, true}, Cfg{300, 32, 8, 128, false},
                  Cfg{200, 16, 4, 64, false}, Cfg{100, 16, 4, 96, false}}) {
      const int64_t hd = c.hd, width = (c.nH + 2 * c.nKv) * hd;
      std::string sh = std::string(dtype_name(dtype)) + " T=" + std::to_string(c.T) + " " + std::to_string(c.nH) +
                       "/" + std::to_string(c.nKv) + "x" + std::to_string(hd) + (c.decode ? " decode" : " prefill");
      run_case("kv quant", sh, [&] {
        const std::vector<int32_t> rows = scattered_blocks(rng, n_blocks, S * per_seq);
        const Shape cs{n_blocks, c.nKv, B, hd};
        auto table = [&](Backend& b) { return up_table(b, rows, per_seq); };
        // every position of every sequence written once, magnitudes over two decades (rows of unlike scales)
        std::vector<int32_t> all_seq(S * C), all_pos(S * C);
        for (int64_t i = 0; i < S * C; ++i) {
          all_seq[i] = static_cast<int32_t>(i / C);
          all_pos[i] = static_cast<int32_t>(i % C);
        }
        auto spread = [&](int64_t n) {
          auto v = rng.floats(static_cast<size_t>(n));
          for (float& x : v) x *= std::pow(10.0f, rng.uniform(-1, 1));
          return v;
        };
        const auto kw = spread(S * C * c.nKv * hd), vw = spread(S * C * c.nKv * hd);
        auto fill = [&](Backend& b) {
          auto kv = std::make_pair(b.zeros(dtype, cs), b.zeros(dtype, cs));
          b.write_kv(kv.first, kv.second, up(b, kw, {S * C, c.nKv * hd}), up(b, vw, {S * C, c.nKv * hd}),
                     up_i(b, all_seq), table(b), up_i(b, all_pos));
          return kv;
        };
        auto raw = [](Backend& b, const Tensor& t) {  // the codes as words, and the scales
          return std::make_pair(down_i(b, Tensor{DType::I32, {t.numel() / 4}, t.buffer, nullptr}), down(b, *t.scales));
        };
        auto same_bytes = [&](const std::string& what, Backend& b1, const Tensor& t1, Backend& b2, const Tensor& t2) {
          auto r1 = raw(b1, t1), r2 = raw(b2, t2);
          compare_i("kv quant " + what, sh, r1.first, r2.first, "codes, byte for byte");
          compare("kv quant " + what, sh, r1.second, r2.second, 0, 0, "scales, bit for bit");
        };
        auto gq = fill(*gpu), cq = fill(*cpu);
        same_bytes("writeKv k", *gpu, gq.first, *cpu, cq.first);
        same_bytes("writeKv v", *gpu, gq.second, *cpu, cq.second);

        std::vector<int32_t> seq(c.T), pos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          seq[t] = c.decode ? static_cast<int32_t>(t % S) : 1;
          pos[t] = c.decode ? (t == 0 ? static_cast<int32_t>(C - 1) : rng.below(C)) : static_cast<int32_t>(200 + t);
        }
        const auto q = rng.floats(c.T * c.nH * hd);
        const float scale = 1.0f / std::sqrt(float(hd));
        auto attend = [&](Backend& b, const std::pair<Tensor, Tensor>& kv) {
          return down(b, b.attention(up(b, q, {c.T, c.nH * hd}), kv.first, kv.second, up_i(b, seq), table(b),
                                     up_i(b, pos), c.nH, scale));
        };
        auto dequantized = std::make_pair(up(*gpu, down(*gpu, gq.first), cs), up(*gpu, down(*gpu, gq.second), cs));
        const auto got = attend(*gpu, gq);
        compare("kv quant attention", sh, got, attend(*gpu, dequantized), c.decode ? 1e-5 : 0, 0,
                "vs f32 cache of the dequantized values on cuda");
        // Prefill against the CPU: 2e-3, not the bf16 cache's 1e-3. The tensor-core prefill rounds each dequantized
        // value (code x scale, over two decades here) to f16, a rounding a bf16 cache's values never take; measured on
        // H200 at 2.67e-3 absolute against max|out| 2.51 (1.06e-3), int8 T=200 16/4x64, with the kernel equal to
        // its run over an f32 cache of the same values.
        compare("kv quant attention", sh, got, attend(*cpu, cq), c.T > 64 ? 2e-3 : 1e-4, 0, "vs cpu, same cache");

        // qkvRope at distinct (sequence, position) pairs
        std::vector<int32_t> wseq(c.T), wpos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          wseq[t] = static_cast<int32_t>(t % S);
          wpos[t] = static_cast<int32_t>((t / S) * 5 % C);
        }
        const auto qkv = rng.floats(c.T * width), f = inv_freq(static_cast<int>(hd));
        gpu->qkv_rope(up(*gpu, qkv, {c.T, width}), up_i(*gpu, wpos), up(*gpu, f, {hd / 2}), gq.first, gq.second,
                      up_i(*gpu, wseq), table(*gpu), c.nH);
        const Tensor qkv_g = up(*gpu, qkv, {c.T, width});
        const auto k_rot = down(*gpu, gpu->rope(gpu->slice_cols(qkv_g, c.nH * hd, (c.nH + c.nKv) * hd), up_i(*gpu, wpos),
                                                up(*gpu, f, {hd / 2}), hd));
        const auto v_rows = down(*gpu, gpu->slice_cols(qkv_g, (c.nH + c.nKv) * hd, width));
        cpu->write_kv(cq.first, cq.second, up(*cpu, k_rot, {c.T, c.nKv * hd}), up(*cpu, v_rows, {c.T, c.nKv * hd}),
                      up_i(*cpu, wseq), table(*cpu), up_i(*cpu, wpos));
        same_bytes("qkvRope k", *gpu, gq.first, *cpu, cq.first);
        same_bytes("qkvRope v", *gpu, gq.second, *cpu, cq.second);
      });
    }
}

// Decode attention at long contexts (attention-decode-mma.cu): up to 16384 positions, so that a token's positions
// spread over tens of partitions, each read by the four warps of a block in turn, and merged by the partitions' last
// block (its ticket); a token at position 5 fits one partition (written directly). bf16, fp8 and int8 caches,
// paged (B = 16, scattered), head dims 64 (GQA 8: a head chunk of 8), 128 (MHA and GQA 4) and 256. Against the CPU
// at check_attention's decode bound (1e-4), against an f32 cache of the same values on CUDA (the CUDA-core kernel
// and the merge kernel) at 1e-5, and a second launch gives the same bits (the tickets were reset).
void check_attention_decode_long(Rng& rng) {
  const int64_t S = 2, C = 16384, B = 16, per_seq = C / B, n_blocks = S * per_seq + 3;
  struct Cfg {
    int64_t T, nH, nKv, hd;
  };
  for (DType dtype : {DType::BF16, DType::FP8, DType::I8})
    for (Cfg c : {Cfg{1, 32, 8, 128}, Cfg{3, 16, 16, 128}, Cfg{2, 8, 2, 256}, Cfg{4, 16, 2, 64}}) {
      const int64_t hd = c.hd;
      std::string sh = std::string(dtype_name(dtype)) + " T=" + std::to_string(c.T) + " " + std::to_string(c.nH) +
                       "/" + std::to_string(c.nKv) + "x" + std::to_string(hd) + " C=16384 B=16";
      run_case("decode attention long", sh, [&] {
        const std::vector<int32_t> rows = scattered_blocks(rng, n_blocks, S * per_seq);
        const Shape cs{n_blocks, c.nKv, B, hd};
        auto table = [&](Backend& b) { return up_table(b, rows, per_seq); };
        const auto kw = rng.floats(S * C * c.nKv * hd), vw = rng.floats(S * C * c.nKv * hd);
        auto fill = [&](Backend& b) {  // every position of both sequences, through writeKv (codes quantized there)
          std::vector<int32_t> all_seq(S * C), all_pos(S * C);
          for (int64_t i = 0; i < S * C; ++i) {
            all_seq[i] = static_cast<int32_t>(i / C);
            all_pos[i] = static_cast<int32_t>(i % C);
          }
          auto kv = std::make_pair(b.zeros(dtype, cs), b.zeros(dtype, cs));
          b.write_kv(kv.first, kv.second, up(b, kw, {S * C, c.nKv * hd}), up(b, vw, {S * C, c.nKv * hd}),
                     up_i(b, all_seq), table(b), up_i(b, all_pos));
          return kv;
        };
        std::vector<int32_t> seq(c.T), pos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          seq[t] = static_cast<int32_t>(t % S);
          pos[t] = t == 0 ? static_cast<int32_t>(C - 1) : t == 1 ? 5 : static_cast<int32_t>(C / 2 + rng.below(C / 2));
        }
        const auto q = rng.floats(c.T * c.nH * hd);
        const float scale = 1.0f / std::sqrt(float(hd));
        auto attend = [&](Backend& b, const std::pair<Tensor, Tensor>& kv) {
          return down(b, b.attention(up(b, q, {c.T, c.nH * hd}), kv.first, kv.second, up_i(b, seq), table(b),
                                     up_i(b, pos), c.nH, scale));
        };
        auto gk = fill(*gpu), ck = fill(*cpu);
        const auto got = attend(*gpu, gk);
        compare("decode attention long", sh, attend(*gpu, gk), got, 0, 0, "second launch, same bits");
        auto values = std::make_pair(up(*gpu, down(*gpu, gk.first), cs), up(*gpu, down(*gpu, gk.second), cs));
        compare("decode attention long", sh, got, attend(*gpu, values), 1e-5, 0, "vs f32 cache of the same values");
        compare("decode attention long", sh, got, attend(*cpu, ck), 1e-4, 0, "vs cpu, same cache");
      });
    }
}

// Decode batches past kDecodeMaxTokens (cuda/attention.cuh takes_decode_kernel): T tokens, one per sequence row
// (T == S, as a decode step of T sequences), run on the decode kernel, so they meet its bound, 1e-4, against the
// CPU; the prefill kernel's f16 operands are 2.4e-4 to 3.9e-4 off (check_attention), so this bound also tells which
// kernel ran. bf16 caches (tensor cores) and f32 (CUDA cores); GQA 4 at head dim 128 and MHA at 64; random
// positions in each sequence's one block.
void check_attention_decode_batch(Rng& rng) {
  struct Cfg {
    int64_t T, nH, nKv, hd, C;
  };
  for (DType dtype : {DType::BF16, DType::F32})
    for (Cfg c : {Cfg{200, 32, 8, 128, 256}, Cfg{130, 16, 16, 64, 192}}) {
      std::string sh = std::string(dtype_name(dtype)) + " T=S=" + std::to_string(c.T) + " " + std::to_string(c.nH) +
                       "/" + std::to_string(c.nKv) + "x" + std::to_string(c.hd) + " C=" + std::to_string(c.C);
      run_case("decode batch attention", sh, [&] {
        Caches caches = make_caches(rng, c.T, c.nKv, c.C, c.hd, dtype);
        std::vector<int32_t> seq(c.T), pos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          seq[t] = static_cast<int32_t>(t);
          pos[t] = t == 0 ? static_cast<int32_t>(c.C - 1) : t == 1 ? 0 : rng.below(c.C);
        }
        const auto q = rng.floats(c.T * c.nH * c.hd);
        const Shape qs{c.T, c.nH * c.hd};
        const float scale = 1.0f / std::sqrt(float(c.hd));
        auto want = down(*cpu, cpu->attention(up(*cpu, q, qs), caches.kc, caches.vc, up_i(*cpu, seq),
                                              one_block_table(*cpu, c.T), up_i(*cpu, pos), c.nH, scale));
        auto got = down(*gpu, gpu->attention(up(*gpu, q, qs), caches.kg, caches.vg, up_i(*gpu, seq),
                                             one_block_table(*gpu, c.T), up_i(*gpu, pos), c.nH, scale));
        compare("decode batch attention", sh, got, want, 1e-4);
      });
    }
}

// The quantized GEMV at every token count 1..16 (gemv-quant-mma.cu for int8 per channel and int4 g128: one
// n-tile of 8 tokens up to 8, two from 9; rows not a multiple of its 16-row tile), decode batches of 17..256 (4 or
// 8 n-tiles, one block a SM, a split K summed in rounds; x of 32 tokens at K = 14336 fits where 64 do not: passes
// of 32; past 64, dequantize + GEMM), the gated form, activations
// beyond f16's range (|x| up to 2e5: the kernel rescales x per token by a power of two), groups smaller than its
// chunk (scales in the f16 weights; K % 64 != 0 for int8, % 128 for int4: a partial last chunk), and shapes it
// leaves to gemv.cu's kernels (groups not of whole 16-byte vectors; x too long for its shared memory at 16
// tokens), against the CPU. Tolerances: quant_rtol.
void check_quant_gemv_tokens(Rng& rng) {
  struct Case {
    DType dt;
    int64_t group, N, K;  // group 0: per channel
    bool gated;
    float x_range;
    std::vector<int64_t> tokens;
  };
  std::vector<int64_t> all;
  for (int64_t T = 1; T <= 16; ++T) all.push_back(T);
  const std::vector<int64_t> batches = {17, 24, 32, 33, 48, 64, 65, 100, 256};
  const std::vector<Case> cases = {
      {DType::I8, 0, 1000, 2048, false, 1, all},          {DType::I4, 128, 1000, 2048, false, 1, all},
      {DType::I8, 0, 520, 1408, true, 4, {1, 5, 8, 9, 16}}, {DType::I4, 128, 520, 1408, true, 4, {1, 5, 8, 9, 16}},
      {DType::I8, 0, 256, 2048, false, 2e5f, {1, 3, 12}},   {DType::I4, 128, 256, 2048, false, 2e5f, {1, 3, 12}},
      {DType::I8, 64, 7, 1024, false, 1, {1, 4, 16}},       {DType::I8, 32, 100, 1024, false, 1, {1, 8, 16}},
      {DType::I4, 32, 1000, 2048, false, 1, {1, 7, 8, 9, 16}}, {DType::I4, 64, 300, 1408, true, 4, {2, 8, 13}},
      {DType::I8, 0, 64, 4128, false, 1, {1, 8, 16}},       {DType::I4, 64, 64, 4160, false, 1, {1, 8, 16}},
      {DType::I8, 0, 1000, 1376, true, 4, {1, 8, 16}},      {DType::I8, 0, 64, 4104, false, 1, {1, 8}},
      {DType::I4, 16, 64, 4112, false, 1, {1, 8}},          {DType::I8, 0, 64, 20480, false, 1, {16}},
      {DType::I8, 0, 1000, 2048, false, 1, batches},        {DType::I4, 128, 1000, 2048, false, 1, batches},
      {DType::I8, 0, 520, 1408, true, 4, {20, 40}},         {DType::I4, 128, 520, 1408, true, 4, {20, 40}},
      {DType::I8, 0, 256, 2048, false, 2e5f, {20, 40}},     {DType::I4, 128, 256, 2048, false, 2e5f, {20, 40}},
      {DType::I8, 32, 100, 1024, false, 1, {24, 64}},       {DType::I4, 32, 1000, 2048, false, 1, {24, 64}},
      {DType::I8, 0, 64, 4104, false, 1, {40}},             {DType::I4, 64, 64, 4160, false, 1, {40}},
      {DType::I4, 128, 4000, 4096, false, 1, {40, 64}},     {DType::I4, 128, 300, 14336, true, 4, {33, 64}},
      {DType::I8, 0, 300, 11008, true, 4, {64}},
      // 8 tokens at K 14336 on the one-token kernel: x in two runs of K, each run's |x| < 2e5 scaled on its own
      {DType::I4, 128, 256, 14336, false, 2e5f, {8}},       {DType::I8, 0, 256, 14336, false, 2e5f, {8}},
      {DType::I4, 128, 300, 14336, true, 4, {6, 8}}};
  for (const Case& c : cases) {
    const int64_t group = c.group ? c.group : c.K;
    QuantPair w;
    try {
      w = upload_quant_pair(rng, c.dt, c.N, c.K, group);
    } catch (const std::exception& e) {
      fail_row("uploadQuantized", dtype_name(c.dt), e.what());
      continue;
    }
    for (int64_t T : c.tokens) {
      const char* op = c.gated ? "siluMulMatmul" : "matmul";
      std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(c.K) + " N=" + std::to_string(c.N) + " " +
                       dtype_name(c.dt) + " g" + (c.group ? std::to_string(c.group) : std::string("K")) +
                       (c.x_range > 1e3f ? " |x|<2e5" : "");
      run_case(op, sh, [&] {
        auto x = rng.floats(T * (c.gated ? 2 : 1) * c.K, -c.x_range, c.x_range);
        const Shape xs{T, (c.gated ? 2 : 1) * c.K};
        const auto run = [&](Backend& b, const Tensor& wq) {
          return down(b, c.gated ? b.silu_mul_matmul(up(b, x, xs), wq) : b.matmul(up(b, x, xs), wq));
        };
        compare(op, sh, run(*gpu, w.gpu_w), run(*cpu, w.cpu_w), quant_rtol(c.dt, c.K, group, T));
      });
    }
  }
}

// The one-token GEMV (gemv-one-token.cu: bf16 on its batched kernel, int8 and int4 on the streaming one, int8 in
// groups of 3 vectors on the batched one) at N of 1, below a warp's 2-row task and a block's 16 rows, odd and past
// a block's (rows past N read row N - 1 and store nothing), K whose vectors leave lanes idle in a row's last ring
// item (1376: 86 int8 / 43 int4 vectors), the gated form, int8 and int4 per channel and in groups, against the
// CPU: exact weights times fp32 x summed in fp32 on both, 1e-5.
void check_one_token_matmul(Rng& rng) {
  struct Case {
    DType dt;
    int64_t group;  // 0: per channel; bf16: none
  };
  struct Shape2 {
    int64_t N, K;
    bool gated;
  };
  for (Case c : {Case{DType::BF16, 0}, Case{DType::I8, 0}, Case{DType::I8, 64}, Case{DType::I8, 48}, Case{DType::I4, 0},
                 Case{DType::I4, 128}, Case{DType::I4, 32}})
    for (Shape2 s : {Shape2{1, 4096, false}, Shape2{7, 1376, true}, Shape2{15, 4128, false}, Shape2{17, 11008, true},
                     Shape2{1001, 4096, false}, Shape2{4099, 1376, true}}) {
      const int64_t group = c.group ? c.group : s.K;
      if (s.K % group != 0) continue;
      const char* op = s.gated ? "siluMulMatmul" : "matmul";
      std::string sh = "T=1 K=" + std::to_string(s.K) + " N=" + std::to_string(s.N) + " " + dtype_name(c.dt) +
                       (c.dt == DType::BF16 ? std::string() : " g" + (c.group ? std::to_string(c.group) : std::string("K")));
      QuantPair q;  // quantized weights are uploaded outside a step (persistent scales)
      if (c.dt != DType::BF16) {
        try {
          q = upload_quant_pair(rng, c.dt, s.N, s.K, group);
        } catch (const std::exception& e) {
          fail_row("uploadQuantized", dtype_name(c.dt), e.what());
          continue;
        }
      }
      run_case(op, sh, [&] {
        Tensor gw = q.gpu_w, cw = q.cpu_w;
        std::vector<float> w_source;
        if (c.dt == DType::BF16) {
          w_source = rng.floats(s.N * s.K);
          gw = up_narrow(*gpu, w_source, {s.N, s.K}, DType::BF16);
          cw = up_narrow(*cpu, w_source, {s.N, s.K}, DType::BF16);
        }
        auto x = rng.floats((s.gated ? 2 : 1) * s.K, s.gated ? -4 : -1, s.gated ? 4 : 1);
        const Shape xs{1, (s.gated ? 2 : 1) * s.K};
        const auto run = [&](Backend& b, const Tensor& w) {
          return down(b, s.gated ? b.silu_mul_matmul(up(b, x, xs), w) : b.matmul(up(b, x, xs), w));
        };
        // The bound's absolute term: 1e-5 of the largest row scale (the root of its squared products). With one
        // output, max|ref| alone can be a near-cancelled sum (H100 session 46: 0.081, where 4096 products of [-1, 1]
        // draws have a scale of sqrt(4096 / 9) ~ 21, so 2.3e-5 of summation order failed 8.1e-7).
        double product_scale = 0;
        if (c.dt == DType::BF16 && !s.gated)
          for (int64_t n = 0; n < s.N; ++n) {
            double sq = 0;
            for (int64_t k = 0; k < s.K; ++k) {
              const double p = double(x[k]) * w_source[n * s.K + k];
              sq += p * p;
            }
            product_scale = std::max(product_scale, std::sqrt(sq));
          }
        compare(op, sh, run(*gpu, gw), run(*cpu, cw), 1e-5, 1e-5 * product_scale);
      });
    }
}

// int4 and int8 in tiles (quant-tiles.h: the CUDA backend lays out int4 g128 and int8 per-channel weights of 16-row
// multiples so on upload; int8's one token then takes the s8 tensor-core form) through each of their readers at one
// token, against the CPU's row-major weights: the norm made inside the GEMV (held
// addRmsNorm) for plain rows and SwiGLU pairs, pairs without it, the gated form (the 1..64-token tensor-core GEMV),
// a norm the one-token kernel refuses (K > 4096: the norm runs alone, then the GEMV), 40 tokens over 251 tiles (a
// warp's group of 4 tiles reaches past N: those tiles read the last one), the dequantize-then-GEMM
// path of 65 rows over a matrix larger than its scratch (rows in slices of whole tiles), and 2..8 tokens.
void check_quant_tiles(Rng& rng) {
  struct Case {
    const char* what;
    int64_t N, K;  // N: outputs (pairs: gate rows; the weight has 2N rows)
    bool norm, pairs, gated;
    int64_t T;
  };
  for (Case c : {Case{"held norm", 3072, 4096, true, false, false, 1}, Case{"held norm, pairs", 1408, 4096, true, true, false, 1},
                 Case{"pairs", 1408, 4096, false, true, false, 1}, Case{"gated", 4096, 1408, false, false, true, 1},
                 Case{"norm refused (K 8192)", 256, 8192, true, false, false, 1},
                 Case{"a warp's tiles past N (251 tiles)", 4016, 4096, false, false, false, 40},
                 Case{"dequantize in slices", 9376, 14336, false, false, false, 65},
                 // int4 at 2..8 tokens on the one-token kernel (gemv_tokens_mma): plain, pairs, gated, after a norm
                 // run alone, x's tokens at K 11008 (193 KB of shared memory) and at K 14336 in two runs of K
                 Case{"tokens", 4096, 4096, false, false, false, 3}, Case{"tokens", 4016, 4096, false, false, false, 8},
                 Case{"tokens, pairs", 1408, 4096, false, true, false, 2},
                 Case{"tokens, pairs", 1408, 4096, false, true, false, 8},
                 Case{"tokens, gated", 4096, 1408, false, false, true, 5},
                 Case{"tokens, norm", 3072, 4096, true, false, false, 8},
                 Case{"tokens, K 11008", 4096, 11008, false, false, false, 8},
                 Case{"tokens, K 14336 (two runs of K)", 512, 14336, false, false, false, 8}}) {
    for (const DType dt : {DType::I4, DType::I8}) {
      const bool int4 = dt == DType::I4;
      const int64_t rows = c.pairs ? 2 * c.N : c.N, group = int4 ? 128 : c.K;
      const char* name = int4 ? "int4 tiles" : "int8 tiles";
      std::string sh = std::string(c.what) + " T=" + std::to_string(c.T) + " K=" + std::to_string(c.K) + " N=" +
                       std::to_string(c.N) + (int4 ? " i4 g128 tiles" : " i8 per channel tiles");
      QuantPair w;
      try {
        w = upload_quant_pair(rng, dt, rows, c.K, group);
      } catch (const std::exception& e) {
        fail_row("uploadQuantized", sh, e.what());
        continue;
      }
      run_case(name, sh, [&] {
        auto x = rng.floats(c.T * (c.gated ? 2 : 1) * c.K, -1, 1), y = rng.floats(c.T * c.K, -1, 1),
             nw = rng.floats(c.K, 0.5f, 1.5f);
        const Shape xs{c.T, (c.gated ? 2 : 1) * c.K};
        const auto run = [&](Backend& b, const Tensor& wq) {
          Tensor in = up(b, x, xs);
          if (c.norm) in = b.add_rms_norm(in, up(b, y, xs), up(b, nw, {c.K}), 1e-5f).normed;
          return down(b, c.pairs ? b.matmul_silu_mul(in, wq) : c.gated ? b.silu_mul_matmul(in, wq) : b.matmul(in, wq));
        };
        compare(name, sh, run(*gpu, w.gpu_w), run(*cpu, w.cpu_w), quant_rtol(dt, c.K, group, c.T));
      });
    }
  }
}

// Quantized prefill attention (cuda/attention-sage.cuh): CUDA against the CPU reference, which quantizes the same
// way (the same K means, codes and scales: the int32 scores agree exactly), so they differ by exp2's rounding and
// the order of the tensor cores' f32 sums, plus a rare flip of one P rounding (f16: 2^-11 relative of one weight;
// e4m3: 2^-4): bounds 2e-4 (f16 P V) and 1e-2 (e4m3) of max|out|. H200 measured 1.5e-3 and, on other random inputs
// of the same case, 3.7e-3 (a flip of a larger weight): a few flips fit under 1e-2; a wrong tile, scale or code
// costs O(1). And against the exact kernel, as a sanity
// bound on the approximation at inputs in [-1, 1] (the CPU unit test measures it: test/unit/sage-attention.test.ts).
// Paged bf16 / fp8 caches, K with a common offset (what the smoothing removes), GQA, chunked and ragged steps.
void check_sage(Rng& rng) {
  const int64_t S = 3, C = 1024, B = 16, per_seq = C / B, n_blocks = S * per_seq + 2;
  struct Cfg {
    int64_t T, nH, nKv, hd;
    DType kv;
    const char* kind;  // "chunk": sequence 1 after 200 cached positions; "causal": a fresh prompt; "ragged": two
  };
  // The last two: 72 heads x 8 tiles of 128 rows (80 x 7) fill two rounds of an H200's block slots, so the kernel
  // takes two m16 tiles of rows a warp (attention-sage.cu), as for long prompts.
  for (Cfg c : {Cfg{300, 32, 8, 128, DType::BF16, "chunk"}, Cfg{200, 32, 32, 128, DType::BF16, "causal"},
                Cfg{300, 16, 4, 64, DType::BF16, "ragged"}, Cfg{130, 32, 8, 128, DType::FP8, "chunk"},
                Cfg{1024, 72, 8, 128, DType::BF16, "causal"}, Cfg{800, 80, 8, 128, DType::BF16, "ragged"}})
    for (DType pv : {DType::F16, DType::FP8}) {
      const int64_t hd = c.hd;
      std::string sh = std::string(dtype_name(c.kv)) + " T=" + std::to_string(c.T) + " " + std::to_string(c.nH) + "/" +
                       std::to_string(c.nKv) + "x" + std::to_string(hd) + " " + c.kind + " pv " + dtype_name(pv);
      run_case("sageAttention", sh, [&] {
        const std::vector<int32_t> rows = scattered_blocks(rng, n_blocks, S * per_seq);
        const Shape cs{n_blocks, c.nKv, B, hd};
        std::vector<int32_t> all_seq(S * C), all_pos(S * C);
        for (int64_t i = 0; i < S * C; ++i) {
          all_seq[i] = static_cast<int32_t>(i / C);
          all_pos[i] = static_cast<int32_t>(i % C);
        }
        auto kw = rng.floats(S * C * c.nKv * hd);
        for (size_t i = 0; i < kw.size(); ++i) kw[i] += 2.0f * static_cast<float>(i % 3);  // a common offset per channel
        const auto vw = rng.floats(S * C * c.nKv * hd);
        auto fill = [&](Backend& b) {
          auto kv = std::make_pair(b.zeros(c.kv, cs), b.zeros(c.kv, cs));
          b.write_kv(kv.first, kv.second, up(b, kw, {S * C, c.nKv * hd}), up(b, vw, {S * C, c.nKv * hd}),
                     up_i(b, all_seq), up_table(b, rows, per_seq), up_i(b, all_pos));
          return kv;
        };
        auto gq = fill(*gpu), cq = fill(*cpu);
        std::vector<int32_t> seq(c.T), pos(c.T);
        for (int64_t t = 0; t < c.T; ++t) {
          const bool first = !std::strcmp(c.kind, "ragged") && t < 100;
          seq[t] = !std::strcmp(c.kind, "causal") ? 0 : (first ? 0 : 1);
          pos[t] = static_cast<int32_t>(!std::strcmp(c.kind, "causal") || first ? t : 200 + t);
        }
        const auto q = rng.floats(c.T * c.nH * hd);
        const float scale = 1.0f / std::sqrt(float(hd));
        auto attend = [&](Backend& b, const std::pair<Tensor, Tensor>& kv, bool sage) {
          Tensor qt = up(b, q, {c.T, c.nH * hd}), ts = up_i(b, seq), table = up_table(b, rows, per_seq), ps = up_i(b, pos);
          return down(b, sage ? b.sage_attention(qt, kv.first, kv.second, ts, table, ps, c.nH, scale, pv, nullptr)
                              : b.attention(qt, kv.first, kv.second, ts, table, ps, c.nH, scale));
        };
        const auto got = attend(*gpu, gq, true);
        compare("sageAttention", sh, got, attend(*cpu, cq, true), pv == DType::FP8 ? 1e-2 : 2e-4, 0, "vs cpu");
        compare("sageAttention", sh, got, attend(*gpu, gq, false), 0, pv == DType::FP8 ? 0.08 : 0.02,
                "vs exact on cuda");
      });
    }
}

// bf16 weights at 3..8 tokens (Matmul::split_pays: the smaller matrices from 5) take cuBLAS on x split into bf16
// hi + lo rows (gemm.cuh run_split): the GEMV's 1e-5 against the CPU (hi + lo hold x to ~2^-17), gated and not,
// odd N and K, the 7B down projection and qkv.
void check_matmul_split(Rng& rng) {
  struct Shape2 {
    int64_t N, K;
    bool gated;
  };
  for (Shape2 s : {Shape2{333, 1000, false}, Shape2{4097, 4104, true}, Shape2{4096, 11008, true}, Shape2{12288, 4096, false}})
    for (int64_t T : {3, 4, 5, 8}) {
      std::string sh = "T=" + std::to_string(T) + " K=" + std::to_string(s.K) + " N=" + std::to_string(s.N) + " bf16";
      const char* op = s.gated ? "siluMulMatmul" : "matmul";
      run_case(op, sh, [&] {
        auto w = rng.floats(s.N * s.K);
        auto x = rng.floats(T * s.K * (s.gated ? 2 : 1), -4, 4);
        const Shape xs{T, s.gated ? 2 * s.K : s.K};
        auto product = [&](Backend& b) {
          return s.gated ? down(b, b.silu_mul_matmul(up(b, x, xs), up_narrow(b, w, {s.N, s.K}, DType::BF16)))
                         : down(b, b.matmul(up(b, x, xs), up_narrow(b, w, {s.N, s.K}, DType::BF16)));
        };
        compare(op, sh, product(*gpu), product(*cpu), 1e-5);
      });
    }
}

// WEFT_OPS_CHECK_ONLY=sparq,errors runs the named checks alone (their inputs then differ from a whole run's draws).
bool wanted(const char* name) {
  const char* only = std::getenv("WEFT_OPS_CHECK_ONLY");
  if (!only || !*only) return true;
  const std::string list = std::string(",") + only + ",";
  return list.find(std::string(",") + name + ",") != std::string::npos;
}

int main() {
  auto t0 = std::chrono::steady_clock::now();
  try {
    cpu = make_cpu_backend(16);
    CudaOptions o;
    o.arena_bytes = size_t{3} << 30;
    o.poison = true;
    gpu = make_cuda_backend(o);
  } catch (const std::exception& e) {
    std::printf("weft_ops_check: cannot start: %s\n", e.what());
    return 2;
  }
  Rng rng(20261123);
  if (wanted("elementwise")) check_elementwise(rng);
  if (wanted("matmul")) check_matmul(rng);
  if (wanted("matmul_7b_shapes")) check_matmul_7b_shapes(rng);
  if (wanted("quant_matmul")) check_quant_matmul(rng);
  if (wanted("quant_moe")) check_quant_moe(rng);
  if (wanted("quant_gemv_tokens")) check_quant_gemv_tokens(rng);
  if (wanted("one_token_matmul")) check_one_token_matmul(rng);
  if (wanted("quant_tiles")) check_quant_tiles(rng);
  if (wanted("prefill_inputs")) check_prefill_inputs(rng);
  if (wanted("moe")) check_moe(rng);
  if (wanted("attention")) check_attention(rng);
  if (wanted("paged")) check_paged(rng);
  if (wanted("kv_bf16")) check_kv_bf16(rng);
  if (wanted("kv_quant")) check_kv_quant(rng);
  if (wanted("softmax_sample")) check_softmax_sample(rng);
  if (wanted("top_logprobs")) check_top_logprobs(rng);
  if (wanted("random")) check_random();
  if (wanted("fused")) check_fused(rng);
  if (wanted("graph")) check_graph(rng, false, 2048);
  if (wanted("graph")) check_graph(rng, true, 2048);
  if (wanted("graph")) check_graph(rng, true, 16);
  if (wanted("graph")) check_graph(rng, true, 16, DType::BF16);
  if (wanted("graph")) check_graph(rng, false, 2048, DType::BF16);
  if (wanted("sparq")) check_sparq(rng);
  if (wanted("errors")) check_errors();
  if (wanted("attention_bifurcated")) check_attention_bifurcated(rng);
  if (wanted("sage")) check_sage(rng);
  if (wanted("attention_decode_long")) check_attention_decode_long(rng);  // last: the checks before it draw the same random inputs as before
  if (wanted("matmul_split")) check_matmul_split(rng);
  if (wanted("attention_decode_batch")) check_attention_decode_batch(rng);
  auto mi = gpu->memory_info();
  int failed = 0;
  std::printf("%-20s %-34s %12s %12s  %s\n", "op", "shape", "max err", "bound", "result");
  for (const Row& r : rows) {
    failed += !r.pass;
    std::printf("%-20s %-34s %12.3g %12.3g  %s%s%s\n", r.op.c_str(), r.shape.c_str(), r.err, r.bound,
                r.pass ? "pass" : "FAIL", r.note.empty() ? "" : "  ", r.note.c_str());
  }
  try {
    std::printf("read bandwidth: %.0f GB/s (1 GiB, best of 10)\n", gpu->measure_bandwidth(size_t{1} << 30, 10));
  } catch (const std::exception& e) {
    std::printf("read bandwidth: %s\n", e.what());
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%zu checks, %d failed, %.1f s; device memory free %.1f of %.1f GiB\n", rows.size(), failed, secs,
              mi.free / 1073741824.0, mi.total / 1073741824.0);
  return failed ? 1 : 0;
}
