#include "server/worker_pool.h"

#include <algorithm>
#include <utility>

namespace emoserve {

WorkerPool::WorkerPool(int threads, int max_pending)
    : max_pending_(static_cast<size_t>(std::max(1, max_pending))) {
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads_.reserve(threads);
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& thread : threads_) thread.join();
}

bool WorkerPool::TryPost(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  if (tasks_.size() >= max_pending_) return false;
  tasks_.push_back(std::move(task));
  return true;
}

bool WorkerPool::HasWorkOrStopping() const { return stopping_ || !tasks_.empty(); }

void WorkerPool::Run() {
  for (;;) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &WorkerPool::HasWorkOrStopping));
      if (tasks_.empty()) return;  // stopping, nothing left
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

}  // namespace emoserve
