#include "core/engine.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "core/audio.h"
#include "core/exceptions.h"
#include "core/features.h"
#include "core/windowing.h"

namespace emoserve {
namespace {

using ProbabilitiesCallback =
    std::function<void(absl::StatusOr<std::vector<float>>)>;

// One window on its way through the engine: raw queue -> a feature worker
// -> ready queue -> a model runner's batch -> `done`.
struct Job {
  // The window is source[start, start + window), zero-padded past the end;
  // clips share one source among their windows instead of copying each.
  std::shared_ptr<const std::vector<float>> source;
  size_t start = 0;
  uint64_t flow = 0;
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<const CancelFlag> cancel;
  // Set when the job belongs to a clip that has already failed.
  std::shared_ptr<const CancelFlag> group_cancel;
  // Speaker-normalised models: the mean summary to adapt the window to,
  // and where its summary goes (each may be null).
  std::shared_ptr<const std::vector<float>> speaker_mean;
  std::shared_ptr<std::vector<float>> summary;
  ProbabilitiesCallback done;

  absl::Time submitted;
  absl::Time ready;  // when its features were done
  absl::Duration feature_time;
  FeatureMatrix features;
};

using JobList = std::vector<std::unique_ptr<Job>>;

// OK while the job is still wanted, else the status to complete it with.
absl::Status DropReason(const Job& job, absl::Time now) {
  if ((job.cancel != nullptr && job.cancel->cancelled()) ||
      (job.group_cancel != nullptr && job.group_cancel->cancelled())) {
    return absl::CancelledError("the request was cancelled");
  }
  if (now >= job.deadline) {
    return absl::DeadlineExceededError(
        "the request's deadline passed before its window reached the model");
  }
  return absl::OkStatus();
}

void CompleteAll(JobList& jobs, const absl::Status& status) {
  for (std::unique_ptr<Job>& job : jobs) job->done(status);
  jobs.clear();
}

// OK when `row` (one window's output) is probabilities: finite, in [0, 1],
// summing to 1.
absl::Status CheckProbabilities(absl::Span<const float> row) {
  double sum = 0.0;
  for (float p : row) {
    if (!std::isfinite(p) || p < -1e-6f || p > 1.0f + 1e-6f) {
      return absl::InternalError(absl::StrCat(
          "the model returned ", p,
          " as a probability for a window of finite audio; the model is faulty "
          "for this input"));
    }
    sum += p;
  }
  if (std::abs(sum - 1.0) > 1e-3) {
    return absl::InternalError(absl::StrCat(
        "the model returned probabilities that sum to ", sum,
        " for a window; the model is faulty for this input"));
  }
  return absl::OkStatus();
}

int DefaultThreads(int requested) {
  if (requested > 0) return requested;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// A clip's windows complete independently, on any engine thread; the clip
// completes once, with its first error or after its last window. Shared by
// the windows' callbacks so that late completions after an error are safe.
class ClipState {
 public:
  ClipState(ClipResult result, int pending, int num_classes,
            std::function<void(absl::StatusOr<ClipResult>)> done)
      : result_(std::move(result)),
        pending_(pending),
        num_classes_(num_classes),
        done_(std::move(done)) {
    if (result_.speaker_statistics.has_value()) {
      summary_sum_.assign(result_.speaker_statistics->width(), 0.0);
    }
  }

  // Stops the clip's windows that have not reached the model yet.
  std::shared_ptr<const CancelFlag> abandon() const { return abandon_; }

  // `summary`: the window's, when the clip's statistics are wanted.
  void OnWindow(size_t index, absl::StatusOr<std::vector<float>> probabilities,
                std::vector<float> summary) {
    std::function<void(absl::StatusOr<ClipResult>)> done;
    absl::StatusOr<ClipResult> outcome;
    {
      absl::MutexLock lock(&mu_);
      if (done_ == nullptr) return;  // already completed
      if (!probabilities.ok()) {
        abandon_->Cancel();
        outcome = probabilities.status();
      } else {
        result_.windows[index].probabilities = *std::move(probabilities);
        if (!summary.empty() && result_.windows[index].speech) AddSummary(summary);
        if (--pending_ > 0) return;
        try {
          outcome = Aggregate();
        } catch (...) {
          outcome = StatusFromCurrentException("aggregating the windows");
        }
      }
      done = std::move(done_);
      done_ = nullptr;
    }
    done(std::move(outcome));
  }

 private:
  absl::StatusOr<ClipResult> Aggregate() {
    std::vector<float> rows;
    for (const WindowResult& window : result_.windows) {
      rows.insert(rows.end(), window.probabilities.begin(), window.probabilities.end());
    }
    result_.probabilities = MeanProbabilities(rows, num_classes_);
    if (summary_windows_ > 0) {
      std::vector<float> mean(summary_sum_.size());
      for (size_t k = 0; k < mean.size(); ++k) {
        mean[k] = static_cast<float>(summary_sum_[k] / summary_windows_);
      }
      if (absl::Status added = result_.speaker_statistics->AddMean(mean, summary_windows_);
          !added.ok()) {
        return added;
      }
    }
    return std::move(result_);
  }

  // A speech window's summary, whatever order the windows complete in: a
  // double sum keeps the clip's mean the same to float precision.
  void AddSummary(absl::Span<const float> summary) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (summary.size() != summary_sum_.size()) return;  // never: Summarize checks the width
    for (size_t k = 0; k < summary.size(); ++k) summary_sum_[k] += summary[k];
    ++summary_windows_;
  }

  absl::Mutex mu_;
  ClipResult result_;
  // The sum of the speech windows' summaries, while the clip's statistics
  // are wanted: a fixed size, whatever the clip's length.
  std::vector<double> summary_sum_;
  int64_t summary_windows_ = 0;
  int pending_;
  const int num_classes_;
  std::function<void(absl::StatusOr<ClipResult>)> done_;
  const std::shared_ptr<CancelFlag> abandon_ = std::make_shared<CancelFlag>();
};

// The speaker fields of a clip request, against the model.
absl::Status CheckSpeakerRequest(const Model& model, const ClipRequest& request) {
  if (request.speaker_mean.empty() && !request.speaker_statistics.has_value()) {
    return absl::OkStatus();
  }
  if (absl::Status adapts = CheckAdaptsToSpeakers(model, "speaker statistics"); !adapts.ok()) {
    return adapts;
  }
  const size_t width = static_cast<size_t>(model.summary_size());
  if (!request.speaker_mean.empty() && request.speaker_mean.size() != width) {
    return absl::InvalidArgumentError(absl::StrCat("a speaker mean of ",
                                                   request.speaker_mean.size(),
                                                   " values for summaries of ", width));
  }
  if (request.speaker_statistics.has_value() &&
      static_cast<size_t>(request.speaker_statistics->width()) != width) {
    return absl::InvalidArgumentError(absl::StrCat("speaker statistics of width ",
                                                   request.speaker_statistics->width(),
                                                   " for summaries of ", width));
  }
  return absl::OkStatus();
}

}  // namespace

double RmsDbfs(absl::Span<const float> samples) {
  return WindowDbfs(samples, 0, samples.size());
}

struct Engine::Impl : FeatureWorkers::Source {
  std::shared_ptr<const Model> model;
  EngineOptions options;
  EngineObserver* observer = nullptr;
  std::unique_ptr<FeatureExtractor> extractor;
  size_t window = 0;  // samples at the model's rate

  mutable absl::Mutex mu;
  absl::CondVar ready_cv;  // model runners wait here for ready jobs
  absl::CondVar idle_cv;   // Shutdown waits here for the pipeline to drain
  // Jobs waiting for features, by flow; `turns` holds each flow that has
  // some, in the order of their next turn (round robin).
  absl::flat_hash_map<uint64_t, std::deque<std::unique_ptr<Job>>> raw ABSL_GUARDED_BY(mu);
  std::deque<uint64_t> turns ABSL_GUARDED_BY(mu);
  size_t raw_count ABSL_GUARDED_BY(mu) = 0;
  // Jobs with features, in the order they got them.
  std::deque<std::unique_ptr<Job>> ready ABSL_GUARDED_BY(mu);
  // Features are computed at most this many jobs ahead of the model (ready
  // plus in progress): a batch per runner. More would only make later
  // flows wait and hold more feature matrices.
  size_t lookahead = 0;
  std::atomic<uint64_t> next_flow{1};
  int in_features ABSL_GUARDED_BY(mu) = 0;  // held by feature workers
  int in_batches ABSL_GUARDED_BY(mu) = 0;   // in batches being run
  int idle_runners ABSL_GUARDED_BY(mu) = 0;  // runners waiting for work
  bool accepting ABSL_GUARDED_BY(mu) = true;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  // Windows waiting for features or for the model; readable without mu so
  // that observers may call queue_depth().
  std::atomic<int> depth{0};
  std::vector<std::thread> threads;  // model runners
  std::shared_ptr<FeatureWorkers> workers;

  absl::Mutex shutdown_mu;  // serialises Shutdown calls
  bool shut_down ABSL_GUARDED_BY(shutdown_mu) = false;

  void UpdateDepthLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const int now = static_cast<int>(raw_count + ready.size()) + in_features;
    if (depth.exchange(now, std::memory_order_relaxed) != now && observer != nullptr) {
      observer->OnQueueDepth(now);
    }
    if (now == 0 && in_batches == 0) idle_cv.SignalAll();
  }

  void PushRawLocked(std::unique_ptr<Job> job) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::deque<std::unique_ptr<Job>>& queue = raw[job->flow];
    if (queue.empty()) turns.push_back(job->flow);
    queue.push_back(std::move(job));
    ++raw_count;
  }

  // The next flow's oldest raw job; that flow then goes to the back.
  std::unique_ptr<Job> PopRawLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const uint64_t flow = turns.front();
    turns.pop_front();
    auto it = raw.find(flow);
    std::unique_ptr<Job> job = std::move(it->second.front());
    it->second.pop_front();
    --raw_count;
    if (it->second.empty()) {
      raw.erase(it);
    } else {
      turns.push_back(flow);
    }
    return job;
  }

  bool FeaturesWantedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return raw_count > 0 && ready.size() + static_cast<size_t>(in_features) < lookahead;
  }

  // Queues all of `jobs` or none: a clip is admitted whole.
  void Admit(JobList jobs) {
    absl::Status rejected;
    {
      absl::MutexLock lock(&mu);
      const int queued = static_cast<int>(raw_count + ready.size()) + in_features;
      if (!accepting) {
        rejected = absl::UnavailableError("the engine is shutting down");
      } else if (queued + static_cast<int>(jobs.size()) > options.max_queue_size) {
        rejected = absl::ResourceExhaustedError(absl::StrCat(
            "the engine's queue is full (", queued, " windows waiting, ", jobs.size(),
            " more requested, max_queue_size ", options.max_queue_size, ")"));
      } else {
        const absl::Time now = absl::Now();
        for (std::unique_ptr<Job>& job : jobs) {
          job->submitted = now;
          PushRawLocked(std::move(job));
        }
        // Idle runners compute features themselves (see TakeBatch); workers
        // take what they cannot.
        const int for_workers = static_cast<int>(jobs.size()) - idle_runners;
        jobs.clear();
        UpdateDepthLocked();
        if (idle_runners > 0) ready_cv.SignalAll();
        if (for_workers > 0) workers->Wake(for_workers);
      }
    }
    CompleteAll(jobs, rejected);
  }

  bool ComputeOne(std::vector<float>& scratch) override {
    if (scratch.size() < window) scratch.resize(window);
    std::unique_ptr<Job> job;
    absl::Status status;
    {
      absl::MutexLock lock(&mu);
      if (!FeaturesWantedLocked() || stopping) return false;
      status = FeaturesLocked(job, scratch, /*front=*/false);
    }
    if (job != nullptr) job->done(status);
    return true;
  }

  // Takes the next flow's raw job and computes its features (mu released
  // meanwhile), then queues it as ready, at the front or the back. When it
  // was dropped or failed instead, leaves it in `job` with the status to
  // complete it with (outside mu).
  absl::Status FeaturesLocked(std::unique_ptr<Job>& job, std::vector<float>& samples,
                              bool front) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    job = PopRawLocked();
    ++in_features;
    mu.Unlock();
    const absl::Time start = absl::Now();
    absl::Status status = DropReason(*job, start);
    if (status.ok()) {
      try {
        CopyWindow(*job->source, job->start, window, samples.data());
        job->source.reset();  // a clip's audio is freed with its last window
        status = extractor->Compute(samples, &job->features);
      } catch (...) {
        status = StatusFromCurrentException("computing a window's features");
      }
    }
    const absl::Time end = absl::Now();
    job->feature_time = end - start;
    job->ready = end;
    mu.Lock();
    --in_features;
    if (status.ok() && stopping) status = absl::UnavailableError("the engine shut down");
    if (status.ok()) {
      if (front) {
        ready.push_front(std::move(job));
      } else {
        ready.push_back(std::move(job));
      }
      ready_cv.SignalAll();
    }
    UpdateDepthLocked();
    return status;
  }

  // Waits for ready jobs and takes up to max_batch_size of them; empty when
  // the engine stops.
  JobList TakeBatch(std::vector<float>& samples) {
    absl::MutexLock lock(&mu);
    for (;;) {
      // Features the runner may compute itself: none is ready and no worker
      // is computing any.
      const auto idle_with_raw = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
        return ready.empty() && in_features == 0 && raw_count > 0;
      };
      while (ready.empty() && !idle_with_raw() && !stopping) {
        ++idle_runners;
        ready_cv.Wait(&mu);
        --idle_runners;
      }
      if (stopping) return {};
      if (ready.empty()) {
        // The model is idle and nothing is on its way: computing a window's
        // features here beats waking a (niced) worker for them, and keeps an
        // idle engine's latency that of a direct call. Under load the
        // workers are computing and the runner waits for them.
        std::unique_ptr<Job> job;
        const absl::Status status = FeaturesLocked(job, samples, /*front=*/true);
        if (job != nullptr) {
          mu.Unlock();
          job->done(status);
          mu.Lock();
        }
        continue;
      }
      // Trading latency for larger batches: wait for more while the batch
      // is short, unless the engine is draining for shutdown.
      if (options.max_queue_delay > absl::ZeroDuration()) {
        const absl::Time until = ready.front()->ready + options.max_queue_delay;
        while (!stopping && accepting && !ready.empty() &&
               static_cast<int>(ready.size()) < options.max_batch_size &&
               absl::Now() < until) {
          ready_cv.WaitWithDeadline(&mu, until);
        }
        if (stopping) return {};
        if (ready.empty()) continue;  // another runner took them
      }
      const size_t n =
          std::min(ready.size(), static_cast<size_t>(options.max_batch_size));
      JobList batch;
      batch.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(ready.front()));
        ready.pop_front();
      }
      in_batches += static_cast<int>(n);
      UpdateDepthLocked();
      // Room ahead of the model again: the workers prepare the next batch.
      if (FeaturesWantedLocked()) workers->Wake(static_cast<int>(n));
      return batch;
    }
  }

  static bool WantsSummaries(const JobList& run) {
    return std::any_of(run.begin(), run.end(), [](const std::unique_ptr<Job>& job) {
      return job->summary != nullptr || job->speaker_mean != nullptr;
    });
  }

  // Speaker-normalised models, when a job wants its summary or adapts: the
  // summaries once for the batch (given to the jobs that want theirs), then
  // the probabilities from them, adapted for jobs with a speaker mean.
  absl::StatusOr<std::vector<float>> PredictWithSummaries(const JobList& run,
                                                          absl::Span<const float> input,
                                                          int classes) {
    const int count = static_cast<int>(run.size());
    absl::StatusOr<std::vector<float>> summaries = model->Summarize(input, count);
    if (!summaries.ok()) return summaries.status();
    const size_t width = static_cast<size_t>(model->summary_size());
    // Two groups, each one run of the head: adapted rows and the others.
    std::vector<float> rows[2], means;
    std::vector<size_t> members[2];
    for (size_t i = 0; i < run.size(); ++i) {
      const auto row = summaries->begin() + i * width;
      if (run[i]->summary != nullptr) run[i]->summary->assign(row, row + width);
      const bool adapted = run[i]->speaker_mean != nullptr;
      rows[adapted].insert(rows[adapted].end(), row, row + width);
      members[adapted].push_back(i);
      if (adapted) {
        means.insert(means.end(), run[i]->speaker_mean->begin(), run[i]->speaker_mean->end());
      }
    }
    std::vector<float> probabilities(run.size() * classes);
    for (int adapted : {0, 1}) {
      if (members[adapted].empty()) continue;
      absl::StatusOr<std::vector<float>> group = model->PredictFromSummaries(
          rows[adapted], static_cast<int>(members[adapted].size()),
          adapted ? absl::MakeConstSpan(means) : absl::Span<const float>());
      if (!group.ok()) return group.status();
      for (size_t j = 0; j < members[adapted].size(); ++j) {
        std::copy(group->begin() + j * classes, group->begin() + (j + 1) * classes,
                  probabilities.begin() + members[adapted][j] * classes);
      }
    }
    return probabilities;
  }

  // Runs `run` on the model and completes each job with its row, or with
  // the error (a failing model, a row that is not probabilities, memory).
  void RunBatch(JobList& run, std::vector<float>& input, size_t input_size, int classes,
                absl::Time start) {
    absl::StatusOr<std::vector<float>> probabilities;
    try {
      input.resize(run.size() * input_size);
      for (size_t i = 0; i < run.size(); ++i) {
        std::copy(run[i]->features.data.begin(), run[i]->features.data.end(),
                  input.begin() + i * input_size);
      }
      probabilities = WantsSummaries(run) ? PredictWithSummaries(run, input, classes)
                                          : model->Predict(input, static_cast<int>(run.size()));
    } catch (...) {
      probabilities = StatusFromCurrentException("running the model");
    }
    const absl::Duration inference = absl::Now() - start;
    if (observer != nullptr) {
      for (const std::unique_ptr<Job>& job : run) {
        observer->OnWindow(start - job->submitted - job->feature_time, job->feature_time);
      }
      observer->OnBatch(static_cast<int>(run.size()), inference);
    }
    if (!probabilities.ok()) {
      CompleteAll(run, probabilities.status());
      return;
    }
    for (size_t i = 0; i < run.size(); ++i) {
      const absl::Span<const float> row =
          absl::MakeConstSpan(*probabilities).subspan(i * classes, classes);
      absl::StatusOr<std::vector<float>> result;
      if (absl::Status valid = CheckProbabilities(row); !valid.ok()) {
        result = valid;
      } else {
        try {
          result = std::vector<float>(row.begin(), row.end());
        } catch (...) {
          result = StatusFromCurrentException("returning a window's result");
        }
      }
      run[i]->done(std::move(result));
    }
  }

  void ModelRunner() {
    std::vector<float> input;
    std::vector<float> samples(window);
    const size_t input_size = static_cast<size_t>(model->input_size());
    const int classes = model->num_classes();
    for (;;) {
      JobList batch = TakeBatch(samples);
      if (batch.empty()) return;
      const int taken = static_cast<int>(batch.size());
      const absl::Time start = absl::Now();
      // Requests that expired or were cancelled while their features were
      // computed or while they waited are dropped before compute.
      JobList run;
      run.reserve(batch.size());
      for (std::unique_ptr<Job>& job : batch) {
        if (absl::Status status = DropReason(*job, start); !status.ok()) {
          job->done(status);
        } else {
          run.push_back(std::move(job));
        }
      }
      if (!run.empty()) RunBatch(run, input, input_size, classes, start);
      absl::MutexLock lock(&mu);
      in_batches -= taken;
      UpdateDepthLocked();
    }
  }
};

struct FeatureWorkers::Entry {
  Source* source;
  int busy = 0;  // workers inside it
  bool removed = false;
};

absl::StatusOr<std::shared_ptr<FeatureWorkers>> FeatureWorkers::Create(int threads, int nice) {
  if (threads < 0 || nice < 0 || nice > 19) {
    return absl::InvalidArgumentError(
        absl::StrCat("FeatureWorkers: bad threads ", threads, " or nice ", nice));
  }
  std::shared_ptr<FeatureWorkers> workers(new FeatureWorkers(nice));
  const int count = DefaultThreads(threads);
  for (int i = 0; i < count; ++i) {
    workers->threads_.emplace_back([raw = workers.get()] { raw->Work(); });
  }
  return workers;
}

FeatureWorkers::~FeatureWorkers() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    wake_cv_.SignalAll();
  }
  for (std::thread& thread : threads_) thread.join();
}

void FeatureWorkers::Add(Source* source) {
  absl::MutexLock lock(&mu_);
  entries_.push_back(std::make_shared<Entry>(Entry{source}));
}

void FeatureWorkers::Remove(Source* source) {
  absl::MutexLock lock(&mu_);
  auto it = std::find_if(entries_.begin(), entries_.end(),
                         [source](const auto& entry) { return entry->source == source; });
  if (it == entries_.end()) return;
  std::shared_ptr<Entry> entry = *it;
  entries_.erase(it);
  entry->removed = true;
  while (entry->busy > 0) left_cv_.Wait(&mu_);
}

void FeatureWorkers::Wake(int windows) {
  absl::MutexLock lock(&mu_);
  ++generation_;
  if (windows == 1) {
    wake_cv_.Signal();
  } else if (windows > 1) {
    wake_cv_.SignalAll();
  }
}

void FeatureWorkers::Work() {
  // Per-thread on Linux. Best effort: without it features merely compete
  // with the model at equal priority.
  if (nice_ != 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice_);
  std::vector<float> scratch;
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    // Work that arrives during the pass bumps the generation, so the
    // worker passes again instead of sleeping on it.
    const uint64_t seen = generation_;
    const std::vector<std::shared_ptr<Entry>> pass = entries_;
    const size_t first = next_++;
    bool worked = false;
    for (size_t i = 0; i < pass.size() && !stopping_; ++i) {
      Entry& entry = *pass[(first + i) % pass.size()];
      if (entry.removed) continue;
      ++entry.busy;
      mu_.Unlock();
      const bool computed = entry.source->ComputeOne(scratch);
      mu_.Lock();
      if (--entry.busy == 0 && entry.removed) left_cv_.SignalAll();
      worked = worked || computed;
    }
    if (!worked) {
      while (generation_ == seen && !stopping_) wake_cv_.Wait(&mu_);
    }
  }
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() { Shutdown(); }

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    std::shared_ptr<const Model> model, const EngineOptions& options,
    EngineObserver* observer) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: no model");
  if (options.max_batch_size < 1 || options.max_queue_size < 1 ||
      options.model_instances < 1 || options.feature_threads < 0 ||
      options.max_queue_delay < absl::ZeroDuration() ||
      options.feature_thread_nice < 0 || options.feature_thread_nice > 19 ||
      std::isnan(options.vad_threshold_dbfs) || !(options.min_hop_seconds >= 0) ||
      !std::isfinite(options.min_hop_seconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Engine: bad options (max_batch_size ", options.max_batch_size,
        ", max_queue_size ", options.max_queue_size, ", model_instances ",
        options.model_instances, ", feature_threads ", options.feature_threads,
        ", feature_thread_nice ",
        options.feature_thread_nice, ", max_queue_delay ",
        absl::FormatDuration(options.max_queue_delay), ", vad_threshold_dbfs ",
        options.vad_threshold_dbfs, ", min_hop_seconds ", options.min_hop_seconds, ")"));
  }
  auto impl = std::make_unique<Impl>();
  const ModelConfig& config = model->config();
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(config.features, config.sample_rate);
  if (!extractor.ok()) return extractor.status();
  impl->extractor = *std::move(extractor);
  impl->window = static_cast<size_t>(config.window_samples());
  impl->model = std::move(model);
  impl->options = options;
  impl->observer = observer;
  impl->lookahead = static_cast<size_t>(options.max_batch_size) * options.model_instances;

  impl->options.feature_workers = nullptr;  // held as impl->workers, released at Shutdown
  impl->workers = options.feature_workers;
  if (impl->workers == nullptr) {
    absl::StatusOr<std::shared_ptr<FeatureWorkers>> workers =
        FeatureWorkers::Create(options.feature_threads, options.feature_thread_nice);
    if (!workers.ok()) return workers.status();
    impl->workers = *std::move(workers);
  }
  impl->workers->Add(impl.get());
  Impl* raw_impl = impl.get();
  for (int i = 0; i < options.model_instances; ++i) {
    impl->threads.emplace_back([raw_impl] { raw_impl->ModelRunner(); });
  }
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

void Engine::Submit(WindowRequest request) {
  if (request.done == nullptr) return;  // nobody to tell
  if (request.samples.size() != impl_->window) {
    request.done(absl::InvalidArgumentError(absl::StrCat(
        "a window holds ", impl_->window, " samples at ", model().config().sample_rate,
        " Hz, got ", request.samples.size())));
    return;
  }
  if (absl::Status valid = CheckSamples(request.samples); !valid.ok()) {
    request.done(valid);
    return;
  }
  if (request.summary != nullptr) {
    if (absl::Status adapts = CheckAdaptsToSpeakers(model(), "a window's summary"); !adapts.ok()) {
      request.done(adapts);
      return;
    }
  }
  JobList jobs;
  try {
    auto job = std::make_unique<Job>();
    job->source = std::make_shared<const std::vector<float>>(std::move(request.samples));
    job->flow = request.flow != 0 ? request.flow : NewFlow();
    job->deadline = request.deadline;
    job->cancel = std::move(request.cancel);
    job->summary = std::move(request.summary);
    job->done = std::move(request.done);
    jobs.push_back(std::move(job));
  } catch (...) {
    if (request.done != nullptr) request.done(StatusFromCurrentException("queueing a window"));
    return;
  }
  impl_->Admit(std::move(jobs));
}

void Engine::Classify(ClipRequest request) {
  if (request.done == nullptr) return;  // nobody to tell
  const ModelConfig& config = model().config();
  const size_t window = impl_->window;
  const size_t num_samples = request.samples.size();
  if (num_samples == 0) {
    request.done(absl::InvalidArgumentError("the clip holds no audio"));
    return;
  }
  if (absl::Status valid = CheckSamples(request.samples); !valid.ok()) {
    request.done(valid);
    return;
  }
  absl::StatusOr<size_t> hop_or = HopSamples(request.hop_seconds, window, config.sample_rate,
                                             impl_->options.min_hop_seconds);
  if (!hop_or.ok()) {
    request.done(hop_or.status());
    return;
  }
  const size_t hop = *hop_or;
  const double threshold =
      request.vad_threshold_dbfs.value_or(impl_->options.vad_threshold_dbfs);
  if (std::isnan(threshold)) {
    request.done(absl::InvalidArgumentError("vad_threshold_dbfs is NaN"));
    return;
  }
  if (absl::Status speaker = CheckSpeakerRequest(model(), request); !speaker.ok()) {
    request.done(speaker);
    return;
  }
  const size_t num_windows = WindowCount(num_samples, window, hop);
  if (num_windows > static_cast<size_t>(impl_->options.max_queue_size)) {
    request.done(absl::ResourceExhaustedError(absl::StrCat(
        "the audio makes ", num_windows, " windows at this hop; a call may make at most ",
        impl_->options.max_queue_size,
        " (the engine's queue): use a larger hop_seconds or shorter audio")));
    return;
  }

  JobList jobs;
  std::shared_ptr<ClipState> state;
  try {
    const double rate = config.sample_rate;
    const ClipPlan plan = PlanClip(request.samples, window, hop, threshold);
    const std::vector<size_t>& starts = plan.starts;
    const std::vector<size_t>& to_model = plan.to_model;
    ClipResult result;
    result.duration_seconds = num_samples / rate;
    result.speaker_adapted = !request.speaker_mean.empty();
    result.speaker_statistics = std::move(request.speaker_statistics);
    const bool want_summaries = result.speaker_statistics.has_value();
    std::shared_ptr<const std::vector<float>> speaker_mean;
    if (result.speaker_adapted) {
      speaker_mean = std::make_shared<const std::vector<float>>(std::move(request.speaker_mean));
    }
    result.speech_windows = plan.speech_windows;
    result.windows.resize(starts.size());
    for (size_t i = 0; i < starts.size(); ++i) {
      WindowResult& w = result.windows[i];
      w.start_seconds = starts[i] / rate;
      w.end_seconds = std::min(starts[i] + window, num_samples) / rate;
      w.speech = plan.speech[i];
    }
    // The clip's audio and its charge go together, with the last window.
    auto source = std::shared_ptr<const std::vector<float>>(
        new std::vector<float>(std::move(request.samples)),
        [lease = std::move(request.lease)](const std::vector<float>* samples) { delete samples; });
    const uint64_t flow = NewFlow();
    jobs.reserve(to_model.size());
    for (size_t index : to_model) {
      auto job = std::make_unique<Job>();
      job->source = source;
      job->start = starts[index];
      job->flow = flow;
      job->deadline = request.deadline;
      job->cancel = request.cancel;
      job->speaker_mean = speaker_mean;
      if (want_summaries && plan.speech[index]) job->summary = std::make_shared<std::vector<float>>();
      jobs.push_back(std::move(job));
    }
    // Last, so that nothing can throw once `done` is the state's.
    state = std::make_shared<ClipState>(std::move(result), static_cast<int>(to_model.size()),
                                        model().num_classes(), request.done);
    for (size_t i = 0; i < jobs.size(); ++i) {
      jobs[i]->group_cancel = state->abandon();
      jobs[i]->done = [state, index = to_model[i], summary = jobs[i]->summary](
                          absl::StatusOr<std::vector<float>> probabilities) {
        state->OnWindow(index, std::move(probabilities),
                        summary != nullptr ? std::move(*summary) : std::vector<float>());
      };
    }
  } catch (...) {
    request.done(StatusFromCurrentException("splitting the clip into windows"));
    return;
  }
  impl_->Admit(std::move(jobs));
}

uint64_t Engine::NewFlow() {
  return impl_->next_flow.fetch_add(1, std::memory_order_relaxed);
}

void Engine::Shutdown(absl::Duration grace) {
  Impl& impl = *impl_;
  absl::MutexLock shutdown_lock(&impl.shutdown_mu);
  if (impl.shut_down) return;
  JobList leftovers;
  {
    absl::MutexLock lock(&impl.mu);
    impl.accepting = false;
    const absl::Time until = absl::Now() + grace;
    while ((impl.depth.load(std::memory_order_relaxed) > 0 || impl.in_batches > 0) &&
           absl::Now() < until) {
      impl.idle_cv.WaitWithDeadline(&impl.mu, until);
    }
    impl.stopping = true;
    for (auto& [flow, queue] : impl.raw) {
      for (std::unique_ptr<Job>& job : queue) leftovers.push_back(std::move(job));
    }
    impl.raw.clear();
    impl.turns.clear();
    impl.raw_count = 0;
    for (std::unique_ptr<Job>& job : impl.ready) leftovers.push_back(std::move(job));
    impl.ready.clear();
    impl.UpdateDepthLocked();
    impl.ready_cv.SignalAll();
  }
  CompleteAll(leftovers, absl::UnavailableError(
                             "the engine shut down before the request was computed"));
  for (std::thread& thread : impl.threads) thread.join();
  impl.threads.clear();
  impl.workers->Remove(&impl);
  impl.workers.reset();  // joins them when they were the engine's own
  impl.shut_down = true;
}

const Model& Engine::model() const { return *impl_->model; }

const EngineOptions& Engine::options() const { return impl_->options; }

int Engine::queue_depth() const {
  return impl_->depth.load(std::memory_order_relaxed);
}

}  // namespace emoserve
