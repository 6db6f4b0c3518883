// emoserve-server as a process: flags and their errors, structured logs,
// Prometheus metrics checked by promtool, and SIGTERM while calls are in
// flight.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "tests/server_test_support.h"
#include "tests/test_model.h"
#include "tests/test_support.h"

namespace emoserve {
namespace {

using ::emoserve::testing::Connect;
using ::emoserve::testing::Format;
using ::emoserve::testing::kPatience;
using ::emoserve::testing::ServerProcess;
using ::emoserve::testing::TestModelDir;
using ::emoserve::testing::ToLinear16;
using ::testing::HasSubstr;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

constexpr int kRate = 16000;

std::vector<std::string> NonEmptyLines(const std::string& text) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!line.empty()) lines.emplace_back(line);
  }
  return lines;
}

// The arguments of a server on 127.0.0.1 with the test model.
std::vector<std::string> ServerArgs(int metrics_port, double grace_seconds = 10) {
  return {"--host", "127.0.0.1", "--port", "0", "--metrics-port", absl::StrCat(metrics_port),
          "--model", TestModelDir(), "--torch-threads", "1", "--feature-threads", "1",
          "--grace-seconds", absl::StrCat(grace_seconds)};
}

// Starts the binary and waits until its health says SERVING; returns its port.
absl::StatusOr<int> WaitUntilServing(ServerProcess& process) {
  absl::StatusOr<int> port = process.WaitForPort();
  if (!port.ok()) return port.status();
  auto channel = Connect(*port);
  const absl::Time until = absl::Now() + kPatience;
  while (absl::Now() < until) {
    absl::StatusOr<HealthStatus::ServingStatus> health = testing::CheckHealth(*channel);
    if (health.ok() && *health == HealthStatus::SERVING) return *port;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError("never SERVING:\n" + process.Log());
}

// GET http://host:port/path (host an IPv4 address), the body.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path,
                                    const std::string& host = "127.0.0.1") {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  inet_pton(AF_INET, host.c_str(), &address.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to port ", port));
  }
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("cannot send the request");
  }
  std::string reply;
  char buffer[65536];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) reply.append(buffer, n);
  close(fd);
  const size_t body = reply.find("\r\n\r\n");
  if (!absl::StartsWith(reply, "HTTP/1.") || !absl::StrContains(reply.substr(0, 16), " 200 ") ||
      body == std::string::npos) {
    return absl::UnavailableError("bad reply: " + reply.substr(0, 200));
  }
  return reply.substr(body + 4);
}

// The series of `name` whose labels include all of `labels`.
std::optional<double> MetricValue(const std::string& text, const std::string& name,
                                  const std::vector<std::string>& labels = {}) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, name)) continue;
    const absl::string_view rest = line.substr(name.size());
    if (!rest.empty() && rest[0] != '{' && rest[0] != ' ') continue;
    bool all = true;
    for (const std::string& label : labels) all = all && absl::StrContains(line, label);
    double value = 0;
    const size_t space = line.rfind(' ');
    if (all && space != absl::string_view::npos && absl::SimpleAtod(line.substr(space + 1), &value)) {
      return value;
    }
  }
  return std::nullopt;
}

const char* const kFlags[] = {
    "host", "port", "metrics-host", "metrics-port", "metrics-threads", "metrics-timeout-ms",
    "reflection", "model", "device", "max-batch-size", "max-queue-size", "max-queue-delay-ms",
    "feature-threads", "model-instances", "torch-threads", "vad-threshold-dbfs",
    "max-message-bytes", "max-unary-seconds", "max-stream-seconds", "max-chunk-bytes",
    "min-hop-seconds", "stream-idle-seconds", "max-audio-memory-mb", "max-streams",
    "max-health-watches", "max-reflection-calls", "grpc-memory-mb", "max-concurrent-streams",
    "handshake-timeout-seconds", "keepalive-seconds", "keepalive-timeout-seconds",
    "min-ping-interval-seconds", "max-connection-idle-seconds", "max-connection-age-seconds",
    "max-connection-age-grace-seconds", "grace-seconds", "tls-cert", "tls-key",
    "tls-client-ca", "log-level"};

TEST(ServerProcessTest, HelpListsEveryFlagWithItsVariableAndDefault) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start({"--help"});
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> code = (*process)->WaitForExit();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);
  const std::string help = (*process)->Log();
  for (const char* flag : kFlags) {
    std::string variable = absl::StrCat("EMOSERVE_", flag);
    for (char& c : variable) c = c == '-' ? '_' : static_cast<char>(std::toupper(c));
    EXPECT_THAT(help, HasSubstr(absl::StrCat("--", flag))) << help;
    EXPECT_THAT(help, HasSubstr(variable)) << help;
  }
  for (const char* default_value : {"50051", "9464", "models/default", "cpu", "0.0.0.0"}) {
    EXPECT_THAT(help, HasSubstr(default_value));
  }
}

TEST(ServerProcessTest, BadValueIsOneErrorLineAndExitCode2) {
  const std::vector<std::vector<std::string>> cases = {
      {"--port", "70000"},
      {"--port", "fifty"},
      {"--metrics-port", "-1"},
      {"--max-batch-size", "0"},
      {"--device", "tpu"},
      {"--log-level", "loud"},
      {"--model", "/no/such/model"},
      {"--tls-cert", "/no/such/cert.pem"},
      {"--tls-cert", TestModelDir() + "/model.json"},  // no --tls-key
      {"--max-chunk-bytes", "5000000", "--max-message-bytes", "1000000"},
      {"--no-such-flag"},
      {"stray-argument"},
  };
  for (const auto& args : cases) {
    SCOPED_TRACE(absl::StrJoin(args, " "));
    absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(args);
    ASSERT_TRUE(process.ok()) << process.status();
    absl::StatusOr<int> code = (*process)->WaitForExit();
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_EQ(*code, 2);
    const std::vector<std::string> lines = NonEmptyLines((*process)->Log());
    ASSERT_EQ(lines.size(), 1u) << (*process)->Log();
    EXPECT_THAT(lines[0], HasSubstr("error"));
  }
}

TEST(ServerProcessTest, EnvironmentConfiguresTheServerAndFlagsWin) {
  const int env_port = testing::FreePort();
  const int flag_port = testing::FreePort();
  ASSERT_NE(env_port, flag_port);
  // Environment alone.
  {
    absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(
        {}, {absl::StrCat("EMOSERVE_PORT=", env_port), "EMOSERVE_HOST=127.0.0.1",
             "EMOSERVE_METRICS_PORT=0", "EMOSERVE_MODEL=" + TestModelDir(),
             "EMOSERVE_TORCH_THREADS=1", "EMOSERVE_MAX_BATCH_SIZE=7"});
    ASSERT_TRUE(process.ok()) << process.status();
    absl::StatusOr<int> port = (*process)->WaitForPort();
    ASSERT_TRUE(port.ok()) << port.status();
    EXPECT_EQ(*port, env_port);
    EXPECT_THAT((*process)->Log(), HasSubstr("max_batch_size=7"));
  }
  // A flag beats its variable.
  {
    absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(
        {"--port", absl::StrCat(flag_port)},
        {absl::StrCat("EMOSERVE_PORT=", env_port), "EMOSERVE_HOST=127.0.0.1",
         "EMOSERVE_METRICS_PORT=0", "EMOSERVE_MODEL=" + TestModelDir(), "EMOSERVE_TORCH_THREADS=1"});
    ASSERT_TRUE(process.ok()) << process.status();
    absl::StatusOr<int> port = (*process)->WaitForPort();
    ASSERT_TRUE(port.ok()) << port.status();
    EXPECT_EQ(*port, flag_port);
  }
  // A bad variable is reported like a bad flag.
  {
    absl::StatusOr<std::unique_ptr<ServerProcess>> process =
        ServerProcess::Start({}, {"EMOSERVE_MAX_STREAMS=many"});
    ASSERT_TRUE(process.ok()) << process.status();
    absl::StatusOr<int> code = (*process)->WaitForExit();
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_EQ(*code, 2);
    EXPECT_THAT((*process)->Log(), HasSubstr("max-streams"));
  }
}

TEST(ServerProcessTest, MissingModelFailsStartupWithAClearLogLine) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(
      {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--model", testing::ScratchDir()});
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> code = (*process)->WaitForExit();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 1);
  EXPECT_THAT((*process)->Log(), HasSubstr("event=model_load_failed"));
  EXPECT_THAT((*process)->Log(), HasSubstr("model.json"));
}

TEST(ServerProcessTest, MetricsPassPromtoolAndCountWhatHappened) {
  const std::pair<int, std::string> promtool = testing::RunCommand("promtool --version");
  ASSERT_EQ(promtool.first, 0) << "promtool (Debian package prometheus) is needed: " << promtool.second;
  const int metrics_port = testing::FreePort();
  std::vector<std::string> args = ServerArgs(metrics_port);
  args.insert(args.end(), {"--log-level", "debug"});
  absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(args);
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> port = WaitUntilServing(**process);
  ASSERT_TRUE(port.ok()) << port.status();
  auto stub = v1::EmotionService::NewStub(Connect(*port));

  // One good and one bad Classify, one stream.
  const std::vector<float> tone = testing::Sine(220, 0.3, kRate, 4.0);
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(tone));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse response;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Classify(&context, request, &response).ok());
  }
  {
    grpc::ClientContext context;
    v1::ClassifyRequest bad;
    bad.set_audio("not audio");
    EXPECT_EQ(stub->Classify(&context, bad, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  v1::StreamingConfig config;
  *config.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  const testing::StreamOutcome stream = testing::RunStream(*stub, config, ToLinear16(tone), 3200);
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();

  // The client has the stream's status before the server's OnDone releases
  // the stream (and its gauge): scrape until that has happened.
  absl::StatusOr<std::string> text;
  for (int attempt = 0; attempt < 100; ++attempt) {
    text = HttpGet(metrics_port, "/metrics");
    ASSERT_TRUE(text.ok()) << text.status();
    if (MetricValue(*text, "emoserve_active_streams") == 0.0) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  const std::string path = testing::ScratchDir() + "/metrics.txt";
  std::ofstream(path) << *text;
  const std::pair<int, std::string> check = testing::RunCommand("promtool check metrics < " + path);
  EXPECT_EQ(check.first, 0) << check.second << "\n" << *text;
  EXPECT_EQ(check.second, "") << "promtool lint findings";

  EXPECT_EQ(MetricValue(*text, "emoserve_requests_total", {"method=\"Classify\"", "code=\"OK\""}), 1.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_requests_total",
                        {"method=\"Classify\"", "code=\"INVALID_ARGUMENT\""}),
            1.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_requests_total", {"method=\"StreamClassify\"", "code=\"OK\""}),
            1.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_request_duration_seconds_count", {"method=\"Classify\""}), 2.0);
  // 4 s unary + 4 s streamed.
  EXPECT_NEAR(MetricValue(*text, "emoserve_audio_seconds_total").value_or(0), 8.0, 1e-6);
  // 4 s make two windows each way, plus the warm-up's.
  EXPECT_EQ(MetricValue(*text, "emoserve_queue_wait_seconds_count").value_or(0), 5.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_feature_extraction_seconds_count").value_or(0), 5.0);
  // The one Classify call's audio was decoded once.
  EXPECT_EQ(MetricValue(*text, "emoserve_decode_seconds_count").value_or(0), 1.0);
  EXPECT_GT(MetricValue(*text, "emoserve_decode_seconds_sum").value_or(0), 0.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_batch_size_sum").value_or(0), 4.0 + 1.0 /* warm-up */);
  EXPECT_GE(MetricValue(*text, "emoserve_inference_seconds_count").value_or(0), 2.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_active_streams"), 0.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_queue_depth"), 0.0);
  EXPECT_EQ(MetricValue(*text, "emoserve_model_info",
                        {"name=\"test-default-architecture\"", "device=\"cpu\"", "precision=\"fp32\"",
                         "version=\"0\""}),
            1.0);

  (*process)->Signal(SIGTERM);
  absl::StatusOr<int> code = (*process)->WaitForExit();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);

  // Structured logs: logfmt lines, a startup line with the essentials, one
  // line per call at debug level.
  const std::vector<std::string> lines = NonEmptyLines((*process)->Log());
  for (const std::string& line : lines) {
    EXPECT_TRUE(absl::StartsWith(line, "ts=") && absl::StrContains(line, " level=") &&
                absl::StrContains(line, " event="))
        << line;
  }
  const std::string log = (*process)->Log();
  for (const std::string& field :
       {absl::StrCat("model=", TestModelDir()), std::string("device=cpu"), absl::StrCat("port=", *port),
        absl::StrCat("metrics_port=", metrics_port), std::string("max_batch_size=32"),
        std::string("max_streams="), std::string("max_unary_seconds=")}) {
    EXPECT_THAT(log, HasSubstr(field));
  }
  EXPECT_THAT(log, HasSubstr("event=serving"));
  EXPECT_THAT(log, HasSubstr("event=call method=Classify code=INVALID_ARGUMENT"));
  EXPECT_THAT(log, HasSubstr("event=shutdown signal=SIGTERM"));
  EXPECT_THAT(log, HasSubstr("event=stopped"));
}

// --reflection false leaves reflection out; --metrics-host puts /metrics on
// its own address (here 127.0.0.2, also loopback on Linux) and not on --host.
TEST(ServerProcessTest, ReflectionCanBeTurnedOffAndMetricsBindToTheirOwnHost) {
  const int metrics_port = testing::FreePort();
  std::vector<std::string> args = ServerArgs(metrics_port);
  args.insert(args.end(), {"--reflection", "false", "--metrics-host", "127.0.0.2"});
  absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(args);
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> port = WaitUntilServing(**process);
  ASSERT_TRUE(port.ok()) << port.status();

  grpc::GenericStub generic(Connect(*port));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  grpc::Slice empty("");  // an empty ServerReflectionRequest
  const grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  absl::Notification done;
  grpc::Status status;
  generic.UnaryCall(&context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                    grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
                      status = std::move(s);
                      done.Notify();
                    });
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kPatience));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << status.error_message();

  absl::StatusOr<std::string> metrics = HttpGet(metrics_port, "/metrics", "127.0.0.2");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics, HasSubstr("emoserve_audio_memory_limit_bytes"));
  EXPECT_FALSE(HttpGet(metrics_port, "/metrics", "127.0.0.1").ok());
}

// Grace long enough for the calls in flight to finish on a loaded machine
// under a sanitizer (ThreadSanitizer makes the server 5-15 times slower);
// the server exits as soon as they have, so a long grace costs nothing.
constexpr double kGraceForCallsInFlight = 30;

TEST(ServerProcessTest, SigtermLetsCallsInFlightFinishAndExitsZero) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> process =
      ServerProcess::Start(ServerArgs(0, kGraceForCallsInFlight));
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> port = WaitUntilServing(**process);
  ASSERT_TRUE(port.ok()) << port.status();
  auto channel = Connect(*port);
  auto stub = v1::EmotionService::NewStub(channel);

  // A stream still open when the signal comes, known to be configured: its
  // first window came back (a stream whose config has not been read yet
  // when the signal comes ends UNAVAILABLE instead, asked to resend).
  grpc::ClientContext stream_context;
  stream_context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  auto stream = stub->StreamClassify(&stream_context);
  v1::StreamClassifyRequest config;
  *config.mutable_config()->mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  config.mutable_config()->set_interim_results(true);
  ASSERT_TRUE(stream->Write(config));
  const std::string pcm = ToLinear16(testing::Sine(220, 0.3, kRate, 3.0));
  for (size_t i = 0; i < pcm.size(); i += 32000) {  // under --max-chunk-bytes
    v1::StreamClassifyRequest audio;
    audio.set_audio(pcm.substr(i, 32000));
    ASSERT_TRUE(stream->Write(audio));
  }
  v1::StreamClassifyResponse first_window;
  ASSERT_TRUE(stream->Read(&first_window));

  // Calls of 4 windows each, all sent at once: far more work than one
  // finishes before the signal.
  constexpr int kCalls = 24;
  v1::ClassifyRequest request;
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 7.5)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  std::vector<grpc::ClientContext> contexts(kCalls);
  std::vector<v1::ClassifyResponse> responses(kCalls);
  absl::Mutex mu;
  std::map<grpc::StatusCode, int> codes;
  std::vector<std::string> others;
  int done = 0;
  for (int i = 0; i < kCalls; ++i) {
    contexts[i].set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
    stub->async()->Classify(&contexts[i], &request, &responses[i], [&, i](grpc::Status s) {
      absl::MutexLock lock(&mu);
      ++codes[s.error_code()];
      if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE) {
        others.push_back(absl::StrCat(i, ": ", s.error_code(), " ", s.error_message()));
      }
      ++done;
    });
  }

  // Signal once the first call is back: the rest are in flight.
  {
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(+[](int* d) { return *d >= 1; }, &done), kPatience));
  }
  (*process)->Signal(SIGTERM);
  {
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(+[](int* d) { return *d == kCalls; }, &done), kPatience));
  }
  // Every call finished, or was told the server is going: none is lost.
  EXPECT_TRUE(others.empty()) << absl::StrJoin(others, "\n");
  EXPECT_GE(codes[grpc::StatusCode::OK], 1);
  EXPECT_EQ(codes[grpc::StatusCode::OK] + codes[grpc::StatusCode::UNAVAILABLE], kCalls);
  v1::StreamClassifyResponse ignored;
  while (stream->Read(&ignored)) {
  }
  // The stream was flushed and ended OK.
  const grpc::Status stream_status = stream->Finish();
  EXPECT_TRUE(stream_status.ok()) << stream_status.error_message();

  absl::StatusOr<int> code = (*process)->WaitForExit();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << (*process)->Log();
  // Gone: new calls cannot reach it.
  grpc::ClientContext late;
  late.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  v1::ClassifyResponse late_response;
  EXPECT_EQ(stub->Classify(&late, request, &late_response).error_code(), grpc::StatusCode::UNAVAILABLE);
}

// `emoserve-train eval` reports what users get: for every clip of the test
// actors, the label it gives is the label the real server gives (the same
// windows, voice activity and averaging).
TEST(ServerProcessTest, EvalAndTheServiceGiveTheSameLabelForEveryTestClip) {
  const std::optional<std::string> shared = testing::SharedDir();
  if (!shared.has_value()) GTEST_SKIP() << "../shared is absent: the check needs RAVDESS";
  const std::string model = std::string(EMOSERVE_SOURCE_DIR) + "/models/default";
  const std::string predictions = testing::ScratchDir() + "/eval_predictions.csv";
  const std::pair<int, std::string> eval = testing::RunCommand(absl::StrCat(
      EMOSERVE_BINARY_DIR, "/train/emoserve-train eval --model ", model, " --data ", *shared,
      "/datasets/ravdess --actors 21-24 --threads 1 --predictions ", predictions));
  ASSERT_EQ(eval.first, 0) << eval.second;

  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(
      {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--model", model,
       "--torch-threads", "1"});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<int> port = WaitUntilServing(**server);
  ASSERT_TRUE(port.ok()) << port.status();
  std::unique_ptr<v1::EmotionService::Stub> stub = v1::EmotionService::NewStub(Connect(*port));

  std::ifstream csv(predictions);
  std::string line;
  std::getline(csv, line);
  ASSERT_EQ(line, "path,label,predicted");
  int clips = 0;
  int differ = 0;
  while (std::getline(csv, line)) {
    const std::vector<std::string> fields = absl::StrSplit(line, ',');
    ASSERT_EQ(fields.size(), 3u) << line;
    std::ifstream file(fields[0], std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(file)),
                            std::istreambuf_iterator<char>());
    v1::ClassifyRequest request;
    request.set_audio(bytes);
    v1::ClassifyResponse response;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    const grpc::Status status = stub->Classify(&context, request, &response);
    ASSERT_TRUE(status.ok()) << fields[0] << ": " << status.error_message();
    EXPECT_EQ(response.top_label(), fields[2]) << fields[0];
    differ += response.top_label() != fields[2] ? 1 : 0;
    ++clips;
  }
  EXPECT_EQ(clips, 240);
  EXPECT_EQ(differ, 0);
}

}  // namespace
}  // namespace emoserve

namespace emoserve {
namespace {

// One Classify of a tone, optionally naming a model and its version.
grpc::Status ClassifyTone(v1::EmotionService::Stub& stub, const std::string& model,
                          v1::ClassifyResponse* response, int64_t version = 0) {
  v1::ClassifyRequest request;
  request.set_model_version(version);
  request.set_audio(ToLinear16(testing::Sine(220, 0.3, kRate, 2.0)));
  *request.mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  request.set_model_name(model);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  return stub.Classify(&context, request, response);
}

// "name*: 1=READY 2=FAILED; ..." (* the default model).
std::string ListedModels(v1::EmotionService::Stub& stub) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  v1::ListModelsResponse list;
  if (grpc::Status s = stub.ListModels(&context, v1::ListModelsRequest(), &list); !s.ok()) {
    return s.error_message();
  }
  std::string text;
  for (const v1::ModelStatus& model : list.models()) {
    absl::StrAppend(&text, model.name(), model.is_default() ? "*" : "", ":");
    for (const v1::ModelVersionStatus& v : model.versions()) {
      absl::StrAppend(&text, " ", v.version(), "=",
                      absl::StripPrefix(v1::ModelState_Name(v.state()), "MODEL_STATE_"));
    }
    absl::StrAppend(&text, "; ");
  }
  return text;
}

// A repository of two models: each answers by name, an unknown name is
// NOT_FOUND with the names that exist; after SIGHUP a new version takes
// new calls while a stream that began on the removed old one ends on it
// with all its results, and a broken version leaves the working one
// serving.
TEST(ServerProcessTest, ModelRepositoryServesModelsSideBySideAndSwapsVersionsOnSighup) {
  const std::string root = testing::ScratchDir() + "/repository";
  std::filesystem::remove_all(root);
  const ModelConfig config = testing::SmallModelConfig();
  ASSERT_TRUE(testing::WriteTestModel(config, root + "/fast/1", 1).ok());
  ASSERT_TRUE(testing::WriteTestModel(config, root + "/accurate/1", 2).ok());
  absl::StatusOr<std::unique_ptr<ServerProcess>> process = ServerProcess::Start(
      {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--model-repository", root,
       "--default-model", "fast", "--model-poll-seconds", "0", "--torch-threads", "1",
       "--feature-threads", "1"});
  ASSERT_TRUE(process.ok()) << process.status();
  absl::StatusOr<int> port = WaitUntilServing(**process);
  ASSERT_TRUE(port.ok()) << port.status();
  auto stub = v1::EmotionService::NewStub(Connect(*port));
  EXPECT_EQ(ListedModels(*stub), "accurate: 1=READY; fast*: 1=READY; ");

  v1::ClassifyResponse by_default, fast, accurate, unknown;
  ASSERT_TRUE(ClassifyTone(*stub, "", &by_default).ok());
  ASSERT_TRUE(ClassifyTone(*stub, "fast", &fast).ok());
  ASSERT_TRUE(ClassifyTone(*stub, "accurate", &accurate).ok());
  EXPECT_EQ(by_default.model_name(), "fast");
  EXPECT_EQ(by_default.model_version(), "1");
  EXPECT_EQ(accurate.model_name(), "accurate");
  EXPECT_NE(fast.scores(0).probability(), accurate.scores(0).probability());
  const grpc::Status not_found = ClassifyTone(*stub, "slow", &unknown);
  EXPECT_EQ(not_found.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(not_found.error_message(), HasSubstr("the server has: accurate, fast"));
  // Names too long for a directory are refused without being echoed back.
  const grpc::Status too_long = ClassifyTone(*stub, std::string(1 << 20, 'x'), &unknown);
  EXPECT_EQ(too_long.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(too_long.error_message().size(), 200u) << too_long.error_message().substr(0, 200);
  EXPECT_EQ(ClassifyTone(*stub, "fast", &unknown, -1).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ClassifyTone(*stub, "fast", &unknown, 7).error_code(), grpc::StatusCode::NOT_FOUND);

  // A stream on fast/1, half its audio sent.
  grpc::ClientContext stream_context;
  stream_context.set_deadline(absl::ToChronoTime(absl::Now() + kPatience));
  auto stream = stub->StreamClassify(&stream_context);
  v1::StreamClassifyRequest first;
  *first.mutable_config()->mutable_format() = Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  first.mutable_config()->set_interim_results(true);
  first.mutable_config()->set_model_name("fast");
  ASSERT_TRUE(stream->Write(first));
  const std::string audio = ToLinear16(testing::Sine(220, 0.3, kRate, 4.0));
  v1::StreamClassifyRequest chunk;
  chunk.set_audio(audio.substr(0, audio.size() / 2));
  ASSERT_TRUE(stream->Write(chunk));
  v1::StreamClassifyResponse response;
  ASSERT_TRUE(stream->Read(&response));  // it is running on fast/1

  // fast/1 replaced by fast/2; a broken accurate/2.
  ASSERT_TRUE(testing::WriteTestModel(config, root + "/fast/2", 3).ok());
  std::filesystem::remove_all(root + "/fast/1");
  std::filesystem::create_directories(root + "/accurate/2");
  std::ofstream(root + "/accurate/2/model.json") << "{}";
  (*process)->Signal(SIGHUP);
  const absl::Time until = absl::Now() + kPatience;
  while (ListedModels(*stub) != "accurate: 1=READY 2=FAILED; fast*: 2=READY; " &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_EQ(ListedModels(*stub), "accurate: 1=READY 2=FAILED; fast*: 2=READY; ");
  v1::ClassifyResponse swapped, still;
  ASSERT_TRUE(ClassifyTone(*stub, "", &swapped).ok());
  EXPECT_EQ(swapped.model_name(), "fast");
  EXPECT_EQ(swapped.model_version(), "2");
  ASSERT_TRUE(ClassifyTone(*stub, "accurate", &still).ok());
  EXPECT_EQ(still.model_version(), "1");

  // The stream goes on, on fast/1, to its end.
  chunk.set_audio(audio.substr(audio.size() / 2));
  ASSERT_TRUE(stream->Write(chunk));
  ASSERT_TRUE(stream->WritesDone());
  double last_window_end = 0;
  int utterances = 0;
  do {
    if (response.has_window()) last_window_end = response.window().end_seconds();
    utterances += response.has_utterance() ? 1 : 0;
  } while (stream->Read(&response));
  const grpc::Status ended = stream->Finish();
  EXPECT_TRUE(ended.ok()) << ended.error_message();
  EXPECT_NEAR(last_window_end, 4.0, 0.5);
  EXPECT_EQ(utterances, 1);

  // Its last call over, fast/1 is unloaded, with no rescan.
  const absl::Time unload_until = absl::Now() + kPatience;
  while (!absl::StrContains((*process)->Log(), "event=model_unloaded") &&
         absl::Now() < unload_until) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  const std::string log = (*process)->Log();
  EXPECT_THAT(log, HasSubstr("event=model_retired model=fast version=1"));
  EXPECT_THAT(log, HasSubstr("event=model_unloaded model=fast version=1"));
  EXPECT_THAT(log, HasSubstr("event=model_load_failed model=accurate version=2"));
}

}  // namespace
}  // namespace emoserve
