// Helpers shared by the tests: where ../shared is, and small signal tools.
#ifndef EMOSERVE_TESTS_TEST_SUPPORT_H_
#define EMOSERVE_TESTS_TEST_SUPPORT_H_

#include <optional>
#include <string>
#include <vector>

namespace emoserve::testing {

// The shared data folder (env EMOSERVE_SHARED_DIR, else the configured
// default), or nullopt when it does not exist. Tests that need it call
// GTEST_SKIP() with a message in that case; when it exists, missing or wrong
// files inside are failures.
std::optional<std::string> SharedDir();

// A sine of `seconds` at `rate`, amplitude `amplitude`.
std::vector<float> Sine(double frequency, double amplitude, int rate,
                        double seconds);

}  // namespace emoserve::testing

#endif  // EMOSERVE_TESTS_TEST_SUPPORT_H_
