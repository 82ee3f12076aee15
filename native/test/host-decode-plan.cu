// A host check, run by `node native/build.mjs --cuda-compile-check` (no GPU: host code only): decode attention's
// partition plan (cuda/attention-decode.cuh) against what the kernels size from it. For every capacity C and
// position, the rows a partition reads fit the plan's P (the kernels' shared memory for row indices and scales is
// sized by P), the partitions used fit n_part (the merge's scratch), and they cover positions 0 .. pos.
#include <cstdio>

#include "cuda/attention-decode.cuh"

using namespace weft::cuda::decode;

int main() {
  long cases = 0, failed = 0;
  for (bool codes : {false, true})
    for (int64_t n_kv : {1, 8, 32})
      for (int64_t T : {1, 8, 64})
        for (int64_t C = 1; C <= 40000; C += C < 1100 ? 1 : 97) {
          const DecodePlan plan = decode_plan(T, n_kv, 4, C, 132, codes);
          for (int pos = 0; pos < C; pos += pos < 1100 ? 1 : 61) {
            ++cases;
            const int rows_each = partition_rows(pos, plan.n_part), n_valid = (pos + rows_each) / rows_each;
            const bool ok = rows_each % kTileRows == 0 && std::min(rows_each, pos + 1) <= plan.P &&
                            n_valid <= plan.n_part && int64_t{n_valid} * rows_each >= pos + 1;
            if (!ok && failed++ < 5)
              std::printf("decode plan: C=%lld pos=%d T=%lld n_kv=%lld codes=%d: n_part %d, P %d, rows a partition %d, "
                          "partitions used %d\n", static_cast<long long>(C), pos, static_cast<long long>(T),
                          static_cast<long long>(n_kv), codes, plan.n_part, plan.P, rows_each, n_valid);
          }
        }
  std::printf("decode plan: %ld cases, %ld failed\n", cases, failed);
  return failed ? 1 : 0;
}
