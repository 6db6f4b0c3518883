// main() of every test binary: a private temporary directory per process.
// ctest runs each test case in its own process, two at a time, and many
// tests write fixtures (model directories, audio files) under
// ::testing::TempDir(); a directory per process keeps them from racing.
#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

#include <gtest/gtest.h>

int main(int argc, char** argv) {
  std::string base = std::filesystem::temp_directory_path().string() + "/emoserve-test-XXXXXX";
  const char* dir = mkdtemp(base.data());
  if (dir != nullptr) setenv("TEST_TMPDIR", dir, /*overwrite=*/1);
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  if (dir != nullptr) {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  return result;
}
