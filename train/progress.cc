#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>

#include "absl/strings/str_format.h"

namespace emoserve {

std::string FormatDuration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  if (s >= 3600) return absl::StrFormat("%ldh%02ldm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%ldm%02lds", s / 60, s % 60);
  return absl::StrFormat("%lds", s);
}

ProgressBar::ProgressBar(std::string label, int total)
    : label_(std::move(label)),
      total_(std::max(1, total)),
      tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {}

void ProgressBar::Update(int done, const std::string& status) {
  const int decile = done * 10 / total_;
  if (!tty_ && decile == last_decile_ && done != total_) return;
  last_decile_ = decile;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done > 0 ? elapsed * (total_ - done) / done : 0.0;
  constexpr int kWidth = 24;
  const int filled = done * kWidth / total_;
  std::string bar(filled, '=');
  if (filled < kWidth) bar += '>';
  bar.resize(kWidth, ' ');
  std::fprintf(stderr, "%s%s [%s] %d/%d %s elapsed %s ETA %s%s", tty_ ? "\r\33[2K" : "",
               label_.c_str(), bar.c_str(), done, total_, status.c_str(),
               FormatDuration(elapsed).c_str(), FormatDuration(eta).c_str(),
               tty_ ? "" : "\n");
  std::fflush(stderr);
}

void ProgressBar::Finish(const std::string& status) {
  // Off a terminal, Update(total_) has printed the final line already.
  if (tty_ || !status.empty() || last_decile_ != 10) {
    last_decile_ = -1;
    Update(total_, status);
  }
  if (tty_) std::fputc('\n', stderr);
}

}  // namespace emoserve
