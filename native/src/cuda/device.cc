#include "cuda/device.h"

#include <sstream>

#include "cuda/common.cuh"

namespace weft::cuda {

DeviceState::~DeviceState() {
  cudaSetDevice(device);
  if (stream) cudaStreamSynchronize(stream);
  for (void* p : deferred_frees) cudaFree(p);
  if (status_host) cudaFreeHost(status_host);
  if (stream) cudaStreamDestroy(stream);
}

bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

void fail_cuda(const Ctx& ctx, const char* op, cudaError_t e, std::initializer_list<Named> args) {
  std::ostringstream s;
  s << "CUDA error " << cudaGetErrorString(e);
  if (args.size()) {
    s << " (";
    bool first = true;
    for (const Named& a : args) {
      s << (first ? "" : ", ") << a.name << ' ' << a.t;
      first = false;
    }
    s << ")";
  }
  if (is_sticky(e) && ctx.st && ctx.st->dead.empty()) ctx.st->dead = std::string(op) + ": " + s.str();
  throw weft::Error(op, s.str());
}

}  // namespace weft::cuda
