// Audio decoding: bytes in any common container, or raw PCM, to mono float.
#ifndef EMOSERVE_CORE_AUDIO_H_
#define EMOSERVE_CORE_AUDIO_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace emoserve {

// Sample rates the decoder accepts, in Hz (inclusive).
inline constexpr int kMinSampleRate = 8000;
inline constexpr int kMaxSampleRate = 192000;
// More channels than this is almost certainly a corrupt header; real
// recordings have 1-8 and ambisonics/mic arrays stay well below 64.
inline constexpr int kMaxChannels = 64;

// Decoded samples must be finite and within this magnitude (+60 dB over full
// scale, which is +-1): anything larger is corrupt or unnormalised data whose
// power spectrum would overflow float.
inline constexpr float kMaxSampleMagnitude = 1000.0f;

// Mono PCM, float samples nominally in [-1, 1].
struct Audio {
  std::vector<float> samples;
  int sample_rate = 0;
  // The source's length in samples per channel (PCM frames), before any
  // resampling (0 when not decoded).
  int64_t source_samples = 0;
  int source_sample_rate = 0;

  // The source's duration; resampling may round the sample count by one.
  double duration_seconds() const {
    if (source_sample_rate > 0) {
      return static_cast<double>(source_samples) / source_sample_rate;
    }
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
  // (WAV, FLAC, OGG/Vorbis or MP3; nothing else) is detected from the bytes.
  std::optional<RawPcmFormat> raw;
  // The rate of the result; 0 keeps the source's. Resampling runs block by
  // block as the audio is decoded, so the source-rate signal is never held
  // whole: memory is the result plus one block.
  int output_sample_rate = 0;
  // Called before the result's buffer is allocated or grown, with the
  // samples it is about to hold (its capacity); an error stops decoding and
  // is returned. A memory budget charges the call here.
  std::function<absl::Status(size_t capacity_samples)> reserve;
  // Called between blocks (a few thousand frames); an error (the call was
  // cancelled, its deadline passed) stops decoding and is returned.
  std::function<absl::Status()> keep_going;
};

// Parses "s16le" / "f32le".
absl::StatusOr<PcmEncoding> ParsePcmEncoding(std::string_view name);

// kInvalidArgument unless kMinSampleRate <= rate <= kMaxSampleRate.
absl::Status ValidateSampleRate(int sample_rate);
// kInvalidArgument unless the rate is valid and 1 <= channels <= kMaxChannels.
absl::Status ValidateRawPcmFormat(const RawPcmFormat& format);

// kInvalidArgument naming the first sample (counted from `first_index`)
// that is not finite or exceeds kMaxSampleMagnitude.
absl::Status CheckSamples(absl::Span<const float> samples, size_t first_index = 0);

// Decodes from memory (no temporary files), mixes down to mono and, with
// options.output_sample_rate, resamples.
// Errors are kInvalidArgument (empty, unrecognised, unsupported, truncated or
// corrupt data, non-finite or absurd samples, bad rate or channel count),
// kOutOfRange (longer than options.max_duration_seconds), or whatever
// options.reserve / options.keep_going returned.
absl::StatusOr<Audio> DecodeAudio(std::string_view bytes,
                                  const DecodeOptions& options = {});

// Reads a whole file and decodes it with DecodeAudio.
absl::StatusOr<Audio> DecodeAudioFile(const std::string& path,
                                      const DecodeOptions& options = {});

// Reads a whole file into memory (kNotFound / kInvalidArgument on failure).
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_AUDIO_H_
