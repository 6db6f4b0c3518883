// Structured logs: one logfmt line per event on stderr, e.g.
//   ts=2024-05-01T12:00:00.123Z level=info event=startup model=models/default
#ifndef EMOSERVE_SERVER_LOG_H_
#define EMOSERVE_SERVER_LOG_H_

#include <initializer_list>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace emoserve {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

// "debug", "info", "warning" or "error".
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);
absl::string_view LogLevelName(LogLevel level);

// Events below `level` are dropped. Thread-safe.
void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

inline std::string ToLogValue(bool value) { return value ? "true" : "false"; }
template <typename T>
std::string ToLogValue(const T& value) {
  return absl::StrCat(value);
}

// One key=value pair; the value is formatted on construction (numbers and
// strings as absl::StrCat does, bools as true/false).
struct LogField {
  template <typename T>
  LogField(absl::string_view key, const T& value)
      : key(key), value(ToLogValue(value)) {}
  absl::string_view key;
  std::string value;
};

// Formats one line (without the newline); values with spaces, quotes or '='
// are quoted.
std::string FormatLogLine(LogLevel level, absl::string_view event,
                          std::initializer_list<LogField> fields);

// Writes FormatLogLine(...) to stderr when `level` is enabled.
void Log(LogLevel level, absl::string_view event,
         std::initializer_list<LogField> fields = {});

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_LOG_H_
