#include "train/metrics.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace emoserve {
namespace {

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::string SvgText(double x, double y, const std::string& text,
                    const std::string& extra = "") {
  return absl::StrFormat(
      "<text x=\"%.1f\" y=\"%.1f\" font-family=\"sans-serif\" font-size=\"12\" %s>%s</text>\n",
      x, y, extra, text);
}

}  // namespace

ConfusionMatrix::ConfusionMatrix(std::vector<std::string> labels)
    : labels_(std::move(labels)),
      counts_(labels_.size(), std::vector<int>(labels_.size(), 0)) {}

void ConfusionMatrix::Add(int truth, int predicted) { ++counts_[truth][predicted]; }

void ConfusionMatrix::Merge(const ConfusionMatrix& other) {
  for (size_t t = 0; t < counts_.size(); ++t) {
    for (size_t p = 0; p < counts_[t].size(); ++p) counts_[t][p] += other.counts_[t][p];
  }
}

int ConfusionMatrix::total() const {
  int n = 0;
  for (const auto& row : counts_) for (int c : row) n += c;
  return n;
}

double ConfusionMatrix::accuracy() const {
  int correct = 0;
  for (size_t i = 0; i < labels_.size(); ++i) correct += counts_[i][i];
  const int n = total();
  return n > 0 ? static_cast<double>(correct) / n : 0.0;
}

std::vector<double> ConfusionMatrix::recalls() const {
  std::vector<double> recall(labels_.size(), 0.0);
  for (size_t i = 0; i < labels_.size(); ++i) {
    int row = 0;
    for (int c : counts_[i]) row += c;
    if (row > 0) recall[i] = static_cast<double>(counts_[i][i]) / row;
  }
  return recall;
}

double ConfusionMatrix::uar() const {
  const std::vector<double> recall = recalls();
  double sum = 0.0;
  int classes = 0;
  for (size_t i = 0; i < labels_.size(); ++i) {
    int row = 0;
    for (int c : counts_[i]) row += c;
    if (row == 0) continue;
    sum += recall[i];
    ++classes;
  }
  return classes > 0 ? sum / classes : 0.0;
}

std::string ConfusionMatrix::ToText() const {
  std::string text = absl::StrFormat("clips %d  accuracy %.4f  UAR %.4f\n\n", total(),
                                     accuracy(), uar());
  const std::vector<double> recall = recalls();
  absl::StrAppend(&text, "per-class recall:\n");
  for (size_t i = 0; i < labels_.size(); ++i) {
    absl::StrAppendFormat(&text, "  %-10s %.4f\n", labels_[i], recall[i]);
  }
  absl::StrAppend(&text, "\nconfusion matrix (rows: true, columns: predicted):\n");
  absl::StrAppendFormat(&text, "%-10s", "");
  for (const std::string& label : labels_) absl::StrAppendFormat(&text, " %9.9s", label);
  absl::StrAppend(&text, "\n");
  for (size_t i = 0; i < labels_.size(); ++i) {
    absl::StrAppendFormat(&text, "%-10s", labels_[i]);
    for (int c : counts_[i]) absl::StrAppendFormat(&text, " %9d", c);
    absl::StrAppend(&text, "\n");
  }
  return text;
}

nlohmann::json ConfusionMatrix::ToJson() const {
  nlohmann::json recall = nlohmann::json::object();
  const std::vector<double> r = recalls();
  for (size_t i = 0; i < labels_.size(); ++i) recall[labels_[i]] = r[i];
  return {{"clips", total()},        {"accuracy", accuracy()}, {"uar", uar()},
          {"recall", recall},        {"labels", labels_},      {"confusion", counts_}};
}

absl::Status ConfusionMatrix::WriteCsv(const std::string& path) const {
  std::string csv = absl::StrCat("true\\predicted,", absl::StrJoin(labels_, ","), "\n");
  for (size_t i = 0; i < labels_.size(); ++i) {
    absl::StrAppend(&csv, labels_[i], ",", absl::StrJoin(counts_[i], ","), "\n");
  }
  return WriteText(path, csv);
}

absl::Status ConfusionMatrix::WriteSvg(const std::string& path,
                                       const std::string& title) const {
  const int n = static_cast<int>(labels_.size());
  const double cell = 48, left = 90, top = 60;
  const double width = left + n * cell + 20, height = top + n * cell + 80;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      width, height);
  svg += SvgText(10, 20, absl::StrFormat("%s: accuracy %.3f, UAR %.3f (%d clips)", title,
                                         accuracy(), uar(), total()),
                 "font-weight=\"bold\"");
  svg += SvgText(left, top - 25, "predicted →");
  for (int i = 0; i < n; ++i) {
    int row_total = 0;
    for (int c : counts_[i]) row_total += c;
    svg += SvgText(5, top + i * cell + cell / 2 + 4, labels_[i]);
    svg += SvgText(left + i * cell + 2, top - 6, labels_[i].substr(0, 7), "font-size=\"10\"");
    for (int j = 0; j < n; ++j) {
      const double share = row_total > 0 ? static_cast<double>(counts_[i][j]) / row_total : 0;
      const int shade = static_cast<int>(std::lround(255 * (1 - share)));
      svg += absl::StrFormat(
          "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
          "fill=\"rgb(%d,%d,255)\" stroke=\"#999\"/>\n",
          left + j * cell, top + i * cell, cell, cell, shade, shade);
      svg += SvgText(left + j * cell + cell / 2, top + i * cell + cell / 2 + 4,
                     absl::StrCat(counts_[i][j]),
                     absl::StrCat("text-anchor=\"middle\" fill=\"",
                                  share > 0.5 ? "white" : "black", "\""));
    }
  }
  svg += SvgText(5, top + n * cell + 30, "rows: true label; shade: share of the row");
  svg += "</svg>\n";
  return WriteText(path, svg);
}

absl::Status WriteTrainingCurveCsv(const std::vector<EpochRecord>& curve,
                                   const std::string& path) {
  std::string csv =
      "epoch,learning_rate,train_loss,train_accuracy,val_accuracy,val_uar,seconds\n";
  for (const EpochRecord& r : curve) {
    absl::StrAppendFormat(&csv, "%d,%.6g,%.5f,%.5f,%.5f,%.5f,%.2f\n", r.epoch,
                          r.learning_rate, r.train_loss, r.train_accuracy,
                          r.val_accuracy, r.val_uar, r.seconds);
  }
  return WriteText(path, csv);
}

absl::Status WriteTrainingCurveSvg(const std::vector<EpochRecord>& curve,
                                   const std::string& path) {
  const double left = 50, top = 30, plot_w = 600, plot_h = 300;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\">\n"
      "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" "
      "stroke=\"#333\"/>\n",
      left + plot_w + 160, top + plot_h + 50, left, top, plot_w, plot_h);
  const int epochs = std::max<int>(1, curve.size());
  double max_loss = 1e-9;
  for (const EpochRecord& r : curve) max_loss = std::max(max_loss, r.train_loss);
  struct Series {
    const char* name;
    const char* color;
    double (*value)(const EpochRecord&, double);
  };
  const Series series[] = {
      {"train loss (scaled to max)", "#d62728",
       [](const EpochRecord& r, double m) { return r.train_loss / m; }},
      {"train accuracy", "#7f7f7f",
       [](const EpochRecord& r, double) { return r.train_accuracy; }},
      {"val accuracy", "#1f77b4", [](const EpochRecord& r, double) { return r.val_accuracy; }},
      {"val UAR", "#2ca02c", [](const EpochRecord& r, double) { return r.val_uar; }},
  };
  for (int tick = 0; tick <= 4; ++tick) {
    const double y = top + plot_h * (1 - tick / 4.0);
    svg += SvgText(10, y + 4, absl::StrFormat("%.2f", tick / 4.0));
  }
  svg += SvgText(left + plot_w / 2, top + plot_h + 35, absl::StrCat("epoch (1..", epochs, ")"));
  int index = 0;
  for (const Series& s : series) {
    std::string points;
    for (size_t i = 0; i < curve.size(); ++i) {
      const double x = left + plot_w * (epochs == 1 ? 0.5 : static_cast<double>(i) / (epochs - 1));
      const double y = top + plot_h * (1 - std::clamp(s.value(curve[i], max_loss), 0.0, 1.0));
      absl::StrAppendFormat(&points, "%.1f,%.1f ", x, y);
    }
    svg += absl::StrFormat(
        "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>\n",
        points, s.color);
    svg += SvgText(left + plot_w + 10, top + 20 + 20 * index++, s.name,
                   absl::StrCat("fill=\"", s.color, "\""));
  }
  svg += "</svg>\n";
  return WriteText(path, svg);
}

}  // namespace emoserve
