#include "core/windowing.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace emoserve {

std::vector<size_t> WindowStarts(size_t num_samples, size_t window, size_t hop) {
  std::vector<size_t> starts = {0};
  while (starts.back() + window < num_samples) starts.push_back(starts.back() + hop);
  return starts;
}

absl::StatusOr<size_t> HopSamples(double hop_seconds, size_t window, int sample_rate) {
  if (!std::isfinite(hop_seconds) || hop_seconds < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad hop_seconds ", hop_seconds));
  }
  const size_t hop = hop_seconds == 0
                         ? std::max<size_t>(1, window / 2)
                         : static_cast<size_t>(std::llround(hop_seconds * sample_rate));
  if (hop < 1 || hop > window) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hop_seconds ", hop_seconds, " must be within (0, ",
        static_cast<double>(window) / sample_rate, "] (the model's window)"));
  }
  return hop;
}

void CopyWindow(absl::Span<const float> samples, size_t start, size_t window,
                float* out) {
  const size_t available =
      start < samples.size() ? std::min(window, samples.size() - start) : 0;
  if (available > 0) std::memcpy(out, samples.data() + start, available * sizeof(float));
  std::fill(out + available, out + window, 0.0f);
}

std::vector<float> MeanProbabilities(absl::Span<const float> probabilities,
                                     int num_classes) {
  std::vector<float> mean(num_classes, 0.0f);
  const size_t rows = probabilities.size() / num_classes;
  if (rows == 0) return mean;
  for (size_t r = 0; r < rows; ++r) {
    for (int c = 0; c < num_classes; ++c) mean[c] += probabilities[r * num_classes + c];
  }
  for (float& p : mean) p /= static_cast<float>(rows);
  return mean;
}

}  // namespace emoserve
