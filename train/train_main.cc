// emoserve-train: trains the bundled model on RAVDESS and evaluates models.
//   emoserve-train train --data DIR --out DIR [--epochs N --seed S ...]
//   emoserve-train eval --model DIR --data DIR [--actors 21-24] [--precision P] [--adapt S...] [--json] [--predictions CSV]

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/features.h"
#include "core/model.h"
#include "train/evaluate.h"
#include "train/ravdess.h"
#include "train/trainer.h"

namespace emoserve {
namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "emoserve-train: %s\n", std::string(status.message()).c_str());
  return 1;
}

struct EvalCommand {
  std::string model_dir;
  std::string data_dir;
  std::string actors = "21-24";
  std::string device = "cpu";
  int intra_op_threads = 0;
  EvaluateOptions options;
  double gain_db = 0;
  bool json = false;
  std::string predictions;  // CSV of each clip's label; "": none
  std::string precision;    // "": the one model.json names
  // Speaker normalisation: seconds of each speaker's other clips its
  // statistics come from, one evaluation each (0: none).
  std::vector<double> adapt_seconds;
  uint64_t adapt_seed = 1;
};

CLI::App* AddEvalCommand(CLI::App& app, EvalCommand& command) {
  CLI::App* eval = app.add_subcommand(
      "eval", "evaluate a model directory on RAVDESS actors, each clip as the service does");
  eval->add_option("--model", command.model_dir, "model directory")->required();
  eval->add_option("--data", command.data_dir, "RAVDESS folder")->required();
  eval->add_option("--actors", command.actors, "actors to evaluate on")->capture_default_str();
  eval->add_option("--device", command.device, "cpu, cuda or cuda:N")->capture_default_str();
  eval->add_option("--threads", command.intra_op_threads,
                   "LibTorch intra-op threads (0 = all cores)");
  eval->add_option("--hop-seconds", command.options.hop_seconds,
                   "seconds between a clip's windows (0 = half a window, the service's default)")
      ->capture_default_str();
  eval->add_option("--vad-threshold-dbfs", command.options.vad_threshold_dbfs,
                   "windows quieter than this skip the model (the service's default)")
      ->capture_default_str();
  eval->add_option("--gain-db", command.gain_db,
                   "scale every clip by this gain first (dB; not clipped), as a quieter or "
                   "louder recording of the same voice")
      ->capture_default_str();
  eval->add_option("--predictions", command.predictions,
                   "write each clip's label to this CSV (path,label,predicted)");
  eval->add_option("--precision", command.precision,
                   "fp32, bf16 or int8 (default: model.json's); a reduced precision is also "
                   "checked against fp32 on the same clips, and the command fails unless labels "
                   "agree on >= 99% of clips and no probability moves by more than 0.02")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  eval->add_option("--adapt", command.adapt_seconds,
                   "speaker-normalised models: also evaluate each clip with its speaker's "
                   "statistics from this many seconds of the speaker's other clips (a stream "
                   "that heard them first); several values, e.g. --adapt 0 10 30 60 120")
      ->check(CLI::Range(0.0, 3600.0));
  eval->add_option("--adapt-seed", command.adapt_seed,
                   "seed of the order in which the other clips are taken")
      ->capture_default_str();
  eval->add_flag("--json", command.json, "print JSON");
  return eval;
}

// path,label,predicted for each clip, in the order of `audio`.
absl::Status WritePredictions(const std::string& path, const std::vector<LabeledAudio>& audio,
                              const std::vector<int>& predicted, const ModelConfig& config) {
  std::ofstream out(path);
  out << "path,label,predicted\n";
  for (size_t i = 0; i < audio.size(); ++i) {
    out << audio[i].clip.path << "," << RavdessLabels()[audio[i].clip.emotion] << ","
        << config.labels[predicted[i]] << "\n";
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// One model directory in one precision, evaluated as the service answers.
struct Evaluation {
  std::unique_ptr<Model> model;
  ConfusionMatrix matrix;
  ClipPredictions predictions;
};

absl::StatusOr<Evaluation> EvaluateModel(const EvalCommand& command,
                                         std::optional<Precision> precision,
                                         const std::vector<LabeledAudio>& audio) {
  ModelOptions options;
  options.device = command.device;
  options.precision = precision;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(command.model_dir, options);
  if (!model.ok()) return model.status();
  const ModelConfig& config = (*model)->config();
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  if (!extractor.ok()) return extractor.status();
  ClipPredictions predictions;
  absl::StatusOr<ConfusionMatrix> matrix = EvaluateClips(
      audio, config, **extractor,
      [&](absl::Span<const float> features, int batch, absl::Span<const float>) {
        return (*model)->Predict(features, batch);
      },
      command.options, &predictions);
  if (!matrix.ok()) return matrix.status();
  return Evaluation{*std::move(model), *std::move(matrix), std::move(predictions)};
}

// Accuracy and UAR with each speaker's statistics from `seconds` of its
// other clips (AdaptedEvaluations).
struct AdaptedEvaluation {
  double seconds;
  ConfusionMatrix matrix;
};

absl::StatusOr<std::vector<AdaptedEvaluation>> AdaptedEvaluations(
    const EvalCommand& command, const Model& model, const ConfusionMatrix& unadapted,
    const std::vector<LabeledAudio>& audio) {
  std::vector<AdaptedEvaluation> results;
  if (command.adapt_seconds.empty()) return results;
  const ModelConfig& config = model.config();
  if (config.speaker_normalization == SpeakerNormalization::kNone) {
    return absl::InvalidArgumentError(
        "--adapt: this model has no speaker normalization (model.json)");
  }
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  if (!extractor.ok()) return extractor.status();
  for (double seconds : command.adapt_seconds) {
    if (seconds == 0) {
      results.push_back({0, unadapted});
      continue;
    }
    absl::StatusOr<std::vector<std::vector<float>>> means = SpeakerMeans(
        audio, config, **extractor,
        [&](absl::Span<const float> f, int batch) { return model.Summarize(f, batch); },
        seconds, command.adapt_seed, command.options);
    if (!means.ok()) return means.status();
    EvaluateOptions options = command.options;
    options.speaker_means = &*means;
    absl::StatusOr<ConfusionMatrix> matrix = EvaluateClips(
        audio, config, **extractor,
        [&](absl::Span<const float> f, int batch, absl::Span<const float> speaker_means) {
          return speaker_means.empty() ? model.Predict(f, batch)
                                       : model.PredictAdapted(f, batch, speaker_means);
        },
        options);
    if (!matrix.ok()) return matrix.status();
    results.push_back({seconds, *std::move(matrix)});
  }
  return results;
}

int RunEval(const EvalCommand& command) {
  SetUpModelRuntime(command.intra_op_threads);
  absl::StatusOr<std::set<int>> actors = ParseActorSet(command.actors);
  if (!actors.ok()) return Fail(actors.status());
  std::optional<Precision> precision;
  if (!command.precision.empty()) precision = *ParsePrecision(command.precision);
  absl::StatusOr<ModelConfig> declared =
      LoadModelConfig((std::filesystem::path(command.model_dir) / "model.json").string());
  if (!declared.ok()) return Fail(declared.status());
  absl::StatusOr<std::vector<LabeledAudio>> audio =
      LoadRavdessActors(command.data_dir, *actors, declared->sample_rate);
  if (!audio.ok()) return Fail(audio.status());
  // A recording's level depends on the microphone and its gain, not on the
  // voice: --gain-db measures how much the model's answers depend on it.
  if (command.gain_db != 0) {
    for (LabeledAudio& clip : *audio) ApplyGainDb(command.gain_db, absl::MakeSpan(clip.samples));
  }
  absl::StatusOr<Evaluation> evaluation = EvaluateModel(command, precision, *audio);
  if (!evaluation.ok()) return Fail(evaluation.status());
  const ModelConfig& config = evaluation->model->config();
  const char* precision_name = PrecisionName(evaluation->model->precision());
  // A reduced precision is only as good as its agreement with fp32.
  std::optional<PrecisionCheck> check;
  if (evaluation->model->precision() != Precision::kFp32) {
    absl::StatusOr<Evaluation> reference = EvaluateModel(command, Precision::kFp32, *audio);
    if (!reference.ok()) return Fail(reference.status());
    absl::StatusOr<PrecisionCheck> compared =
        ComparePredictions(reference->predictions, evaluation->predictions);
    if (!compared.ok()) return Fail(compared.status());
    check = *compared;
  }
  absl::StatusOr<std::vector<AdaptedEvaluation>> adapted =
      AdaptedEvaluations(command, *evaluation->model, evaluation->matrix, *audio);
  if (!adapted.ok()) return Fail(adapted.status());
  if (!command.predictions.empty()) {
    if (absl::Status s = WritePredictions(command.predictions, *audio,
                                          evaluation->predictions.labels, config);
        !s.ok()) {
      return Fail(s);
    }
  }
  if (command.json) {
    nlohmann::json out = evaluation->matrix.ToJson();
    out["model"] = config.name;
    out["version"] = config.version;
    out["precision"] = precision_name;
    out["actors"] = std::vector<int>(actors->begin(), actors->end());
    out["hop_seconds"] = command.options.hop_seconds;
    out["vad_threshold_dbfs"] = command.options.vad_threshold_dbfs;
    out["gain_db"] = command.gain_db;
    for (const AdaptedEvaluation& a : *adapted) {
      nlohmann::json entry = a.matrix.ToJson();
      entry["prior_seconds"] = a.seconds;
      out["adapted"].push_back(entry);
    }
    if (check) {
      out["against_fp32"] = {{"clips", check->clips},
                             {"agreeing", check->agreeing},
                             {"agreement", check->agreement()},
                             {"max_probability_change", check->max_probability_change},
                             {"worst_clip", (*audio)[check->worst_clip].clip.path},
                             {"passes", check->passes()}};
    }
    std::cout << out.dump(1) << "\n";
  } else {
    std::cout << "model " << config.name << " " << config.version << " in " << precision_name
              << ", actors " << absl::StrJoin(*actors, ",") << "\n"
              << evaluation->matrix.ToText();
    if (!adapted->empty()) {
      std::cout << "speaker-normalised: seconds of the speaker's other clips heard first\n"
                << "prior_s  accuracy  UAR\n";
      for (const AdaptedEvaluation& a : *adapted) {
        std::cout << absl::StrFormat("%7.0f  %8.3f  %.3f\n", a.seconds, a.matrix.accuracy(),
                                     a.matrix.uar());
      }
    }
    if (check) {
      std::cout << absl::StrFormat(
          "against fp32: top labels agree on %d of %d clips (%.1f%%, needs >= %.0f%%); largest "
          "probability change %.4f (needs <= %.2f; %s): %s\n",
          check->agreeing, check->clips, 100 * check->agreement(), 100 * kPrecisionMinAgreement,
          check->max_probability_change, kPrecisionMaxProbabilityChange,
          (*audio)[check->worst_clip].clip.path, check->passes() ? "passes" : "FAILS");
    }
  }
  if (check && !check->passes()) {
    return Fail(absl::FailedPreconditionError(absl::StrCat(
        "precision ", precision_name, " changes this model's answers too much; serve it in fp32")));
  }
  return 0;
}

// Exit status 1 with the message on stderr, or 0.
int ExitCode(const absl::Status& status) { return status.ok() ? 0 : Fail(status); }

// The command as typed, for model.json's provenance.
std::string CommandLine(int argc, char** argv) {
  std::string command_line = "emoserve-train";
  for (int i = 1; i < argc; ++i) command_line += std::string(" ") + argv[i];
  return command_line;
}

// `train`'s options, with the choices given as text until RunTrain parses
// them.
struct TrainCommand {
  TrainOptions options;
  std::string train_actors;
  std::string val_actors = "19-20";
  std::string test_actors = "21-24";
  std::string feature_kind = "mfcc";
  std::string db_ref = "one";
  std::string keep_epoch = "best";
};

void AddFeatureOptions(CLI::App* train, TrainCommand& command) {
  FeatureParams& features = command.options.features;
  train->add_option("--features", command.feature_kind, "mfcc or log_mel")->capture_default_str();
  train->add_option("--n-mfcc", features.n_mfcc)->capture_default_str();
  train->add_option("--n-mels", features.n_mels)->capture_default_str();
  train->add_option("--n-fft", features.n_fft, "FFT size (samples)")->capture_default_str();
  train->add_option("--db-ref", command.db_ref,
                    "decibels relative to full scale (one) or to each window's loudest cell "
                    "(max, with amin 1e-20: the features ignore the recording's level)")
      ->capture_default_str();
  train->add_option("--win-length", features.win_length,
                    "analysis window (samples, at most --n-fft)")
      ->capture_default_str();
}

// Augmentation, loss and model selection.
void AddRecipeOptions(CLI::App* train, TrainCommand& command) {
  TrainOptions& options = command.options;
  train->add_option("--mixup", options.mixup_alpha, "mixup alpha (0 = off)")
      ->capture_default_str();
  train->add_option("--noise-prob", options.noise_probability)->capture_default_str();
  train->add_option("--speed-prob", options.speed_probability)->capture_default_str();
  train->add_option("--speed-min", options.speed_min, "slowest speed perturbation")
      ->capture_default_str();
  train->add_option("--speed-max", options.speed_max, "fastest speed perturbation")
      ->capture_default_str();
  train->add_option("--gain-db", options.gain_db,
                    "scale each example by a gain drawn from +-this many dB (0 = none)")
      ->capture_default_str();
  train->add_option("--time-masks", options.time_masks, "SpecAugment time masks per example")
      ->capture_default_str();
  train->add_option("--feature-masks", options.feature_masks,
                    "SpecAugment feature (row) masks per example")
      ->capture_default_str();
  train->add_option("--label-smoothing", options.label_smoothing)->capture_default_str();
  train->add_option("--speaker-adversarial", options.speaker_adversarial_weight,
                    "gradient-reversal weight of an adversarial speaker classifier (0 = off)")
      ->capture_default_str();
  train->add_flag("--speaker-normalization", options.speaker_normalization,
                  "statistics-only models: train on summaries normalised by each actor's mean "
                  "summary (from a few of its other clips, no labels), as a stream serves once it "
                  "has heard its speaker; evaluate with eval --adapt");
  train->add_option("--ema-decay", options.ema_decay,
                    "evaluate and save a moving average of the weights (0 = off)")
      ->capture_default_str();
  train->add_option("--keep", command.keep_epoch,
                    "the epoch model.pt keeps: best (validation UAR) or last (validation "
                    "only reports: unbiased cross-validation folds)")
      ->check(CLI::IsMember({"best", "last"}))
      ->capture_default_str();
  train->add_flag("--balance-classes,!--no-balance-classes", options.balance_classes,
                  "weigh the loss by inverse class frequency (default on)");
}

void AddArchitectureOptions(CLI::App* train, TrainCommand& command) {
  ArchitectureOptions& architecture = command.options.architecture;
  train->add_option("--conv-dropout", architecture.conv_dropout)->capture_default_str();
  train->add_option("--transformer-dropout", architecture.transformer_dropout)
      ->capture_default_str();
  train->add_option("--heads", architecture.transformer_heads)->capture_default_str();
  train->add_flag("--conv-global-pooling", architecture.conv_global_pooling,
                  "mean and max of each CNN channel instead of flattening its cells");
  train->add_flag("--window-mean-norm", architecture.window_mean_normalization,
                  "subtract each window's mean over time from every feature row");
  train->add_option("--cepstral", architecture.cepstral_coefficients,
                    "CNN and Transformer branches see this many DCT coefficients of each "
                    "frame (with --features log_mel: MFCCs computed inside the model; 0 = off)")
      ->capture_default_str();
  train->add_option("--statistics-hidden", architecture.statistics_hidden,
                    "width of the utterance-statistics branch (0 = off)")
      ->capture_default_str();
  train->add_option("--statistics-cepstral", architecture.statistics_cepstral,
                    "statistics branch: add the deviation and delta RMS of this many DCT "
                    "coefficients of each frame (0 = off)")
      ->capture_default_str();
  train->add_option("--statistics-range-db", architecture.statistics_range_db,
                    "statistics branch: frames within this many dB of the loudest count")
      ->capture_default_str();
  train->add_flag("--pitch", command.options.pitch,
                  "statistics branch: add pitch statistics (log-mel input with mel bands at "
                  "most 37.5 Hz apart below 1 kHz, e.g. --n-mels 128 --n-fft 1024)");
  train->add_flag("--parallel-branches,!--statistics-only", architecture.parallel_branches,
                  "--statistics-only: the statistics branch alone, without the CNN and "
                  "Transformer branches");
}

CLI::App* AddTrainCommand(CLI::App& app, TrainCommand& command) {
  TrainOptions& options = command.options;
  options.features = DefaultTrainFeatures();
  CLI::App* train = app.add_subcommand("train", "train a model and write a model directory");
  train->add_option("--data", options.data_dir, "RAVDESS folder (Actor_NN/...flac|wav)")
      ->required();
  train->add_option("--out", options.out_dir, "output model directory")->required();
  train->add_option("--epochs", options.epochs, "epochs")->capture_default_str();
  train->add_option("--seed", options.seed, "random seed")->capture_default_str();
  train->add_option("--batch-size", options.batch_size)->capture_default_str();
  train->add_option("--lr", options.learning_rate, "peak learning rate (one-cycle AdamW)")
      ->capture_default_str();
  train->add_option("--weight-decay", options.weight_decay)->capture_default_str();
  train->add_option("--threads", options.intra_op_threads,
                    "LibTorch intra-op threads (0 = all cores)")
      ->capture_default_str();
  train->add_option("--train-actors", command.train_actors,
                    "training actors (default: all but validation and test)");
  train->add_option("--val-actors", command.val_actors)->capture_default_str();
  train->add_option("--test-actors", command.test_actors)->capture_default_str();
  AddFeatureOptions(train, command);
  AddRecipeOptions(train, command);
  AddArchitectureOptions(train, command);
  train->add_option("--name", options.model_name)->capture_default_str();
  train->add_option("--version", options.model_version)->capture_default_str();
  return train;
}

// Sets the options that `train` takes as text: features, decibel
// reference, kept epoch, actors.
absl::Status ParseTrainChoices(TrainCommand& command) {
  TrainOptions& options = command.options;
  if (command.feature_kind == "mfcc") {
    options.features.kind = FeatureKind::kMfcc;
  } else if (command.feature_kind == "log_mel") {
    options.features.kind = FeatureKind::kLogMel;
  } else {
    return absl::InvalidArgumentError("--features must be mfcc or log_mel");
  }
  if (command.db_ref == "one") {
    options.features.db_ref = DbRef::kOne;
  } else if (command.db_ref == "max") {
    // librosa's amin (-100 dB full scale) would floor a quiet recording's
    // weak cells where a loud one's are not: far below any signal instead.
    options.features.db_ref = DbRef::kMax;
    options.features.amin = 1e-20;
  } else {
    return absl::InvalidArgumentError("--db-ref must be one or max");
  }
  options.keep_best_epoch = command.keep_epoch == "best";
  for (auto [text, target] : {std::pair{&command.train_actors, &options.train_actors},
                              std::pair{&command.val_actors, &options.val_actors},
                              std::pair{&command.test_actors, &options.test_actors}}) {
    if (text->empty()) continue;
    absl::StatusOr<std::set<int>> parsed = ParseActorSet(*text);
    if (!parsed.ok()) return parsed.status();
    *target = *parsed;
  }
  return absl::OkStatus();
}

int RunTrain(TrainCommand& command, const std::string& command_line) {
  command.options.command_line = command_line;
  if (absl::Status s = ParseTrainChoices(command); !s.ok()) return Fail(s);
  return ExitCode(Train(command.options));
}

struct EnsembleCommand {
  EnsembleOptions options;
  int intra_op_threads = 0;
};

CLI::App* AddEnsembleCommand(CLI::App& app, EnsembleCommand& command) {
  CLI::App* ensemble = app.add_subcommand(
      "ensemble",
      "average models trained with the same features and test actors into one model (folds "
      "that differ in validation actors are validated out of fold)");
  ensemble->add_option("--members", command.options.member_dirs, "model directories (2 or more)")
      ->required()
      ->expected(2, 64);
  ensemble->add_option("--data", command.options.data_dir, "RAVDESS folder, for evaluation")
      ->required();
  ensemble->add_option("--out", command.options.out_dir, "output model directory")->required();
  ensemble->add_option("--name", command.options.model_name, "default: the first member's");
  ensemble->add_option("--version", command.options.model_version,
                       "default: the first member's");
  ensemble->add_option("--threads", command.intra_op_threads,
                       "LibTorch intra-op threads (0 = all cores)");
  return ensemble;
}

int RunEnsemble(EnsembleCommand& command, const std::string& command_line) {
  SetUpModelRuntime(command.intra_op_threads);
  command.options.command_line = command_line;
  return ExitCode(Ensemble(command.options));
}

}  // namespace
}  // namespace emoserve

int main(int argc, char** argv) {
  CLI::App app{"emoserve-train: train and evaluate emoserve's emotion model on RAVDESS"};
  app.require_subcommand(1);
  emoserve::TrainCommand train_command;
  emoserve::EnsembleCommand ensemble_command;
  emoserve::EvalCommand eval_command;
  emoserve::AddTrainCommand(app, train_command);
  CLI::App* ensemble = emoserve::AddEnsembleCommand(app, ensemble_command);
  CLI::App* eval = emoserve::AddEvalCommand(app, eval_command);
  CLI11_PARSE(app, argc, argv);

  if (eval->parsed()) return emoserve::RunEval(eval_command);
  const std::string command_line = emoserve::CommandLine(argc, argv);
  if (ensemble->parsed()) return emoserve::RunEnsemble(ensemble_command, command_line);
  return emoserve::RunTrain(train_command, command_line);
}
