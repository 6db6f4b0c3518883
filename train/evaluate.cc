#include "train/evaluate.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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
  if (options.speaker_means != nullptr && options.speaker_means->size() != clips.size()) {
    return absl::InvalidArgumentError("EvaluateClips: one speaker mean per clip");
  }
  std::vector<float> batch;
  std::vector<float> batch_speaker_means;
  std::vector<size_t> batch_clip;  // clip index of each window in the batch
  std::vector<float> window_samples(window);
  FeatureMatrix features;
  std::vector<std::vector<float>> clip_probabilities(clips.size());
  auto flush = [&]() -> absl::Status {
    if (batch_clip.empty()) return absl::OkStatus();
    absl::StatusOr<std::vector<float>> probabilities =
        predict(batch, static_cast<int>(batch_clip.size()), batch_speaker_means);
    if (!probabilities.ok()) return probabilities.status();
    for (size_t w = 0; w < batch_clip.size(); ++w) {
      auto& out = clip_probabilities[batch_clip[w]];
      out.insert(out.end(), probabilities->begin() + w * classes,
                 probabilities->begin() + (w + 1) * classes);
    }
    batch.clear();
    batch_speaker_means.clear();
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
      // A clip whose speaker has no statistics yet is answered unadapted,
      // as a stream answers before it has heard its speaker; a batch is
      // all one or the other.
      const bool adapted =
          options.speaker_means != nullptr && !(*options.speaker_means)[c].empty();
      if (!batch_clip.empty() && adapted == batch_speaker_means.empty()) {
        if (absl::Status s = flush(); !s.ok()) return s;
      }
      batch.insert(batch.end(), features.data.begin(), features.data.end());
      if (adapted) {
        const std::vector<float>& mean = (*options.speaker_means)[c];
        batch_speaker_means.insert(batch_speaker_means.end(), mean.begin(), mean.end());
      }
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

absl::StatusOr<SummarySum> SpeechSummaries(absl::Span<const float> samples,
                                           const ModelConfig& config,
                                           const FeatureExtractor& extractor,
                                           const BatchSummarizer& summarize,
                                           const EvaluateOptions& options) {
  const size_t window = config.window_samples();
  absl::StatusOr<size_t> hop = HopSamples(options.hop_seconds, window, config.sample_rate);
  if (!hop.ok()) return hop.status();
  const ClipPlan plan = PlanClip(samples, window, *hop, options.vad_threshold_dbfs);
  std::vector<float> window_samples(window), batch;
  FeatureMatrix features;
  SummarySum result;
  for (size_t w = 0; w < plan.starts.size(); ++w) {
    if (!plan.speech[w]) continue;
    CopyWindow(samples, plan.starts[w], window, window_samples.data());
    if (absl::Status s = extractor.Compute(window_samples, &features); !s.ok()) return s;
    batch.insert(batch.end(), features.data.begin(), features.data.end());
    ++result.windows;
  }
  if (result.windows == 0) return result;
  absl::StatusOr<std::vector<float>> summaries = summarize(batch, result.windows);
  if (!summaries.ok()) return summaries.status();
  const size_t width = summaries->size() / result.windows;
  result.sum.assign(width, 0.0f);
  for (int w = 0; w < result.windows; ++w) {
    for (size_t k = 0; k < width; ++k) result.sum[k] += (*summaries)[w * width + k];
  }
  return result;
}

absl::StatusOr<std::vector<std::vector<float>>> SpeakerMeans(
    const std::vector<LabeledAudio>& clips, const ModelConfig& config,
    const FeatureExtractor& extractor, const BatchSummarizer& summarize, double prior_seconds,
    uint64_t seed, const EvaluateOptions& options) {
  const size_t prior_samples =
      static_cast<size_t>(std::llround(prior_seconds * config.sample_rate));
  std::mt19937_64 rng(seed);
  std::vector<std::vector<float>> means(clips.size());
  std::vector<float> prior;
  ProgressBar progress(absl::StrFormat("speaker statistics (%.0f s)", prior_seconds),
                       static_cast<int>(clips.size()));
  for (size_t c = 0; c < clips.size(); ++c) {
    std::vector<size_t> others;
    for (size_t o = 0; o < clips.size(); ++o) {
      if (o != c && clips[o].clip.actor == clips[c].clip.actor) others.push_back(o);
    }
    std::shuffle(others.begin(), others.end(), rng);
    prior.clear();
    for (size_t o : others) {
      if (prior.size() >= prior_samples) break;
      const std::vector<float>& samples = clips[o].samples;
      prior.insert(prior.end(), samples.begin(),
                   samples.begin() + std::min(samples.size(), prior_samples - prior.size()));
    }
    absl::StatusOr<SummarySum> speech =
        SpeechSummaries(prior, config, extractor, summarize, options);
    if (!speech.ok()) return speech.status();
    for (float& v : speech->sum) v /= static_cast<float>(speech->windows);
    means[c] = std::move(speech->sum);
    progress.Update(static_cast<int>(c + 1));
  }
  progress.Finish();
  return means;
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
