// Audio decoding: bytes in any common container, or raw PCM, to mono float.
#ifndef EMOSERVE_CORE_AUDIO_H_
#define EMOSERVE_CORE_AUDIO_H_

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace emoserve {

// Sample rates the decoder accepts, in Hz (inclusive).
inline constexpr int kMinSampleRate = 8000;
inline constexpr int kMaxSampleRate = 192000;

// Mono PCM, float samples nominally in [-1, 1].
struct Audio {
  std::vector<float> samples;
  int sample_rate = 0;

  double duration_seconds() const {
    return sample_rate > 0 ? static_cast<double>(samples.size()) / sample_rate
                           : 0.0;
  }
};

enum class PcmEncoding { kS16LE, kF32LE };

// Raw interleaved PCM with no header: its format is declared by the caller.
struct RawPcmFormat {
  PcmEncoding encoding = PcmEncoding::kS16LE;
  int sample_rate = 16000;
  int channels = 1;
};

struct DecodeOptions {
  // Longer audio is rejected (kOutOfRange) before it is decoded in full.
  double max_duration_seconds = 600.0;
  // When set, the bytes are raw PCM in this format; otherwise the container
  // (WAV, FLAC, OGG/Vorbis, MP3, ...) is detected from the bytes.
  std::optional<RawPcmFormat> raw;
};

// Parses "s16le" / "f32le".
absl::StatusOr<PcmEncoding> ParsePcmEncoding(std::string_view name);

// kInvalidArgument unless kMinSampleRate <= rate <= kMaxSampleRate.
absl::Status ValidateSampleRate(int sample_rate);

// Decodes from memory (no temporary files) and mixes down to mono.
// Errors are kInvalidArgument (empty, unrecognised, truncated or corrupt
// data, non-finite samples, bad rate or channel count) or kOutOfRange
// (longer than options.max_duration_seconds).
absl::StatusOr<Audio> DecodeAudio(std::string_view bytes,
                                  const DecodeOptions& options = {});

// Reads a whole file and decodes it with DecodeAudio.
absl::StatusOr<Audio> DecodeAudioFile(const std::string& path,
                                      const DecodeOptions& options = {});

// Reads a whole file into memory (kNotFound / kInvalidArgument on failure).
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_AUDIO_H_
