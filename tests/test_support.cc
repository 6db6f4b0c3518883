#include "tests/test_support.h"

#include <sndfile.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"

namespace emoserve::testing {

std::optional<std::string> SharedDir() {
  const char* env = std::getenv("EMOSERVE_SHARED_DIR");
  std::string dir = env != nullptr && *env != '\0' ? env : EMOSERVE_DEFAULT_SHARED_DIR;
  if (!std::filesystem::is_directory(dir)) return std::nullopt;
  return dir;
}

absl::StatusOr<std::vector<std::vector<float>>> SyntheticSpeechClips(size_t count) {
  constexpr int kRate = 16000;
  DecodeOptions options;
  options.output_sample_rate = kRate;
  absl::StatusOr<Audio> speech =
      DecodeAudioFile(std::string(EMOSERVE_SOURCE_DIR) + "/examples/hello.wav", options);
  if (!speech.ok()) return speech.status();
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 1e-4f);  // about -80 dBFS
  const auto faint = [&](double seconds, std::vector<float>* out) {
    for (long i = std::lround(seconds * kRate); i > 0; --i) out->push_back(noise(rng));
  };
  std::vector<std::vector<float>> clips(count);
  for (size_t i = 0; i < count; ++i) {
    const float gain = std::pow(10.0f, -static_cast<float>(i % 4) * 3.0f / 20.0f);
    faint(0.1 * static_cast<double>(i), &clips[i]);
    for (float sample : speech->samples) clips[i].push_back(gain * sample + noise(rng));
    faint(0.5, &clips[i]);
  }
  return clips;
}

std::pair<int, std::string> RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
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

// ---------------------------------------------------------------------------
// In-memory audio encoding and signal measurements (audio/resampler tests).

namespace emoserve::testing {
namespace {

// A growable in-memory file for libsndfile's virtual I/O; encoders seek
// back to patch headers, so it must support random access.
struct MemorySink {
  std::string bytes;
  sf_count_t position = 0;
};

sf_count_t SinkLength(void* user) {
  return static_cast<sf_count_t>(static_cast<MemorySink*>(user)->bytes.size());
}

sf_count_t SinkSeek(sf_count_t offset, int whence, void* user) {
  auto* sink = static_cast<MemorySink*>(user);
  const sf_count_t base = whence == SEEK_SET   ? 0
                          : whence == SEEK_CUR ? sink->position
                                               : SinkLength(user);
  if (base + offset < 0) return -1;
  sink->position = base + offset;
  return sink->position;
}

sf_count_t SinkRead(void* ptr, sf_count_t count, void* user) {
  auto* sink = static_cast<MemorySink*>(user);
  const sf_count_t available = SinkLength(user) - sink->position;
  const sf_count_t n = std::max<sf_count_t>(0, std::min(count, available));
  std::memcpy(ptr, sink->bytes.data() + sink->position, n);
  sink->position += n;
  return n;
}

sf_count_t SinkWrite(const void* ptr, sf_count_t count, void* user) {
  auto* sink = static_cast<MemorySink*>(user);
  const size_t end = static_cast<size_t>(sink->position + count);
  if (end > sink->bytes.size()) sink->bytes.resize(end);
  std::memcpy(sink->bytes.data() + sink->position, ptr, count);
  sink->position += count;
  return count;
}

sf_count_t SinkTell(void* user) {
  return static_cast<MemorySink*>(user)->position;
}

int SndfileFormat(FileFormat format) {
  switch (format) {
    case FileFormat::kWavPcm16:
      return SF_FORMAT_WAV | SF_FORMAT_PCM_16;
    case FileFormat::kWavPcm24:
      return SF_FORMAT_WAV | SF_FORMAT_PCM_24;
    case FileFormat::kWavPcm32:
      return SF_FORMAT_WAV | SF_FORMAT_PCM_32;
    case FileFormat::kWavFloat:
      return SF_FORMAT_WAV | SF_FORMAT_FLOAT;
    case FileFormat::kFlac:
      return SF_FORMAT_FLAC | SF_FORMAT_PCM_16;
    case FileFormat::kOggVorbis:
      return SF_FORMAT_OGG | SF_FORMAT_VORBIS;
    case FileFormat::kMp3:
      return SF_FORMAT_MPEG | SF_FORMAT_MPEG_LAYER_III;
    case FileFormat::kWavMuLaw:
      return SF_FORMAT_WAV | SF_FORMAT_ULAW;
    case FileFormat::kWavImaAdpcm:
      return SF_FORMAT_WAV | SF_FORMAT_IMA_ADPCM;
    case FileFormat::kAu:
      return SF_FORMAT_AU | SF_FORMAT_PCM_16;
    case FileFormat::kAiff:
      return SF_FORMAT_AIFF | SF_FORMAT_PCM_16;
    case FileFormat::kCaf:
      return SF_FORMAT_CAF | SF_FORMAT_PCM_16;
    case FileFormat::kW64:
      return SF_FORMAT_W64 | SF_FORMAT_PCM_16;
    case FileFormat::kOggOpus:
      return SF_FORMAT_OGG | SF_FORMAT_OPUS;
  }
  return 0;
}

}  // namespace

absl::StatusOr<std::string> EncodeAudio(absl::Span<const float> interleaved,
                                        int channels, int sample_rate,
                                        FileFormat format) {
  MemorySink sink;
  SF_VIRTUAL_IO io{SinkLength, SinkSeek, SinkRead, SinkWrite, SinkTell};
  SF_INFO info{};
  info.samplerate = sample_rate;
  info.channels = channels;
  info.format = SndfileFormat(format);
  SNDFILE* file = sf_open_virtual(&io, SFM_WRITE, &info, &sink);
  if (file == nullptr) {
    return absl::InternalError(
        absl::StrCat("sf_open_virtual (write): ", sf_strerror(nullptr)));
  }
  const sf_count_t frames =
      static_cast<sf_count_t>(interleaved.size() / channels);
  const sf_count_t written = sf_writef_float(file, interleaved.data(), frames);
  const std::string error = sf_strerror(file);
  // Closing writes the final header sizes / last pages.
  if (sf_close(file) != 0 || written != frames) {
    return absl::InternalError(absl::StrCat("libsndfile write: ", error));
  }
  return std::move(sink.bytes);
}

double MaxAbsDifference(absl::Span<const float> a, absl::Span<const float> b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::quiet_NaN();
  double largest = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    largest = std::max(largest, std::abs(double{a[i]} - b[i]));
  }
  return largest;
}

double Rms(absl::Span<const float> x) {
  if (x.empty()) return 0.0;
  double sum = 0.0;
  for (float v : x) sum += static_cast<double>(v) * v;
  return std::sqrt(sum / x.size());
}

double ToneAmplitude(absl::Span<const float> x, double frequency, int rate) {
  if (x.size() < 2) return 0.0;
  double re = 0.0;
  double im = 0.0;
  double window_sum = 0.0;
  const size_t n = x.size();
  for (size_t i = 0; i < n; ++i) {
    const double w = 0.5 - 0.5 * std::cos(2.0 * M_PI * i / (n - 1));
    const double phase = 2.0 * M_PI * frequency * i / rate;
    re += w * x[i] * std::cos(phase);
    im += w * x[i] * std::sin(phase);
    window_sum += w;
  }
  return 2.0 * std::hypot(re, im) / window_sum;
}

double ZeroCrossingFrequency(absl::Span<const float> x, int rate) {
  double first = -1.0;
  double last = -1.0;
  int crossings = 0;
  for (size_t i = 1; i < x.size(); ++i) {
    if (x[i - 1] < 0.0f && x[i] >= 0.0f) {
      const double t = (i - 1) + x[i - 1] / (x[i - 1] - x[i]);
      if (crossings == 0) first = t;
      last = t;
      ++crossings;
    }
  }
  if (crossings < 2) return 0.0;
  return (crossings - 1) * rate / (last - first);
}

}  // namespace emoserve::testing
