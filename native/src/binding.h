// The JS classes of the addon. Engine owns a Backend; Tensor is an opaque handle to one weft::Tensor and
// keeps its backend alive. Both are type-tagged (napi_type_tag_object), so a foreign object passed where a
// handle is expected is refused with a TypeError instead of being dereferenced.
#pragma once

#include <napi.h>

#include <memory>

#include "backend.h"
#include "tensor.h"

namespace weft::js {

class TensorHandle : public Napi::ObjectWrap<TensorHandle> {
 public:
  static Napi::Function Define(Napi::Env env);
  // The only way to make a JS Tensor: `new Tensor()` from JS throws.
  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<Backend> owner, Tensor tensor);
  // Unwraps `value` if it is a Tensor of this addon, else nullptr.
  static TensorHandle* FromValue(Napi::Value value);

  explicit TensorHandle(const Napi::CallbackInfo& info);
  ~TensorHandle() override;

  const Tensor& tensor() const { return tensor_; }
  const Backend* owner() const { return owner_.get(); }
  bool disposed() const { return tensor_.buffer == nullptr; }

 private:
  // tensor.dispose(): frees the storage now instead of at garbage collection (Node runs N-API finalizers
  // only after the current synchronous JS returns, so a long synchronous forward pass would otherwise hold
  // every intermediate). Later use of the handle throws; disposing twice is a no-op.
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  void ReleaseAccounting();

  std::shared_ptr<Backend> owner_;
  Tensor tensor_;
  napi_env env_;
  int64_t accounted_bytes_ = 0;  // reported to V8 as external memory (when a release frees it), so large tensors prompt a GC
};

// A captured graph (engine.captureEnd()); freed when collected or disposed.
class GraphHandle : public Napi::ObjectWrap<GraphHandle> {
 public:
  static Napi::Function Define(Napi::Env env);
  static Napi::Object Wrap(Napi::Env env, std::shared_ptr<Backend> owner, std::shared_ptr<Graph> graph);
  static GraphHandle* FromValue(Napi::Value value);
  explicit GraphHandle(const Napi::CallbackInfo& info);

  const Graph* graph() const { return graph_.get(); }
  const Backend* owner() const { return owner_.get(); }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  std::shared_ptr<Backend> owner_;
  std::shared_ptr<Graph> graph_;
};

class EngineHandle : public Napi::ObjectWrap<EngineHandle> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit EngineHandle(const Napi::CallbackInfo& info);
  const std::shared_ptr<Backend>& backend() const { return backend_; }

 private:
  Napi::Value Wrap(Napi::Env env, Tensor tensor) const;

  Napi::Value Upload(const Napi::CallbackInfo& info);
  Napi::Value UploadQuantized(const Napi::CallbackInfo& info);
  Napi::Value Download(const Napi::CallbackInfo& info);
  Napi::Value DownloadAsync(const Napi::CallbackInfo& info);
  Napi::Value FeedTokens(const Napi::CallbackInfo& info);
  Napi::Value Zeros(const Napi::CallbackInfo& info);
  Napi::Value Embedding(const Napi::CallbackInfo& info);
  Napi::Value RmsNorm(const Napi::CallbackInfo& info);
  Napi::Value Matmul(const Napi::CallbackInfo& info);
  Napi::Value Add(const Napi::CallbackInfo& info);
  Napi::Value Rope(const Napi::CallbackInfo& info);
  Napi::Value WriteKv(const Napi::CallbackInfo& info);
  Napi::Value Attention(const Napi::CallbackInfo& info);
  Napi::Value AttentionBifurcated(const Napi::CallbackInfo& info);
  Napi::Value Copy(const Napi::CallbackInfo& info);
  Napi::Value AddRmsNorm(const Napi::CallbackInfo& info);
  Napi::Value QkvRope(const Napi::CallbackInfo& info);
  Napi::Value SparqAppend(const Napi::CallbackInfo& info);
  Napi::Value SparqAttention(const Napi::CallbackInfo& info);
  Napi::Value SageAttention(const Napi::CallbackInfo& info);
  Napi::Value SiluMul(const Napi::CallbackInfo& info);
  Napi::Value SliceCols(const Napi::CallbackInfo& info);
  Napi::Value ConcatCols(const Napi::CallbackInfo& info);
  Napi::Value LayerMark(const Napi::CallbackInfo& info);
  Napi::Value ReleaseLayer(const Napi::CallbackInfo& info);
  Napi::Value GatherRows(const Napi::CallbackInfo& info);
  Napi::Value RouteTopK(const Napi::CallbackInfo& info);
  Napi::Value ExpertMatmul(const Napi::CallbackInfo& info);
  Napi::Value CombineExperts(const Napi::CallbackInfo& info);
  Napi::Value SiluMulMatmul(const Napi::CallbackInfo& info);
  Napi::Value MatmulSiluMul(const Napi::CallbackInfo& info);
  Napi::Value SiluMulExpertMatmul(const Napi::CallbackInfo& info);
  Napi::Value LogSoftmax(const Napi::CallbackInfo& info);
  Napi::Value Logprobs(const Napi::CallbackInfo& info);
  Napi::Value TopLogprobs(const Napi::CallbackInfo& info);
  Napi::Value Sample(const Napi::CallbackInfo& info);
  Napi::Value SampleTensor(const Napi::CallbackInfo& info);
  Napi::Value RandomUniform(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value BeginStep(const Napi::CallbackInfo& info);
  Napi::Value EndStep(const Napi::CallbackInfo& info);
  Napi::Value CaptureBegin(const Napi::CallbackInfo& info);
  Napi::Value CaptureEnd(const Napi::CallbackInfo& info);
  Napi::Value Replay(const Napi::CallbackInfo& info);
  Napi::Value DevicePointer(const Napi::CallbackInfo& info);
  Napi::Value StreamHandle(const Napi::CallbackInfo& info);
  Napi::Value Synchronize(const Napi::CallbackInfo& info);
  Napi::Value MemoryInfo(const Napi::CallbackInfo& info);
  Napi::Value MeasureBandwidth(const Napi::CallbackInfo& info);
  Napi::Value ProfileRange(const Napi::CallbackInfo& info);

  std::shared_ptr<Backend> backend_;
};

// Registers Engine and nativeInfo on exports (Tensor is reachable only through engine results).
Napi::Object Init(Napi::Env env, Napi::Object exports);

}  // namespace weft::js
