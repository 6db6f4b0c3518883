#include "tests/test_support.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>

namespace emoserve::testing {

std::optional<std::string> SharedDir() {
  const char* env = std::getenv("EMOSERVE_SHARED_DIR");
  std::string dir = env != nullptr && *env != '\0' ? env : EMOSERVE_DEFAULT_SHARED_DIR;
  if (!std::filesystem::is_directory(dir)) return std::nullopt;
  return dir;
}

std::vector<float> Sine(double frequency, double amplitude, int rate,
                        double seconds) {
  const size_t n = static_cast<size_t>(std::lround(seconds * rate));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(amplitude *
                                std::sin(2.0 * M_PI * frequency * i / rate));
  }
  return out;
}

}  // namespace emoserve::testing
