// A small persistent thread pool for the CPU backend's heavy ops (matmul rows, attention token x head pairs).
//
// parallel_for(n, grain, fn) splits [0, n) into chunks of at least `grain` items (about four per thread),
// hands them out dynamically to the workers and the calling thread, and returns when all are done; with
// n <= grain it just calls fn(0, n) on the calling thread. An exception thrown by fn is rethrown on
// the calling thread (the remaining chunks are skipped). Not reentrant: fn must not call parallel_for.
// One pool belongs to one engine, which is used from one JS thread.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace weft::cpu {

class ThreadPool {
 public:
  // threads: total parallelism, the calling thread included; threads - 1 workers are started.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0, grain = 1;
    std::atomic<int64_t> next{0};
    std::atomic<int> pending{0};  // workers that have not yet finished this job
    std::mutex error_mutex;
    std::exception_ptr error;
  };
  static void work_on(Job& job);
  void worker_loop();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;  // workers wait for a new generation (or stop)
  std::condition_variable done_;  // the caller waits for pending == 0
  uint64_t generation_ = 0;
  Job* job_ = nullptr;
  bool stop_ = false;
};

}  // namespace weft::cpu
