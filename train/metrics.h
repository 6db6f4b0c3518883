// Classification metrics and the files people look at: confusion matrices
// and training curves as CSV and SVG.
#ifndef EMOSERVE_TRAIN_METRICS_H_
#define EMOSERVE_TRAIN_METRICS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace emoserve {

class ConfusionMatrix {
 public:
  explicit ConfusionMatrix(std::vector<std::string> labels);

  void Add(int truth, int predicted);
  // Adds another matrix's counts (same labels): pooled results.
  void Merge(const ConfusionMatrix& other);
  int total() const;
  double accuracy() const;
  // Recall of each class (NaN-free: 0 for a class with no examples).
  std::vector<double> recalls() const;
  // Unweighted average recall over the classes that have examples.
  double uar() const;
  const std::vector<std::string>& labels() const { return labels_; }
  int count(int truth, int predicted) const { return counts_[truth][predicted]; }

  // A readable table: metrics, per-class recall, the matrix.
  std::string ToText() const;
  nlohmann::json ToJson() const;
  // Rows are true labels, columns predicted labels.
  absl::Status WriteCsv(const std::string& path) const;
  // A heatmap of row-normalised recall with counts in the cells.
  absl::Status WriteSvg(const std::string& path, const std::string& title) const;

 private:
  std::vector<std::string> labels_;
  std::vector<std::vector<int>> counts_;
};

struct EpochRecord {
  int epoch = 0;
  double learning_rate = 0;
  double train_loss = 0;
  double train_accuracy = 0;
  double val_accuracy = 0;
  double val_uar = 0;
  double seconds = 0;
};

absl::Status WriteTrainingCurveCsv(const std::vector<EpochRecord>& curve,
                                   const std::string& path);
// Loss and validation accuracy / UAR against epochs.
absl::Status WriteTrainingCurveSvg(const std::vector<EpochRecord>& curve,
                                   const std::string& path);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_METRICS_H_
