// Writes a freshly initialised model directory for the deployment tests,
// which run emoserve-server as a process and need a model before the bundled
// one (models/default) exists.
//   write_test_model [--small] DIR
#include <cstdio>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "tests/test_model.h"

int main(int argc, char** argv) {
  bool small = false;
  std::string dir;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--small") == 0) {
      small = true;
    } else if (dir.empty() && argv[i][0] != '-') {
      dir = argv[i];
    } else {
      dir.clear();
      break;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: write_test_model [--small] DIR\n");
    return 2;
  }
  const emoserve::ModelConfig config = small
                                           ? emoserve::testing::SmallModelConfig()
                                           : emoserve::testing::DefaultModelConfig();
  const absl::Status written = emoserve::testing::WriteTestModel(config, dir);
  if (!written.ok()) {
    std::fprintf(stderr, "write_test_model: %s\n", written.ToString().c_str());
    return 1;
  }
  return 0;
}
