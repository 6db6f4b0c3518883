// A server-wide budget of bytes for audio in flight (request bytes, decoded
// audio, stream windows), shared by every call. Each call holds a lease: it
// grows the lease before it allocates, gets kResourceExhausted when the
// budget cannot cover it, and gives everything back exactly once when the
// lease is destroyed. The last part of the budget may be kept for small
// leases, so that a few large calls filling it do not lock normal ones out.
#ifndef EMOSERVE_CORE_MEMORY_BUDGET_H_
#define EMOSERVE_CORE_MEMORY_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"

namespace emoserve {

// The last `bytes` of a budget's capacity go only to leases that hold at
// most `small_lease_bytes` (what they ask for included).
struct SmallLeaseReserve {
  int64_t bytes = 0;
  int64_t small_lease_bytes = 0;

  // An eighth of the capacity, for leases of up to 1/128 of it: at least
  // 16 small leases fit in the reserve whatever large ones hold.
  static SmallLeaseReserve EighthOf(int64_t capacity_bytes) {
    return {capacity_bytes / 8, capacity_bytes / 128};
  }
};

class MemoryBudget {
 public:
  // `on_change` (may be null) is told the bytes in use after every change,
  // from whichever thread made it. `name` says in refusals what is full.
  explicit MemoryBudget(int64_t capacity_bytes,
                        std::function<void(int64_t used_bytes)> on_change = nullptr,
                        std::string name = "the memory for audio in flight",
                        SmallLeaseReserve reserve = {});
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  int64_t capacity() const { return capacity_; }
  // Acquire, paired with Give's release: whoever sees the budget drained
  // may destroy it, whichever thread gave the last bytes back.
  int64_t used() const { return used_.load(std::memory_order_acquire); }

 private:
  friend class BudgetLease;
  // Adds `bytes` when they fit, atomically; kResourceExhausted otherwise.
  // `lease_bytes` is what the lease will hold with them.
  absl::Status Take(int64_t bytes, int64_t lease_bytes);
  void Give(int64_t bytes);

  const int64_t capacity_;
  std::atomic<int64_t> used_{0};
  const std::function<void(int64_t)> on_change_;
  const std::string name_;
  const SmallLeaseReserve reserve_;
};

// One call's share of a budget. Thread-safe. A lease without a budget
// (default-constructed) grants everything.
class BudgetLease {
 public:
  BudgetLease() = default;
  explicit BudgetLease(MemoryBudget* budget) : budget_(budget) {}
  ~BudgetLease();
  BudgetLease(const BudgetLease&) = delete;
  BudgetLease& operator=(const BudgetLease&) = delete;

  // Takes `bytes` more, or fails with kResourceExhausted (holding what it
  // held) when the budget cannot cover them.
  absl::Status Grow(int64_t bytes);
  // Gives back `bytes` (at most what it holds).
  void Shrink(int64_t bytes);
  // Grows or shrinks to hold exactly `bytes`. Not for concurrent use with
  // Grow/Shrink on the same lease.
  absl::Status Resize(int64_t bytes);

  int64_t bytes() const { return held_.load(std::memory_order_relaxed); }

 private:
  MemoryBudget* const budget_ = nullptr;
  std::atomic<int64_t> held_{0};
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_MEMORY_BUDGET_H_
