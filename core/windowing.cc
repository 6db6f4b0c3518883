#include "core/windowing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace emoserve {

std::vector<size_t> WindowStarts(size_t num_samples, size_t window, size_t hop) {
  std::vector<size_t> starts = {0};
  while (starts.back() + window < num_samples) starts.push_back(starts.back() + hop);
  return starts;
}

size_t WindowCount(size_t num_samples, size_t window, size_t hop) {
  if (num_samples <= window) return 1;
  return (num_samples - window + hop - 1) / hop + 1;
}

size_t DefaultHopSamples(size_t window) { return std::max<size_t>(1, window / 2); }

absl::StatusOr<size_t> HopSamples(double hop_seconds, size_t window, int sample_rate,
                                  double min_hop_seconds, const char* field) {
  const double window_seconds = static_cast<double>(window) / sample_rate;
  const auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is ", hop_seconds, "; use 0 (half the model's window) or a value in [",
        std::max(min_hop_seconds, 1.0 / sample_rate), ", ", window_seconds, "] seconds"));
  };
  if (!std::isfinite(hop_seconds) || hop_seconds < 0) return bad();
  if (hop_seconds == 0) return DefaultHopSamples(window);
  if (hop_seconds < min_hop_seconds || hop_seconds > window_seconds) return bad();
  const long long hop = std::llround(hop_seconds * sample_rate);
  if (hop < 1 || static_cast<size_t>(hop) > window) return bad();
  return static_cast<size_t>(hop);
}

void CopyWindow(absl::Span<const float> samples, size_t start, size_t window,
                float* out) {
  const size_t available =
      start < samples.size() ? std::min(window, samples.size() - start) : 0;
  if (available > 0) std::memcpy(out, samples.data() + start, available * sizeof(float));
  std::fill(out + available, out + window, 0.0f);
}

double WindowDbfs(absl::Span<const float> samples, size_t start, size_t window) {
  if (window == 0) return -std::numeric_limits<double>::infinity();
  const size_t end = std::min(samples.size(), start + window);
  double sum = 0.0;
  for (size_t i = start; i < end; ++i) sum += static_cast<double>(samples[i]) * samples[i];
  if (sum <= 0.0) return -std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(sum / static_cast<double>(window));
}

ClipPlan PlanClip(absl::Span<const float> samples, size_t window, size_t hop,
                  double vad_threshold_dbfs) {
  ClipPlan plan;
  plan.starts = WindowStarts(samples.size(), window, hop);
  plan.speech.resize(plan.starts.size());
  for (size_t i = 0; i < plan.starts.size(); ++i) {
    plan.speech[i] = WindowDbfs(samples, plan.starts[i], window) >= vad_threshold_dbfs;
    plan.speech_windows += plan.speech[i] ? 1 : 0;
  }
  for (size_t i = 0; i < plan.starts.size(); ++i) {
    if (plan.speech[i] || plan.speech_windows == 0) plan.to_model.push_back(i);
  }
  return plan;
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
