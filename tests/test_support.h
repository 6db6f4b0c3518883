// Helpers shared by the tests: where ../shared is, and small signal tools.
#ifndef EMOSERVE_TESTS_TEST_SUPPORT_H_
#define EMOSERVE_TESTS_TEST_SUPPORT_H_

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace emoserve::testing {

// The shared data folder (env EMOSERVE_SHARED_DIR, else the configured
// default), or nullopt when it does not exist. Tests that need it call
// GTEST_SKIP() with a message in that case; when it exists, missing or wrong
// files inside are failures.
std::optional<std::string> SharedDir();

// Speech-like clips at 16 kHz for tests that must run without ../shared:
// the repository's examples/hello.wav (espeak-ng speech, 2.8 s), clip i
// louder or quieter (0 to -9 dB), starting later (i * 0.1 s of faint noise
// first) and with 0.5 s of faint noise after, so that clips differ and
// windows at their edges are silence, as in RAVDESS.
absl::StatusOr<std::vector<std::vector<float>>> SyntheticSpeechClips(size_t count);

// Runs a shell command, returning its exit status (-1 if it did not exit)
// and its stdout and stderr together.
std::pair<int, std::string> RunCommand(const std::string& command);

// A sine of `seconds` at `rate`, amplitude `amplitude`.
std::vector<float> Sine(double frequency, double amplitude, int rate,
                        double seconds);

// Audio file formats (container and encoding) that EncodeAudio can write;
// raw PCM is described by the proto's v1::AudioFormat instead.
enum class FileFormat {
  kWavPcm16,
  kWavPcm24,
  kWavPcm32,
  kWavFloat,
  kFlac,  // 16-bit.
  kOggVorbis,
  kMp3,
  kWavMuLaw,
  // Formats libsndfile writes that the decoder refuses.
  kWavImaAdpcm,
  kAu,
  kAiff,
  kCaf,
  kW64,
  kOggOpus,  // 48 kHz only
};

// Encodes interleaved float samples with libsndfile, entirely in memory
// (virtual I/O), so that decoder tests need no fixture files.
absl::StatusOr<std::string> EncodeAudio(absl::Span<const float> interleaved,
                                        int channels, int sample_rate,
                                        FileFormat format);

// The largest |a[i] - b[i]|; NaN when the sizes differ, so that every
// comparison with it fails (an empty output never "equals" a signal).
double MaxAbsDifference(absl::Span<const float> a, absl::Span<const float> b);

// Root mean square of `x` (0 when empty).
double Rms(absl::Span<const float> x);

// Amplitude of the `frequency` component of `x` (a single-bin DFT with a
// Hann window): a full-scale sine at exactly that frequency gives ~amplitude.
double ToneAmplitude(absl::Span<const float> x, double frequency, int rate);

// Frequency of a (near-)pure tone from its rising zero crossings,
// interpolated linearly; 0 when there are fewer than two crossings.
double ZeroCrossingFrequency(absl::Span<const float> x, int rate);

}  // namespace emoserve::testing

#endif  // EMOSERVE_TESTS_TEST_SUPPORT_H_
