// A stand-in for core/model.cc in the fuzz build: the same interface, no
// LibTorch. It reads model.json like the real model and "predicts" a
// softmax of simple statistics of each input, so that every engine path
// (batching, aggregation, stream utterances) runs on real features.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/model.h"

namespace emoserve {

struct Model::Module {};

void SetUpModelRuntime(int /*intra_op_threads*/) {}

Model::Model(ModelConfig config, std::string device, std::unique_ptr<Module> module)
    : config_(std::move(config)), device_(std::move(device)), module_(std::move(module)) {}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelOptions& options) {
  absl::StatusOr<ModelConfig> config =
      LoadModelConfig((std::filesystem::path(dir) / "model.json").string());
  if (!config.ok()) return config.status();
  return std::unique_ptr<Model>(
      new Model(*std::move(config), options.device, std::make_unique<Module>()));
}

absl::StatusOr<std::vector<float>> Model::Predict(absl::Span<const float> features,
                                                  int batch_size) const {
  const size_t input = static_cast<size_t>(input_size());
  if (batch_size <= 0 || features.size() != static_cast<size_t>(batch_size) * input) {
    return absl::InvalidArgumentError(absl::StrCat("Predict: expected ", batch_size, " x ",
                                                   input, " floats, got ", features.size()));
  }
  const int classes = num_classes();
  std::vector<float> out(static_cast<size_t>(batch_size) * classes);
  for (int b = 0; b < batch_size; ++b) {
    const absl::Span<const float> x = features.subspan(b * input, input);
    std::vector<double> logits(classes, 0.0);
    for (size_t i = 0; i < x.size(); ++i) logits[i % classes] += x[i] / x.size();
    const double top = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (double& l : logits) sum += (l = std::exp(l - top));
    for (int c = 0; c < classes; ++c) out[b * classes + c] = static_cast<float>(logits[c] / sum);
  }
  return out;
}

// The stand-in has no summary (summary_size() is 0): the service refuses
// speaker statistics for it before these are reached.
absl::StatusOr<std::vector<float>> Model::Summarize(absl::Span<const float>, int) const {
  return absl::FailedPreconditionError("the fuzzing stand-in model has no summary");
}

absl::StatusOr<std::vector<float>> Model::PredictFromSummaries(absl::Span<const float>, int,
                                                              absl::Span<const float>) const {
  return absl::FailedPreconditionError("the fuzzing stand-in model has no summary");
}

}  // namespace emoserve
