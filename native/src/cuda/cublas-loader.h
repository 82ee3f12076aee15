// Run-time loader for the few cuBLAS entry points weft uses (no cuBLAS header or import library at build time).
//
// dlopen("libcublas.so.13"), falling back to "libcublas.so"; prototypes and enum values are declared here and
// match cuBLAS 13 (cublas_api.h): cublasOperation_t, cublasComputeType_t, cublasGemmAlgo_t.
// cudaDataType comes from the CUDA runtime's own library_types.h.
#pragma once
#include <cstddef>
#include <cuda_runtime.h>
#include <library_types.h>

namespace weft::cuda::cublas {

using Handle = struct cublasContext*;
using Status = int;  // cublasStatus_t; 0 = CUBLAS_STATUS_SUCCESS
constexpr Status kSuccess = 0;

enum Operation : int { OP_N = 0, OP_T = 1 };
enum ComputeType : int {
  COMPUTE_32F = 68,
  COMPUTE_32F_PEDANTIC = 69,
};
enum GemmAlgo : int { GEMM_DEFAULT = -1 };

struct Api {
  Status (*create)(Handle*);
  Status (*destroy)(Handle);
  Status (*set_stream)(Handle, cudaStream_t);
  Status (*set_workspace)(Handle, void*, size_t);
  Status (*gemm_ex)(Handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                    cudaDataType Atype, int lda, const void* B, cudaDataType Btype, int ldb, const void* beta,
                    void* C, cudaDataType Ctype, int ldc, int computeType, int algo);
};

// The process-wide table, loaded on first use; throws weft::Error (op "matmul") when cuBLAS cannot be loaded.
const Api& api();

// "CUBLAS_STATUS_NOT_SUPPORTED (15)" and the like.
const char* status_name(Status s);

}  // namespace weft::cuda::cublas
