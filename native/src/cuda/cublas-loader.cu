#include "cuda/cublas-loader.h"

#include <dlfcn.h>

#include <mutex>
#include <string>

#include "error.h"

namespace weft::cuda::cublas {

namespace {

template <typename F>
void bind(void* lib, const char* name, F* out) {
  void* sym = dlsym(lib, name);
  if (!sym) WEFT_FAIL("matmul", "cuBLAS is missing the symbol ", name);
  *out = reinterpret_cast<F>(sym);
}

Api load() {
  void* lib = dlopen("libcublas.so.13", RTLD_NOW | RTLD_LOCAL);
  std::string first_error = lib ? "" : dlerror();
  if (!lib) lib = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
  if (!lib) WEFT_FAIL("matmul", "cannot load cuBLAS (libcublas.so.13: ", first_error, "; libcublas.so: ", dlerror(), ")");
  Api a{};
  bind(lib, "cublasCreate_v2", &a.create);
  bind(lib, "cublasDestroy_v2", &a.destroy);
  bind(lib, "cublasSetStream_v2", &a.set_stream);
  bind(lib, "cublasSetWorkspace_v2", &a.set_workspace);
  bind(lib, "cublasGemmEx", &a.gemm_ex);
  return a;  // the library stays loaded for the life of the process
}

}  // namespace

const Api& api() {
  static std::once_flag once;
  static Api table;
  static std::string error;
  std::call_once(once, [] {
    try {
      table = load();
    } catch (const Error& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw Error("matmul", error.substr(error.find(": ") + 2));
  return table;
}

const char* status_name(Status s) {
  switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS (0)";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED (1)";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED (3)";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE (7)";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH (8)";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR (11)";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED (13)";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR (14)";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED (15)";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR (16)";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

}  // namespace weft::cuda::cublas
