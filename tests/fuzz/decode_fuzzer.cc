// libFuzzer: the audio decoder on anything. The first byte picks the mode:
// bit 6 raw PCM (bits 0-5 its encoding, rate and channels) or a container
// file (WAV, FLAC, OGG/Vorbis, MP3, or anything else: refused); bit 7
// decoding straight to 16 kHz. Decoding must end with audio or an error,
// never a crash, a leak, or memory beyond what it reserved.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "absl/status/status.h"
#include "core/audio.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using emoserve::Audio;
  using emoserve::DecodeOptions;
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  const std::string_view bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  DecodeOptions options;
  options.max_duration_seconds = 30;
  options.output_sample_rate = (mode & 0x80) != 0 ? 16000 : 0;
  // A budget of 16 MiB: inputs that would need more are refused cleanly.
  size_t reserved = 0;
  options.reserve = [&](size_t capacity) {
    if (capacity * sizeof(float) > (16u << 20)) {
      return absl::ResourceExhaustedError("over the fuzz budget");
    }
    reserved = capacity;
    return absl::OkStatus();
  };
  if ((mode & 0x40) != 0) {
    static constexpr int kRates[] = {8000, 16000, 44100, 192000};
    emoserve::RawPcmFormat raw;
    raw.encoding = (mode & 1) != 0 ? emoserve::PcmEncoding::kF32LE : emoserve::PcmEncoding::kS16LE;
    raw.sample_rate = kRates[(mode >> 1) & 3];
    raw.channels = 1 + ((mode >> 3) & 7);
    options.raw = raw;
  }
  absl::StatusOr<Audio> audio = emoserve::DecodeAudio(bytes, options);
  if (!audio.ok()) return 0;
  // What a decode returns: a known rate, finite samples, no more than it
  // reserved, within the duration limit.
  if (options.output_sample_rate != 0 && audio->sample_rate != options.output_sample_rate) {
    std::abort();
  }
  if (audio->samples.empty() || audio->samples.capacity() > reserved) std::abort();
  if (audio->duration_seconds() > options.max_duration_seconds + 1e-9) std::abort();
  for (float x : audio->samples) {
    if (!std::isfinite(x)) std::abort();
  }
  return 0;
}
