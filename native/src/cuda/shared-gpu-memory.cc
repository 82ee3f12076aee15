// The two sources of a shared-GPU group's exchange regions (shared-gpu-memory.h).
#include "cuda/shared-gpu-memory.h"

#include <cuda_runtime.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <string>

#include "error.h"

namespace weft::cuda {
namespace {

[[noreturn]] void fail_call(const char* op, const char* call, cudaError_t e) {
  cudaGetLastError();  // not sticky: clear it so that no later launch check reports it
  WEFT_FAIL(op, call, " failed: CUDA error ", cudaGetErrorString(e), " (", cudaGetErrorName(e), ")");
}

inline void check_call(cudaError_t e, const char* op, const char* call) {
  if (e != cudaSuccess) fail_call(op, call, e);
}

// Device memory from cudaMalloc (IPC export needs it: pool memory is not exportable this way), shared through
// cudaIpcGetMemHandle / cudaIpcOpenMemHandle. A process cannot open its own handle.
class DeviceIpcMemory final : public ExchangeMemory {
 public:
  DeviceIpcMemory(int64_t bytes, const char* op) {
    check_call(cudaMalloc(&local_, static_cast<size_t>(bytes)), op, "cudaMalloc (exchange region)");
    // the legacy stream does not order the engine's non-blocking stream: the zeros land before anyone reads them
    cudaError_t e = cudaMemset(local_, 0, static_cast<size_t>(bytes));
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    const char* call = "cudaMemset (exchange region)";
    if (e == cudaSuccess) {
      e = cudaIpcGetMemHandle(&handle_, local_);
      call = "cudaIpcGetMemHandle";
    }
    if (e != cudaSuccess) {
      cudaFree(local_);
      fail_call(op, call, e);
    }
  }
  ~DeviceIpcMemory() override {
    for (void* p : peers_) cudaIpcCloseMemHandle(p);
    cudaFree(local_);
  }
  void* local() const override { return local_; }
  std::vector<uint8_t> handle() const override {
    const auto* bytes = reinterpret_cast<const uint8_t*>(&handle_);
    return {bytes, bytes + sizeof(handle_)};
  }
  void* open_peer(const std::vector<uint8_t>& handle, const char* op) override {
    WEFT_CHECK(handle.size() == sizeof(cudaIpcMemHandle_t), op, "a CUDA IPC memory handle is ",
               sizeof(cudaIpcMemHandle_t), " bytes, got ", handle.size());
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handle.data(), sizeof(h));
    void* p = nullptr;
    check_call(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), op, "cudaIpcOpenMemHandle");
    peers_.push_back(p);
    return p;
  }

 private:
  void* local_ = nullptr;
  cudaIpcMemHandle_t handle_{};
  std::vector<void*> peers_;
};

// A /dev/shm file (shm_open) mapped into every process and registered with CUDA as mapped pinned memory: the
// kernels read and write host memory. For hosts that refuse CUDA IPC. The creator unlinks the file when done.
class HostShmMemory final : public ExchangeMemory {
 public:
  HostShmMemory(int64_t bytes, const char* op) : bytes_(static_cast<size_t>(bytes)) {
    static std::atomic<unsigned> serial{0};
    name_ = "/weft-shared-gpu-" + std::to_string(getpid()) + "-" + std::to_string(serial++) + "-" +
            std::to_string(std::random_device{}());
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    WEFT_CHECK(fd >= 0, op, "shm_open(", name_, ") failed: ", std::strerror(errno));
    owner_ = true;
    // the pages are reserved now: a full /dev/shm fails here, not as a SIGBUS when a kernel first writes
    if (int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes_)); err != 0) {
      close(fd);
      unlink_name();
      WEFT_FAIL(op, "posix_fallocate(", name_, ", ", bytes_, " bytes) failed: ", std::strerror(err),
                " (is /dev/shm large enough?)");
    }
    try {
      local_ = map(fd, bytes_, op);  // a fresh file reads as zeros
    } catch (...) {
      unlink_name();
      throw;
    }
  }
  ~HostShmMemory() override {
    for (auto& m : maps_) {
      cudaHostUnregister(m.host);
      munmap(m.host, m.bytes);
    }
    unlink_name();
  }
  void unlink_name() override {
    if (owner_) shm_unlink(name_.c_str());
    owner_ = false;
  }
  void* local() const override { return local_; }
  std::vector<uint8_t> handle() const override { return {name_.begin(), name_.end()}; }
  void* open_peer(const std::vector<uint8_t>& handle, const char* op) override {
    std::string name(handle.begin(), handle.end());
    WEFT_CHECK(name.rfind("/weft-shared-gpu-", 0) == 0 && name.find('/', 1) == std::string::npos, op,
               "not a weft exchange file name: ", name);
    int fd = shm_open(name.c_str(), O_RDWR, 0);
    WEFT_CHECK(fd >= 0, op, "shm_open(", name, ") failed: ", std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != bytes_) {
      close(fd);
      WEFT_FAIL(op, "the peer's exchange file ", name, " is ", st.st_size, " bytes, this rank's ", bytes_);
    }
    return map(fd, bytes_, op);
  }

 private:
  struct Mapping {
    void* host;
    size_t bytes;
  };
  // Maps fd (closed here), registers the mapping with CUDA, returns its device pointer.
  void* map(int fd, size_t bytes, const char* op) {
    void* host = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    WEFT_CHECK(host != MAP_FAILED, op, "mmap of an exchange file failed: ", std::strerror(err));
    cudaError_t e = cudaHostRegister(host, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
    if (e != cudaSuccess) {
      munmap(host, bytes);
      fail_call(op, "cudaHostRegister", e);
    }
    maps_.push_back({host, bytes});
    void* device = nullptr;
    check_call(cudaHostGetDevicePointer(&device, host, 0), op, "cudaHostGetDevicePointer");
    return device;
  }

  size_t bytes_;
  std::string name_;
  bool owner_ = false;
  void* local_ = nullptr;
  std::vector<Mapping> maps_;
};

}  // namespace

std::unique_ptr<ExchangeMemory> make_exchange_memory(ExchangeKind kind, int64_t bytes, const char* op) {
  if (kind == ExchangeKind::DeviceIpc) return std::make_unique<DeviceIpcMemory>(bytes, op);
  return std::make_unique<HostShmMemory>(bytes, op);
}

}  // namespace weft::cuda
