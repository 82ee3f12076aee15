// The engine's device: opening it, the one CUDA error path (fail_cuda), and the device-status report; and what the
// runtime reports of the host's devices (cuda-info.h, for `weft doctor`).
#include "cuda/device.h"

#include <cstring>
#include <sstream>

#include "cuda/common.cuh"
#include "cuda-info.h"
#include "error.h"

namespace weft::cuda {

DeviceState::~DeviceState() {
  cudaSetDevice(device);
  if (stream) cudaStreamSynchronize(stream);
  for (void* p : deferred_frees) cudaFree(p);
  if (status_host) cudaFreeHost(status_host);
  if (stream) cudaStreamDestroy(stream);
}

void open_device(DeviceState& st, int device, const char* op) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  WEFT_CHECK(e == cudaSuccess && count > 0, op, "no CUDA device found (",
             e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), "); use backend: 'cpu'");
  WEFT_CHECK(device >= 0 && device < count, op, "options.device = ", device, " but this host has ", count,
             " CUDA device(s)");
  st.device = device;
  check_cuda(st, cudaSetDevice(device), op);
  check_cuda(st, cudaStreamCreateWithFlags(&st.stream, cudaStreamNonBlocking), op);
  check_cuda(st, cudaDeviceGetAttribute(&st.num_sms, cudaDevAttrMultiProcessorCount, device), op);
  check_cuda(st, cudaHostAlloc(reinterpret_cast<void**>(&st.status_host), sizeof(DeviceStatus), cudaHostAllocMapped),
             op);
  std::memset(st.status_host, 0, sizeof(DeviceStatus));
  check_cuda(st, cudaHostGetDevicePointer(reinterpret_cast<void**>(&st.status_dev), st.status_host, 0), op);
  // Keep freed pool memory for reuse instead of returning it to the driver at every sync.
  cudaMemPool_t pool;
  check_cuda(st, cudaDeviceGetDefaultMemPool(&pool, device), op);
  uint64_t keep = ~uint64_t{0};
  check_cuda(st, cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), op);
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

void fail_cuda(DeviceState* st, const char* op, cudaError_t e, const std::string& detail) {
  cudaGetLastError();  // clear a non-sticky error so that it is not reported again by the next launch check
  std::string message = std::string("CUDA error ") + cudaGetErrorString(e) + detail;
  if (is_sticky(e) && st && st->dead.empty()) st->dead = std::string(op) + ": " + message;
  throw Error(op, message);
}

std::string describe(std::initializer_list<Named> args) {
  if (args.size() == 0) return "";
  std::ostringstream s;
  s << " (";
  bool first = true;
  for (const Named& a : args) {
    s << (first ? "" : ", ") << a.name << ' ' << a.t;
    first = false;
  }
  s << ")";
  return s.str();
}

void synchronize(DeviceState& st, const char* op) {
  check_cuda(st, cudaStreamSynchronize(st.stream), op);
  check_status(st);
}

void check_status(DeviceState& st) {
  DeviceStatus& s = *st.status_host;
  if (!s.flag) return;
  DeviceStatus f = s;
  s.flag = 0;
  const char* tail = " (found on the device; reported at the next synchronising call, and that op's output is "
                     "unspecified)";
  switch (static_cast<StatusOp>(f.op)) {
    case StatusOp::WriteKvSeq:
      WEFT_FAIL("writeKv", "tokenSeq[", f.index, "] = ", f.value, " is out of range (need 0 <= sequence < ", f.limit,
                ")", tail);
    case StatusOp::WriteKvPosition:
      WEFT_FAIL("writeKv", "positions[", f.index, "] = ", f.value, " is out of range (need 0 <= position < ", f.limit,
                ")", tail);
    case StatusOp::WriteKvBlock:
      WEFT_FAIL("writeKv", "the KV block of token ", f.index, " (kvBlockTable[tokenSeq[", f.index, "]][positions[",
                f.index, "] / B]) = ", f.value, " is out of range (need 0 <= block < ", f.limit, ")", tail);
    case StatusOp::AttentionSeq:
      WEFT_FAIL("attention", "tokenSeq[", f.index, "] = ", f.value, " is out of range (need 0 <= sequence < ",
                f.limit, ")", tail);
    case StatusOp::AttentionPosition:
      WEFT_FAIL("attention", "positions[", f.index, "] = ", f.value, " is out of range (need 0 <= position < ",
                f.limit, ")", tail);
    case StatusOp::AttentionBlock:
      WEFT_FAIL("attention", "a KV block read by token ", f.index, " (kvBlockTable[tokenSeq[", f.index,
                "]][...]) = ", f.value, " is out of range (need 0 <= block < ", f.limit, ")", tail);
    case StatusOp::RopePosition:
      WEFT_FAIL("rope", "positions[", f.index, "] = ", f.value, " is negative", tail);
    case StatusOp::GatherRow:
      WEFT_FAIL("gatherRows", "rows[", f.index, "] = ", f.value, " is out of range (need 0 <= row < ", f.limit, ")",
                tail);
    case StatusOp::ExpertRepeat:
      WEFT_FAIL("expertMatmul", "experts[", f.index, "] chooses expert ", f.value,
                " more than once (a token's experts must be distinct)", tail);
    case StatusOp::SampleArgs:
      WEFT_FAIL("sampleTensor", "row ", f.index, " has a NaN temperature, topK < 0, or topP / uniform outside [0, 1]",
                tail);
    case StatusOp::SampleNan:
      WEFT_FAIL("sampleTensor", "logits row ", f.index, " holds NaN", tail);
    case StatusOp::FeedTokens:
      WEFT_FAIL("feedTokens", "from[", f.index, "] = ", f.value, " is out of range (src holds ", f.limit, " tokens)",
                tail);
    case StatusOp::SageSeqs:
      WEFT_FAIL("sageAttention", "the rows after the decode rows name ", f.value, " or more sequences (table row ",
                f.index, " among them), over the ", f.limit,
                " the table has besides the decode rows': a decode row's sequence has other rows in the step", tail);
    default:
      WEFT_FAIL("synchronize", "unknown device status ", f.op);
  }
}

}  // namespace weft::cuda

namespace weft {

CudaReport cuda_report() {
  CudaReport report;
  if (cudaDriverGetVersion(&report.driver_version) != cudaSuccess) report.driver_version = 0;
  if (cudaRuntimeGetVersion(&report.runtime_version) != cudaSuccess) report.runtime_version = 0;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    report.error = cudaGetErrorString(e);
    cudaGetLastError();  // not sticky: clear it for the next call
    return report;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    report.devices.push_back({i, p.name, p.major, p.minor, static_cast<int64_t>(p.totalGlobalMem), p.multiProcessorCount});
  }
  return report;
}

}  // namespace weft
