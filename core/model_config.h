// model.json: what a model directory declares about its model.pt.
#ifndef EMOSERVE_CORE_MODEL_CONFIG_H_
#define EMOSERVE_CORE_MODEL_CONFIG_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/feature_params.h"
#include "nlohmann/json.hpp"

namespace emoserve {

inline constexpr char kInputLayoutBatchChannelFeatureTime[] = "[B,1,F,T]";

// The arithmetic a model runs in. Reduced precisions trade exactness for
// speed; `emoserve-train eval --precision` checks a model's answers against
// fp32 before one is used.
enum class Precision {
  kFp32,  // as trained
  kBf16,  // matrix products and convolutions in bfloat16 (autocast), the rest fp32
  kInt8,  // Linear layers' weights int8, activations quantized per call (dynamic)
};

// "fp32", "bf16", "int8".
absl::StatusOr<Precision> ParsePrecision(std::string_view name);
const char* PrecisionName(Precision precision);

// What a model expects of its speaker's statistics.
enum class SpeakerNormalization {
  kNone,         // nothing: each window stands alone
  // Trained on summaries moved by their speaker's mean summary: the module
  // has summary(x), from_summary(s) (= forward) and adapted(s,
  // speaker_mean), and forward(x) answers (less well) for a speaker not
  // heard yet.
  kSummaryMean,
};

// "none", "summary_mean".
absl::StatusOr<SpeakerNormalization> ParseSpeakerNormalization(std::string_view name);
const char* SpeakerNormalizationName(SpeakerNormalization normalization);

struct ModelConfig {
  std::string name;
  std::string version;
  std::vector<std::string> labels;  // In the module's output order.
  int sample_rate = 16000;
  double window_seconds = 3.0;  // The model's fixed input length.
  FeatureParams features;       // features.sample_rate == sample_rate.
  std::string input_layout = kInputLayoutBatchChannelFeatureTime;
  // What the model runs in unless the server is told otherwise.
  Precision precision = Precision::kFp32;
  SpeakerNormalization speaker_normalization = SpeakerNormalization::kNone;
  // Free-form: how the model was made (command, data, split, metrics) and
  // the architecture. Carried through unchanged.
  nlohmann::json architecture = nlohmann::json::object();
  nlohmann::json provenance = nlohmann::json::object();

  int window_samples() const;
  int num_features() const { return features.num_features(); }
  int num_frames() const { return features.NumFrames(window_samples()); }
};

absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& json);
nlohmann::json ModelConfigToJson(const ModelConfig& config);

// Parses and validates the text of a model.json.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view text);
// Reads and validates `path` (a model.json).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path);
absl::Status SaveModelConfig(const ModelConfig& config, const std::string& path);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_MODEL_CONFIG_H_
