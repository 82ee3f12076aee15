// What the CUDA runtime this addon was built with reports of the host (`weft doctor`): its versions and devices,
// or why it sees none. A build without CUDA reports that instead.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace weft {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability (9.0: Hopper, what the kernels are built for)
  int64_t memory_bytes = 0;
  int sms = 0;
};

struct CudaReport {
  int driver_version = 0, runtime_version = 0;  // 1000 major + 10 minor (13000: 13.0); 0 when there is none
  std::string error;                             // why no device is seen; empty when the query worked
  std::vector<CudaDeviceInfo> devices;
};

CudaReport cuda_report();

}  // namespace weft
