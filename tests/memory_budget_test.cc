// The budget of audio in flight: leases grow, shrink and give everything
// back; the budget refuses what does not fit, also under contention.
#include "core/memory_budget.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace emoserve {
namespace {

using ::testing::HasSubstr;

TEST(MemoryBudgetTest, LeasesTakeWhatFitsAndGiveItBack) {
  std::vector<int64_t> reported;
  MemoryBudget budget(100 << 20, [&](int64_t used) { reported.push_back(used); });
  {
    BudgetLease a(&budget);
    BudgetLease b(&budget);
    ASSERT_TRUE(a.Grow(60 << 20).ok());
    const absl::Status refused = b.Grow(50 << 20);
    EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(refused.message()),
                HasSubstr("(60 MiB of 100 MiB in use; this needs 50 MiB more)"));
    EXPECT_EQ(b.bytes(), 0);
    ASSERT_TRUE(b.Grow(40 << 20).ok());
    EXPECT_EQ(budget.used(), 100 << 20);
    a.Shrink(10 << 20);
    EXPECT_EQ(a.bytes(), 50 << 20);
    ASSERT_TRUE(a.Resize(60 << 20).ok());
    EXPECT_FALSE(a.Resize(61 << 20).ok());
    ASSERT_TRUE(a.Resize(1).ok());
    a.Shrink(1000);  // more than it holds: gives back what it holds
    EXPECT_EQ(a.bytes(), 0);
  }
  EXPECT_EQ(budget.used(), 0);
  ASSERT_FALSE(reported.empty());
  EXPECT_EQ(reported.back(), 0);
}

TEST(MemoryBudgetTest, ALeaseWithoutABudgetGrantsEverything) {
  BudgetLease unlimited;
  EXPECT_TRUE(unlimited.Grow(int64_t{1} << 50).ok());
  EXPECT_EQ(unlimited.bytes(), int64_t{1} << 50);
}

TEST(MemoryBudgetTest, LargeLeasesLeaveTheReserveToSmallOnes) {
  // 1000 bytes, the last 200 for leases of at most 50.
  MemoryBudget budget(1000, nullptr, "the test budget", {200, 50});
  BudgetLease large(&budget);
  ASSERT_TRUE(large.Grow(700).ok());
  BudgetLease other_large(&budget);
  const absl::Status refused = other_large.Grow(200);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("kept for small calls"));
  // A large lease growing into the reserve is refused too.
  EXPECT_FALSE(large.Grow(150).ok());
  EXPECT_TRUE(large.Grow(100).ok());  // up to 800: still outside the reserve
  std::vector<std::unique_ptr<BudgetLease>> small;
  for (int i = 0; i < 4; ++i) {
    small.push_back(std::make_unique<BudgetLease>(&budget));
    ASSERT_TRUE(small.back()->Grow(30).ok()) << i;
    ASSERT_TRUE(small.back()->Grow(20).ok()) << i;  // 50 in all: still small
  }
  EXPECT_EQ(budget.used(), 1000);
  // Small ones cannot overfill it either, and a small lease that grows past
  // the limit is a large one.
  BudgetLease one_more(&budget);
  EXPECT_FALSE(one_more.Grow(1).ok());
  small.pop_back();
  EXPECT_FALSE(small.back()->Grow(1).ok());
  EXPECT_TRUE(one_more.Grow(50).ok());
}

TEST(MemoryBudgetTest, NeverOverCommittedUnderContention) {
  MemoryBudget budget(1000);
  std::atomic<int64_t> most{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        BudgetLease lease(&budget);
        if (lease.Grow(300).ok()) {
          int64_t seen = most.load();
          while (budget.used() > seen && !most.compare_exchange_weak(seen, budget.used())) {
          }
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_LE(most.load(), 900);
  EXPECT_EQ(budget.used(), 0);
}

}  // namespace
}  // namespace emoserve
