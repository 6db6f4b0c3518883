// The feature parameter set: the `features` object of a model's model.json
// and the `params` object of the golden files (same schema, librosa meaning).
#ifndef EMOSERVE_CORE_FEATURE_PARAMS_H_
#define EMOSERVE_CORE_FEATURE_PARAMS_H_

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace emoserve {

enum class FeatureKind { kMfcc, kLogMel };
enum class WindowType { kHann, kHamming };
enum class PadMode { kConstant, kReflect };
enum class DbRef { kOne, kMax };

struct FeatureParams {
  FeatureKind kind = FeatureKind::kMfcc;
  int n_mfcc = 40;  // Used when kind == kMfcc.
  int n_fft = 512;
  int win_length = 400;
  int hop_length = 160;
  WindowType window = WindowType::kHamming;
  bool center = true;
  PadMode pad_mode = PadMode::kConstant;
  int n_mels = 64;
  double fmin = 0.0;
  std::optional<double> fmax;  // Unset: sample_rate / 2 (librosa's None).
  DbRef db_ref = DbRef::kOne;
  std::optional<double> top_db = 80.0;  // Unset: no floor (librosa's None).
  // power_to_db's amin: smaller powers count as amin (librosa's default,
  // -100 dB). With db_ref max, a value far below any real signal (e.g.
  // 1e-20) keeps a quiet recording's floor where a loud one's is, so the
  // features do not depend on the level at all.
  double amin = 1e-10;
  // The rate the features are defined at. Optional in the JSON: when unset,
  // features are computed at the audio's own rate.
  std::optional<int> sample_rate;

  // Rows of the output: n_mfcc for MFCC, n_mels for log-mel.
  int num_features() const {
    return kind == FeatureKind::kMfcc ? n_mfcc : n_mels;
  }
  // Frames (columns) for a signal of `num_samples` samples, as librosa
  // counts them; 0 when the signal is too short (only possible without
  // centring).
  int NumFrames(size_t num_samples) const;
};

// Parses and validates a params object. Unknown keys are rejected so that a
// typo cannot silently fall back to a default.
absl::StatusOr<FeatureParams> FeatureParamsFromJson(const nlohmann::json& json);

// Parses JSON text holding either a bare params object or a golden case file
// (an object with a "params" member).
absl::StatusOr<FeatureParams> ParseFeatureParams(std::string_view json_text);

nlohmann::json FeatureParamsToJson(const FeatureParams& params);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_FEATURE_PARAMS_H_
