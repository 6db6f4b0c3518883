#include "core/feature_params.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/json_numbers.h"

namespace emoserve {
namespace {

using Json = nlohmann::json;

// Bounds that keep a typo (an extra zero) from turning into a huge
// allocation; far beyond anything useful for speech.
constexpr int kMaxFftSize = 1 << 16;
constexpr int kMaxMels = 1024;

absl::Status KeyError(absl::string_view key, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("feature params: \"", key, "\" ", why));
}

absl::Status GetInt(const Json& json, absl::string_view key, int* out) {
  return JsonToInt(json.at(std::string(key)),
                   absl::StrCat("feature params: \"", key, "\""), out);
}

absl::Status GetDouble(const Json& json, absl::string_view key, double* out) {
  return JsonToDouble(json.at(std::string(key)),
                      absl::StrCat("feature params: \"", key, "\""), out);
}

// Looks `key` up among `names` (the JSON spellings of an enum, in enum
// order).
template <typename Enum, size_t N>
absl::Status GetEnum(const Json& json, absl::string_view key,
                     const char* const (&names)[N], Enum* out) {
  const Json& value = json.at(std::string(key));
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    for (size_t i = 0; i < N; ++i) {
      if (s == names[i]) {
        *out = static_cast<Enum>(i);
        return absl::OkStatus();
      }
    }
  }
  return KeyError(key, absl::StrCat("must be one of \"",
                                    absl::StrJoin(names, "\", \""),
                                    "\", got ", value.dump()));
}

// JSON spellings, indexed by the enums' values.
constexpr const char* kKindNames[] = {"mfcc", "log_mel"};
constexpr const char* kWindowNames[] = {"hann", "hamming"};
constexpr const char* kPadModeNames[] = {"constant", "reflect"};
constexpr const char* kDbRefNames[] = {"one", "max"};

constexpr const char* kKeys[] = {
    "kind",   "n_mfcc", "n_fft", "win_length", "hop_length",
    "window", "center", "pad_mode", "n_mels",  "fmin",
    "fmax",   "db_ref", "top_db", "amin", "sample_rate"};

bool IsKnownKey(const std::string& key) {
  for (const char* k : kKeys) {
    if (key == k) return true;
  }
  return false;
}

absl::Status Validate(const FeatureParams& p) {
  if (p.n_fft <= 0 || p.n_fft > kMaxFftSize) {
    return KeyError("n_fft", absl::StrCat("must be in [1, ", kMaxFftSize,
                                          "], got ", p.n_fft));
  }
  if (p.win_length <= 0 || p.win_length > p.n_fft) {
    return KeyError("win_length", absl::StrCat("must be in [1, n_fft=",
                                               p.n_fft, "], got ",
                                               p.win_length));
  }
  if (p.hop_length <= 0) {
    return KeyError("hop_length",
                    absl::StrCat("must be positive, got ", p.hop_length));
  }
  if (p.n_mels <= 0 || p.n_mels > kMaxMels) {
    return KeyError("n_mels", absl::StrCat("must be in [1, ", kMaxMels,
                                           "], got ", p.n_mels));
  }
  if (p.kind == FeatureKind::kMfcc && (p.n_mfcc <= 0 || p.n_mfcc > p.n_mels)) {
    return KeyError("n_mfcc", absl::StrCat("must be in [1, n_mels=", p.n_mels,
                                           "], got ", p.n_mfcc));
  }
  if (p.fmin < 0) {
    return KeyError("fmin", absl::StrCat("must be >= 0, got ", p.fmin));
  }
  if (p.fmax.has_value() && *p.fmax <= p.fmin) {
    return KeyError("fmax", absl::StrCat("must be greater than fmin=", p.fmin,
                                         ", got ", *p.fmax));
  }
  if (p.top_db.has_value() && *p.top_db < 0) {
    return KeyError("top_db", absl::StrCat("must be >= 0, got ", *p.top_db));
  }
  // Normal floats only: the fast dB conversion reads the float's exponent.
  if (!(p.amin >= 1e-30 && p.amin <= 1)) {
    return KeyError("amin", absl::StrCat("must be in [1e-30, 1], got ", p.amin));
  }
  if (p.sample_rate.has_value()) {
    if (*p.sample_rate <= 0) {
      return KeyError("sample_rate",
                      absl::StrCat("must be positive, got ", *p.sample_rate));
    }
    // Without a rate fmax and fmin are checked against it in
    // FeatureExtractor::Create.
    const double nyquist = *p.sample_rate / 2.0;
    if (p.fmax.value_or(nyquist) > nyquist) {
      return KeyError("fmax", absl::StrCat("must be <= sample_rate/2=",
                                           nyquist, ", got ", *p.fmax));
    }
    if (p.fmin >= nyquist) {
      return KeyError("fmin", absl::StrCat("must be < sample_rate/2=",
                                           nyquist, ", got ", p.fmin));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int FeatureParams::NumFrames(size_t num_samples) const {
  const size_t padded =
      num_samples + (center ? 2 * static_cast<size_t>(n_fft / 2) : 0);
  if (n_fft <= 0 || hop_length <= 0 || padded < static_cast<size_t>(n_fft)) {
    return 0;
  }
  return static_cast<int>(1 + (padded - n_fft) / hop_length);
}

absl::StatusOr<FeatureParams> FeatureParamsFromJson(const Json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature params must be a JSON object, got ", json.type_name()));
  }
  for (const auto& [key, value] : json.items()) {
    if (!IsKnownKey(key)) {
      return absl::InvalidArgumentError(
          absl::StrCat("feature params: unknown key \"", key, "\" (known: ",
                       absl::StrJoin(kKeys, ", "), ")"));
    }
  }
  // Absent keys keep FeatureParams' defaults.
  FeatureParams p;
  const auto has = [&json](const char* key) { return json.contains(key); };
  const auto is_null = [&json](const char* key) {
    return json.at(key).is_null();
  };
  absl::Status s;
  if (has("kind")) s.Update(GetEnum(json, "kind", kKindNames, &p.kind));
  if (has("n_mfcc")) s.Update(GetInt(json, "n_mfcc", &p.n_mfcc));
  if (has("n_fft")) s.Update(GetInt(json, "n_fft", &p.n_fft));
  if (has("win_length")) s.Update(GetInt(json, "win_length", &p.win_length));
  if (has("hop_length")) s.Update(GetInt(json, "hop_length", &p.hop_length));
  if (has("window")) s.Update(GetEnum(json, "window", kWindowNames, &p.window));
  if (has("center")) {
    if (json.at("center").is_boolean()) {
      p.center = json.at("center").get<bool>();
    } else {
      s.Update(KeyError("center", absl::StrCat("must be true or false, got ",
                                               json.at("center").dump())));
    }
  }
  if (has("pad_mode")) {
    s.Update(GetEnum(json, "pad_mode", kPadModeNames, &p.pad_mode));
  }
  if (has("n_mels")) s.Update(GetInt(json, "n_mels", &p.n_mels));
  if (has("fmin")) s.Update(GetDouble(json, "fmin", &p.fmin));
  if (has("fmax")) {
    if (is_null("fmax")) {
      p.fmax.reset();
    } else {
      double v = 0;
      s.Update(GetDouble(json, "fmax", &v));
      p.fmax = v;
    }
  }
  if (has("db_ref")) s.Update(GetEnum(json, "db_ref", kDbRefNames, &p.db_ref));
  if (has("top_db")) {
    if (is_null("top_db")) {
      p.top_db.reset();
    } else {
      double v = 0;
      s.Update(GetDouble(json, "top_db", &v));
      p.top_db = v;
    }
  }
  if (has("amin")) s.Update(GetDouble(json, "amin", &p.amin));
  if (has("sample_rate") && !is_null("sample_rate")) {
    int v = 0;
    s.Update(GetInt(json, "sample_rate", &v));
    p.sample_rate = v;
  }
  if (!s.ok()) return s;
  if (absl::Status v = Validate(p); !v.ok()) return v;
  return p;
}

absl::StatusOr<FeatureParams> ParseFeatureParams(std::string_view json_text) {
  const Json json = Json::parse(json_text.begin(), json_text.end(), nullptr,
                                /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    return absl::InvalidArgumentError("feature params: not valid JSON");
  }
  if (!json.is_object() || !json.contains("params")) {
    return FeatureParamsFromJson(json);
  }
  // A golden case file: its params hold the features; its top-level
  // sample_rate is the rate they are defined at unless params names one.
  const Json& params = json.at("params");
  if (params.is_object() && !params.contains("sample_rate") &&
      json.contains("sample_rate") && json.at("sample_rate").is_number_integer()) {
    Json with_rate = params;
    with_rate["sample_rate"] = json.at("sample_rate");
    return FeatureParamsFromJson(with_rate);
  }
  return FeatureParamsFromJson(params);
}

Json FeatureParamsToJson(const FeatureParams& p) {
  Json json = {
      {"kind", kKindNames[static_cast<int>(p.kind)]},
      {"n_mfcc", p.n_mfcc},
      {"n_fft", p.n_fft},
      {"win_length", p.win_length},
      {"hop_length", p.hop_length},
      {"window", kWindowNames[static_cast<int>(p.window)]},
      {"center", p.center},
      {"pad_mode", kPadModeNames[static_cast<int>(p.pad_mode)]},
      {"n_mels", p.n_mels},
      {"fmin", p.fmin},
      {"fmax", p.fmax.has_value() ? Json(*p.fmax) : Json(nullptr)},
      {"db_ref", kDbRefNames[static_cast<int>(p.db_ref)]},
      {"top_db", p.top_db.has_value() ? Json(*p.top_db) : Json(nullptr)},
      {"amin", p.amin},
  };
  if (p.sample_rate.has_value()) json["sample_rate"] = *p.sample_rate;
  return json;
}

}  // namespace emoserve
