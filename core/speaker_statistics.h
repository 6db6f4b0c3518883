// What a speaker-normalised model knows of one voice: the mean of its
// speech windows' summaries and how many there are (fixed size, whatever
// was heard), and the blob clients carry it in between calls.
#ifndef EMOSERVE_CORE_SPEAKER_STATISTICS_H_
#define EMOSERVE_CORE_SPEAKER_STATISTICS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace emoserve {

// How much of a voice's speech its statistics must hold before windows are
// adapted to them: cross-validation (docs/training.md) found adaptation to
// 10 s of a speaker's audio worse than none and to 20 s or more better.
inline constexpr double kDefaultAdaptationMinSpeechSeconds = 20.0;

class SpeakerStatistics {
 public:
  // Statistics of the summaries a model's summary() computes: `summary_key`
  // names that function (Model::summary_key()), `width` its size.
  SpeakerStatistics(absl::string_view summary_key, int width);

  // Adds one speech window's summary (width() floats).
  absl::Status Add(absl::Span<const float> summary);
  // Adds what `other` (of the same summary) holds.
  absl::Status Merge(const SpeakerStatistics& other);
  // Adds `windows` windows whose mean summary is `mean`.
  absl::Status AddMean(absl::Span<const float> mean, int64_t windows);

  int width() const { return static_cast<int>(mean_.size()); }
  int64_t windows() const { return windows_; }
  // The speech the statistics stand for when windows start every
  // `hop_seconds` (each window adds a hop of new audio).
  double speech_seconds(double hop_seconds) const { return windows_ * hop_seconds; }
  // Enough to adapt to: at least one window, and `min_speech_seconds` of
  // speech (the server's --adaptation-min-speech-seconds).
  bool EnoughToAdapt(double hop_seconds, double min_speech_seconds) const {
    return windows_ > 0 && speech_seconds(hop_seconds) >= min_speech_seconds;
  }
  // The mean summary; empty before any window.
  std::vector<float> Mean() const;
  // Memory held, for budgets.
  size_t bytes() const { return sizeof(*this) + mean_.capacity() * sizeof(float); }

  // The blob: little-endian "ESPK", version, the summary's key hash, the
  // window count, the width and the mean as float32 (24 + 4 * width bytes).
  std::string Serialize() const;
  // A blob from Serialize for the same summary. Anything else is
  // kInvalidArgument saying what is wrong with it.
  static absl::StatusOr<SpeakerStatistics> Parse(absl::string_view blob,
                                                 absl::string_view summary_key, int width);

  // The most windows a blob may claim: a year of windows every 0.25 s.
  static constexpr int64_t kMaxWindows = int64_t{4} * 3600 * 24 * 366;

 private:
  uint64_t key_hash_;
  int64_t windows_ = 0;
  // Updated in place (mean += (x - mean) / n): float keeps its precision
  // over any number of windows, where a float sum would not.
  std::vector<float> mean_;
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_SPEAKER_STATISTICS_H_
