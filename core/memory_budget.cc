#include "core/memory_budget.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace emoserve {
namespace {

std::string Mib(int64_t bytes) {
  return absl::StrCat(static_cast<double>(bytes * 10 / (1 << 20)) / 10, " MiB");
}

}  // namespace

MemoryBudget::MemoryBudget(int64_t capacity_bytes,
                           std::function<void(int64_t)> on_change, std::string name,
                           SmallLeaseReserve reserve)
    : capacity_(capacity_bytes),
      on_change_(std::move(on_change)),
      name_(std::move(name)),
      reserve_(reserve) {}

absl::Status MemoryBudget::Take(int64_t bytes, int64_t lease_bytes) {
  const bool small = lease_bytes <= reserve_.small_lease_bytes;
  const int64_t usable = small ? capacity_ : capacity_ - reserve_.bytes;
  int64_t used = used_.load(std::memory_order_relaxed);
  do {
    if (bytes > usable - used) {
      return absl::ResourceExhaustedError(absl::StrCat(
          name_, " is full (", Mib(used), " of ", Mib(capacity_), " in use",
          small || reserve_.bytes == 0 ? "" : absl::StrCat(", the last ", Mib(reserve_.bytes), " kept for small calls"),
          "; this needs ", Mib(bytes), " more); retry with backoff or send shorter audio"));
    }
  } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  if (on_change_) on_change_(used + bytes);
  return absl::OkStatus();
}

void MemoryBudget::Give(int64_t bytes) {
  const int64_t used = used_.fetch_sub(bytes, std::memory_order_release) - bytes;
  if (on_change_) on_change_(used);
}

BudgetLease::~BudgetLease() { Shrink(bytes()); }

absl::Status BudgetLease::Grow(int64_t bytes) {
  if (bytes <= 0) return absl::OkStatus();
  if (budget_ != nullptr) {
    if (absl::Status s = budget_->Take(bytes, this->bytes() + bytes); !s.ok()) return s;
  }
  held_.fetch_add(bytes, std::memory_order_relaxed);
  return absl::OkStatus();
}

void BudgetLease::Shrink(int64_t bytes) {
  int64_t held = held_.load(std::memory_order_relaxed);
  int64_t given;
  do {
    given = std::min(bytes, held);
    if (given <= 0) return;
  } while (!held_.compare_exchange_weak(held, held - given, std::memory_order_relaxed));
  if (budget_ != nullptr) budget_->Give(given);
}

absl::Status BudgetLease::Resize(int64_t bytes) {
  const int64_t held = this->bytes();
  if (bytes > held) return Grow(bytes - held);
  Shrink(held - bytes);
  return absl::OkStatus();
}

}  // namespace emoserve
