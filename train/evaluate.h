// Clip-level evaluation shared by the trainer's validation and
// `emoserve-train eval`: windows as the server makes them, features, a batch
// predictor, the mean of the windows' probabilities.
#ifndef EMOSERVE_TRAIN_EVALUATE_H_
#define EMOSERVE_TRAIN_EVALUATE_H_

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

// Features of batch_size windows ([B][F][T]) -> probabilities ([B][C]).
using BatchPredictor = std::function<absl::StatusOr<std::vector<float>>(
    absl::Span<const float> features, int batch_size)>;

struct EvaluateOptions {
  double hop_seconds = 0;  // as a request's: 0 = half a window
  double vad_threshold_dbfs = kDefaultVadThresholdDbfs;
  int batch_size = 32;
};

// Classifies each clip as the service does (PlanClip: windows of
// config.window_seconds every hop, the speech windows to the model, their
// probabilities averaged) and counts the results against the clip's label.
// `predicted`, when given, gets each clip's label (an index into
// config.labels). The model's labels must include every RAVDESS label
// present.
absl::StatusOr<ConfusionMatrix> EvaluateClips(const std::vector<LabeledAudio>& clips,
                                              const ModelConfig& config,
                                              const FeatureExtractor& extractor,
                                              const BatchPredictor& predict,
                                              const EvaluateOptions& options = {},
                                              std::vector<int>* predicted = nullptr);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_EVALUATE_H_
