// Numbers read from model.json: nlohmann's get<int>() of 1e35 is undefined
// behaviour and of 2.5 a silent truncation, so every number a model.json
// holds is read through these.
#ifndef EMOSERVE_CORE_JSON_NUMBERS_H_
#define EMOSERVE_CORE_JSON_NUMBERS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace emoserve {

// The int held by `value`, or INVALID_ARGUMENT "<what> must be an integer,
// got ..." / "<what> is out of range: ...".
absl::Status JsonToInt(const nlohmann::json& value, absl::string_view what, int* out);

// The finite number held by `value`, or INVALID_ARGUMENT "<what> must be a
// number, got ..." / "<what> must be finite".
absl::Status JsonToDouble(const nlohmann::json& value, absl::string_view what,
                          double* out);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_JSON_NUMBERS_H_
