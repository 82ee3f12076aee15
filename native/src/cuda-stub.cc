// Compiled instead of cuda/backend-cuda.cc when this build has no CUDA backend (WEFT_CUDA=OFF, or a source
// tree that has none yet).
#include "backend.h"
#include "error.h"

namespace weft {

bool have_cuda_backend() { return false; }

std::shared_ptr<Backend> make_cuda_backend(const CudaOptions& /*options*/) {
#ifdef WEFT_CUDA_REQUESTED
  WEFT_FAIL("createEngine", "weft was built with WEFT_CUDA=ON, but this source tree has no CUDA backend yet "
                            "(native/src/cuda/backend-cuda.cc); use backend: 'cpu'");
#else
  WEFT_FAIL("createEngine", "weft was built without CUDA (rebuild with WEFT_CUDA=1 on a host with nvcc and cuBLAS)");
#endif
}

}  // namespace weft
