// Streaming windows: chunks of any size give the windows unary Classify
// gives over the same audio; voice activity, utterances, bounded memory,
// limits and the session's lifecycle. Real model, real speech (RAVDESS, or
// the repository's synthetic sample without ../shared).
#include "core/stream.h"

#include <algorithm>
#include <cstdio>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <limits>
#include <memory>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/engine.h"
#include "core/features.h"
#include "core/speaker_statistics.h"
#include "core/resampler.h"
#include "core/windowing.h"
#include "tests/test_model.h"
#include "tests/test_support.h"
#include "train/ravdess.h"

namespace emoserve {
namespace {

using Type = StreamEvent::Type;

constexpr absl::Duration kPatience = absl::Seconds(300);

// Counts windows that reached the model.
class CountingObserver : public EngineObserver {
 public:
  void OnWindow(absl::Duration, absl::Duration) override { ++windows_; }
  int windows() const { return windows_.load(); }

 private:
  std::atomic<int> windows_{0};
};

// Records a session's events and its end; fails the test if callbacks
// overlap or an event follows on_done.
class Recorder {
 public:
  std::function<void(const StreamEvent&)> OnEvent() {
    return [this](const StreamEvent& event) {
      EXPECT_FALSE(inside_.exchange(true)) << "concurrent callbacks";
      {
        absl::MutexLock lock(&mu_);
        EXPECT_FALSE(done_calls_ > 0) << "an event after on_done";
        events_.push_back(event);
      }
      inside_.store(false);
    };
  }
  std::function<void(absl::Status)> OnDone() {
    return [this](absl::Status status) {
      EXPECT_FALSE(inside_.exchange(true)) << "concurrent callbacks";
      // Cleared under mu_: a test whose WaitDone returned may destroy the
      // recorder at once.
      absl::MutexLock lock(&mu_);
      inside_.store(false);
      ++done_calls_;
      status_ = status;
    };
  }

  bool WaitDone() {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(
        absl::Condition(+[](int* calls) { return *calls > 0; }, &done_calls_), kPatience);
  }
  std::vector<StreamEvent> events() const {
    absl::MutexLock lock(&mu_);
    return events_;
  }
  std::vector<StreamEvent> windows() const {
    std::vector<StreamEvent> out;
    for (const StreamEvent& e : events()) {
      if (e.type == Type::kWindow) out.push_back(e);
    }
    return out;
  }
  absl::Status status() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }
  int done_calls() const {
    absl::MutexLock lock(&mu_);
    return done_calls_;
  }

 private:
  std::atomic<bool> inside_{false};
  mutable absl::Mutex mu_;
  std::vector<StreamEvent> events_;
  int done_calls_ = 0;
  absl::Status status_;
};

class StreamTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SetUpModelRuntime(2);
    absl::StatusOr<std::shared_ptr<const Model>> model = testing::MakeTestModel(
        testing::SmallModelConfig(),
        (std::filesystem::path(::testing::TempDir()) / "stream_test_model").string());
    ASSERT_TRUE(model.ok()) << model.status();
    EngineOptions options;
    options.feature_threads = 2;
    absl::StatusOr<std::unique_ptr<Engine>> engine =
        Engine::Create(*std::move(model), options, &observer_);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = engine->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(engine_, nullptr);
    // RAVDESS speech where ../shared is; the repository's synthetic speech
    // elsewhere (ctest runs this suite both ways).
    const std::optional<std::string> shared = testing::SharedDir();
    absl::StatusOr<std::vector<std::vector<float>>> clips =
        shared.has_value() ? LoadRavdessClips(*shared + "/datasets/ravdess", 3)
                           : testing::SyntheticSpeechClips(3);
    ASSERT_TRUE(clips.ok()) << clips.status();
    clips_ = *std::move(clips);
  }

  Engine& engine() { return *engine_; }
  double rate() const { return engine_->model().config().sample_rate; }
  size_t window() const { return engine_->model().config().window_samples(); }

  // Two clips back to back, at the model's rate (about 7 s of RAVDESS, 6.9 s
  // synthetic).
  std::vector<float> Speech() const {
    std::vector<float> audio = clips_[0];
    audio.insert(audio.end(), clips_[1].begin(), clips_[1].end());
    return audio;
  }

  absl::StatusOr<ClipResult> Classify(std::vector<float> samples, double vad_threshold) {
    absl::Notification done;
    absl::StatusOr<ClipResult> result;
    ClipRequest request;
    request.samples = std::move(samples);
    request.vad_threshold_dbfs = vad_threshold;
    request.done = [&](absl::StatusOr<ClipResult> r) {
      result = std::move(r);
      done.Notify();
    };
    engine().Classify(std::move(request));
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
    return result;
  }

  // Streams `samples` in chunks of `chunk` samples, then finishes.
  void Stream(const std::vector<float>& samples, size_t chunk, const StreamOptions& options,
              Recorder* recorder, size_t* max_buffered = nullptr) {
    absl::StatusOr<std::unique_ptr<StreamSession>> session =
        StreamSession::Create(&engine(), options, recorder->OnEvent(), recorder->OnDone());
    ASSERT_TRUE(session.ok()) << session.status();
    for (size_t i = 0; i < samples.size(); i += chunk) {
      const size_t n = std::min(chunk, samples.size() - i);
      ASSERT_TRUE((*session)->Push(absl::MakeConstSpan(samples).subspan(i, n)).ok());
      if (max_buffered != nullptr) {
        *max_buffered = std::max(*max_buffered, (*session)->buffered_samples());
      }
    }
    (*session)->Finish();
    ASSERT_TRUE(recorder->WaitDone());
    EXPECT_TRUE(recorder->status().ok()) << recorder->status();
  }

  static inline CountingObserver observer_;
  static inline Engine* engine_ = nullptr;
  std::vector<std::vector<float>> clips_;
};

// The stream's windows equal unary Classify's (VAD off: every window).
void ExpectSameWindows(const std::vector<StreamEvent>& streamed, const ClipResult& unary,
                       double tolerance, const std::string& label) {
  ASSERT_EQ(streamed.size(), unary.windows.size()) << label;
  for (size_t i = 0; i < streamed.size(); ++i) {
    const WindowResult& expected = unary.windows[i];
    EXPECT_NEAR(streamed[i].start_seconds, expected.start_seconds, 1e-9) << label << " " << i;
    EXPECT_NEAR(streamed[i].end_seconds, expected.end_seconds, 1e-9) << label << " " << i;
    ASSERT_EQ(streamed[i].probabilities.size(), expected.probabilities.size()) << label;
    for (size_t c = 0; c < expected.probabilities.size(); ++c) {
      EXPECT_NEAR(streamed[i].probabilities[c], expected.probabilities[c], tolerance)
          << label << " window " << i << " class " << c;
    }
  }
}

TEST_F(StreamTest, AnyChunkSizeAt16kHzGivesTheUnaryWindows) {
  const std::vector<float> audio = Speech();
  absl::StatusOr<ClipResult> unary =
      Classify(audio, -std::numeric_limits<double>::infinity());
  ASSERT_TRUE(unary.ok()) << unary.status();
  ASSERT_GE(unary->windows.size(), 10u);
  StreamOptions options;
  options.vad_enabled = false;
  // 10 ms, odd sizes, a window and more, 1 s.
  for (size_t chunk : {160, 333, 1600, 4000, 16000, 16001}) {
    Recorder recorder;
    Stream(audio, chunk, options, &recorder);
    ExpectSameWindows(recorder.windows(), *unary, 1e-5, absl::StrCat("chunk ", chunk));
  }
}

// 48 kHz input is resampled as it arrives; unary Classify gets the same
// audio resampled whole. libsoxr's streaming output matches its whole-signal
// output up to float rounding at chunk boundaries: the probabilities differ
// by at most ~1.2e-7 (measured), well within the 1e-5 allowed.
TEST_F(StreamTest, AnyChunkSizeAt48kHzGivesTheUnaryWindowsOfTheResampledAudio) {
  absl::StatusOr<std::vector<float>> audio48 = Resample(Speech(), 16000, 48000);
  ASSERT_TRUE(audio48.ok()) << audio48.status();
  absl::StatusOr<std::vector<float>> back = Resample(*audio48, 48000, 16000);
  ASSERT_TRUE(back.ok()) << back.status();
  absl::StatusOr<ClipResult> unary = Classify(*back, -std::numeric_limits<double>::infinity());
  ASSERT_TRUE(unary.ok()) << unary.status();
  StreamOptions options;
  options.input_sample_rate = 48000;
  options.vad_enabled = false;
  for (size_t chunk : {480, 999, 4800, 48000}) {
    Recorder recorder;
    Stream(*audio48, chunk, options, &recorder);
    ExpectSameWindows(recorder.windows(), *unary, 1e-5, absl::StrCat("48 kHz chunk ", chunk));
  }
}

// Speech, digital silence, speech: silent windows are reported and skip the
// model; each run of speech windows is an utterance with its mean result.
TEST_F(StreamTest, SilenceIsReportedAndUtterancesFollowTheSpeech) {
  std::vector<float> audio = clips_[0];
  audio.insert(audio.end(), static_cast<size_t>(3 * rate()), 0.0f);
  audio.insert(audio.end(), clips_[2].begin(), clips_[2].end());
  StreamOptions options;  // VAD on, -50 dBFS
  absl::StatusOr<ClipResult> unary = Classify(audio, options.vad_threshold_dbfs);
  ASSERT_TRUE(unary.ok()) << unary.status();

  Recorder recorder;
  const int model_windows_before = observer_.windows();
  Stream(audio, 1600, options, &recorder);
  const std::vector<StreamEvent> events = recorder.events();
  const std::vector<StreamEvent> windows = recorder.windows();
  ASSERT_EQ(windows.size(), unary->windows.size());

  // Window by window: the same speech decision as unary; speech windows
  // carry its probabilities, silent ones none.
  int speech = 0;
  for (size_t i = 0; i < windows.size(); ++i) {
    EXPECT_EQ(windows[i].speech, unary->windows[i].speech) << i;
    if (windows[i].speech) {
      ++speech;
      ASSERT_EQ(windows[i].probabilities.size(), unary->windows[i].probabilities.size());
      for (size_t c = 0; c < windows[i].probabilities.size(); ++c) {
        EXPECT_NEAR(windows[i].probabilities[c], unary->windows[i].probabilities[c], 1e-5);
      }
    } else {
      EXPECT_TRUE(windows[i].probabilities.empty()) << i;
    }
  }
  ASSERT_GT(speech, 0);
  ASSERT_LT(speech, static_cast<int>(windows.size()));
  // Only the speech windows reached the model.
  EXPECT_EQ(observer_.windows() - model_windows_before, speech);

  // Expected utterances: runs of consecutive speech windows.
  struct Run {
    size_t first, last;
  };
  std::vector<Run> runs;
  for (size_t i = 0; i < windows.size(); ++i) {
    if (!windows[i].speech) continue;
    if (!runs.empty() && runs.back().last + 1 == i) {
      runs.back().last = i;
    } else {
      runs.push_back({i, i});
    }
  }
  // The 3 s gap holds whole silent windows: at least two utterances.
  EXPECT_GE(runs.size(), 2u);

  // The event sequence: kSpeechStarted right before a run's first window,
  // kSpeechEnded + kUtterance right after its last (before the next
  // window's event).
  std::vector<StreamEvent> expected;
  size_t run = 0;
  for (size_t i = 0; i <= windows.size(); ++i) {
    if (run < runs.size() && i == runs[run].last + 1) {
      StreamEvent ended;
      ended.type = Type::kSpeechEnded;
      ended.start_seconds = windows[runs[run].first].start_seconds;
      ended.end_seconds = windows[runs[run].last].end_seconds;
      expected.push_back(ended);
      StreamEvent utterance = ended;
      utterance.type = Type::kUtterance;
      utterance.window_count = static_cast<int>(runs[run].last - runs[run].first + 1);
      std::vector<float> rows;
      for (size_t w = runs[run].first; w <= runs[run].last; ++w) {
        rows.insert(rows.end(), windows[w].probabilities.begin(), windows[w].probabilities.end());
      }
      utterance.probabilities =
          MeanProbabilities(rows, static_cast<int>(windows[i - 1].probabilities.size()));
      expected.push_back(utterance);
      ++run;
    }
    if (i == windows.size()) break;
    if (run < runs.size() && i == runs[run].first) {
      StreamEvent started;
      started.type = Type::kSpeechStarted;
      started.start_seconds = windows[i].start_seconds;
      expected.push_back(started);
    }
    expected.push_back(windows[i]);
  }
  ASSERT_EQ(events.size(), expected.size());
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].type, expected[i].type) << i;
    EXPECT_NEAR(events[i].start_seconds, expected[i].start_seconds, 1e-9) << i;
    if (expected[i].type == Type::kSpeechEnded || expected[i].type == Type::kUtterance) {
      EXPECT_NEAR(events[i].end_seconds, expected[i].end_seconds, 1e-9) << i;
    }
    if (expected[i].type == Type::kUtterance) {
      EXPECT_EQ(events[i].window_count, expected[i].window_count) << i;
      ASSERT_EQ(events[i].probabilities.size(), expected[i].probabilities.size());
      for (size_t c = 0; c < expected[i].probabilities.size(); ++c) {
        EXPECT_NEAR(events[i].probabilities[c], expected[i].probabilities[c], 1e-6);
      }
    }
  }
}

TEST_F(StreamTest, BufferedSamplesStayBoundedOverALongStream) {
  // A minute of speech and silence (the silence costs no model time).
  std::vector<float> audio;
  while (audio.size() < 60 * rate()) {
    audio.insert(audio.end(), clips_[0].begin(), clips_[0].end());
    audio.insert(audio.end(), static_cast<size_t>(7 * rate()), 0.0f);
  }
  for (size_t chunk : {160, 16000}) {
    Recorder recorder;
    size_t max_buffered = 0;
    StreamOptions options;
    Stream(audio, chunk, options, &recorder, &max_buffered);
    EXPECT_LE(max_buffered, window() + chunk) << chunk;
    EXPECT_GT(max_buffered, 0u);
    EXPECT_EQ(recorder.windows().size(),
              WindowStarts(audio.size(), window(), window() / 2).size());
  }
}

TEST_F(StreamTest, PastMaxSecondsTheStreamFailsWithOutOfRange) {
  Recorder recorder;
  StreamOptions options;
  options.vad_enabled = false;
  options.max_seconds = 2.5;
  absl::StatusOr<std::unique_ptr<StreamSession>> session =
      StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
  ASSERT_TRUE(session.ok()) << session.status();
  const std::vector<float> second(clips_[0].begin(), clips_[0].begin() + 16000);
  EXPECT_TRUE((*session)->Push(second).ok());
  EXPECT_TRUE((*session)->Push(second).ok());
  const absl::Status third = (*session)->Push(second);
  EXPECT_EQ(third.code(), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(recorder.WaitDone());
  EXPECT_EQ(recorder.status().code(), absl::StatusCode::kOutOfRange);
  // The windows before the limit were still delivered: 0-1 s, 0.5-1.5 s,
  // 1-2 s.
  EXPECT_EQ(recorder.windows().size(), 3u);
  EXPECT_EQ((*session)->Push(second).code(), absl::StatusCode::kOutOfRange);
  (*session)->Finish();  // no effect
  session->reset();
  EXPECT_EQ(recorder.done_calls(), 1);
}

TEST_F(StreamTest, FinishCancelAndDestructionEndTheStreamOnce) {
  StreamOptions options;
  options.vad_enabled = false;
  {  // Finish without audio: no window, OK.
    Recorder recorder;
    auto session =
        StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
    ASSERT_TRUE(session.ok());
    (*session)->Finish();
    ASSERT_TRUE(recorder.WaitDone());
    EXPECT_TRUE(recorder.status().ok());
    EXPECT_TRUE(recorder.events().empty());
    EXPECT_EQ((*session)->Push(clips_[0]).code(), absl::StatusCode::kFailedPrecondition);
  }
  {  // Cancel with windows under way: kCancelled, nothing after it.
    Recorder recorder;
    auto session =
        StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE((*session)->Push(Speech()).ok());
    (*session)->Cancel();
    ASSERT_TRUE(recorder.WaitDone());
    EXPECT_EQ(recorder.status().code(), absl::StatusCode::kCancelled);
    const size_t events = recorder.events().size();
    (*session)->Finish();
    EXPECT_EQ((*session)->Push(clips_[0]).code(), absl::StatusCode::kCancelled);
    session->reset();
    EXPECT_EQ(recorder.events().size(), events);
    EXPECT_EQ(recorder.done_calls(), 1);
  }
  {  // Destroyed with windows under way: on_done(kCancelled) before the
     // destructor returns, and no callback after.
    Recorder recorder;
    auto session =
        StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
    ASSERT_TRUE(session.ok());
    ASSERT_TRUE((*session)->Push(Speech()).ok());
    session->reset();
    EXPECT_EQ(recorder.done_calls(), 1);
    EXPECT_EQ(recorder.status().code(), absl::StatusCode::kCancelled);
    const size_t events = recorder.events().size();
    absl::SleepFor(absl::Milliseconds(300));  // late engine completions are dropped
    EXPECT_EQ(recorder.events().size(), events);
  }
  {  // Destroyed from inside its own callback.
    Recorder recorder;
    std::unique_ptr<StreamSession> session;
    absl::Notification first_event;
    auto on_event = [&, record = recorder.OnEvent()](const StreamEvent& event) {
      record(event);
      if (!first_event.HasBeenNotified()) {
        first_event.Notify();
        session.reset();
      }
    };
    auto created = StreamSession::Create(&engine(), options, on_event, recorder.OnDone());
    ASSERT_TRUE(created.ok());
    session = *std::move(created);
    StreamSession* raw = session.get();
    ASSERT_TRUE(raw->Push(Speech()).ok());
    ASSERT_TRUE(recorder.WaitDone());
    EXPECT_EQ(recorder.status().code(), absl::StatusCode::kCancelled);
    EXPECT_EQ(recorder.events().size(), 1u);
  }
}

// True once nothing is charged to `budget` any more.
bool BudgetDrains(const MemoryBudget& budget) {
  const absl::Time until = absl::Now() + kPatience;
  while (budget.used() > 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(1));
  return budget.used() == 0;
}

// A stream's ring buffer is charged to the budget from its first audio, and
// each speech window's samples while the engine holds them: a budget of two
// windows carries a stream whose windows are computed as they come, and
// everything is given back when the session goes.
TEST_F(StreamTest, SpeechWindowsAreChargedToTheBudgetUntilTheirResultsAreBack) {
  const int64_t window_bytes = static_cast<int64_t>(window() * sizeof(float));
  MemoryBudget budget(2 * window_bytes);
  int64_t most_used = 0;
  Recorder recorder;
  StreamOptions options;
  options.vad_enabled = false;
  options.budget = &budget;
  absl::StatusOr<std::unique_ptr<StreamSession>> session =
      StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
  ASSERT_TRUE(session.ok()) << session.status();
  const std::vector<float> audio = Speech();
  const size_t hop = window() / 2;
  for (size_t i = 0; i < audio.size(); i += hop) {
    ASSERT_TRUE((*session)->Push(absl::MakeConstSpan(audio).subspan(
                                     i, std::min(hop, audio.size() - i)))
                    .ok());
    most_used = std::max(most_used, budget.used());
    EXPECT_LE((*session)->windows_in_flight(), 2);
    // Waits for the window just sent, as a caller with backpressure does.
    const absl::Time until = absl::Now() + kPatience;
    while ((*session)->windows_in_flight() > 0 && absl::Now() < until) {
      absl::SleepFor(absl::Milliseconds(1));
    }
  }
  (*session)->Finish();
  ASSERT_TRUE(recorder.WaitDone());
  EXPECT_TRUE(recorder.status().ok()) << recorder.status();
  EXPECT_EQ(most_used, 2 * window_bytes);
  EXPECT_EQ(budget.used(), window_bytes);  // the ring, until the session goes
  session->reset();
  // The engine lets go of the session's last window callback just after it.
  EXPECT_TRUE(BudgetDrains(budget));

  // Pushed all at once (13 windows in one call, emitted within microseconds
  // while a window takes the model about a millisecond), the second window
  // finds the budget (the ring and one window) full: the stream ends with
  // RESOURCE_EXHAUSTED after the windows before it.
  MemoryBudget small(2 * window_bytes);
  options.budget = &small;
  Recorder flooded;
  session = StreamSession::Create(&engine(), options, flooded.OnEvent(), flooded.OnDone());
  ASSERT_TRUE(session.ok()) << session.status();
  const absl::Status pushed = (*session)->Push(audio);
  ASSERT_TRUE(flooded.WaitDone());
  EXPECT_EQ(pushed.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(flooded.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(flooded.status().message()),
              ::testing::HasSubstr("memory for audio in flight is full"));
  EXPECT_LT(flooded.windows().size(), 13u);
  session->reset();
  // Windows still queued when the stream ended are dropped by the engine,
  // which gives their charge back.
  EXPECT_TRUE(BudgetDrains(small));
}

TEST_F(StreamTest, RejectsBadOptionsAndSamples) {
  Recorder recorder;
  StreamOptions options;
  options.input_sample_rate = 100;
  EXPECT_EQ(StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  options = StreamOptions();
  options.hop_seconds = 0.01;  // below the engine's minimum hop
  EXPECT_EQ(StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  options.hop_seconds = 5;
  EXPECT_EQ(StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(StreamSession::Create(nullptr, {}, recorder.OnEvent(), recorder.OnDone()).ok());

  auto session =
      StreamSession::Create(&engine(), StreamOptions(), recorder.OnEvent(), recorder.OnDone());
  ASSERT_TRUE(session.ok());
  std::vector<float> bad(100, 0.0f);
  bad[50] = std::numeric_limits<float>::infinity();
  EXPECT_EQ((*session)->Push(bad).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(recorder.WaitDone());
  EXPECT_EQ(recorder.status().code(), absl::StatusCode::kInvalidArgument);
}

// Speaker adaptation: a stream of a speaker-normalised model learns its
// voice in stream order; Classify adapts to statistics it is given.
class SpeakerAdaptationTest : public StreamTest {
 protected:
  static void SetUpTestSuite() {
    StreamTest::SetUpTestSuite();
    ModelConfig config = testing::SmallModelConfig();
    config.speaker_normalization = SpeakerNormalization::kSummaryMean;
    absl::StatusOr<std::shared_ptr<const Model>> model = testing::MakeTestModel(
        config, (std::filesystem::path(::testing::TempDir()) / "speaker_model").string());
    ASSERT_TRUE(model.ok()) << model.status();
    ASSERT_GT((*model)->summary_size(), 0);
    EngineOptions options;
    options.feature_threads = 2;
    absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(*std::move(model), options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    plain_engine_ = engine_;  // StreamTest's, for the models without a summary
    engine_ = engine->release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    engine_ = plain_engine_;
    StreamTest::TearDownTestSuite();
  }

  const Model& model() { return engine().model(); }
  double hop_seconds() const { return static_cast<double>(window() / 2) / rate(); }

  // The summaries of `audio`'s speech windows (default hop and threshold),
  // computed apart from the engine and the stream.
  std::vector<std::vector<float>> SpeechSummaries(const std::vector<float>& audio) {
    const ClipPlan plan = PlanClip(audio, window(), window() / 2, EngineOptions().vad_threshold_dbfs);
    absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
        FeatureExtractor::Create(model().config().features, model().config().sample_rate);
    EXPECT_TRUE(extractor.ok()) << extractor.status();
    std::vector<std::vector<float>> summaries;
    std::vector<float> samples(window());
    for (size_t w = 0; w < plan.starts.size(); ++w) {
      if (!plan.speech[w]) continue;
      CopyWindow(audio, plan.starts[w], window(), samples.data());
      absl::StatusOr<FeatureMatrix> features = (*extractor)->Compute(samples);
      EXPECT_TRUE(features.ok()) << features.status();
      absl::StatusOr<std::vector<float>> summary = model().Summarize(features->data, 1);
      EXPECT_TRUE(summary.ok()) << summary.status();
      summaries.push_back(*std::move(summary));
    }
    return summaries;
  }

  static std::vector<float> Mean(const std::vector<std::vector<float>>& rows, size_t count) {
    std::vector<double> sum(rows[0].size(), 0.0);
    for (size_t r = 0; r < count; ++r) {
      for (size_t k = 0; k < sum.size(); ++k) sum[k] += rows[r][k];
    }
    std::vector<float> mean(sum.size());
    for (size_t k = 0; k < sum.size(); ++k) mean[k] = static_cast<float>(sum[k] / count);
    return mean;
  }

  // Within `tolerance`, relative for values beyond 1 (summaries are in dB).
  static void ExpectNear(absl::Span<const float> actual, absl::Span<const float> expected,
                         double tolerance, const std::string& label) {
    ASSERT_EQ(actual.size(), expected.size()) << label;
    for (size_t k = 0; k < actual.size(); ++k) {
      EXPECT_NEAR(actual[k], expected[k], tolerance * std::max(1.0f, std::abs(expected[k])))
          << label << " value " << k;
    }
  }

  // The statistics in the stream's last utterance.
  static SpeakerStatistics LastStatistics(const Recorder& recorder, const Model& model) {
    std::string blob;
    for (const StreamEvent& event : recorder.events()) {
      if (event.type == Type::kUtterance) blob = event.speaker_statistics;
    }
    absl::StatusOr<SpeakerStatistics> parsed =
        SpeakerStatistics::Parse(blob, model.summary_key(), model.summary_size());
    EXPECT_TRUE(parsed.ok()) << parsed.status();
    return parsed.ok() ? *std::move(parsed) : SpeakerStatistics(model.summary_key(), 1);
  }

  static inline Engine* plain_engine_ = nullptr;
};

// Window j of the speech is answered unadapted while the j windows before it
// hold under the threshold's speech, then adapted to their mean; the
// utterances carry the statistics of every speech window so far.
TEST_F(SpeakerAdaptationTest, SpeechWindowsAreAdaptedToTheWindowsBeforeThemOnceTheyHoldEnough) {
  const std::vector<float> audio = Speech();
  const std::vector<std::vector<float>> summaries = SpeechSummaries(audio);
  ASSERT_GE(summaries.size(), 7u);
  StreamOptions options;
  options.adaptation_min_speech_seconds = 3 * hop_seconds();  // from the fourth speech window
  Recorder adapting, plain;
  Stream(audio, 1600, options, &adapting);
  options.speaker_adaptation = false;
  Stream(audio, 1600, options, &plain);
  const std::vector<StreamEvent> windows = adapting.windows();
  const std::vector<StreamEvent> unadapted = plain.windows();
  ASSERT_EQ(windows.size(), unadapted.size());
  size_t j = 0;  // speech windows before this one
  int adapted = 0;
  double largest_change = 0;
  for (size_t w = 0; w < windows.size(); ++w) {
    const std::string label = absl::StrCat("window ", w, " (speech window ", j, ")");
    EXPECT_FALSE(unadapted[w].speaker_adapted) << label;
    if (!windows[w].speech) {
      EXPECT_FALSE(windows[w].speaker_adapted) << label;
      continue;
    }
    ASSERT_LT(j, summaries.size()) << label;
    if (j < 3) {
      EXPECT_FALSE(windows[w].speaker_adapted) << label;
      // Computed from the window's summary: the same to float rounding.
      ExpectNear(windows[w].probabilities, unadapted[w].probabilities, 1e-5, label);
    } else {
      EXPECT_TRUE(windows[w].speaker_adapted) << label;
      absl::StatusOr<std::vector<float>> expected =
          model().PredictFromSummaries(summaries[j], 1, Mean(summaries, j));
      ASSERT_TRUE(expected.ok()) << expected.status();
      ExpectNear(windows[w].probabilities, *expected, 1e-5, label);
      for (size_t c = 0; c < expected->size(); ++c) {
        largest_change = std::max(
            largest_change, std::abs(static_cast<double>(windows[w].probabilities[c]) -
                                     unadapted[w].probabilities[c]));
      }
      ++adapted;
    }
    ++j;
  }
  EXPECT_EQ(j, summaries.size());
  EXPECT_GE(adapted, 4);
  EXPECT_GT(largest_change, 1e-3) << "adapting changed nothing: the test would not see it";
  const SpeakerStatistics statistics = LastStatistics(adapting, model());
  EXPECT_EQ(statistics.windows(), static_cast<int64_t>(summaries.size()));
  ExpectNear(statistics.Mean(), Mean(summaries, summaries.size()), 1e-5, "the voice's mean");
  for (const StreamEvent& event : plain.events()) {
    EXPECT_TRUE(event.speaker_statistics.empty()) << "statistics while not adapting";
  }
  // With no threshold, from the second speech window: the first has no
  // window before it to adapt to.
  options.speaker_adaptation = true;
  options.adaptation_min_speech_seconds = 0;
  Recorder at_once;
  Stream(audio, 1600, options, &at_once);
  std::vector<bool> adapted_flags;
  for (const StreamEvent& window : at_once.windows()) {
    if (window.speech) adapted_flags.push_back(window.speaker_adapted);
  }
  ASSERT_EQ(adapted_flags.size(), summaries.size());
  EXPECT_FALSE(adapted_flags[0]);
  EXPECT_TRUE(std::all_of(adapted_flags.begin() + 1, adapted_flags.end(), [](bool a) { return a; }));
}

// Statistics carried from an earlier stream adapt from the first window,
// and Classify adds a clip's speech windows to them as a stream does.
TEST_F(SpeakerAdaptationTest, CarriedStatisticsAdaptAtOnceAndClassifyAddsWhatAStreamAdds) {
  const std::vector<float> audio = Speech();
  StreamOptions options;
  Recorder first;
  Stream(audio, 4000, options, &first);
  const SpeakerStatistics heard = LastStatistics(first, model());
  ASSERT_GT(heard.windows(), 0);

  options.speaker_statistics = heard;
  options.adaptation_min_speech_seconds = heard.speech_seconds(hop_seconds());
  Recorder second;
  Stream(clips_[2], 4000, options, &second);
  const std::vector<StreamEvent> windows = second.windows();
  const auto first_speech = std::find_if(windows.begin(), windows.end(),
                                         [](const StreamEvent& e) { return e.speech; });
  ASSERT_NE(first_speech, windows.end());
  EXPECT_TRUE(first_speech->speaker_adapted);
  const std::vector<std::vector<float>> summaries = SpeechSummaries(clips_[2]);
  absl::StatusOr<std::vector<float>> expected =
      model().PredictFromSummaries(summaries[0], 1, heard.Mean());
  ASSERT_TRUE(expected.ok()) << expected.status();
  ExpectNear(first_speech->probabilities, *expected, 1e-5, "first window");

  // Classify: every window adapted to the given mean; the statistics it
  // returns are the stream's after the same audio.
  absl::Notification done;
  absl::StatusOr<ClipResult> result;
  ClipRequest request;
  request.samples = clips_[2];
  request.speaker_mean = heard.Mean();
  request.speaker_statistics = heard;
  request.done = [&](absl::StatusOr<ClipResult> r) {
    result = std::move(r);
    done.Notify();
  };
  engine().Classify(std::move(request));
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->speaker_adapted);
  size_t j = 0;
  for (const WindowResult& window : result->windows) {
    if (!window.speech) continue;
    absl::StatusOr<std::vector<float>> adapted =
        model().PredictFromSummaries(summaries[j], 1, heard.Mean());
    ASSERT_TRUE(adapted.ok()) << adapted.status();
    ExpectNear(window.probabilities, *adapted, 1e-5, absl::StrCat("Classify window ", j++));
  }
  ASSERT_TRUE(result->speaker_statistics.has_value());
  const SpeakerStatistics after_stream = LastStatistics(second, model());
  EXPECT_EQ(result->speaker_statistics->windows(), after_stream.windows());
  EXPECT_EQ(result->speaker_statistics->windows(),
            heard.windows() + static_cast<int64_t>(summaries.size()));
  ExpectNear(result->speaker_statistics->Mean(), after_stream.Mean(), 1e-6, "statistics");
}

// The voice's statistics are a fixed size, charged to the stream's budget
// with its ring buffer: a stream three times as long holds the same.
TEST_F(SpeakerAdaptationTest, TheStatisticsAreChargedToTheBudgetAndDoNotGrow) {
  const int64_t ring_bytes = static_cast<int64_t>(window() * sizeof(float));
  const SpeakerStatistics empty(model().summary_key(), model().summary_size());
  std::vector<int64_t> held;
  for (int repeats : {1, 3}) {
    const std::vector<float> speech = Speech();
    std::vector<float> audio;
    for (int r = 0; r < repeats; ++r) audio.insert(audio.end(), speech.begin(), speech.end());
    MemoryBudget budget(int64_t{64} << 20);
    StreamOptions options;
    options.budget = &budget;
    Recorder recorder;
    absl::StatusOr<std::unique_ptr<StreamSession>> session =
        StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone());
    ASSERT_TRUE(session.ok()) << session.status();
    ASSERT_TRUE((*session)->Push(audio).ok());
    (*session)->Finish();
    ASSERT_TRUE(recorder.WaitDone());
    ASSERT_TRUE(recorder.status().ok()) << recorder.status();
    held.push_back(budget.used());
    session->reset();
    EXPECT_TRUE(BudgetDrains(budget));
  }
  EXPECT_EQ(held[0], ring_bytes + static_cast<int64_t>(empty.bytes()));
  EXPECT_EQ(held[1], held[0]);
  // What adapting adds to a stream (3.1 KiB with the bundled recipe's
  // 776-value summary), against the ring it holds anyway.
  std::printf("statistics: %zu bytes for %d values; the ring: %lld bytes\n", empty.bytes(),
              empty.width(), static_cast<long long>(ring_bytes));
}

TEST_F(SpeakerAdaptationTest, RefusesStatisticsTheModelOrStreamCannotUse) {
  const SpeakerStatistics statistics(model().summary_key(), model().summary_size());
  Recorder recorder;
  StreamOptions options;
  options.speaker_statistics = statistics;
  EXPECT_EQ(StreamSession::Create(plain_engine_, options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  options.speaker_adaptation = false;
  EXPECT_EQ(StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  options.speaker_adaptation = true;
  options.speaker_statistics = SpeakerStatistics(model().summary_key(), 3);
  EXPECT_EQ(StreamSession::Create(&engine(), options, recorder.OnEvent(), recorder.OnDone())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // A model without a summary streams unadapted, with no statistics.
  options.speaker_statistics.reset();
  EXPECT_TRUE(
      StreamSession::Create(plain_engine_, options, recorder.OnEvent(), recorder.OnDone()).ok());

  const auto classify = [&](Engine* engine, std::vector<float> mean,
                            std::optional<SpeakerStatistics> stats) {
    absl::Notification done;
    absl::Status status;
    ClipRequest request;
    request.samples = clips_[0];
    request.speaker_mean = std::move(mean);
    request.speaker_statistics = std::move(stats);
    request.done = [&](absl::StatusOr<ClipResult> r) {
      status = r.status();
      done.Notify();
    };
    engine->Classify(std::move(request));
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
    return status.code();
  };
  const std::vector<float> mean(model().summary_size(), 0.0f);
  EXPECT_EQ(classify(plain_engine_, mean, std::nullopt), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(classify(plain_engine_, {}, statistics), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(classify(&engine(), std::vector<float>(3), std::nullopt),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(classify(&engine(), {}, SpeakerStatistics(model().summary_key(), 3)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(classify(&engine(), mean, statistics), absl::StatusCode::kOk);
  WindowRequest no_summary;
  no_summary.samples.assign(plain_engine_->model().config().window_samples(), 0.1f);
  no_summary.summary = std::make_shared<std::vector<float>>();
  absl::Notification window_done;
  absl::Status window_status;
  no_summary.done = [&](absl::StatusOr<std::vector<float>> r) {
    window_status = r.status();
    window_done.Notify();
  };
  plain_engine_->Submit(std::move(no_summary));
  ASSERT_TRUE(window_done.WaitForNotificationWithTimeout(kPatience));
  EXPECT_EQ(window_status.code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace emoserve
