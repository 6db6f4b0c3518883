#include "train/evaluate.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"
#include "core/resampler.h"
#include "core/windowing.h"
#include "train/progress.h"

namespace emoserve {

void ApplyGainDb(double gain_db, absl::Span<float> samples) {
  const float gain = static_cast<float>(std::pow(10.0, gain_db / 20.0));
  for (float& s : samples) s *= gain;
}

absl::StatusOr<std::vector<LabeledAudio>> LoadRavdessAudio(
    const std::vector<RavdessClip>& clips, int sample_rate) {
  std::vector<LabeledAudio> loaded;
  loaded.reserve(clips.size());
  ProgressBar progress("loading audio", static_cast<int>(clips.size()));
  for (const RavdessClip& clip : clips) {
    absl::StatusOr<Audio> audio = DecodeAudioFile(clip.path);
    if (!audio.ok()) {
      return absl::Status(audio.status().code(),
                          absl::StrCat(clip.path, ": ", audio.status().message()));
    }
    absl::StatusOr<std::vector<float>> samples =
        Resample(audio->samples, audio->sample_rate, sample_rate);
    if (!samples.ok()) return samples.status();
    loaded.push_back({clip, *std::move(samples)});
    progress.Update(static_cast<int>(loaded.size()));
  }
  progress.Finish();
  return loaded;
}

absl::StatusOr<std::vector<LabeledAudio>> LoadRavdessActors(const std::string& dir,
                                                            const std::set<int>& actors,
                                                            int sample_rate) {
  absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(dir, actors);
  if (!clips.ok()) return clips.status();
  return LoadRavdessAudio(*clips, sample_rate);
}

absl::StatusOr<ConfusionMatrix> EvaluateClips(const std::vector<LabeledAudio>& clips,
                                              const ModelConfig& config,
                                              const FeatureExtractor& extractor,
                                              const BatchPredictor& predict,
                                              const EvaluateOptions& options,
                                              ClipPredictions* predictions) {
  // RAVDESS emotion index -> the model's output index.
  const std::vector<std::string>& names = RavdessLabels();
  std::vector<int> to_model(names.size(), -1);
  for (size_t i = 0; i < names.size(); ++i) {
    auto it = std::find(config.labels.begin(), config.labels.end(), names[i]);
    if (it != config.labels.end()) to_model[i] = static_cast<int>(it - config.labels.begin());
  }
  ConfusionMatrix matrix(config.labels);
  const size_t window = config.window_samples();
  absl::StatusOr<size_t> hop_or = HopSamples(options.hop_seconds, window, config.sample_rate);
  if (!hop_or.ok()) return hop_or.status();
  const size_t hop = *hop_or;
  const size_t input_size =
      static_cast<size_t>(config.num_features()) * config.num_frames();
  const int classes = static_cast<int>(config.labels.size());

  // Windows of several clips share a batch; a clip's result is complete when
  // its last window has been predicted.
  std::vector<float> batch;
  std::vector<size_t> batch_clip;  // clip index of each window in the batch
  std::vector<float> window_samples(window);
  FeatureMatrix features;
  std::vector<std::vector<float>> clip_probabilities(clips.size());
  auto flush = [&]() -> absl::Status {
    if (batch_clip.empty()) return absl::OkStatus();
    absl::StatusOr<std::vector<float>> probabilities =
        predict(batch, static_cast<int>(batch_clip.size()));
    if (!probabilities.ok()) return probabilities.status();
    for (size_t w = 0; w < batch_clip.size(); ++w) {
      auto& out = clip_probabilities[batch_clip[w]];
      out.insert(out.end(), probabilities->begin() + w * classes,
                 probabilities->begin() + (w + 1) * classes);
    }
    batch.clear();
    batch_clip.clear();
    return absl::OkStatus();
  };
  for (size_t c = 0; c < clips.size(); ++c) {
    if (to_model[clips[c].clip.emotion] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the model has no label '", names[clips[c].clip.emotion], "'"));
    }
    const ClipPlan plan = PlanClip(clips[c].samples, window, hop, options.vad_threshold_dbfs);
    for (size_t index : plan.to_model) {
      CopyWindow(clips[c].samples, plan.starts[index], window, window_samples.data());
      if (absl::Status s = extractor.Compute(window_samples, &features); !s.ok()) return s;
      if (features.data.size() != input_size) {
        return absl::InternalError("feature shape differs from the model's input");
      }
      batch.insert(batch.end(), features.data.begin(), features.data.end());
      batch_clip.push_back(c);
      if (static_cast<int>(batch_clip.size()) == options.batch_size) {
        if (absl::Status s = flush(); !s.ok()) return s;
      }
    }
  }
  if (absl::Status s = flush(); !s.ok()) return s;
  if (predictions != nullptr) *predictions = {};
  for (size_t c = 0; c < clips.size(); ++c) {
    std::vector<float> mean = MeanProbabilities(clip_probabilities[c], classes);
    const int label =
        static_cast<int>(std::max_element(mean.begin(), mean.end()) - mean.begin());
    matrix.Add(to_model[clips[c].clip.emotion], label);
    if (predictions != nullptr) {
      predictions->labels.push_back(label);
      predictions->probabilities.push_back(std::move(mean));
    }
  }
  return matrix;
}

absl::StatusOr<PrecisionCheck> ComparePredictions(const ClipPredictions& reference,
                                                  const ClipPredictions& candidate) {
  if (reference.labels.size() != candidate.labels.size() ||
      reference.probabilities.size() != candidate.probabilities.size()) {
    return absl::InvalidArgumentError("the predictions compared are of different clips");
  }
  PrecisionCheck check;
  check.clips = static_cast<int>(reference.labels.size());
  for (size_t c = 0; c < reference.labels.size(); ++c) {
    if (reference.labels[c] == candidate.labels[c]) ++check.agreeing;
    const std::vector<float>& a = reference.probabilities[c];
    const std::vector<float>& b = candidate.probabilities[c];
    if (a.size() != b.size()) {
      return absl::InvalidArgumentError("the predictions compared have different labels");
    }
    for (size_t k = 0; k < a.size(); ++k) {
      double change = std::abs(static_cast<double>(a[k]) - b[k]);
      if (!std::isfinite(change)) change = HUGE_VAL;
      if (change > check.max_probability_change || check.worst_clip < 0) {
        check.max_probability_change = std::max(check.max_probability_change, change);
        check.worst_clip = static_cast<int>(c);
      }
    }
  }
  return check;
}

}  // namespace emoserve
