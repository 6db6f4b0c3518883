#include "core/model_config.h"

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"
#include "core/json_numbers.h"

namespace emoserve {

absl::StatusOr<Precision> ParsePrecision(std::string_view name) {
  for (Precision precision : {Precision::kFp32, Precision::kBf16, Precision::kInt8}) {
    if (name == PrecisionName(precision)) return precision;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision '", std::string(name), "'; use fp32, bf16 or int8"));
}

absl::StatusOr<SpeakerNormalization> ParseSpeakerNormalization(std::string_view name) {
  for (SpeakerNormalization normalization :
       {SpeakerNormalization::kNone, SpeakerNormalization::kSummaryMean}) {
    if (name == SpeakerNormalizationName(normalization)) return normalization;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown speaker normalization '",
                                                 std::string(name), "'; use none or summary_mean"));
}

const char* SpeakerNormalizationName(SpeakerNormalization normalization) {
  return normalization == SpeakerNormalization::kSummaryMean ? "summary_mean" : "none";
}

const char* PrecisionName(Precision precision) {
  switch (precision) {
    case Precision::kFp32:
      return "fp32";
    case Precision::kBf16:
      return "bf16";
    case Precision::kInt8:
      return "int8";
  }
  return "fp32";
}

int ModelConfig::window_samples() const {
  return static_cast<int>(std::lround(window_seconds * sample_rate));
}

absl::StatusOr<ModelConfig> ModelConfigFromJson(const nlohmann::json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError("model.json must hold a JSON object");
  }
  static const std::set<std::string> kKnownKeys = {
      "name",     "version",      "labels",       "sample_rate", "window_seconds",
      "features", "input_layout", "precision",    "architecture", "provenance",
      "speaker_normalization"};
  for (const auto& item : json.items()) {
    if (!kKnownKeys.count(item.key())) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.json: unknown key '", item.key(), "'"));
    }
  }
  ModelConfig config;
  try {
    config.name = json.at("name").get<std::string>();
    config.version = json.at("version").get<std::string>();
    config.labels = json.at("labels").get<std::vector<std::string>>();
    if (absl::Status s = JsonToInt(json.at("sample_rate"), "model.json: 'sample_rate'",
                                   &config.sample_rate);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = JsonToDouble(json.at("window_seconds"),
                                      "model.json: 'window_seconds'",
                                      &config.window_seconds);
        !s.ok()) {
      return s;
    }
    if (json.contains("input_layout")) {
      config.input_layout = json.at("input_layout").get<std::string>();
    }
    if (json.contains("precision")) {
      absl::StatusOr<Precision> precision =
          ParsePrecision(json.at("precision").get<std::string>());
      if (!precision.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("model.json: 'precision': ", precision.status().message()));
      }
      config.precision = *precision;
    }
    if (json.contains("speaker_normalization")) {
      absl::StatusOr<SpeakerNormalization> normalization =
          ParseSpeakerNormalization(json.at("speaker_normalization").get<std::string>());
      if (!normalization.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model.json: 'speaker_normalization': ", normalization.status().message()));
      }
      config.speaker_normalization = *normalization;
    }
    if (json.contains("architecture")) config.architecture = json["architecture"];
    if (json.contains("provenance")) config.provenance = json["provenance"];
    if (!json.contains("features")) {
      return absl::InvalidArgumentError("model.json: missing 'features'");
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.json: missing or mistyped field: ", e.what()));
  }
  if (config.name.empty()) {
    return absl::InvalidArgumentError("model.json: 'name' is empty");
  }
  if (config.labels.size() < 2) {
    return absl::InvalidArgumentError(
        "model.json: 'labels' must list at least two classes");
  }
  if (std::set<std::string>(config.labels.begin(), config.labels.end()).size() !=
      config.labels.size()) {
    return absl::InvalidArgumentError("model.json: 'labels' has duplicates");
  }
  if (absl::Status s = ValidateSampleRate(config.sample_rate); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.json: 'sample_rate': ", s.message()));
  }
  // The features are checked at the model's rate (fmax and fmin against
  // its Nyquist frequency) when they do not name a rate of their own.
  nlohmann::json features_json = json["features"];
  if (features_json.is_object() && !features_json.contains("sample_rate")) {
    features_json["sample_rate"] = config.sample_rate;
  }
  absl::StatusOr<FeatureParams> features = FeatureParamsFromJson(features_json);
  if (!features.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.json: 'features': ", features.status().message()));
  }
  config.features = *features;
  if (config.features.sample_rate.has_value() &&
      *config.features.sample_rate != config.sample_rate) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.json: features.sample_rate (", *config.features.sample_rate,
        ") differs from sample_rate (", config.sample_rate, ")"));
  }
  config.features.sample_rate = config.sample_rate;
  if (!(config.window_seconds > 0.0 && config.window_seconds <= 60.0)) {
    return absl::InvalidArgumentError(
        "model.json: 'window_seconds' must be in (0, 60]");
  }
  if (config.input_layout != kInputLayoutBatchChannelFeatureTime) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.json: input_layout '", config.input_layout,
        "' is not supported; use '", kInputLayoutBatchChannelFeatureTime, "'"));
  }
  if (config.num_frames() <= 0) {
    return absl::InvalidArgumentError(
        "model.json: the window is shorter than one feature frame");
  }
  return config;
}

nlohmann::json ModelConfigToJson(const ModelConfig& config) {
  nlohmann::json json = {{"name", config.name},
                         {"version", config.version},
                         {"labels", config.labels},
                         {"sample_rate", config.sample_rate},
                         {"window_seconds", config.window_seconds},
                         {"features", FeatureParamsToJson(config.features)},
                         {"input_layout", config.input_layout}};
  if (config.precision != Precision::kFp32) json["precision"] = PrecisionName(config.precision);
  if (config.speaker_normalization != SpeakerNormalization::kNone) {
    json["speaker_normalization"] = SpeakerNormalizationName(config.speaker_normalization);
  }
  if (!config.architecture.empty()) json["architecture"] = config.architecture;
  if (!config.provenance.empty()) json["provenance"] = config.provenance;
  return json;
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view text) {
  nlohmann::json json = nlohmann::json::parse(text.begin(), text.end(), nullptr,
                                              /*allow_exceptions=*/false);
  if (json.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  return ModelConfigFromJson(json);
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

absl::Status SaveModelConfig(const ModelConfig& config, const std::string& path) {
  std::ofstream out(path);
  out << ModelConfigToJson(config).dump(1) << "\n";
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace emoserve
