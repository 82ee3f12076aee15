// Sampling on the device: the rule of sample-rule.h (shared with the CPU backend) without sorting the vocabulary.
//
// Greedy rows (temperature <= 0) are the argmax with the lowest index on ties: exactly the CPU's answer.
// Other rows: z = sample_z (fp32, -0 made +0), p = sample_weight (exp(z - max) in double). The CPU
// sorts by (z descending, index ascending) and keeps a prefix; every prefix of that order is a set
//   {z > tau} + {the first n indices with z == tau}
// for a threshold value tau, so the kernel finds the prefixes by threshold search instead of sorting:
//  - topK (0 < K < V): tau_K = the K-th largest z by a 4-pass radix select on the order-preserving bits of z,
//    and the tie cut-off index among z == tau_K;
//  - topP < 1: the same radix select on probability mass over the topK-kept set finds the value where the
//    cumulative mass (in the CPU's order) first reaches topP * sum; the ties at that value are all equally
//    likely, so the CPU's count of kept ties is ceil(remaining mass / p of one tie);
//  - the pick: inverse CDF over the kept set in *index* order (the CPU walks it in sorted order): the same
//    distribution, a different map from `uniform` to a token. When rounding leaves no pick (uniform = 1),
//    the highest kept index is taken (the CPU takes its last kept candidate).
// Bad arguments (NaN temperature or logits, topK < 0, topP or uniform outside [0, 1]) give token 0 and a
// device report, thrown at the next synchronising call.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/sample.cuh"
#include "sample-rule.h"

namespace weft::cuda {
namespace {

constexpr int kThreads = 512;

// Order-preserving map of floats to unsigned keys: a > b  <=>  key(a) > key(b) (no NaN here).
__device__ __forceinline__ uint32_t order_key(float z) {
  uint32_t b = __float_as_uint(z);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct ArgMax {
  float v;
  int i;
};
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
  }
};

struct MaxInt {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

struct Row {
  const float* logits;
  int V;
  float temperature;
  float z_max;
  // The kept set: key > tau || (key == tau && index <= cut); tau 0 with cut V keeps everything.
  uint32_t tau_k = 0, tau_p = 0;
  int cut_k, cut_p;

  __device__ float z(int i) const { return sample_z(logits[i], temperature); }
  __device__ double p_of(float zi) const { return sample_weight(zi, z_max); }
  __device__ bool kept_k(uint32_t key, int i) const { return key > tau_k || (key == tau_k && i <= cut_k); }
  __device__ bool kept(uint32_t key, int i) const {
    return kept_k(key, i) && (key > tau_p || (key == tau_p && i <= cut_p));
  }
};

using Reduce = cub::BlockReduce<double, kThreads>;
using ReduceInt = cub::BlockReduce<int, kThreads>;
using ReduceArg = cub::BlockReduce<ArgMax, kThreads>;
using ScanInt = cub::BlockScan<int, kThreads>;
using ScanDouble = cub::BlockScan<double, kThreads>;

struct Shared {
  union {
    typename Reduce::TempStorage reduce;
    typename ReduceInt::TempStorage reduce_int;
    typename ReduceArg::TempStorage reduce_arg;
    typename ScanInt::TempStorage scan_int;
    typename ScanDouble::TempStorage scan_double;
  } cub;
  int count[256];
  double mass[256];
  uint32_t prefix, mask;
  double remaining_mass;
  int remaining, result;
  float f;
  double d;
};

// Index of the n-th (1-based) index i in [0, V) with pred(i), in index order; -1 if there are fewer.
template <typename Pred>
__device__ int find_nth(Shared& sh, int V, int n, Pred pred) {
  int chunk = (V + kThreads - 1) / kThreads, begin = threadIdx.x * chunk, end = min(V, begin + chunk);
  int count = 0;
  for (int i = begin; i < end; ++i) count += pred(i);
  int before;
  if (threadIdx.x == 0) sh.result = -1;
  ScanInt(sh.cub.scan_int).ExclusiveSum(count, before);
  __syncthreads();
  if (before < n && before + count >= n) {
    int seen = before;
    for (int i = begin; i < end; ++i)
      if (pred(i) && ++seen == n) {
        sh.result = i;
        break;
      }
  }
  __syncthreads();
  return sh.result;
}

// Radix select from the top over keys of the indices where member(i): returns the key tau at which the
// running weight (count, or mass when by_mass) first reaches `target`, and leaves the weight still needed
// among the elements equal to tau in sh.remaining / sh.remaining_mass.
template <typename Member>
__device__ uint32_t radix_select(Shared& sh, const Row& row, bool by_mass, int target, double target_mass,
                                 Member member) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.mask = 0;
    sh.remaining = target;
    sh.remaining_mass = target_mass;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) {
      sh.count[b] = 0;
      sh.mass[b] = 0;
    }
    __syncthreads();
    uint32_t prefix = sh.prefix, mask = sh.mask;
    for (int i = threadIdx.x; i < row.V; i += kThreads) {
      float zi = row.z(i);
      uint32_t key = order_key(zi);
      if ((key & mask) != prefix || !member(key, i)) continue;
      int digit = (key >> shift) & 0xff;
      atomicAdd(&sh.count[digit], 1);
      if (by_mass) atomicAdd(&sh.mass[digit], row.p_of(zi));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int chosen = -1, lowest = -1;
      int above = 0;
      double above_mass = 0;
      for (int d = 255; d >= 0; --d) {
        if (sh.count[d] == 0) continue;
        lowest = d;
        bool reached = by_mass ? above_mass + sh.mass[d] >= sh.remaining_mass : above + sh.count[d] >= sh.remaining;
        if (reached) {
          chosen = d;
          break;
        }
        above += sh.count[d];
        above_mass += sh.mass[d];
      }
      if (chosen < 0) {  // rounding left the target out of reach: take the lowest digit (everything)
        chosen = lowest < 0 ? 0 : lowest;
        above -= lowest < 0 ? 0 : sh.count[chosen];
        above_mass -= lowest < 0 ? 0 : sh.mass[chosen];
      }
      sh.remaining -= above;
      sh.remaining_mass -= above_mass;
      sh.prefix |= static_cast<uint32_t>(chosen) << shift;
      sh.mask |= 0xffu << shift;
    }
    __syncthreads();
  }
  return sh.prefix;
}

__global__ void __launch_bounds__(kThreads)
    sample_rows(const float* __restrict__ logits, int V, const float* __restrict__ temperature,
                const int32_t* __restrict__ top_k, const float* __restrict__ top_p,
                const float* __restrict__ uniform, int32_t* __restrict__ out, DeviceStatus* status) {
  pdl_trigger();
  pdl_wait();
  __shared__ Shared sh;
  int r = blockIdx.x;
  Row row;
  row.logits = logits + size_t(r) * V;
  row.V = V;
  row.temperature = temperature[r];
  int k = top_k[r];
  float tp = top_p[r], u = uniform[r];
  if (isnan(row.temperature) || k < 0 || !(tp >= 0 && tp <= 1) || !(u >= 0 && u <= 1)) {
    if (threadIdx.x == 0) {
      report(status, StatusOp::SampleArgs, r, 0, 0);
      out[r] = 0;
    }
    return;
  }
  // Argmax (greedy) and a NaN check in one pass.
  ArgMax best{-INFINITY, 0x7fffffff};
  int nan = 0;
  const auto see = [&](float v, int i) {
    nan |= isnan(v);
    if (v > best.v || (v == best.v && i < best.i)) best = {v, i};
  };
  if (V % 4 == 0) {  // 16-byte rows: float4 loads, several in flight (one block reads the whole vocabulary)
    const float4* l4 = reinterpret_cast<const float4*>(row.logits);
#pragma unroll 4
    for (int j = threadIdx.x; j < V / 4; j += kThreads) {
      const float4 v = l4[j];
      see(v.x, 4 * j), see(v.y, 4 * j + 1), see(v.z, 4 * j + 2), see(v.w, 4 * j + 3);
    }
  } else {
    for (int i = threadIdx.x; i < V; i += kThreads) see(row.logits[i], i);
  }
  nan = ReduceInt(sh.cub.reduce_int).Sum(nan);
  if (threadIdx.x == 0) sh.remaining = nan;
  __syncthreads();
  if (sh.remaining) {
    if (threadIdx.x == 0) {
      report(status, StatusOp::SampleNan, r, 0, 0);
      out[r] = 0;
    }
    return;
  }
  ArgMax top = ReduceArg(sh.cub.reduce_arg).Reduce(best, ArgMaxOp());
  if (threadIdx.x == 0) sh.result = top.i;
  __syncthreads();
  if (sample_greedy(row.temperature)) {
    if (threadIdx.x == 0) out[r] = sh.result;
    return;
  }
  // Division by a positive temperature keeps the order, so the max z is z of the argmax.
  row.z_max = row.z(sh.result);
  row.cut_k = row.cut_p = V;

  if (k > 0 && k < V) {
    row.tau_k = radix_select(sh, row, false, k, 0.0, [](uint32_t, int) { return true; });
    int ties = sh.remaining;
    uint32_t tau = row.tau_k;
    row.cut_k = find_nth(sh, V, ties, [&](int i) { return order_key(row.z(i)) == tau; });
  }
  if (tp < 1) {
    double sum = 0;
    for (int i = threadIdx.x; i < V; i += kThreads) {
      float zi = row.z(i);
      if (row.kept_k(order_key(zi), i)) sum += row.p_of(zi);
    }
    sum = Reduce(sh.cub.reduce).Sum(sum);
    if (threadIdx.x == 0) sh.d = sum;
    __syncthreads();
    double target = static_cast<double>(tp) * sh.d;
    Row& rw = row;
    uint32_t tau = radix_select(sh, row, true, 0, target, [&](uint32_t key, int i) { return rw.kept_k(key, i); });
    double need = sh.remaining_mass;
    double p_tie = row.p_of(key_value(tau));
    int ties = 0;
    for (int i = threadIdx.x; i < V; i += kThreads) {
      uint32_t key = order_key(row.z(i));
      ties += key == tau && row.kept_k(key, i);
    }
    ties = ReduceInt(sh.cub.reduce_int).Sum(ties);
    if (threadIdx.x == 0) sh.remaining = ties;
    __syncthreads();
    ties = sh.remaining;
    int n = ties;
    if (p_tie > 0 && need > 0) n = static_cast<int>(min(static_cast<double>(ties), ceil(need / p_tie)));
    if (need <= 0) n = 1;
    n = max(1, min(n, ties));
    row.tau_p = tau;
    row.cut_p = find_nth(sh, V, n, [&](int i) {
      uint32_t key = order_key(row.z(i));
      return key == tau && row.kept_k(key, i);
    });
  }

  // Inverse CDF over the kept set in index order.
  int chunk = (V + kThreads - 1) / kThreads, begin = threadIdx.x * chunk, end = min(V, begin + chunk);
  double local = 0;
  int last = -1;
  for (int i = begin; i < end; ++i) {
    float zi = row.z(i);
    if (row.kept(order_key(zi), i)) {
      local += row.p_of(zi);
      last = i;
    }
  }
  double before, total;
  ScanDouble(sh.cub.scan_double).ExclusiveSum(local, before, total);
  if (threadIdx.x == 0) sh.result = -1;
  __syncthreads();
  double threshold = sample_threshold(u, total);
  if (local > 0 && before <= threshold && before + local > threshold) {
    double cumulative = before;
    int pick = last;
    for (int i = begin; i < end; ++i) {
      float zi = row.z(i);
      if (!row.kept(order_key(zi), i)) continue;
      cumulative += row.p_of(zi);
      if (cumulative > threshold) {
        pick = i;
        break;
      }
    }
    sh.result = pick;
  }
  __syncthreads();
  int picked = sh.result;
  if (picked < 0) {
    int highest = ReduceInt(sh.cub.reduce_int).Reduce(last, MaxInt());
    if (threadIdx.x == 0) out[r] = highest < 0 ? sh.result : highest;
    return;
  }
  if (threadIdx.x == 0) out[r] = picked;
}

}  // namespace

void launch_sample(const Ctx& ctx, const char* op, const Tensor& logits, const Tensor& temperature,
                   const Tensor& top_k, const Tensor& top_p, const Tensor& uniform, const Tensor& out) {
  int64_t R = logits.dim(0), V = logits.dim(1);
  if (R == 0) return;
  WEFT_CHECK(V < (int64_t{1} << 31), op, "logits ", logits, " has too many columns");
  launch_pdl(ctx, sample_rows, static_cast<unsigned>(R), kThreads, 0, logits.data<float>(), static_cast<int>(V),
             temperature.data<float>(), top_k.data<int32_t>(), top_p.data<float>(), uniform.data<float>(),
             out.data<int32_t>(), ctx.status);
  check_launch(ctx, op, {{"logits", logits}});
}

}  // namespace weft::cuda
