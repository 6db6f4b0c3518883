// The trainer's pieces on real RAVDESS data, a one-epoch smoke run of the
// real binary, and the bundled model's accuracy on the test actors.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "core/features.h"
#include "core/model.h"
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

// Runs the real trainer for one short epoch on two actors.
TEST(TrainSmokeTest, OneEpochOnTwoActorsWritesAModelDirectory) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: training needs RAVDESS";
  const fs::path out = fs::path(::testing::TempDir()) / "smoke_model";
  fs::remove_all(out);
  const std::string command = absl::StrCat(
      EMOSERVE_BINARY_DIR, "/train/emoserve-train train --data ", Ravdess(*shared), " --out ",
      out.string(), " --epochs 1 --train-actors 1-2 --val-actors 3 --test-actors 4 --seed 5");
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

// The bundled model keeps the accuracy its model.json records on the
// speaker-independent test actors (21-24).
TEST(BundledModelTest, KeepsItsRecordedTestAccuracy) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: the accuracy test needs RAVDESS";
  SetModelThreads(0);
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
      EvaluateClips(*audio, config, **extractor, [&](absl::Span<const float> f, int batch) {
        return (*model)->Predict(f, batch);
      });
  ASSERT_TRUE(matrix.ok()) << matrix.status();
  std::cout << matrix->ToText();
  EXPECT_EQ(matrix->total(), 240);
  EXPECT_GE(matrix->accuracy(), recorded - 0.02);
  EXPECT_GE(matrix->uar(), config.provenance["test"]["uar"].get<double>() - 0.02);
}

}  // namespace
}  // namespace emoserve
