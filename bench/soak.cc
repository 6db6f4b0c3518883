// The soak benchmark: a long mixed load against a real emoserve-server
// process, then SIGTERM under that load (run by hand; numbers go to
// docs/limits.md).
//
//   soak_bench --server build/release/server/emoserve-server --model models/default
//              --clips ../shared/datasets/ravdess [--requests 100000]
//              [--concurrency 64] [--out bench/results/soak.md]
//
// The load keeps --concurrency operations in flight; each is, by a seeded
// draw: a Classify of a RAVDESS clip of actors 21-24 (85%), one the client
// cancels after 0-20 ms (5%), one with a 1-10 ms deadline (5%), or a stream
// of a clip in 100 ms messages (5%; a fifth of them cancelled halfway).
// An error is unexpected unless the client caused it (CANCELLED after its
// cancel, DEADLINE_EXCEEDED after its deadline). The server's RSS is read
// every second; after the warm-up it must stay flat (no leak). At the end
// SIGTERM comes while the load goes on: every call the server had accepted
// must end (OK, or the client's own cancel or deadline), new ones get
// UNAVAILABLE, nothing may hang, and the server must exit 0 within
// --grace-seconds.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <queue>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/calls.h"
#include "client/connection.h"
#include "core/audio.h"
#include "emoserve/v1/emoserve.grpc.pb.h"

namespace emoserve {
namespace {

namespace v1 = ::emoserve::v1;

struct Options {
  std::string server_binary;
  std::string model = "models/default";
  std::string clips;
  int requests = 100000;
  int concurrency = 64;
  int warmup = 2000;
  double grace_seconds = 10;
  std::string out = "bench/results/soak.md";
};

enum class Kind { kClassify, kCancelled, kDeadline, kStream, kStreamCancelled };

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kClassify: return "classify";
    case Kind::kCancelled: return "classify, cancelled";
    case Kind::kDeadline: return "classify, 1-10 ms deadline";
    case Kind::kStream: return "stream";
    case Kind::kStreamCancelled: return "stream, cancelled";
  }
  return "?";
}

// Whether `code` is what an operation of `kind` may end with; `late`: it
// was started after SIGTERM, so the server may refuse it (UNAVAILABLE) or
// gRPC may drop it unserved while it shuts down (CANCELLED).
bool Expected(Kind kind, grpc::StatusCode code, bool late) {
  if (code == grpc::StatusCode::OK) return true;
  if (late && (code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::CANCELLED)) {
    return true;
  }
  switch (kind) {
    case Kind::kCancelled:
    case Kind::kStreamCancelled:
      return code == grpc::StatusCode::CANCELLED;
    case Kind::kDeadline:
      return code == grpc::StatusCode::DEADLINE_EXCEEDED;
    default:
      return false;
  }
}

// The server as a child process; its stderr goes to a file.
class ServerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const Options& options,
                                                              const std::string& log_path) {
    const std::vector<std::string> args = {
        options.server_binary, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--http-port", "0", "--model", options.model, "--grace-seconds", absl::StrCat(options.grace_seconds)};
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      std::freopen(log_path.c_str(), "w", stderr);
      std::vector<char*> argv;
      for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    auto process = std::unique_ptr<ServerProcess>(new ServerProcess(pid, log_path));
    const absl::Time until = absl::Now() + absl::Seconds(120);
    while (absl::Now() < until) {
      std::ifstream log(log_path);
      std::string line;
      while (std::getline(log, line)) {
        if (line.find("event=serving") != std::string::npos) {
          for (absl::string_view field : absl::StrSplit(process->Log(), ' ')) {
            if (absl::ConsumePrefix(&field, "port=") &&
                absl::SimpleAtoi(field.substr(0, field.find('\n')), &process->port_)) {
              return process;
            }
          }
        }
      }
      absl::SleepFor(absl::Milliseconds(100));
    }
    return absl::DeadlineExceededError("the server never served:\n" + process->Log());
  }
  ~ServerProcess() {
    if (!exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  int port() const { return port_; }
  // Resident memory in MiB (0 once gone).
  double RssMib() const {
    std::ifstream status(absl::StrCat("/proc/", pid_, "/status"));
    std::string line;
    while (std::getline(status, line)) {
      absl::string_view view = line;
      if (absl::ConsumePrefix(&view, "VmRSS:")) {
        double kb = 0;
        absl::SimpleAtod(absl::StripAsciiWhitespace(absl::StripSuffix(
                             absl::StripAsciiWhitespace(view), "kB")),
                         &kb);
        return kb / 1024;
      }
    }
    return 0;
  }
  void Terminate() { kill(pid_, SIGTERM); }
  // The exit code, or -1 after `timeout`.
  int WaitForExit(absl::Duration timeout) {
    const absl::Time until = absl::Now() + timeout;
    while (absl::Now() < until) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return -1;
  }
  std::string Log() const {
    std::ifstream log(log_path_);
    return std::string(std::istreambuf_iterator<char>(log), {});
  }

 private:
  ServerProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  std::string log_path_;
  int port_ = 0;
  bool exited_ = false;
};

// Cancels calls at set times, on one thread.
class Canceller {
 public:
  Canceller() : thread_([this] { Run(); }) {}
  ~Canceller() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  void At(absl::Time when, std::function<void()> cancel) {
    absl::MutexLock lock(&mu_);
    queue_.push({when, std::move(cancel)});
  }

 private:
  struct Item {
    absl::Time when;
    std::function<void()> cancel;
    bool operator<(const Item& other) const { return when > other.when; }
  };
  void Run() {
    absl::MutexLock lock(&mu_);
    while (!stop_) {
      if (!queue_.empty() && queue_.top().when <= absl::Now()) {
        std::function<void()> cancel = queue_.top().cancel;
        queue_.pop();
        mu_.Unlock();
        cancel();
        mu_.Lock();
        continue;
      }
      mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Milliseconds(1));
    }
  }
  absl::Mutex mu_;
  std::priority_queue<Item> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

struct Tally {
  absl::Mutex mu;
  // By kind, code, and whether started after SIGTERM.
  std::map<std::tuple<Kind, grpc::StatusCode, bool>, int64_t> outcomes ABSL_GUARDED_BY(mu);
  std::vector<std::string> unexpected ABSL_GUARDED_BY(mu);
  int64_t ended ABSL_GUARDED_BY(mu) = 0;
  int64_t utterances ABSL_GUARDED_BY(mu) = 0;

  void Record(Kind kind, const grpc::Status& status, bool late) {
    absl::MutexLock lock(&mu);
    ++outcomes[{kind, status.error_code(), late}];
    ++ended;
    if (!Expected(kind, status.error_code(), late) && unexpected.size() < 20) {
      unexpected.push_back(absl::StrCat(KindName(kind), ": ",
                                        client::StatusCodeName(status.error_code()), " ",
                                        status.error_message()));
    }
  }
};

struct Clip {
  std::shared_ptr<const v1::ClassifyRequest> request;
  std::vector<std::string> chunks;  // 100 ms of LINEAR16 each
};

absl::StatusOr<std::vector<Clip>> LoadClips(const std::string& ravdess) {
  std::vector<Clip> clips;
  for (int actor = 21; actor <= 24; ++actor) {
    const std::filesystem::path folder =
        std::filesystem::path(ravdess) / absl::StrFormat("Actor_%02d", actor);
    std::vector<std::filesystem::path> files;
    for (const auto& entry : std::filesystem::directory_iterator(folder)) {
      files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    for (const std::filesystem::path& file : files) {
      absl::StatusOr<std::string> bytes = ReadFileBytes(file.string());
      if (!bytes.ok()) return bytes.status();
      DecodeOptions decode;
      decode.output_sample_rate = 16000;
      absl::StatusOr<Audio> audio = DecodeAudio(*bytes, decode);
      if (!audio.ok()) return audio.status();
      Clip clip;
      auto request = std::make_shared<v1::ClassifyRequest>();
      request->set_audio(*bytes);
      clip.request = std::move(request);
      std::string pcm;
      for (float x : audio->samples) {
        const int16_t s = static_cast<int16_t>(std::clamp(x, -1.0f, 1.0f) * 32767);
        pcm.append(reinterpret_cast<const char*>(&s), 2);
      }
      for (size_t i = 0; i < pcm.size(); i += 3200) clip.chunks.push_back(pcm.substr(i, 3200));
      clips.push_back(std::move(clip));
    }
  }
  if (clips.empty()) return absl::NotFoundError("no clips of actors 21-24 under " + ravdess);
  return clips;
}

class Load {
 public:
  Load(const Options& options, const std::vector<Clip>& clips, int port)
      : options_(options), clips_(clips) {
    for (int c = 0; c < 2; ++c) {
      grpc::ChannelArguments args;
      args.SetInt("grpc.channel_id", c);  // a connection each
      stubs_.push_back(v1::EmotionService::NewStub(grpc::CreateCustomChannel(
          absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials(), args)));
    }
  }

  // Starts `count` operations, keeping the concurrency; returns once all
  // were started (not ended).
  void Issue(int64_t count, Tally* tally) {
    for (int64_t i = 0; i < count && !stop_.load(); ++i) {
      in_flight_.WaitAndAdd(options_.concurrency);
      StartOne(tally);
    }
  }
  bool WaitForNone(absl::Duration timeout) { return in_flight_.WaitForNone(timeout); }
  int in_flight() const { return in_flight_.count(); }
  void Stop() { stop_ = true; }
  void set_draining() { draining_ = true; }

 private:
  void StartOne(Tally* tally) {
    const double draw = std::uniform_real_distribution<double>(0, 1)(rng_);
    const Clip& clip = clips_[rng_() % clips_.size()];
    v1::EmotionService::Stub* stub = stubs_[rng_() % stubs_.size()].get();
    Kind kind = Kind::kClassify;
    if (draw >= 0.95) {
      kind = rng_() % 5 == 0 ? Kind::kStreamCancelled : Kind::kStream;
    } else if (draw >= 0.90) {
      kind = Kind::kDeadline;
    } else if (draw >= 0.85) {
      kind = Kind::kCancelled;
    }
    if (kind == Kind::kStream || kind == Kind::kStreamCancelled) {
      StartStream(stub, clip, kind, tally);
    } else {
      StartClassify(stub, clip, kind, tally);
    }
  }

  void StartClassify(v1::EmotionService::Stub* stub, const Clip& clip, Kind kind, Tally* tally) {
    struct Call {
      grpc::ClientContext context;
      v1::ClassifyResponse response;
      std::shared_ptr<const v1::ClassifyRequest> request;
    };
    auto call = std::make_shared<Call>();
    call->request = clip.request;
    absl::Duration deadline = absl::Seconds(60);
    if (kind == Kind::kDeadline) deadline = absl::Milliseconds(1 + rng_() % 10);
    call->context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    if (kind == Kind::kCancelled) {
      canceller_.At(absl::Now() + absl::Milliseconds(rng_() % 21),
                    [call] { call->context.TryCancel(); });
    }
    stub->async()->Classify(&call->context, call->request.get(), &call->response,
                            [this, call, kind, tally, late = draining_.load()](grpc::Status status) {
                              tally->Record(kind, status, late);
                              in_flight_.Remove();
                            });
  }

  void StartStream(v1::EmotionService::Stub* stub, const Clip& clip, Kind kind, Tally* tally) {
    v1::StreamingConfig config;
    config.mutable_format()->set_encoding(v1::AUDIO_ENCODING_LINEAR16);
    config.mutable_format()->set_sample_rate_hertz(16000);
    client::ConnectionOptions connection;
    connection.timeout_seconds = 60;
    auto utterances = std::make_shared<std::atomic<int>>(0);
    std::shared_ptr<client::StreamCall> call = client::StreamCall::Start(
        stub, config, connection,
        [utterances](const v1::StreamClassifyResponse& response) {
          if (response.has_utterance()) ++*utterances;
        },
        [this, kind, tally, utterances, late = draining_.load()](const grpc::Status& status) {
          tally->Record(kind, status, late);
          absl::MutexLock lock(&tally->mu);
          tally->utterances += *utterances;
          in_flight_.Remove();
        });
    const size_t send = kind == Kind::kStreamCancelled ? clip.chunks.size() / 2
                                                       : clip.chunks.size();
    for (size_t i = 0; i < send; ++i) call->SendAudio(clip.chunks[i]);
    if (kind == Kind::kStreamCancelled) {
      canceller_.At(absl::Now() + absl::Milliseconds(rng_() % 50), [call] { call->Cancel(); });
    } else {
      call->CloseSend();
    }
  }

  const Options& options_;
  const std::vector<Clip>& clips_;
  std::vector<std::unique_ptr<v1::EmotionService::Stub>> stubs_;
  std::mt19937 rng_{2026};
  client::InFlightCounter in_flight_;
  Canceller canceller_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> draining_{false};
};

std::string OutcomeTable(Tally& tally) {
  absl::MutexLock lock(&tally.mu);
  std::string out = "| operation | outcome | count |\n|---|---|---:|\n";
  for (const auto& [key, count] : tally.outcomes) {
    const auto& [kind, code, late] = key;
    absl::StrAppend(&out, "| ", KindName(kind), late ? " (started after SIGTERM)" : "", " | ",
                    client::StatusCodeName(code), " | ", count, " |\n");
  }
  return out;
}

int Run(const Options& options) {
  absl::StatusOr<std::vector<Clip>> clips = LoadClips(options.clips);
  if (!clips.ok()) {
    std::fprintf(stderr, "soak: %s\n", std::string(clips.status().message()).c_str());
    return 2;
  }
  const std::string log_path =
      (std::filesystem::temp_directory_path() / "emoserve_soak_server.log").string();
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(options, log_path);
  if (!server.ok()) {
    std::fprintf(stderr, "soak: %s\n", std::string(server.status().message()).c_str());
    return 2;
  }
  std::printf("soak: %zu clips; server pid up on port %d, RSS %.0f MiB at start\n",
              clips->size(), (*server)->port(), (*server)->RssMib());

  Load load(options, *clips, (*server)->port());
  Tally warmup;
  load.Issue(options.warmup, &warmup);
  load.WaitForNone(absl::Seconds(120));
  const double rss_after_warmup = (*server)->RssMib();

  // The measured run, with RSS read every second.
  Tally tally;
  std::vector<std::pair<double, double>> rss;  // (seconds, MiB)
  std::atomic<bool> sampling{true};
  const absl::Time start = absl::Now();
  std::thread sampler([&] {
    while (sampling) {
      rss.emplace_back(absl::ToDoubleSeconds(absl::Now() - start), (*server)->RssMib());
      if (rss.size() % 10 == 0) {  // progress, every 10 s
        int64_t ended = 0;
        {
          absl::MutexLock lock(&tally.mu);
          ended = tally.ended;
        }
        std::fprintf(stderr, "soak: %lld of %lld operations, %.0f s, server RSS %.0f MiB\n",
                     static_cast<long long>(ended), static_cast<long long>(options.requests),
                     rss.back().first, rss.back().second);
      }
      absl::SleepFor(absl::Seconds(1));
    }
  });
  load.Issue(options.requests, &tally);
  const bool drained = load.WaitForNone(absl::Seconds(120));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  sampling = false;
  sampler.join();

  // SIGTERM under load: keep issuing, signal, stop issuing once the
  // server has gone, wait for every call.
  Tally shutdown;
  std::thread issuer([&] { load.Issue(int64_t{1} << 40, &shutdown); });
  absl::SleepFor(absl::Seconds(2));
  const int in_flight_at_signal = load.in_flight();
  load.set_draining();
  const absl::Time signalled = absl::Now();
  (*server)->Terminate();
  const int exit_code = (*server)->WaitForExit(absl::Seconds(options.grace_seconds + 5));
  const double exit_seconds = absl::ToDoubleSeconds(absl::Now() - signalled);
  load.Stop();
  issuer.join();
  const bool none_hung = load.WaitForNone(absl::Seconds(30));

  // Report.
  double first_quarter = 0, last = 0, peak = 0;
  for (const auto& [t, mib] : rss) {
    if (t <= seconds / 4) first_quarter = std::max(first_quarter, mib);
    peak = std::max(peak, mib);
    last = mib;
  }
  int64_t unexpected = 0, shutdown_unexpected = 0;
  {
    absl::MutexLock lock(&tally.mu);
    unexpected = static_cast<int64_t>(tally.unexpected.size());
  }
  {
    absl::MutexLock lock(&shutdown.mu);
    shutdown_unexpected = static_cast<int64_t>(shutdown.unexpected.size());
  }
  std::string report = absl::StrFormat(
      "# Soak: %d operations at %d in flight, then SIGTERM under load\n\n"
      "`bench/soak.cc` against `emoserve-server` (defaults, `--grace-seconds %g`), model `%s`, "
      "clips of RAVDESS actors 21-24; %.0f s, %.0f operations/s; streams gave %d utterances.\n\n"
      "%s\n"
      "Unexpected errors: %d%s.\n\n"
      "Server RSS (MiB): %.0f after the warm-up of %d operations; during the run: highest in "
      "the first quarter %.0f, peak %.0f, at the end %.0f (growth after the first quarter: "
      "%+.0f).\n\n"
      "## SIGTERM under load\n\n%d operations in flight at the signal; exit code %d after "
      "%.2f s (grace %g s); every call ended: %s; unexpected outcomes: %d.\n\n%s",
      options.requests, options.concurrency, options.grace_seconds, options.model, seconds, options.requests / seconds,
      static_cast<int>(tally.utterances), OutcomeTable(tally), static_cast<int>(unexpected),
      drained ? "" : " (calls still in flight after 120 s!)", rss_after_warmup,
      options.warmup, first_quarter, peak, last, last - first_quarter, in_flight_at_signal,
      exit_code, exit_seconds, options.grace_seconds, none_hung ? "yes" : "NO",
      static_cast<int>(shutdown_unexpected), OutcomeTable(shutdown));
  {
    absl::MutexLock lock(&tally.mu);
    for (const std::string& line : tally.unexpected) {
      absl::StrAppend(&report, "\n- during the run: ", line);
    }
  }
  {
    absl::MutexLock lock(&shutdown.mu);
    for (const std::string& line : shutdown.unexpected) {
      absl::StrAppend(&report, "\n- at shutdown: ", line);
    }
  }
  std::printf("%s\n", report.c_str());
  if (!options.out.empty()) {
    std::filesystem::create_directories(std::filesystem::path(options.out).parent_path());
    std::ofstream(options.out) << report << "\n";
  }
  const bool passed = unexpected == 0 && shutdown_unexpected == 0 && drained && none_hung &&
                      exit_code == 0 && exit_seconds <= options.grace_seconds + 1;
  return passed ? 0 : 1;
}

}  // namespace
}  // namespace emoserve

int main(int argc, char** argv) {
  emoserve::Options options;
  CLI::App app("soak_bench: a long mixed load, then SIGTERM under load (see soak.cc)");
  app.add_option("--server", options.server_binary, "emoserve-server binary")->required();
  app.add_option("--model", options.model, "model directory")->capture_default_str();
  app.add_option("--clips", options.clips, "the RAVDESS folder (Actor_21..24 are used)")
      ->required();
  app.add_option("--requests", options.requests, "operations in the measured run")
      ->capture_default_str();
  app.add_option("--concurrency", options.concurrency, "operations in flight")
      ->capture_default_str();
  app.add_option("--warmup", options.warmup, "operations before the measured run")
      ->capture_default_str();
  app.add_option("--grace-seconds", options.grace_seconds, "the server's --grace-seconds")
      ->capture_default_str();
  app.add_option("--out", options.out, "the report (markdown); empty: none")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  return emoserve::Run(options);
}
