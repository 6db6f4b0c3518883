#include "core/json_numbers.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"

namespace emoserve {

absl::Status JsonToInt(const nlohmann::json& value, absl::string_view what, int* out) {
  if (!value.is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be an integer, got ", value.dump()));
  }
  const bool in_range =
      value.is_number_unsigned()
          ? value.get<uint64_t>() <=
                static_cast<uint64_t>(std::numeric_limits<int>::max())
          : value.get<int64_t>() >= std::numeric_limits<int>::min() &&
                value.get<int64_t>() <= std::numeric_limits<int>::max();
  if (!in_range) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is out of range: ", value.dump()));
  }
  *out = value.get<int>();
  return absl::OkStatus();
}

absl::Status JsonToDouble(const nlohmann::json& value, absl::string_view what,
                          double* out) {
  if (!value.is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be a number, got ", value.dump()));
  }
  *out = value.get<double>();
  if (!std::isfinite(*out)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be finite"));
  }
  return absl::OkStatus();
}

}  // namespace emoserve
