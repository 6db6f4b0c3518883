// The inference engine: windows of audio from many callers -> features on a
// worker pool -> dynamic batches on the model -> completions by callback.
// No gRPC here; the server adapts requests to this interface.
#ifndef EMOSERVE_CORE_ENGINE_H_
#define EMOSERVE_CORE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/memory_budget.h"
#include "core/model.h"
#include "core/speaker_statistics.h"
#include "core/windowing.h"

namespace emoserve {

class FeatureWorkers;

struct EngineOptions {
  // Largest batch handed to the model.
  int max_batch_size = 32;
  // Windows waiting (for features or for the model) beyond which new
  // submissions are rejected at once with kResourceExhausted.
  int max_queue_size = 2048;
  // 0: a batch runs as soon as the model is free, with whatever waited (no
  // added latency when idle). > 0: while fewer than max_batch_size windows
  // wait, the runner waits up to this long for more.
  absl::Duration max_queue_delay = absl::ZeroDuration();
  // Feature worker threads; 0 = one per core. Ignored with
  // `feature_workers`.
  int feature_threads = 0;
  // Niceness (0..19) of the feature workers, so that they yield the cores to
  // the model: features have slack, while the model's OpenMP team stalls at
  // every barrier whenever one of its threads is preempted. 0 = same
  // priority as the rest of the process.
  int feature_thread_nice = 19;
  // Workers shared with other engines (e.g. every loaded version of a
  // model repository), so that the threads computing features stay one set
  // however many engines exist. Null: the engine starts its own.
  std::shared_ptr<FeatureWorkers> feature_workers;
  // Model runner threads, each running whole batches on LibTorch's
  // intra-op threads (process-wide: SetUpModelRuntime); 1 suits two cores
  // (one for the model, one for the features). More cores than the
  // features need want more runners.
  int model_instances = 1;
  // Default voice-activity threshold: windows whose RMS level (dBFS) is
  // below it are silence and skip the model.
  double vad_threshold_dbfs = kDefaultVadThresholdDbfs;
  // The smallest hop a clip or stream may ask for: the model's cost per
  // second of audio is proportional to 1 / hop.
  double min_hop_seconds = 0.25;
};

// Stage timings, for metrics. Called on engine threads: keep it cheap and
// thread-safe.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // Once per window that reached the model: time queued (submission to the
  // start of its batch, less feature time) and feature time.
  virtual void OnWindow(absl::Duration /*queue_wait*/, absl::Duration /*features*/) {}
  // Once per batch run.
  virtual void OnBatch(int /*batch_size*/, absl::Duration /*inference*/) {}
  // Windows waiting, after each change.
  virtual void OnQueueDepth(int /*depth*/) {}
};

// Threads that compute window features for one or more engines: each
// thread takes the engines in turn, one window at a time, from those that
// want features (see Engine::Classify's fairness). Engines register at
// Create and leave at Shutdown; the workers end with the last reference.
class FeatureWorkers {
 public:
  // `threads` 0 = one per core; `nice` as EngineOptions::feature_thread_nice.
  static absl::StatusOr<std::shared_ptr<FeatureWorkers>> Create(int threads, int nice);
  ~FeatureWorkers();  // joins the threads
  int threads() const { return static_cast<int>(threads_.size()); }

  // What a worker asks of an engine.
  class Source {
   public:
    virtual ~Source() = default;
    // Computes one window's features if the engine wants some now (using
    // `scratch`); false when it wants none.
    virtual bool ComputeOne(std::vector<float>& scratch) = 0;
  };
  void Add(Source* source);
  // Returns once no worker is inside `source` any more.
  void Remove(Source* source);
  // `source` wants features for `windows` more windows. Never locks an
  // engine, so an engine may call it under its own lock.
  void Wake(int windows);

 private:
  struct Entry;
  explicit FeatureWorkers(int nice) : nice_(nice) {}
  void Work();

  const int nice_;
  absl::Mutex mu_;
  absl::CondVar wake_cv_;
  absl::CondVar left_cv_;  // Remove waits here for workers to leave a source
  std::vector<std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  size_t next_ ABSL_GUARDED_BY(mu_) = 0;          // the entry to try first
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // bumped by Wake
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

// Set by the caller (e.g. a cancelled RPC); the engine drops the work before
// compute and completes it with kCancelled.
class CancelFlag {
 public:
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> cancelled_{false};
};

// Every callback below is called exactly once, on an engine thread or inline
// in the submitting call (for an immediate rejection); it must not throw.
// Statuses: kResourceExhausted (queue full, or memory ran out), kDeadlineExceeded,
// kCancelled, kUnavailable (shutting down), kInvalidArgument, kInternal (the
// model failed or returned something that is not probabilities). A request
// without `done` is ignored.
struct WindowRequest {
  // Exactly model.config().window_samples() samples at the model's rate.
  std::vector<float> samples;
  // Windows of one flow (Engine::NewFlow, e.g. a stream's) take their turn
  // with other flows as one; 0 is a flow of its own.
  uint64_t flow = 0;
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<const CancelFlag> cancel;  // may be null
  // Speaker-normalised models only (Model::summary_size() > 0; others
  // answer kFailedPrecondition): when set, receives the window's summary
  // (Model::Summarize) before `done` is called with its unadapted
  // probabilities.
  std::shared_ptr<std::vector<float>> summary;
  // Probabilities in the model's label order.
  std::function<void(absl::StatusOr<std::vector<float>>)> done;
};

struct WindowResult {
  double start_seconds = 0;
  double end_seconds = 0;
  bool speech = false;
  // Empty when the window skipped the model: silent windows do, unless no
  // window of the clip holds speech (then every window is classified).
  std::vector<float> probabilities;
};

struct ClipResult {
  // Mean over the windows that hold speech (over all windows when none
  // does), in the model's label order.
  std::vector<float> probabilities;
  std::vector<WindowResult> windows;
  int speech_windows = 0;
  double duration_seconds = 0;
  // Whether the windows were answered adapted to ClipRequest::speaker_mean.
  bool speaker_adapted = false;
  // ClipRequest::speaker_statistics plus the summaries of the clip's speech
  // windows, when it was set.
  std::optional<SpeakerStatistics> speaker_statistics;
};

// Voice activity is judged per window: its RMS level over the whole window
// (zero padding included) against the threshold.
struct ClipRequest {
  std::vector<float> samples;  // mono at the model's rate; not empty
  // What `samples` are charged to (may be null): released when the engine
  // frees them, which can be after `done` for windows still queued.
  std::shared_ptr<BudgetLease> lease;
  double hop_seconds = 0;      // 0 = half the model's window; at most a window
  // Overrides EngineOptions::vad_threshold_dbfs when set; -inf disables VAD.
  std::optional<double> vad_threshold_dbfs;
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<const CancelFlag> cancel;
  // Speaker-normalised models only (kFailedPrecondition otherwise). When
  // not empty, every window is answered adapted to this voice's mean
  // summary (Model::PredictFromSummaries; summary_size() floats).
  std::vector<float> speaker_mean;
  // When set, ClipResult::speaker_statistics is these plus the clip's
  // speech windows (their mean, summed in double whatever order they
  // complete in: the same, to float rounding, as a stream adding them).
  std::optional<SpeakerStatistics> speaker_statistics;
  std::function<void(absl::StatusOr<ClipResult>)> done;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      std::shared_ptr<const Model> model, const EngineOptions& options,
      EngineObserver* observer = nullptr);
  // Shuts down (see Shutdown) and joins the threads.
  ~Engine();

  // Never blocks on compute.
  void Submit(WindowRequest request);
  // Splits into windows (all windows of all clips share the batcher) and
  // aggregates. Clips shorter than a window are zero-padded. A clip is
  // admitted whole or rejected whole (kResourceExhausted: the queue is full,
  // or the clip alone makes more windows than it holds); its first failing
  // window fails it and stops its other windows.
  //
  // Fairness: each clip (and each flow of Submit) is a queue of its own, and
  // features are computed for the queues in turn, at most a batch per model
  // runner ahead of the model; so a short clip queued behind a long one
  // waits for about one batch, not for the long clip.
  void Classify(ClipRequest request);
  // A new flow id for WindowRequest::flow.
  uint64_t NewFlow();

  // Stops accepting work (new submissions get kUnavailable), finishes what
  // was queued within `grace`, then completes the rest with kUnavailable.
  // Idempotent; not to be called from an engine callback.
  void Shutdown(absl::Duration grace = absl::Seconds(10));

  const Model& model() const;
  const EngineOptions& options() const;
  int queue_depth() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// RMS level of `samples` in dBFS (-inf for digital silence).
double RmsDbfs(absl::Span<const float> samples);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_ENGINE_H_
