// The trainer's pieces on real RAVDESS data, a one-epoch smoke run of the
// real binary, and the bundled model's accuracy on the test actors.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/script.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "core/engine.h"
#include "core/features.h"
#include "core/model.h"
#include "core/speaker_statistics.h"
#include "core/stream.h"
#include "core/windowing.h"
#include "tests/test_model.h"
#include "tests/test_support.h"
#include "train/evaluate.h"
#include "train/metrics.h"
#include "train/ravdess.h"

namespace emoserve {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Ravdess(const std::string& shared) { return shared + "/datasets/ravdess"; }

TEST(RavdessTest, ListsTheWholeCorpusWithLabelsFromNames) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: RAVDESS tests need it";
  absl::StatusOr<std::vector<RavdessClip>> all = ListRavdess(Ravdess(*shared));
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), 1440u);
  std::vector<int> per_emotion(8, 0);
  for (const RavdessClip& clip : *all) ++per_emotion[clip.emotion];
  // 60 clips per actor: 4 neutral (no strong intensity), 8 of each other.
  EXPECT_EQ(per_emotion[0], 96);
  for (int e = 1; e < 8; ++e) EXPECT_EQ(per_emotion[e], 192) << RavdessLabels()[e];
  absl::StatusOr<std::vector<RavdessClip>> test = ListRavdess(Ravdess(*shared), {21, 22, 23, 24});
  ASSERT_TRUE(test.ok());
  EXPECT_EQ(test->size(), 240u);
  for (const RavdessClip& clip : *test) EXPECT_GE(clip.actor, 21);
  EXPECT_THAT((*test)[0].path, ::testing::EndsWith("Actor_21/03-01-01-01-01-01-21.flac"));
}

TEST(RavdessTest, AcceptsTheOriginalWavLayoutAndRejectsMissingFolders) {
  const fs::path dir = fs::path(::testing::TempDir()) / "ravdess_wav" / "Actor_05";
  fs::create_directories(dir);
  std::ofstream(dir / "03-01-05-02-01-01-05.wav") << "x";
  std::ofstream(dir / "03-02-05-02-01-01-05.wav") << "x";  // song: ignored
  std::ofstream(dir / "notes.txt") << "x";
  absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(dir.parent_path().string());
  ASSERT_TRUE(clips.ok()) << clips.status();
  ASSERT_EQ(clips->size(), 1u);
  EXPECT_EQ((*clips)[0].actor, 5);
  EXPECT_EQ(RavdessLabels()[(*clips)[0].emotion], "angry");
  EXPECT_FALSE(ListRavdess("/nonexistent").ok());
  EXPECT_THAT(ListRavdess(dir.parent_path().string(), {7}).status().message(),
              HasSubstr("no RAVDESS speech clips"));
}

TEST(RavdessTest, ParsesActorSets) {
  EXPECT_EQ(*ParseActorSet("21-24"), (std::set<int>{21, 22, 23, 24}));
  EXPECT_EQ(*ParseActorSet("1, 3,5-6"), (std::set<int>{1, 3, 5, 6}));
  EXPECT_FALSE(ParseActorSet("0-3").ok());
  EXPECT_FALSE(ParseActorSet("24-21").ok());
  EXPECT_FALSE(ParseActorSet("a").ok());
  EXPECT_FALSE(ParseActorSet("").ok());
}

// Neutral has half as many clips as every other emotion (no strong
// intensity): twice the weight, and the weighted counts are equal.
TEST(RavdessTest, BalancedClassWeightsEqualiseTheClasses) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: RAVDESS tests need it";
  absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(Ravdess(*shared), {1, 2, 3});
  ASSERT_TRUE(clips.ok()) << clips.status();
  ASSERT_EQ(clips->size(), 180u);
  const std::vector<float> weights = BalancedClassWeights(*clips, RavdessLabels().size());
  ASSERT_EQ(weights.size(), 8u);
  EXPECT_FLOAT_EQ(weights[0], 180.0f / (8 * 12));
  for (int c = 1; c < 8; ++c) EXPECT_FLOAT_EQ(weights[c], 180.0f / (8 * 24)) << c;
  EXPECT_THAT(BalancedClassWeights({}, 8), ::testing::Each(0.0f));
}

TEST(MetricsTest, AccuracyAndUnweightedAverageRecall) {
  ConfusionMatrix m({"x", "y"});
  // x: 3 of 4 right; y: 1 of 2 right.
  m.Add(0, 0); m.Add(0, 0); m.Add(0, 0); m.Add(0, 1);
  m.Add(1, 1); m.Add(1, 0);
  EXPECT_DOUBLE_EQ(m.accuracy(), 4.0 / 6);
  EXPECT_DOUBLE_EQ(m.uar(), (0.75 + 0.5) / 2);
  EXPECT_THAT(m.ToText(), HasSubstr("UAR 0.6250"));
  const std::string csv = (fs::path(::testing::TempDir()) / "cm.csv").string();
  ASSERT_TRUE(m.WriteCsv(csv).ok());
  std::stringstream text;
  text << std::ifstream(csv).rdbuf();
  EXPECT_EQ(text.str(), "true\\predicted,x,y\nx,3,1\ny,1,1\n");
}

// The real trainer for one short epoch on two actors, writing into a fresh
// `out`.
std::string SmokeTrainCommand(const std::string& shared, const fs::path& out,
                              const std::string& extra_flags = "", int epochs = 1) {
  fs::remove_all(out);
  return absl::StrCat(EMOSERVE_BINARY_DIR, "/train/emoserve-train train --data ",
                      Ravdess(shared), " --out ", out.string(), " --epochs ", epochs,
                      " --train-actors 1-2 --val-actors 3 --test-actors 4 --seed 5",
                      extra_flags);
}

TEST(TrainSmokeTest, OneEpochOnTwoActorsWritesAModelDirectory) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "smoke_model";
  const std::string command = SmokeTrainCommand(*shared, out);
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  for (const char* file : {"model.pt", "model.json", "training_curve.csv", "training_curve.svg",
                           "confusion_val.csv", "confusion_val.svg", "confusion_test.csv",
                           "confusion_test.svg"}) {
    EXPECT_TRUE(fs::exists(out / file)) << file;
  }
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const nlohmann::json& provenance = (*model)->config().provenance;
  EXPECT_THAT(provenance["command"].get<std::string>(), HasSubstr("--epochs 1"));
  EXPECT_EQ(provenance["train_clips"], 120);
  EXPECT_EQ(provenance["balance_classes"], true);
  EXPECT_EQ(provenance["test"]["clips"], 60);
  std::ifstream curve(out / "training_curve.csv");
  std::string header, row, extra;
  std::getline(curve, header);
  std::getline(curve, row);
  EXPECT_THAT(header, HasSubstr("val_uar"));
  EXPECT_EQ(row.substr(0, 2), "1,");
  EXPECT_FALSE(std::getline(curve, extra));
}

// The adversarial speaker head trains beside the model but stays out of
// model.pt: the directory serves like any other and records the weight.
// (A statistics-only model: the head does not depend on the architecture,
// and the small model keeps the sanitizer runs short.)
TEST(TrainSmokeTest, SpeakerAdversarialRunWritesAServableModel) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "adversarial_model";
  const std::string command = SmokeTrainCommand(
      *shared, out, " --statistics-only --statistics-hidden 32 --speaker-adversarial 0.3");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_DOUBLE_EQ((*model)->config().provenance["speaker_adversarial_weight"].get<double>(), 0.3);
  EXPECT_EQ((*model)->config().provenance["test"]["clips"], 60);
}

// --speaker-normalization: the model.json says so, the module's reference
// is the training windows' mean summary, a speaker whose mean is the
// reference gets the unadapted answer, and `eval --adapt` reports each prior
// (0 s: the unadapted figures). Refused where it does not apply.
TEST(TrainSmokeTest, SpeakerNormalisedRunAdaptsAndEvalReportsEachPrior) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "speaker_normalised_model";
  const std::string flags =
      " --features log_mel --statistics-only --statistics-hidden 16 --mixup 0 "
      "--speaker-normalization";
  const std::string command = SmokeTrainCommand(*shared, out, flags);
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->config().speaker_normalization, SpeakerNormalization::kSummaryMean);
  EXPECT_EQ((*model)->config().provenance["speaker_normalization"], true);
  EXPECT_THAT((*model)->summary_key(), HasSubstr("statistics summary"));
  const int width = (*model)->summary_size();
  ASSERT_GT(width, 0);
  torch::jit::Module module = torch::jit::load((out / "model.pt").string());
  const torch::Tensor reference = module.attr("speaker_reference").toTensor().contiguous();
  ASSERT_EQ(reference.numel(), width);
  EXPECT_GT(reference.abs().max().item<float>(), 0.0f);
  // Two windows of a test actor's clip.
  absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(Ravdess(*shared), {4});
  ASSERT_TRUE(clips.ok());
  absl::StatusOr<std::vector<LabeledAudio>> audio =
      LoadRavdessAudio({(*clips)[0], (*clips)[30]}, 16000);
  ASSERT_TRUE(audio.ok());
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create((*model)->config().features, 16000);
  ASSERT_TRUE(extractor.ok());
  std::vector<float> features;
  std::vector<float> window((*model)->config().window_samples());
  FeatureMatrix matrix;
  for (const LabeledAudio& clip : *audio) {
    CopyWindow(clip.samples, 0, window.size(), window.data());
    ASSERT_TRUE((*extractor)->Compute(window, &matrix).ok());
    features.insert(features.end(), matrix.data.begin(), matrix.data.end());
  }
  const float* r = reference.data_ptr<float>();
  std::vector<float> references(r, r + width);
  references.insert(references.end(), r, r + width);
  absl::StatusOr<std::vector<float>> plain = (*model)->Predict(features, 2);
  absl::StatusOr<std::vector<float>> at_reference =
      (*model)->PredictAdapted(features, 2, references);
  ASSERT_TRUE(plain.ok() && at_reference.ok()) << at_reference.status();
  ASSERT_EQ(plain->size(), at_reference->size());
  for (size_t i = 0; i < plain->size(); ++i) EXPECT_NEAR((*plain)[i], (*at_reference)[i], 1e-5);
  // Its own summary as its speaker's mean moves the answer.
  absl::StatusOr<std::vector<float>> own = (*model)->Summarize(features, 2);
  ASSERT_TRUE(own.ok());
  absl::StatusOr<std::vector<float>> adapted = (*model)->PredictAdapted(features, 2, *own);
  ASSERT_TRUE(adapted.ok());
  double moved = 0;
  for (size_t i = 0; i < plain->size(); ++i) moved += std::abs((*plain)[i] - (*adapted)[i]);
  EXPECT_GT(moved, 1e-4);
  EXPECT_EQ((*model)->PredictAdapted(features, 2, absl::MakeSpan(*own).subspan(1)).status().code(),
            absl::StatusCode::kInvalidArgument);

  const fs::path report = fs::path(::testing::TempDir()) / "adapt.json";
  const std::string eval = absl::StrCat(EMOSERVE_BINARY_DIR, "/train/emoserve-train eval --model ",
                                        out.string(), " --data ", Ravdess(*shared),
                                        " --actors 4 --adapt 0 10 --json > ", report.string());
  ASSERT_EQ(std::system(eval.c_str()), 0) << eval;
  const nlohmann::json result = nlohmann::json::parse(std::ifstream(report));
  ASSERT_EQ(result["adapted"].size(), 2u) << result.dump();
  EXPECT_EQ(result["adapted"][0]["prior_seconds"], 0.0);
  EXPECT_EQ(result["adapted"][0]["uar"], result["uar"]);
  EXPECT_EQ(result["adapted"][1]["prior_seconds"], 10.0);
  EXPECT_EQ(result["adapted"][1]["clips"], 60);

  // A model without speaker normalization has nothing to adapt.
  const std::string plain_eval =
      absl::StrCat(EMOSERVE_BINARY_DIR, "/train/emoserve-train eval --model ", EMOSERVE_SOURCE_DIR,
                   "/models/default --data ", Ravdess(*shared), " --actors 4 --adapt 10 2>&1");
  const auto [plain_status, plain_output] = testing::RunCommand(plain_eval);
  EXPECT_NE(plain_status, 0);
  EXPECT_THAT(plain_output, HasSubstr("no speaker normalization"));
  // Models with more than a summary, or mixup, are refused.
  for (const char* refused : {" --mixup 0 --speaker-normalization",
                              " --statistics-only --mixup 0.2 --speaker-normalization"}) {
    const auto [status, output] = testing::RunCommand(SmokeTrainCommand(*shared, out, refused));
    EXPECT_NE(status, 0) << refused;
    EXPECT_THAT(output, HasSubstr("--speaker-normalization trains")) << refused;
  }
}

// A log-mel model whose CNN and Transformer branches see MFCCs computed
// inside it, with the statistics branch: the directory records both, its
// module normalises the 40 cepstra (not the 64 mel rows) and it serves.
TEST(TrainSmokeTest, LogMelRunWithCepstralBranchesAndStatistics) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "statistics_model";
  const std::string command = SmokeTrainCommand(
      *shared, out, " --features log_mel --cepstral 40 --statistics-hidden 32");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config();
  EXPECT_EQ(config.features.kind, FeatureKind::kLogMel);
  EXPECT_EQ(config.num_features(), 64);
  EXPECT_EQ(config.architecture["cepstral_coefficients"], 40);
  EXPECT_EQ(config.architecture["statistics_hidden"], 32);
  EXPECT_EQ(config.provenance["test"]["clips"], 60);
  torch::jit::Module module = torch::jit::load((out / "model.pt").string());
  const torch::Tensor mean = module.attr("feature_mean").toTensor();
  ASSERT_EQ(mean.numel(), 40);
  // MFCC 0 of speech is hundreds below zero; a log-mel row mean is not.
  EXPECT_LT(mean[0].item<float>(), -100.0f);
}

// --pitch on 128 mel bands of a 64 ms window: a statistics-only model whose
// json records the pitch rows the trainer derived from the mel bands (42
// below 1 kHz, 23.4 Hz apart), and which serves. Features that cannot
// resolve a low voice, or MFCC input, are refused with a message.
TEST(TrainSmokeTest, PitchRunDerivesItsRowsFromTheMelBands) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "pitch_model";
  const std::string flags =
      " --features log_mel --statistics-only --statistics-hidden 16 --pitch --n-mels 128 "
      "--n-fft 1024 --win-length 1024";
  const std::string command = SmokeTrainCommand(*shared, out, flags);
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config();
  EXPECT_EQ(config.num_features(), 128);
  EXPECT_EQ(config.features.n_fft, 1024);
  EXPECT_EQ(config.architecture["pitch_rows"], 42);
  EXPECT_NEAR(config.architecture["pitch_row_hz"].get<double>(), 23.4, 0.1);
  EXPECT_EQ(config.provenance["test"]["clips"], 60);
  const fs::path refused = fs::path(::testing::TempDir()) / "pitch_refused";
  for (const std::string bad : {" --features log_mel --statistics-hidden 16 --pitch",
                                " --statistics-hidden 16 --pitch --n-mels 128 --n-fft 1024"}) {
    const auto [status, output] = testing::RunCommand(SmokeTrainCommand(*shared, refused, bad));
    EXPECT_NE(status, 0) << bad;
    EXPECT_THAT(output, HasSubstr("pitch")) << bad;
  }
}

// --db-ref max: decibels relative to each window's loudest cell, so the
// trained model's features (and answers) do not depend on the recording's
// level, where full-scale decibels (the default) move by the gain. `eval
// --gain-db` scales the clips as a quieter recording would; the max-
// referenced model scores the same at -20 dB.
TEST(TrainSmokeTest, MaxReferencedModelIgnoresTheRecordingsLevel) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "db_max_model";
  const std::string command = SmokeTrainCommand(
      *shared, out, " --statistics-only --statistics-hidden 32 --db-ref max");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config();
  EXPECT_EQ(config.features.db_ref, DbRef::kMax);
  EXPECT_EQ(config.features.amin, 1e-20);

  absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(Ravdess(*shared), {4});
  ASSERT_TRUE(clips.ok());
  clips->resize(1);
  absl::StatusOr<std::vector<LabeledAudio>> audio = LoadRavdessAudio(*clips, config.sample_rate);
  ASSERT_TRUE(audio.ok()) << audio.status();
  std::vector<float> window((*audio)[0].samples.begin(),
                            (*audio)[0].samples.begin() + config.window_samples());
  std::vector<float> quieter = window;
  ApplyGainDb(-20, absl::MakeSpan(quieter));
  FeatureParams full_scale = config.features;
  full_scale.db_ref = DbRef::kOne;
  full_scale.amin = 1e-10;
  for (const FeatureParams& params : {config.features, full_scale}) {
    absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
        FeatureExtractor::Create(params, config.sample_rate);
    ASSERT_TRUE(extractor.ok());
    FeatureMatrix loud, quiet;
    ASSERT_TRUE((*extractor)->Compute(window, &loud).ok());
    ASSERT_TRUE((*extractor)->Compute(quieter, &quiet).ok());
    const double largest_change = testing::MaxAbsDifference(loud.data, quiet.data);
    if (params.db_ref == DbRef::kMax) {
      EXPECT_LT(largest_change, 1e-3);
    } else {
      EXPECT_GT(largest_change, 10.0);  // MFCC 0 moves by about 20 dB x sqrt(n_mels)
    }
  }

  std::string matrices[2];
  for (int i = 0; i < 2; ++i) {
    const std::string eval =
        absl::StrCat(EMOSERVE_BINARY_DIR, "/train/emoserve-train eval --model ", out.string(),
                     " --data ", Ravdess(*shared), " --actors 4 --json --gain-db ", i * -20);
    const auto [status, output] = testing::RunCommand(eval);
    ASSERT_EQ(status, 0) << output;
    const nlohmann::json result = nlohmann::json::parse(output.substr(output.find('{')));
    EXPECT_EQ(result["gain_db"], i * -20);
    EXPECT_EQ(result["clips"], 60);
    matrices[i] = result["confusion"].dump();
  }
  EXPECT_EQ(matrices[0], matrices[1]);

  for (const auto& [flags, message] :
       {std::pair{" --db-ref loudest", "--db-ref must be one or max"},
        std::pair{" --gain-db -3", "--gain-db -3 must be in [0, 60]"}}) {
    const auto [status, output] = testing::RunCommand(SmokeTrainCommand(*shared, out, flags));
    EXPECT_NE(status, 0) << flags;
    EXPECT_THAT(output, HasSubstr(message)) << flags;
  }
}

// --ema-decay: the same seed trains the same weights, but validation and
// model.pt use their moving average, so the saved module computes something
// else; its directory serves like any other and records the decay.
TEST(TrainSmokeTest, MovingAverageRunSavesTheAveragedWeights) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  std::vector<std::unique_ptr<Model>> models;
  for (const char* flags : {"", " --ema-decay 0.99"}) {
    const std::string statistics_model =
        absl::StrCat(" --statistics-only --statistics-hidden 32", flags);
    const fs::path out =
        fs::path(::testing::TempDir()) / absl::StrCat("ema_model_", models.size());
    const std::string command = SmokeTrainCommand(*shared, out, statistics_model);
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
    ASSERT_TRUE(model.ok()) << model.status();
    models.push_back(*std::move(model));
  }
  EXPECT_EQ(models[0]->config().provenance["ema_decay"], 0.0);
  EXPECT_EQ(models[1]->config().provenance["ema_decay"], 0.99);
  std::vector<float> input(models[0]->input_size());
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.01 * i) * 20 - 10;
  absl::StatusOr<std::vector<float>> raw = models[0]->Predict(input, 1);
  absl::StatusOr<std::vector<float>> averaged = models[1]->Predict(input, 1);
  ASSERT_TRUE(raw.ok() && averaged.ok());
  EXPECT_GT(testing::MaxAbsDifference(*raw, *averaged), 1e-4);
}

// --keep last: model.pt is the last epoch's, whatever validation says, so
// that the validation score is an estimate instead of a choice; --keep best
// (the default) keeps the best validation UAR's epoch. The recorded
// validation is that of the kept epoch, from the curve.
TEST(TrainSmokeTest, KeepLastSavesTheFinalEpoch) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  constexpr int kEpochs = 4;
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::vector<double>> val_uar(2);
  for (const char* keep : {"best", "last"}) {
    const fs::path out = fs::path(::testing::TempDir()) / absl::StrCat("keep_", keep);
    const std::string command = SmokeTrainCommand(
        *shared, out,
        absl::StrCat(" --features log_mel --statistics-only --statistics-hidden 32 --lr 0.01 --keep ",
                     keep),
        kEpochs);
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    std::ifstream curve(out / "training_curve.csv");
    std::string line;
    std::getline(curve, line);
    const std::vector<std::string> header = absl::StrSplit(line, ',');
    const size_t column = std::find(header.begin(), header.end(), "val_uar") - header.begin();
    ASSERT_LT(column, header.size()) << line;
    while (std::getline(curve, line)) {
      const std::vector<std::string> cells = absl::StrSplit(line, ',');
      val_uar[models.size()].push_back(std::stod(cells.at(column)));
    }
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
    ASSERT_TRUE(model.ok()) << model.status();
    models.push_back(*std::move(model));
  }
  ASSERT_EQ(val_uar[0], val_uar[1]) << "the same seed trains the same epochs";
  ASSERT_EQ(val_uar[0].size(), kEpochs);
  const nlohmann::json& best = models[0]->config().provenance;
  const nlohmann::json& last = models[1]->config().provenance;
  const int best_epoch = best["best_epoch"];
  EXPECT_EQ(best["kept_epoch"], best_epoch);
  EXPECT_EQ(last["best_epoch"], best_epoch);
  EXPECT_EQ(last["kept_epoch"], kEpochs);
  EXPECT_NEAR(best["validation"]["uar"].get<double>(), val_uar[0][best_epoch - 1], 1e-4);
  EXPECT_NEAR(last["validation"]["uar"].get<double>(), val_uar[0].back(), 1e-4);
  std::vector<float> input(models[0]->input_size());
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.01 * i) * 20 - 40;
  absl::StatusOr<std::vector<float>> kept_best = models[0]->Predict(input, 1);
  absl::StatusOr<std::vector<float>> kept_last = models[1]->Predict(input, 1);
  ASSERT_TRUE(kept_best.ok() && kept_last.ok());
  if (best_epoch == kEpochs) {
    EXPECT_EQ(testing::MaxAbsDifference(*kept_best, *kept_last), 0.0);
  } else {
    EXPECT_GT(testing::MaxAbsDifference(*kept_best, *kept_last), 0.0);
  }
  const auto [status, output] = testing::RunCommand(
      SmokeTrainCommand(*shared, fs::path(::testing::TempDir()) / "keep_first", " --keep first"));
  EXPECT_NE(status, 0);
  EXPECT_THAT(output, HasSubstr("--keep"));
}

// Two processes with the same seed train the same model, to the bit: no
// augmentation draw, thread or measured FFT plan may differ between runs
// (FFTW_MEASURE plans did, and runs drifted apart after 23 epochs).
TEST(TrainSmokeTest, SameSeedTrainsTheSameModelInAnotherProcess) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  std::vector<std::unique_ptr<Model>> models;
  for (int run = 0; run < 2; ++run) {
    const fs::path out = fs::path(::testing::TempDir()) / absl::StrCat("same_seed_", run);
    const std::string command = SmokeTrainCommand(
        *shared, out,
        " --features log_mel --statistics-only --statistics-hidden 32 --pitch"
        " --n-mels 128 --n-fft 1024 --win-length 1024 --speed-prob 1 --noise-prob 1");
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(out.string());
    ASSERT_TRUE(model.ok()) << model.status();
    models.push_back(*std::move(model));
  }
  EXPECT_EQ(models[0]->config().provenance["validation"].dump(),
            models[1]->config().provenance["validation"].dump());
  std::vector<float> input(models[0]->input_size());
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.01 * i) * 20 - 40;
  absl::StatusOr<std::vector<float>> first = models[0]->Predict(input, 1);
  absl::StatusOr<std::vector<float>> second = models[1]->Predict(input, 1);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(testing::MaxAbsDifference(*first, *second), 0.0);
}

// The features of the first window of each clip.
std::vector<float> FirstWindowFeatures(const std::vector<std::vector<float>>& clips,
                                       const ModelConfig& config) {
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  EXPECT_TRUE(extractor.ok()) << extractor.status();
  std::vector<float> batch;
  for (const std::vector<float>& clip : clips) {
    std::vector<float> window(config.window_samples());
    CopyWindow(clip, 0, window.size(), window.data());
    FeatureMatrix features;
    EXPECT_TRUE((*extractor)->Compute(window, &features).ok());
    batch.insert(batch.end(), features.data.begin(), features.data.end());
  }
  return batch;
}

// `emoserve-train ensemble` of root/<member>... into root/ensemble.
std::string EnsembleCommand(const std::string& shared, const fs::path& root,
                            const std::vector<std::string>& members) {
  std::string command =
      absl::StrCat(EMOSERVE_BINARY_DIR, "/train/emoserve-train ensemble --members");
  for (const std::string& member : members) absl::StrAppend(&command, " ", (root / member).string());
  return absl::StrCat(command, " --data ", Ravdess(shared), " --out ",
                      (root / "ensemble").string(), " --threads 2");
}

// Two members with the same features and split make one model directory
// whose probabilities are the mean of theirs and whose model.json records
// them; members that disagree on the split are refused.
TEST(EnsembleTest, AveragesItsMembersAndRecordsThem) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the ensemble is evaluated on RAVDESS";
  const fs::path root = fs::path(::testing::TempDir()) / "ensemble";
  fs::remove_all(root);
  ModelConfig config = testing::DefaultModelConfig();
  config.provenance = {{"command", "emoserve-train train (test member)"},
                       {"split", {{"train_actors", {1, 2}}, {"val_actors", {3}}, {"test_actors", {4}}}}};
  std::vector<std::unique_ptr<Model>> members;
  for (int seed : {1, 2}) {
    config.provenance["seed"] = seed;
    const std::string dir = (root / absl::StrCat("member", seed)).string();
    ASSERT_TRUE(testing::WriteTestModel(config, dir, seed).ok());
    absl::StatusOr<std::unique_ptr<Model>> member = Model::Load(dir);
    ASSERT_TRUE(member.ok()) << member.status();
    members.push_back(*std::move(member));
  }
  const std::string command = EnsembleCommand(*shared, root, {"member1", "member2"});
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> ensemble = Model::Load((root / "ensemble").string());
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();

  // Real speech through the three models.
  absl::StatusOr<std::vector<std::vector<float>>> clips =
      LoadRavdessClips(*shared + "/datasets/ravdess", 2);
  ASSERT_TRUE(clips.ok()) << clips.status();
  const std::vector<float> batch = FirstWindowFeatures(*clips, config);
  absl::StatusOr<std::vector<float>> mean = (*ensemble)->Predict(batch, 2);
  absl::StatusOr<std::vector<float>> first = members[0]->Predict(batch, 2);
  absl::StatusOr<std::vector<float>> second = members[1]->Predict(batch, 2);
  ASSERT_TRUE(mean.ok() && first.ok() && second.ok());
  ASSERT_EQ(mean->size(), 16u);
  for (size_t i = 0; i < mean->size(); ++i) {
    EXPECT_NEAR((*mean)[i], 0.5 * ((*first)[i] + (*second)[i]), 1e-6) << i;
  }
  EXPECT_GT(testing::MaxAbsDifference(*first, *second), 1e-3)
      << "the members should differ for the test to mean much";

  const ModelConfig& written = (*ensemble)->config();
  EXPECT_EQ(written.architecture["name"], "ensemble");
  ASSERT_EQ(written.provenance["members"].size(), 2u);
  EXPECT_EQ(written.provenance["members"][1]["seed"], 2);
  EXPECT_THAT(written.provenance["command"].get<std::string>(), HasSubstr("ensemble --members"));
  EXPECT_EQ(written.provenance["split"]["test_actors"], nlohmann::json({4}));
  EXPECT_EQ(written.provenance["validation"]["clips"], 60);
  EXPECT_EQ(written.provenance["test"]["clips"], 60);
  for (const char* file : {"confusion_val.csv", "confusion_test.svg"}) {
    EXPECT_TRUE(fs::exists(root / "ensemble" / file)) << file;
  }

  // A member tested on other actors could have trained on these.
  config.provenance["split"]["test_actors"] = {5};
  ASSERT_TRUE(testing::WriteTestModel(config, (root / "member2").string(), 2).ok());
  EXPECT_NE(std::system((command + " 2>/dev/null").c_str()), 0);
}

// Cross-validation folds: members that differ in their validation actors
// make one ensemble, validated out of fold (each validation actor's clips
// scored by the members that did not train on that actor), with the union
// of the members' actors as its split. A member that trained on a test
// actor is refused.
TEST(EnsembleTest, FoldsAreValidatedOutOfFold) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the ensemble is evaluated on RAVDESS";
  const fs::path root = fs::path(::testing::TempDir()) / "fold_ensemble";
  fs::remove_all(root);
  ModelConfig config = testing::DefaultModelConfig();
  // Fold A validates on actor 3, fold B on actor 2.
  const nlohmann::json splits[2] = {
      {{"train_actors", {1, 2}}, {"val_actors", {3}}, {"test_actors", {4}}},
      {{"train_actors", {1, 3}}, {"val_actors", {2}}, {"test_actors", {4}}}};
  std::vector<std::unique_ptr<Model>> folds;
  for (int i = 0; i < 2; ++i) {
    config.provenance = {{"split", splits[i]}};
    const std::string dir = (root / absl::StrCat("fold", i)).string();
    ASSERT_TRUE(testing::WriteTestModel(config, dir, i + 1).ok());
    absl::StatusOr<std::unique_ptr<Model>> fold = Model::Load(dir);
    ASSERT_TRUE(fold.ok()) << fold.status();
    folds.push_back(*std::move(fold));
  }
  const std::string command = EnsembleCommand(*shared, root, {"fold0", "fold1"});
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> ensemble = Model::Load((root / "ensemble").string());
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  const nlohmann::json& provenance = (*ensemble)->config().provenance;
  EXPECT_EQ(provenance["split"]["train_actors"], nlohmann::json({1, 2, 3}));
  EXPECT_EQ(provenance["split"]["val_actors"], nlohmann::json({2, 3}));
  EXPECT_THAT(provenance["split"]["validation"].get<std::string>(), HasSubstr("out of fold"));

  // Expected: fold A on actor 3's clips and fold B on actor 2's, pooled.
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  ASSERT_TRUE(extractor.ok());
  ConfusionMatrix expected(config.labels);
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(Ravdess(*shared), {3 - i});
    ASSERT_TRUE(clips.ok());
    absl::StatusOr<std::vector<LabeledAudio>> audio = LoadRavdessAudio(*clips, config.sample_rate);
    ASSERT_TRUE(audio.ok());
    absl::StatusOr<ConfusionMatrix> matrix =
        EvaluateClips(*audio, config, **extractor, [&](absl::Span<const float> f, int batch, absl::Span<const float>) {
          return folds[i]->Predict(f, batch);
        });
    ASSERT_TRUE(matrix.ok()) << matrix.status();
    expected.Merge(*matrix);
  }
  EXPECT_EQ(provenance["validation"]["clips"], 120);
  EXPECT_EQ(provenance["validation"]["confusion"], expected.ToJson()["confusion"]);
  EXPECT_EQ(provenance["test"]["clips"], 60);

  // A fold that trained on the test actor.
  config.provenance = {{"split", {{"train_actors", {1, 4}}, {"val_actors", {2}}, {"test_actors", {4}}}}};
  ASSERT_TRUE(testing::WriteTestModel(config, (root / "fold1").string(), 2).ok());
  EXPECT_NE(std::system((command + " 2>/dev/null").c_str()), 0);
}

// eval --hop-seconds places a clip's windows as a request's hop_seconds
// does (0 = half a window) and refuses hops outside (0, window].
// An MFCC model joins a log-mel model's ensemble through a cepstral
// adapter: the ensemble takes log-mel, and its output is the mean of the
// MFCC model on the extractor's MFCCs and the log-mel model on log-mel. An
// MFCC model of another mel spectrogram is refused.
TEST(EnsembleTest, MfccMemberJoinsALogMelEnsemble) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the ensemble is evaluated on RAVDESS";
  const fs::path root = fs::path(::testing::TempDir()) / "cepstral_ensemble";
  fs::remove_all(root);
  ModelConfig mfcc_config = testing::DefaultModelConfig();
  mfcc_config.provenance = {
      {"split", {{"train_actors", {1, 2}}, {"val_actors", {3}}, {"test_actors", {4}}}}};
  ModelConfig mel_config = mfcc_config;
  mel_config.features.kind = FeatureKind::kLogMel;
  ASSERT_TRUE(testing::WriteTestModel(mfcc_config, (root / "mfcc").string(), 1).ok());
  ASSERT_TRUE(testing::WriteTestModel(mel_config, (root / "mel").string(), 2).ok());
  const std::string command = EnsembleCommand(*shared, root, {"mfcc", "mel"});
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  absl::StatusOr<std::unique_ptr<Model>> ensemble = Model::Load((root / "ensemble").string());
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  EXPECT_EQ((*ensemble)->config().features.kind, FeatureKind::kLogMel);
  EXPECT_EQ((*ensemble)->config().provenance["members"][0]["features"], "mfcc");

  absl::StatusOr<std::vector<std::vector<float>>> clips =
      LoadRavdessClips(*shared + "/datasets/ravdess", 2);
  ASSERT_TRUE(clips.ok()) << clips.status();
  absl::StatusOr<std::unique_ptr<Model>> mfcc_model = Model::Load((root / "mfcc").string());
  absl::StatusOr<std::unique_ptr<Model>> mel_model = Model::Load((root / "mel").string());
  ASSERT_TRUE(mfcc_model.ok() && mel_model.ok());
  const std::vector<float> mel = FirstWindowFeatures(*clips, mel_config);
  absl::StatusOr<std::vector<float>> mean = (*ensemble)->Predict(mel, 2);
  absl::StatusOr<std::vector<float>> first =
      (*mfcc_model)->Predict(FirstWindowFeatures(*clips, mfcc_config), 2);
  absl::StatusOr<std::vector<float>> second = (*mel_model)->Predict(mel, 2);
  ASSERT_TRUE(mean.ok() && first.ok() && second.ok());
  ASSERT_EQ(mean->size(), 16u);
  for (size_t i = 0; i < mean->size(); ++i) {
    EXPECT_NEAR((*mean)[i], 0.5 * ((*first)[i] + (*second)[i]), 1e-4) << i;
  }

  ModelConfig other = mfcc_config;
  other.features.n_mels = 40;
  ASSERT_TRUE(testing::WriteTestModel(other, (root / "mfcc").string(), 1).ok());
  EXPECT_NE(std::system((command + " 2>/dev/null").c_str()), 0);
}

// Six clips of actor 1 and the default features, as EvaluateClips sees them.
class EvaluateClipsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::optional<std::string> shared = testing::SharedDir();
    if (!shared) GTEST_SKIP() << "../shared is absent: evaluation needs RAVDESS";
    absl::StatusOr<std::unique_ptr<FeatureExtractor>> created =
        FeatureExtractor::Create(config.features, config.sample_rate);
    ASSERT_TRUE(created.ok());
    extractor = *std::move(created);
    absl::StatusOr<std::vector<RavdessClip>> clips = ListRavdess(Ravdess(*shared), {1});
    ASSERT_TRUE(clips.ok());
    clips->resize(6);
    absl::StatusOr<std::vector<LabeledAudio>> loaded =
        LoadRavdessAudio(*clips, config.sample_rate);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    audio = *std::move(loaded);
  }

  const ModelConfig config = testing::DefaultModelConfig();
  std::unique_ptr<FeatureExtractor> extractor;
  std::vector<LabeledAudio> audio;
};

TEST_F(EvaluateClipsTest, HopSecondsPlacesTheWindowsAsARequestDoes) {
  const size_t window = config.window_samples();
  for (double hop_seconds : {0.0, 0.5, 3.0}) {
    const size_t hop = hop_seconds == 0 ? window / 2 : static_cast<size_t>(hop_seconds * 16000);
    size_t expected = 0;
    for (const LabeledAudio& clip : audio) {
      expected += WindowStarts(clip.samples.size(), window, hop).size();
    }
    size_t windows = 0;
    absl::StatusOr<ConfusionMatrix> matrix = EvaluateClips(
        audio, config, *extractor,
        [&](absl::Span<const float>, int batch, absl::Span<const float>)
            -> absl::StatusOr<std::vector<float>> {
          windows += batch;
          return std::vector<float>(static_cast<size_t>(batch) * 8, 1.0f / 8);
        },
        {.hop_seconds = hop_seconds,
         .vad_threshold_dbfs = -std::numeric_limits<double>::infinity()});
    ASSERT_TRUE(matrix.ok()) << matrix.status();
    EXPECT_EQ(matrix->total(), 6);
    EXPECT_EQ(windows, expected) << "hop " << hop_seconds;
    EXPECT_GT(windows, 6u);
  }
  for (double bad : {-1.0, 3.5}) {
    absl::StatusOr<ConfusionMatrix> matrix = EvaluateClips(
        audio, config, *extractor,
        [](absl::Span<const float>, int, absl::Span<const float>)
            -> absl::StatusOr<std::vector<float>> {
          return absl::InternalError("must not be called");
        },
        {.hop_seconds = bad});
    EXPECT_EQ(matrix.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

// With speaker means, a clip that has one is answered adapted and a clip
// without (its speaker not heard yet) unadapted; no batch mixes the two.
// eval --adapt's statistics of N s of prior audio are a stream's over the
// same audio, and the service adapts a clip to them as eval does: a
// stream's statistics, carried to Classify, give eval --adapt's answer.
TEST_F(EvaluateClipsTest, AStreamsStatisticsOfThePriorAudioAdaptAsEvalAdapt) {
  ModelConfig adaptive = config;
  adaptive.speaker_normalization = SpeakerNormalization::kSummaryMean;
  const std::string dir = (fs::path(::testing::TempDir()) / "adaptive_eval_model").string();
  ASSERT_TRUE(testing::WriteTestModel(adaptive, dir).ok());
  absl::StatusOr<std::unique_ptr<Model>> loaded = Model::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::shared_ptr<const Model> model = *std::move(loaded);
  // The prior: the actor's clips 1-5 joined (about 18 s), as eval joins them.
  std::vector<float> prior;
  for (size_t c = 1; c < audio.size(); ++c) {
    prior.insert(prior.end(), audio[c].samples.begin(), audio[c].samples.end());
  }
  absl::StatusOr<SummarySum> speech = SpeechSummaries(
      prior, adaptive, *extractor,
      [&](absl::Span<const float> f, int batch) { return model->Summarize(f, batch); });
  ASSERT_TRUE(speech.ok()) << speech.status();
  ASSERT_GE(speech->windows, 5);
  std::vector<float> eval_mean = speech->sum;
  for (float& v : eval_mean) v /= static_cast<float>(speech->windows);

  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(model, EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::string blob;
  absl::Notification streamed;
  absl::Status stream_status;
  absl::StatusOr<std::unique_ptr<StreamSession>> session = StreamSession::Create(
      engine->get(), StreamOptions(),
      [&](const StreamEvent& event) {
        if (event.type == StreamEvent::Type::kUtterance) blob = event.speaker_statistics;
      },
      [&](absl::Status status) {
        stream_status = status;
        streamed.Notify();
      });
  ASSERT_TRUE(session.ok()) << session.status();
  for (size_t i = 0; i < prior.size(); i += 1600) {
    ASSERT_TRUE((*session)->Push(absl::MakeConstSpan(prior).subspan(
                                     i, std::min<size_t>(1600, prior.size() - i)))
                    .ok());
  }
  (*session)->Finish();
  ASSERT_TRUE(streamed.WaitForNotificationWithTimeout(absl::Seconds(300)));
  ASSERT_TRUE(stream_status.ok()) << stream_status;
  absl::StatusOr<SpeakerStatistics> statistics =
      SpeakerStatistics::Parse(blob, model->summary_key(), model->summary_size());
  ASSERT_TRUE(statistics.ok()) << statistics.status();
  EXPECT_EQ(statistics->windows(), speech->windows);
  const std::vector<float> stream_mean = statistics->Mean();
  ASSERT_EQ(stream_mean.size(), eval_mean.size());
  for (size_t k = 0; k < eval_mean.size(); ++k) {
    EXPECT_NEAR(stream_mean[k], eval_mean[k], 1e-4 * (1 + std::abs(eval_mean[k]))) << k;
  }

  // Clip 0: eval --adapt's answer with its mean, the service's with the
  // stream's statistics.
  const std::vector<std::vector<float>> means = {eval_mean};
  ClipPredictions eval;
  EvaluateOptions options;
  options.speaker_means = &means;
  ASSERT_TRUE(EvaluateClips(
                  {audio[0]}, adaptive, *extractor,
                  [&](absl::Span<const float> f, int batch, absl::Span<const float> speaker_means) {
                    return speaker_means.empty() ? model->Predict(f, batch)
                                                 : model->PredictAdapted(f, batch, speaker_means);
                  },
                  options, &eval)
                  .ok());
  ClipRequest request;
  request.samples = audio[0].samples;
  request.speaker_mean = stream_mean;
  absl::Notification classified;
  absl::StatusOr<ClipResult> served;
  request.done = [&](absl::StatusOr<ClipResult> result) {
    served = std::move(result);
    classified.Notify();
  };
  (*engine)->Classify(std::move(request));
  ASSERT_TRUE(classified.WaitForNotificationWithTimeout(absl::Seconds(300)));
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_TRUE(served->speaker_adapted);
  ASSERT_EQ(served->probabilities.size(), eval.probabilities[0].size());
  double moved = 0;
  for (size_t c = 0; c < served->probabilities.size(); ++c) {
    EXPECT_NEAR(served->probabilities[c], eval.probabilities[0][c], 1e-5) << c;
  }
  ClipPredictions plain;
  ASSERT_TRUE(EvaluateClips(
                  {audio[0]}, adaptive, *extractor,
                  [&](absl::Span<const float> f, int batch, absl::Span<const float>) {
                    return model->Predict(f, batch);
                  },
                  {}, &plain)
                  .ok());
  for (size_t c = 0; c < served->probabilities.size(); ++c) {
    moved += std::abs(served->probabilities[c] - plain.probabilities[0][c]);
  }
  EXPECT_GT(moved, 1e-3) << "adapting changed nothing: the comparison would not see it";
  (*engine)->Shutdown();
}

TEST_F(EvaluateClipsTest, ClipsWithoutSpeakerStatisticsAreAnsweredUnadapted) {
  const std::vector<std::vector<float>> means = {{1, 2, 3}, {}, {4, 5, 6}, {}, {}, {7, 8, 9}};
  int adapted = 0, unadapted = 0;
  const BatchPredictor predict = [&](absl::Span<const float>, int batch,
                                     absl::Span<const float> speaker_means)
      -> absl::StatusOr<std::vector<float>> {
    if (speaker_means.empty()) {
      unadapted += batch;
    } else {
      EXPECT_EQ(speaker_means.size(), static_cast<size_t>(batch) * 3);
      adapted += batch;
    }
    return std::vector<float>(static_cast<size_t>(batch) * 8, 1.0f / 8);
  };
  int expected_adapted = 0, expected_unadapted = 0;
  const size_t window = config.window_samples();
  for (size_t c = 0; c < audio.size(); ++c) {
    const int windows = static_cast<int>(
        PlanClip(audio[c].samples, window, window / 2, kDefaultVadThresholdDbfs)
            .to_model.size());
    (means[c].empty() ? expected_unadapted : expected_adapted) += windows;
  }
  absl::StatusOr<ConfusionMatrix> matrix =
      EvaluateClips(audio, config, *extractor, predict, {.speaker_means = &means});
  ASSERT_TRUE(matrix.ok()) << matrix.status();
  EXPECT_EQ(adapted, expected_adapted);
  EXPECT_EQ(unadapted, expected_unadapted);
  const std::vector<std::vector<float>> too_few(5);
  EXPECT_EQ(EvaluateClips(audio, config, *extractor, predict, {.speaker_means = &too_few})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// The bundled model keeps the accuracy its model.json records on the
// speaker-independent test actors (21-24).
TEST(BundledModelTest, KeepsItsRecordedTestAccuracy) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the accuracy test needs RAVDESS";
  SetUpModelRuntime(0);
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::Load(std::string(EMOSERVE_SOURCE_DIR) + "/models/default");
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& config = (*model)->config();
  ASSERT_TRUE(config.provenance.contains("test")) << "model.json records no test accuracy";
  const double recorded = config.provenance["test"]["accuracy"].get<double>();
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  ASSERT_TRUE(extractor.ok());
  absl::StatusOr<std::vector<RavdessClip>> clips =
      ListRavdess(Ravdess(*shared), {21, 22, 23, 24});
  ASSERT_TRUE(clips.ok());
  absl::StatusOr<std::vector<LabeledAudio>> audio = LoadRavdessAudio(*clips, config.sample_rate);
  ASSERT_TRUE(audio.ok()) << audio.status();
  absl::StatusOr<ConfusionMatrix> matrix =
      EvaluateClips(*audio, config, **extractor, [&](absl::Span<const float> f, int batch, absl::Span<const float>) {
        return (*model)->Predict(f, batch);
      });
  ASSERT_TRUE(matrix.ok()) << matrix.status();
  std::cout << matrix->ToText();
  EXPECT_EQ(matrix->total(), 240);
  EXPECT_GE(matrix->accuracy(), recorded - 0.02);
  EXPECT_GE(matrix->uar(), config.provenance["test"]["uar"].get<double>() - 0.02);
}

// models/speaker-adaptive gives its card's figures on the test actors,
// unadapted and with 30 s of each speaker's other clips
// (docs/results/speaker_normalisation_test.json, from eval --adapt).
TEST(BundledModelTest, SpeakerAdaptiveModelKeepsItsCardsFigures) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the accuracy test needs RAVDESS";
  const nlohmann::json card = nlohmann::json::parse(
      std::ifstream(std::string(EMOSERVE_SOURCE_DIR) +
                    "/docs/results/speaker_normalisation_test.json"));
  const fs::path report = fs::path(::testing::TempDir()) / "speaker_adaptive_eval.json";
  const std::string eval = absl::StrCat(
      EMOSERVE_BINARY_DIR, "/train/emoserve-train eval --model ", EMOSERVE_SOURCE_DIR,
      "/models/speaker-adaptive --data ", Ravdess(*shared), " --adapt 0 30 --json > ",
      report.string());
  ASSERT_EQ(std::system(eval.c_str()), 0) << eval;
  const nlohmann::json result = nlohmann::json::parse(std::ifstream(report));
  ASSERT_EQ(result["adapted"].size(), 2u) << result.dump();
  for (const nlohmann::json& prior : result["adapted"]) {
    const nlohmann::json* recorded = nullptr;
    for (const nlohmann::json& entry : card["adapted"]) {
      if (entry["prior_seconds"] == prior["prior_seconds"]) recorded = &entry;
    }
    ASSERT_NE(recorded, nullptr) << prior.dump();
    EXPECT_EQ(prior["clips"], 240);
    // Two clips of 240 for float rounding on another CPU.
    EXPECT_NEAR(prior["uar"].get<double>(), (*recorded)["uar"].get<double>(), 0.01)
        << prior["prior_seconds"];
    EXPECT_NEAR(prior["accuracy"].get<double>(), (*recorded)["accuracy"].get<double>(), 0.01)
        << prior["prior_seconds"];
  }
}

}  // namespace
}  // namespace emoserve
