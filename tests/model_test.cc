// The model contract: model.json checked against model.pt, inference on
// batches, and the same outputs from Python's torch.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include "core/features.h"
#include "core/model.h"
#include "train/architectures.h"
#include "core/model_config.h"
#include "core/windowing.h"
#include "absl/strings/str_cat.h"
#include "tests/test_model.h"
#include "tests/test_support.h"
#include "train/ravdess.h"

namespace emoserve {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

ModelConfig SmallConfig() { return testing::SmallModelConfig(); }

// A freshly initialised model for `config` in a new directory; returns its
// path.
std::string WriteModelDir(const ModelConfig& config, const std::string& name) {
  const std::string dir = (fs::path(::testing::TempDir()) / name).string();
  const absl::Status written = testing::WriteTestModel(config, dir);
  EXPECT_TRUE(written.ok()) << written;
  return dir;
}

std::vector<float> RandomInputs(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

TEST(ModelTest, LoadsAndReturnsProbabilities) {
  const ModelConfig config = SmallConfig();
  const std::string dir = WriteModelDir(config, "ok");
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->num_classes(), 3);
  EXPECT_EQ((*model)->config().num_frames(), 101);
  const int batch = 5;
  std::vector<float> x = RandomInputs(batch * (*model)->input_size(), 1);
  absl::StatusOr<std::vector<float>> p = (*model)->Predict(x, batch);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->size(), 15u);
  for (int b = 0; b < batch; ++b) {
    EXPECT_NEAR((*p)[b * 3] + (*p)[b * 3 + 1] + (*p)[b * 3 + 2], 1.0f, 1e-5);
  }
}

TEST(ModelTest, BatchedEqualsUnbatched) {
  const std::string dir = WriteModelDir(SmallConfig(), "batched");
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  const int batch = 7;
  const int size = (*model)->input_size();
  std::vector<float> x = RandomInputs(batch * size, 2);
  absl::StatusOr<std::vector<float>> batched = (*model)->Predict(x, batch);
  ASSERT_TRUE(batched.ok());
  for (int b = 0; b < batch; ++b) {
    absl::StatusOr<std::vector<float>> single = (*model)->Predict(
        absl::MakeConstSpan(x).subspan(static_cast<size_t>(b) * size, size), 1);
    ASSERT_TRUE(single.ok());
    for (int c = 0; c < 3; ++c) EXPECT_NEAR((*single)[c], (*batched)[b * 3 + c], 1e-5);
  }
}

// The module optimised for inference (frozen, batch norm folded, oneDNN
// rewrites) gives the plain module's probabilities, at every batch size the
// engine forms: for the trainer's CNN + Transformer and the bundled model.
TEST(ModelTest, OptimizedModuleGivesThePlainModulesOutputs) {
  const std::vector<std::string> dirs = {
      WriteModelDir(testing::DefaultModelConfig(), "optimized"),
      std::string(EMOSERVE_SOURCE_DIR) + "/models/default"};
  for (const std::string& dir : dirs) {
    SCOPED_TRACE(dir);
    ModelOptions optimized_options;
    optimized_options.precision = Precision::kFp32;
    ModelOptions plain_options = optimized_options;
    plain_options.optimize = false;
    absl::StatusOr<std::unique_ptr<Model>> plain = Model::Load(dir, plain_options);
    absl::StatusOr<std::unique_ptr<Model>> optimized = Model::Load(dir, optimized_options);
    ASSERT_TRUE(plain.ok()) << plain.status();
    ASSERT_TRUE(optimized.ok()) << optimized.status();
    EXPECT_FALSE((*plain)->optimized());
    EXPECT_TRUE((*optimized)->optimized());
    for (int batch : {1, 4, 13}) {
      const std::vector<float> x = RandomInputs(batch * (*plain)->input_size(), batch);
      absl::StatusOr<std::vector<float>> expected = (*plain)->Predict(x, batch);
      absl::StatusOr<std::vector<float>> got = (*optimized)->Predict(x, batch);
      ASSERT_TRUE(expected.ok()) << expected.status();
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_LE(testing::MaxAbsDifference(*got, *expected), 1e-4) << "batch " << batch;
    }
  }
}

// Each reduced precision runs where the CPU has what it needs (bf16:
// AVX512_BF16; refused with a clear error elsewhere), says so, changes the
// outputs a little and only a little; model.json's precision is the
// default and the option overrides it.
TEST(ModelTest, ReducedPrecisionsStayCloseToFp32) {
  const std::vector<std::string> dirs = {
      WriteModelDir(testing::DefaultModelConfig(), "precision"),
      std::string(EMOSERVE_SOURCE_DIR) + "/models/default"};
  ModelOptions fp32_options;
  fp32_options.precision = Precision::kFp32;
  for (const std::string& dir : dirs) {
    absl::StatusOr<std::unique_ptr<Model>> fp32 = Model::Load(dir, fp32_options);
    ASSERT_TRUE(fp32.ok()) << fp32.status();
    EXPECT_EQ((*fp32)->precision(), Precision::kFp32);
    for (Precision precision : {Precision::kBf16, Precision::kInt8}) {
      SCOPED_TRACE(absl::StrCat(dir, " ", PrecisionName(precision)));
      ModelOptions options;
      options.precision = precision;
      absl::StatusOr<std::unique_ptr<Model>> reduced = Model::Load(dir, options);
      if (!CpuSupports(precision)) {
        ASSERT_FALSE(reduced.ok());
        EXPECT_THAT(reduced.status().message(), HasSubstr("needs a CPU with AVX512_BF16"));
        continue;
      }
      ASSERT_TRUE(reduced.ok()) << reduced.status();
      EXPECT_EQ((*reduced)->precision(), precision);
      for (int batch : {1, 13}) {
        const std::vector<float> x = RandomInputs(batch * (*fp32)->input_size(), batch);
        absl::StatusOr<std::vector<float>> expected = (*fp32)->Predict(x, batch);
        absl::StatusOr<std::vector<float>> got = (*reduced)->Predict(x, batch);
        ASSERT_TRUE(expected.ok()) << expected.status();
        ASSERT_TRUE(got.ok()) << got.status();
        const double difference = testing::MaxAbsDifference(*got, *expected);
        EXPECT_GT(difference, 0.0) << "batch " << batch << ": the precision changed nothing";
        EXPECT_LE(difference, 0.05) << "batch " << batch;
        for (int row = 0; row < batch; ++row) {
          double sum = 0;
          for (int k = 0; k < (*fp32)->num_classes(); ++k) {
            sum += (*got)[row * (*fp32)->num_classes() + k];
          }
          EXPECT_NEAR(sum, 1.0, 1e-3);
        }
      }
    }
  }
  // model.json names the default; the option wins.
  ModelConfig config = testing::DefaultModelConfig();
  config.precision = Precision::kInt8;
  const std::string dir = WriteModelDir(config, "precision-json");
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->precision(), Precision::kInt8);
  EXPECT_EQ((*model)->precision_fallback(), "");
  model = Model::Load(dir, fp32_options);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->precision(), Precision::kFp32);
}

// model.json's precision is a preference: where the CPU cannot run it the
// model loads in fp32 and says why; asked for explicitly, it is refused.
TEST(ModelTest, ModelJsonPrecisionFallsBackToFp32WhereItCannotRun) {
  ModelConfig config = testing::DefaultModelConfig();
  config.precision = Precision::kBf16;
  const std::string dir = WriteModelDir(config, "precision-fallback");
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  ModelOptions bf16;
  bf16.precision = Precision::kBf16;
  absl::StatusOr<std::unique_ptr<Model>> asked = Model::Load(dir, bf16);
  if (CpuSupports(Precision::kBf16)) {
    EXPECT_EQ((*model)->precision(), Precision::kBf16);
    EXPECT_EQ((*model)->precision_fallback(), "");
    ASSERT_TRUE(asked.ok()) << asked.status();
  } else {
    EXPECT_EQ((*model)->precision(), Precision::kFp32);
    EXPECT_THAT((*model)->precision_fallback(),
                HasSubstr("model.json asks for bf16, which does not run here"));
    EXPECT_EQ(asked.status().code(), absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_THAT(CheckPrecisionRuns(Precision::kBf16, "cuda").message(),
              HasSubstr("runs on CPU only"));
  EXPECT_THAT(CheckPrecisionRuns(Precision::kInt8, "cuda:1").message(),
              HasSubstr("runs on CPU only"));
  EXPECT_TRUE(CheckPrecisionRuns(Precision::kFp32, "cuda").ok());
  EXPECT_TRUE(CheckPrecisionRuns(Precision::kInt8, "cpu").ok());
}

TEST(ModelTest, RejectsJsonThatDoesNotDescribeTheModule) {
  ModelConfig config = SmallConfig();
  const std::string dir = WriteModelDir(config, "mismatch");
  // The module was built for 32 MFCCs; claim 30.
  config.features.n_mfcc = 30;
  ASSERT_TRUE(SaveModelConfig(config, dir + "/model.json").ok());
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("does not accept the input"));

  // Four labels for a three-class module.
  config = SmallConfig();
  config.labels.push_back("d");
  ASSERT_TRUE(SaveModelConfig(config, dir + "/model.json").ok());
  model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("4 labels"));

  // Speaker normalization needs a module with summary() and adapted().
  config = SmallConfig();
  config.speaker_normalization = SpeakerNormalization::kSummaryMean;
  ASSERT_TRUE(SaveModelConfig(config, dir + "/model.json").ok());
  model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("declares speaker_normalization summary_mean but model.pt has no "
                        "summary() method"));
}

TEST(ModelTest, ClearErrorsForMissingFilesAndDevices) {
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load("/nonexistent/model");
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("model.json"));

  const std::string dir = WriteModelDir(SmallConfig(), "devices");
  model = Model::Load(dir, {"tpu"});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("unknown device"));
  if (!torch::cuda::is_available()) {
    model = Model::Load(dir, {"cuda"});
    ASSERT_FALSE(model.ok());
    EXPECT_THAT(model.status().message(), HasSubstr("no CUDA"));
  }

  std::ofstream(dir + "/model.pt") << "not a torchscript archive";
  model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("not a loadable TorchScript"));
}

// With conv_global_pooling the CNN branch, like the Transformer branch (no
// positional encoding, mean over time), ignores where in the window a sound
// is: moving it by a multiple of the CNN's total pooling (2*4*4 = 32 frames)
// leaves the logits unchanged. Flattening the cells (the original) does not.
TEST(ModelArchitectureTest, GlobalPoolingIgnoresWhereInTheWindowASoundIs) {
  for (bool global : {false, true}) {
    ArchitectureOptions options;  // 40 x 301, 8 classes
    options.conv_global_pooling = global;
    torch::manual_seed(3);
    absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
    ASSERT_TRUE(module.ok()) << module.status();
    module->eval();
    EXPECT_EQ(module->attr("fc_weight").toTensor().size(1), global ? 2 * 64 + 40 : 64 * 9 + 40);
    torch::NoGradGuard no_grad;
    const torch::Tensor sound = 3 * torch::randn({1, 1, 40, 40});
    torch::Tensor early = torch::zeros({1, 1, 40, 301});
    torch::Tensor late = torch::zeros({1, 1, 40, 301});
    early.slice(3, 96, 136).copy_(sound);
    late.slice(3, 160, 200).copy_(sound);
    const torch::Tensor difference =
        module->run_method("logits", early).toTensor() - module->run_method("logits", late).toTensor();
    const double largest = difference.abs().max().item<double>();
    if (global) {
      EXPECT_LT(largest, 1e-4);
    } else {
      EXPECT_GT(largest, 1e-2);
    }
  }
}

// With cepstral_coefficients the CNN and Transformer branches of a log-mel
// model see exactly the MFCCs that the feature extractor computes from the
// same audio (librosa's MFCC is the orthonormal DCT of its log-mel), so a
// log-mel model's cepstral branches are the MFCC model's.
TEST(ModelArchitectureTest, CepstralBranchesSeeTheExtractorsMfccs) {
  std::optional<std::string> shared = testing::SharedDir();
  if (!shared) GTEST_SKIP() << "../shared is absent: this test uses a RAVDESS clip";
  absl::StatusOr<std::vector<std::vector<float>>> clips =
      LoadRavdessClips(*shared + "/datasets/ravdess", 1);
  ASSERT_TRUE(clips.ok()) << clips.status();
  const ModelConfig mfcc_config = testing::DefaultModelConfig();  // 40 MFCCs of 64 mels
  ModelConfig mel_config = mfcc_config;
  mel_config.features.kind = FeatureKind::kLogMel;
  std::vector<float> window(mfcc_config.window_samples());
  CopyWindow((*clips)[0], 0, window.size(), window.data());
  absl::StatusOr<FeatureMatrix> features[2];
  for (int i = 0; i < 2; ++i) {
    const ModelConfig& config = i == 0 ? mfcc_config : mel_config;
    absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
        FeatureExtractor::Create(config.features, config.sample_rate);
    ASSERT_TRUE(extractor.ok()) << extractor.status();
    features[i] = (*extractor)->Compute(window);
    ASSERT_TRUE(features[i].ok()) << features[i].status();
  }
  const FeatureMatrix& mfcc = *features[0];
  const FeatureMatrix& mel = *features[1];
  ASSERT_EQ(mfcc.rows, 40);
  ASSERT_EQ(mel.rows, 64);
  ArchitectureOptions options;
  options.num_features = 64;
  options.cepstral_coefficients = 40;
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  ASSERT_TRUE(module.ok()) << module.status();
  EXPECT_EQ(module->attr("feature_mean").toTensor().numel(), 40);
  torch::NoGradGuard no_grad;
  const torch::Tensor input = torch::from_blob(const_cast<float*>(mel.data.data()),
                                               {1, 1, mel.rows, mel.cols});
  const torch::Tensor cepstra =
      module->run_method("branch_input", input).toTensor().contiguous();
  ASSERT_EQ(cepstra.size(2), 40);
  ASSERT_EQ(cepstra.size(3), mfcc.cols);
  const float* ours = cepstra.data_ptr<float>();
  double largest = 0, scale = 0;
  for (size_t i = 0; i < mfcc.data.size(); ++i) {
    largest = std::max(largest, static_cast<double>(std::abs(ours[i] - mfcc.data[i])));
    scale = std::max(scale, static_cast<double>(std::abs(mfcc.data[i])));
  }
  EXPECT_GT(scale, 100.0);  // MFCC 0 of real speech
  EXPECT_LT(largest, 1e-3);
  // The whole model runs on log-mel windows and gives probabilities.
  const torch::Tensor p = module->forward({input}).toTensor();
  EXPECT_NEAR(p.sum().item<double>(), 1.0, 1e-5);
  // More coefficients than input rows is refused.
  options.cepstral_coefficients = 65;
  EXPECT_THAT(BuildArchitecture(options).status().message(),
              HasSubstr("cepstral_coefficients"));
}

// The statistics branch summarises each row over the frames within
// statistics_range_db of the loudest (not the silence or zero padding
// below): with identity batch norm and an identity hidden layer its output
// is [mean, std, delta RMS, delta magnitude] per row, then the share of
// frames kept.
TEST(ModelArchitectureTest, StatisticsBranchSummarisesTheFramesNearTheLoudest) {
  const int rows = 3, frames = 20;
  ArchitectureOptions options;
  options.num_features = 32;  // the statistics block is tested on its own
  options.num_frames = 64;
  options.statistics_hidden = 4 * rows + 1;
  options.statistics_range_db = 30.0;
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  ASSERT_TRUE(module.ok()) << module.status();
  torch::jit::Module statistics = module->attr("statistics").toModule();
  statistics.eval();
  torch::NoGradGuard no_grad;
  const int width = 4 * rows + 1;
  // A block for 3 rows: rebuild its tensors at that width.
  statistics.setattr("bn_weight", torch::ones({width}));
  statistics.setattr("bn_bias", torch::zeros({width}));
  statistics.setattr("bn_running_mean", torch::zeros({width}));
  statistics.setattr("bn_running_var", torch::ones({width}) - 1e-5);
  statistics.setattr("hidden_weight", torch::eye(width));
  statistics.setattr("hidden_bias", torch::zeros({width}));
  // Frames 0-4 and 15-19 are 50 dB below the loudest: left out. Frames 5-14
  // are speech-like, row r at 40 + r + (frame % 3) dB.
  std::vector<float> x(rows * frames);
  for (int r = 0; r < rows; ++r) {
    for (int t = 0; t < frames; ++t) {
      x[r * frames + t] = (t >= 5 && t < 15) ? 40.0f + r + (t % 3) : -10.0f;
    }
  }
  const torch::Tensor input = torch::from_blob(x.data(), {1, 1, rows, frames}).clone();
  const torch::Tensor out = statistics.forward({input}).toTensor().contiguous();
  ASSERT_EQ(out.size(1), width);
  const float* s = out.data_ptr<float>();
  for (int r = 0; r < rows; ++r) {
    const float* row = x.data() + r * frames;
    double mean = 0, var = 0, delta_sq = 0, delta_abs = 0;
    for (int t = 5; t < 15; ++t) mean += row[t] / 10.0;
    for (int t = 5; t < 15; ++t) var += (row[t] - mean) * (row[t] - mean) / 10.0;
    for (int t = 5; t < 15; ++t) {
      // librosa's delta (width 5): edges repeat the first and last frame.
      const auto at = [&](int i) { return row[std::clamp(i, 0, frames - 1)]; };
      const double d = (2.0 * (at(t + 2) - at(t - 2)) + (at(t + 1) - at(t - 1))) / 10.0;
      delta_sq += d * d / 10.0;
      delta_abs += std::abs(d) / 10.0;
    }
    EXPECT_NEAR(s[r], mean, 1e-4) << r;
    EXPECT_NEAR(s[rows + r], std::sqrt(var), 1e-3) << r;
    EXPECT_NEAR(s[2 * rows + r], std::sqrt(delta_sq), 1e-3) << r;
    EXPECT_NEAR(s[3 * rows + r], delta_abs, 1e-4) << r;
  }
  EXPECT_NEAR(s[4 * rows], 0.5, 1e-6);
  // What lies below the range does not count: quieter still (away from the
  // two frames each side that the kept frames' deltas read), same output.
  for (int t : {0, 1, 17, 19}) x[t] = -60.0f;
  const torch::Tensor quieter = torch::from_blob(x.data(), {1, 1, rows, frames}).clone();
  EXPECT_TRUE(torch::allclose(statistics.forward({quieter}).toTensor(), out));
  // Louder frames that come within range do count.
  for (int t = 0; t < 5; ++t) x[t] = 35.0f;
  const torch::Tensor louder = torch::from_blob(x.data(), {1, 1, rows, frames}).clone();
  EXPECT_NEAR(statistics.forward({louder}).toTensor()[0][4 * rows].item<double>(), 0.75, 1e-6);
}

// statistics_cepstral adds, after the rows' statistics, the deviation and
// delta RMS of each frame's first DCT coefficients over the kept frames: two
// rows that move against each other have a steady sum (coefficient 0) and a
// moving difference (coefficient 1), which the rows' own deviations cannot
// tell from two rows moving together.
TEST(ModelArchitectureTest, StatisticsBranchAddsCepstralDeviations) {
  const int rows = 2, frames = 12, cepstra = 2;
  ArchitectureOptions options;
  options.num_features = rows;
  options.parallel_branches = false;
  options.statistics_hidden = 4;
  options.statistics_cepstral = cepstra;
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  ASSERT_TRUE(module.ok()) << module.status();
  torch::jit::Module statistics = module->attr("statistics").toModule();
  statistics.eval();
  torch::NoGradGuard no_grad;
  const int width = 4 * rows + 1 + 2 * cepstra;
  ASSERT_EQ(statistics.attr("bn_weight").toTensor().size(0), width);
  statistics.setattr("bn_running_var", torch::ones({width}) - 1e-5);
  statistics.setattr("hidden_weight", torch::eye(width));
  statistics.setattr("hidden_bias", torch::zeros({width}));
  // Row 0 at 40 + 3 u dB, row 1 at 40 - 3 u, with u 0 or 1 in turns of
  // three frames: all frames kept.
  std::vector<float> x(rows * frames);
  for (int t = 0; t < frames; ++t) {
    const float u = static_cast<float>((t / 3) % 2);
    x[t] = 40.0f + 3.0f * u;
    x[frames + t] = 40.0f - 3.0f * u;
  }
  const torch::Tensor input = torch::from_blob(x.data(), {1, 1, rows, frames}).clone();
  const torch::Tensor out = statistics.forward({input}).toTensor()[0];
  const int first = 4 * rows + 1;
  // Both rows deviate by 1.5 dB; their orthonormal sum (x0 + x1) / sqrt(2)
  // does not, their difference (x0 - x1) / sqrt(2) by 6 / 2 / sqrt(2).
  EXPECT_NEAR(out[rows].item<double>(), 1.5, 1e-3);
  EXPECT_NEAR(out[rows + 1].item<double>(), 1.5, 1e-3);
  EXPECT_NEAR(out[first].item<double>(), 0.0, 1e-2);
  EXPECT_NEAR(out[first + 1].item<double>(), 3.0 / std::sqrt(2.0), 1e-3);
  // The delta RMS of the steady coefficient is zero too, of the moving one not.
  EXPECT_NEAR(out[first + 2].item<double>(), 0.0, 1e-2);
  EXPECT_GT(out[first + 3].item<double>(), 0.1);
  options.statistics_cepstral = rows + 1;
  EXPECT_THAT(BuildArchitecture(options).status().message(),
              HasSubstr("statistics_cepstral"));
}

// Pitch statistics read F0 off the harmonics of real log-mel features: a
// harmonic tone at 120 or 220 Hz through the extractor (128 mel bands of a
// 64 ms window) gives the log F0 of its tone, steady; a glide from 120 to
// 240 Hz lies between them and varies. Mel bands too far apart are refused.
TEST(ModelArchitectureTest, PitchStatisticsFindTheFundamentalOfHarmonicTones) {
  FeatureParams params = testing::DefaultModelConfig().features;
  params.kind = FeatureKind::kLogMel;
  params.n_mels = 128;
  params.n_fft = 1024;
  params.win_length = 1024;
  absl::StatusOr<PitchRows> pitch_rows = PitchRowsOf(MelFrequencies(params, 16000));
  ASSERT_TRUE(pitch_rows.ok()) << pitch_rows.status();
  EXPECT_EQ(pitch_rows->rows, 42);
  EXPECT_NEAR(pitch_rows->row_hz, 23.4, 0.1);
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(params, 16000);
  ASSERT_TRUE(extractor.ok()) << extractor.status();
  ArchitectureOptions options;
  options.num_features = 128;
  options.parallel_branches = false;
  options.statistics_hidden = 16;
  options.pitch_rows = pitch_rows->rows;
  options.pitch_row_hz = pitch_rows->row_hz;
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  ASSERT_TRUE(module.ok()) << module.status();
  torch::jit::Module statistics = module->attr("statistics").toModule();
  torch::NoGradGuard no_grad;
  // [log F0 mean, log F0 deviation] of a tone whose F0 moves from f_start
  // to f_end Hz over 3 s (harmonics up to 4 kHz, falling 6 dB an octave).
  const auto pitch_of = [&](double f_start, double f_end) {
    std::vector<float> samples(48000);
    double phase = 0;
    for (size_t i = 0; i < samples.size(); ++i) {
      const double f0 = f_start + (f_end - f_start) * i / samples.size();
      phase += 2 * M_PI * f0 / 16000;
      double v = 0;
      for (int h = 1; h * f0 < 4000; ++h) v += std::sin(h * phase) / h;
      samples[i] = static_cast<float>(0.1 * v);
    }
    absl::StatusOr<FeatureMatrix> features = (*extractor)->Compute(samples);
    EXPECT_TRUE(features.ok()) << features.status();
    const torch::Tensor x =
        torch::from_blob(features->data.data(), {1, features->rows, features->cols}).clone();
    const torch::Tensor out =
        statistics.run_method("pitch", x, x.amax(1)).toTensor().contiguous();
    const int64_t bins = (out.size(1) - 3) / 2;  // mean and deviation per bin, then F0's
    return std::pair{out[0][2 * bins].item<double>(), out[0][2 * bins + 1].item<double>()};
  };
  for (double f0 : {120.0, 220.0}) {
    const auto [mean, deviation] = pitch_of(f0, f0);
    EXPECT_NEAR(std::exp(mean), f0, 0.05 * f0) << f0;
    EXPECT_LT(deviation, 0.05) << f0;
  }
  const auto [glide_mean, glide_deviation] = pitch_of(120.0, 240.0);
  EXPECT_GT(std::exp(glide_mean), 140.0);
  EXPECT_LT(std::exp(glide_mean), 220.0);
  EXPECT_GT(glide_deviation, 0.1);
  // The whole model takes the features and gives probabilities.
  module->eval();
  EXPECT_TRUE(torch::allclose(
      module->forward({torch::randn({2, 1, 128, 301}) * 20 - 30}).toTensor().sum(1),
      torch::ones({2})));
  // 64 bands of the default features are 46 Hz apart: too coarse for pitch.
  params.n_mels = 64;
  EXPECT_THAT(PitchRowsOf(MelFrequencies(params, 16000)).status().message(),
              HasSubstr("use more mel bands"));
  options.pitch_row_hz = 46.4;
  EXPECT_THAT(BuildArchitecture(options).status().message(),
              HasSubstr("pitch_row_hz"));
  options.pitch_row_hz = pitch_rows->row_hz;
  options.statistics_hidden = 0;
  EXPECT_FALSE(BuildArchitecture(options).ok());
}

// Without the parallel branches the model is the statistics branch and the
// final layer: no convolutions or encoder layers, and it needs the branch.
TEST(ModelArchitectureTest, StatisticsOnlyModelHasNeitherCnnNorTransformer) {
  ArchitectureOptions options;
  options.num_features = 64;
  options.parallel_branches = false;
  options.statistics_hidden = 24;
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  ASSERT_TRUE(module.ok()) << module.status();
  EXPECT_EQ(module->attr("fc_weight").toTensor().size(1), 24);
  EXPECT_FALSE(module->hasattr("conv0"));
  EXPECT_FALSE(module->hasattr("encoder0"));
  module->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor p = module->forward({torch::randn({2, 1, 64, 301}) * 20 - 30}).toTensor();
  EXPECT_TRUE(torch::allclose(p.sum(1), torch::ones({2})));
  // The CNN's pooling does not constrain it: 13 rows are enough.
  options.num_features = 13;
  ASSERT_TRUE(BuildArchitecture(options).ok());
  options.statistics_hidden = 0;
  EXPECT_THAT(BuildArchitecture(options).status().message(),
              HasSubstr("statistics branch is needed"));
}

// A statistics-only model's summary is its weight-free part:
// from_summary(summary(x)) is forward(x) exactly. An ensemble computes the
// summary once for all statistics-only members with the same statistics
// options, and its output is still the mean of every member's forward.
TEST(ModelArchitectureTest, EnsembleSharesTheSummaryOfLikeStatisticsMembers) {
  ArchitectureOptions statistics;
  statistics.num_features = 64;
  statistics.parallel_branches = false;
  statistics.statistics_hidden = 24;
  ArchitectureOptions cepstral = statistics;
  cepstral.statistics_cepstral = 8;
  ArchitectureOptions parallel;
  parallel.num_features = 64;
  std::vector<torch::jit::Module> members;
  for (const ArchitectureOptions* options : {&statistics, &statistics, &cepstral, &parallel}) {
    torch::manual_seed(members.size() + 1);
    absl::StatusOr<torch::jit::Module> member = BuildArchitecture(*options);
    ASSERT_TRUE(member.ok()) << member.status();
    member->eval();
    members.push_back(*std::move(member));
  }
  EXPECT_FALSE(members[3].hasattr("summary_key"));
  EXPECT_NE(members[0].attr("summary_key").toStringRef(),
            members[2].attr("summary_key").toStringRef());
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({3, 1, 64, 301}) * 20 - 40;
  const torch::Tensor summary = members[0].run_method("summary", x).toTensor();
  EXPECT_TRUE(torch::equal(members[0].run_method("from_summary", summary).toTensor(),
                           members[0].forward({x}).toTensor()));
  absl::StatusOr<torch::jit::Module> ensemble = BuildEnsemble(members);
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  torch::Tensor mean = torch::zeros({3, 8});
  for (torch::jit::Module& member : members) mean += member.forward({x}).toTensor() / 4;
  const torch::Tensor p = ensemble->forward({x}).toTensor();
  EXPECT_TRUE(torch::allclose(p, mean, 1e-6, 1e-7));
  EXPECT_GT((members[0].forward({x}).toTensor() - members[1].forward({x}).toTensor())
                .abs().max().item<double>(), 1e-3) << "the members should differ";
  // Two summaries (members 0 and 2), three heads on them, one whole model.
  const std::string graph = ensemble->get_method("forward").graph()->toString();
  const auto calls = [&](const std::string& name) {
    int n = 0;
    for (size_t at = graph.find(name); at != std::string::npos; at = graph.find(name, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(calls("name=\"summary\""), 2) << graph;
  EXPECT_EQ(calls("name=\"from_summary\""), 3) << graph;
  EXPECT_EQ(calls("name=\"forward\""), 1) << graph;
}

// A speaker-normalised model moves a window's summary by how its speaker's
// mean summary differs from the training speakers' (speaker_reference): a
// speaker whose mean is the reference gets forward's answer, another a
// different one; an ensemble of such members averages their adapted
// answers, each member against its own reference.
TEST(ModelArchitectureTest, SpeakerNormalisedModelsMoveTheSummaryByTheSpeakersMean) {
  ArchitectureOptions options;
  options.num_features = 64;
  options.parallel_branches = false;
  options.statistics_hidden = 24;
  std::vector<torch::jit::Module> members;
  for (int i = 0; i < 2; ++i) {
    torch::manual_seed(i + 1);
    absl::StatusOr<torch::jit::Module> member = BuildArchitecture(options);
    ASSERT_TRUE(member.ok()) << member.status();
    member->eval();
    members.push_back(*std::move(member));
  }
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({3, 1, 64, 301}) * 20 - 40;
  const torch::Tensor s = members[0].run_method("summary", x).toTensor();
  const torch::Tensor reference = members[0].attr("speaker_reference").toTensor();
  ASSERT_EQ(reference.numel(), s.size(1));
  EXPECT_EQ(reference.abs().sum().item<double>(), 0.0) << "zeros until trained";
  for (torch::jit::Module& member : members) {
    member.attr("speaker_reference").toTensor().copy_(s.mean(0) + torch::randn({s.size(1)}));
  }
  const torch::Tensor own = members[0].attr("speaker_reference").toTensor().expand_as(s);
  EXPECT_TRUE(torch::allclose(members[0].run_method("adapted", s, own).toTensor(),
                              members[0].forward({x}).toTensor(), 1e-5, 1e-6));
  const torch::Tensor speaker = s.mean(0, true).expand_as(s);
  const torch::Tensor adapted = members[0].run_method("adapted", s, speaker).toTensor();
  EXPECT_TRUE(torch::allclose(
      adapted, members[0].run_method("from_summary", s - speaker + own).toTensor(), 1e-5, 1e-6));
  EXPECT_GT((adapted - members[0].forward({x}).toTensor()).abs().max().item<double>(), 1e-3);
  absl::StatusOr<torch::jit::Module> ensemble = BuildEnsemble(members);
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  EXPECT_TRUE(torch::equal(ensemble->run_method("summary", x).toTensor(), s));
  EXPECT_TRUE(torch::allclose(ensemble->run_method("from_summary", s).toTensor(),
                              ensemble->forward({x}).toTensor(), 1e-6, 1e-7));
  const torch::Tensor mean = (adapted + members[1].run_method("adapted", s, speaker).toTensor()) / 2;
  EXPECT_TRUE(torch::allclose(ensemble->run_method("adapted", s, speaker).toTensor(), mean, 1e-6,
                              1e-7));
  // With a member that has no summary, the ensemble does not adapt.
  ArchitectureOptions parallel;
  parallel.num_features = 64;
  absl::StatusOr<torch::jit::Module> other = BuildArchitecture(parallel);
  ASSERT_TRUE(other.ok());
  members.push_back(*other);
  absl::StatusOr<torch::jit::Module> mixed = BuildEnsemble(members);
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  EXPECT_FALSE(mixed->find_method("adapted").has_value());
}

// Folds of one recipe hold distinct classes of one name; the ensemble gives
// each its own name, without which TorchScript's compiler grows
// exponentially with such members (30 folds once took over 8 GB).
TEST(ModelArchitectureTest, EnsembleOfManyLikeFoldsNamesTheirClassesApart) {
  ArchitectureOptions options;
  options.num_features = 16;
  options.parallel_branches = false;
  options.statistics_hidden = 4;
  constexpr int kMembers = 24;
  std::vector<torch::jit::Module> members;
  for (int i = 0; i < kMembers; ++i) {
    torch::manual_seed(i + 1);
    absl::StatusOr<torch::jit::Module> member = BuildArchitecture(options);
    ASSERT_TRUE(member.ok()) << member.status();
    member->eval();
    members.push_back(*std::move(member));
  }
  ASSERT_EQ(members[0].type()->name()->qualifiedName(),
            members[1].type()->name()->qualifiedName());
  absl::StatusOr<torch::jit::Module> ensemble = BuildEnsemble(members);
  ASSERT_TRUE(ensemble.ok()) << ensemble.status();
  std::set<std::string> names;
  for (const torch::jit::NameModule& child : ensemble->named_children()) {
    names.insert(child.value.type()->name()->qualifiedName());
  }
  EXPECT_EQ(names.size(), kMembers);
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({2, 1, 16, 301}) * 20 - 40;
  torch::Tensor mean = torch::zeros({2, 8});
  for (torch::jit::Module& member : members) mean += member.forward({x}).toTensor() / kMembers;
  EXPECT_TRUE(torch::allclose(ensemble->forward({x}).toTensor(), mean, 1e-6, 1e-7));
}

// Every option survives model.json's architecture object.
TEST(ModelArchitectureTest, OptionsRoundTripThroughJson) {
  ArchitectureOptions options;
  options.num_features = 64;
  options.cepstral_coefficients = 40;
  options.conv_global_pooling = true;
  options.window_mean_normalization = true;
  options.statistics_hidden = 96;
  options.statistics_range_db = 60.0;
  options.statistics_dropout = 0.25;
  options.parallel_branches = false;
  options.pitch_rows = 21;
  options.pitch_row_hz = 23.4;
  options.statistics_cepstral = 20;
  const nlohmann::json json = ArchitectureOptionsToJson(options);
  absl::StatusOr<ArchitectureOptions> parsed = ArchitectureOptionsFromJson(json);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(ArchitectureOptionsToJson(*parsed), json);
  nlohmann::json bad = json;
  bad["statistics_range_db"] = 0.0;
  EXPECT_FALSE(ArchitectureOptionsFromJson(bad).ok());
  bad = json;
  bad["statistics_hiden"] = 3;
  EXPECT_THAT(ArchitectureOptionsFromJson(bad).status().message(), HasSubstr("unknown key"));
  bad = json;
  bad["num_features"] = 1e30;
  EXPECT_THAT(ArchitectureOptionsFromJson(bad).status().message(),
              HasSubstr("'num_features' must be an integer"));
  bad = json;
  bad["conv_channels"] = {16, 32, 1e30};
  EXPECT_THAT(ArchitectureOptionsFromJson(bad).status().message(),
              HasSubstr("'conv_channels' must be an integer"));
}

TEST(ModelConfigTest, ValidatesFields) {
  nlohmann::json json = ModelConfigToJson(SmallConfig());
  EXPECT_TRUE(ModelConfigFromJson(json).ok());
  nlohmann::json bad = json;
  bad["labels"] = {"only"};
  EXPECT_FALSE(ModelConfigFromJson(bad).ok());
  bad = json;
  bad["sample_rate"] = 1000;
  EXPECT_FALSE(ModelConfigFromJson(bad).ok());
  bad = json;
  bad["window_secs"] = 3;
  EXPECT_THAT(ModelConfigFromJson(bad).status().message(), HasSubstr("unknown key"));
  bad = json;
  bad["input_layout"] = "[B,T,F]";
  EXPECT_FALSE(ModelConfigFromJson(bad).ok());
  bad = json;
  bad.erase("features");
  EXPECT_FALSE(ModelConfigFromJson(bad).ok());
  // Numbers no int holds (found by model_json_fuzzer: a cast that was
  // undefined behaviour) and non-integers are refused with their field.
  bad = json;
  bad["sample_rate"] = 1.6e35;
  EXPECT_THAT(ModelConfigFromJson(bad).status().message(),
              HasSubstr("'sample_rate' must be an integer"));
  bad["sample_rate"] = 16000.5;
  EXPECT_FALSE(ModelConfigFromJson(bad).ok());
  bad["sample_rate"] = 4294967296LL + 16000;
  EXPECT_THAT(ModelConfigFromJson(bad).status().message(),
              HasSubstr("'sample_rate' is out of range"));
  bad = json;
  bad["window_seconds"] = "3";
  EXPECT_THAT(ModelConfigFromJson(bad).status().message(),
              HasSubstr("'window_seconds' must be a number"));
  // Features without a rate of their own are checked at the model's (found
  // by model_json_fuzzer: fmax above Nyquist was accepted, and the text
  // written back was refused).
  bad = json;
  bad["features"].erase("sample_rate");
  bad["features"]["fmax"] = bad["sample_rate"].get<int>() / 2 + 24;
  EXPECT_THAT(ModelConfigFromJson(bad).status().message(),
              HasSubstr("\"fmax\" must be <= sample_rate/2"));
  bad["features"]["fmax"] = bad["sample_rate"].get<int>() / 2;
  EXPECT_TRUE(ModelConfigFromJson(bad).ok());
  // A precision and a speaker normalization are ones the runtime knows,
  // survive the round trip, and are left out when they are the default.
  const auto refused_and_kept = [&](const char* key, const char* unknown, const char* message,
                                    const char* known) -> absl::StatusOr<ModelConfig> {
    nlohmann::json changed = json;
    changed[key] = unknown;
    EXPECT_THAT(ModelConfigFromJson(changed).status().message(), HasSubstr(message)) << key;
    changed[key] = known;
    absl::StatusOr<ModelConfig> parsed = ModelConfigFromJson(changed);
    if (parsed.ok()) EXPECT_EQ(ModelConfigToJson(*parsed)[key], known) << key;
    EXPECT_FALSE(ModelConfigToJson(SmallConfig()).contains(key)) << key;
    return parsed;
  };
  absl::StatusOr<ModelConfig> parsed = refused_and_kept(
      "precision", "fp16", "'precision': unknown precision 'fp16'; use fp32, bf16 or int8", "int8");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->precision, Precision::kInt8);
  parsed = refused_and_kept("speaker_normalization", "per_frame",
                            "unknown speaker normalization 'per_frame'; use none or summary_mean",
                            "summary_mean");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->speaker_normalization, SpeakerNormalization::kSummaryMean);
}

// Python's torch loads what we save and computes the same outputs.
void ExpectPythonMatches(const std::string& dir) {
  // Python runs the module in fp32, whatever model.json prefers.
  ModelOptions fp32;
  fp32.precision = Precision::kFp32;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir, fp32);
  ASSERT_TRUE(model.ok()) << model.status();
  const int batch = 3;
  const int f = (*model)->config().num_features();
  const int t = (*model)->config().num_frames();
  std::vector<float> x = RandomInputs(static_cast<size_t>(batch) * f * t, 3);
  absl::StatusOr<std::vector<float>> ours = (*model)->Predict(x, batch);
  ASSERT_TRUE(ours.ok());
  const fs::path in = fs::path(::testing::TempDir()) / "py_in.f32";
  const fs::path out = fs::path(::testing::TempDir()) / "py_out.f32";
  std::ofstream(in, std::ios::binary)
      .write(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
  const std::string command = absl::StrCat(
      "/usr/bin/python3 ", EMOSERVE_SOURCE_DIR, "/tests/python/torchscript_outputs.py ", dir,
      "/model.pt ", in.string(), " ", batch, " ", f, " ", t, " ", out.string());
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  std::vector<float> theirs(ours->size());
  std::ifstream(out, std::ios::binary)
      .read(reinterpret_cast<char*>(theirs.data()), theirs.size() * sizeof(float));
  for (size_t i = 0; i < theirs.size(); ++i) EXPECT_NEAR(theirs[i], (*ours)[i], 1e-5) << i;
}

TEST(ModelTest, PythonLoadsOurModuleWithTheSameOutputs) {
  ExpectPythonMatches(WriteModelDir(SmallConfig(), "python"));
}

TEST(ModelTest, BundledModelLoadsInPythonWithTheSameOutputs) {
  const std::string dir = std::string(EMOSERVE_SOURCE_DIR) + "/models/default";
  ASSERT_TRUE(fs::exists(dir + "/model.pt")) << "the bundled model is missing";
  ExpectPythonMatches(dir);
}

}  // namespace
}  // namespace emoserve
