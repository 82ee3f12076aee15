// Compiled instead of native/src/cuda/ when this build has no CUDA backend (WEFT_CUDA=OFF): the addon keeps
// the same surface, and asking for a CUDA engine says how to get one.
#include "backend.h"
#include "error.h"

namespace weft {

bool have_cuda_backend() { return false; }

std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& /*options*/) {
  WEFT_FAIL("createEngine", "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS)");
}

}  // namespace weft
