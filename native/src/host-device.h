// WEFT_HD: a function for both the host (CPU backend) and the device (CUDA kernels), so that one definition of
// a rule (random values, routing) serves both backends.
#pragma once

#ifdef __CUDACC__
#define WEFT_HD __host__ __device__ __forceinline__
#else
#define WEFT_HD inline
#endif
