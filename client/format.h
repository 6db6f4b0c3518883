// Output of the CLI's commands: readable text, JSON and CSV. Pure functions
// of the results, so that tests can check them without a server.
#ifndef EMOSERVE_CLIENT_FORMAT_H_
#define EMOSERVE_CLIENT_FORMAT_H_

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/time/time.h"
#include "emoserve/v1/emoserve.pb.h"

namespace emoserve::client {

// One file's classification, successful or not.
struct ClassifyOutcome {
  std::string file;
  std::string error_code;     // "INVALID_ARGUMENT", "NOT_FOUND", ...; empty: OK
  std::string error_message;  // what the server (or the file system) said
  std::string error_line;     // the one line for stderr, without "emoserve: "
  v1::ClassifyResponse response;
  absl::Duration latency;

  bool ok() const { return error_code.empty(); }
};

// A readable table: one row per classified file (failures are reported on
// stderr instead), and each file's windows beneath it when `timeline`.
std::string FormatClassifyTable(const std::vector<ClassifyOutcome>& outcomes,
                                bool timeline);

// A JSON array with one object per file, in input order; failed files carry
// "error": {"code", "message"}.
nlohmann::ordered_json ClassifyOutcomesJson(
    const std::vector<ClassifyOutcome>& outcomes, bool timeline);

// CSV with a header and one probability column per label (sorted by name):
// one row per file, or with `timeline` one row per window.
std::string FormatClassifyCsv(const std::vector<ClassifyOutcome>& outcomes,
                              bool timeline);

// One line (with its newline) for a stream response: text, or a JSON
// object per line.
std::string FormatStreamResponse(const v1::StreamClassifyResponse& response,
                                 bool json);

// The model's description.
std::string FormatModelInfo(const v1::ModelInfo& info, bool json);

// The server's models: a line per version ("fast* 2  ready  (default)"),
// or JSON {"models": [{"name", "is_default", "default_version",
// "versions": [{"version", "state", "error"}]}]}.
std::string FormatModels(const v1::ListModelsResponse& models, bool json);

// "angry 82.1%, sad 10.2%": `count` scores from index `first`.
std::string FormatScores(
    const google::protobuf::RepeatedPtrField<v1::EmotionScore>& scores,
    int first, int count);

// {"angry": 0.8213, ...} in the scores' order (highest first).
nlohmann::ordered_json ScoresJson(
    const google::protobuf::RepeatedPtrField<v1::EmotionScore>& scores);

// A value rounded to `digits` decimals, for JSON that people read too.
double RoundTo(double value, int digits);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_FORMAT_H_
