#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/features.h"
#include "core/model.h"
#include "core/model_config.h"
#include "core/resampler.h"
#include "core/windowing.h"
#include "train/evaluate.h"
#include "train/metrics.h"
#include "train/progress.h"
#include "train/ravdess.h"

namespace emoserve {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// Makes one augmented training example: speed perturbation, a random crop
// of one window, white noise, a gain, then features with SpecAugment-style masks
// (masked cells take the feature's training mean, i.e. 0 once normalised).
class Augmenter {
 public:
  Augmenter(const TrainOptions& options, const FeatureExtractor& extractor,
            size_t window, std::vector<float> feature_mean)
      : options_(options),
        extractor_(extractor),
        window_(window),
        feature_mean_(std::move(feature_mean)),
        samples_(window) {}

  absl::Status Make(const std::vector<float>& clip, std::mt19937_64& rng,
                    float* out) {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    const std::vector<float>* source = &clip;
    std::vector<float> perturbed;
    if (unit(rng) < options_.speed_probability) {
      const double speed =
          options_.speed_min + (options_.speed_max - options_.speed_min) * unit(rng);
      // Playing `speed` times faster = treating the clip as recorded at a
      // higher rate and converting it back.
      const int from = static_cast<int>(std::lround(options_.sample_rate * speed));
      absl::StatusOr<std::vector<float>> resampled =
          Resample(clip, from, options_.sample_rate);
      if (!resampled.ok()) return resampled.status();
      perturbed = *std::move(resampled);
      source = &perturbed;
    }
    // Crops start anywhere up to half a window before the end, so that
    // training also sees the zero-padded last windows that serving makes of
    // long audio (WindowStarts), not only windows full of audio.
    const size_t length = source->size();
    const size_t last_start = length > window_ / 2 ? length - window_ / 2 : 0;
    const size_t start = std::uniform_int_distribution<size_t>(0, last_start)(rng);
    CopyWindow(*source, start, window_, samples_.data());
    if (unit(rng) < options_.noise_probability) {
      double power = 0.0;
      for (float s : samples_) power += static_cast<double>(s) * s;
      power /= static_cast<double>(window_);
      const double snr = options_.noise_snr_min_db +
                         (options_.noise_snr_max_db - options_.noise_snr_min_db) * unit(rng);
      std::normal_distribution<float> noise(
          0.0f, static_cast<float>(std::sqrt(power / std::pow(10.0, snr / 10.0))));
      for (float& s : samples_) s += noise(rng);
    }
    // No draw without it, so that recipes without a gain range keep their
    // random sequence (and their models) unchanged.
    if (options_.gain_db > 0) {
      ApplyGainDb(options_.gain_db * (2 * unit(rng) - 1), absl::MakeSpan(samples_));
    }
    if (absl::Status s = extractor_.Compute(samples_, &features_); !s.ok()) return s;
    const int rows = features_.rows;
    const int cols = features_.cols;
    for (int m = 0; m < options_.time_masks; ++m) {
      const int width = std::uniform_int_distribution<int>(0, options_.time_mask_max_frames)(rng);
      const int first = std::uniform_int_distribution<int>(0, std::max(0, cols - width))(rng);
      for (int r = 0; r < rows; ++r) {
        for (int c = first; c < std::min(cols, first + width); ++c) {
          features_.data[static_cast<size_t>(r) * cols + c] = feature_mean_[r];
        }
      }
    }
    for (int m = 0; m < options_.feature_masks; ++m) {
      const int height = std::uniform_int_distribution<int>(0, options_.feature_mask_max_rows)(rng);
      const int first = std::uniform_int_distribution<int>(0, std::max(0, rows - height))(rng);
      for (int r = first; r < std::min(rows, first + height); ++r) {
        std::fill_n(features_.data.begin() + static_cast<size_t>(r) * cols, cols,
                    feature_mean_[r]);
      }
    }
    std::copy(features_.data.begin(), features_.data.end(), out);
    return absl::OkStatus();
  }

 private:
  const TrainOptions& options_;
  const FeatureExtractor& extractor_;
  size_t window_;
  std::vector<float> feature_mean_;
  std::vector<float> samples_;
  FeatureMatrix features_;
};

// The features of the first window of every training clip (no
// augmentation), [N, 1, F, T]: what normalisation statistics are taken from.
absl::StatusOr<torch::Tensor> FirstWindows(const std::vector<LabeledAudio>& clips,
                                           const FeatureExtractor& extractor, size_t window,
                                           int rows, int cols) {
  torch::Tensor out = torch::empty({static_cast<int64_t>(clips.size()), 1, rows, cols});
  std::vector<float> samples(window);
  FeatureMatrix features;
  for (size_t i = 0; i < clips.size(); ++i) {
    CopyWindow(clips[i].samples, 0, window, samples.data());
    if (absl::Status s = extractor.Compute(samples, &features); !s.ok()) return s;
    std::copy(features.data.begin(), features.data.end(),
              out.data_ptr<float>() + i * static_cast<size_t>(rows) * cols);
  }
  return out;
}

// Per-row mean and standard deviation of [N, 1, R, T] over clips and frames
// (in double precision; the deviation is at least 1e-3).
void RowStatistics(const torch::Tensor& x, std::vector<float>* mean, std::vector<float>* stddev) {
  const torch::Tensor values = x.to(torch::kDouble).transpose(0, 2).reshape({x.size(2), -1});
  const torch::Tensor m = values.mean(1);
  const torch::Tensor sd = torch::sqrt(torch::clamp_min((values * values).mean(1) - m * m, 1e-6));
  const torch::Tensor m_float = m.to(torch::kFloat).contiguous();
  const torch::Tensor sd_float = sd.to(torch::kFloat).contiguous();
  mean->assign(m_float.data_ptr<float>(), m_float.data_ptr<float>() + m_float.numel());
  stddev->assign(sd_float.data_ptr<float>(), sd_float.data_ptr<float>() + sd_float.numel());
}

// One-cycle: linear warm-up over the first 30% of steps, cosine decay after.
double OneCycleLearningRate(double peak, int64_t step, int64_t total) {
  const double warmup = 0.3 * total;
  if (step < warmup) return peak * (0.04 + 0.96 * step / warmup);
  const double progress = (step - warmup) / std::max(1.0, total - warmup);
  return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + std::cos(M_PI * progress)));
}

double SampleBeta(double alpha, std::mt19937_64& rng) {
  std::gamma_distribution<double> gamma(alpha, 1.0);
  const double a = gamma(rng);
  const double b = gamma(rng);
  return a + b > 0 ? a / (a + b) : 0.5;
}

BatchPredictor TorchPredictor(torch::jit::Module& module, int rows, int cols) {
  return [&module, rows, cols](absl::Span<const float> features, int batch,
                               absl::Span<const float> speaker_means)
             -> absl::StatusOr<std::vector<float>> {
    torch::NoGradGuard no_grad;
    torch::Tensor input = torch::from_blob(const_cast<float*>(features.data()),
                                           {batch, 1, rows, cols});
    torch::Tensor out;
    if (speaker_means.empty()) {
      out = module.forward({input}).toTensor();
    } else {
      torch::Tensor means = torch::from_blob(const_cast<float*>(speaker_means.data()),
                                             {batch, static_cast<int64_t>(
                                                         speaker_means.size() / batch)});
      out = module.run_method("adapted", module.run_method("summary", input), means).toTensor();
    }
    out = out.contiguous();
    return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
  };
}

BatchSummarizer TorchSummarizer(torch::jit::Module& module, int rows, int cols) {
  return [&module, rows, cols](absl::Span<const float> features,
                               int batch) -> absl::StatusOr<std::vector<float>> {
    torch::NoGradGuard no_grad;
    torch::Tensor input = torch::from_blob(const_cast<float*>(features.data()),
                                           {batch, 1, rows, cols});
    torch::Tensor out = module.run_method("summary", input).toTensor().contiguous();
    return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
  };
}

absl::Status CreateDirectory(const std::string& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", error.message()));
  }
  return absl::OkStatus();
}

std::string ActorList(const std::set<int>& actors) { return absl::StrJoin(actors, ","); }

nlohmann::json SplitJson(const std::set<int>& train, const std::set<int>& val,
                         const std::set<int>& test) {
  return {{"train_actors", std::vector<int>(train.begin(), train.end())},
          {"val_actors", std::vector<int>(val.begin(), val.end())},
          {"test_actors", std::vector<int>(test.begin(), test.end())}};
}

// Writes config (with its provenance) to <dir>/model.json, loads the
// directory as the server does, evaluates it on the validation clips and on
// the test actors (when the data has them), writes their confusion
// matrices (CSV, SVG) and records the metrics in model.json. A given
// `validation` result is recorded instead of evaluating the validation
// clips (an ensemble's out-of-fold validation).
absl::Status EvaluateModelDirectory(const std::string& dir, const std::string& data_dir,
                                    const std::vector<LabeledAudio>& val_audio,
                                    const std::set<int>& val_actors,
                                    const std::set<int>& test_actors, ModelConfig* config,
                                    std::optional<ConfusionMatrix> validation = std::nullopt) {
  const std::string json_path = (fs::path(dir) / "model.json").string();
  if (absl::Status s = SaveModelConfig(*config, json_path); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<Model>> saved = Model::Load(dir);
  if (!saved.ok()) return saved.status();
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config->features, config->sample_rate);
  if (!extractor.ok()) return extractor.status();
  const BatchPredictor serving_predictor = [&](absl::Span<const float> f, int batch,
                                               absl::Span<const float>) {
    return (*saved)->Predict(f, batch);
  };
  // `what` names the provenance entry; `stem` the confusion_<stem> files.
  // `given`: a result computed elsewhere, recorded instead of evaluating.
  const auto evaluate = [&](const std::vector<LabeledAudio>& audio, const std::string& what,
                            const std::string& stem, const std::set<int>& actors,
                            const std::optional<ConfusionMatrix>& given) -> absl::Status {
    absl::StatusOr<ConfusionMatrix> result =
        given.has_value() ? *given : EvaluateClips(audio, *config, **extractor, serving_predictor);
    if (!result.ok()) return result.status();
    config->provenance[what] = result->ToJson();
    const std::string title = absl::StrCat(what, " (actors ", ActorList(actors), ")");
    const std::string path = (fs::path(dir) / ("confusion_" + stem)).string();
    if (absl::Status s = result->WriteCsv(path + ".csv"); !s.ok()) return s;
    if (absl::Status s = result->WriteSvg(path + ".svg", title); !s.ok()) return s;
    std::fprintf(stderr, "\n%s:\n%s", title.c_str(), result->ToText().c_str());
    return absl::OkStatus();
  };
  if (absl::Status s = evaluate(val_audio, "validation", "val", val_actors, validation);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::vector<RavdessClip>> test_list = ListRavdess(data_dir, test_actors);
  if (test_list.ok()) {
    absl::StatusOr<std::vector<LabeledAudio>> test_audio =
        LoadRavdessAudio(*test_list, config->sample_rate);
    if (!test_audio.ok()) return test_audio.status();
    if (absl::Status s = evaluate(*test_audio, "test", "test", test_actors, std::nullopt);
        !s.ok()) {
      return s;
    }
  } else {
    std::fprintf(stderr, "no test clips (%s): test metrics not recorded\n",
                 std::string(test_list.status().message()).c_str());
  }
  return SaveModelConfig(*config, json_path);
}

// The actors a member trained on, validated on (selected its epoch with)
// and was tested on, from its model.json.
struct MemberSplit {
  std::set<int> train, val, test;
};

absl::StatusOr<MemberSplit> ReadSplit(const ModelConfig& config, const std::string& dir) {
  if (!config.provenance.contains("split")) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/model.json records no split: its training actors are unknown"));
  }
  MemberSplit split;
  try {
    const nlohmann::json& json = config.provenance.at("split");
    split.train = json.at("train_actors").get<std::set<int>>();
    split.val = json.at("val_actors").get<std::set<int>>();
    split.test = json.at("test_actors").get<std::set<int>>();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/model.json's split is malformed: ", e.what()));
  }
  for (int actor : split.test) {
    if (split.train.count(actor) || split.val.count(actor)) {
      return absl::InvalidArgumentError(absl::StrCat(
          dir, " trained or validated on test actor ", actor, ": it cannot join an ensemble "
          "tested on that actor"));
    }
  }
  return split;
}

}  // namespace

FeatureParams DefaultTrainFeatures() {
  FeatureParams p;
  p.kind = FeatureKind::kMfcc;
  p.n_mfcc = 40;
  p.n_fft = 512;
  p.win_length = 400;
  p.hop_length = 160;
  p.window = WindowType::kHamming;
  p.center = true;
  p.pad_mode = PadMode::kConstant;
  p.n_mels = 64;
  p.fmin = 0.0;
  p.fmax = 8000.0;
  p.db_ref = DbRef::kOne;
  p.top_db = 80.0;
  p.sample_rate = 16000;
  return p;
}

namespace {

absl::Status CheckTrainOptions(const TrainOptions& options) {
  if (!(options.speed_min > 0 && options.speed_min <= options.speed_max)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "speed perturbation range [", options.speed_min, ", ", options.speed_max,
        "] must be positive and ordered"));
  }
  if (!(options.gain_db >= 0 && options.gain_db <= 60)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gain-db ", options.gain_db, " must be in [0, 60]"));
  }
  if (options.speaker_normalization &&
      (options.architecture.parallel_branches || options.speaker_adversarial_weight > 0 ||
       options.mixup_alpha > 0)) {
    return absl::InvalidArgumentError(
        "--speaker-normalization trains statistics-only models (--statistics-only) without "
        "mixup (--mixup 0) or a speaker adversary");
  }
  if (!(options.ema_decay >= 0 && options.ema_decay < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ema-decay ", options.ema_decay, " must be in [0, 1)"));
  }
  return absl::OkStatus();
}

// The given training actors, or every actor in neither the validation nor
// the test set; none of them may be in either.
absl::StatusOr<std::set<int>> TrainActors(const TrainOptions& options) {
  std::set<int> train_actors = options.train_actors;
  if (train_actors.empty()) {
    for (int a = 1; a <= 24; ++a) {
      if (!options.val_actors.count(a) && !options.test_actors.count(a)) train_actors.insert(a);
    }
  }
  for (int a : train_actors) {
    if (options.val_actors.count(a) || options.test_actors.count(a)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "actor ", a, " is in the training set and in the validation or test set"));
    }
  }
  return train_actors;
}

// The training and validation clips of the split. The test actors' clips
// are read only by the final evaluation.
struct TrainingData {
  std::set<int> train_actors;
  std::vector<RavdessClip> train_clips;
  std::vector<LabeledAudio> train_audio;
  std::vector<LabeledAudio> val_audio;
};

absl::StatusOr<TrainingData> LoadTrainingData(const TrainOptions& options) {
  absl::StatusOr<std::set<int>> train_actors = TrainActors(options);
  if (!train_actors.ok()) return train_actors.status();
  absl::StatusOr<std::vector<RavdessClip>> train_list =
      ListRavdess(options.data_dir, *train_actors);
  if (!train_list.ok()) return train_list.status();
  absl::StatusOr<std::vector<RavdessClip>> val_list =
      ListRavdess(options.data_dir, options.val_actors);
  if (!val_list.ok()) return val_list.status();
  std::fprintf(stderr, "train: actors %s (%zu clips); validation: actors %s (%zu clips)\n",
               ActorList(*train_actors).c_str(), train_list->size(),
               ActorList(options.val_actors).c_str(), val_list->size());
  absl::StatusOr<std::vector<LabeledAudio>> train_audio =
      LoadRavdessAudio(*train_list, options.sample_rate);
  if (!train_audio.ok()) return train_audio.status();
  absl::StatusOr<std::vector<LabeledAudio>> val_audio =
      LoadRavdessAudio(*val_list, options.sample_rate);
  if (!val_audio.ok()) return val_audio.status();
  return TrainingData{*std::move(train_actors), *std::move(train_list),
                      *std::move(train_audio), *std::move(val_audio)};
}

// What the model is and sees. The config is the one source of truth for
// features from here on.
struct ModelSetup {
  ModelConfig config;
  std::unique_ptr<FeatureExtractor> extractor;
  ArchitectureOptions architecture;
  int rows = 0;  // one window's features are [rows, cols]
  int cols = 0;
  size_t window = 0;  // samples
};

// The architecture options completed with what the input and the labels
// fix: the input's size, the classes and, with pitch, the pitch rows.
absl::StatusOr<ArchitectureOptions> TrainArchitecture(const TrainOptions& options,
                                                      const ModelConfig& config) {
  ArchitectureOptions architecture = options.architecture;
  architecture.num_features = config.num_features();
  architecture.num_frames = config.num_frames();
  architecture.num_classes = static_cast<int>(config.labels.size());
  if (options.pitch) {
    if (config.features.kind != FeatureKind::kLogMel) {
      return absl::InvalidArgumentError("--pitch needs --features log_mel (rows = mel bands)");
    }
    absl::StatusOr<PitchRows> pitch =
        PitchRowsOf(MelFrequencies(config.features, config.sample_rate));
    if (!pitch.ok()) return pitch.status();
    architecture.pitch_rows = pitch->rows;
    architecture.pitch_row_hz = pitch->row_hz;
  }
  return architecture;
}

absl::StatusOr<ModelSetup> SetUpModel(const TrainOptions& options) {
  ModelSetup setup;
  ModelConfig& config = setup.config;
  config.name = options.model_name;
  config.version = options.model_version;
  config.labels = RavdessLabels();
  config.sample_rate = options.sample_rate;
  config.window_seconds = options.window_seconds;
  config.features = options.features;
  config.features.sample_rate = options.sample_rate;
  if (options.speaker_normalization) {
    config.speaker_normalization = SpeakerNormalization::kSummaryMean;
  }
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  if (!extractor.ok()) return extractor.status();
  setup.extractor = *std::move(extractor);
  setup.rows = config.num_features();
  setup.cols = config.num_frames();
  setup.window = config.window_samples();
  absl::StatusOr<ArchitectureOptions> architecture = TrainArchitecture(options, config);
  if (!architecture.ok()) return architecture.status();
  setup.architecture = *architecture;
  config.architecture = ArchitectureOptionsToJson(setup.architecture);
  return setup;
}

// Sets the module's feature_mean / feature_std to the statistics of what
// its CNN and Transformer branches see (the input, or its cepstra) over the
// first window of every training clip. Returns the input's row means.
absl::StatusOr<std::vector<float>> NormaliseFeatures(const ModelSetup& setup,
                                                     const std::vector<LabeledAudio>& train_audio,
                                                     torch::jit::Module& module) {
  absl::StatusOr<torch::Tensor> first =
      FirstWindows(train_audio, *setup.extractor, setup.window, setup.rows, setup.cols);
  if (!first.ok()) return first.status();
  std::vector<float> mean, stddev;
  RowStatistics(*first, &mean, &stddev);
  std::vector<float> branch_mean = mean, branch_stddev = stddev;
  if (setup.architecture.cepstral_coefficients > 0) {
    torch::NoGradGuard no_grad;
    RowStatistics(module.run_method("branch_input", *first).toTensor(), &branch_mean,
                  &branch_stddev);
  }
  module.attr("feature_mean").toTensor().copy_(torch::tensor(branch_mean));
  module.attr("feature_std").toTensor().copy_(torch::tensor(branch_stddev));
  return mean;
}

// The moving average of a module's weights that validation, selection and
// model.pt use (with a positive decay): a copy of the module whose
// parameters follow the trained ones and whose buffers (batch norm
// statistics, feature normalisation) are copied from them. With decay 0 it
// is the trained module itself.
class WeightAverage {
 public:
  WeightAverage() = default;
  WeightAverage(const torch::jit::Module& trained, double decay);

  // After each optimiser step; `step` counts the steps taken.
  void Update(int64_t step);
  // Before evaluating the average.
  void CopyBuffers();
  torch::jit::Module& module() { return average_; }

 private:
  double decay_ = 0;
  torch::jit::Module average_;
  std::vector<torch::Tensor> trained_parameters_, parameters_, trained_buffers_, buffers_;
};

WeightAverage::WeightAverage(const torch::jit::Module& trained, double decay)
    : decay_(decay), average_(decay > 0 ? trained.deepcopy() : trained) {
  if (decay_ <= 0) return;
  average_.eval();
  for (torch::Tensor p : trained.parameters()) trained_parameters_.push_back(p);
  for (torch::Tensor p : average_.parameters()) {
    p.set_requires_grad(false);
    parameters_.push_back(p);
  }
  for (torch::Tensor b : trained.buffers()) trained_buffers_.push_back(b);
  for (torch::Tensor b : average_.buffers()) buffers_.push_back(b);
}

void WeightAverage::Update(int64_t step) {
  if (decay_ <= 0) return;
  torch::NoGradGuard no_grad;
  // Early on the average follows the weights closely (warm-up).
  const double decay = std::min(decay_, (1.0 + step) / (10.0 + step));
  for (size_t i = 0; i < parameters_.size(); ++i) {
    parameters_[i].mul_(decay).add_(trained_parameters_[i].detach(), 1.0 - decay);
  }
}

void WeightAverage::CopyBuffers() {
  if (decay_ <= 0) return;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].copy_(trained_buffers_[i]);
}

// Speaker-adversarial training's speaker classifier, on the module's
// embedding behind a gradient reversal. It lives outside the module:
// serving never sees it.
struct SpeakerAdversary {
  double weight = 0;  // the reversal's strength; 0: no adversary
  std::map<int, int64_t> speaker_index;  // training actor -> speaker class
  torch::Tensor classifier_weight;
  torch::Tensor classifier_bias;

  bool on() const { return weight > 0; }
};

SpeakerAdversary MakeSpeakerAdversary(double weight, const std::set<int>& train_actors,
                                      const torch::jit::Module& module) {
  SpeakerAdversary adversary;
  adversary.weight = weight;
  std::map<int, int64_t>& index = adversary.speaker_index;
  for (int actor : train_actors) index.emplace(actor, index.size());
  if (!adversary.on()) return adversary;
  const int64_t speakers = static_cast<int64_t>(index.size());
  const int64_t width = module.attr("fc_weight").toTensor().size(1);
  const double bound = 1.0 / std::sqrt(static_cast<double>(width));
  adversary.classifier_weight =
      torch::empty({speakers, width}).uniform_(-bound, bound).requires_grad_(true);
  adversary.classifier_bias = torch::zeros({speakers}).requires_grad_(true);
  return adversary;
}

// Label smoothing and, with balance_classes, each class's weight.
torch::nn::functional::CrossEntropyFuncOptions TrainingLoss(
    const TrainOptions& options, const std::vector<RavdessClip>& train_clips, size_t classes) {
  auto cross_entropy = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(
      options.label_smoothing);
  if (options.balance_classes) {
    std::vector<float> weights = BalancedClassWeights(train_clips, classes);
    cross_entropy.weight(torch::tensor(weights));
    std::fprintf(stderr, "class weights: %s\n", absl::StrJoin(weights, " ").c_str());
  }
  return cross_entropy;
}

// Speaker normalisation's data (TrainOptions::speaker_normalization): the
// summaries have no weights, so what they are of the unaugmented clips holds
// for the whole run.
struct SpeakerPriors {
  std::vector<SummarySum> clips;  // each training clip's speech windows
  std::map<int, std::vector<size_t>> actor_clips;  // training clips by actor
  std::vector<std::vector<float>> val_means;  // each validation clip's speaker mean
};

// A training example's speaker is known from this many of its actor's other
// clips, drawn afresh each time (about 7 to 120 s of speech): the model
// learns from estimates as rough as a stream's early ones.
constexpr int kMinPriorClips = 2;
constexpr int kMaxPriorClips = 32;
// Validation clips' speakers are known from this much of their other clips.
constexpr double kValidationPriorSeconds = 60;

// Fills the module's speaker_reference (the training windows' mean summary)
// and returns the priors.
absl::StatusOr<SpeakerPriors> MakeSpeakerPriors(const ModelSetup& setup,
                                                const TrainingData& data,
                                                torch::jit::Module& module) {
  SpeakerPriors priors;
  const BatchSummarizer summarize = TorchSummarizer(module, setup.rows, setup.cols);
  ProgressBar progress("speaker statistics", static_cast<int>(data.train_audio.size()));
  SummarySum total;
  for (size_t c = 0; c < data.train_audio.size(); ++c) {
    absl::StatusOr<SummarySum> speech = SpeechSummaries(
        data.train_audio[c].samples, setup.config, *setup.extractor, summarize);
    if (!speech.ok()) return speech.status();
    if (speech->windows > 0) {
      priors.actor_clips[data.train_audio[c].clip.actor].push_back(c);
      total.sum.resize(speech->sum.size(), 0.0f);
      for (size_t k = 0; k < speech->sum.size(); ++k) total.sum[k] += speech->sum[k];
      total.windows += speech->windows;
    }
    priors.clips.push_back(*std::move(speech));
    progress.Update(static_cast<int>(c + 1));
  }
  progress.Finish();
  if (total.windows == 0) return absl::InvalidArgumentError("no speech in the training clips");
  torch::Tensor reference = torch::tensor(total.sum) / static_cast<double>(total.windows);
  module.attr("speaker_reference").toTensor().copy_(reference);
  absl::StatusOr<std::vector<std::vector<float>>> val_means =
      SpeakerMeans(data.val_audio, setup.config, *setup.extractor, summarize,
                   kValidationPriorSeconds, /*seed=*/1);
  if (!val_means.ok()) return val_means.status();
  priors.val_means = *std::move(val_means);
  return priors;
}

// The module in training and what trains it.
struct Learner {
  torch::jit::Module module;
  int64_t parameter_count = 0;
  std::vector<float> input_mean;  // of each input row: what SpecAugment's masks hold
  WeightAverage average;
  SpeakerAdversary adversary;
  std::vector<torch::Tensor> trainable;  // the module's parameters, then the adversary's
  std::unique_ptr<torch::optim::AdamW> optimizer;
  torch::nn::functional::CrossEntropyFuncOptions loss;
  std::optional<SpeakerPriors> speaker_priors;  // with speaker normalisation
};

// A freshly initialised module, normalised to the training clips, and what
// trains it. Draws from torch's global generator in a fixed order: the
// module's weights, then the adversary's.
absl::StatusOr<Learner> BuildLearner(const TrainOptions& options, const ModelSetup& setup,
                                     const TrainingData& data) {
  absl::StatusOr<torch::jit::Module> built = BuildArchitecture(setup.architecture);
  if (!built.ok()) return built.status();
  Learner learner;
  learner.module = *std::move(built);
  absl::StatusOr<std::vector<float>> input_mean =
      NormaliseFeatures(setup, data.train_audio, learner.module);
  if (!input_mean.ok()) return input_mean.status();
  learner.input_mean = *std::move(input_mean);
  if (options.speaker_normalization) {
    absl::StatusOr<SpeakerPriors> priors = MakeSpeakerPriors(setup, data, learner.module);
    if (!priors.ok()) return priors.status();
    learner.speaker_priors = *std::move(priors);
  }
  for (torch::Tensor p : learner.module.parameters()) {
    p.set_requires_grad(true);
    learner.trainable.push_back(p);
    learner.parameter_count += p.numel();
  }
  learner.average = WeightAverage(learner.module, options.ema_decay);
  std::fprintf(stderr, "model: %lld parameters, input [B, 1, %d, %d]\n",
               static_cast<long long>(learner.parameter_count), setup.rows, setup.cols);
  learner.adversary =
      MakeSpeakerAdversary(options.speaker_adversarial_weight, data.train_actors, learner.module);
  if (learner.adversary.on()) {
    learner.trainable.push_back(learner.adversary.classifier_weight);
    learner.trainable.push_back(learner.adversary.classifier_bias);
  }
  learner.optimizer = std::make_unique<torch::optim::AdamW>(
      learner.trainable,
      torch::optim::AdamWOptions(options.learning_rate).weight_decay(options.weight_decay));
  learner.loss = TrainingLoss(options, data.train_clips, setup.config.labels.size());
  return learner;
}

// A batch of augmented training examples.
struct Batch {
  torch::Tensor x;  // [count, 1, rows, cols]
  torch::Tensor emotions;
  std::vector<int64_t> speakers;  // SpeakerAdversary classes
  torch::Tensor speaker_means;    // [count, W] with speaker normalisation
  // Mixup blends example i with example permutation[i] in the shares
  // lambda and 1 - lambda.
  double lambda = 1.0;
  torch::Tensor permutation;
};

// Mixup: blends each example with another of the batch.
void MixUp(double alpha, std::mt19937_64& rng, Batch* batch) {
  const int64_t count = batch->x.size(0);
  batch->permutation = torch::arange(count, torch::kLong);
  if (!(alpha > 0 && count > 1)) return;
  batch->lambda = SampleBeta(alpha, rng);
  std::vector<int64_t> perm(count);
  for (int64_t i = 0; i < count; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  batch->permutation = torch::tensor(perm, torch::kLong);
  batch->x = batch->lambda * batch->x +
             (1 - batch->lambda) * batch->x.index_select(0, batch->permutation);
}

// Mixup's loss: both labels of each blended example, weighted alike.
torch::Tensor MixupCrossEntropy(const Batch& batch, const torch::Tensor& predicted,
                                const torch::Tensor& labels,
                                const torch::nn::functional::CrossEntropyFuncOptions& options) {
  return batch.lambda * torch::nn::functional::cross_entropy(predicted, labels, options) +
         (1 - batch.lambda) * torch::nn::functional::cross_entropy(
                                  predicted, labels.index_select(0, batch.permutation), options);
}

struct ForwardPass {
  torch::Tensor logits;
  torch::Tensor loss;
};

// The batch's logits and loss: the emotion loss plus, with the adversary,
// its speaker loss.
ForwardPass Forward(Learner& learner, const Batch& batch) {
  torch::jit::Module& module = learner.module;
  const SpeakerAdversary& adversary = learner.adversary;
  torch::Tensor embedding, logits;
  if (batch.speaker_means.defined()) {
    const torch::Tensor summary = module.run_method("summary", batch.x).toTensor();
    logits = module
                 .run_method("summary_logits", summary - batch.speaker_means +
                                                   module.attr("speaker_reference").toTensor())
                 .toTensor();
  } else if (!adversary.on()) {
    logits = module.run_method("logits", batch.x).toTensor();
  } else {
    embedding = module.run_method("embedding", batch.x).toTensor();
    logits = torch::linear(embedding, module.attr("fc_weight").toTensor(),
                           module.attr("fc_bias").toTensor());
  }
  torch::Tensor loss = MixupCrossEntropy(batch, logits, batch.emotions, learner.loss);
  if (adversary.on()) {
    // Gradient reversal: the value of the embedding, the negated (and
    // scaled) gradient of the speaker loss.
    torch::Tensor reversed =
        embedding.detach() - adversary.weight * (embedding - embedding.detach());
    torch::Tensor speaker_logits =
        torch::linear(reversed, adversary.classifier_weight, adversary.classifier_bias);
    const torch::Tensor speakers = torch::tensor(batch.speakers, torch::kLong);
    loss = MixupCrossEntropy(batch, speaker_logits, speakers, {}) + loss;
  }
  return {logits, loss};
}

// The epoch loop's result.
struct TrainingOutcome {
  std::vector<EpochRecord> curve;
  int best_epoch = 0;  // of the best validation UAR
  double seconds = 0;  // training, validation and reports
};

// The epochs. Each trains on every training clip once, in a fresh order and
// with fresh augmentation, then validates the (averaged) module, saves it
// as model.pt when the selection rule keeps the epoch, and writes the
// training curve so far.
class EpochLoop {
 public:
  EpochLoop(const TrainOptions& options, const ModelSetup& setup, const TrainingData& data,
            Learner& learner);

  absl::StatusOr<TrainingOutcome> Run(std::mt19937_64& rng);

 private:
  // A batch's loss and how many of its examples the module got right.
  struct StepResult {
    double loss;
    int64_t correct;
  };

  // Sets the record's learning rate, training loss and accuracy.
  absl::Status TrainEpoch(ProgressBar& progress, std::mt19937_64& rng, EpochRecord* record);
  // The clips order_[first, first + count), augmented and mixed up.
  absl::StatusOr<Batch> MakeBatch(int64_t first, int64_t count, std::mt19937_64& rng);
  // The mean summary of a random few of the clip's actor's other clips.
  torch::Tensor DrawSpeakerMean(size_t clip, std::mt19937_64& rng);
  // One optimiser step, at the schedule's next learning rate.
  StepResult Step(const Batch& batch);
  // Sets the record's validation accuracy and UAR.
  absl::Status Validate(EpochRecord* record);

  const TrainOptions& options_;
  const ModelSetup& setup_;
  const TrainingData& data_;
  Learner& learner_;
  Augmenter augmenter_;
  const int64_t examples_;
  const int64_t batches_per_epoch_;
  const int64_t total_steps_;
  int64_t step_ = 0;
  std::vector<size_t> order_;  // of the training clips, this epoch
  std::vector<float> inputs_;  // the batch's features, before mixup
};

EpochLoop::EpochLoop(const TrainOptions& options, const ModelSetup& setup,
                     const TrainingData& data, Learner& learner)
    : options_(options),
      setup_(setup),
      data_(data),
      learner_(learner),
      augmenter_(options, *setup.extractor, setup.window, learner.input_mean),
      examples_(static_cast<int64_t>(data.train_audio.size())),
      batches_per_epoch_((examples_ + options.batch_size - 1) / options.batch_size),
      total_steps_(batches_per_epoch_ * options.epochs),
      order_(examples_) {}

absl::StatusOr<TrainingOutcome> EpochLoop::Run(std::mt19937_64& rng) {
  const std::string model_path = (fs::path(options_.out_dir) / "model.pt").string();
  TrainingOutcome outcome;
  double best_uar = -1.0;
  const auto train_start = Clock::now();
  for (int epoch = 1; epoch <= options_.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    ProgressBar progress(absl::StrFormat("epoch %d/%d", epoch, options_.epochs),
                         static_cast<int>(batches_per_epoch_));
    EpochRecord record;
    record.epoch = epoch;
    if (absl::Status s = TrainEpoch(progress, rng, &record); !s.ok()) return s;
    if (absl::Status s = Validate(&record); !s.ok()) return s;
    record.seconds = Seconds(epoch_start);
    outcome.curve.push_back(record);
    // Model selection on validation UAR only; ties keep the earlier epoch.
    const bool best = record.val_uar > best_uar;
    if (best) {
      best_uar = record.val_uar;
      outcome.best_epoch = epoch;
    }
    if (options_.keep_best_epoch ? best : epoch == options_.epochs) {
      learner_.average.module().save(model_path);
    }
    const double per_epoch = Seconds(train_start) / epoch;
    progress.Finish(absl::StrFormat(
        "loss %.3f train acc %.3f | val acc %.3f UAR %.3f%s | %.1f s/epoch, %.0f clips/s, "
        "total ETA %s",
        record.train_loss, record.train_accuracy, record.val_accuracy, record.val_uar,
        best ? " *" : "", per_epoch, examples_ / record.seconds,
        FormatDuration(per_epoch * (options_.epochs - epoch)).c_str()));
    if (absl::Status s = WriteTrainingCurveCsv(
            outcome.curve, (fs::path(options_.out_dir) / "training_curve.csv").string());
        !s.ok()) {
      return s;
    }
  }
  if (absl::Status s = WriteTrainingCurveSvg(
          outcome.curve, (fs::path(options_.out_dir) / "training_curve.svg").string());
      !s.ok()) {
    return s;
  }
  outcome.seconds = Seconds(train_start);
  return outcome;
}

absl::Status EpochLoop::TrainEpoch(ProgressBar& progress, std::mt19937_64& rng,
                                   EpochRecord* record) {
  learner_.module.train();
  for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  std::shuffle(order_.begin(), order_.end(), rng);
  double loss_sum = 0.0;
  int64_t correct = 0;
  for (int64_t b = 0; b < batches_per_epoch_; ++b) {
    const int64_t first = b * options_.batch_size;
    const int64_t count = std::min<int64_t>(options_.batch_size, examples_ - first);
    absl::StatusOr<Batch> batch = MakeBatch(first, count, rng);
    if (!batch.ok()) return batch.status();
    const StepResult result = Step(*batch);
    loss_sum += result.loss * count;
    correct += result.correct;
    progress.Update(static_cast<int>(b + 1),
                    absl::StrFormat("loss %.3f", loss_sum / (first + count)));
  }
  record->learning_rate = OneCycleLearningRate(options_.learning_rate, step_ - 1, total_steps_);
  record->train_loss = loss_sum / examples_;
  record->train_accuracy = static_cast<double>(correct) / examples_;
  return absl::OkStatus();
}

absl::StatusOr<Batch> EpochLoop::MakeBatch(int64_t first, int64_t count, std::mt19937_64& rng) {
  const int rows = setup_.rows;
  const int cols = setup_.cols;
  inputs_.resize(static_cast<size_t>(count) * rows * cols);
  std::vector<int64_t> emotions(count);
  Batch batch;
  batch.speakers.resize(count);
  for (int64_t i = 0; i < count; ++i) {
    const LabeledAudio& clip = data_.train_audio[order_[first + i]];
    emotions[i] = clip.clip.emotion;
    batch.speakers[i] = learner_.adversary.speaker_index.at(clip.clip.actor);
    if (absl::Status s = augmenter_.Make(clip.samples, rng,
                                         inputs_.data() + static_cast<size_t>(i) * rows * cols);
        !s.ok()) {
      return s;
    }
  }
  batch.x = torch::from_blob(inputs_.data(), {count, 1, rows, cols});
  batch.emotions = torch::tensor(emotions, torch::kLong);
  if (learner_.speaker_priors.has_value()) {
    std::vector<torch::Tensor> means;
    for (int64_t i = 0; i < count; ++i) means.push_back(DrawSpeakerMean(order_[first + i], rng));
    batch.speaker_means = torch::stack(means);
  }
  MixUp(options_.mixup_alpha, rng, &batch);
  return batch;
}

torch::Tensor EpochLoop::DrawSpeakerMean(size_t clip, std::mt19937_64& rng) {
  const SpeakerPriors& priors = *learner_.speaker_priors;
  std::vector<size_t> others;
  for (size_t o : priors.actor_clips.at(data_.train_audio[clip].clip.actor)) {
    if (o != clip) others.push_back(o);
  }
  const int count = std::min<int>(
      static_cast<int>(others.size()),
      std::uniform_int_distribution<int>(kMinPriorClips, kMaxPriorClips)(rng));
  std::vector<double> sum(priors.clips[others.front()].sum.size(), 0.0);
  int windows = 0;
  for (int i = 0; i < count; ++i) {
    // A partial Fisher-Yates shuffle: `count` distinct clips.
    std::swap(others[i], others[std::uniform_int_distribution<size_t>(i, others.size() - 1)(rng)]);
    const SummarySum& speech = priors.clips[others[i]];
    for (size_t k = 0; k < sum.size(); ++k) sum[k] += speech.sum[k];
    windows += speech.windows;
  }
  return (torch::tensor(sum) / windows).to(torch::kFloat);
}

EpochLoop::StepResult EpochLoop::Step(const Batch& batch) {
  const double lr = OneCycleLearningRate(options_.learning_rate, step_++, total_steps_);
  for (auto& group : learner_.optimizer->param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  }
  const ForwardPass pass = Forward(learner_, batch);
  learner_.optimizer->zero_grad();
  pass.loss.backward();
  torch::nn::utils::clip_grad_norm_(learner_.trainable, 5.0);
  learner_.optimizer->step();
  learner_.average.Update(step_);
  return {pass.loss.item<double>(), pass.logits.argmax(1).eq(batch.emotions).sum().item<int64_t>()};
}

absl::Status EpochLoop::Validate(EpochRecord* record) {
  learner_.module.eval();
  learner_.average.CopyBuffers();
  EvaluateOptions evaluate;
  if (learner_.speaker_priors.has_value()) {
    evaluate.speaker_means = &learner_.speaker_priors->val_means;
  }
  absl::StatusOr<ConfusionMatrix> val =
      EvaluateClips(data_.val_audio, setup_.config, *setup_.extractor,
                    TorchPredictor(learner_.average.module(), setup_.rows, setup_.cols), evaluate);
  if (!val.ok()) return val.status();
  record->val_accuracy = val->accuracy();
  record->val_uar = val->uar();
  return absl::OkStatus();
}

// Records the run in config's provenance, then writes model.json and the
// final reports (EvaluateModelDirectory).
absl::Status WriteTrainedModel(const TrainOptions& options, const TrainingData& data,
                               const TrainingOutcome& outcome, int64_t parameter_count,
                               ModelConfig* config) {
  const int64_t examples = static_cast<int64_t>(data.train_audio.size());
  // Provenance first, metrics after: the final numbers come from loading
  // the written directory exactly as the server does.
  config->provenance = {
      {"command", options.command_line},
      {"data", options.data_dir},
      {"split", SplitJson(data.train_actors, options.val_actors, options.test_actors)},
      {"seed", options.seed},
      {"balance_classes", options.balance_classes},
      {"speaker_adversarial_weight", options.speaker_adversarial_weight},
      {"ema_decay", options.ema_decay},
      {"speaker_normalization", options.speaker_normalization},
      {"epochs", options.epochs},
      {"best_epoch", outcome.best_epoch},
      {"kept_epoch", options.keep_best_epoch ? outcome.best_epoch : options.epochs},
      {"train_clips", examples},
      {"train_seconds", std::round(outcome.seconds)},
      {"train_clips_per_second", std::round(examples * options.epochs / outcome.seconds)},
      {"parameters", parameter_count}};
  return EvaluateModelDirectory(options.out_dir, options.data_dir, data.val_audio,
                                options.val_actors, options.test_actors, config);
}

// The features' JSON without what only MFCCs have.
nlohmann::json SpectrogramJson(FeatureParams p) {
  p.kind = FeatureKind::kLogMel;
  nlohmann::json json = FeatureParamsToJson(p);
  json.erase("n_mfcc");
  return json;
}

// An ensemble's members, in the order given.
struct Members {
  std::vector<ModelConfig> configs;
  // The ensemble's input: the members' features, or the log-mel spectrogram
  // when some members take it and the others its MFCCs (they join through a
  // cepstral adapter).
  FeatureParams input;
  std::vector<torch::jit::Module> modules;  // each taking `input`
  std::vector<MemberSplit> splits;
};

absl::StatusOr<torch::jit::Module> LoadModule(const std::string& dir) {
  try {
    return torch::jit::load((fs::path(dir) / "model.pt").string());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot load ", dir, "/model.pt: ", e.what()));
  }
}

// Checks that member i (its config loaded) shares the first member's
// labels, input and test actors, then adds its split and its module (behind
// a cepstral adapter when it takes the MFCCs of the ensemble's input).
absl::Status AddMember(const EnsembleOptions& options, size_t i, Members* members) {
  const std::string& dir = options.member_dirs[i];
  const ModelConfig& config = members->configs[i];
  const ModelConfig& first = members->configs.front();
  const FeatureParams& input = members->input;
  const auto differs = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, " differs from ", options.member_dirs.front(), " in its ", what,
        ": ensemble members must share input, labels and split"));
  };
  if (config.labels != first.labels) return differs("labels");
  if (config.speaker_normalization != first.speaker_normalization) {
    return differs("speaker_normalization");
  }
  const bool same_features = FeatureParamsToJson(config.features) == FeatureParamsToJson(input);
  const bool cepstra_of_input = config.features.kind == FeatureKind::kMfcc &&
                                input.kind == FeatureKind::kLogMel &&
                                SpectrogramJson(config.features) == SpectrogramJson(input);
  if (config.sample_rate != first.sample_rate ||
      config.window_seconds != first.window_seconds ||
      config.input_layout != first.input_layout || !(same_features || cepstra_of_input)) {
    return differs("input (rate, window or features)");
  }
  absl::StatusOr<MemberSplit> split = ReadSplit(config, dir);
  if (!split.ok()) return split.status();
  if (!members->splits.empty() && split->test != members->splits.front().test) {
    return differs("test actors");
  }
  members->splits.push_back(*std::move(split));
  absl::StatusOr<torch::jit::Module> module = LoadModule(dir);
  if (!module.ok()) return module.status();
  if (!same_features) {
    module = BuildCepstralAdapter(*module, config.features.n_mfcc, input.n_mels);
    if (!module.ok()) return module.status();
  }
  members->modules.push_back(*std::move(module));
  return absl::OkStatus();
}

absl::StatusOr<Members> LoadMembers(const EnsembleOptions& options) {
  if (options.member_dirs.size() < 2) {
    return absl::InvalidArgumentError("an ensemble needs at least two member directories");
  }
  Members members;
  for (const std::string& dir : options.member_dirs) {
    absl::StatusOr<ModelConfig> config =
        LoadModelConfig((fs::path(dir) / "model.json").string());
    if (!config.ok()) return config.status();
    members.configs.push_back(*std::move(config));
  }
  members.input = members.configs.front().features;
  for (const ModelConfig& config : members.configs) {
    if (config.features.kind == FeatureKind::kLogMel) members.input = config.features;
  }
  for (size_t i = 0; i < members.configs.size(); ++i) {
    if (absl::Status s = AddMember(options, i, &members); !s.ok()) return s;
  }
  return members;
}

// A member's entry in the ensemble's provenance: where it is, its features'
// kind, how it was trained and its metrics.
nlohmann::json MemberJson(const std::string& dir, const ModelConfig& config) {
  const nlohmann::json& p = config.provenance;
  nlohmann::json member = {{"dir", dir},
                           {"features", FeatureParamsToJson(config.features)["kind"]}};
  for (const char* key : {"command", "seed", "best_epoch", "kept_epoch", "train_seconds"}) {
    if (p.contains(key)) member[key] = p[key];
  }
  for (const char* key : {"validation", "test"}) {
    if (p.contains(key)) {
      member[key] = {{"accuracy", p[key].value("accuracy", 0.0)},
                     {"uar", p[key].value("uar", 0.0)}};
    }
  }
  return member;
}

// Copies a member's training curves into out_dir as
// training_curve_member<number>.
absl::Status CopyTrainingCurves(const std::string& member_dir, size_t number,
                                const std::string& out_dir) {
  for (const char* ext : {".csv", ".svg"}) {
    const fs::path curve = fs::path(member_dir) / (std::string("training_curve") + ext);
    if (!fs::exists(curve)) continue;
    std::error_code error;
    fs::copy_file(curve, fs::path(out_dir) / absl::StrCat("training_curve_member", number, ext),
                  fs::copy_options::overwrite_existing, error);
    if (error) {
      return absl::InternalError(absl::StrCat("cannot copy ", curve.string(), ": ",
                                              error.message()));
    }
  }
  return absl::OkStatus();
}

// The first member's config on the ensemble's input, with every member's
// architecture and, in its provenance, every member's entry (MemberJson).
// The members' training curves travel with the ensemble: they are copied
// into out_dir.
absl::StatusOr<ModelConfig> EnsembleConfig(const EnsembleOptions& options,
                                           const Members& members) {
  ModelConfig config = members.configs.front();
  config.features = members.input;
  if (!options.model_name.empty()) config.name = options.model_name;
  if (!options.model_version.empty()) config.version = options.model_version;
  nlohmann::json architectures = nlohmann::json::array();
  nlohmann::json entries = nlohmann::json::array();
  int64_t parameters = 0;
  for (size_t i = 0; i < members.configs.size(); ++i) {
    const ModelConfig& member = members.configs[i];
    architectures.push_back(member.architecture);
    entries.push_back(MemberJson(options.member_dirs[i], member));
    parameters += member.provenance.value("parameters", int64_t{0});
    if (absl::Status s = CopyTrainingCurves(options.member_dirs[i], i + 1, options.out_dir);
        !s.ok()) {
      return s;
    }
  }
  config.architecture = {{"name", "ensemble"}, {"members", architectures}};
  config.provenance = {{"command", options.command_line},
                       {"data", options.data_dir},
                       {"members", entries},
                       {"parameters", parameters}};
  return config;
}

// The ensemble's split: the union of the members' training and validation
// actors, and their test actors.
struct EnsembleSplit {
  MemberSplit actors;
  bool same = true;  // every member trained and validated on the same actors
};

EnsembleSplit JoinSplits(const std::vector<MemberSplit>& splits) {
  EnsembleSplit joined;
  for (const MemberSplit& split : splits) {
    joined.actors.train.insert(split.train.begin(), split.train.end());
    joined.actors.val.insert(split.val.begin(), split.val.end());
    joined.same =
        joined.same && split.train == splits.front().train && split.val == splits.front().val;
  }
  joined.actors.test = splits.front().test;
  return joined;
}

// Validation actors grouped by the members blind to them (that did not
// train on them); actors that every member trained on are in no group.
std::map<std::vector<size_t>, std::set<int>> BlindGroups(const std::vector<MemberSplit>& splits,
                                                         const std::set<int>& val_actors) {
  std::map<std::vector<size_t>, std::set<int>> groups;
  for (int actor : val_actors) {
    std::vector<size_t> blind;
    for (size_t i = 0; i < splits.size(); ++i) {
      if (!splits[i].train.count(actor)) blind.push_back(i);
    }
    if (!blind.empty()) groups[blind].insert(actor);
  }
  return groups;
}

// Out-of-fold validation, for members that differ in their validation
// actors (cross-validation folds, each selected on its own): each validation
// actor's clips scored by the members that never trained on that actor.
// `validated` gets the actors scored; none is an error.
absl::StatusOr<ConfusionMatrix> ValidateOutOfFold(const Members& members,
                                                  const ModelConfig& config,
                                                  const std::vector<LabeledAudio>& val_audio,
                                                  const std::set<int>& val_actors,
                                                  std::set<int>* validated) {
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  if (!extractor.ok()) return extractor.status();
  ConfusionMatrix out_of_fold(config.labels);
  validated->clear();
  for (const auto& [blind, actors] : BlindGroups(members.splits, val_actors)) {
    std::vector<torch::jit::Module> blind_modules;
    for (size_t i : blind) blind_modules.push_back(members.modules[i]);
    torch::jit::Module scorer = blind_modules.front();
    if (blind_modules.size() > 1) {
      absl::StatusOr<torch::jit::Module> built = BuildEnsemble(blind_modules);
      if (!built.ok()) return built.status();
      scorer = *std::move(built);
    }
    scorer.eval();
    std::vector<LabeledAudio> audio;
    for (const LabeledAudio& clip : val_audio) {
      if (actors.count(clip.clip.actor)) audio.push_back(clip);
    }
    absl::StatusOr<ConfusionMatrix> matrix =
        EvaluateClips(audio, config, **extractor,
                      TorchPredictor(scorer, config.num_features(), config.num_frames()));
    if (!matrix.ok()) return matrix.status();
    out_of_fold.Merge(*matrix);
    validated->insert(actors.begin(), actors.end());
  }
  if (validated->empty()) {
    return absl::InvalidArgumentError(
        "no validation actor is unseen by any member: nothing to validate the ensemble on");
  }
  return out_of_fold;
}

}  // namespace

absl::Status Train(const TrainOptions& options) {
  const auto start = Clock::now();
  if (absl::Status s = CreateDirectory(options.out_dir); !s.ok()) return s;
  if (absl::Status s = CheckTrainOptions(options); !s.ok()) return s;
  SetUpModelRuntime(options.intra_op_threads);
  torch::manual_seed(options.seed);
  std::mt19937_64 rng(options.seed);

  absl::StatusOr<TrainingData> data = LoadTrainingData(options);
  if (!data.ok()) return data.status();
  absl::StatusOr<ModelSetup> setup = SetUpModel(options);
  if (!setup.ok()) return setup.status();
  absl::StatusOr<Learner> learner = BuildLearner(options, *setup, *data);
  if (!learner.ok()) return learner.status();
  absl::StatusOr<TrainingOutcome> outcome = EpochLoop(options, *setup, *data, *learner).Run(rng);
  if (!outcome.ok()) return outcome.status();
  if (absl::Status s = WriteTrainedModel(options, *data, *outcome, learner->parameter_count,
                                         &setup->config);
      !s.ok()) {
    return s;
  }
  const int64_t examples = static_cast<int64_t>(data->train_audio.size());
  std::fprintf(stderr, "wrote %s in %s (training %s, %.0f clips/s)\n", options.out_dir.c_str(),
               FormatDuration(Seconds(start)).c_str(), FormatDuration(outcome->seconds).c_str(),
               examples * options.epochs / outcome->seconds);
  return absl::OkStatus();
}

absl::Status Ensemble(const EnsembleOptions& options) {
  absl::StatusOr<Members> members = LoadMembers(options);
  if (!members.ok()) return members.status();
  absl::StatusOr<torch::jit::Module> ensemble = BuildEnsemble(members->modules);
  if (!ensemble.ok()) return ensemble.status();

  if (absl::Status s = CreateDirectory(options.out_dir); !s.ok()) return s;
  absl::StatusOr<ModelConfig> config = EnsembleConfig(options, *members);
  if (!config.ok()) return config.status();
  const EnsembleSplit split = JoinSplits(members->splits);
  try {
    ensemble->save((fs::path(options.out_dir) / "model.pt").string());
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("cannot save the ensemble: ", e.what()));
  }

  absl::StatusOr<std::vector<LabeledAudio>> val_audio =
      LoadRavdessActors(options.data_dir, split.actors.val, config->sample_rate);
  if (!val_audio.ok()) return val_audio.status();
  nlohmann::json split_json = SplitJson(split.actors.train, split.actors.val, split.actors.test);
  std::optional<ConfusionMatrix> out_of_fold;
  std::set<int> validated = split.actors.val;
  if (!split.same) {
    absl::StatusOr<ConfusionMatrix> matrix =
        ValidateOutOfFold(*members, *config, *val_audio, split.actors.val, &validated);
    if (!matrix.ok()) return matrix.status();
    out_of_fold = *std::move(matrix);
    split_json["validation"] =
        absl::StrCat("out of fold: each of actors ", ActorList(validated),
                     " scored by the members that did not train on it");
  }
  config->provenance["split"] = split_json;
  if (absl::Status s = EvaluateModelDirectory(options.out_dir, options.data_dir, *val_audio,
                                              validated, split.actors.test, &*config,
                                              out_of_fold);
      !s.ok()) {
    return s;
  }
  std::fprintf(stderr, "wrote %s: an ensemble of %zu models\n", options.out_dir.c_str(),
               members->configs.size());
  return absl::OkStatus();
}

}  // namespace emoserve
