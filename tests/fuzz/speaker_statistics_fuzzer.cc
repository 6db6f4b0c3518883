// libFuzzer: a speaker_statistics blob as a request carries it. A blob the
// parser accepts holds finite values and serializes back to the same bytes.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/speaker_statistics.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using emoserve::SpeakerStatistics;
  const absl::string_view blob(reinterpret_cast<const char*>(data), size);
  // The width the blob's size implies, so that whole blobs are reachable.
  const int width = size >= 24 ? static_cast<int>((size - 24) / 4) : 1;
  absl::StatusOr<SpeakerStatistics> parsed = SpeakerStatistics::Parse(blob, "seed key", width);
  if (!parsed.ok()) return 0;
  if (parsed->Serialize() != blob) std::abort();
  for (float v : parsed->Mean()) {
    if (!std::isfinite(v)) std::abort();
  }
  return 0;
}
