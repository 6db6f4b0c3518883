// Clip-level evaluation shared by the trainer's validation and
// `emoserve-train eval`: windows as the server makes them, features, a batch
// predictor, the mean of the windows' probabilities.
#ifndef EMOSERVE_TRAIN_EVALUATE_H_
#define EMOSERVE_TRAIN_EVALUATE_H_

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/features.h"
#include "core/model_config.h"
#include "core/windowing.h"
#include "train/metrics.h"
#include "train/ravdess.h"

namespace emoserve {

struct LabeledAudio {
  RavdessClip clip;
  std::vector<float> samples;  // mono, at the model's rate
};

// Scales `samples` by `gain_db` decibels (not clipped): the same voice
// recorded quieter or louder.
void ApplyGainDb(double gain_db, absl::Span<float> samples);

// Decodes and resamples every clip to `sample_rate`, with a progress bar.
absl::StatusOr<std::vector<LabeledAudio>> LoadRavdessAudio(
    const std::vector<RavdessClip>& clips, int sample_rate);

// The clips of `actors` in the RAVDESS folder `dir` (ListRavdess), loaded
// as LoadRavdessAudio does.
absl::StatusOr<std::vector<LabeledAudio>> LoadRavdessActors(const std::string& dir,
                                                            const std::set<int>& actors,
                                                            int sample_rate);

// Features of batch_size windows ([B][F][T]) -> probabilities ([B][C]);
// with speaker_means ([B][W], else empty), each window speaker-normalised
// by its speaker's mean summary.
using BatchPredictor = std::function<absl::StatusOr<std::vector<float>>(
    absl::Span<const float> features, int batch_size, absl::Span<const float> speaker_means)>;

// Features of batch_size windows -> their summaries ([B][W]): what a
// speaker's statistics are made of.
using BatchSummarizer = std::function<absl::StatusOr<std::vector<float>>(
    absl::Span<const float> features, int batch_size)>;

struct EvaluateOptions {
  double hop_seconds = 0;  // as a request's: 0 = half a window
  double vad_threshold_dbfs = kDefaultVadThresholdDbfs;
  int batch_size = 32;
  // One mean summary per clip (SpeakerMeans): the clips are classified
  // speaker-normalised, those with an empty one as they are. Null: all as
  // they are.
  const std::vector<std::vector<float>>* speaker_means = nullptr;
};

// The summaries of the speech windows of `samples` (windowed as the
// service windows a stream), added up, and how many there are.
struct SummarySum {
  std::vector<float> sum;
  int windows = 0;
};
absl::StatusOr<SummarySum> SpeechSummaries(absl::Span<const float> samples,
                                           const ModelConfig& config,
                                           const FeatureExtractor& extractor,
                                           const BatchSummarizer& summarize,
                                           const EvaluateOptions& options = {});

// For each clip, the mean summary of its speaker's other speech, as a
// stream of that speaker would have gathered it before the clip: the
// speaker's other clips in a random order (from `seed`), joined and cut to
// `prior_seconds`, windowed as the service windows a stream, the summaries
// of its speech windows averaged. A clip whose prior has no speech window
// gets an empty vector.
absl::StatusOr<std::vector<std::vector<float>>> SpeakerMeans(
    const std::vector<LabeledAudio>& clips, const ModelConfig& config,
    const FeatureExtractor& extractor, const BatchSummarizer& summarize, double prior_seconds,
    uint64_t seed, const EvaluateOptions& options = {});

// What EvaluateClips answered for each clip, in the clips' order.
struct ClipPredictions {
  std::vector<int> labels;                        // indices into config.labels
  std::vector<std::vector<float>> probabilities;  // the windows' mean
};

// Classifies each clip as the service does (PlanClip: windows of
// config.window_seconds every hop, the speech windows to the model, their
// probabilities averaged) and counts the results against the clip's label.
// `predictions`, when given, gets each clip's answer. The model's labels
// must include every RAVDESS label present.
absl::StatusOr<ConfusionMatrix> EvaluateClips(const std::vector<LabeledAudio>& clips,
                                              const ModelConfig& config,
                                              const FeatureExtractor& extractor,
                                              const BatchPredictor& predict,
                                              const EvaluateOptions& options = {},
                                              ClipPredictions* predictions = nullptr);

// A reduced precision is usable for a model when its clip labels agree
// with fp32's on at least this share of clips and no clip's probability
// of any label moves by more than this.
inline constexpr double kPrecisionMinAgreement = 0.99;
inline constexpr double kPrecisionMaxProbabilityChange = 0.02;

// One precision's answers against fp32's on the same clips.
struct PrecisionCheck {
  int clips = 0;
  int agreeing = 0;                     // clips with the same top label
  double max_probability_change = 0;    // over every clip and label
  int worst_clip = -1;                  // where it is largest

  double agreement() const { return clips > 0 ? static_cast<double>(agreeing) / clips : 0; }
  bool passes() const {
    return clips > 0 && agreement() >= kPrecisionMinAgreement &&
           max_probability_change <= kPrecisionMaxProbabilityChange;
  }
};

// Compares `candidate` with `reference` (both from EvaluateClips on the
// same clips).
absl::StatusOr<PrecisionCheck> ComparePredictions(const ClipPredictions& reference,
                                                  const ClipPredictions& candidate);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_EVALUATE_H_
