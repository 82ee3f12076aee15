// The launch of kernels in thread-block clusters (the GEMVs that split K over one, gemv.cu and gemv-quant-mma.cu, and
// SparQ's, attention-sparq.cu): clusters of C blocks along x. Included by .cu files only.
#pragma once

#include "cuda/common.cuh"

namespace weft::cuda {

// The launch configuration of grid blocks of `threads` with smem bytes of dynamic shared memory each, in clusters of
// C blocks along x (attr[0]; attr[1] is free for the launch to add). Not copyable: cfg.attrs points into it.
struct ClusterLaunchConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  ClusterLaunchConfig(dim3 grid, int threads, size_t smem, int C) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunchConfig(const ClusterLaunchConfig&) = delete;
  ClusterLaunchConfig& operator=(const ClusterLaunchConfig&) = delete;
};

// Launches kernel(p) on stream with ClusterLaunchConfig(grid, threads, smem, C), as a programmatic dependent of
// the kernel before it when pdl (common.cuh, pdl_wait).
template <typename Params>
cudaError_t launch_in_clusters(void (*kernel)(Params), const Params& p, dim3 grid, int threads, size_t smem, int C,
                               bool pdl, cudaStream_t stream) {
  ClusterLaunchConfig launch(grid, threads, smem, C);
  launch.cfg.stream = stream;
  launch.attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  launch.attr[1].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  launch.cfg.numAttrs = 2;
  return cudaLaunchKernelEx(&launch.cfg, kernel, p);
}

}  // namespace weft::cuda
