#include "client/latency.h"

#include <algorithm>
#include <cmath>

namespace emoserve::client {
namespace {

// Values below kSubBuckets get a bucket each; above, every power of two is
// split into kSubBuckets equal buckets.
constexpr int kSubBits = 7;
constexpr int64_t kSubBuckets = int64_t{1} << kSubBits;
constexpr int kMaxBits = 62;  // microseconds up to 2^62: ~146000 years
constexpr size_t kBucketCount =
    kSubBuckets + (kMaxBits - kSubBits + 1) * kSubBuckets;

int HighestBit(uint64_t v) { return 63 - __builtin_clzll(v); }

size_t BucketOf(int64_t us) {
  if (us < kSubBuckets) return static_cast<size_t>(us);
  const int shift = HighestBit(static_cast<uint64_t>(us)) - kSubBits;
  const int64_t sub = (us >> shift) - kSubBuckets;  // [0, kSubBuckets)
  return static_cast<size_t>(kSubBuckets + shift * kSubBuckets + sub);
}

// The middle of a bucket's range, in microseconds.
double BucketMiddle(size_t bucket) {
  if (bucket < static_cast<size_t>(kSubBuckets)) {
    return static_cast<double>(bucket);
  }
  const int64_t shift = (static_cast<int64_t>(bucket) - kSubBuckets) /
                        kSubBuckets;
  const int64_t sub = (static_cast<int64_t>(bucket) - kSubBuckets) %
                      kSubBuckets;
  const double low = static_cast<double>((kSubBuckets + sub) << shift);
  const double width = static_cast<double>(int64_t{1} << shift);
  return low + (width - 1) / 2;
}

}  // namespace

LatencyHistogram::LatencyHistogram() : buckets_(kBucketCount, 0) {}

void LatencyHistogram::Record(absl::Duration latency) {
  const int64_t us = std::clamp<int64_t>(absl::ToInt64Microseconds(latency), 0,
                                         (int64_t{1} << kMaxBits) - 1);
  ++buckets_[BucketOf(us)];
  min_us_ = count_ == 0 ? us : std::min(min_us_, us);
  max_us_ = count_ == 0 ? us : std::max(max_us_, us);
  sum_us_ += static_cast<double>(us);
  ++count_;
}

void LatencyHistogram::Merge(const LatencyHistogram& other) {
  if (other.count_ == 0) return;
  for (size_t i = 0; i < buckets_.size(); ++i) buckets_[i] += other.buckets_[i];
  min_us_ = count_ == 0 ? other.min_us_ : std::min(min_us_, other.min_us_);
  max_us_ = count_ == 0 ? other.max_us_ : std::max(max_us_, other.max_us_);
  sum_us_ += other.sum_us_;
  count_ += other.count_;
}

absl::Duration LatencyHistogram::min() const {
  return absl::Microseconds(min_us_);
}

absl::Duration LatencyHistogram::max() const {
  return absl::Microseconds(max_us_);
}

absl::Duration LatencyHistogram::mean() const {
  if (count_ == 0) return absl::ZeroDuration();
  return absl::Microseconds(sum_us_ / static_cast<double>(count_));
}

absl::Duration LatencyHistogram::Percentile(double percent) const {
  if (count_ == 0) return absl::ZeroDuration();
  if (percent >= 100) return max();
  // Nearest rank: the ceil(p/100 * n)-th smallest value (at least the 1st);
  // the epsilon keeps 90% of 10 at rank 9 despite rounding.
  const double exact_rank =
      std::max(percent, 0.0) * static_cast<double>(count_) / 100.0;
  const int64_t rank = std::max<int64_t>(
      1, static_cast<int64_t>(std::ceil(exact_rank - 1e-9)));
  int64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= rank) {
      const double us = std::clamp(BucketMiddle(i),
                                   static_cast<double>(min_us_),
                                   static_cast<double>(max_us_));
      return absl::Microseconds(us);
    }
  }
  return max();
}

}  // namespace emoserve::client
