// Streaming windows: chunks of any size give the windows unary Classify
// gives over the same audio; voice activity, utterances, bounded memory,
// limits and the session's lifecycle. Real model, real speech (RAVDESS, or
// the repository's synthetic sample without ../shared).
#include "core/stream.h"

#include <algorithm>
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

}  // namespace
}  // namespace emoserve
