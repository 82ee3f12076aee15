#include "cuda/graphs.h"

#include "error.h"

namespace weft::cuda {
namespace {

class CudaGraph final : public Graph {
 public:
  CudaGraph(cudaGraphExec_t exec, std::shared_ptr<DeviceState> st, std::shared_ptr<GraphRegion> region)
      : exec_(exec), st_(std::move(st)), region_(std::move(region)) {}
  ~CudaGraph() override {
    cudaSetDevice(st_->device);
    cudaGraphExecDestroy(exec_);
  }
  cudaGraphExec_t exec() const { return exec_; }

 private:
  cudaGraphExec_t exec_;
  std::shared_ptr<DeviceState> st_;
  std::shared_ptr<GraphRegion> region_;
};

}  // namespace

void GraphCapture::begin() {
  synchronize(*st_, "captureBegin");
  region_ = std::make_shared<GraphRegion>();
  check_cuda(*st_, cudaStreamBeginCapture(st_->stream, cudaStreamCaptureModeRelaxed), "captureBegin");
  set_capturing(*st_, true);
}

std::shared_ptr<Graph> GraphCapture::end() {
  set_capturing(*st_, false);
  std::shared_ptr<GraphRegion> region = std::move(region_);
  arena_.close_region(region);
  cudaGraph_t graph = nullptr;
  check_cuda(*st_, cudaStreamEndCapture(st_->stream, &graph), "captureEnd",
             " (the capture failed: an op in it synchronised, allocated or copied from the host, or an error happened "
             "inside it)");
  cudaGraphExec_t exec = nullptr;
  cudaError_t e = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(*st_, e, "captureEnd", " (instantiating the graph)");
  return std::make_shared<CudaGraph>(exec, st_, std::move(region));
}

void GraphCapture::replay(const Graph& graph) {
  check_cuda(*st_, cudaGraphLaunch(static_cast<const CudaGraph&>(graph).exec(), st_->stream), "replay");
}

}  // namespace weft::cuda
