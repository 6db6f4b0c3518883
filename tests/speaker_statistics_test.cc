#include "core/speaker_statistics.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace emoserve {
namespace {

using ::testing::HasSubstr;

constexpr char kKey[] = "statistics summary v1: rows 128";

std::vector<std::vector<float>> RandomSummaries(int count, int width, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(-30.0f, 12.0f);
  std::vector<std::vector<float>> out(count, std::vector<float>(width));
  for (auto& summary : out) {
    for (float& v : summary) v = normal(rng);
  }
  return out;
}

std::vector<float> NaNs(int width) {
  return std::vector<float>(width, std::numeric_limits<float>::quiet_NaN());
}

// The running mean is the mean of what was added, in any split of the
// windows between statistics that are then merged.
TEST(SpeakerStatisticsTest, MeanOfTheWindowsAddedAndMerged) {
  const auto summaries = RandomSummaries(50, 7, 1);
  SpeakerStatistics all(kKey, 7), first(kKey, 7), second(kKey, 7);
  EXPECT_TRUE(all.Mean().empty());
  std::vector<double> expected(7, 0.0);
  for (size_t w = 0; w < summaries.size(); ++w) {
    ASSERT_TRUE(all.Add(summaries[w]).ok());
    ASSERT_TRUE((w < 20 ? first : second).Add(summaries[w]).ok());
    for (int k = 0; k < 7; ++k) expected[k] += summaries[w][k] / 50.0;
  }
  // A clip's windows arrive as their mean (Classify adds them so).
  SpeakerStatistics by_mean(kKey, 7);
  std::vector<float> last_thirty(7, 0.0f);
  for (size_t w = 20; w < summaries.size(); ++w) {
    for (int k = 0; k < 7; ++k) last_thirty[k] += summaries[w][k] / 30.0f;
  }
  ASSERT_TRUE(by_mean.Merge(first).ok());  // windows 0-19
  ASSERT_TRUE(by_mean.AddMean(last_thirty, 30).ok());
  ASSERT_TRUE(first.Merge(second).ok());
  EXPECT_EQ(all.windows(), 50);
  EXPECT_EQ(first.windows(), 50);
  EXPECT_EQ(by_mean.windows(), 50);
  for (int k = 0; k < 7; ++k) {
    EXPECT_NEAR(all.Mean()[k], expected[k], 1e-4);
    EXPECT_NEAR(first.Mean()[k], expected[k], 1e-4);
    EXPECT_NEAR(by_mean.Mean()[k], expected[k], 1e-4);
  }
  EXPECT_EQ(by_mean.AddMean(std::vector<float>(6), 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(by_mean.AddMean(last_thirty, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(by_mean.AddMean(NaNs(7), 3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(by_mean.windows(), 50);
  EXPECT_EQ(all.Add(std::vector<float>(6)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(all.Add(NaNs(7)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(all.windows(), 50);
  EXPECT_FALSE(all.Merge(SpeakerStatistics("another summary", 7)).ok());
  // Fixed size: what a stream holds does not grow with what it hears.
  EXPECT_EQ(all.bytes(), SpeakerStatistics(kKey, 7).bytes());
}

// Adaptation waits for the threshold's worth of speech, and for at least
// one window even when the threshold is 0.
TEST(SpeakerStatisticsTest, EnoughToAdaptOnceTheSpeechReachesTheThreshold) {
  SpeakerStatistics statistics(kKey, 7);
  EXPECT_FALSE(statistics.EnoughToAdapt(0.5, 0.0));
  for (const auto& summary : RandomSummaries(39, 7, 3)) ASSERT_TRUE(statistics.Add(summary).ok());
  EXPECT_TRUE(statistics.EnoughToAdapt(0.5, 0.0));
  EXPECT_FALSE(statistics.EnoughToAdapt(0.5, 20.0));  // 19.5 s
  ASSERT_TRUE(statistics.Add(RandomSummaries(1, 7, 4)[0]).ok());
  EXPECT_TRUE(statistics.EnoughToAdapt(0.5, 20.0));  // 20 s
  EXPECT_FALSE(statistics.EnoughToAdapt(0.25, 20.0));
}

TEST(SpeakerStatisticsTest, BlobRoundTripsExactly) {
  SpeakerStatistics statistics(kKey, 776);
  for (const auto& summary : RandomSummaries(9, 776, 2)) ASSERT_TRUE(statistics.Add(summary).ok());
  const std::string blob = statistics.Serialize();
  EXPECT_EQ(blob.size(), 24u + 4 * 776);
  absl::StatusOr<SpeakerStatistics> parsed = SpeakerStatistics::Parse(blob, kKey, 776);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->windows(), 9);
  EXPECT_EQ(parsed->Mean(), statistics.Mean());
  EXPECT_EQ(parsed->Serialize(), blob);
  // Empty statistics round-trip too.
  parsed = SpeakerStatistics::Parse(SpeakerStatistics(kKey, 776).Serialize(), kKey, 776);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->windows(), 0);
}

TEST(SpeakerStatisticsTest, RefusesBlobsThatAreNotThisModelsStatistics) {
  SpeakerStatistics statistics(kKey, 8);
  ASSERT_TRUE(statistics.Add(std::vector<float>(8, 1.0f)).ok());
  const std::string blob = statistics.Serialize();
  const auto refused = [](absl::string_view bytes, absl::string_view key, int width) {
    absl::StatusOr<SpeakerStatistics> parsed = SpeakerStatistics::Parse(bytes, key, width);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(parsed.status().message());
  };
  EXPECT_THAT(refused("", kKey, 8), HasSubstr("not a statistics blob"));
  EXPECT_THAT(refused("hello world, this is not a blob", kKey, 8),
              HasSubstr("not a statistics blob"));
  EXPECT_THAT(refused(blob, "another summary", 8), HasSubstr("another summary"));
  EXPECT_THAT(refused(blob, kKey, 9), HasSubstr("holds 8 values"));
  EXPECT_THAT(refused(blob.substr(0, blob.size() - 1), kKey, 8), HasSubstr("holds 8 values"));
  EXPECT_THAT(refused(blob + "x", kKey, 8), HasSubstr("holds 8 values"));
  std::string changed = blob;
  changed[4] = 2;  // version
  EXPECT_THAT(refused(changed, kKey, 8), HasSubstr("version 2 is not supported"));
  changed = blob;
  changed[6] = 'A';  // reserved (found by speaker_statistics_fuzzer: accepted, written back as 0)
  EXPECT_THAT(refused(changed, kKey, 8), HasSubstr("reserved bytes"));
  changed = blob;
  for (int i = 0; i < 4; ++i) changed[24 + i] = '\xff';  // a NaN
  EXPECT_THAT(refused(changed, kKey, 8), HasSubstr("not finite"));
  changed = blob;
  for (int i = 16; i < 20; ++i) changed[i] = '\xff';  // 4 billion windows
  EXPECT_THAT(refused(changed, kKey, 8), HasSubstr("over the limit"));
  changed = blob;
  changed[16] = 0;  // no window, yet values
  EXPECT_THAT(refused(changed, kKey, 8), HasSubstr("values but no window"));
}

}  // namespace
}  // namespace emoserve
