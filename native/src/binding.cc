// Engine and Tensor: unwrap tagged handles, read arguments (js-args), call the backend, wrap results.
// Every method body runs inside guard(), the one place native exceptions become JS errors.
#include "binding.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <thread>

#include "cuda-info.h"
#include "js-args.h"
#include "shared-gpu-binding.h"

#ifndef WEFT_VERSION
#define WEFT_VERSION "0.0.0"
#endif

namespace weft::js {
namespace {

// Random 128-bit tags; they only need to differ from every other addon's.
constexpr napi_type_tag kTensorTag = {0x7765667454656e73ULL, 0x9b1c2f4a6d3e8015ULL};
constexpr napi_type_tag kEngineTag = {0x77656674456e6769ULL, 0x3f8a51c7e2904b6dULL};
constexpr napi_type_tag kGraphTag = {0x7765667447726170ULL, 0x51d0c93e7a1f2b84ULL};

// Per-environment state (the addon may be loaded by several worker threads).
struct AddonData {
  Napi::FunctionReference tensor_class;
  Napi::FunctionReference graph_class;
  struct PendingGraph {
    std::shared_ptr<Backend> owner;
    std::shared_ptr<Graph> graph;
  }* pending_graph = nullptr;
  // Set only while TensorHandle::Wrap runs, so that a constructor call from JS can be refused.
  struct Pending {
    std::shared_ptr<Backend> owner;
    Tensor tensor;
  }* pending = nullptr;
};

AddonData& addon_data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

Napi::Value nativeInfo(const Napi::CallbackInfo& info) {
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("cuda", Napi::Boolean::New(info.Env(), have_cuda_backend()));
  out.Set("version", Napi::String::New(info.Env(), WEFT_VERSION));
  return out;
}

// cudaReport(): cuda_report() (cuda-info.h) as { driverVersion, runtimeVersion, error, devices: [{ index, name,
// computeCapability: "9.0", memoryBytes, sms }] }.
Napi::Value cudaReport(const Napi::CallbackInfo& info) {
  const Napi::Env env = info.Env();
  const CudaReport report = cuda_report();
  Napi::Object out = Napi::Object::New(env);
  out.Set("driverVersion", Napi::Number::New(env, report.driver_version));
  out.Set("runtimeVersion", Napi::Number::New(env, report.runtime_version));
  out.Set("error", Napi::String::New(env, report.error));
  Napi::Array devices = Napi::Array::New(env, report.devices.size());
  for (size_t i = 0; i < report.devices.size(); ++i) {
    const CudaDeviceInfo& d = report.devices[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("index", Napi::Number::New(env, d.index));
    o.Set("name", Napi::String::New(env, d.name));
    o.Set("computeCapability", Napi::String::New(env, std::to_string(d.major) + "." + std::to_string(d.minor)));
    o.Set("memoryBytes", Napi::Number::New(env, static_cast<double>(d.memory_bytes)));
    o.Set("sms", Napi::Number::New(env, d.sms));
    devices.Set(static_cast<uint32_t>(i), o);
  }
  out.Set("devices", devices);
  return out;
}

}  // namespace

// ---- Tensor

Napi::Function TensorHandle::Define(Napi::Env env) {
  return DefineClass(env, "Tensor", {InstanceMethod<&TensorHandle::Dispose>("dispose")});
}

Napi::Object TensorHandle::Wrap(Napi::Env env, std::shared_ptr<Backend> owner, Tensor tensor) {
  AddonData& data = addon_data(env);
  AddonData::Pending pending{std::move(owner), std::move(tensor)};
  data.pending = &pending;
  try {
    Napi::Object obj = data.tensor_class.New({});
    data.pending = nullptr;
    return obj;
  } catch (...) {
    data.pending = nullptr;
    throw;
  }
}

TensorHandle* TensorHandle::FromValue(Napi::Value value) {
  if (!value.IsObject()) return nullptr;
  Napi::Object obj = value.As<Napi::Object>();
  if (!obj.CheckTypeTag(&kTensorTag)) return nullptr;
  return Unwrap(obj);
}

TensorHandle::TensorHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorHandle>(info), env_(info.Env()) {
  AddonData& data = addon_data(info.Env());
  if (data.pending == nullptr)
    throw to_js_error(info.Env(), weft::Error("Tensor", "tensors are made by an engine (upload, zeros or an op), "
                                                        "not by `new Tensor()`",
                                              weft::Error::Kind::Type));
  owner_ = std::move(data.pending->owner);
  tensor_ = std::move(data.pending->tensor);
  data.pending = nullptr;

  Napi::Env env = info.Env();
  Napi::Object self = info.This().As<Napi::Object>();
  self.TypeTag(&kTensorTag);
  Napi::Array shape = Napi::Array::New(env, tensor_.rank());
  for (size_t i = 0; i < tensor_.rank(); ++i) shape.Set(static_cast<uint32_t>(i), static_cast<double>(tensor_.shape[i]));
  shape.Freeze();
  // Own, read-only, enumerable properties, so console.log shows them; the native side never reads them back.
  self.DefineProperties({
      Napi::PropertyDescriptor::Value("dtype", Napi::String::New(env, dtype_name(tensor_.dtype)), napi_enumerable),
      Napi::PropertyDescriptor::Value("shape", shape, napi_enumerable),
  });
  accounted_bytes_ = tensor_.buffer && tensor_.buffer->freed_on_release() ? static_cast<int64_t>(tensor_.nbytes()) : 0;
  Napi::MemoryManagement::AdjustExternalMemory(env, accounted_bytes_);
}

void TensorHandle::ReleaseAccounting() {
  int64_t ignored;
  if (accounted_bytes_) napi_adjust_external_memory(env_, -accounted_bytes_, &ignored);
  accounted_bytes_ = 0;
}

TensorHandle::~TensorHandle() { ReleaseAccounting(); }

Napi::Value TensorHandle::Dispose(const Napi::CallbackInfo& info) {
  tensor_.buffer.reset();
  ReleaseAccounting();
  return info.Env().Undefined();
}

// ---- Graph

Napi::Function GraphHandle::Define(Napi::Env env) {
  return DefineClass(env, "Graph", {InstanceMethod<&GraphHandle::Dispose>("dispose")});
}

Napi::Object GraphHandle::Wrap(Napi::Env env, std::shared_ptr<Backend> owner, std::shared_ptr<Graph> graph) {
  AddonData& data = addon_data(env);
  AddonData::PendingGraph pending{std::move(owner), std::move(graph)};
  data.pending_graph = &pending;
  try {
    Napi::Object obj = data.graph_class.New({});
    data.pending_graph = nullptr;
    return obj;
  } catch (...) {
    data.pending_graph = nullptr;
    throw;
  }
}

GraphHandle* GraphHandle::FromValue(Napi::Value value) {
  if (!value.IsObject()) return nullptr;
  Napi::Object obj = value.As<Napi::Object>();
  if (!obj.CheckTypeTag(&kGraphTag)) return nullptr;
  return Unwrap(obj);
}

GraphHandle::GraphHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GraphHandle>(info) {
  AddonData& data = addon_data(info.Env());
  if (data.pending_graph == nullptr)
    throw to_js_error(info.Env(), weft::Error("Graph", "graphs are made by engine.captureEnd(), not by `new Graph()`",
                                              weft::Error::Kind::Type));
  owner_ = std::move(data.pending_graph->owner);
  graph_ = std::move(data.pending_graph->graph);
  data.pending_graph = nullptr;
  info.This().As<Napi::Object>().TypeTag(&kGraphTag);
}

Napi::Value GraphHandle::Dispose(const Napi::CallbackInfo& info) {
  graph_.reset();
  return info.Env().Undefined();
}

// ---- Engine

Napi::Function EngineHandle::Define(Napi::Env env) {
  return DefineClass(env, "Engine",
                     {
                         InstanceMethod<&EngineHandle::Upload>("upload"),
                         InstanceMethod<&EngineHandle::UploadQuantized>("uploadQuantized"),
                         InstanceMethod<&EngineHandle::Download>("download"),
                         InstanceMethod<&EngineHandle::Zeros>("zeros"),
                         InstanceMethod<&EngineHandle::Embedding>("embedding"),
                         InstanceMethod<&EngineHandle::RmsNorm>("rmsNorm"),
                         InstanceMethod<&EngineHandle::Matmul>("matmul"),
                         InstanceMethod<&EngineHandle::Add>("add"),
                         InstanceMethod<&EngineHandle::Rope>("rope"),
                         InstanceMethod<&EngineHandle::WriteKv>("writeKv"),
                         InstanceMethod<&EngineHandle::Attention>("attention"),
                         InstanceMethod<&EngineHandle::AttentionBifurcated>("attentionBifurcated"),
                         InstanceMethod<&EngineHandle::Copy>("copy"),
                         InstanceMethod<&EngineHandle::DownloadAsync>("downloadAsync"),
                         InstanceMethod<&EngineHandle::FeedTokens>("feedTokens"),
                         InstanceMethod<&EngineHandle::AddRmsNorm>("addRmsNorm"),
                         InstanceMethod<&EngineHandle::QkvRope>("qkvRope"),
                         InstanceMethod<&EngineHandle::SparqAppend>("sparqAppend"),
                         InstanceMethod<&EngineHandle::SparqAttention>("sparqAttention"),
                         InstanceMethod<&EngineHandle::SageAttention>("sageAttention"),
                         InstanceMethod<&EngineHandle::SiluMul>("siluMul"),
                         InstanceMethod<&EngineHandle::SliceCols>("sliceCols"),
                         InstanceMethod<&EngineHandle::ConcatCols>("concatCols"),
                         InstanceMethod<&EngineHandle::GatherRows>("gatherRows"),
                         InstanceMethod<&EngineHandle::RouteTopK>("routeTopK"),
                         InstanceMethod<&EngineHandle::ExpertMatmul>("expertMatmul"),
                         InstanceMethod<&EngineHandle::CombineExperts>("combineExperts"),
                         InstanceMethod<&EngineHandle::SiluMulMatmul>("siluMulMatmul"),
                         InstanceMethod<&EngineHandle::MatmulSiluMul>("matmulSiluMul"),
                         InstanceMethod<&EngineHandle::SiluMulExpertMatmul>("siluMulExpertMatmul"),
                         InstanceMethod<&EngineHandle::LogSoftmax>("logSoftmax"),
                         InstanceMethod<&EngineHandle::Logprobs>("logprobs"),
                         InstanceMethod<&EngineHandle::TopLogprobs>("topLogprobs"),
                         InstanceMethod<&EngineHandle::Sample>("sample"),
                         InstanceMethod<&EngineHandle::SampleTensor>("sampleTensor"),
                         InstanceMethod<&EngineHandle::RandomUniform>("randomUniform"),
                         InstanceMethod<&EngineHandle::Write>("write"),
                         InstanceMethod<&EngineHandle::BeginStep>("beginStep"),
                         InstanceMethod<&EngineHandle::LayerMark>("layerMark"),
                         InstanceMethod<&EngineHandle::ReleaseLayer>("releaseLayer"),
                         InstanceMethod<&EngineHandle::EndStep>("endStep"),
                         InstanceMethod<&EngineHandle::CaptureBegin>("captureBegin"),
                         InstanceMethod<&EngineHandle::CaptureEnd>("captureEnd"),
                         InstanceMethod<&EngineHandle::Replay>("replay"),
                         InstanceMethod<&EngineHandle::DevicePointer>("devicePointer"),
                         InstanceMethod<&EngineHandle::StreamHandle>("streamHandle"),
                         InstanceMethod<&EngineHandle::Synchronize>("synchronize"),
                         InstanceMethod<&EngineHandle::MemoryInfo>("memoryInfo"),
                         InstanceMethod<&EngineHandle::MeasureBandwidth>("measureBandwidth"),
                         InstanceMethod<&EngineHandle::ProfileRange>("profileRange"),
                     });
}

// new Engine({ backend: 'cpu' | 'cuda', device?: number, threads?: number, arenaBytes?: number, poison?: boolean })
EngineHandle::EngineHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineHandle>(info) {
  Napi::Env env = info.Env();
  guard(env, "createEngine", [&]() -> Napi::Value {
    const char* op = "createEngine";
    Napi::Value options = info[0];
    WEFT_TYPE_CHECK(options.IsObject(), op, "options must be an object (got ", describe(options), ")");
    Napi::Object o = options.As<Napi::Object>();
    Napi::Value backend = o.Get("backend");
    std::string kind = backend.IsString() ? backend.As<Napi::String>().Utf8Value() : "";
    WEFT_CHECK(kind == "cpu" || kind == "cuda", op, "options.backend must be 'cpu' or 'cuda' (got ",
               backend.IsString() ? "'" + kind + "'" : describe(backend), ")");
    auto optional_int = [&](const char* key, int64_t fallback, int64_t min, int64_t max) {
      Napi::Value v = o.Get(key);
      if (v.IsUndefined()) return fallback;
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1e300;
      WEFT_CHECK(std::trunc(d) == d && d >= static_cast<double>(min) && d <= static_cast<double>(max), op,
                 "options.", key, " must be an integer in [", min, ", ", max, "] (got ", describe(v), ")");
      return static_cast<int64_t>(d);
    };
    int64_t device = optional_int("device", 0, 0, 1023);
    int64_t default_threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
    int64_t threads = optional_int("threads", default_threads, 1, 1024);
    CudaOptions cuda;
    cuda.device = static_cast<int>(device);
    cuda.arena_bytes = static_cast<size_t>(
        optional_int("arenaBytes", static_cast<int64_t>(cuda.arena_bytes), 0, int64_t{1} << 50));
    Napi::Value poison = o.Get("poison");
    WEFT_CHECK(poison.IsUndefined() || poison.IsBoolean(), op, "options.poison must be a boolean (got ",
               describe(poison), ")");
    cuda.poison = poison.IsBoolean() && poison.As<Napi::Boolean>().Value();
    backend_ = kind == "cuda" ? make_cuda_backend(cuda) : make_cpu_backend(static_cast<int>(threads));
    Napi::Object self = info.This().As<Napi::Object>();
    self.TypeTag(&kEngineTag);
    self.DefineProperty(
        Napi::PropertyDescriptor::Value("backend", Napi::String::New(env, backend_->name()), napi_enumerable));
    return env.Undefined();
  });
}

Napi::Value EngineHandle::Wrap(Napi::Env env, Tensor tensor) const {
  return TensorHandle::Wrap(env, backend_, std::move(tensor));
}

Napi::Value EngineHandle::Upload(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "upload", [&] {
    Args a(info, "upload", this);
    auto bytes = a.uint8_array(0, "bytes");
    return Wrap(info.Env(), backend_->upload(bytes.data, bytes.length, a.dtype(1, "dtype"), a.shape(2, "shape")));
  });
}

// uploadQuantized(bytes, 'i8' | 'i4', shape, scales): Backend::upload_quantized.
Napi::Value EngineHandle::UploadQuantized(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "uploadQuantized", [&] {
    Args a(info, "uploadQuantized", this);
    auto bytes = a.uint8_array(0, "bytes");
    Napi::Value kind = a[1];
    const std::string k = kind.IsString() ? kind.As<Napi::String>().Utf8Value() : "";
    WEFT_CHECK(k == "i8" || k == "i4", "uploadQuantized", "dtype must be 'i8' or 'i4' (got ",
               kind.IsString() ? "'" + k + "'" : describe(kind), ")");
    return Wrap(info.Env(), backend_->upload_quantized(bytes.data, bytes.length, k == "i8" ? DType::I8 : DType::I4,
                                                       a.shape(2, "shape"), a.tensor(3, "scales")));
  });
}

Napi::Value EngineHandle::Download(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "download", [&]() -> Napi::Value {
    Tensor t = Args(info, "download", this).tensor(0, "t");
    size_t n = static_cast<size_t>(t.numel());
    if (t.dtype == DType::I32) {
      auto out = Napi::Int32Array::New(info.Env(), n);
      backend_->download(t, out.Data());
      return out;
    }
    auto out = Napi::Float32Array::New(info.Env(), n);
    backend_->download(t, out.Data());
    return out;
  });
}

namespace {
// downloadAsync's promise: the wait runs on a thread of the JS thread pool, the copy into a fresh typed array
// (and the device-status check) back on the JS thread.
class DownloadWorker final : public Napi::AsyncWorker {
 public:
  DownloadWorker(Napi::Env env, std::shared_ptr<Backend> owner, std::unique_ptr<PendingDownload> pending, DType dtype,
                 size_t numel)
      : Napi::AsyncWorker(env, "weft.downloadAsync"),
        owner_(std::move(owner)),
        pending_(std::move(pending)),
        dtype_(dtype),
        numel_(numel),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override { pending_->wait(); }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      if (dtype_ == DType::I32) {
        auto out = Napi::Int32Array::New(env, numel_);
        pending_->finish(out.Data());
        deferred_.Resolve(out);
      } else {
        auto out = Napi::Float32Array::New(env, numel_);
        pending_->finish(out.Data());
        deferred_.Resolve(out);
      }
    } catch (const weft::Error& e) {
      deferred_.Reject(to_js_error(env, e).Value());
    } catch (const std::exception& e) {
      deferred_.Reject(to_js_error(env, weft::Error("downloadAsync", e.what())).Value());
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  std::shared_ptr<Backend> owner_;  // declared first: outlives pending_, which may hold a slot of its staging
  std::unique_ptr<PendingDownload> pending_;
  DType dtype_;
  size_t numel_;
  Napi::Promise::Deferred deferred_;
};
}  // namespace

Napi::Value EngineHandle::DownloadAsync(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "downloadAsync", [&]() -> Napi::Value {
    Tensor t = Args(info, "downloadAsync", this).tensor(0, "t");
    auto* worker = new DownloadWorker(info.Env(), backend_, backend_->download_async(t), t.dtype,
                                      static_cast<size_t>(t.numel()));
    Napi::Promise promise = worker->promise();
    worker->Queue();  // deletes itself after OnOK / OnError
    return promise;
  });
}

Napi::Value EngineHandle::FeedTokens(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "feedTokens", [&]() -> Napi::Value {
    Args a(info, "feedTokens", this);
    backend_->feed_tokens(a.tensor(0, "ids"), a.tensor(1, "from"), a.tensor(2, "src"));
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::Zeros(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "zeros", [&] {
    Args a(info, "zeros", this);
    return Wrap(info.Env(), backend_->zeros(a.dtype(0, "dtype"), a.shape(1, "shape")));
  });
}

Napi::Value EngineHandle::Embedding(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "embedding", [&] {
    Args a(info, "embedding", this);
    return Wrap(info.Env(), backend_->embedding(a.tensor(0, "table"), a.tensor(1, "ids"), a.integer(2, "vocabStart")));
  });
}

Napi::Value EngineHandle::RmsNorm(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "rmsNorm", [&] {
    Args a(info, "rmsNorm", this);
    return Wrap(info.Env(), backend_->rms_norm(a.tensor(0, "x"), a.tensor(1, "weight"),
                                               static_cast<float>(a.number(2, "eps"))));
  });
}

Napi::Value EngineHandle::Matmul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "matmul", [&] {
    Args a(info, "matmul", this);
    return Wrap(info.Env(), backend_->matmul(a.tensor(0, "x"), a.tensor(1, "w")));
  });
}

Napi::Value EngineHandle::Add(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "add", [&] {
    Args a(info, "add", this);
    return Wrap(info.Env(), backend_->add(a.tensor(0, "a"), a.tensor(1, "b")));
  });
}

Napi::Value EngineHandle::Rope(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "rope", [&] {
    Args a(info, "rope", this);
    return Wrap(info.Env(), backend_->rope(a.tensor(0, "x"), a.tensor(1, "positions"), a.tensor(2, "invFreq"),
                                           a.integer(3, "headDim")));
  });
}

Napi::Value EngineHandle::WriteKv(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "writeKv", [&]() -> Napi::Value {
    Args a(info, "writeKv", this);
    backend_->write_kv(a.tensor(0, "kCache"), a.tensor(1, "vCache"), a.tensor(2, "k"), a.tensor(3, "v"),
                       a.tensor(4, "tokenSeq"), a.tensor(5, "kvBlockTable"), a.tensor(6, "positions"));
    return info.Env().Undefined();
  });
}

namespace {
// call(attention's arguments): q, kCache, vCache, tokenSeq, kvBlockTable, positions, nHeads, scale, which
// sageAttention's start with.
template <typename Call>
auto with_attention_args(const Args& a, Call&& call) {
  return call(a.tensor(0, "q"), a.tensor(1, "kCache"), a.tensor(2, "vCache"), a.tensor(3, "tokenSeq"),
              a.tensor(4, "kvBlockTable"), a.tensor(5, "positions"), a.integer(6, "nHeads"),
              static_cast<float>(a.number(7, "scale")));
}

// An optional trailing decodeRows (Backend::attention): 0 where absent.
int64_t decode_rows_arg(const Napi::CallbackInfo& info, const Args& a, size_t i) {
  return info.Length() > i && !info[i].IsUndefined() ? a.integer(i, "decodeRows") : 0;
}
}  // namespace

Napi::Value EngineHandle::Attention(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "attention", [&] {
    Args a(info, "attention", this);
    const int64_t decode_rows = decode_rows_arg(info, a, 8);
    return Wrap(info.Env(), with_attention_args(a, [&](auto&&... args) {
                  return backend_->attention(args..., decode_rows);
                }));
  });
}

Napi::Value EngineHandle::AttentionBifurcated(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "attentionBifurcated", [&] {
    Args a(info, "attentionBifurcated", this);
    return Wrap(info.Env(), backend_->attention_bifurcated(
                                a.tensor(0, "q"), a.tensor(1, "kCache"), a.tensor(2, "vCache"), a.tensor(3, "tokenSeq"),
                                a.tensor(4, "kvBlockTable"), a.tensor(5, "positions"), a.tensor(6, "tokenGroup"),
                                a.tensor(7, "groupShared"), a.integer(8, "nHeads"),
                                static_cast<float>(a.number(9, "scale"))));
  });
}

Napi::Value EngineHandle::Copy(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "copy", [&]() -> Napi::Value {
    Args a(info, "copy", this);
    backend_->copy(a.tensor(0, "dst"), a.tensor(1, "src"));
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::AddRmsNorm(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "addRmsNorm", [&]() -> Napi::Value {
    Args a(info, "addRmsNorm", this);
    Backend::SumAndNormed r = backend_->add_rms_norm(a.tensor(0, "x"), a.tensor(1, "y"), a.tensor(2, "weight"),
                                                     static_cast<float>(a.number(3, "eps")));
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("sum", Wrap(info.Env(), std::move(r.sum)));
    out.Set("normed", Wrap(info.Env(), std::move(r.normed)));
    return out;
  });
}

Napi::Value EngineHandle::QkvRope(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "qkvRope", [&] {
    Args a(info, "qkvRope", this);
    return Wrap(info.Env(), backend_->qkv_rope(a.tensor(0, "qkv"), a.tensor(1, "positions"), a.tensor(2, "invFreq"),
                                               a.tensor(3, "kCache"), a.tensor(4, "vCache"), a.tensor(5, "tokenSeq"),
                                               a.tensor(6, "kvBlockTable"), a.integer(7, "nHeads")));
  });
}

Napi::Value EngineHandle::SparqAppend(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sparqAppend", [&]() -> Napi::Value {
    Args a(info, "sparqAppend", this);
    backend_->sparq_append(a.tensor(0, "kT"), a.tensor(1, "vSum"), a.tensor(2, "kCache"), a.tensor(3, "vCache"),
                           a.tensor(4, "tokenSeq"), a.tensor(5, "kvBlockTable"), a.tensor(6, "positions"));
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::SparqAttention(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sparqAttention", [&] {
    Args a(info, "sparqAttention", this);
    return Wrap(info.Env(), backend_->sparq_attention(
                                a.tensor(0, "q"), a.tensor(1, "kCache"), a.tensor(2, "vCache"), a.tensor(3, "kT"),
                                a.tensor(4, "vSum"), a.tensor(5, "tokenSeq"), a.tensor(6, "kvBlockTable"),
                                a.tensor(7, "positions"), a.tensor(8, "sparqR"), a.tensor(9, "sparqK"),
                                a.integer(10, "nHeads"), static_cast<float>(a.number(11, "scale"))));
  });
}

Napi::Value EngineHandle::SageAttention(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sageAttention", [&] {
    Args a(info, "sageAttention", this);
    // sageState: [header, means, blocks, slots] (sage-state.h), or absent
    std::optional<SageState> state;
    if (info.Length() > 9 && !info[9].IsUndefined()) {
      std::vector<Tensor> parts = a.tensors(9, "sageState");
      WEFT_CHECK(parts.size() == 4, "sageAttention", "sageState must be [header, means, blocks, slots] (got ",
                 parts.size(), " tensors)");
      state = SageState{parts[0], parts[1], parts[2], parts[3]};
    }
    const int64_t decode_rows = decode_rows_arg(info, a, 10);
    return Wrap(info.Env(), with_attention_args(a, [&](auto&&... args) {
                  return backend_->sage_attention(args..., a.dtype(8, "pv"), state ? &*state : nullptr, decode_rows);
                }));
  });
}

Napi::Value EngineHandle::SiluMul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "siluMul", [&] {
    Args a(info, "siluMul", this);
    return Wrap(info.Env(), backend_->silu_mul(a.tensor(0, "gateUp")));
  });
}

Napi::Value EngineHandle::SliceCols(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sliceCols", [&] {
    Args a(info, "sliceCols", this);
    return Wrap(info.Env(), backend_->slice_cols(a.tensor(0, "x"), a.integer(1, "start"), a.integer(2, "end")));
  });
}

Napi::Value EngineHandle::ConcatCols(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "concatCols", [&] {
    Args a(info, "concatCols", this);
    return Wrap(info.Env(), backend_->concat_cols(a.tensors(0, "xs")));
  });
}

Napi::Value EngineHandle::GatherRows(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "gatherRows", [&] {
    Args a(info, "gatherRows", this);
    return Wrap(info.Env(), backend_->gather_rows(a.tensor(0, "x"), a.tensor(1, "rows")));
  });
}

Napi::Value EngineHandle::RouteTopK(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "routeTopK", [&]() -> Napi::Value {
    Args a(info, "routeTopK", this);
    std::optional<Tensor> rows_in_use;  // optional trailing rowsInUse
    if (info.Length() > 2 && !info[2].IsUndefined()) rows_in_use = a.tensor(2, "rowsInUse");
    Backend::Routing r =
        backend_->route_top_k(a.tensor(0, "logits"), a.integer(1, "k"), rows_in_use ? &*rows_in_use : nullptr);
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("experts", Wrap(info.Env(), std::move(r.experts)));
    out.Set("weights", Wrap(info.Env(), std::move(r.weights)));
    return out;
  });
}

Napi::Value EngineHandle::ExpertMatmul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "expertMatmul", [&] {
    Args a(info, "expertMatmul", this);
    return Wrap(info.Env(), backend_->expert_matmul(a.tensor(0, "x"), a.tensor(1, "w"), a.tensor(2, "experts"),
                                                    a.integer(3, "expertStart")));
  });
}

Napi::Value EngineHandle::SiluMulMatmul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "siluMulMatmul", [&] {
    Args a(info, "siluMulMatmul", this);
    return Wrap(info.Env(), backend_->silu_mul_matmul(a.tensor(0, "gateUp"), a.tensor(1, "w")));
  });
}

Napi::Value EngineHandle::MatmulSiluMul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "matmulSiluMul", [&] {
    Args a(info, "matmulSiluMul", this);
    return Wrap(info.Env(), backend_->matmul_silu_mul(a.tensor(0, "x"), a.tensor(1, "w")));
  });
}

Napi::Value EngineHandle::SiluMulExpertMatmul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "siluMulExpertMatmul", [&] {
    Args a(info, "siluMulExpertMatmul", this);
    return Wrap(info.Env(), backend_->silu_mul_expert_matmul(a.tensor(0, "gateUp"), a.tensor(1, "w"),
                                                             a.tensor(2, "experts"), a.integer(3, "expertStart")));
  });
}

Napi::Value EngineHandle::CombineExperts(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "combineExperts", [&] {
    Args a(info, "combineExperts", this);
    return Wrap(info.Env(), backend_->combine_experts(a.tensor(0, "y"), a.tensor(1, "weights")));
  });
}

Napi::Value EngineHandle::LogSoftmax(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "logSoftmax", [&] {
    Args a(info, "logSoftmax", this);
    return Wrap(info.Env(), backend_->log_softmax(a.tensor(0, "logits")));
  });
}

Napi::Value EngineHandle::Logprobs(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "logprobs", [&]() -> Napi::Value {
    Args a(info, "logprobs", this);
    Tensor logits = a.tensor(0, "logits");
    auto ids = a.int32_array(1, "ids");
    auto result = Napi::Float32Array::New(info.Env(), ids.length);
    backend_->logprobs(logits, ids.data, ids.length, result.Data());
    return result;
  });
}

Napi::Value EngineHandle::TopLogprobs(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "topLogprobs", [&] {
    Args a(info, "topLogprobs", this);
    return Wrap(info.Env(), backend_->top_logprobs(a.tensor(0, "logits"), a.tensor(1, "rows"), a.tensor(2, "ids"),
                                                   a.integer(3, "k")));
  });
}

Napi::Value EngineHandle::Sample(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sample", [&]() -> Napi::Value {
    Args a(info, "sample", this);
    Tensor logits = a.tensor(0, "logits");
    auto temperature = a.float32_array(1, "temperature");
    auto top_k = a.int32_array(2, "topK");
    auto top_p = a.float32_array(3, "topP");
    auto uniform = a.float32_array(4, "uniform");
    size_t rows = temperature.length;
    WEFT_CHECK(top_k.length == rows && top_p.length == rows && uniform.length == rows, "sample",
               "temperature, topK, topP and uniform must have one length (got ", temperature.length, ", ",
               top_k.length, ", ", top_p.length, ", ", uniform.length, ")");
    auto result = Napi::Int32Array::New(info.Env(), rows);
    backend_->sample(logits, {temperature.data, top_k.data, top_p.data, uniform.data}, rows, result.Data());
    return result;
  });
}

Napi::Value EngineHandle::SampleTensor(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "sampleTensor", [&] {
    Args a(info, "sampleTensor", this);
    return Wrap(info.Env(), backend_->sample_tensor(a.tensor(0, "logits"), a.tensor(1, "temperature"),
                                                    a.tensor(2, "topK"), a.tensor(3, "topP"), a.tensor(4, "uniform")));
  });
}

Napi::Value EngineHandle::RandomUniform(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "randomUniform", [&] {
    Args a(info, "randomUniform", this);
    DType dtype = a.dtype(0, "dtype");
    Shape shape = a.shape(1, "shape");
    int64_t seed = a.integer(2, "seed");
    WEFT_CHECK(seed >= 0, "randomUniform", "seed must be an integer >= 0 (got ", seed, ")");
    return Wrap(info.Env(), backend_->random_uniform(dtype, shape, static_cast<uint64_t>(seed),
                                                     static_cast<float>(a.number(3, "scale"))));
  });
}

Napi::Value EngineHandle::Write(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "write", [&]() -> Napi::Value {
    Args a(info, "write", this);
    Tensor t = a.tensor(0, "t");
    auto bytes = a.uint8_array(1, "bytes");
    backend_->write(t, bytes.data, bytes.length);
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::BeginStep(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "beginStep", [&]() -> Napi::Value {
    Args a(info, "beginStep", this);
    backend_->begin_step();
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::LayerMark(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "layerMark", [&]() -> Napi::Value {
    Args a(info, "layerMark", this);
    return Napi::Number::New(info.Env(), static_cast<double>(backend_->layer_mark()));
  });
}

Napi::Value EngineHandle::ReleaseLayer(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "releaseLayer", [&]() -> Napi::Value {
    Args a(info, "releaseLayer", this);
    int64_t mark = a.integer(0, "mark");
    WEFT_CHECK(mark >= 0, "releaseLayer", "mark must be a number layerMark() returned (got ", mark, ")");
    std::vector<Tensor> kept = backend_->release_layer(static_cast<uint64_t>(mark), a.tensors(1, "keep"));
    Napi::Array out = Napi::Array::New(info.Env(), kept.size());
    for (size_t i = 0; i < kept.size(); ++i) out.Set(static_cast<uint32_t>(i), Wrap(info.Env(), std::move(kept[i])));
    return out;
  });
}

Napi::Value EngineHandle::EndStep(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "endStep", [&]() -> Napi::Value {
    Args a(info, "endStep", this);
    backend_->end_step();
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::CaptureBegin(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "captureBegin", [&]() -> Napi::Value {
    Args a(info, "captureBegin", this);
    backend_->capture_begin();
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::CaptureEnd(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "captureEnd", [&]() -> Napi::Value {
    Args a(info, "captureEnd", this);
    return GraphHandle::Wrap(info.Env(), backend_, backend_->capture_end());
  });
}

Napi::Value EngineHandle::Replay(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "replay", [&]() -> Napi::Value {
    Args a(info, "replay", this);
    GraphHandle* g = GraphHandle::FromValue(info[0]);
    WEFT_TYPE_CHECK(g != nullptr, "replay", "graph must be a weft Graph (got ", describe(info[0]), ")");
    WEFT_CHECK(g->graph() != nullptr, "replay", "graph was disposed");
    WEFT_CHECK(g->owner() == backend_.get(), "replay", "graph belongs to a different engine");
    backend_->replay(*g->graph());
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::DevicePointer(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "devicePointer", [&]() -> Napi::Value {
    Args a(info, "devicePointer", this);
    return Napi::BigInt::New(info.Env(), backend_->device_pointer(a.tensor(0, "t")));
  });
}

Napi::Value EngineHandle::StreamHandle(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "streamHandle", [&]() -> Napi::Value {
    Args a(info, "streamHandle", this);
    return Napi::BigInt::New(info.Env(), backend_->stream_handle());
  });
}

Napi::Value EngineHandle::Synchronize(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "synchronize", [&]() -> Napi::Value {
    Args a(info, "synchronize", this);
    backend_->synchronize();
    return info.Env().Undefined();
  });
}

Napi::Value EngineHandle::MemoryInfo(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "memoryInfo", [&]() -> Napi::Value {
    Args a(info, "memoryInfo", this);
    weft::MemoryInfo m = backend_->memory_info();
    Napi::Object out = Napi::Object::New(info.Env());
    out.Set("free", Napi::Number::New(info.Env(), m.free));
    out.Set("total", Napi::Number::New(info.Env(), m.total));
    return out;
  });
}

Napi::Value EngineHandle::MeasureBandwidth(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "measureBandwidth", [&]() -> Napi::Value {
    Args a(info, "measureBandwidth", this);
    int64_t bytes = a.integer(0, "bytes");
    int64_t iterations = a.integer(1, "iterations");
    WEFT_CHECK(bytes > 0 && iterations > 0, "measureBandwidth", "bytes and iterations must be > 0 (got ", bytes,
               ", ", iterations, ")");
    return Napi::Number::New(info.Env(), backend_->measure_bandwidth(static_cast<size_t>(bytes),
                                                                      static_cast<int>(iterations)));
  });
}

Napi::Value EngineHandle::ProfileRange(const Napi::CallbackInfo& info) {
  return guard(info.Env(), "profileRange", [&]() -> Napi::Value {
    Args a(info, "profileRange", this);
    WEFT_TYPE_CHECK(a[0].IsBoolean(), "profileRange", "on must be a boolean (got ", describe(a[0]), ")");
    backend_->profile_range(a[0].As<Napi::Boolean>().Value());
    return info.Env().Undefined();
  });
}

// ---- module

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);  // deleted by node-addon-api when the environment is torn down
  data->tensor_class = Napi::Persistent(TensorHandle::Define(env));
  data->graph_class = Napi::Persistent(GraphHandle::Define(env));
  exports.Set("Engine", EngineHandle::Define(env));
  exports.Set("nativeInfo", Napi::Function::New<nativeInfo>(env, "nativeInfo"));
  exports.Set("cudaReport", Napi::Function::New<cudaReport>(env, "cudaReport"));
  InitSharedGpu(env, exports);
  return exports;
}

}  // namespace weft::js
