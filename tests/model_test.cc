// The model contract: model.json checked against model.pt, inference on
// batches, and the same outputs from Python's torch.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include "core/model.h"
#include "core/model_architecture.h"
#include "core/model_config.h"
#include "absl/strings/str_cat.h"
#include "tests/test_model.h"

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
    absl::StatusOr<torch::jit::Module> module = BuildParallelCnnTransformer(options);
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
}

// Python's torch loads what we save and computes the same outputs.
void ExpectPythonMatches(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
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
