#include "core/audio.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/resampler.h"
#include "tests/test_support.h"

namespace emoserve {
namespace {

using ::emoserve::testing::FileFormat;
using ::emoserve::testing::EncodeAudio;
using ::emoserve::testing::Rms;
using ::emoserve::testing::Sine;
using ::emoserve::testing::ZeroCrossingFrequency;
using ::testing::HasSubstr;

// --- Helpers ---------------------------------------------------------------

std::string Encode(const std::vector<float>& interleaved, int channels,
                   int rate, FileFormat format) {
  absl::StatusOr<std::string> bytes =
      EncodeAudio(interleaved, channels, rate, format);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *bytes : std::string();
}

// Left/right interleaved.
std::vector<float> Interleave(const std::vector<float>& left,
                              const std::vector<float>& right) {
  std::vector<float> out;
  for (size_t i = 0; i < left.size(); ++i) {
    out.push_back(left[i]);
    out.push_back(right[i]);
  }
  return out;
}

Audio DecodeOk(std::string_view bytes, const DecodeOptions& options = {}) {
  absl::StatusOr<Audio> audio = DecodeAudio(bytes, options);
  EXPECT_TRUE(audio.ok()) << audio.status();
  return audio.ok() ? *std::move(audio) : Audio{};
}

// Expects DecodeAudio to fail with `code` and a message containing `text`.
void ExpectDecodeError(std::string_view bytes, absl::StatusCode code,
                       const std::string& text,
                       const DecodeOptions& options = {}) {
  absl::StatusOr<Audio> audio = DecodeAudio(bytes, options);
  ASSERT_FALSE(audio.ok()) << "decoded " << audio->samples.size()
                           << " samples; expected an error containing '" << text
                           << "'";
  EXPECT_EQ(audio.status().code(), code) << audio.status();
  EXPECT_THAT(std::string(audio.status().message()), HasSubstr(text));
}

void PutLe(std::string& bytes, size_t offset, uint32_t value, int width) {
  for (int i = 0; i < width; ++i) {
    bytes[offset + i] = static_cast<char>(value >> (8 * i));
  }
}

// Offset of the size field of a WAV chunk (found by its id) / of a field in
// the fmt chunk body.
size_t WavChunkSizeOffset(const std::string& wav, const char* id) {
  const size_t pos = wav.find(id, 12);
  EXPECT_NE(pos, std::string::npos) << id;
  return pos + 4;
}
constexpr size_t kFmtChannels = 4 + 2;  // After the size: format tag.
constexpr size_t kFmtSampleRate = 4 + 4;

// Rewrites the 36-bit total-sample count in a FLAC STREAMINFO block, which
// starts at byte 8 ("fLaC" + block header); the count occupies the low
// nibble of byte 13 and bytes 14..17 of the block.
void SetFlacTotalSamples(std::string& flac, uint64_t total) {
  ASSERT_EQ(flac.substr(0, 4), "fLaC");
  const size_t at = 8 + 13;
  flac[at] = static_cast<char>((flac[at] & 0xF0) | ((total >> 32) & 0x0F));
  for (int i = 0; i < 4; ++i) {
    flac[at + 1 + i] = static_cast<char>(total >> (8 * (3 - i)));
  }
}

// Rewrites the 20-bit sample rate in STREAMINFO: bytes 10, 11 and the high
// nibble of byte 12 of the block.
void SetFlacSampleRate(std::string& flac, uint32_t rate) {
  ASSERT_EQ(flac.substr(0, 4), "fLaC");
  const size_t at = 8 + 10;
  flac[at] = static_cast<char>(rate >> 12);
  flac[at + 1] = static_cast<char>(rate >> 4);
  flac[at + 2] =
      static_cast<char>(((rate & 0x0F) << 4) | (flac[at + 2] & 0x0F));
}

std::string S16le(const std::vector<int16_t>& samples) {
  std::string out;
  for (int16_t s : samples) {
    out.push_back(static_cast<char>(s & 0xFF));
    out.push_back(static_cast<char>((static_cast<uint16_t>(s) >> 8) & 0xFF));
  }
  return out;
}

std::string F32le(const std::vector<float>& samples) {
  std::string out(samples.size() * 4, '\0');
  for (size_t i = 0; i < samples.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &samples[i], 4);
    PutLe(out, 4 * i, bits, 4);
  }
  return out;
}

DecodeOptions Raw(PcmEncoding encoding, int rate, int channels) {
  DecodeOptions options;
  options.raw = RawPcmFormat{encoding, rate, channels};
  return options;
}

DecodeOptions MaxDuration(double seconds) {
  DecodeOptions options;
  options.max_duration_seconds = seconds;
  return options;
}

// One second of a 440 Hz sine at 16 kHz, the default test signal.
constexpr int kRate = 16000;
std::vector<float> TestSignal() { return Sine(440.0, 0.5, kRate, 1.0); }

// --- Small functions -------------------------------------------------------

TEST(AudioParsePcmEncodingTest, KnownNamesParseInAnyCase) {
  EXPECT_EQ(*ParsePcmEncoding("s16le"), PcmEncoding::kS16LE);
  EXPECT_EQ(*ParsePcmEncoding("f32le"), PcmEncoding::kF32LE);
  EXPECT_EQ(*ParsePcmEncoding("S16LE"), PcmEncoding::kS16LE);
}

TEST(AudioParsePcmEncodingTest, UnknownNameIsAnError) {
  absl::StatusOr<PcmEncoding> encoding = ParsePcmEncoding("u8");
  ASSERT_FALSE(encoding.ok());
  EXPECT_EQ(encoding.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(encoding.status().message()), HasSubstr("'u8'"));
}

TEST(AudioValidateSampleRateTest, AcceptsTheInclusiveRange) {
  EXPECT_TRUE(ValidateSampleRate(8000).ok());
  EXPECT_TRUE(ValidateSampleRate(44100).ok());
  EXPECT_TRUE(ValidateSampleRate(192000).ok());
  for (int rate : {-16000, 0, 7999, 192001, 1000000}) {
    absl::Status status = ValidateSampleRate(rate);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << rate;
    EXPECT_THAT(std::string(status.message()),
                HasSubstr(std::to_string(rate) + " Hz"));
  }
}

// --- Decoding each container ------------------------------------------------

struct LosslessCase {
  FileFormat format;
  double tolerance;  // Quantisation step of the stored samples.
};

class AudioLosslessTest : public ::testing::TestWithParam<LosslessCase> {};

TEST_P(AudioLosslessTest, MonoSamplesRoundTrip) {
  const std::vector<float> signal = TestSignal();
  const Audio audio = DecodeOk(Encode(signal, 1, kRate, GetParam().format));
  EXPECT_EQ(audio.sample_rate, kRate);
  ASSERT_EQ(audio.samples.size(), signal.size());
  for (size_t i = 0; i < signal.size(); ++i) {
    ASSERT_NEAR(audio.samples[i], signal[i], GetParam().tolerance) << i;
  }
}

TEST_P(AudioLosslessTest, StereoIsAveragedToMono) {
  // Different signals per channel, so that dropping or swapping a channel
  // instead of averaging shows.
  const std::vector<float> left = Sine(440.0, 0.6, kRate, 0.5);
  const std::vector<float> right = Sine(1000.0, 0.3, kRate, 0.5);
  const Audio audio =
      DecodeOk(Encode(Interleave(left, right), 2, kRate, GetParam().format));
  ASSERT_EQ(audio.samples.size(), left.size());
  for (size_t i = 0; i < left.size(); ++i) {
    ASSERT_NEAR(audio.samples[i], (left[i] + right[i]) / 2,
                GetParam().tolerance)
        << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Formats, AudioLosslessTest,
    ::testing::Values(LosslessCase{FileFormat::kWavPcm16, 1.0 / 32768},
                      LosslessCase{FileFormat::kWavPcm24, 1.0 / (1 << 23)},
                      LosslessCase{FileFormat::kWavPcm32, 1e-7},
                      LosslessCase{FileFormat::kWavFloat, 1e-7},
                      LosslessCase{FileFormat::kFlac, 1.0 / 32768}));

class AudioLossyTest : public ::testing::TestWithParam<FileFormat> {};

TEST_P(AudioLossyTest, KeepsASinesFrequencyAndLevel) {
  constexpr int kLossyRate = 44100;
  constexpr double kAmplitude = 0.5;
  const std::vector<float> tone = Sine(1000.0, kAmplitude, kLossyRate, 1.0);
  const Audio audio =
      DecodeOk(Encode(Interleave(tone, tone), 2, kLossyRate, GetParam()));
  EXPECT_EQ(audio.sample_rate, kLossyRate);
  // Codecs may add or trim up to a frame of padding at the ends.
  EXPECT_NEAR(static_cast<double>(audio.samples.size()), tone.size(), 1152);
  ASSERT_GT(audio.samples.size(), 20000u);
  // The middle, away from encoder start-up and padding.
  const absl::Span<const float> middle =
      absl::MakeConstSpan(audio.samples).subspan(5000, 10000);
  EXPECT_NEAR(ZeroCrossingFrequency(middle, kLossyRate), 1000.0, 1.0);
  const double level_db =
      20 * std::log10(Rms(middle) / (kAmplitude / std::sqrt(2)));
  EXPECT_NEAR(level_db, 0.0, 0.5);
}

INSTANTIATE_TEST_SUITE_P(Formats, AudioLossyTest,
                         ::testing::Values(FileFormat::kOggVorbis,
                                           FileFormat::kMp3));

TEST(AudioRawPcmTest, S16leMonoIsScaledBy32768) {
  const Audio audio = DecodeOk(S16le({0, 16384, -32768, 32767, -1}),
                               Raw(PcmEncoding::kS16LE, 8000, 1));
  EXPECT_EQ(audio.sample_rate, 8000);
  EXPECT_THAT(audio.samples,
              ::testing::ElementsAre(0.0f, 0.5f, -1.0f, 32767 / 32768.0f,
                                     -1 / 32768.0f));
}

TEST(AudioRawPcmTest, S16leStereoIsAveraged) {
  const Audio audio = DecodeOk(S16le({16384, 0, -32768, 16384}),
                               Raw(PcmEncoding::kS16LE, 16000, 2));
  EXPECT_THAT(audio.samples, ::testing::ElementsAre(0.25f, -0.25f));
}

TEST(AudioRawPcmTest, F32leKeepsValues) {
  const std::vector<float> values = {0.0f, 0.125f, -0.75f, 1.5f, -1e-6f};
  const Audio audio =
      DecodeOk(F32le(values), Raw(PcmEncoding::kF32LE, 48000, 1));
  EXPECT_EQ(audio.sample_rate, 48000);
  EXPECT_EQ(audio.samples, values);
}

TEST(AudioRawPcmTest, F32leThreeChannelsAreAveraged) {
  const Audio audio = DecodeOk(F32le({0.3f, 0.6f, 0.9f, -0.3f, 0.0f, 0.0f}),
                               Raw(PcmEncoding::kF32LE, 16000, 3));
  ASSERT_EQ(audio.samples.size(), 2u);
  EXPECT_NEAR(audio.samples[0], 0.6f, 1e-7);
  EXPECT_NEAR(audio.samples[1], -0.1f, 1e-7);
}

TEST(AudioDecodeTest, WavWithStreamingDataSizeDecodesToEndOfFile) {
  // 0xFFFFFFFF is what encoders that cannot seek write: "until the end".
  std::string wav = Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  PutLe(wav, WavChunkSizeOffset(wav, "data"), 0xFFFFFFFF, 4);
  EXPECT_EQ(DecodeOk(wav).samples.size(), TestSignal().size());
}

TEST(AudioDecodeTest, FlacWithUnknownLengthDecodes) {
  // A STREAMINFO total of 0 means "unknown" (e.g. a streamed encode).
  std::string flac = Encode(TestSignal(), 1, kRate, FileFormat::kFlac);
  SetFlacTotalSamples(flac, 0);
  EXPECT_EQ(DecodeOk(flac).samples.size(), TestSignal().size());
}

TEST(AudioDecodeTest, AcceptsTheRateLimits) {
  for (int rate : {kMinSampleRate, kMaxSampleRate}) {
    const Audio audio =
        DecodeOk(Encode(TestSignal(), 1, rate, FileFormat::kWavPcm16));
    EXPECT_EQ(audio.sample_rate, rate);
  }
}

// --- Files ------------------------------------------------------------------

TEST(AudioRavdessTest, DecodesARealFlac) {
  const std::optional<std::string> shared = emoserve::testing::SharedDir();
  if (!shared.has_value()) {
    GTEST_SKIP() << "shared data folder not found; set EMOSERVE_SHARED_DIR";
  }
  const std::string path =
      *shared + "/datasets/ravdess/Actor_01/03-01-01-01-01-01-01.flac";
  absl::StatusOr<Audio> audio = DecodeAudioFile(path);
  ASSERT_TRUE(audio.ok()) << audio.status();
  EXPECT_EQ(audio->sample_rate, 16000);
  EXPECT_NEAR(audio->duration_seconds(), 3.3033, 1e-3);  // Per manifest.tsv.
  // Speech, not silence, and in range.
  EXPECT_GT(Rms(audio->samples), 1e-3);
  for (float s : audio->samples) ASSERT_LE(std::abs(s), 1.0f);
  // The file path and the in-memory path agree.
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(DecodeOk(*bytes).samples, audio->samples);
}

class AudioFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("emoserve_audio_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(AudioFileTest, ReadsBytesAndDecodes) {
  const std::string wav =
      Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  const std::string path = dir_ / "tone.wav";
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(wav.data(), 1, wav.size(), f);
    std::fclose(f);
  }
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, wav);
  absl::StatusOr<Audio> audio = DecodeAudioFile(path);
  ASSERT_TRUE(audio.ok()) << audio.status();
  EXPECT_EQ(audio->samples.size(), TestSignal().size());
}

TEST_F(AudioFileTest, MissingFileIsNotFound) {
  const std::string path = dir_ / "missing.wav";
  EXPECT_EQ(ReadFileBytes(path).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(DecodeAudioFile(path).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(AudioFileTest, DirectoryIsInvalid) {
  EXPECT_EQ(ReadFileBytes(dir_).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(AudioFileTest, DecodeErrorNamesTheFile) {
  const std::string path = dir_ / "empty.wav";
  std::fclose(std::fopen(path.c_str(), "wb"));
  absl::StatusOr<Audio> audio = DecodeAudioFile(path);
  ASSERT_FALSE(audio.ok());
  EXPECT_THAT(std::string(audio.status().message()), HasSubstr(path));
}

// --- Bad input ---------------------------------------------------------------

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
constexpr absl::StatusCode kOutOfRange = absl::StatusCode::kOutOfRange;

TEST(AudioBadInputTest, EmptyBytesAreInvalidArgument) {
  ExpectDecodeError("", kInvalid, "empty");
  ExpectDecodeError("", kInvalid, "empty", Raw(PcmEncoding::kS16LE, 16000, 1));
}

TEST(AudioBadInputTest, RandomBytesAreRefusedAsUndecodable) {
  std::mt19937 rng(42);
  for (size_t size : {1, 3, 64, 1000, 100000}) {
    std::string bytes(size, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    ExpectDecodeError(bytes, kInvalid, "could not decode audio");
  }
}

TEST(AudioBadInputTest, TextIsRefusedNamingTheExpectedFormats) {
  ExpectDecodeError("{\"audio\": \"hello\"}", kInvalid, "expected WAV, FLAC");
}

TEST(AudioBadInputTest, TruncatedWavReportsDeclaredAndPresentFrames) {
  const std::string wav =
      Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  const size_t header = WavChunkSizeOffset(wav, "data") + 4;
  const std::string half = wav.substr(0, wav.size() / 2);
  const size_t present = (half.size() - header) / 2;
  ExpectDecodeError(half, kInvalid,
                    "header declares 16000 frames but only " +
                        std::to_string(present) + " are present");
}

TEST(AudioBadInputTest, TruncatedWavOfEverySampleWidthReportsTheMissingFrame) {
  for (FileFormat format : {FileFormat::kWavPcm24, FileFormat::kWavPcm32,
                             FileFormat::kWavFloat}) {
    const std::string wav = Encode(TestSignal(), 2 /*channels*/, kRate, format);
    ExpectDecodeError(wav.substr(0, wav.size() - 1), kInvalid,
                      "header declares 8000 frames but only 7999 are present");
  }
}

TEST(AudioBadInputTest, WavHeaderWithoutDataReportsNoFramesPresent) {
  const std::string wav =
      Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  ExpectDecodeError(wav.substr(0, WavChunkSizeOffset(wav, "data") + 4),
                    kInvalid, "declares 16000 frames but only 0 are present");
}

TEST(AudioBadInputTest, WavDataSizeLargerThanTheDataReportsBothFrameCounts) {
  // Complete data, but the header claims twice as much.
  std::string wav = Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  PutLe(wav, WavChunkSizeOffset(wav, "data"), 64000, 4);
  ExpectDecodeError(wav, kInvalid,
                    "declares 32000 frames but only 16000 are present");
}

TEST(AudioBadInputTest, WavWithNoSamplesIsRefused) {
  const std::string wav = Encode({}, 1, kRate, FileFormat::kWavPcm16);
  ExpectDecodeError(wav, kInvalid, "no samples");
}

TEST(AudioBadInputTest, TruncatedFlacReportsTheDeclaredFrames) {
  const std::string flac = Encode(TestSignal(), 1, kRate, FileFormat::kFlac);
  ExpectDecodeError(flac.substr(0, flac.size() / 2), kInvalid,
                    "header declares 16000 frames but only");
  ExpectDecodeError(flac.substr(0, flac.size() - 1), kInvalid,
                    "header declares 16000 frames but only");
}

TEST(AudioBadInputTest, FlacClaimingMoreSamplesThanItHasReportsBothCounts) {
  std::string flac = Encode(TestSignal(), 1, kRate, FileFormat::kFlac);
  SetFlacTotalSamples(flac, 20000);
  ExpectDecodeError(flac, kInvalid,
                    "header declares 20000 frames but only 16000 are present");
}

TEST(AudioBadInputTest, TruncatedOggIsRefusedAsTruncated) {
  const std::string ogg =
      Encode(TestSignal(), 1, kRate, FileFormat::kOggVorbis);
  ExpectDecodeError(ogg.substr(0, ogg.size() / 2), kInvalid, "truncated");
  ExpectDecodeError(ogg.substr(0, ogg.size() - 1), kInvalid, "truncated");
}

TEST(AudioBadInputTest, OggCutInsideItsHeaderPagesIsRefused) {
  // libsndfile would leak memory on these; DecodeAudio refuses them first.
  const std::string ogg =
      Encode(TestSignal(), 1, kRate, FileFormat::kOggVorbis);
  for (size_t size : {28, 58, 100, 1000, 3000}) {
    ExpectDecodeError(ogg.substr(0, size), kInvalid,
                      "the file ends inside the header pages");
  }
}

TEST(AudioBadInputTest, OggHeaderPageWithAFlippedByteFailsItsChecksum) {
  std::string ogg = Encode(TestSignal(), 1, kRate, FileFormat::kOggVorbis);
  ogg[200] ^= 0x10;  // Inside the comment/setup header page.
  ExpectDecodeError(ogg, kInvalid, "a header page fails its checksum");
}

TEST(AudioBadInputTest, TruncatedMp3DecodesTheCompleteFrames) {
  // MP3 has no reliable length field (mpg123 may estimate it from the file
  // size), so a cut stream decodes to the frames that survive, like a
  // player would, instead of failing.
  const std::vector<float> tone = Sine(1000.0, 0.5, 44100, 1.0);
  const std::string mp3 = Encode(tone, 1, 44100, FileFormat::kMp3);
  const Audio audio = DecodeOk(mp3.substr(0, mp3.size() / 2));
  EXPECT_GT(audio.samples.size(), tone.size() / 4);
  EXPECT_LT(audio.samples.size(), tone.size() * 3 / 4);
}

TEST(AudioBadInputTest, EveryFormatCutToAFewBytesIsInvalidArgument) {
  for (FileFormat format :
       {FileFormat::kWavPcm16, FileFormat::kWavFloat, FileFormat::kFlac,
        FileFormat::kOggVorbis, FileFormat::kMp3}) {
    const std::string bytes = Encode(TestSignal(), 1, kRate, format);
    for (size_t size : {1, 4, 12, 40, 100}) {
      SCOPED_TRACE(::testing::Message() << "format " << static_cast<int>(format)
                                        << ", " << size << " bytes");
      absl::StatusOr<Audio> audio = DecodeAudio(bytes.substr(0, size));
      EXPECT_EQ(audio.status().code(), kInvalid) << audio.status();
    }
  }
}

TEST(AudioBadInputTest, NanInFloatWavNamesTheSample) {
  std::vector<float> signal = TestSignal();
  signal[1234] = std::numeric_limits<float>::quiet_NaN();
  ExpectDecodeError(Encode(signal, 1, kRate, FileFormat::kWavFloat), kInvalid,
                    "NaN) at sample index 1234 (channel 0)");
}

TEST(AudioBadInputTest, InfInStereoFloatWavNamesTheSampleAndChannel) {
  std::vector<float> signal = Interleave(TestSignal(), TestSignal());
  signal[2 * 5000 + 1] = -std::numeric_limits<float>::infinity();
  ExpectDecodeError(Encode(signal, 2, kRate, FileFormat::kWavFloat), kInvalid,
                    "Inf) at sample index 5000 (channel 1)");
}

TEST(AudioBadInputTest, NanInRawF32leNamesTheSample) {
  // Past the first chunk of the decoder, so the index is not chunk-relative.
  std::vector<float> signal = TestSignal();
  signal[9000] = std::numeric_limits<float>::quiet_NaN();
  ExpectDecodeError(F32le(signal), kInvalid, "NaN) at sample index 9000",
                    Raw(PcmEncoding::kF32LE, kRate, 1));
}

TEST(AudioBadInputTest, SampleRateOutOfRangeIsRefusedInWavAndFlac) {
  for (int rate : {4000, 7999, 192001, 384000}) {
    // From our WAV header check.
    ExpectDecodeError(Encode(TestSignal(), 1, rate, FileFormat::kWavPcm16),
                      kInvalid, "sample rate " + std::to_string(rate) + " Hz");
    // From the rate libsndfile reports for other containers.
    std::string flac = Encode(TestSignal(), 1, kRate, FileFormat::kFlac);
    SetFlacSampleRate(flac, rate);
    ExpectDecodeError(flac, kInvalid,
                      "sample rate " + std::to_string(rate) + " Hz");
  }
}

TEST(AudioBadInputTest, WavHeaderWithZeroSampleRateIsRefused) {
  std::string wav = Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  PutLe(wav, WavChunkSizeOffset(wav, "fmt ") + kFmtSampleRate, 0, 4);
  ExpectDecodeError(wav, kInvalid, "sample rate 0 Hz");
}

TEST(AudioBadInputTest, WavHeaderWithZeroOrTooManyChannelsIsRefused) {
  std::string wav = Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  PutLe(wav, WavChunkSizeOffset(wav, "fmt ") + kFmtChannels, 0, 2);
  ExpectDecodeError(wav, kInvalid, "0 channels");
  PutLe(wav, WavChunkSizeOffset(wav, "fmt ") + kFmtChannels, 65535, 2);
  ExpectDecodeError(wav, kInvalid, "65535 channels");
}

TEST(AudioBadInputTest, OggWithTooManyChannelsIsRefused) {
  // A genuine 65-channel file, rejected after libsndfile opens it.
  const std::vector<float> frames(65 * 100, 0.1f);
  ExpectDecodeError(Encode(frames, 65, kRate, FileFormat::kOggVorbis),
                    kInvalid, "65 channels");
}

TEST(AudioBadInputTest, RawPcmWithBadChannelCountOrRateIsRefused) {
  const std::string bytes = S16le(std::vector<int16_t>(100, 0));
  ExpectDecodeError(bytes, kInvalid, "0 channels",
                    Raw(PcmEncoding::kS16LE, kRate, 0));
  ExpectDecodeError(bytes, kInvalid, "65 channels",
                    Raw(PcmEncoding::kS16LE, kRate, 65));
  ExpectDecodeError(bytes, kInvalid, "sample rate 0 Hz",
                    Raw(PcmEncoding::kS16LE, 0, 1));
  ExpectDecodeError(bytes, kInvalid, "sample rate 1000000 Hz",
                    Raw(PcmEncoding::kS16LE, 1000000, 1));
}

TEST(AudioBadInputTest, RawPcmEndingInAPartialFrameIsRefused) {
  ExpectDecodeError(std::string(3, '\0'), kInvalid,
                    "multiple of 2 bytes (one frame); got 3 bytes",
                    Raw(PcmEncoding::kS16LE, kRate, 1));
  ExpectDecodeError(std::string(6, '\0'), kInvalid,
                    "multiple of 4 bytes (one frame); got 6 bytes",
                    Raw(PcmEncoding::kS16LE, kRate, 2));
  ExpectDecodeError(std::string(10, '\0'), kInvalid,
                    "multiple of 8 bytes (one frame); got 10 bytes",
                    Raw(PcmEncoding::kF32LE, kRate, 2));
}

TEST(AudioBadInputTest, DamagedFilesGiveAnErrorOrAudioNeverACrash) {
  // Random cuts and byte flips of every format; run under the sanitizers
  // this also catches out-of-bounds reads and leaks in the decode paths.
  std::mt19937 rng(2024);
  for (FileFormat format :
       {FileFormat::kWavPcm16, FileFormat::kWavFloat, FileFormat::kFlac,
        FileFormat::kOggVorbis, FileFormat::kMp3}) {
    const std::string original = Encode(TestSignal(), 1, kRate, format);
    for (int trial = 0; trial < 40; ++trial) {
      std::string bytes = original.substr(0, rng() % original.size() + 1);
      const int flips = trial % 4;
      for (int i = 0; i < flips; ++i) {
        bytes[rng() % bytes.size()] ^= static_cast<char>(1 << (rng() % 8));
      }
      absl::StatusOr<Audio> audio = DecodeAudio(bytes);
      if (audio.ok()) {
        EXPECT_EQ(audio->sample_rate, kRate);
        for (float s : audio->samples) ASSERT_TRUE(std::isfinite(s));
      } else {
        // kOutOfRange where a flipped bit inflates a declared length.
        EXPECT_THAT(audio.status().code(),
                    ::testing::AnyOf(kInvalid, kOutOfRange))
            << audio.status();
      }
    }
  }
}

TEST(AudioBadInputTest, AbsurdFiniteSamplesAreRefused) {
  // 1e30 is finite, but its power overflows float in the features.
  std::vector<float> signal = TestSignal();
  signal[777] = 1e30f;
  ExpectDecodeError(F32le(signal), kInvalid,
                    "sample of 1e+30 at sample index 777 (channel 0), beyond +-1000",
                    Raw(PcmEncoding::kF32LE, kRate, 1));
  ExpectDecodeError(Encode(signal, 1, kRate, FileFormat::kWavFloat), kInvalid,
                    "at sample index 777 (channel 0), beyond +-1000");
  // Loud but plausible float audio (+20 dB over full scale) is accepted.
  signal[777] = 10.0f;
  EXPECT_EQ(DecodeOk(F32le(signal), Raw(PcmEncoding::kF32LE, kRate, 1))
                .samples[777],
            10.0f);
  EXPECT_TRUE(CheckSamples(signal).ok());
  signal[5] = -2000.0f;
  EXPECT_THAT(std::string(CheckSamples(signal, 100).message()),
              HasSubstr("sample of -2000 at sample index 105"));
}

// --- The allow-list ------------------------------------------------------------

TEST(AudioAllowListTest, OtherContainersLibsndfileKnowsAreRefusedByName) {
  const struct {
    FileFormat format;
    const char* name;
  } kRefused[] = {{FileFormat::kAu, "AU (Sun/NeXT) files are not accepted"},
                  {FileFormat::kAiff, "AIFF files are not accepted"},
                  {FileFormat::kCaf, "CAF files are not accepted"},
                  {FileFormat::kW64, "Sony Wave64 files are not accepted"}};
  for (const auto& refused : kRefused) {
    SCOPED_TRACE(refused.name);
    ExpectDecodeError(Encode(TestSignal(), 1, kRate, refused.format), kInvalid,
                      refused.name);
  }
}

TEST(AudioAllowListTest, OggOfAnotherCodecIsRefused) {
  const std::vector<float> tone = Sine(440.0, 0.5, 48000, 1.0);
  ExpectDecodeError(Encode(tone, 1, 48000, FileFormat::kOggOpus), kInvalid,
                    "holds another codec than Vorbis");
}

TEST(AudioAllowListTest, WavCodecsOtherThanPcmFloatAndG711AreRefused) {
  ExpectDecodeError(Encode(TestSignal(), 1, kRate, FileFormat::kWavImaAdpcm),
                    kInvalid, "WAV encoding 0x0011 is not supported");
  // mu-law (telephony) is accepted.
  const Audio audio =
      DecodeOk(Encode(TestSignal(), 1, kRate, FileFormat::kWavMuLaw));
  EXPECT_EQ(audio.samples.size(), TestSignal().size());
  EXPECT_LT(emoserve::testing::MaxAbsDifference(audio.samples, TestSignal()),
            0.02);
}

TEST(AudioAllowListTest, Id3TaggedFlacAndMp3AreAccepted) {
  // ID3v2 tag of 20 bytes of padding in front of the file.
  const std::string tag =
      std::string("ID3\x04\x00\x00\x00\x00\x00\x14", 10) + std::string(20, '\0');
  const Audio flac =
      DecodeOk(tag + Encode(TestSignal(), 1, kRate, FileFormat::kFlac));
  EXPECT_EQ(flac.samples.size(), TestSignal().size());
  const std::vector<float> tone = Sine(1000.0, 0.5, 44100, 1.0);
  const Audio mp3 = DecodeOk(tag + Encode(tone, 1, 44100, FileFormat::kMp3));
  EXPECT_NEAR(static_cast<double>(mp3.samples.size()), tone.size(), 1152);
  // A tag in front of anything else is not enough.
  ExpectDecodeError(tag + "not audio at all", kInvalid, "unrecognised format");
}

// --- Resampling while decoding ---------------------------------------------------

// Decoding straight to another rate gives what decoding, then resampling
// the whole signal, gives.
TEST(AudioResampleTest, DecodingToTheModelRateMatchesResamplingAfterwards) {
  const struct {
    FileFormat format;
    int rate;
    int channels;
  } kCases[] = {{FileFormat::kWavPcm16, 48000, 2},
                {FileFormat::kFlac, 44100, 1},
                {FileFormat::kWavFloat, 192000, 1},
                {FileFormat::kWavPcm16, 8000, 1},
                {FileFormat::kOggVorbis, 22050, 1}};
  for (const auto& c : kCases) {
    SCOPED_TRACE(::testing::Message() << c.rate << " Hz, format "
                                      << static_cast<int>(c.format));
    std::vector<float> interleaved;
    for (float x : Sine(330.0, 0.4, c.rate, 2.5)) {
      for (int ch = 0; ch < c.channels; ++ch) interleaved.push_back(x);
    }
    const std::string bytes = Encode(interleaved, c.channels, c.rate, c.format);
    const Audio source = DecodeOk(bytes);
    absl::StatusOr<std::vector<float>> expected =
        Resample(source.samples, source.sample_rate, kRate);
    ASSERT_TRUE(expected.ok()) << expected.status();
    DecodeOptions options;
    options.output_sample_rate = kRate;
    const Audio audio = DecodeOk(bytes, options);
    EXPECT_EQ(audio.sample_rate, kRate);
    EXPECT_EQ(audio.source_sample_rate, c.rate);
    EXPECT_EQ(audio.source_samples, static_cast<int64_t>(source.samples.size()));
    EXPECT_DOUBLE_EQ(audio.duration_seconds(), source.duration_seconds());
    ASSERT_EQ(audio.samples.size(), expected->size());
    EXPECT_LT(emoserve::testing::MaxAbsDifference(audio.samples, *expected), 1e-6);
  }
  // Raw PCM too.
  const std::vector<float> tone = Sine(330.0, 0.4, 48000, 1.0);
  DecodeOptions options = Raw(PcmEncoding::kF32LE, 48000, 1);
  options.output_sample_rate = kRate;
  const Audio audio = DecodeOk(F32le(tone), options);
  absl::StatusOr<std::vector<float>> expected = Resample(tone, 48000, kRate);
  ASSERT_TRUE(expected.ok());
  ASSERT_EQ(audio.samples.size(), expected->size());
  EXPECT_LT(emoserve::testing::MaxAbsDifference(audio.samples, *expected), 1e-6);
}

// The buffer a decode holds is its result at the output rate: every
// allocation goes through `reserve`, and a long 192 kHz clip never reserves
// more than its 16 kHz result plus a little.
TEST(AudioResampleTest, ReservesOnlyTheResultAtTheOutputRate) {
  const std::vector<float> tone = Sine(330.0, 0.4, 192000, 20.0);
  for (FileFormat format : {FileFormat::kWavPcm16, FileFormat::kFlac}) {
    SCOPED_TRACE(static_cast<int>(format));
    const std::string bytes = Encode(tone, 1, 192000, format);
    std::vector<size_t> reserved;
    DecodeOptions options;
    options.output_sample_rate = kRate;
    options.reserve = [&](size_t capacity) {
      reserved.push_back(capacity);
      return absl::OkStatus();
    };
    const Audio audio = DecodeOk(bytes, options);
    ASSERT_FALSE(reserved.empty());
    // One exact reservation from the header, never grown.
    EXPECT_EQ(reserved.size(), 1u);
    EXPECT_LE(reserved.back(), audio.samples.size() + 64);
    EXPECT_GE(reserved.back(), audio.samples.size());
    EXPECT_EQ(audio.samples.capacity(), reserved.back());
  }
}

TEST(AudioResampleTest, UnknownLengthsGrowByHalvesWithinTheLimit) {
  std::string flac =
      Encode(Sine(330.0, 0.4, kRate, 10.0), 1, kRate, FileFormat::kFlac);
  SetFlacTotalSamples(flac, 0);
  std::vector<size_t> reserved;
  DecodeOptions options = MaxDuration(12.0);
  options.reserve = [&](size_t capacity) {
    reserved.push_back(capacity);
    return absl::OkStatus();
  };
  const Audio audio = DecodeOk(flac, options);
  EXPECT_EQ(audio.samples.size(), 10u * kRate);
  ASSERT_GT(reserved.size(), 2u);
  for (size_t i = 1; i < reserved.size(); ++i) {
    // Half again, or the block that did not fit.
    EXPECT_LE(reserved[i],
              std::max<size_t>(reserved[i - 1] * 3 / 2 + 1, reserved[i - 1] + 4096))
        << i;
  }
  // Never past what the 12 s limit allows.
  EXPECT_LE(reserved.back(), 12u * kRate);
}

TEST(AudioResampleTest, AReservationRefusedStopsTheDecode) {
  DecodeOptions options;
  options.output_sample_rate = kRate;
  options.reserve = [](size_t capacity) {
    return absl::ResourceExhaustedError(absl::StrCat("no room for ", capacity));
  };
  // A third of a second at 48 kHz: 5334 samples at 16 kHz, plus slack.
  ExpectDecodeError(Encode(TestSignal(), 1, 48000, FileFormat::kWavPcm16),
                    absl::StatusCode::kResourceExhausted, "no room for 5398",
                    options);
}

TEST(AudioResampleTest, KeepGoingIsAskedBetweenBlocks) {
  const std::string wav =
      Encode(Sine(330.0, 0.4, 48000, 5.0), 1, 48000, FileFormat::kWavPcm16);
  int calls = 0;
  DecodeOptions options;
  options.keep_going = [&] {
    return ++calls < 10 ? absl::OkStatus()
                        : absl::CancelledError("the client cancelled");
  };
  ExpectDecodeError(wav, absl::StatusCode::kCancelled, "the client cancelled",
                    options);
  EXPECT_EQ(calls, 10);
  ExpectDecodeError(F32le(Sine(330.0, 0.4, 48000, 5.0)),
                    absl::StatusCode::kCancelled, "the client cancelled", [&] {
                      calls = 0;
                      DecodeOptions raw = Raw(PcmEncoding::kF32LE, 48000, 1);
                      raw.keep_going = options.keep_going;
                      return raw;
                    }());
}

TEST(AudioResampleTest, AudioTooShortToMakeASampleIsRefused) {
  DecodeOptions options = Raw(PcmEncoding::kS16LE, 192000, 1);
  options.output_sample_rate = kRate;
  ExpectDecodeError(S16le({100, 200, 300, 400}), kInvalid,
                    "the audio is too short: 4 samples at 192000 Hz make none at 16000 Hz",
                    options);
}

TEST(AudioResampleTest, BadOutputRateIsRefused) {
  DecodeOptions options;
  options.output_sample_rate = 1000;
  ExpectDecodeError(Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16),
                    kInvalid, "sample rate 1000 Hz", options);
}

// --- Duration limit ---------------------------------------------------------

TEST(AudioDurationTest, LongerThanTheLimitIsOutOfRange) {
  const std::vector<float> two_seconds = Sine(440.0, 0.5, kRate, 2.0);
  for (FileFormat format : {FileFormat::kWavPcm16, FileFormat::kFlac,
                             FileFormat::kOggVorbis, FileFormat::kMp3}) {
    ExpectDecodeError(Encode(two_seconds, 1, kRate, format), kOutOfRange,
                      "the limit is 1.5 s", MaxDuration(1.5));
  }
  ExpectDecodeError(S16le(std::vector<int16_t>(2 * kRate, 0)), kOutOfRange,
                    "audio is 2 s long; the limit is 1.5 s", [] {
                      DecodeOptions options =
                          Raw(PcmEncoding::kS16LE, kRate, 1);
                      options.max_duration_seconds = 1.5;
                      return options;
                    }());
}

TEST(AudioDurationTest, ExactlyTheLimitIsAccepted) {
  const Audio audio = DecodeOk(
      Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16), MaxDuration(1.0));
  EXPECT_DOUBLE_EQ(audio.duration_seconds(), 1.0);
}

TEST(AudioDurationTest, CheckedFromTheHeaderBeforeDecoding) {
  // One second of data whose STREAMINFO claims ten hours: rejected as too
  // long from the header alone.
  std::string flac = Encode(TestSignal(), 1, kRate, FileFormat::kFlac);
  SetFlacTotalSamples(flac, uint64_t{10} * 3600 * kRate);
  ExpectDecodeError(flac, kOutOfRange, "audio is 36000 s long");
}

TEST(AudioDurationTest, EnforcedWhileDecodingWhenTheLengthIsUnknown) {
  std::string flac =
      Encode(Sine(440.0, 0.5, kRate, 2.0), 1, kRate, FileFormat::kFlac);
  SetFlacTotalSamples(flac, 0);
  ExpectDecodeError(flac, kOutOfRange, "longer than the limit of 1.5 s",
                    MaxDuration(1.5));
}

TEST(AudioDurationTest, ZeroNegativeOrNanLimitIsInvalidArgument) {
  const std::string wav =
      Encode(TestSignal(), 1, kRate, FileFormat::kWavPcm16);
  for (double limit : {0.0, -1.0, std::nan("")}) {
    ExpectDecodeError(wav, kInvalid, "max_duration_seconds",
                      MaxDuration(limit));
  }
}

// The comparison helper the decoder tests rely on: outputs of another size
// fail every comparison instead of being compared on their common prefix.
TEST(TestSupportTest, MaxAbsDifferenceOfDifferentSizesFailsEveryComparison) {
  const std::vector<float> signal = {0.5f, -0.25f};
  EXPECT_EQ(emoserve::testing::MaxAbsDifference(signal, signal), 0.0);
  EXPECT_EQ(emoserve::testing::MaxAbsDifference(signal, {0.5f, 0.25f}), 0.5);
  const double empty = emoserve::testing::MaxAbsDifference({}, signal);
  EXPECT_TRUE(std::isnan(empty));
  EXPECT_FALSE(empty < 1.0);
  EXPECT_FALSE(empty > 0.0);
  EXPECT_TRUE(std::isnan(emoserve::testing::MaxAbsDifference({0.5f}, signal)));
}

}  // namespace
}  // namespace emoserve
