// Latency statistics for the load generator: a log-linear histogram with
// bounded memory and relative error, so a long run at a high rate costs no
// more than a short one.
#ifndef EMOSERVE_CLIENT_LATENCY_H_
#define EMOSERVE_CLIENT_LATENCY_H_

#include <cstdint>
#include <vector>

#include "absl/time/time.h"

namespace emoserve::client {

// Records durations at microsecond resolution: exact below 128 us, within
// 1/128 (0.8%) of the true value above. Not thread-safe.
class LatencyHistogram {
 public:
  LatencyHistogram();

  // Negative durations count as zero.
  void Record(absl::Duration latency);
  void Merge(const LatencyHistogram& other);

  int64_t count() const { return count_; }
  // Exact; zero when empty.
  absl::Duration min() const;
  absl::Duration max() const;
  absl::Duration mean() const;
  // The nearest-rank percentile, `percent` in [0, 100]: the smallest
  // recorded value that at least `percent`% of the values do not exceed
  // (within the bucket precision; 100 gives max() exactly). Zero when empty.
  absl::Duration Percentile(double percent) const;

 private:
  std::vector<int64_t> buckets_;
  int64_t count_ = 0;
  int64_t min_us_ = 0;
  int64_t max_us_ = 0;
  double sum_us_ = 0;
};

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_LATENCY_H_
