#include "client/speaker_file.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"

namespace emoserve::client {

absl::StatusOr<std::string> ReadSpeakerFile(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error) && !error) return std::string();
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(),
                        absl::StrCat("--speaker: ", bytes.status().message()));
  }
  return bytes;
}

absl::Status WriteSpeakerFile(const std::string& path, const std::string& statistics) {
  const std::string temporary = path + ".tmp";
  std::FILE* file = std::fopen(temporary.c_str(), "wb");
  if (file == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("--speaker: cannot write ", temporary, ": ", std::strerror(errno)));
  }
  const bool written = std::fwrite(statistics.data(), 1, statistics.size(), file) ==
                       statistics.size();
  const bool closed = std::fclose(file) == 0;
  if (!written || !closed || std::rename(temporary.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(temporary.c_str());
    return absl::UnavailableError(absl::StrCat("--speaker: cannot write ", path, ": ", reason));
  }
  return absl::OkStatus();
}

}  // namespace emoserve::client
