// Quantized prefill attention (attention-sage.cuh states the algorithm; cpu/attention-sage.cc is the reference):
// the pre-pass (attention-sage-prepass.cu) writes int8 smoothed K and the V operand, then the tensor-core kernel
// here reads 1-byte K (and 1-byte V in fp8 mode) instead of the cache's rows and converts nothing in its loop.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "cuda/attention-query-tiles.cuh"
#include "cuda/attention-sage.cuh"
#include "cuda/attention.cuh"
#include "cuda/kv-block-table.cuh"
#include "cuda/wgmma.cuh"

namespace weft::cuda {
namespace {

using detail::SageScratch;
using detail::SageSeqOperands;
constexpr int kThreads = 128;
constexpr int kB = kSageBlock;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

// ---- the tensor-core kernel

// c += a b, m16n8k32, s8 inputs, s32 accumulators.
WEFT_DEFINE_MMA_M16N8(mma_s8, "m16n8k32.row.col.s32.s8.s8.s32", int, "r")
// c += a b, m16n8k32, e4m3 inputs, f32 accumulators (sm_89+).
WEFT_DEFINE_MMA_M16N8(mma_e4m3, "m16n8k32.row.col.f32.e4m3.e4m3.f32", float, "f")
// Four f32 -> e4m3 (round to nearest even, saturating: f32_to_e4m3's rule), x0 in the low byte.
__device__ __forceinline__ uint32_t pack_e4m3(float x0, float x1, float x2, float x3) {
  uint16_t lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(x1), "f"(x0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(x3), "f"(x2));
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// WG: the wgmma form (fp8 mode, head dim 128, one m-tile): K and the transposed e4m3 V stored unpadded in the
// swizzled rows wgmma reads (128 and 64 bytes), the stages 1024-byte aligned (the slack at the end), the Q codes
// after them.
template <int HD, bool FP8, int MT, bool WG = false>
struct SageLayout {
  static constexpr int kLdQ = HD + 16;                          // bytes per Q code row (ldmatrix without bank conflicts)
  static constexpr int kLdK = WG ? HD : HD + 16;                // bytes per K row
  static constexpr int kLdV = WG ? kB : FP8 ? kB + 16 : (HD + 8) * 2;  // bytes per V row: [hd][64 slots] e4m3, [64][hd] f16
  static constexpr int kVRows = FP8 ? HD : kB;
  static constexpr size_t kK = size_t{kB} * kLdK;
  static constexpr size_t kV = size_t{kVRows} * kLdV;
  // MT = 2 reads the Q codes from shared memory at every tile (their registers would spill), after the stages
  static constexpr size_t kQ = MT == 1 && !WG ? 0 : size_t{16 * MT * kWarps} * kLdQ;
  static constexpr size_t kBytes = 2 * (kK + kV) + kQ + (WG ? 1024 : 0);  // two stages of each
};

// grid (nH, ceil(T / BQ)), 4 warps of MT m16 tiles of query rows each (BQ = 64 MT rows a block); the plan of
// attention-prefill.cu's tensor-core kernel. MT = 2 gives each K and V fragment read from shared memory to two mma
// and each warp two independent chains of them: at two warps a scheduler (228 registers) the kernel waited on its
// own dependences, not on a pipe (ncu: issue slots 38% busy, the tensor pipe 36%). Each m-tile's arithmetic is
// MT = 1's, in the same order.
template <int HD, bool FP8, int MT, bool WG = false, int kBlocksPerSm = 2>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    sage_attention_mma(const float* __restrict__ q, const SageSeqOperands* __restrict__ seq_ops, KvBlockTable kv,
                       const int32_t* __restrict__ token_seq, const int32_t* __restrict__ positions, int T, int nH,
                       float qscale, float* __restrict__ out, DeviceStatus* status) {
  static_assert(!WG || (FP8 && HD == 128 && MT == 1), "the wgmma form: fp8 mode, head dim 128, one m-tile");
  static_assert(kBlocksPerSm == 2 || (WG && kBlocksPerSm == 3), "three blocks an SM: the wgmma form (168 registers)");
  using L = SageLayout<HD, FP8, MT, WG>;
  constexpr int KT = HD / 32, NO = HD / 8, NS = kB / 8, BQ = 16 * MT * kWarps;
  constexpr int KCH = kB * HD / 16 / kThreads;                         // 16-byte chunks per thread: K tile
  constexpr int VCH = int(size_t{kB} * HD * (FP8 ? 1 : 2) / 16 / kThreads);  // and V tile
  constexpr int VCPR = FP8 ? kB / 16 : HD * 2 / 16;                    // chunks per V tile row
  extern __shared__ __align__(16) unsigned char sage_smem[];
  __shared__ int tok_seq[BQ], tok_pos[BQ], tok_done[BQ];
  __shared__ int cur_seq, cur_tok, kv_end;
  unsigned char* const base = WG ? sage_smem + ((1024 - (smem_u32(sage_smem) & 1023)) & 1023) : sage_smem;
  auto k_tile = [&](int buf) { return base + buf * L::kK; };
  auto v_tile = [&](int buf) { return base + 2 * L::kK + buf * L::kV; };
  // the Q codes: in the K stages until the A fragments are loaded (MT = 1), or a region of their own (MT = 2, WG)
  unsigned char* const q_codes = MT == 1 && !WG ? base : base + 2 * (L::kK + L::kV);

  const int h = blockIdx.x, t0 = (gridDim.y - 1 - blockIdx.y) * BQ, G = static_cast<int>(kv.n_kv), g = h / (nH / G);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, tq = lane & 3;

  load_tile_tokens(BQ, t0, T, kv, token_seq, positions, nH, h, HD, out, status, tok_seq, tok_pos, tok_done);
  // Q: one scale for each 64 rows of head h (the tiles of the CPU reference); int8 codes -> the K stages -> A fragments.
  float sq;
  {
    constexpr int QV = BQ * HD / 4 / kThreads, R = kThreads / (HD / 4), QT = BQ / kB;  // R: rows a float4 step
    static_assert(kB % R == 0 && QT <= 2, "a float4 step's rows lie in one 64-row tile; at most two tiles");
    // tile_red[qt][w]: warp w's largest |q| in 64-row tile qt
    __shared__ float tile_red[QT][kWarps];
    float4 x[QV];
    float amax[QT];
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) amax[qt] = 0;
#pragma unroll
    for (int i = 0; i < QV; ++i) {
      const int c = i * kThreads + tid, row = c / (HD / 4), col = (c % (HD / 4)) * 4, t = t0 + row;
      x[i] = t < T ? *reinterpret_cast<const float4*>(q + (size_t(t) * nH + h) * HD + col) : make_float4(0, 0, 0, 0);
      float& a = amax[i * R / kB];
      a = fmaxf(a, fmaxf(fmaxf(fabsf(x[i].x), fabsf(x[i].y)), fmaxf(fabsf(x[i].z), fabsf(x[i].w))));
    }
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax[qt] = fmaxf(amax[qt], __shfl_xor_sync(0xffffffffu, amax[qt], o));
      if (lane == 0) tile_red[qt][warp] = amax[qt];
    }
    __syncthreads();
    KvRowScale ts[QT];
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
      float m = tile_red[qt][0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) m = fmaxf(m, tile_red[qt][w]);
      ts[qt] = kv_row_scale(m, kInt8Max);
    }
    sq = QT == 1 || warp * MT * 16 < kB ? ts[0].scale : ts[QT - 1].scale;  // a warp's rows lie in one tile
#pragma unroll
    for (int i = 0; i < QV; ++i) {
      const int c = i * kThreads + tid, row = c / (HD / 4), col = (c % (HD / 4)) * 4;
      const float inv = ts[i * R / kB].inv;
      auto code = [&](float v) { return uint32_t(uint8_t(f32_to_int8_code(__fmul_rn(v, inv)))); };
      *reinterpret_cast<uint32_t*>(q_codes + row * L::kLdQ + col) =
          code(x[i].x) | (code(x[i].y) << 8) | (code(x[i].z) << 16) | (code(x[i].w) << 24);
    }
  }
  __syncthreads();
  // the lane's ldmatrix address of m-tile m's Q codes (A fragments: 16 rows of 32-byte k steps)
  auto q_addr = [&](int m) {
    return smem_u32(q_codes + ((warp * MT + m) * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * L::kLdQ + 16 * (lane >> 4));
  };
  uint32_t qf[1][KT][4];  // MT = 1: the warp's Q fragments, held
  if constexpr (MT == 1) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qf[0][kk], q_addr(0) + kk * 32);
  }
  // m-tile m's A fragment of k step kk: held (MT = 1), or read from q_codes at every tile (MT = 2)
  auto q_frag = [&](int m, int kk, uint32_t (&a)[4]) {
    if constexpr (MT == 1)
      held_frags(qf)(m, kk, a);
    else
      ldmatrix_x4(a, q_addr(m) + kk * 32);
  };
  // ldmatrix lane offsets: K and transposed-e4m3 V (B operands, n rows of 16-byte halves), f16 V (transposed).
  const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 16 * ((lane >> 3) & 1);
  const uint32_t k_off = b_row * L::kLdK + b_col;
  const uint32_t v_off = FP8 ? b_row * L::kLdV + b_col
                             : (((lane & 7) + 8 * ((lane >> 3) & 1)) * (HD + 8) + 8 * (lane >> 4)) * 2;

  for (;;) {
    __syncthreads();  // also: every warp has its Q fragments before k_tile(0) is overwritten
    next_pass(BQ, t0, tok_seq, tok_pos, tok_done, &cur_seq, &cur_tok, &kv_end);
    __syncthreads();
    const int seq = cur_seq, end = kv_end;
    if (seq < 0) break;
    // kv head g's tiles of this sequence (the step's scratch or its state slot)
    const SageSeqOperands& op = seq_ops[seq];
    const unsigned char* const k8 = op.k8 + g * op.k8_head;
    const unsigned char* const v_op = op.v + g * op.v_head;
    const unsigned char* const k_scale = op.scales + g * op.sc_head;
    const int64_t k8_tile = op.k8_tile, v_tile_bytes = op.v_tile, sc_tile = op.sc_tile, v_scale_off = op.v_scale_off;
    PassRows rows[MT];
    int wmin, wmax;
    warp_pass_rows(rows, wmin, wmax, warp, gr, seq, tok_seq, tok_pos, tok_done);
    auto fetch = [&](int j, int buf) {
      const unsigned char* ks = k8 + j * k8_tile;
      const unsigned char* vs = v_op + j * v_tile_bytes;
#pragma unroll
      for (int i = 0; i < KCH; ++i) {
        const int c = i * kThreads + tid, r = c / (HD / 16), ch = c % (HD / 16);
        const int at = WG ? r * L::kLdK + ((ch ^ (r & 7)) << 4) : r * L::kLdK + ch * 16;  // WG: 128-byte swizzle
        cp_async16(smem_u32(k_tile(buf) + at), ks + c * 16, 16);
      }
#pragma unroll
      for (int i = 0; i < VCH; ++i) {
        const int c = i * kThreads + tid, r = c / VCPR, ch = c % VCPR;
        const int at = WG ? r * L::kLdV + ((ch ^ ((r >> 1) & 3)) << 4) : r * L::kLdV + ch * 16;  // WG: 64-byte swizzle
        cp_async16(smem_u32(v_tile(buf) + at), vs + c * 16, 16);
      }
      cp_async_commit();
    };

    float o_acc[MT][NO][4];
    float m0[MT], m1[MT], l0[MT], l1[MT], c_prev = 1.0f;  // c: fp8 mode's o_acc unit
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int n = 0; n < NO; ++n) o_acc[m][n][0] = o_acc[m][n][1] = o_acc[m][n][2] = o_acc[m][n][3] = 0;
      m0[m] = m1[m] = -INFINITY;
      l0[m] = l1[m] = 0;
    }
    const int n_tiles = (end + kB - 1) / kB;
    fetch(0, 0);
    for (int j = 0; j < n_tiles; ++j) {
      const int kv0 = j * kB, buf = j & 1;
      if (j + 1 < n_tiles) {
        fetch(j + 1, buf ^ 1);
        cp_async_wait(true);
      } else {
        cp_async_wait_all();
      }
      if constexpr (WG) wgmma::fence_proxy_async();  // this thread's copies, visible to wgmma's reads
      // warp-uniform: some row of this warp attends to a key of this tile (WG: of any warp, the warpgroup's MMAs)
      const bool attends = WG ? __syncthreads_or(kv0 <= wmax) : (__syncthreads(), kv0 <= wmax);
      if (attends) {
        const uint32_t kb = smem_u32(k_tile(buf)) + k_off, vb = smem_u32(v_tile(buf)) + v_off;
        int si[MT][NS][4];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < NS; ++n) si[m][n][0] = si[m][n][1] = si[m][n][2] = si[m][n][3] = 0;
        if constexpr (WG) {
          const uint64_t kd = wgmma::desc(smem_u32(k_tile(buf)), 8 * L::kLdK, wgmma::kSwizzle128);
          wgmma::fence_operands(si[0]);
          wgmma::fence();
#pragma unroll
          for (int kk = 0; kk < KT; ++kk) wgmma::mma_s8_m64n64k32(si[0], qf[0][kk], kd + 2 * kk, true);
          wgmma::commit();
          wgmma::wait_all();
          wgmma::fence_operands(si[0]);
        } else {
          mma_tile_pairs<KT, NS / 2, false, mma_s8, MT>(si, q_frag,
                                                        [&](int kk, int np) { return kb + np * 16 * L::kLdK + kk * 32; });
        }
        // __ldg: a pointer read from the descriptors is not known to be global, and a generic load sat in the
        // tile's dependence chain
        const float f = __fmul_rn(__fmul_rn(sq, __ldg(reinterpret_cast<const float*>(k_scale + j * sc_tile))), qscale);
        float ratio = 1.0f;
        if constexpr (FP8) {  // o_acc in units of this tile's c = vscale / 448: rescale by c_prev / c
          const float vs = __ldg(reinterpret_cast<const float*>(k_scale + v_scale_off + j * sc_tile));
          const float c = (vs > 0 ? vs : 1.0f) * (1.0f / kFp8Max);
          ratio = c_prev / c;
          c_prev = c;
        }
        using Weights = std::conditional_t<FP8, uint32_t[2][4], uint32_t[NS / 2][4]>;
        Weights pw[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          float s[NS][4];
#pragma unroll
          for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = __fmul_rn(float(si[m][n][e]), f);
          if (kv0 + kB - 1 > wmin) {  // causal mask only where a key passes some row's position (as the exact kernel)
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                if (kv0 + n * 8 + 2 * tq + (e & 1) > (e < 2 ? rows[m].pos0 : rows[m].pos1)) s[n][e] = -INFINITY;
          }
          const SoftmaxRows st = softmax_weights(s, m0[m], m1[m], l0[m], l1[m], [](int) {});  // s: the weights P
          m0[m] = st.m0;
          m1[m] = st.m1;
          l0[m] = st.l0;
          l1[m] = st.l1;
          scale_o_rows(o_acc[m], st.alpha0 * ratio, st.alpha1 * ratio);
          if constexpr (FP8) {
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
              const int n = 4 * kk;
              auto p = [&](int nn, int e) { return s[n + nn][e] * kFp8Max; };
              pw[m][kk][0] = pack_e4m3(p(0, 0), p(0, 1), p(1, 0), p(1, 1));
              pw[m][kk][1] = pack_e4m3(p(0, 2), p(0, 3), p(1, 2), p(1, 3));
              pw[m][kk][2] = pack_e4m3(p(2, 0), p(2, 1), p(3, 0), p(3, 1));
              pw[m][kk][3] = pack_e4m3(p(2, 2), p(2, 3), p(3, 2), p(3, 3));
            }
          } else {
#pragma unroll
            for (int n = 0; n < NS; ++n) {
              pw[m][n / 2][(n & 1) * 2] = pack_f16(s[n][0], s[n][1]);
              pw[m][n / 2][(n & 1) * 2 + 1] = pack_f16(s[n][2], s[n][3]);
            }
          }
        }
        if constexpr (WG) {
          const uint64_t vd = wgmma::desc(smem_u32(v_tile(buf)), 8 * L::kLdV, wgmma::kSwizzle64);
          wgmma::fence_operands(o_acc[0]);
          wgmma::fence();
          wgmma::mma_e4m3_m64n128k64(o_acc[0], pw[0][0], pw[0][1], vd);
          wgmma::commit();
          wgmma::wait_all();  // no fence_operands after it: ptxas took that for a read inside the stage and serialised
        } else if constexpr (FP8)
          mma_tile_pairs<2, NO / 2, false, mma_e4m3, MT>(o_acc, held_frags(pw),
                                                         [&](int kk, int dp) { return vb + dp * 16 * L::kLdV + kk * 32; });
        else
          mma_pv<NS, NO, HD + 8, MT>(o_acc, pw, vb);
      }
      __syncthreads();  // every warp is done with this stage before the next fetch overwrites it
    }

#pragma unroll
    for (int m = 0; m < MT; ++m)
      finish_pass<HD>(o_acc[m], l0[m], l1[m], FP8 ? c_prev : 1.0f, rows[m], tq, BQ, t0, nH, h, seq, tok_seq, tok_done,
                      out);
  }
}

// Whether the wgmma form runs three blocks an SM (168 registers a thread) rather than two (224): its blocks are
// then about 1.3x slower each (H100: 16K fresh prompt, 3.80 ms for 1.5x the blocks at once against 4.40), so three
// pays where it takes fewer rounds of the SMs' block slots by more than that.
bool three_blocks_an_sm(int64_t blocks, int num_sms) {
  const int64_t rounds2 = (blocks + 2 * num_sms - 1) / (2 * num_sms), rounds3 = (blocks + 3 * num_sms - 1) / (3 * num_sms);
  return 13 * rounds3 < 10 * rounds2;
}

template <int HD, bool FP8>
void launch_sage(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                 const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions, int64_t n_heads,
                 float scale, const Tensor& out, unsigned char* scratch, int num_sms, const SageStateArgs& state,
                 int64_t seqs) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int T = static_cast<int>(q.dim(0));
  const SageScratch sc = SageScratch::of(kv.n_seqs, kv.n_kv, kv.capacity(), HD, FP8, seqs);
  const auto* seq_ops = reinterpret_cast<const SageSeqOperands*>(scratch + sc.operands);

  detail::launch_sage_prepass(ctx, k_cache, v_cache, token_seq, kv_block_table, positions, FP8, sc, scratch, state);
  auto launch = [&](auto kernel, auto layout, int BQ) {
    constexpr size_t smem = decltype(layout)::kBytes;
    allow_dynamic_smem(ctx, kernel, smem, "sageAttention");
    dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>((T + BQ - 1) / BQ));
    kernel<<<grid, kThreads, smem, ctx.stream>>>(q.data<float>(), seq_ops, kv, token_seq.data<int32_t>(),
                                                  positions.data<int32_t>(), T, int(n_heads), scale * kLog2e,
                                                  out.data<float>(), ctx.status);
  };
  // fp8 at head dim 128 on wgmma: H100, one Llama-2-7B layer, fresh 32K prompt 17.3 ms against the exact kernel's
  // 35.5 (int8 on mma.sync: 23.1); the last 1024 rows of 32K 2.39 against 2.88 (bench/RESULTS.md, session 36). Three
  // blocks an SM by three_blocks_an_sm's rule (H100, one layer): a fresh 16K prompt 4.40 -> 3.80 ms, the last 1185
  // rows of 32K 1.89 -> 1.58; the last 1024 (512 blocks) stay at two, 1.41 against 1.45 (bench/RESULTS.md, session
  // 42). Two m-tiles a warp by two_m_tiles' rule: H200, one Llama-2-7B layer, fresh 32K prompt 26.0 -> 23.4 ms. Two
  // forced on smaller grids: a TP 4 rank's last 1024 rows over 32K took 1.11 ms against 0.69, a 1185-token chunk
  // 2.78 against 2.63 (bench/RESULTS.md, session 24).
  if constexpr (HD == 128 && FP8) {
    if (three_blocks_an_sm(n_heads * ((T + kB - 1) / kB), num_sms))
      launch(sage_attention_mma<HD, FP8, 1, true, 3>, SageLayout<HD, FP8, 1, true>{}, kB);
    else
      launch(sage_attention_mma<HD, FP8, 1, true>, SageLayout<HD, FP8, 1, true>{}, kB);
  }   else if (two_m_tiles(T, n_heads, num_sms))
    launch(sage_attention_mma<HD, FP8, 2>, SageLayout<HD, FP8, 2>{}, 128);
  else
    launch(sage_attention_mma<HD, FP8, 1>, SageLayout<HD, FP8, 1>{}, kB);
}

}  // namespace

int64_t sage_scratch_bytes(const Tensor& q, const Tensor& k_cache, const Tensor& kv_block_table, bool fp8,
                           int64_t seqs) {
  (void)q;
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  return SageScratch::of(kv.n_seqs, kv.n_kv, kv.capacity(), k_cache.dim(3), fp8, seqs).total;
}

void launch_sage_attention(const Ctx& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           const Tensor& token_seq, const Tensor& kv_block_table, const Tensor& positions,
                           int64_t n_heads, float scale, bool fp8, const Tensor& out, void* scratch, int num_sms,
                           const SageStateArgs& state, int64_t seqs) {
  const KvBlockTable kv = KvBlockTable::of(k_cache, kv_block_table);
  const int64_t T = q.dim(0), hd = k_cache.dim(3);
  if (T == 0 || hd == 0) return;
  WEFT_CHECK(kv.capacity() > 0 && kv.n_blocks > 0 && kv.n_seqs > 0, "sageAttention", "kCache ", k_cache,
             " and kvBlockTable ", kv_block_table, " have no positions to attend to");
  WEFT_CHECK(kv.capacity() < (int64_t{1} << 31) && T * n_heads < (int64_t{1} << 31) && (T + kB - 1) / kB <= 65535 &&
                 kv.n_seqs <= 65535 && sage_scratch_bytes(q, k_cache, kv_block_table, fp8, seqs) < (int64_t{1} << 31),
             "sageAttention", "shapes too large (", q, ", ", k_cache, ", ", kv_block_table, ")");
  WEFT_CHECK(sage_head_dim_supported(hd), "sageAttention", "headDim ", hd,
             " is not one the cuda kernels take (64 or 128) (", k_cache, ")");
  auto* bytes = static_cast<unsigned char*>(scratch);
  auto run = [&](auto head_dim, auto fp8_mode) {
    launch_sage<decltype(head_dim)::value, decltype(fp8_mode)::value>(ctx, q, k_cache, v_cache, token_seq,
                                                                       kv_block_table, positions, n_heads, scale, out,
                                                                       bytes, num_sms, state, seqs);
  };
  using H64 = std::integral_constant<int, 64>;
  using H128 = std::integral_constant<int, 128>;
  if (hd == 128)
    fp8 ? run(H128{}, std::true_type{}) : run(H128{}, std::false_type{});
  else
    fp8 ? run(H64{}, std::true_type{}) : run(H64{}, std::false_type{});
  check_launch(ctx, "sageAttention",
               {Named{"q", q}, Named{"kCache", k_cache}, Named{"tokenSeq", token_seq},
                Named{"kvBlockTable", kv_block_table}, Named{"positions", positions}});
}

}  // namespace weft::cuda
