// A fixed pool of threads for the service's blocking work (decoding and
// resampling whole files), so that gRPC's few callback threads only hand
// work over.
#ifndef EMOSERVE_SERVER_WORKER_POOL_H_
#define EMOSERVE_SERVER_WORKER_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace emoserve {

class WorkerPool {
 public:
  // `threads` <= 0: one per core. At most `max_pending` tasks wait.
  WorkerPool(int threads, int max_pending);
  // Runs the tasks already posted, then joins.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // False (and `task` is dropped) when max_pending tasks already wait.
  bool TryPost(std::function<void()> task);

 private:
  void Run();
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t max_pending_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_WORKER_POOL_H_
