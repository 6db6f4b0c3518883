// The engine: dynamic batching (eager when idle, gathering when busy), the
// bounded queue, deadlines, cancellation, shutdown, exactly-once completion,
// and long audio (windows, voice activity, aggregation), on a real model of
// the project's architecture and speech (RAVDESS, or the repository's
// synthetic sample without ../shared).
#include "core/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <numeric>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/features.h"
#include "core/windowing.h"
#include "tests/test_model.h"
#include "tests/test_support.h"
#include "train/ravdess.h"

namespace emoserve {
namespace {

using ::testing::Each;
using ::testing::Eq;

// Generous bound for waiting on completions: a stuck engine fails the test
// instead of hanging it. Never a performance assertion.
constexpr absl::Duration kPatience = absl::Seconds(300);
constexpr float kTolerance = 1e-5f;

// Records what the engine reports; can hold the model runner inside its
// first OnBatch so that a test controls when the model is busy.
class TestObserver : public EngineObserver {
 public:
  explicit TestObserver(bool hold_first_batch = false) : hold_(hold_first_batch) {}

  void OnWindow(absl::Duration, absl::Duration) override {
    absl::MutexLock lock(&mu_);
    ++windows_;
  }
  void OnBatch(int batch_size, absl::Duration) override {
    bool hold = false;
    {
      absl::MutexLock lock(&mu_);
      batches_.push_back(batch_size);
      hold = hold_ && batches_.size() == 1;
    }
    if (hold) {
      holding_.Notify();
      release_.WaitForNotification();
    }
  }
  void OnQueueDepth(int depth) override {
    absl::MutexLock lock(&mu_);
    max_depth_ = std::max(max_depth_, depth);
  }

  // With hold_first_batch: returns once the runner is held.
  void WaitUntilHolding() { ASSERT_TRUE(holding_.WaitForNotificationWithTimeout(kPatience)); }
  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
  }

  std::vector<int> batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  int windows() const {
    absl::MutexLock lock(&mu_);
    return windows_;
  }

 private:
  const bool hold_;
  absl::Notification holding_;
  absl::Notification release_;
  mutable absl::Mutex mu_;
  std::vector<int> batches_;
  int windows_ = 0;
  int max_depth_ = 0;
};

// Collects completions by request index and counts every call, so that a
// second completion of the same request is seen.
template <typename T>
class Completions {
 public:
  explicit Completions(size_t n) : results_(n), calls_(n, 0) {}

  std::function<void(absl::StatusOr<T>)> Callback(size_t index) {
    return [this, index](absl::StatusOr<T> result) {
      absl::MutexLock lock(&mu_);
      if (++calls_[index] == 1) ++completed_;
      results_[index] = std::move(result);
    };
  }

  // Waits until every request completed at least once.
  bool WaitAll() {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(
                                    +[](Completions* c) { return c->completed_ == c->calls_.size(); },
                                    this),
                                kPatience);
  }

  bool WaitFor(size_t index) {
    absl::MutexLock lock(&mu_);
    return mu_.AwaitWithTimeout(
        absl::Condition(+[](int* calls) { return *calls > 0; }, &calls_[index]), kPatience);
  }

  bool completed(size_t index) const {
    absl::MutexLock lock(&mu_);
    return calls_[index] > 0;
  }
  std::vector<int> calls() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  const absl::StatusOr<T>& result(size_t index) const { return *results_[index]; }

 private:
  mutable absl::Mutex mu_;
  std::vector<std::optional<absl::StatusOr<T>>> results_;
  std::vector<int> calls_;
  size_t completed_ = 0;
};

using WindowCompletions = Completions<std::vector<float>>;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    SetUpModelRuntime(2);
    absl::StatusOr<std::shared_ptr<const Model>> model = testing::MakeTestModel(
        testing::SmallModelConfig(),
        (std::filesystem::path(::testing::TempDir()) / "engine_test_model").string());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = new std::shared_ptr<const Model>(*std::move(model));
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(model_, nullptr);
    // RAVDESS speech where ../shared is; the repository's synthetic speech
    // elsewhere (ctest runs this suite both ways).
    const std::optional<std::string> shared = testing::SharedDir();
    absl::StatusOr<std::vector<std::vector<float>>> clips =
        shared.has_value() ? LoadRavdessClips(*shared + "/datasets/ravdess", 6)
                           : testing::SyntheticSpeechClips(6);
    ASSERT_TRUE(clips.ok()) << clips.status();
    clips_ = *std::move(clips);
  }

  const std::shared_ptr<const Model>& model() const { return *model_; }
  size_t window() const { return model()->config().window_samples(); }

  std::unique_ptr<Engine> MakeEngine(EngineOptions options, EngineObserver* observer) {
    if (options.feature_threads == 0) options.feature_threads = 2;
    absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(model(), options, observer);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }

  // Model windows cut from the clips, every half window.
  std::vector<std::vector<float>> SpeechWindows(size_t count) const {
    std::vector<std::vector<float>> windows;
    for (size_t i = 0; windows.size() < count; ++i) {
      const std::vector<float>& clip = clips_[i % clips_.size()];
      const std::vector<size_t> starts = WindowStarts(clip.size(), window(), window() / 2);
      std::vector<float> samples(window());
      CopyWindow(clip, starts[(i / clips_.size()) % starts.size()], window(), samples.data());
      windows.push_back(std::move(samples));
    }
    return windows;
  }

  // Features and Predict of one window, without the engine.
  std::vector<float> Direct(const std::vector<float>& samples) const {
    absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor = FeatureExtractor::Create(
        model()->config().features, model()->config().sample_rate);
    EXPECT_TRUE(extractor.ok()) << extractor.status();
    absl::StatusOr<FeatureMatrix> features = (*extractor)->Compute(samples);
    EXPECT_TRUE(features.ok()) << features.status();
    absl::StatusOr<std::vector<float>> p = model()->Predict(features->data, 1);
    EXPECT_TRUE(p.ok()) << p.status();
    return *p;
  }

  static WindowRequest Request(std::vector<float> samples,
                               std::function<void(absl::StatusOr<std::vector<float>>)> done) {
    WindowRequest request;
    request.samples = std::move(samples);
    request.done = std::move(done);
    return request;
  }

  static inline std::shared_ptr<const Model>* model_ = nullptr;
  std::vector<std::vector<float>> clips_;
};

void ExpectNear(const std::vector<float>& actual, const std::vector<float>& expected,
                float tolerance = kTolerance) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) EXPECT_NEAR(actual[i], expected[i], tolerance) << i;
}

TEST_F(EngineTest, IdleRequestRunsAtOnceAsABatchOfOne) {
  TestObserver observer;
  EngineOptions options;
  std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(4);
  for (size_t i = 0; i < windows.size(); ++i) {
    WindowCompletions done(1);
    engine->Submit(Request(windows[i], done.Callback(0)));
    ASSERT_TRUE(done.WaitAll());
    ASSERT_TRUE(done.result(0).ok()) << done.result(0).status();
    ExpectNear(*done.result(0), Direct(windows[i]));
  }
  EXPECT_THAT(observer.batches(), Each(Eq(1)));
  EXPECT_EQ(observer.batches().size(), windows.size());
  EXPECT_EQ(observer.windows(), static_cast<int>(windows.size()));
}

TEST_F(EngineTest, BusyModelGathersWhatWaitedIntoTheNextBatch) {
  TestObserver observer(/*hold_first_batch=*/true);
  EngineOptions options;
  options.max_batch_size = 8;
  std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(21);
  WindowCompletions done(windows.size());
  engine->Submit(Request(windows[0], done.Callback(0)));
  observer.WaitUntilHolding();  // the model is busy with window 0
  // Many submitters while the model is busy.
  std::vector<std::thread> submitters;
  for (int t = 0; t < 4; ++t) {
    submitters.emplace_back([&, t] {
      for (size_t i = 1 + t; i < windows.size(); i += 4) {
        engine->Submit(Request(windows[i], done.Callback(i)));
      }
    });
  }
  for (std::thread& t : submitters) t.join();
  // Give the feature workers a moment to finish the waiting windows' features
  // (what is not ready yet simply goes into a later batch).
  absl::SleepFor(absl::Milliseconds(200));
  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  for (size_t i = 0; i < windows.size(); ++i) {
    ASSERT_TRUE(done.result(i).ok()) << i << ": " << done.result(i).status();
    ExpectNear(*done.result(i), Direct(windows[i]));
  }
  const std::vector<int> batches = observer.batches();
  EXPECT_EQ(batches.front(), 1);
  EXPECT_GT(*std::max_element(batches.begin(), batches.end()), 1);
  EXPECT_THAT(batches, Each(::testing::Le(options.max_batch_size)));
  int total = 0;
  for (int b : batches) total += b;
  EXPECT_EQ(total, static_cast<int>(windows.size()));
}

TEST_F(EngineTest, BatchedResultsEqualUnbatchedResults) {
  const std::vector<std::vector<float>> windows = SpeechWindows(24);
  // Unbatched: one window per batch.
  std::vector<std::vector<float>> unbatched;
  {
    TestObserver observer;
    EngineOptions options;
    options.max_batch_size = 1;
    std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
    WindowCompletions done(windows.size());
    for (size_t i = 0; i < windows.size(); ++i) {
      engine->Submit(Request(windows[i], done.Callback(i)));
    }
    ASSERT_TRUE(done.WaitAll());
    EXPECT_THAT(observer.batches(), Each(Eq(1)));
    for (size_t i = 0; i < windows.size(); ++i) {
      ASSERT_TRUE(done.result(i).ok()) << done.result(i).status();
      unbatched.push_back(*done.result(i));
    }
  }
  // Batched: windows whose features are ready while the model is busy wait
  // (max_queue_delay) to run together; usually all 24 in one batch, but a
  // slow machine (TSan in CI) may run the first alone.
  TestObserver observer;
  EngineOptions options;
  options.max_batch_size = static_cast<int>(windows.size());
  options.max_queue_delay = absl::Seconds(60);
  std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
  WindowCompletions done(windows.size());
  for (size_t i = 0; i < windows.size(); ++i) {
    engine->Submit(Request(windows[i], done.Callback(i)));
  }
  ASSERT_TRUE(done.WaitAll());
  const std::vector<int> batches = observer.batches();
  EXPECT_THAT(batches, ::testing::Contains(::testing::Gt(1)));
  EXPECT_EQ(std::accumulate(batches.begin(), batches.end(), 0), static_cast<int>(windows.size()));
  for (size_t i = 0; i < windows.size(); ++i) {
    ASSERT_TRUE(done.result(i).ok()) << done.result(i).status();
    ExpectNear(*done.result(i), unbatched[i]);
    float sum = 0;
    for (float p : *done.result(i)) sum += p;
    EXPECT_NEAR(sum, 1.0f, 1e-4);
  }
  // Different windows give different outputs: the comparison is not
  // between constants.
  float difference = 0;
  for (size_t c = 0; c < unbatched[0].size(); ++c) {
    difference = std::max(difference, std::abs(unbatched[0][c] - unbatched[5][c]));
  }
  EXPECT_GT(difference, 1e-4);
}

// Threads of this process (Linux).
int ThreadCount() {
  int count = 0;
  for ([[maybe_unused]] const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    ++count;
  }
  return count;
}

// Engines given one set of feature workers start only their model runners,
// compute the same results as alone, and one shutting down leaves the
// workers serving the other.
TEST_F(EngineTest, EnginesShareOneSetOfFeatureWorkers) {
  absl::StatusOr<std::shared_ptr<FeatureWorkers>> workers = FeatureWorkers::Create(2, 0);
  ASSERT_TRUE(workers.ok()) << workers.status();
  EXPECT_EQ((*workers)->threads(), 2);
  EXPECT_FALSE(FeatureWorkers::Create(-1, 0).ok());
  EngineOptions options;
  options.feature_workers = *workers;
  options.feature_threads = 8;  // ignored: the workers are given
  const int before = ThreadCount();
  std::unique_ptr<Engine> first = MakeEngine(options, nullptr);
  std::unique_ptr<Engine> second = MakeEngine(options, nullptr);
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(ThreadCount() - before, 2);  // one model runner each

  const std::vector<std::vector<float>> windows = SpeechWindows(24);
  WindowCompletions on_first(windows.size()), on_second(windows.size());
  for (size_t i = 0; i < windows.size(); ++i) {
    first->Submit(Request(windows[i], on_first.Callback(i)));
    second->Submit(Request(windows[i], on_second.Callback(i)));
  }
  ASSERT_TRUE(on_first.WaitAll());
  ASSERT_TRUE(on_second.WaitAll());
  for (size_t i = 0; i < windows.size(); ++i) {
    ASSERT_TRUE(on_first.result(i).ok()) << on_first.result(i).status();
    ASSERT_TRUE(on_second.result(i).ok()) << on_second.result(i).status();
    ExpectNear(*on_first.result(i), Direct(windows[i]));
    ExpectNear(*on_second.result(i), *on_first.result(i));
  }

  // The first engine goes while the second has work queued.
  WindowCompletions later(windows.size());
  for (size_t i = 0; i < windows.size(); ++i) {
    second->Submit(Request(windows[i], later.Callback(i)));
  }
  first.reset();
  ASSERT_TRUE(later.WaitAll());
  for (size_t i = 0; i < windows.size(); ++i) {
    ASSERT_TRUE(later.result(i).ok()) << later.result(i).status();
    ExpectNear(*later.result(i), *on_second.result(i));
  }
  second.reset();
  workers->reset();  // the last reference: joins the workers
}

TEST_F(EngineTest, FullQueueRejectsAtOnceWithResourceExhausted) {
  TestObserver observer(/*hold_first_batch=*/true);
  EngineOptions options;
  options.max_queue_size = 4;
  std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(6);
  WindowCompletions done(windows.size());
  engine->Submit(Request(windows[0], done.Callback(0)));
  observer.WaitUntilHolding();  // in the model: no longer queued
  for (size_t i = 1; i <= 4; ++i) engine->Submit(Request(windows[i], done.Callback(i)));
  EXPECT_EQ(engine->queue_depth(), 4);
  engine->Submit(Request(windows[5], done.Callback(5)));
  // Completed inside Submit, before it returned.
  ASSERT_TRUE(done.completed(5));
  EXPECT_EQ(done.result(5).status().code(), absl::StatusCode::kResourceExhausted);
  // A clip is admitted whole or not at all.
  Completions<ClipResult> clip(1);
  ClipRequest request;
  request.samples = clips_[0];
  request.done = clip.Callback(0);
  engine->Classify(std::move(request));
  ASSERT_TRUE(clip.completed(0));
  EXPECT_EQ(clip.result(0).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(engine->queue_depth(), 4);

  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  for (size_t i = 0; i <= 4; ++i) EXPECT_TRUE(done.result(i).ok()) << done.result(i).status();
}

TEST_F(EngineTest, ExpiredRequestsAreDroppedBeforeCompute) {
  TestObserver observer(/*hold_first_batch=*/true);
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(3);
  WindowCompletions done(windows.size());
  // Already expired at submission.
  WindowRequest expired = Request(windows[1], done.Callback(1));
  expired.deadline = absl::InfinitePast();
  engine->Submit(std::move(expired));
  ASSERT_TRUE(done.WaitFor(1));
  // Expires while waiting behind a busy model.
  engine->Submit(Request(windows[0], done.Callback(0)));
  observer.WaitUntilHolding();
  const absl::Time deadline = absl::Now() + absl::Milliseconds(50);
  WindowRequest expiring = Request(windows[2], done.Callback(2));
  expiring.deadline = deadline;
  engine->Submit(std::move(expiring));
  while (absl::Now() <= deadline) absl::SleepFor(absl::Milliseconds(10));
  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  EXPECT_TRUE(done.result(0).ok());
  EXPECT_EQ(done.result(1).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(done.result(2).status().code(), absl::StatusCode::kDeadlineExceeded);
  // Only window 0 reached the model.
  EXPECT_EQ(observer.windows(), 1);
  EXPECT_THAT(observer.batches(), ::testing::ElementsAre(1));
}

TEST_F(EngineTest, CancelledRequestsCompleteWithCancelled) {
  TestObserver observer(/*hold_first_batch=*/true);
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(3);
  WindowCompletions done(windows.size());
  auto before = std::make_shared<CancelFlag>();
  before->Cancel();
  WindowRequest cancelled = Request(windows[1], done.Callback(1));
  cancelled.cancel = before;
  engine->Submit(std::move(cancelled));

  engine->Submit(Request(windows[0], done.Callback(0)));
  observer.WaitUntilHolding();
  auto later = std::make_shared<CancelFlag>();
  WindowRequest waiting = Request(windows[2], done.Callback(2));
  waiting.cancel = later;
  engine->Submit(std::move(waiting));
  // Most likely its features are done by now and it waits for the model;
  // else it is dropped before its features: either way before compute.
  absl::SleepFor(absl::Milliseconds(100));
  later->Cancel();
  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  EXPECT_TRUE(done.result(0).ok());
  EXPECT_EQ(done.result(1).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(done.result(2).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(observer.windows(), 1);
}

TEST_F(EngineTest, RejectsMalformedWindowsAndClips) {
  std::unique_ptr<Engine> engine = MakeEngine({}, nullptr);
  WindowCompletions done(3);
  engine->Submit(Request(std::vector<float>(window() - 1), done.Callback(0)));
  std::vector<float> nan_window(window(), 0.1f);
  nan_window[7] = std::numeric_limits<float>::quiet_NaN();
  engine->Submit(Request(nan_window, done.Callback(1)));
  ASSERT_TRUE(done.completed(0) && done.completed(1));
  EXPECT_EQ(done.result(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(done.result(1).status().code(), absl::StatusCode::kInvalidArgument);

  Completions<ClipResult> clips(3);
  ClipRequest empty;
  empty.done = clips.Callback(0);
  engine->Classify(std::move(empty));
  ClipRequest long_hop;
  long_hop.samples = clips_[0];
  long_hop.hop_seconds = 2 * model()->config().window_seconds;
  long_hop.done = clips.Callback(1);
  engine->Classify(std::move(long_hop));
  ClipRequest nan_clip;
  nan_clip.samples = nan_window;
  nan_clip.done = clips.Callback(2);
  engine->Classify(std::move(nan_clip));
  ASSERT_TRUE(clips.WaitAll());
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(clips.result(i).status().code(), absl::StatusCode::kInvalidArgument) << i;
  }

  EngineOptions bad;
  bad.max_batch_size = 0;
  EXPECT_EQ(Engine::Create(model(), bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(nullptr, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, ShutdownCompletesPendingWorkExactlyOnce) {
  TestObserver observer(/*hold_first_batch=*/true);
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  const std::vector<std::vector<float>> windows = SpeechWindows(40);
  WindowCompletions done(windows.size() + 1);
  engine->Submit(Request(windows[0], done.Callback(0)));
  observer.WaitUntilHolding();
  for (size_t i = 1; i < windows.size(); ++i) {
    engine->Submit(Request(windows[i], done.Callback(i)));
  }
  // No grace: what waits is completed with kUnavailable while the model is
  // still busy with window 0.
  std::thread shutdown([&] { engine->Shutdown(absl::ZeroDuration()); });
  for (size_t i = 1; i < windows.size(); ++i) ASSERT_TRUE(done.WaitFor(i));
  EXPECT_FALSE(done.completed(0));
  observer.Release();
  shutdown.join();
  // After shutdown, submissions are refused at once.
  engine->Submit(Request(windows[1], done.Callback(windows.size())));
  ASSERT_TRUE(done.WaitAll());
  EXPECT_THAT(done.calls(), Each(Eq(1)));
  EXPECT_TRUE(done.result(0).ok()) << done.result(0).status();
  for (size_t i = 1; i <= windows.size(); ++i) {
    EXPECT_EQ(done.result(i).status().code(), absl::StatusCode::kUnavailable) << i;
  }
  EXPECT_EQ(engine->queue_depth(), 0);
  engine.reset();  // a second Shutdown (the destructor's) is harmless
  EXPECT_THAT(done.calls(), Each(Eq(1)));
}

TEST_F(EngineTest, ShutdownWithGraceFinishesQueuedWork) {
  std::unique_ptr<Engine> engine = MakeEngine({}, nullptr);
  const std::vector<std::vector<float>> windows = SpeechWindows(30);
  WindowCompletions done(windows.size());
  for (size_t i = 0; i < windows.size(); ++i) {
    engine->Submit(Request(windows[i], done.Callback(i)));
  }
  engine->Shutdown(kPatience);
  // Everything completed before Shutdown returned, with results.
  for (size_t i = 0; i < windows.size(); ++i) {
    ASSERT_TRUE(done.completed(i));
    EXPECT_TRUE(done.result(i).ok()) << done.result(i).status();
  }
}

// Several threads submit windows and clips at random: valid, expired,
// expiring, cancelled, malformed, more than the queue holds; the engine is
// shut down while work is pending. Every request completes exactly once.
TEST_F(EngineTest, RandomSubmissionsFromManyThreadsCompleteExactlyOnce) {
  EngineOptions options;
  options.max_queue_size = 48;
  options.max_batch_size = 16;
  std::unique_ptr<Engine> engine = MakeEngine(options, nullptr);
  const std::vector<std::vector<float>> windows = SpeechWindows(16);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 600;
  // Each request's outcome: its status, or on success how many
  // probabilities it returned.
  Completions<size_t> done(kThreads * kPerThread);
  std::atomic<int> clips_sent{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      for (int k = 0; k < kPerThread; ++k) {
        const size_t id = static_cast<size_t>(t) * kPerThread + k;
        std::function<void(absl::StatusOr<size_t>)> record = done.Callback(id);
        const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
        if (kind == 9) {  // a clip, 1 to 4 s
          ClipRequest clip;
          const auto& source = windows[rng() % windows.size()];
          const int repeats = 1 + rng() % 4;
          for (int r = 0; r < repeats; ++r) {
            clip.samples.insert(clip.samples.end(), source.begin(), source.end());
          }
          if (rng() % 4 == 0) clip.deadline = absl::Now() + absl::Milliseconds(rng() % 20);
          clip.done = [record](absl::StatusOr<ClipResult> result) {
            record(result.ok() ? absl::StatusOr<size_t>(result->probabilities.size())
                               : result.status());
          };
          ++clips_sent;
          engine->Classify(std::move(clip));
          continue;
        }
        WindowRequest request = Request(
            kind == 8 ? std::vector<float>(3) : windows[rng() % windows.size()],
            [record](absl::StatusOr<std::vector<float>> result) {
              record(result.ok() ? absl::StatusOr<size_t>(result->size()) : result.status());
            });
        if (kind == 5) request.deadline = absl::InfinitePast();
        if (kind == 6) request.deadline = absl::Now() + absl::Milliseconds(rng() % 30);
        std::shared_ptr<CancelFlag> cancel;
        if (kind == 7) {
          cancel = std::make_shared<CancelFlag>();
          if (rng() % 2 == 0) cancel->Cancel();
          request.cancel = cancel;
        }
        engine->Submit(std::move(request));
        if (cancel != nullptr) cancel->Cancel();
        absl::SleepFor(absl::Microseconds(rng() % 1000));  // about 2000/s in all
      }
    });
  }
  // Shut down while the submitters may still run: late ones get
  // kUnavailable.
  absl::SleepFor(absl::Milliseconds(300));
  engine->Shutdown(absl::Milliseconds(100));
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(done.WaitAll());
  EXPECT_THAT(done.calls(), Each(Eq(1)));
  std::map<absl::StatusCode, int> outcomes;
  for (size_t id = 0; id < kThreads * kPerThread; ++id) {
    const absl::StatusOr<size_t>& result = done.result(id);
    ++outcomes[result.status().code()];
    if (result.ok()) {
      EXPECT_EQ(*result, 3u);
    }
  }
  EXPECT_GT(outcomes[absl::StatusCode::kOk], 0);
  EXPECT_GT(outcomes[absl::StatusCode::kInvalidArgument], 0);
#if !defined(__SANITIZE_THREAD__)
  // Under TSan the engine is so slow that the queue is full or shut down
  // before past deadlines are looked at; there the test is about races and
  // exactly-once completion.
  EXPECT_GT(outcomes[absl::StatusCode::kDeadlineExceeded], 0);
#endif
  EXPECT_GT(clips_sent.load(), 0);
  EXPECT_EQ(engine->queue_depth(), 0);
  // Informational: the rest of the mix depends on timing.
  for (const auto& [code, count] : outcomes) {
    std::printf("%s: %d\n", absl::StatusCodeToString(code).c_str(), count);
  }
}

// Long audio: speech, digital silence, speech.
TEST_F(EngineTest, LongAudioWindowsTimelineAndAggregation) {
  TestObserver observer;
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  const double rate = model()->config().sample_rate;
  std::vector<float> audio = clips_[0];
  audio.insert(audio.end(), static_cast<size_t>(2.5 * rate), 0.0f);
  audio.insert(audio.end(), clips_[1].begin(), clips_[1].end());

  Completions<ClipResult> done(1);
  ClipRequest request;
  request.samples = audio;
  request.hop_seconds = 0.25;
  request.done = done.Callback(0);
  engine->Classify(std::move(request));
  ASSERT_TRUE(done.WaitAll());
  ASSERT_TRUE(done.result(0).ok()) << done.result(0).status();
  const ClipResult& result = *done.result(0);

  const size_t hop = static_cast<size_t>(0.25 * rate);
  const std::vector<size_t> starts = WindowStarts(audio.size(), window(), hop);
  ASSERT_EQ(result.windows.size(), starts.size());
  EXPECT_DOUBLE_EQ(result.duration_seconds, audio.size() / rate);
  int speech = 0, silent_in_gap = 0;
  std::vector<float> speech_rows;
  for (size_t i = 0; i < starts.size(); ++i) {
    const WindowResult& w = result.windows[i];
    EXPECT_DOUBLE_EQ(w.start_seconds, starts[i] / rate);
    EXPECT_DOUBLE_EQ(w.end_seconds, std::min(starts[i] + window(), audio.size()) / rate);
    std::vector<float> samples(window());
    CopyWindow(audio, starts[i], window(), samples.data());
    EXPECT_EQ(w.speech, RmsDbfs(samples) >= engine->options().vad_threshold_dbfs) << i;
    if (w.speech) {
      ++speech;
      ExpectNear(w.probabilities, Direct(samples));
      speech_rows.insert(speech_rows.end(), w.probabilities.begin(), w.probabilities.end());
    } else {
      EXPECT_TRUE(w.probabilities.empty()) << i;
    }
    // Windows wholly inside the digital silence are silent.
    if (starts[i] >= clips_[0].size() && starts[i] + window() <= clips_[0].size() + 2.5 * rate) {
      EXPECT_FALSE(w.speech) << i;
      ++silent_in_gap;
    }
  }
  EXPECT_GE(silent_in_gap, 3);
  EXPECT_GT(speech, 4);
  EXPECT_EQ(result.speech_windows, speech);
  // Silent windows never reached the model.
  EXPECT_EQ(observer.windows(), speech);
  ExpectNear(result.probabilities, MeanProbabilities(speech_rows, model()->num_classes()));
  // The last window is padded and ends with the audio.
  EXPECT_DOUBLE_EQ(result.windows.back().end_seconds, audio.size() / rate);
  EXPECT_GE(result.windows.back().start_seconds + model()->config().window_seconds,
            audio.size() / rate);
}

TEST_F(EngineTest, DefaultHopIsHalfAWindowAndShortClipsArePadded) {
  std::unique_ptr<Engine> engine = MakeEngine({}, nullptr);
  const double rate = model()->config().sample_rate;
  Completions<ClipResult> done(2);
  ClipRequest long_clip;
  long_clip.samples = clips_[2];
  long_clip.vad_threshold_dbfs = -std::numeric_limits<double>::infinity();
  long_clip.done = done.Callback(0);
  engine->Classify(std::move(long_clip));
  ClipRequest short_clip;
  const size_t short_size = static_cast<size_t>(0.4 * rate);
  short_clip.samples.assign(clips_[2].begin() + clips_[2].size() / 2,
                            clips_[2].begin() + clips_[2].size() / 2 + short_size);
  const std::vector<float> short_samples = short_clip.samples;
  short_clip.done = done.Callback(1);
  engine->Classify(std::move(short_clip));
  ASSERT_TRUE(done.WaitAll());
  ASSERT_TRUE(done.result(0).ok()) << done.result(0).status();
  ASSERT_TRUE(done.result(1).ok()) << done.result(1).status();

  const ClipResult& long_result = *done.result(0);
  const std::vector<size_t> starts = WindowStarts(clips_[2].size(), window(), window() / 2);
  ASSERT_EQ(long_result.windows.size(), starts.size());
  ASSERT_GE(starts.size(), 3u);
  EXPECT_DOUBLE_EQ(long_result.windows[1].start_seconds, 0.5 * model()->config().window_seconds);
  // VAD disabled: every window is speech.
  EXPECT_EQ(long_result.speech_windows, static_cast<int>(starts.size()));

  const ClipResult& short_result = *done.result(1);
  ASSERT_EQ(short_result.windows.size(), 1u);
  EXPECT_DOUBLE_EQ(short_result.windows[0].start_seconds, 0.0);
  EXPECT_DOUBLE_EQ(short_result.windows[0].end_seconds, short_size / rate);
  std::vector<float> padded(window(), 0.0f);
  std::copy(short_samples.begin(), short_samples.end(), padded.begin());
  ASSERT_TRUE(short_result.windows[0].speech);
  ExpectNear(short_result.probabilities, Direct(padded));
}

// No window holds speech: all are classified anyway, so that a quiet clip
// still gets a result.
TEST_F(EngineTest, AllSilentClipFallsBackToEveryWindow) {
  TestObserver observer;
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  // Speech attenuated to about -75 dBFS, then digital silence.
  std::vector<float> quiet = clips_[3];
  for (float& x : quiet) x *= 1e-3f;
  quiet.insert(quiet.end(), window(), 0.0f);
  Completions<ClipResult> done(1);
  ClipRequest request;
  request.samples = quiet;
  request.done = done.Callback(0);
  engine->Classify(std::move(request));
  ASSERT_TRUE(done.WaitAll());
  ASSERT_TRUE(done.result(0).ok()) << done.result(0).status();
  const ClipResult& result = *done.result(0);
  EXPECT_EQ(result.speech_windows, 0);
  std::vector<float> rows;
  for (const WindowResult& w : result.windows) {
    EXPECT_FALSE(w.speech);
    ASSERT_EQ(w.probabilities.size(), static_cast<size_t>(model()->num_classes()));
    rows.insert(rows.end(), w.probabilities.begin(), w.probabilities.end());
  }
  EXPECT_EQ(observer.windows(), static_cast<int>(result.windows.size()));
  ExpectNear(result.probabilities, MeanProbabilities(rows, model()->num_classes()));
}

TEST_F(EngineTest, AFailingWindowFailsItsClipOnce) {
  TestObserver observer(/*hold_first_batch=*/true);
  std::unique_ptr<Engine> engine = MakeEngine({}, &observer);
  WindowCompletions blocker(1);
  engine->Submit(Request(SpeechWindows(1)[0], blocker.Callback(0)));
  observer.WaitUntilHolding();
  Completions<ClipResult> done(1);
  auto cancel = std::make_shared<CancelFlag>();
  ClipRequest request;
  request.samples = clips_[0];
  request.samples.insert(request.samples.end(), clips_[1].begin(), clips_[1].end());
  request.cancel = cancel;
  request.done = done.Callback(0);
  engine->Classify(std::move(request));
  cancel->Cancel();
  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  ASSERT_TRUE(blocker.WaitAll());
  engine->Shutdown();
  EXPECT_EQ(done.result(0).status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(done.calls(), Each(Eq(1)));
  EXPECT_EQ(observer.windows(), 1);  // only the blocker
}

// A short clip queued behind a long one waits for about one batch, not for
// the long clip: clips take turns for features, which run at most a batch
// ahead of the model.
TEST_F(EngineTest, AShortClipBehindALongOneWaitsForAboutOneBatch) {
  TestObserver observer(/*hold_first_batch=*/true);
  EngineOptions options;
  options.max_batch_size = 4;
  // One feature worker takes windows strictly in turn order, so the count
  // below does not depend on how the threads are scheduled (with two, a
  // starved worker holding the short clip's window lets the other prepare
  // more of the long clip's).
  options.feature_threads = 1;
  std::unique_ptr<Engine> engine = MakeEngine(options, &observer);
  WindowCompletions blocker(1);
  engine->Submit(Request(SpeechWindows(1)[0], blocker.Callback(0)));
  observer.WaitUntilHolding();

  // 60 s at a quarter-second hop: over two hundred windows.
  std::vector<float> long_audio;
  while (long_audio.size() < 60 * model()->config().sample_rate) {
    for (const std::vector<float>& clip : clips_) {
      long_audio.insert(long_audio.end(), clip.begin(), clip.end());
    }
  }
  Completions<ClipResult> done(2);
  ClipRequest long_clip;
  long_clip.samples = long_audio;
  long_clip.hop_seconds = 0.25;
  long_clip.vad_threshold_dbfs = -std::numeric_limits<double>::infinity();
  long_clip.done = done.Callback(0);
  engine->Classify(std::move(long_clip));

  std::atomic<int> windows_before_short{-1};
  std::atomic<bool> long_done_before_short{false};
  ClipRequest short_clip;
  short_clip.samples = clips_[1];
  short_clip.samples.resize(window());
  short_clip.vad_threshold_dbfs = -std::numeric_limits<double>::infinity();
  auto record = done.Callback(1);
  short_clip.done = [&, record](absl::StatusOr<ClipResult> result) {
    windows_before_short = observer.windows();
    long_done_before_short = done.completed(0);
    record(std::move(result));
  };
  engine->Classify(std::move(short_clip));
  observer.Release();
  ASSERT_TRUE(done.WaitAll());
  ASSERT_TRUE(done.result(0).ok()) << done.result(0).status();
  ASSERT_TRUE(done.result(1).ok()) << done.result(1).status();
  const int long_windows = static_cast<int>(done.result(0)->windows.size());
  ASSERT_GT(long_windows, 200);
  EXPECT_FALSE(long_done_before_short);
  // The blocker, the batch of long windows prepared while it ran, at most
  // one more of the long clip's, and the short clip's own window.
  EXPECT_LE(windows_before_short, 1 + 2 * options.max_batch_size + 1);
  EXPECT_EQ(observer.windows(), 1 + long_windows + 1);
}

TEST_F(EngineTest, HopsBelowTheMinimumAndClipsOverTheQueueAreRefused) {
  EngineOptions options;
  options.min_hop_seconds = 0.5;
  options.max_queue_size = 100;
  std::unique_ptr<Engine> engine = MakeEngine(options, nullptr);
  const int rate = model()->config().sample_rate;
  Completions<ClipResult> done(3);
  ClipRequest fine_hop;
  fine_hop.samples = clips_[0];
  fine_hop.hop_seconds = 1.0 / rate;  // one sample: thousands of windows
  fine_hop.done = done.Callback(0);
  engine->Classify(std::move(fine_hop));
  // 60 s at the minimum hop: 119 windows, more than the queue holds.
  ClipRequest too_long;
  too_long.samples.assign(60 * rate, 0.1f);
  too_long.hop_seconds = 0.5;
  too_long.done = done.Callback(1);
  engine->Classify(std::move(too_long));
  ClipRequest at_minimum;
  at_minimum.samples = clips_[0];
  at_minimum.hop_seconds = 0.5;
  at_minimum.done = done.Callback(2);
  engine->Classify(std::move(at_minimum));
  ASSERT_TRUE(done.WaitAll());
  EXPECT_EQ(done.result(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(done.result(0).status().message()),
              ::testing::HasSubstr("a value in [0.5, 1] seconds"));
  EXPECT_EQ(done.result(1).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(done.result(1).status().message()),
              ::testing::HasSubstr("the audio makes 119 windows at this hop; a call may make at "
                                   "most 100"));
  ASSERT_TRUE(done.result(2).ok()) << done.result(2).status();
  EXPECT_EQ(done.result(2)->windows.size(),
            WindowStarts(clips_[0].size(), window(), rate / 2).size());
}

TEST_F(EngineTest, AbsurdSamplesAreRefused) {
  std::unique_ptr<Engine> engine = MakeEngine({}, nullptr);
  std::vector<float> samples = SpeechWindows(1)[0];
  samples[100] = 1e30f;
  WindowCompletions window_done(1);
  engine->Submit(Request(samples, window_done.Callback(0)));
  Completions<ClipResult> clip_done(1);
  ClipRequest clip;
  clip.samples = samples;
  clip.done = clip_done.Callback(0);
  engine->Classify(std::move(clip));
  ASSERT_TRUE(window_done.WaitAll());
  ASSERT_TRUE(clip_done.WaitAll());
  for (const absl::Status& status :
       {window_done.result(0).status(), clip_done.result(0).status()}) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("sample of 1e+30"));
  }
}

// A model that returns NaN for real input: the windows fail with INTERNAL
// and no NaN reaches a result.
TEST_F(EngineTest, AModelThatReturnsNanFailsTheWindowNotTheEngine) {
  const std::string dir =
      (std::filesystem::path(::testing::TempDir()) / "nan_model").string();
  ASSERT_TRUE(testing::WriteScriptedModel(testing::SmallModelConfig(), dir,
                                          R"(    p = torch.softmax(torch.zeros(x.size(0), 3), dim=1)
    real = x.abs().amax(dim=[1, 2, 3]) > 1.0
    return torch.where(real.unsqueeze(1), torch.full_like(p, float("nan")), p)
)")
                  .ok());
  absl::StatusOr<std::unique_ptr<Model>> nan_model = Model::Load(dir);
  ASSERT_TRUE(nan_model.ok()) << nan_model.status();  // the dry run passes
  EngineOptions options;
  options.feature_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create(std::shared_ptr<const Model>(*std::move(nan_model)), options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  Completions<ClipResult> done(2);
  for (int i = 0; i < 2; ++i) {
    ClipRequest clip;
    clip.samples = clips_[i];
    clip.done = done.Callback(i);
    (*engine)->Classify(std::move(clip));
  }
  ASSERT_TRUE(done.WaitAll());
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(done.result(i).status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(std::string(done.result(i).status().message()),
                ::testing::HasSubstr("the model returned nan as a probability"));
  }
}

TEST(WindowCountTest, AgreesWithWindowStarts) {
  for (size_t samples : {1, 15999, 16000, 16001, 40000, 123457}) {
    for (size_t hop : {1, 7, 4000, 8000, 16000}) {
      EXPECT_EQ(WindowCount(samples, 16000, hop), WindowStarts(samples, 16000, hop).size())
          << samples << " " << hop;
    }
  }
}

TEST(RmsDbfsTest, LevelsOfKnownSignals) {
  EXPECT_EQ(RmsDbfs(std::vector<float>(100, 0.0f)), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(RmsDbfs({}), -std::numeric_limits<double>::infinity());
  EXPECT_NEAR(RmsDbfs(std::vector<float>(100, 1.0f)), 0.0, 1e-9);
  // A full-scale sine is 3.01 dB below a full-scale square.
  EXPECT_NEAR(RmsDbfs(testing::Sine(440, 1.0, 16000, 1.0)), -3.0103, 1e-3);
  EXPECT_NEAR(RmsDbfs(testing::Sine(440, 0.01, 16000, 1.0)), -43.0103, 1e-3);
}

}  // namespace
}  // namespace emoserve
