// The server's parts that need no model: flags and EMOSERVE_* variables,
// logfmt lines, proto/status conversions, the worker pool, the metrics'
// exposition.
#include <stdlib.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "server/config.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/proto_convert.h"
#include "server/worker_pool.h"

namespace emoserve {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<CommandLine> Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "emoserve-server");
  std::vector<const char*> argv;
  for (const std::string& arg : args) argv.push_back(arg.c_str());
  return ParseCommandLine(static_cast<int>(argv.size()), argv.data());
}

// Sets an environment variable for the scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};

TEST(ServerConfigTest, DefaultsAreTheDocumentedOnes) {
  absl::StatusOr<CommandLine> parsed = Parse({});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_FALSE(parsed->help.has_value());
  const ServerConfig& c = parsed->config;
  EXPECT_EQ(c.host, "0.0.0.0");
  EXPECT_EQ(c.port, 50051);
  EXPECT_EQ(c.metrics_port, 9464);
  EXPECT_EQ(c.model, "models/default");
  EXPECT_EQ(c.device, "cpu");
  EXPECT_EQ(c.max_batch_size, 32);
  EXPECT_EQ(c.max_queue_delay_ms, 0);
  EXPECT_EQ(c.feature_threads, 0);
  EXPECT_EQ(c.model_instances, 1);
  EXPECT_EQ(c.torch_threads, 1);
  EXPECT_EQ(c.grace_seconds, 10);
  EXPECT_GE(c.max_streams, 1000) << "the server must hold 1000 streams by default";
  EXPECT_EQ(c.log_level, LogLevel::kInfo);
  EXPECT_TRUE(c.tls_cert.empty());
}

TEST(ServerConfigTest, EveryFlagHasAVariableAndTheFlagWins) {
  // flag, a value, how to read it back.
  struct Case {
    std::string flag;
    std::string value;
    std::string other;
    std::function<std::string(const ServerConfig&)> get;
  };
  const std::string dir = ::testing::TempDir();
  const std::string file = dir + "/server_config_test_file";
  std::ofstream(file) << "x";
  const std::vector<Case> cases = {
      {"host", "127.0.0.1", "::1", [](const ServerConfig& c) { return c.host; }},
      {"port", "1234", "4321", [](const ServerConfig& c) { return absl::StrCat(c.port); }},
      {"metrics-port", "0", "9100", [](const ServerConfig& c) { return absl::StrCat(c.metrics_port); }},
      {"model", dir, "/", [](const ServerConfig& c) { return c.model; }},
      {"device", "cuda:1", "cuda", [](const ServerConfig& c) { return c.device; }},
      {"max-batch-size", "8", "16", [](const ServerConfig& c) { return absl::StrCat(c.max_batch_size); }},
      {"max-queue-size", "100", "200", [](const ServerConfig& c) { return absl::StrCat(c.max_queue_size); }},
      {"max-queue-delay-ms", "5", "7",
       [](const ServerConfig& c) { return absl::StrCat(c.max_queue_delay_ms); }},
      {"feature-threads", "3", "4", [](const ServerConfig& c) { return absl::StrCat(c.feature_threads); }},
      {"model-instances", "2", "3", [](const ServerConfig& c) { return absl::StrCat(c.model_instances); }},
      {"torch-threads", "2", "5", [](const ServerConfig& c) { return absl::StrCat(c.torch_threads); }},
      {"max-message-bytes", "4096000", "5000000",
       [](const ServerConfig& c) { return absl::StrCat(c.max_message_bytes); }},
      {"max-unary-seconds", "30", "40", [](const ServerConfig& c) { return absl::StrCat(c.max_unary_seconds); }},
      {"max-stream-seconds", "60", "70",
       [](const ServerConfig& c) { return absl::StrCat(c.max_stream_seconds); }},
      {"max-streams", "10", "20", [](const ServerConfig& c) { return absl::StrCat(c.max_streams); }},
      {"max-chunk-bytes", "1000", "2000", [](const ServerConfig& c) { return absl::StrCat(c.max_chunk_bytes); }},
      {"vad-threshold-dbfs", "-40", "-60",
       [](const ServerConfig& c) { return absl::StrCat(c.vad_threshold_dbfs); }},
      {"grace-seconds", "2", "3", [](const ServerConfig& c) { return absl::StrCat(c.grace_seconds); }},
      {"log-level", "debug", "error",
       [](const ServerConfig& c) { return std::string(LogLevelName(c.log_level)); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.flag);
    std::string variable = absl::StrCat("EMOSERVE_", c.flag);
    for (char& ch : variable) ch = ch == '-' ? '_' : static_cast<char>(std::toupper(ch));
    ScopedEnv env(variable.c_str(), c.value.c_str());
    absl::StatusOr<CommandLine> from_env = Parse({});
    ASSERT_TRUE(from_env.ok()) << from_env.status();
    EXPECT_EQ(c.get(from_env->config), c.value);
    absl::StatusOr<CommandLine> from_flag = Parse({"--" + c.flag, c.other});
    ASSERT_TRUE(from_flag.ok()) << from_flag.status();
    EXPECT_EQ(c.get(from_flag->config), c.other);
  }
  // TLS files: variables too, and all three together make mutual TLS.
  ScopedEnv cert("EMOSERVE_TLS_CERT", file.c_str());
  ScopedEnv key("EMOSERVE_TLS_KEY", file.c_str());
  ScopedEnv ca("EMOSERVE_TLS_CLIENT_CA", file.c_str());
  absl::StatusOr<CommandLine> tls = Parse({});
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_EQ(tls->config.tls_cert, file);
  EXPECT_EQ(tls->config.tls_key, file);
  EXPECT_EQ(tls->config.tls_client_ca, file);
}

TEST(ServerConfigTest, BadValuesAreOneLineErrorsNamingTheFlag) {
  const std::string file = ::testing::TempDir() + "/server_config_test_file";
  std::ofstream(file) << "x";
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--port", "65536"}, "--port"},
      {{"--port", "x"}, "--port"},
      {{"--max-batch-size", "0"}, "--max-batch-size"},
      {{"--max-queue-size", "-3"}, "--max-queue-size"},
      {{"--device", "gpu"}, "--device"},
      {{"--device", "cuda:x"}, "--device"},
      {{"--log-level", "verbose"}, "--log-level"},
      {{"--vad-threshold-dbfs", "3"}, "--vad-threshold-dbfs"},
      {{"--grace-seconds", "-1"}, "--grace-seconds"},
      {{"--max-unary-seconds", "0"}, "--max-unary-seconds"},
      {{"--model", "/no/such/dir"}, "--model"},
      {{"--tls-cert", file}, "--tls-key"},
      {{"--tls-key", file}, "--tls-cert"},
      {{"--tls-client-ca", file}, "--tls-client-ca"},
      {{"--max-chunk-bytes", "3000000", "--max-message-bytes", "2000000"}, "--max-chunk-bytes"},
      {{"--bogus"}, "bogus"},
  };
  for (const auto& [args, flag] : cases) {
    SCOPED_TRACE(absl::StrJoin(args, " "));
    absl::StatusOr<CommandLine> parsed = Parse(args);
    ASSERT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(parsed.status().message(), HasSubstr(flag));
    EXPECT_THAT(parsed.status().message(), ::testing::Not(HasSubstr("\n")));
  }
  ScopedEnv env("EMOSERVE_PORT", "lots");
  absl::StatusOr<CommandLine> parsed = Parse({});
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(parsed.status().message(), HasSubstr("--port"));
}

TEST(ServerConfigTest, HelpIsReturnedNotPrinted) {
  absl::StatusOr<CommandLine> parsed = Parse({"--help"});
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_TRUE(parsed->help.has_value());
  EXPECT_THAT(*parsed->help, HasSubstr("--max-queue-delay-ms"));
  EXPECT_THAT(*parsed->help, HasSubstr("EMOSERVE_MAX_QUEUE_DELAY_MS"));
}

TEST(ServerLogTest, LinesAreLogfmtWithQuotingWhereNeeded) {
  const std::string line = FormatLogLine(
      LogLevel::kWarning, "startup",
      {{"model", "models/default"}, {"port", 50051}, {"ratio", 0.5}, {"tls", false},
       {"message", "bad \"audio\" here"}, {"empty", ""}, {"eq", "a=b"}, {"nl", "a\nb"}});
  EXPECT_THAT(line, ::testing::MatchesRegex(
                        "ts=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z level=warning event=startup .*"));
  EXPECT_THAT(line, HasSubstr(" model=models/default port=50051 ratio=0.5 tls=false "));
  EXPECT_THAT(line, HasSubstr(" message=\"bad \\\"audio\\\" here\""));
  EXPECT_THAT(line, HasSubstr(" empty=\"\""));
  EXPECT_THAT(line, HasSubstr(" eq=\"a=b\""));
  EXPECT_THAT(line, HasSubstr(" nl=\"a\\nb\""));
  EXPECT_THAT(line, ::testing::Not(HasSubstr("\n")));
}

TEST(ServerLogTest, LevelsParseAndFilter) {
  EXPECT_EQ(*ParseLogLevel("debug"), LogLevel::kDebug);
  EXPECT_EQ(*ParseLogLevel("WARNING"), LogLevel::kWarning);
  EXPECT_FALSE(ParseLogLevel("chatty").ok());
  SetLogLevel(LogLevel::kWarning);
  EXPECT_FALSE(LogEnabled(LogLevel::kInfo));
  EXPECT_TRUE(LogEnabled(LogLevel::kError));
  SetLogLevel(LogLevel::kInfo);
  EXPECT_TRUE(LogEnabled(LogLevel::kInfo));
  EXPECT_FALSE(LogEnabled(LogLevel::kDebug));
}

TEST(ProtoConvertTest, StatusCodesMapOneToOne) {
  for (int code = 0; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why");
    const grpc::Status converted = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(converted.error_code()), code);
    if (code != 0) {
      EXPECT_EQ(converted.error_message(), "why");
    }
  }
  EXPECT_EQ(grpc::StatusCode::RESOURCE_EXHAUSTED,
            ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code());
}

TEST(ProtoConvertTest, AudioFormats) {
  auto format = [](v1::AudioEncoding encoding, int rate, int channels) {
    v1::AudioFormat f;
    f.set_encoding(encoding);
    f.set_sample_rate_hertz(rate);
    f.set_channel_count(channels);
    return f;
  };
  absl::StatusOr<std::optional<RawPcmFormat>> file = RawPcmFormatFromProto(v1::AudioFormat());
  ASSERT_TRUE(file.ok());
  EXPECT_FALSE(file->has_value());
  absl::StatusOr<std::optional<RawPcmFormat>> s16 =
      RawPcmFormatFromProto(format(v1::AUDIO_ENCODING_LINEAR16, 44100, 0));
  ASSERT_TRUE(s16.ok() && s16->has_value());
  EXPECT_EQ((*s16)->encoding, PcmEncoding::kS16LE);
  EXPECT_EQ((*s16)->sample_rate, 44100);
  EXPECT_EQ((*s16)->channels, 1);
  absl::StatusOr<std::optional<RawPcmFormat>> f32 =
      RawPcmFormatFromProto(format(v1::AUDIO_ENCODING_FLOAT32, 8000, 2));
  ASSERT_TRUE(f32.ok() && f32->has_value());
  EXPECT_EQ((*f32)->encoding, PcmEncoding::kF32LE);
  EXPECT_EQ((*f32)->channels, 2);
  for (const v1::AudioFormat& bad :
       {format(v1::AUDIO_ENCODING_LINEAR16, 0, 1), format(v1::AUDIO_ENCODING_LINEAR16, 7999, 1),
        format(v1::AUDIO_ENCODING_FLOAT32, 16000, -1), format(static_cast<v1::AudioEncoding>(9), 16000, 1),
        format(v1::AUDIO_ENCODING_UNSPECIFIED, 16000, 0)}) {
    EXPECT_EQ(RawPcmFormatFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << bad.DebugString();
  }
}

TEST(ProtoConvertTest, ScoresAreSortedHighestFirstWithStableTies) {
  google::protobuf::RepeatedPtrField<v1::EmotionScore> scores;
  const std::string top =
      AddSortedScores({"calm", "happy", "sad", "angry"}, std::vector<float>{0.2f, 0.4f, 0.2f, 0.2f}, &scores);
  EXPECT_EQ(top, "happy");
  std::vector<std::string> order;
  for (const auto& s : scores) order.push_back(s.label());
  EXPECT_THAT(order, ::testing::ElementsAre("happy", "calm", "sad", "angry"));
  EXPECT_FLOAT_EQ(scores[0].probability(), 0.4f);
  google::protobuf::RepeatedPtrField<v1::EmotionScore> none;
  EXPECT_EQ(AddSortedScores({"a"}, {}, &none), "");
  EXPECT_TRUE(none.empty());
}

TEST(ProtoConvertTest, ModelInfoCarriesTheFeatureParameters) {
  ModelConfig config;
  config.name = "m";
  config.version = "3";
  config.labels = {"x", "y"};
  config.sample_rate = 16000;
  config.window_seconds = 2.0;
  config.features.n_mfcc = 13;
  absl::StatusOr<v1::ModelInfo> info = ModelInfoFromConfig(config, "cuda:0", 16);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->device(), "cuda:0");
  EXPECT_EQ(info->max_batch_size(), 16);
  EXPECT_DOUBLE_EQ(info->default_hop_seconds(), 1.0);
  EXPECT_EQ(info->features().fields().at("n_mfcc").number_value(), 13);
  EXPECT_EQ(info->features().fields().at("window").string_value(), "hamming");
}

TEST(ProtoConvertTest, DeadlinesConvert) {
  EXPECT_EQ(ToAbslDeadline(std::chrono::system_clock::time_point::max()), absl::InfiniteFuture());
  const absl::Time t = absl::FromUnixSeconds(1700000000);
  EXPECT_EQ(ToAbslDeadline(absl::ToChronoTime(t)), t);
}

TEST(WorkerPoolTest, RunsEverythingPostedAndRejectsBeyondItsQueue) {
  std::atomic<int> ran{0};
  absl::Notification release;
  {
    WorkerPool pool(1, 2);
    absl::Notification started;
    ASSERT_TRUE(pool.TryPost([&] {
      started.Notify();
      release.WaitForNotification();
      ++ran;
    }));
    started.WaitForNotification();  // the only worker is busy now
    EXPECT_TRUE(pool.TryPost([&] { ++ran; }));
    EXPECT_TRUE(pool.TryPost([&] { ++ran; }));
    EXPECT_FALSE(pool.TryPost([&] { ++ran; })) << "two already wait";
    release.Notify();
  }  // joins after the queue drains
  EXPECT_EQ(ran.load(), 3);
}

TEST(ServerMetricsTest, ExpositionPassesPromtool) {
  ServerMetrics metrics;
  metrics.SetModelInfo("m", "1", "cpu");
  metrics.RecordCall("Classify", absl::StatusCode::kOk);
  metrics.RecordCall("Classify", absl::StatusCode::kInvalidArgument);
  metrics.RecordLatency("Classify", absl::Milliseconds(12));
  metrics.AddAudioSeconds(3.5);
  metrics.StreamStarted();
  metrics.OnWindow(absl::Milliseconds(1), absl::Milliseconds(2));
  metrics.OnBatch(4, absl::Milliseconds(20));
  metrics.OnQueueDepth(7);
  const std::string text = metrics.Render();
  EXPECT_THAT(text, HasSubstr("emoserve_requests_total{code=\"OK\",method=\"Classify\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_audio_seconds_total 3.5"));
  EXPECT_THAT(text, HasSubstr("emoserve_active_streams 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_queue_depth 7"));
  EXPECT_THAT(text, HasSubstr("emoserve_batch_size_sum 4"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_info{device=\"cpu\",name=\"m\",version=\"1\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_request_duration_seconds_bucket{method=\"Classify\",le=\"0.025\"} 1"));

  const std::string path = ::testing::TempDir() + "/server_metrics_test.txt";
  std::ofstream(path) << text;
  FILE* pipe = popen(("promtool check metrics < " + path + " 2>&1").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) output.append(buffer, n);
  const int status = pclose(pipe);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "promtool (Debian package prometheus): " << output;
  EXPECT_EQ(output, "");
}

TEST(ServerMetricsTest, ExposeReportsAPortInUse) {
  ServerMetrics first;
  ServerMetrics second;
  // Find a port the first can take, then ask the second for the same.
  int port = 0;
  for (int candidate = 39464; candidate < 39564 && port == 0; ++candidate) {
    if (first.Expose("127.0.0.1", candidate).ok()) port = candidate;
  }
  ASSERT_NE(port, 0);
  const absl::Status taken = second.Expose("127.0.0.1", port);
  EXPECT_EQ(taken.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(taken.message(), HasSubstr("--metrics-port"));
}

}  // namespace
}  // namespace emoserve
