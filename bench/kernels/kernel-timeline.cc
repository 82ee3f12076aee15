// A CUDA injection library that writes every kernel's start and end on the GPU, kernel by kernel also inside CUDA
// graphs (CUPTI's concurrent-kernel activity: kernels keep overlapping as programmatic dependent launch lets them),
// for what ncu cannot show: ncu serialises kernels, so a kernel's time in the decode step's graph, where the next
// GEMV's blocks are placed and copy weights while the kernel before them runs, is not the sum of ncu's durations
// (bench/RESULTS.md, session 17). There is no nsys on the GPU host.
//   bash deploy/gpu-host.sh bash bench/kernels/timeline-run.sh [--kernel NAME] -- node --import tsx bench/decode.ts ...
// (builds it against the toolkit's CUPTI, runs the command with CUDA_INJECTION64_PATH set, summarises with
// timeline-summary.py).
// Rows: start_ns,end_ns,grid_x,graph_node_id,demangled name (graph_node_id 0 outside a graph), written as the process
// exits.
#include <cupti.h>
#include <cxxabi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr size_t kBufferBytes = 8 << 20;
std::mutex mu;
std::vector<std::string> rows;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = kBufferBytes;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    // Kernel5's fields (start, end, gridX, name, graphNodeId) lead every later version of the record.
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel5*>(record);
    char line[96];
    std::snprintf(line, sizeof line, "%llu,%llu,%d,%llu,", static_cast<unsigned long long>(k->start),
                  static_cast<unsigned long long>(k->end), k->gridX, static_cast<unsigned long long>(k->graphNodeId));
    int status = 0;
    char* demangled = k->name ? abi::__cxa_demangle(k->name, nullptr, nullptr, &status) : nullptr;
    std::string name = demangled ? demangled : k->name ? k->name : "?";
    std::free(demangled);
    for (char& c : name)
      if (c == '\n') c = ' ';
    rows.push_back(std::string(line) + name);
  }
  std::free(buffer);
}

void write_rows() {
  cuptiActivityFlushAll(1);
  const char* path = std::getenv("WEFT_TIMELINE_OUT");
  FILE* f = std::fopen(path ? path : "kernel-timeline.csv", "w");
  if (!f) return;
  std::lock_guard<std::mutex> lock(mu);
  for (const std::string& r : rows) std::fprintf(f, "%s\n", r.c_str());
  std::fclose(f);
}

}  // namespace

extern "C" int InitializeInjection() {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "kernel-timeline: CUPTI would not trace kernels\n");
    return 0;
  }
  // CUPTI hands a buffer over when it is full or flushed; the runtime may tear the context down before an atexit
  // handler runs, so flush as the process goes too.
  std::thread([] {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      cuptiActivityFlushAll(0);
    }
  }).detach();
  std::atexit(write_rows);
  return 1;
}
