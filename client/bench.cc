#include "client/bench.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/calls.h"
#include "client/commands.h"
#include "client/format.h"
#include "core/audio.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "emoserve bench sends host floats as little-endian PCM"
#endif

namespace emoserve::client {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;

absl::Duration Since(Clock::time_point start, Clock::time_point end) {
  return absl::FromChrono(end - start);
}

Clock::duration ToClock(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(seconds));
}

// A connection failure makes the next call fail at once: a slot waits this
// long before trying again, rather than spinning.
constexpr auto kRetryAfterConnectionFailure = std::chrono::milliseconds(100);

// Runs tasks at given times on one thread (stream pacing, retries). Tasks
// must be quick; those still pending at Stop() are dropped.
class TimerQueue {
 public:
  TimerQueue() : thread_([this] { Loop(); }) {}
  ~TimerQueue() { Stop(); }

  void Schedule(Clock::time_point when, std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      tasks_.emplace(when, std::move(task));
    }
    wake_.notify_one();
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    wake_.notify_one();
    thread_.join();
    tasks_.clear();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      if (tasks_.empty()) {
        wake_.wait(lock);
        continue;
      }
      auto next = tasks_.begin();
      if (next->first > Clock::now()) {
        wake_.wait_until(lock, next->first);
        continue;
      }
      std::function<void()> task = std::move(next->second);
      tasks_.erase(next);
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::multimap<Clock::time_point, std::function<void()>> tasks_;
  bool stopping_ = false;
  std::thread thread_;
};

// A file's audio, cut into the chunks a real-time stream sends.
struct StreamPayload {
  v1::AudioFormat format;
  std::vector<std::string> chunks;
  double chunk_seconds = 0;
  double audio_seconds = 0;
};

absl::StatusOr<StreamPayload> LoadStreamPayload(const std::string& path,
                                                double chunk_ms) {
  DecodeOptions decode;
  decode.max_duration_seconds = 24 * 3600.0;
  absl::StatusOr<Audio> audio = DecodeAudioFile(path, decode);
  if (!audio.ok()) return audio.status();
  StreamPayload payload;
  payload.format.set_encoding(v1::AUDIO_ENCODING_FLOAT32);
  payload.format.set_sample_rate_hertz(audio->sample_rate);
  payload.format.set_channel_count(1);
  const size_t frames = std::max<size_t>(
      1, static_cast<size_t>(audio->sample_rate * chunk_ms / 1000.0));
  payload.chunk_seconds = static_cast<double>(frames) / audio->sample_rate;
  payload.audio_seconds = audio->duration_seconds();
  for (size_t i = 0; i < audio->samples.size(); i += frames) {
    const size_t count = std::min(frames, audio->samples.size() - i);
    payload.chunks.emplace_back(
        reinterpret_cast<const char*>(audio->samples.data() + i),
        count * sizeof(float));
  }
  if (payload.chunks.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no audio"));
  }
  return payload;
}

// Drives the load and records what it measured. All callbacks that touch it
// end before Run() returns.
class LoadGenerator {
 public:
  LoadGenerator(v1::EmotionService::Stub* stub, ConnectionOptions connection,
                const BenchCommandOptions& options)
      : stub_(stub), connection_(std::move(connection)), options_(options) {}

  absl::Status LoadPayloads();
  BenchReport Run(BenchReport report);

 private:
  // A running stream's timing, shared by its callbacks and its pacing.
  struct StreamRun {
    const StreamPayload* payload = nullptr;
    Clock::time_point start;
    bool measured = false;
    std::atomic<int64_t> closed_at_ns{-1};  // Clock ticks; -1: not closed
  };

  bool Measured(Clock::time_point sent) const {
    return sent >= measure_start_ && sent < measure_end_;
  }
  bool Stopping() const {
    return stopping_.load() || Clock::now() >= measure_end_;
  }

  void LaunchClosedLoopCall();
  void RunOpenLoop();
  void LaunchStream(int slot);
  void SendChunk(std::shared_ptr<StreamRun> run,
                 std::shared_ptr<StreamCall> call, size_t index);
  // Calls `launch` again soon if the failure was a connection failure
  // (instead of spinning on a dead server), at once otherwise.
  void Relaunch(const grpc::Status& status, std::function<void()> launch);

  void RecordCall(Clock::time_point sent, const grpc::Status& status,
                  double audio_seconds, absl::Duration latency);
  void RecordWindow(absl::Duration latency);
  void RecordFinal(absl::Duration latency);
  void RecordDropped();
  void MaybePrintProgress(Clock::time_point now);

  v1::EmotionService::Stub* stub_;
  const ConnectionOptions connection_;
  const BenchCommandOptions& options_;
  std::vector<std::shared_ptr<const v1::ClassifyRequest>> requests_;
  std::vector<StreamPayload> stream_payloads_;
  std::atomic<uint64_t> next_payload_{0};

  Clock::time_point start_;
  Clock::time_point measure_start_;
  Clock::time_point measure_end_;
  std::atomic<bool> stopping_{false};
  InFlightCounter in_flight_;  // calls (open loop) or live slots
  TimerQueue timer_;

  absl::Mutex live_streams_mutex_;
  std::vector<std::weak_ptr<StreamCall>> live_streams_
      ABSL_GUARDED_BY(live_streams_mutex_);

  absl::Mutex mutex_;
  BenchReport report_ ABSL_GUARDED_BY(mutex_);
  int64_t warmup_calls_ ABSL_GUARDED_BY(mutex_) = 0;
  std::string first_error_ ABSL_GUARDED_BY(mutex_);

  // Progress (main thread only).
  bool progress_on_tty_ = false;
  Clock::duration progress_every_{};
  Clock::time_point next_progress_;
  int64_t last_progress_ok_ = 0;
  Clock::time_point last_progress_time_;
};

absl::Status LoadGenerator::LoadPayloads() {
  for (const std::string& file : options_.files) {
    if (options_.streams > 0) {
      absl::StatusOr<StreamPayload> payload =
          LoadStreamPayload(file, options_.chunk_ms);
      if (!payload.ok()) return payload.status();
      stream_payloads_.push_back(*std::move(payload));
    } else {
      absl::StatusOr<std::string> bytes = ReadFileBytes(file);
      if (!bytes.ok()) return bytes.status();
      auto request = std::make_shared<v1::ClassifyRequest>();
      request->set_audio(*std::move(bytes));
      request->set_include_timeline(options_.timeline);
      request->set_model_name(options_.model.name);
      request->set_model_version(options_.model.version);
      requests_.push_back(std::move(request));
    }
  }
  return absl::OkStatus();
}

void LoadGenerator::RecordCall(Clock::time_point sent,
                               const grpc::Status& status,
                               double audio_seconds, absl::Duration latency) {
  absl::MutexLock lock(&mutex_);
  if (!Measured(sent)) {
    if (sent < measure_start_) ++warmup_calls_;
    return;
  }
  ++report_.requests;
  if (status.ok()) {
    ++report_.ok;
    report_.audio_seconds += audio_seconds;
    if (options_.streams == 0) report_.latency.Record(latency);
  } else {
    ++report_.errors[StatusCodeName(status.error_code())];
    if (first_error_.empty()) {
      first_error_ = DescribeRpcError(status, connection_);
    }
  }
}

void LoadGenerator::RecordWindow(absl::Duration latency) {
  absl::MutexLock lock(&mutex_);
  ++report_.windows;
  report_.latency.Record(latency);
}

void LoadGenerator::RecordFinal(absl::Duration latency) {
  absl::MutexLock lock(&mutex_);
  report_.final_latency.Record(latency);
}

void LoadGenerator::RecordDropped() {
  absl::MutexLock lock(&mutex_);
  ++report_.dropped;
}

void LoadGenerator::Relaunch(const grpc::Status& status,
                             std::function<void()> launch) {
  if (IsConnectionFailure(status)) {
    timer_.Schedule(Clock::now() + kRetryAfterConnectionFailure,
                    std::move(launch));
  } else {
    launch();
  }
}

// Closed loop: each of --concurrency slots sends its next call as soon as
// the previous one has answered.
void LoadGenerator::LaunchClosedLoopCall() {
  if (Stopping()) {
    in_flight_.Remove();  // this slot ends
    return;
  }
  const auto& request = requests_[next_payload_++ % requests_.size()];
  const Clock::time_point sent = Clock::now();
  StartClassify(stub_, request, connection_, kDefaultCallTimeoutSeconds,
                [this, sent](const grpc::Status& status,
                             const v1::ClassifyResponse& response) {
                  const Clock::time_point now = Clock::now();
                  RecordCall(sent, status, response.audio_duration_seconds(),
                             Since(sent, now));
                  Relaunch(status, [this] { LaunchClosedLoopCall(); });
                });
}

// Open loop: call i is due at start + i / rps, whatever the server's pace;
// its latency counts from then, so time spent queued behind a slow server
// (here or there) is not hidden.
void LoadGenerator::RunOpenLoop() {
  const double interval_seconds = 1.0 / options_.rps;
  for (int64_t i = 0;; ++i) {
    const Clock::time_point due =
        start_ + ToClock(static_cast<double>(i) * interval_seconds);
    if (due >= measure_end_) break;
    MaybePrintProgress(Clock::now());
    std::this_thread::sleep_until(due);
    if (!in_flight_.TryAdd(options_.max_in_flight)) {
      if (Measured(due)) RecordDropped();
      continue;
    }
    const auto& request = requests_[next_payload_++ % requests_.size()];
    StartClassify(stub_, request, connection_, kDefaultCallTimeoutSeconds,
                  [this, due](const grpc::Status& status,
                              const v1::ClassifyResponse& response) {
                    RecordCall(due, status, response.audio_duration_seconds(),
                               Since(due, Clock::now()));
                    in_flight_.Remove();
                  });
  }
}

// Streams: each of --streams slots streams a file at real-time pace, waits
// for its final result, then streams the next.
void LoadGenerator::LaunchStream(int slot) {
  if (Stopping()) {
    in_flight_.Remove();  // this slot ends
    return;
  }
  auto run = std::make_shared<StreamRun>();
  run->payload =
      &stream_payloads_[next_payload_++ % stream_payloads_.size()];
  run->start = Clock::now();
  run->measured = Measured(run->start);
  v1::StreamingConfig config;
  *config.mutable_format() = run->payload->format;
  config.set_interim_results(true);  // window latency needs the windows
  config.set_model_name(options_.model.name);
  config.set_model_version(options_.model.version);

  // The run is shared by the call's callbacks and by the pacing tasks,
  // which also hold the call until its last chunk (or its end).
  std::shared_ptr<StreamCall> call = StreamCall::Start(
      stub_, config, connection_,
      [this, run](const v1::StreamClassifyResponse& response) {
        if (!run->measured ||
            response.result_case() != v1::StreamClassifyResponse::kWindow) {
          return;
        }
        // The window ends in chunk ceil(end / chunk) - 1 (clamped: the
        // last window may be padded past the audio), sent on schedule at
        // start + index * chunk.
        const StreamPayload& payload = *run->payload;
        const double chunk_index = std::ceil(
            response.window().end_seconds() / payload.chunk_seconds - 1e-6) - 1;
        const double index = std::clamp(
            chunk_index, 0.0, static_cast<double>(payload.chunks.size() - 1));
        const Clock::time_point sent =
            run->start + ToClock(index * payload.chunk_seconds);
        RecordWindow(Since(sent, Clock::now()));
      },
      [this, run, slot](const grpc::Status& status) {
        const Clock::time_point now = Clock::now();
        const int64_t closed_at = run->closed_at_ns.load();
        if (status.ok() && run->measured && closed_at >= 0) {
          RecordFinal(Since(Clock::time_point(Clock::duration(closed_at)),
                            now));
        }
        RecordCall(run->start, status, run->payload->audio_seconds,
                   Since(run->start, now));
        Relaunch(status, [this, slot] { LaunchStream(slot); });
      });
  {
    absl::MutexLock lock(&live_streams_mutex_);
    live_streams_[slot] = call;
  }
  SendChunk(std::move(run), std::move(call), 0);
}

void LoadGenerator::SendChunk(std::shared_ptr<StreamRun> run,
                              std::shared_ptr<StreamCall> call, size_t index) {
  const StreamPayload& payload = *run->payload;
  if (!call->SendAudio(payload.chunks[index])) return;  // the call has ended
  if (index + 1 == payload.chunks.size()) {
    run->closed_at_ns.store(Clock::now().time_since_epoch().count());
    call->CloseSend();
    return;
  }
  const Clock::time_point due =
      run->start +
      ToClock(static_cast<double>(index + 1) * payload.chunk_seconds);
  timer_.Schedule(due, [this, run = std::move(run), call = std::move(call),
                        index]() mutable {
    SendChunk(std::move(run), std::move(call), index + 1);
  });
}

void LoadGenerator::MaybePrintProgress(Clock::time_point now) {
  if (now < next_progress_) return;
  next_progress_ = now + progress_every_;
  std::string line;
  {
    absl::MutexLock lock(&mutex_);
    if (now < measure_start_) {
      line = absl::StrFormat("bench: warming up %.0f/%.0f s, %d calls",
                             absl::ToDoubleSeconds(Since(start_, now)),
                             options_.warmup_seconds, warmup_calls_);
    } else {
      const double interval =
          absl::ToDoubleSeconds(Since(last_progress_time_, now));
      const double rate =
          interval > 0 && last_progress_time_ >= measure_start_
              ? static_cast<double>(report_.ok - last_progress_ok_) / interval
              : 0;
      line = absl::StrFormat(
          "bench: %.0f/%.0f s  %d %s  %.1f/s  p50 %.1f ms  p99 %.1f ms  "
          "errors %d",
          std::min(absl::ToDoubleSeconds(Since(measure_start_, now)),
                   options_.duration_seconds),
          options_.duration_seconds, report_.requests,
          options_.streams > 0 ? "streams" : "calls", rate,
          absl::ToDoubleMilliseconds(report_.latency.Percentile(50)),
          absl::ToDoubleMilliseconds(report_.latency.Percentile(99)),
          report_.error_count());
      last_progress_ok_ = report_.ok;
    }
  }
  last_progress_time_ = now;
  // On a terminal the line is redrawn in place; in a log, appended.
  const std::string text = progress_on_tty_
                               ? absl::StrCat("\r", line, "\033[K")
                               : absl::StrCat(line, "\n");
  std::fputs(text.c_str(), stderr);
  std::fflush(stderr);
}

BenchReport LoadGenerator::Run(BenchReport report) {
  {
    absl::MutexLock lock(&mutex_);
    report_ = std::move(report);
  }
  progress_on_tty_ = isatty(STDERR_FILENO) != 0;
  progress_every_ = ToClock(options_.progress_seconds > 0
                                ? options_.progress_seconds
                                : (progress_on_tty_ ? 1.0 : 5.0));
  start_ = Clock::now();
  measure_start_ = start_ + ToClock(options_.warmup_seconds);
  measure_end_ = measure_start_ + ToClock(options_.duration_seconds);
  next_progress_ = start_ + progress_every_;
  last_progress_time_ = start_;

  if (options_.rps > 0) {
    RunOpenLoop();
  } else {
    const int slots =
        options_.streams > 0 ? options_.streams : options_.concurrency;
    {
      absl::MutexLock lock(&live_streams_mutex_);
      live_streams_.resize(slots);
    }
    for (int slot = 0; slot < slots; ++slot) {
      in_flight_.WaitAndAdd(slots);
      if (options_.streams > 0) {
        LaunchStream(slot);
      } else {
        LaunchClosedLoopCall();
      }
    }
    for (Clock::time_point now = Clock::now(); now < measure_end_;
         now = Clock::now()) {
      MaybePrintProgress(now);
      std::this_thread::sleep_until(std::min(next_progress_, measure_end_));
    }
  }
  stopping_.store(true);
  // Unary calls end by their deadlines; streams by the end of their audio,
  // or are cancelled after as long again as the longest file.
  double longest_seconds = 0;
  for (const StreamPayload& payload : stream_payloads_) {
    longest_seconds = std::max(longest_seconds, payload.audio_seconds);
  }
  if (!in_flight_.WaitForNone(
          absl::Seconds(2 * longest_seconds + kDefaultCallTimeoutSeconds))) {
    absl::MutexLock lock(&live_streams_mutex_);
    for (const std::weak_ptr<StreamCall>& weak : live_streams_) {
      if (std::shared_ptr<StreamCall> call = weak.lock()) call->Cancel();
    }
  }
  in_flight_.WaitForNone(absl::InfiniteDuration());
  timer_.Stop();
  if (progress_on_tty_) std::fputs("\n", stderr);

  absl::MutexLock lock(&mutex_);
  if (!first_error_.empty()) {
    PrintError(absl::StrCat("first error: ", first_error_));
  }
  return std::move(report_);
}

std::string Milliseconds(absl::Duration d) {
  return absl::StrFormat("%.2f ms", absl::ToDoubleMilliseconds(d));
}

Json LatencyJson(const LatencyHistogram& histogram) {
  auto ms = [](absl::Duration d) {
    return RoundTo(absl::ToDoubleMilliseconds(d), 3);
  };
  return Json{{"count", histogram.count()},
              {"min", ms(histogram.min())},
              {"mean", ms(histogram.mean())},
              {"p50", ms(histogram.Percentile(50))},
              {"p90", ms(histogram.Percentile(90))},
              {"p99", ms(histogram.Percentile(99))},
              {"max", ms(histogram.max())}};
}

std::string LatencyLine(const LatencyHistogram& histogram) {
  if (histogram.count() == 0) return "-";
  return absl::StrCat(
      "p50 ", Milliseconds(histogram.Percentile(50)), "  p90 ",
      Milliseconds(histogram.Percentile(90)), "  p99 ",
      Milliseconds(histogram.Percentile(99)), "  max ",
      Milliseconds(histogram.max()), "  (mean ",
      Milliseconds(histogram.mean()), ")");
}

}  // namespace

int64_t BenchReport::error_count() const {
  int64_t count = 0;
  for (const auto& [code, n] : errors) count += n;
  return count;
}

double BenchReport::throughput() const {
  return duration_seconds > 0 ? static_cast<double>(ok) / duration_seconds : 0;
}

Json BenchReportJson(const BenchReport& report) {
  Json json;
  json["mode"] = report.mode;
  json["server"] = report.server;
  json["model"] = report.model;
  if (report.mode == "closed_loop") json["concurrency"] = report.concurrency;
  if (report.mode == "open_loop") json["target_rps"] = report.target_rps;
  if (report.mode == "streams") json["streams"] = report.streams;
  json["warmup_seconds"] = report.warmup_seconds;
  json["duration_seconds"] = report.duration_seconds;
  json["requests"] = report.requests;
  json["ok"] = report.ok;
  json["errors"] = Json::object();
  for (const auto& [code, count] : report.errors) json["errors"][code] = count;
  json["dropped"] = report.dropped;
  json["throughput_rps"] = RoundTo(report.throughput(), 3);
  json["audio_seconds"] = RoundTo(report.audio_seconds, 3);
  json["latency_ms"] = LatencyJson(report.latency);
  if (report.mode == "streams") {
    json["windows"] = report.windows;
    json["final_latency_ms"] = LatencyJson(report.final_latency);
  }
  return json;
}

std::string FormatBenchReport(const BenchReport& report) {
  std::string setup;
  if (report.mode == "closed_loop") {
    setup = absl::StrCat("closed loop, concurrency ", report.concurrency);
  } else if (report.mode == "open_loop") {
    setup = absl::StrFormat("open loop at %g requests/s", report.target_rps);
  } else {
    setup = absl::StrCat(report.streams, " real-time streams");
  }
  const bool streams = report.mode == "streams";
  const char* unit = streams ? "streams" : "requests";
  std::string out = absl::StrFormat(
      "emoserve bench: %s, %g s after %g s warmup, server %s, model %s\n",
      setup, report.duration_seconds, report.warmup_seconds, report.server,
      report.model);
  absl::StrAppend(&out,
                  absl::StrFormat("%-16s%d (%d ok, %d failed", unit,
                                  report.requests, report.ok,
                                  report.error_count()));
  if (report.dropped > 0) {
    absl::StrAppend(&out, absl::StrFormat(", %d dropped", report.dropped));
  }
  absl::StrAppend(&out, ")\n");
  absl::StrAppend(
      &out, absl::StrFormat("%-16s%.1f %s/s, %.1f s of audio per second\n",
                            "throughput", report.throughput(), unit,
                            report.duration_seconds > 0
                                ? report.audio_seconds / report.duration_seconds
                                : 0));
  absl::StrAppend(&out, absl::StrFormat("%-16s%s\n",
                                        streams ? "window latency" : "latency",
                                        LatencyLine(report.latency)));
  if (streams) {
    absl::StrAppend(&out, absl::StrFormat("%-16s%d\n", "windows",
                                          report.windows));
    absl::StrAppend(&out,
                    absl::StrFormat("%-16s%s\n", "final latency",
                                    LatencyLine(report.final_latency)));
  }
  if (!report.errors.empty()) {
    std::vector<std::string> parts;
    for (const auto& [code, count] : report.errors) {
      parts.push_back(absl::StrCat(code, " ", count));
    }
    absl::StrAppend(&out, absl::StrFormat("%-16s%s\n", "errors",
                                          absl::StrJoin(parts, ", ")));
  }
  return out;
}

int RunBench(const ConnectionOptions& connection,
             const BenchCommandOptions& options) {
  absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> stub =
      MakeStub(connection);
  if (!stub.ok()) {
    PrintError(stub.status().message());
    return kExitFailure;
  }
  // Unary calls always have a deadline, so that the run always ends.
  ConnectionOptions bench_connection = connection;
  if (!(bench_connection.timeout_seconds.value_or(0) > 0)) {
    bench_connection.timeout_seconds = kDefaultCallTimeoutSeconds;
  }
  // One call first: a server that is down or a model that is missing is
  // one clear line, not a run full of errors.
  v1::ModelInfo info;
  {
    grpc::ClientContext context;
    SetCallDeadline(bench_connection, kDefaultCallTimeoutSeconds, &context);
    const grpc::Status status =
        (*stub)->GetModelInfo(&context, ModelInfoRequest(options.model), &info);
    if (!status.ok()) {
      PrintError(DescribeRpcError(status, connection));
      return kExitFailure;
    }
  }
  LoadGenerator generator(stub->get(), bench_connection, options);
  if (absl::Status status = generator.LoadPayloads(); !status.ok()) {
    PrintError(status.message());
    return kExitFailure;
  }
  BenchReport report;
  report.mode = options.streams > 0 ? "streams"
                : options.rps > 0   ? "open_loop"
                                    : "closed_loop";
  report.server = NormalizeServerAddress(connection.server);
  report.model =
      absl::StrCat(info.name(), " ", info.version(), " (", info.device(), ")");
  report.concurrency = options.concurrency;
  report.target_rps = options.rps;
  report.streams = options.streams;
  report.warmup_seconds = options.warmup_seconds;
  report.duration_seconds = options.duration_seconds;
  report = generator.Run(std::move(report));

  const std::string out = options.output == OutputFormat::kJson
                              ? BenchReportJson(report).dump(2) + "\n"
                              : FormatBenchReport(report);
  std::fwrite(out.data(), 1, out.size(), stdout);
  std::fflush(stdout);
  // Errors are a finding, not a failure of the bench; nothing succeeding is.
  return report.ok > 0 ? kExitOk : kExitFailure;
}

}  // namespace emoserve::client
