#include "core/resampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/test_support.h"

namespace emoserve {
namespace {

using ::emoserve::testing::Rms;
using ::emoserve::testing::Sine;
using ::emoserve::testing::ToneAmplitude;
using ::emoserve::testing::ZeroCrossingFrequency;

struct Rates {
  int from;
  int to;
};

// Test names like "48000To16000" instead of the bytes of the struct.
std::string RatesName(const ::testing::TestParamInfo<Rates>& info) {
  return std::to_string(info.param.from) + "To" + std::to_string(info.param.to);
}

std::vector<float> ResampleOk(const std::vector<float>& input, Rates rates) {
  absl::StatusOr<std::vector<float>> output =
      Resample(input, rates.from, rates.to);
  EXPECT_TRUE(output.ok()) << output.status();
  return output.ok() ? *std::move(output) : std::vector<float>();
}

// The signal without its first and last 10%, where the filter's start-up
// and end padding live.
absl::Span<const float> Middle(const std::vector<float>& x) {
  return absl::MakeConstSpan(x).subspan(x.size() / 10, x.size() * 8 / 10);
}

double Db(double ratio) { return 20.0 * std::log10(ratio); }

class ResamplerToneTest : public ::testing::TestWithParam<Rates> {};

TEST_P(ResamplerToneTest, KeepsFrequencyLevelAndTiming) {
  const Rates rates = GetParam();
  constexpr double kFrequency = 1000.0;
  constexpr double kAmplitude = 0.5;
  const std::vector<float> input =
      Sine(kFrequency, kAmplitude, rates.from, 1.0);
  const std::vector<float> output = ResampleOk(input, rates);
  // One second in, one second out.
  EXPECT_NEAR(static_cast<double>(output.size()), rates.to, 1.0);

  const absl::Span<const float> middle = Middle(output);
  EXPECT_NEAR(ZeroCrossingFrequency(middle, rates.to), kFrequency, 0.05);
  EXPECT_NEAR(Db(Rms(middle) / (kAmplitude / std::sqrt(2.0))), 0.0, 0.1);
  // No delay: the output is the same sine sampled at the new rate.
  const std::vector<float> ideal = Sine(kFrequency, kAmplitude, rates.to, 1.0);
  for (size_t i = output.size() / 10; i < output.size() * 9 / 10; ++i) {
    ASSERT_NEAR(output[i], ideal[i], 1e-5) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Rates, ResamplerToneTest,
                         ::testing::Values(Rates{48000, 16000},
                                           Rates{44100, 16000},
                                           Rates{8000, 16000},
                                           Rates{22050, 48000}),
                         RatesName);

struct AliasCase {
  Rates rates;
  double frequency;  // Above the new Nyquist frequency.
};

class ResamplerAntiAliasTest : public ::testing::TestWithParam<AliasCase> {};

TEST_P(ResamplerAntiAliasTest, RemovesToneAboveTheNewNyquist) {
  const AliasCase& c = GetParam();
  const std::vector<float> input = Sine(c.frequency, 0.5, c.rates.from, 1.0);
  const std::vector<float> output = ResampleOk(input, c.rates);
  ASSERT_FALSE(output.empty());
  // Whatever remains (including aliases at any frequency) is >= 60 dB down.
  EXPECT_LT(Db(Rms(Middle(output)) / Rms(input)), -60.0);
  // And where the alias would land, specifically.
  const double alias = c.rates.to - c.frequency;
  EXPECT_LT(Db(ToneAmplitude(Middle(output), alias, c.rates.to) / 0.5), -60.0);
}

INSTANTIATE_TEST_SUITE_P(Rates, ResamplerAntiAliasTest,
                         ::testing::Values(AliasCase{{48000, 16000}, 10000.0},
                                           AliasCase{{44100, 16000}, 9000.0}));

TEST(ResamplerTest, SameRateReturnsTheInput) {
  const std::vector<float> input = Sine(440.0, 0.5, 16000, 0.1);
  EXPECT_EQ(ResampleOk(input, {16000, 16000}), input);
}

TEST(ResamplerTest, EmptyInputGivesEmptyOutput) {
  EXPECT_TRUE(ResampleOk({}, {48000, 16000}).empty());
}

TEST(ResamplerTest, InvalidRatesAreErrors) {
  const std::vector<float> input(100, 0.0f);
  for (Rates rates : {Rates{0, 16000}, Rates{48000, 0}, Rates{-8000, 16000},
                      Rates{7999, 16000}, Rates{16000, 192001}}) {
    absl::StatusOr<std::vector<float>> output =
        Resample(input, rates.from, rates.to);
    EXPECT_EQ(output.status().code(), absl::StatusCode::kInvalidArgument)
        << rates.from << " -> " << rates.to;
    EXPECT_EQ(StreamResampler::Create(rates.from, rates.to).status().code(),
              absl::StatusCode::kInvalidArgument)
        << rates.from << " -> " << rates.to;
  }
}

// --- Streaming ---------------------------------------------------------------

// Feeds `input` to a fresh StreamResampler in chunks of the sizes that
// `next_size` returns, then flushes.
template <typename NextSize>
std::vector<float> Stream(const std::vector<float>& input, Rates rates,
                          NextSize next_size) {
  absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
      StreamResampler::Create(rates.from, rates.to);
  EXPECT_TRUE(resampler.ok()) << resampler.status();
  if (!resampler.ok()) return {};
  std::vector<float> output;
  for (size_t pos = 0; pos < input.size();) {
    const size_t n = std::min(next_size(), input.size() - pos);
    absl::Status s =
        (*resampler)
            ->Process(absl::MakeConstSpan(input).subspan(pos, n), &output);
    EXPECT_TRUE(s.ok()) << s;
    pos += n;
  }
  absl::Status s = (*resampler)->Flush(&output);
  EXPECT_TRUE(s.ok()) << s;
  return output;
}

void ExpectClose(const std::vector<float>& actual,
                 const std::vector<float>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_NEAR(actual[i], expected[i], 1e-6) << i;
  }
}

// Speech-like test input: a chirp plus noise, so every sample matters.
std::vector<float> StreamInput(int rate) {
  std::mt19937 rng(7);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  std::vector<float> x(rate / 2);
  for (size_t i = 0; i < x.size(); ++i) {
    const double t = static_cast<double>(i) / rate;
    x[i] = 0.4f * std::sin(2 * M_PI * (200 + 3000 * t) * t) + noise(rng);
  }
  return x;
}

class ResamplerStreamTest : public ::testing::TestWithParam<Rates> {};

TEST_P(ResamplerStreamTest, FixedChunkSizesMatchOneShot) {
  const std::vector<float> input = StreamInput(GetParam().from);
  const std::vector<float> expected = ResampleOk(input, GetParam());
  for (size_t size : {1, 2, 7, 160, 441, 4096, 1 << 20}) {
    SCOPED_TRACE(::testing::Message() << "chunks of " << size);
    ExpectClose(Stream(input, GetParam(), [size] { return size; }), expected);
  }
}

TEST_P(ResamplerStreamTest, RandomChunkSizesIncludingEmptyMatchOneShot) {
  const std::vector<float> input = StreamInput(GetParam().from);
  const std::vector<float> expected = ResampleOk(input, GetParam());
  std::mt19937 rng(1);
  // A third of the chunks are empty.
  std::uniform_int_distribution<size_t> size(0, 500);
  size_t calls = 0;
  ExpectClose(Stream(input, GetParam(),
                     [&] {
                       ++calls;
                       return rng() % 3 == 0 ? size_t{0} : size(rng);
                     }),
              expected);
  EXPECT_GT(calls, 20u);
}

TEST_P(ResamplerStreamTest, EmptyChunksProduceNothing) {
  absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
      StreamResampler::Create(GetParam().from, GetParam().to);
  ASSERT_TRUE(resampler.ok()) << resampler.status();
  std::vector<float> output;
  ASSERT_TRUE((*resampler)->Process({}, &output).ok());
  EXPECT_TRUE(output.empty());
  // An empty chunk is not end of stream: input after it is still accepted.
  const std::vector<float> input = StreamInput(GetParam().from);
  ASSERT_TRUE((*resampler)->Process(input, &output).ok());
  ASSERT_TRUE((*resampler)->Flush(&output).ok());
  ExpectClose(output, ResampleOk(input, GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Rates, ResamplerStreamTest,
                         ::testing::Values(Rates{48000, 16000},
                                           Rates{44100, 16000},
                                           Rates{8000, 16000},
                                           Rates{16000, 16000}),
                         RatesName);

TEST(StreamResamplerTest, SameRateStreamPassesTheSignalThrough) {
  const std::vector<float> input = StreamInput(16000);
  const std::vector<float> output =
      Stream(input, {16000, 16000}, [] { return size_t{333}; });
  ASSERT_EQ(output.size(), input.size());
  for (size_t i = 0; i < input.size(); ++i) {
    ASSERT_NEAR(output[i], input[i], 1e-4) << i;
  }
}

TEST(StreamResamplerTest, FromAndToRatesAreTheOnesItWasCreatedWith) {
  absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
      StreamResampler::Create(44100, 16000);
  ASSERT_TRUE(resampler.ok()) << resampler.status();
  EXPECT_EQ((*resampler)->from_rate(), 44100);
  EXPECT_EQ((*resampler)->to_rate(), 16000);
}

TEST(StreamResamplerTest, ProcessOrFlushAfterFlushFailsAndAddsNothing) {
  absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
      StreamResampler::Create(48000, 16000);
  ASSERT_TRUE(resampler.ok()) << resampler.status();
  std::vector<float> output;
  ASSERT_TRUE(
      (*resampler)->Process(std::vector<float>(480, 0.1f), &output).ok());
  ASSERT_TRUE((*resampler)->Flush(&output).ok());
  EXPECT_EQ(output.size(), 160u);
  const std::vector<float> more(10, 0.0f);
  EXPECT_EQ((*resampler)->Process(more, &output).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*resampler)->Flush(&output).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(output.size(), 160u);
}

}  // namespace
}  // namespace emoserve
