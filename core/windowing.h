// Splitting audio into the model's fixed-length windows, and combining the
// windows' results into one.
#ifndef EMOSERVE_CORE_WINDOWING_H_
#define EMOSERVE_CORE_WINDOWING_H_

#include <cstddef>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace emoserve {

// Start offsets of the windows that cover `num_samples` samples: one window
// for audio up to `window` long, else windows every `hop` samples until one
// reaches the end (that last one is zero-padded). hop must be > 0.
std::vector<size_t> WindowStarts(size_t num_samples, size_t window, size_t hop);
// WindowStarts(...).size(), without the vector.
size_t WindowCount(size_t num_samples, size_t window, size_t hop);

// The hop a request gets when it asks for none: half a window.
size_t DefaultHopSamples(size_t window);

// The hop in samples for a request's hop_seconds: 0 means the default;
// anything else must be finite, at least min_hop_seconds, and give a hop
// within (0, window]. `field` names the hop in the error.
absl::StatusOr<size_t> HopSamples(double hop_seconds, size_t window, int sample_rate,
                                  double min_hop_seconds = 0,
                                  const char* field = "hop_seconds");

// Copies samples[start, start + window) into `out` (window floats), padding
// with zeros past the end of the audio.
void CopyWindow(absl::Span<const float> samples, size_t start, size_t window,
                float* out);

// Mean of `probabilities` rows ([num_windows][num_classes], row-major).
std::vector<float> MeanProbabilities(absl::Span<const float> probabilities,
                                     int num_classes);

// RMS level in dBFS of samples[start, start + window), counting the zero
// padding past the end of the audio (-inf for silence).
double WindowDbfs(absl::Span<const float> samples, size_t start, size_t window);

// Windows quieter than this (RMS, dBFS) are silence unless a call sets
// another threshold.
inline constexpr double kDefaultVadThresholdDbfs = -50.0;

// How a clip is classified, shared by the service and the evaluator: its
// windows (WindowStarts), which of them are speech (level at least the
// voice-activity threshold), and which go to the model: the speech windows,
// or all of them when none is speech, so that a quiet clip still gets a
// result. The clip's probabilities are the mean of those windows' results.
struct ClipPlan {
  std::vector<size_t> starts;
  std::vector<bool> speech;       // per window
  std::vector<size_t> to_model;   // indices into `starts`
  int speech_windows = 0;
};
ClipPlan PlanClip(absl::Span<const float> samples, size_t window, size_t hop,
                  double vad_threshold_dbfs);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_WINDOWING_H_
