// Compiled instead of native/src/cuda/ when this build has no CUDA backend (WEFT_CUDA=OFF): the addon keeps
// the same surface, and asking for a CUDA engine says how to get one.
#include "backend.h"
#include "error.h"
#include "shared-gpu.h"
#include "cuda-info.h"

namespace weft {

bool have_cuda_backend() { return false; }

std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& /*options*/) {
  WEFT_FAIL("createEngine", "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS)");
}

std::unique_ptr<SharedGpuGroup> make_shared_gpu_group(int, int, int, int64_t, double, ExchangeKind) {
  WEFT_FAIL("sharedGpuGroup", "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS)");
}

int cuda_device_count() { return 0; }

CudaReport cuda_report() {
  CudaReport report;
  report.error = "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS)";
  return report;
}

}  // namespace weft
