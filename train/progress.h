// A one-line progress bar on stderr: redrawn in place on a terminal, a line
// per tenth of the work (and at the end) otherwise, so CI logs stay short.
#ifndef EMOSERVE_TRAIN_PROGRESS_H_
#define EMOSERVE_TRAIN_PROGRESS_H_

#include <chrono>
#include <string>

namespace emoserve {

class ProgressBar {
 public:
  ProgressBar(std::string label, int total);
  // `done` of `total` finished; `status` is appended (loss, accuracy...).
  void Update(int done, const std::string& status = "");
  void Finish(const std::string& status = "");

 private:
  std::string label_;
  int total_;
  int last_decile_ = -1;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

// "1h02m", "3m07s", "12s".
std::string FormatDuration(double seconds);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_PROGRESS_H_
