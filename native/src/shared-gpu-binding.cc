// The JS class SharedGpuGroup (worker/native.ts) over weft::SharedGpuGroup (shared-gpu.h), and cudaDeviceCount.
// Device addresses and streams come in as BigInts (engine.devicePointer, engine.streamHandle), as for NCCL.
#include "shared-gpu-binding.h"

#include <memory>
#include <string>
#include <vector>

#include "js-args.h"
#include "shared-gpu.h"

namespace weft::js {
namespace {

class SharedGpuGroupHandle : public Napi::ObjectWrap<SharedGpuGroupHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SharedGpuGroup",
                       {
                           InstanceMethod<&SharedGpuGroupHandle::Handle>("handle"),
                           InstanceMethod<&SharedGpuGroupHandle::Connect>("connect"),
                           InstanceMethod<&SharedGpuGroupHandle::PeersConnected>("peersConnected"),
                           InstanceMethod<&SharedGpuGroupHandle::AllReduce>("allReduce"),
                           InstanceMethod<&SharedGpuGroupHandle::AllGatherCols>("allGatherCols"),
                           InstanceMethod<&SharedGpuGroupHandle::Status>("status"),
                           InstanceMethod<&SharedGpuGroupHandle::Close>("close"),
                       });
  }

  // new SharedGpuGroup(device, rank, world, dataBytes, timeoutMs, memory: 'device-ipc' | 'host-shm')
  explicit SharedGpuGroupHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SharedGpuGroupHandle>(info) {
    guard(info.Env(), "sharedGpuGroup", [&]() -> Napi::Value {
      Args a(info, "sharedGpuGroup", nullptr);
      WEFT_TYPE_CHECK(info[5].IsString(), "sharedGpuGroup", "memory must be 'device-ipc' or 'host-shm' (got ",
                      describe(info[5]), ")");
      std::string memory = info[5].As<Napi::String>().Utf8Value();
      WEFT_CHECK(memory == "device-ipc" || memory == "host-shm", "sharedGpuGroup",
                 "memory must be 'device-ipc' or 'host-shm' (got '", memory, "')");
      group_ = make_shared_gpu_group(static_cast<int>(a.integer(0, "device")), static_cast<int>(a.integer(1, "rank")),
                                     static_cast<int>(a.integer(2, "world")), a.integer(3, "dataBytes"),
                                     a.number(4, "timeoutMs"),
                                     memory == "device-ipc" ? ExchangeKind::DeviceIpc : ExchangeKind::HostShm);
      return info.Env().Undefined();
    });
  }

 private:
  SharedGpuGroup& group(const char* op) {
    WEFT_CHECK(group_ != nullptr, op, "the shared-GPU group was closed");
    return *group_;
  }

  static uint64_t address(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
    WEFT_TYPE_CHECK(info[i].IsBigInt(), op, name, " must be a bigint (got ", describe(info[i]), ")");
    bool lossless = false;
    uint64_t value = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
    WEFT_CHECK(lossless, op, name, " does not fit 64 bits");
    return value;
  }

  Napi::Value Handle(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuHandle", [&]() -> Napi::Value {
      std::vector<uint8_t> bytes = group("sharedGpuHandle").handle();
      return Napi::Buffer<uint8_t>::Copy(info.Env(), bytes.data(), bytes.size());
    });
  }

  // connect(handles: Uint8Array[]) in rank order
  Napi::Value Connect(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuConnect", [&]() -> Napi::Value {
      const char* op = "sharedGpuConnect";
      Args a(info, op, nullptr);
      WEFT_TYPE_CHECK(info[0].IsArray(), op, "handles must be an Array of Uint8Array (got ", describe(info[0]), ")");
      Napi::Array list = info[0].As<Napi::Array>();
      std::vector<std::vector<uint8_t>> handles;
      for (uint32_t i = 0; i < list.Length(); ++i) {
        Napi::Value v = list.Get(i);
        WEFT_TYPE_CHECK(v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array, op,
                        "handles[", i, "] must be a Uint8Array (got ", describe(v), ")");
        auto bytes = v.As<Napi::Uint8Array>();
        handles.emplace_back(bytes.Data(), bytes.Data() + bytes.ElementLength());
      }
      group(op).connect(handles);
      return info.Env().Undefined();
    });
  }

  Napi::Value PeersConnected(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuPeersConnected", [&]() -> Napi::Value {
      group("sharedGpuPeersConnected").peers_connected();
      return info.Env().Undefined();
    });
  }

  // allReduce(x: bigint, count: number, stream: bigint), in place
  Napi::Value AllReduce(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuAllReduce", [&]() -> Napi::Value {
      const char* op = "sharedGpuAllReduce";
      Args a(info, op, nullptr);
      group(op).all_reduce(address(info, 0, op, "x"), a.integer(1, "count"), address(info, 2, op, "stream"));
      return info.Env().Undefined();
    });
  }

  // allGatherCols(x: bigint, out: bigint, rows: number, widths: Int32Array, stream: bigint)
  Napi::Value AllGatherCols(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuAllGatherCols", [&]() -> Napi::Value {
      const char* op = "sharedGpuAllGatherCols";
      Args a(info, op, nullptr);
      HostArray<const int32_t> widths = a.int32_array(3, "widths");
      group(op).all_gather_cols(address(info, 0, op, "x"), address(info, 1, op, "out"), a.integer(2, "rows"),
                                std::vector<int64_t>(widths.data, widths.data + widths.length),
                                address(info, 4, op, "stream"));
      return info.Env().Undefined();
    });
  }

  // status(): { failed: boolean, peer: number, collective: number, op: 'allReduce' | 'allGatherCols' | '' }
  Napi::Value Status(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuStatus", [&]() -> Napi::Value {
      SharedGpuStatus s = group("sharedGpuStatus").status();
      Napi::Object out = Napi::Object::New(info.Env());
      out.Set("failed", Napi::Boolean::New(info.Env(), s.failed));
      out.Set("peer", Napi::Number::New(info.Env(), s.peer));
      out.Set("collective", Napi::Number::New(info.Env(), static_cast<double>(s.collective)));
      out.Set("op", Napi::String::New(info.Env(), s.op == 1 ? "allReduce" : s.op == 2 ? "allGatherCols" : ""));
      return out;
    });
  }

  // close(): waits for the device, then unmaps the peers' regions and frees this rank's; idempotent
  Napi::Value Close(const Napi::CallbackInfo& info) {
    return guard(info.Env(), "sharedGpuClose", [&]() -> Napi::Value {
      group_.reset();
      return info.Env().Undefined();
    });
  }

  std::unique_ptr<SharedGpuGroup> group_;
};

Napi::Value CudaDeviceCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), cuda_device_count());
}

}  // namespace

void InitSharedGpu(Napi::Env env, Napi::Object exports) {
  exports.Set("SharedGpuGroup", SharedGpuGroupHandle::Define(env));
  exports.Set("cudaDeviceCount", Napi::Function::New<CudaDeviceCount>(env, "cudaDeviceCount"));
}

}  // namespace weft::js
