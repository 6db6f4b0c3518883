// Freshly initialised models for tests and benchmarks: the project's
// architecture, untrained but seeded (reproducible), written as a model
// directory that Model::Load reads. Torch-free header.
#ifndef EMOSERVE_TESTS_TEST_MODEL_H_
#define EMOSERVE_TESTS_TEST_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model.h"
#include "core/model_config.h"

namespace emoserve::testing {

// Small and fast: 1 s windows at 16 kHz, 32 MFCCs, three labels.
ModelConfig SmallModelConfig();

// The bundled model's shape and compute: 3 s windows at 16 kHz, the
// trainer's default features (40 MFCCs, 301 frames), the eight RAVDESS
// labels.
ModelConfig DefaultModelConfig();

// Writes model.pt (the default architecture sized for `config`, initialised
// from `seed`) and model.json into `dir`, creating it. A config with
// speaker_normalization kSummaryMean gets a statistics-only model with a
// random speaker_reference.
absl::Status WriteTestModel(const ModelConfig& config, const std::string& dir,
                            uint64_t seed = 7);

// Writes a model directory whose model.pt is a TorchScript module with
// `forward_body` as the body of `def forward(self, x):` (indented by the
// caller), for models that misbehave on purpose.
absl::Status WriteScriptedModel(const ModelConfig& config, const std::string& dir,
                                const std::string& forward_body);

// WriteTestModel into `dir`, then Model::Load.
absl::StatusOr<std::shared_ptr<const Model>> MakeTestModel(const ModelConfig& config,
                                                          const std::string& dir,
                                                          uint64_t seed = 7);

}  // namespace emoserve::testing

#endif  // EMOSERVE_TESTS_TEST_MODEL_H_
