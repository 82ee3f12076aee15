// CUDA graph capture and replay on the engine stream. Arena tensors made while a capture is open belong to its
// GraphRegion, which stays reserved in the step arena while the graph or any of those tensors lives; persistent
// frees during a capture wait until it ends (memory.h). Plain C++ (no kernels).
#pragma once

#include <memory>

#include "backend.h"
#include "cuda/device.h"
#include "cuda/memory.h"

namespace weft::cuda {

class GraphCapture {
 public:
  GraphCapture(std::shared_ptr<DeviceState> st, StepArena& arena) : st_(std::move(st)), arena_(arena) {}
  // Waits for queued work (and reports device errors), then starts recording the stream.
  void begin();
  // Ends the recording and instantiates the graph; throws if an op in it could not be captured.
  std::shared_ptr<Graph> end();
  void replay(const Graph& graph);
  // The open capture's region (null outside a capture once end() ran).
  const std::shared_ptr<GraphRegion>& region() const { return region_; }

 private:
  std::shared_ptr<DeviceState> st_;
  StepArena& arena_;
  std::shared_ptr<GraphRegion> region_;
};

}  // namespace weft::cuda
