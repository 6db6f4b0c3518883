// The file in which `--speaker FILE` keeps one voice's speaker statistics
// between calls: the server keeps none, so the client carries them.
#ifndef EMOSERVE_CLIENT_SPEAKER_FILE_H_
#define EMOSERVE_CLIENT_SPEAKER_FILE_H_

#include <string>

#include "absl/status/statusor.h"

namespace emoserve::client {

// The statistics in `path`; empty when the file does not exist yet (a voice
// not heard before).
absl::StatusOr<std::string> ReadSpeakerFile(const std::string& path);

// Replaces `path` with `statistics` whole (written beside it, then renamed),
// so that an interrupted write never leaves half a file.
absl::Status WriteSpeakerFile(const std::string& path, const std::string& statistics);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_SPEAKER_FILE_H_
