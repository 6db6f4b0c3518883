#include "tests/test_model.h"

#include <filesystem>

#include <torch/script.h>

#include "absl/strings/str_cat.h"
#include "train/architectures.h"
#include "train/ravdess.h"

namespace emoserve::testing {

ModelConfig SmallModelConfig() {
  ModelConfig config;
  config.name = "test-model";
  config.version = "0";
  config.labels = {"a", "b", "c"};
  config.sample_rate = 16000;
  config.window_seconds = 1.0;
  config.features.kind = FeatureKind::kMfcc;
  config.features.n_mfcc = 32;  // the CNN branch pools by 32 in all
  config.features.n_mels = 40;
  config.features.fmax = 8000.0;
  return config;
}

ModelConfig DefaultModelConfig() {
  ModelConfig config;
  config.name = "test-default-architecture";
  config.version = "0";
  config.labels = RavdessLabels();
  config.sample_rate = 16000;
  config.window_seconds = 3.0;
  config.features = FeatureParams();  // the trainer's defaults
  config.features.sample_rate = config.sample_rate;
  return config;
}

namespace {

// Saves `module` as dir/model.pt and `config` as dir/model.json.
absl::Status SaveModelDirectory(torch::jit::Module& module, const ModelConfig& config,
                                const std::string& dir) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", error.message()));
  }
  try {
    module.eval();
    module.save((std::filesystem::path(dir) / "model.pt").string());
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("cannot save model.pt in ", dir, ": ", e.what()));
  }
  return SaveModelConfig(config, (std::filesystem::path(dir) / "model.json").string());
}

}  // namespace

absl::Status WriteTestModel(const ModelConfig& config, const std::string& dir,
                            uint64_t seed) {
  ArchitectureOptions options;
  options.num_features = config.num_features();
  options.num_frames = config.num_frames();
  options.num_classes = static_cast<int>(config.labels.size());
  const bool speaker_normalised =
      config.speaker_normalization == SpeakerNormalization::kSummaryMean;
  if (speaker_normalised) {
    options.parallel_branches = false;  // statistics only: it has a summary
    options.statistics_hidden = 32;
  }
  torch::manual_seed(seed);
  absl::StatusOr<torch::jit::Module> module = BuildArchitecture(options);
  if (!module.ok()) return module.status();
  if (speaker_normalised) {
    // As if trained: the training speakers' mean summary, not zeros.
    torch::Tensor reference = module->attr("speaker_reference").toTensor();
    reference.copy_(torch::randn(reference.sizes()));
  }
  return SaveModelDirectory(*module, config, dir);
}

absl::Status WriteScriptedModel(const ModelConfig& config, const std::string& dir,
                                const std::string& forward_body) {
  torch::jit::Module module("Scripted");
  try {
    module.define("def forward(self, x):\n" + forward_body);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("bad TorchScript: ", e.what()));
  }
  return SaveModelDirectory(module, config, dir);
}

absl::StatusOr<std::shared_ptr<const Model>> MakeTestModel(const ModelConfig& config,
                                                          const std::string& dir,
                                                          uint64_t seed) {
  if (absl::Status written = WriteTestModel(config, dir, seed); !written.ok()) return written;
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir);
  if (!model.ok()) return model.status();
  return std::shared_ptr<const Model>(*std::move(model));
}

}  // namespace emoserve::testing
