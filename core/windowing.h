// Splitting audio into the model's fixed-length windows, and combining the
// windows' results into one.
#ifndef EMOSERVE_CORE_WINDOWING_H_
#define EMOSERVE_CORE_WINDOWING_H_

#include <cstddef>
#include <vector>

#include "absl/types/span.h"

namespace emoserve {

// Start offsets of the windows that cover `num_samples` samples: one window
// for audio up to `window` long, else windows every `hop` samples until one
// reaches the end (that last one is zero-padded). hop must be > 0.
std::vector<size_t> WindowStarts(size_t num_samples, size_t window, size_t hop);

// Copies samples[start, start + window) into `out` (window floats), padding
// with zeros past the end of the audio.
void CopyWindow(absl::Span<const float> samples, size_t start, size_t window,
                float* out);

// Mean of `probabilities` rows ([num_windows][num_classes], row-major).
std::vector<float> MeanProbabilities(absl::Span<const float> probabilities,
                                     int num_classes);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_WINDOWING_H_
