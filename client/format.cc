#include "client/format.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace emoserve::client {
namespace {

using ::google::protobuf::RepeatedPtrField;
using Json = nlohmann::ordered_json;

// Left-aligned text columns, right-aligned numbers; each row may carry
// extra lines printed beneath it (the timeline), which take no part in the
// column widths.
class TextTable {
 public:
  struct Column {
    std::string title;
    bool right_aligned;
  };
  explicit TextTable(std::vector<Column> columns)
      : columns_(std::move(columns)) {}

  void AddRow(std::vector<std::string> cells,
              std::vector<std::string> lines_below = {}) {
    rows_.push_back({std::move(cells), std::move(lines_below)});
  }

  std::string Render() const {
    std::vector<size_t> widths;
    for (const Column& column : columns_) widths.push_back(column.title.size());
    for (const Row& row : rows_) {
      for (size_t i = 0; i < row.cells.size() && i < widths.size(); ++i) {
        widths[i] = std::max(widths[i], row.cells[i].size());
      }
    }
    std::vector<std::string> titles;
    for (const Column& column : columns_) titles.push_back(column.title);
    std::string out = RenderLine(titles, widths);
    for (const Row& row : rows_) {
      absl::StrAppend(&out, RenderLine(row.cells, widths));
      for (const std::string& line : row.lines_below) {
        absl::StrAppend(&out, "  ", line, "\n");
      }
    }
    return out;
  }

 private:
  struct Row {
    std::vector<std::string> cells;
    std::vector<std::string> lines_below;
  };

  std::string RenderLine(const std::vector<std::string>& cells,
                         const std::vector<size_t>& widths) const {
    std::string line;
    for (size_t i = 0; i < cells.size() && i < widths.size(); ++i) {
      const std::string padding(widths[i] - cells[i].size(), ' ');
      const bool last = i + 1 == cells.size();
      if (i > 0) line += "  ";
      if (columns_[i].right_aligned) {
        absl::StrAppend(&line, padding, cells[i]);
      } else {
        absl::StrAppend(&line, cells[i], last ? "" : padding);
      }
    }
    return line + "\n";
  }

  std::vector<Column> columns_;
  std::vector<Row> rows_;
};

std::string Percent(double probability) {
  return absl::StrFormat("%.1f%%", 100.0 * probability);
}

std::string SecondsRange(double start, double end) {
  return absl::StrFormat("%7.2f-%7.2f s", start, end);
}

// "angry 62.0%  (sad 20.1%, calm 5.0%)", or "silence". A quiet window
// has scores only when its whole clip held no speech: "(quiet) angry ...".
std::string WindowSummary(const v1::WindowResult& window) {
  if (window.scores().empty()) return "silence";
  std::string summary =
      absl::StrCat(window.speech() ? "" : "(quiet) ", window.scores(0).label(),
                   " ", Percent(window.scores(0).probability()));
  if (window.scores_size() > 1) {
    absl::StrAppend(&summary, "  (", FormatScores(window.scores(), 1, 2), ")");
  }
  return summary;
}

Json WindowJson(const v1::WindowResult& window) {
  Json json;
  json["start_seconds"] = RoundTo(window.start_seconds(), 3);
  json["end_seconds"] = RoundTo(window.end_seconds(), 3);
  json["speech"] = window.speech();
  if (window.speaker_adapted()) json["speaker_adapted"] = true;
  json["scores"] = ScoresJson(window.scores());
  return json;
}

// RFC 4180: quote fields holding a comma, a quote or a line break.
std::string CsvField(absl::string_view field) {
  if (field.find_first_of(",\"\r\n") == absl::string_view::npos) {
    return std::string(field);
  }
  std::string quoted = "\"";
  for (char c : field) {
    if (c == '"') quoted += '"';
    quoted += c;
  }
  return quoted + "\"";
}

std::string CsvLine(const std::vector<std::string>& fields) {
  std::vector<std::string> escaped;
  for (const std::string& field : fields) escaped.push_back(CsvField(field));
  return absl::StrCat(absl::StrJoin(escaped, ","), "\n");
}

// The labels seen in any result, sorted by name: the CSV's columns.
std::vector<std::string> AllLabels(
    const std::vector<ClassifyOutcome>& outcomes) {
  std::set<std::string> labels;
  for (const ClassifyOutcome& outcome : outcomes) {
    for (const v1::EmotionScore& score : outcome.response.scores()) {
      labels.insert(score.label());
    }
    for (const v1::WindowResult& window : outcome.response.timeline()) {
      for (const v1::EmotionScore& score : window.scores()) {
        labels.insert(score.label());
      }
    }
  }
  return {labels.begin(), labels.end()};
}

// The probability of each of `labels` in `scores` ("" where absent).
std::vector<std::string> LabelProbabilities(
    const RepeatedPtrField<v1::EmotionScore>& scores,
    const std::vector<std::string>& labels) {
  std::vector<std::string> fields;
  for (const std::string& label : labels) {
    auto it = std::find_if(
        scores.begin(), scores.end(),
        [&](const v1::EmotionScore& score) { return score.label() == label; });
    fields.push_back(it == scores.end()
                         ? ""
                         : absl::StrFormat("%.6f", it->probability()));
  }
  return fields;
}

std::string FormatDouble(double value, int digits) {
  return absl::StrFormat("%.*f", digits, value);
}

}  // namespace

double RoundTo(double value, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(value * scale) / scale;
}

std::string FormatScores(const RepeatedPtrField<v1::EmotionScore>& scores,
                         int first, int count) {
  std::vector<std::string> parts;
  for (int i = first; i < scores.size() && i < first + count; ++i) {
    parts.push_back(
        absl::StrCat(scores[i].label(), " ", Percent(scores[i].probability())));
  }
  return absl::StrJoin(parts, ", ");
}

Json ScoresJson(const RepeatedPtrField<v1::EmotionScore>& scores) {
  Json json = Json::object();
  for (const v1::EmotionScore& score : scores) {
    json[score.label()] = RoundTo(score.probability(), 6);
  }
  return json;
}

std::string FormatClassifyTable(const std::vector<ClassifyOutcome>& outcomes,
                                bool timeline) {
  TextTable table({{"FILE", false},
                   {"EMOTION", false},
                   {"CONFIDENCE", true},
                   {"DURATION", true},
                   {"SPEECH", true},
                   {"RUNNERS-UP", false}});
  for (const ClassifyOutcome& outcome : outcomes) {
    if (!outcome.ok()) continue;
    const v1::ClassifyResponse& response = outcome.response;
    const bool has_scores = !response.scores().empty();
    std::vector<std::string> lines_below;
    if (timeline) {
      for (const v1::WindowResult& window : response.timeline()) {
        lines_below.push_back(absl::StrCat(
            SecondsRange(window.start_seconds(), window.end_seconds()), "  ",
            WindowSummary(window)));
      }
    }
    table.AddRow(
        {outcome.file,
         has_scores ? response.top_label() : "(no speech)",
         has_scores ? Percent(response.scores(0).probability()) : "-",
         absl::StrFormat("%.2f s", response.audio_duration_seconds()),
         absl::StrCat(response.speech_window_count(), "/",
                      response.window_count()),
         FormatScores(response.scores(), 1, 2)},
        std::move(lines_below));
  }
  return table.Render();
}

Json ClassifyOutcomesJson(const std::vector<ClassifyOutcome>& outcomes,
                          bool timeline) {
  Json results = Json::array();
  for (const ClassifyOutcome& outcome : outcomes) {
    Json result;
    result["file"] = outcome.file;
    result["ok"] = outcome.ok();
    if (!outcome.ok()) {
      result["error"] = {{"code", outcome.error_code},
                         {"message", outcome.error_message}};
      results.push_back(std::move(result));
      continue;
    }
    const v1::ClassifyResponse& response = outcome.response;
    result["top_label"] = response.top_label();
    result["confidence"] =
        response.scores().empty()
            ? 0.0
            : RoundTo(response.scores(0).probability(), 6);
    result["scores"] = ScoresJson(response.scores());
    result["duration_seconds"] = RoundTo(response.audio_duration_seconds(), 4);
    result["window_count"] = response.window_count();
    result["speech_window_count"] = response.speech_window_count();
    if (response.speaker_adapted()) result["speaker_adapted"] = true;
    result["model"] = response.model_name();
    result["model_version"] = response.model_version();
    result["latency_ms"] =
        RoundTo(absl::ToDoubleMilliseconds(outcome.latency), 3);
    if (timeline) {
      Json windows = Json::array();
      for (const v1::WindowResult& window : response.timeline()) {
        windows.push_back(WindowJson(window));
      }
      result["timeline"] = std::move(windows);
    }
    results.push_back(std::move(result));
  }
  return results;
}

std::string FormatClassifyCsv(const std::vector<ClassifyOutcome>& outcomes,
                              bool timeline) {
  const std::vector<std::string> labels = AllLabels(outcomes);
  std::vector<std::string> header =
      timeline ? std::vector<std::string>{"file", "start_seconds",
                                          "end_seconds", "speech", "top_label",
                                          "confidence"}
               : std::vector<std::string>{"file",
                                          "top_label",
                                          "confidence",
                                          "duration_seconds",
                                          "window_count",
                                          "speech_window_count"};
  header.insert(header.end(), labels.begin(), labels.end());
  header.push_back("error");
  std::string out = CsvLine(header);
  constexpr size_t kFixedColumns = 6;  // before the label columns

  auto row = [&](std::vector<std::string> fields,
                 const RepeatedPtrField<v1::EmotionScore>& scores,
                 const std::string& error) {
    std::vector<std::string> probabilities = LabelProbabilities(scores, labels);
    fields.insert(fields.end(), probabilities.begin(), probabilities.end());
    fields.push_back(error);
    absl::StrAppend(&out, CsvLine(fields));
  };
  for (const ClassifyOutcome& outcome : outcomes) {
    if (!outcome.ok()) {
      std::vector<std::string> fields(kFixedColumns);
      fields[0] = outcome.file;
      row(std::move(fields), {},
          absl::StrCat(outcome.error_code, ": ", outcome.error_message));
      continue;
    }
    const v1::ClassifyResponse& response = outcome.response;
    auto confidence = [](const RepeatedPtrField<v1::EmotionScore>& scores) {
      return scores.empty() ? std::string()
                            : absl::StrFormat("%.6f", scores[0].probability());
    };
    if (!timeline) {
      row({outcome.file, response.top_label(), confidence(response.scores()),
           FormatDouble(response.audio_duration_seconds(), 4),
           absl::StrCat(response.window_count()),
           absl::StrCat(response.speech_window_count())},
          response.scores(), "");
      continue;
    }
    for (const v1::WindowResult& window : response.timeline()) {
      row({outcome.file, FormatDouble(window.start_seconds(), 3),
           FormatDouble(window.end_seconds(), 3),
           window.speech() ? "true" : "false",
           window.scores().empty() ? "" : window.scores(0).label(),
           confidence(window.scores())},
          window.scores(), "");
    }
  }
  return out;
}

std::string FormatStreamResponse(const v1::StreamClassifyResponse& response,
                                 bool json) {
  switch (response.result_case()) {
    case v1::StreamClassifyResponse::kWindow: {
      const v1::WindowResult& window = response.window();
      if (json) {
        Json line = {{"type", "window"}};
        line.update(WindowJson(window));
        return line.dump() + "\n";
      }
      return absl::StrCat(
          SecondsRange(window.start_seconds(), window.end_seconds()),
          "  window     ", WindowSummary(window), "\n");
    }
    case v1::StreamClassifyResponse::kSpeechEvent: {
      const v1::SpeechEvent& event = response.speech_event();
      const bool started = event.type() == v1::SpeechEvent::SPEECH_STARTED;
      if (json) {
        Json line = {{"type", started ? "speech_started" : "speech_ended"},
                     {"time_seconds", RoundTo(event.time_seconds(), 3)}};
        return line.dump() + "\n";
      }
      return absl::StrFormat("%7.2f s          %s\n", event.time_seconds(),
                             started ? "speech started" : "speech ended");
    }
    case v1::StreamClassifyResponse::kUtterance: {
      const v1::UtteranceResult& utterance = response.utterance();
      if (json) {
        Json line = {{"type", "utterance"},
                     {"start_seconds", RoundTo(utterance.start_seconds(), 3)},
                     {"end_seconds", RoundTo(utterance.end_seconds(), 3)},
                     {"top_label", utterance.top_label()},
                     {"scores", ScoresJson(utterance.scores())},
                     {"window_count", utterance.window_count()}};
        if (utterance.speaker_adapted()) line["speaker_adapted"] = true;
        return line.dump() + "\n";
      }
      const bool has_scores = !utterance.scores().empty();
      return absl::StrCat(
          SecondsRange(utterance.start_seconds(), utterance.end_seconds()),
          "  UTTERANCE  ",
          has_scores ? absl::StrCat(utterance.top_label(), " ",
                                    Percent(utterance.scores(0).probability()))
                     : "(no scores)",
          utterance.scores_size() > 1
              ? absl::StrCat("  (", FormatScores(utterance.scores(), 1, 2), ")")
              : "",
          "  [", utterance.window_count(), " windows",
          utterance.speaker_adapted() ? ", adapted to the voice" : "", "]\n");
    }
    case v1::StreamClassifyResponse::RESULT_NOT_SET:
      break;
  }
  return json ? "{\"type\":\"unknown\"}\n" : "";
}

std::string FormatModelInfo(const v1::ModelInfo& info, bool json) {
  // The feature parameters are a protobuf Struct: protobuf's own JSON
  // printer renders it faithfully (appending to its output string).
  Json features = Json::object();
  if (info.has_features()) {
    std::string features_text;
    google::protobuf::util::JsonPrintOptions print_options;
    print_options.preserve_proto_field_names = true;
    if (google::protobuf::util::MessageToJsonString(
            info.features(), &features_text, print_options)
            .ok()) {
      // Parsed into nlohmann::json, whose objects sort their keys: the
      // Struct's own order is a hash map's.
      const nlohmann::json sorted = nlohmann::json::parse(
          features_text, nullptr, /*allow_exceptions=*/false);
      if (!sorted.is_discarded()) features = Json(sorted);
    }
  }
  if (json) {
    Json out;
    out["name"] = info.name();
    out["version"] = info.version();
    out["labels"] = Json(std::vector<std::string>(info.labels().begin(),
                                                  info.labels().end()));
    out["sample_rate_hertz"] = info.sample_rate_hertz();
    out["window_seconds"] = info.window_seconds();
    out["default_hop_seconds"] = info.default_hop_seconds();
    out["device"] = info.device();
    out["max_batch_size"] = info.max_batch_size();
    out["features"] = std::move(features);
    return out.dump(2) + "\n";
  }
  std::string out;
  absl::StrAppend(&out, "model:        ", info.name(), " ", info.version(),
                  "\n");
  absl::StrAppend(&out, "labels:       ", absl::StrJoin(info.labels(), ", "),
                  "\n");
  absl::StrAppend(&out, "sample rate:  ", info.sample_rate_hertz(), " Hz\n");
  absl::StrAppend(&out,
                  absl::StrFormat("window:       %.3g s (default hop %.3g s)\n",
                                  info.window_seconds(),
                                  info.default_hop_seconds()));
  absl::StrAppend(&out, "device:       ", info.device(), "\n");
  absl::StrAppend(&out, "max batch:    ", info.max_batch_size(), "\n");
  absl::StrAppend(&out, "features:     ", features.dump(), "\n");
  return out;
}

// "MODEL_STATE_READY" -> "ready".
std::string ModelStateText(v1::ModelState state) {
  return absl::AsciiStrToLower(
      absl::StripPrefix(v1::ModelState_Name(state), "MODEL_STATE_"));
}

std::string FormatModels(const v1::ListModelsResponse& models, bool json) {
  if (json) {
    Json list = Json::array();
    for (const v1::ModelStatus& model : models.models()) {
      Json versions = Json::array();
      for (const v1::ModelVersionStatus& version : model.versions()) {
        Json v;
        v["version"] = version.version();
        v["reported_version"] = version.reported_version();
        v["state"] = ModelStateText(version.state());
        if (!version.error().empty()) v["error"] = version.error();
        versions.push_back(std::move(v));
      }
      Json m;
      m["name"] = model.name();
      m["is_default"] = model.is_default();
      m["default_version"] = model.default_version();
      m["versions"] = std::move(versions);
      list.push_back(std::move(m));
    }
    Json out;
    out["models"] = std::move(list);
    return out.dump(2) + "\n";
  }
  std::string out = absl::StrFormat("%-24s %8s  %-8s %s\n", "MODEL", "VERSION",
                                    "STATE", "NOTE");
  for (const v1::ModelStatus& model : models.models()) {
    for (const v1::ModelVersionStatus& version : model.versions()) {
      std::string note;
      if (version.version() == model.default_version()) {
        note = model.is_default() ? "serves calls naming no model"
                                  : "serves calls naming no version";
      }
      if (!version.error().empty()) note = version.error();
      if (!version.reported_version().empty() &&
          version.reported_version() != absl::StrCat(version.version())) {
        note = absl::StrCat("responses say version \"", version.reported_version(), "\"",
                            note.empty() ? "" : "; ", note);
      }
      absl::StrAppend(&out, absl::StrFormat("%-24s %8d  %-8s %s\n", model.name(),
                                            version.version(),
                                            ModelStateText(version.state()),
                                            note));
    }
  }
  return out;
}

}  // namespace emoserve::client
