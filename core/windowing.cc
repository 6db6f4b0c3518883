#include "core/windowing.h"

#include <algorithm>
#include <cstring>

namespace emoserve {

std::vector<size_t> WindowStarts(size_t num_samples, size_t window, size_t hop) {
  std::vector<size_t> starts = {0};
  while (starts.back() + window < num_samples) starts.push_back(starts.back() + hop);
  return starts;
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
