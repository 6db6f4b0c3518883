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
#include "server/connection_guard.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/proto_convert.h"
#include "server/requests.h"
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
  EXPECT_EQ(c.intra_op_threads, 1);
  EXPECT_EQ(c.grace_seconds, 10);
  EXPECT_GE(c.max_streams, 1000) << "the server must hold 1000 streams by default";
  EXPECT_EQ(c.log_level, LogLevel::kInfo);
  EXPECT_TRUE(c.tls_cert.empty());
  // The limits docs/limits.md states.
  EXPECT_EQ(c.max_audio_memory_mb, 256);
  EXPECT_EQ(c.grpc_memory_mb, 256);
  EXPECT_EQ(c.min_hop_seconds, 0.25);
  EXPECT_EQ(c.max_chunk_bytes, 64 << 10);
  EXPECT_EQ(c.stream_idle_seconds, 30);
  EXPECT_EQ(c.max_concurrent_streams, 100);
  EXPECT_EQ(c.max_health_watches, 256);
  EXPECT_EQ(c.max_reflection_calls, 8);
  EXPECT_TRUE(c.reflection);
  EXPECT_TRUE(c.metrics_host.empty());
  EXPECT_EQ(c.metrics_threads, 16);
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
      {"http-port", "0", "8081", [](const ServerConfig& c) { return absl::StrCat(c.http_port); }},
      {"http-host", "127.0.0.1", "::1", [](const ServerConfig& c) { return c.http_host; }},
      {"http-threads", "4", "32", [](const ServerConfig& c) { return absl::StrCat(c.http_threads); }},
      {"model", dir, "/", [](const ServerConfig& c) { return c.model; }},
      {"device", "cuda:1", "cuda", [](const ServerConfig& c) { return c.device; }},
      {"max-batch-size", "8", "16", [](const ServerConfig& c) { return absl::StrCat(c.max_batch_size); }},
      {"max-queue-size", "100", "200", [](const ServerConfig& c) { return absl::StrCat(c.max_queue_size); }},
      {"max-queue-delay-ms", "5", "7",
       [](const ServerConfig& c) { return absl::StrCat(c.max_queue_delay_ms); }},
      {"feature-threads", "3", "4", [](const ServerConfig& c) { return absl::StrCat(c.feature_threads); }},
      {"model-instances", "2", "3", [](const ServerConfig& c) { return absl::StrCat(c.model_instances); }},
      {"torch-threads", "2", "5", [](const ServerConfig& c) { return absl::StrCat(c.intra_op_threads); }},
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
      {"metrics-host", "127.0.0.1", "10.0.0.1", [](const ServerConfig& c) { return c.metrics_host; }},
      {"metrics-threads", "2", "3", [](const ServerConfig& c) { return absl::StrCat(c.metrics_threads); }},
      {"metrics-timeout-ms", "500", "700",
       [](const ServerConfig& c) { return absl::StrCat(c.metrics_timeout_ms); }},
      {"reflection", "false", "true",
       [](const ServerConfig& c) { return std::string(c.reflection ? "true" : "false"); }},
      {"min-hop-seconds", "0.5", "1", [](const ServerConfig& c) { return absl::StrCat(c.min_hop_seconds); }},
      {"stream-idle-seconds", "5", "6",
       [](const ServerConfig& c) { return absl::StrCat(c.stream_idle_seconds); }},
      {"max-audio-memory-mb", "64", "128",
       [](const ServerConfig& c) { return absl::StrCat(c.max_audio_memory_mb); }},
      {"max-health-watches", "5", "6",
       [](const ServerConfig& c) { return absl::StrCat(c.max_health_watches); }},
      {"max-reflection-calls", "1", "2",
       [](const ServerConfig& c) { return absl::StrCat(c.max_reflection_calls); }},
      {"grpc-memory-mb", "100", "200", [](const ServerConfig& c) { return absl::StrCat(c.grpc_memory_mb); }},
      {"max-concurrent-streams", "10", "20",
       [](const ServerConfig& c) { return absl::StrCat(c.max_concurrent_streams); }},
      {"handshake-timeout-seconds", "2", "3",
       [](const ServerConfig& c) { return absl::StrCat(c.handshake_timeout_seconds); }},
      {"keepalive-seconds", "30", "40",
       [](const ServerConfig& c) { return absl::StrCat(c.keepalive_seconds); }},
      {"keepalive-timeout-seconds", "5", "6",
       [](const ServerConfig& c) { return absl::StrCat(c.keepalive_timeout_seconds); }},
      {"min-ping-interval-seconds", "1", "2",
       [](const ServerConfig& c) { return absl::StrCat(c.min_ping_interval_seconds); }},
      {"max-connection-idle-seconds", "60", "70",
       [](const ServerConfig& c) { return absl::StrCat(c.max_connection_idle_seconds); }},
      {"max-connection-age-seconds", "100", "200",
       [](const ServerConfig& c) { return absl::StrCat(c.max_connection_age_seconds); }},
      {"max-connection-age-grace-seconds", "10", "20",
       [](const ServerConfig& c) { return absl::StrCat(c.max_connection_age_grace_seconds); }},
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
      {{"--grpc-memory-mb", "40"}, "--grpc-memory-mb"},
      {{"--max-audio-memory-mb", "16"}, "--max-audio-memory-mb"},
      {{"--min-hop-seconds", "-1"}, "--min-hop-seconds"},
      {{"--stream-idle-seconds", "0"}, "--stream-idle-seconds"},
      {{"--reflection", "maybe"}, "--reflection"},
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

TEST(ServerLogTest, LevelNamesParseInAnyCaseAndLevelsBelowTheSetOneAreOff) {
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

TEST(ProtoConvertTest, AudioFormatsConvertToRawPcmAndBadOnesAreInvalidArgument) {
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
        format(v1::AUDIO_ENCODING_LINEAR16, 16000, 65),
        format(v1::AUDIO_ENCODING_LINEAR16, 16000, 2147483647),
        format(v1::AUDIO_ENCODING_UNSPECIFIED, 16000, 0)}) {
    EXPECT_EQ(RawPcmFormatFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << bad.DebugString();
  }
}

// A stream's audio messages: frames may straddle messages, and what waits
// for the rest of a frame is always less than one frame.
TEST(StreamAudioDecoderTest, FramesStraddlingMessagesKeepUnderOneFrameWaiting) {
  RawPcmFormat format;
  format.encoding = PcmEncoding::kF32LE;
  format.sample_rate = 16000;
  format.channels = 3;  // 12-byte frames
  StreamAudioDecoder decoder(format);
  ASSERT_EQ(decoder.pcm_frame_bytes(), 12u);
  std::string pcm;
  std::vector<float> expected;
  for (int i = 0; i < 100; ++i) {
    const float channels[3] = {0.001f * i, 0.002f * i, 0.003f * i};
    pcm.append(reinterpret_cast<const char*>(channels), sizeof(channels));
    expected.push_back((channels[0] + channels[1] + channels[2]) / 3);
  }
  RequestLimits limits;
  std::vector<float> decoded;
  const auto push = [&](absl::Span<const float> samples) {
    decoded.insert(decoded.end(), samples.begin(), samples.end());
    return absl::OkStatus();
  };
  // Message sizes that cut frames everywhere, including 1-byte messages.
  size_t pos = 0;
  for (size_t size : {1, 1, 5, 12, 13, 7, 1, 100, 23, 11, 2000}) {
    v1::StreamClassifyRequest message;
    message.set_audio(pcm.substr(pos, size));
    pos = std::min(pcm.size(), pos + size);
    ASSERT_TRUE(decoder.Decode(message, limits, push).ok());
    EXPECT_LT(decoder.pending_bytes(), decoder.pcm_frame_bytes());
  }
  ASSERT_EQ(decoded.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(decoded[i], expected[i], 1e-7) << i;

  // A message over the limit, a second config: refused.
  limits.max_chunk_bytes = 10;
  v1::StreamClassifyRequest big;
  big.set_audio(std::string(11, '\0'));
  EXPECT_EQ(decoder.Decode(big, limits, push).code(), absl::StatusCode::kResourceExhausted);
  v1::StreamClassifyRequest config;
  config.mutable_config();
  EXPECT_EQ(decoder.Decode(config, limits, push).code(), absl::StatusCode::kInvalidArgument);
}

TEST(StreamConfigTest, ChecksTheConfigAsFullyAsAClassifyRequest) {
  ModelConfig model;
  model.sample_rate = 16000;
  model.window_seconds = 3.0;
  RequestLimits limits;
  const auto config = [](int channels, int rate, double hop, double vad) {
    v1::StreamClassifyRequest first;
    v1::StreamingConfig* c = first.mutable_config();
    c->mutable_format()->set_encoding(v1::AUDIO_ENCODING_LINEAR16);
    c->mutable_format()->set_sample_rate_hertz(rate);
    c->mutable_format()->set_channel_count(channels);
    c->set_hop_seconds(hop);
    c->mutable_voice_activity()->set_threshold_dbfs(vad);
    return first;
  };
  absl::StatusOr<StreamSetup> fine = CheckStreamConfig(config(2, 48000, 0.5, -45), model, limits);
  ASSERT_TRUE(fine.ok()) << fine.status();
  EXPECT_EQ(fine->format.channels, 2);
  EXPECT_EQ(fine->options.input_sample_rate, 48000);
  EXPECT_EQ(fine->options.vad_threshold_dbfs, -45);
  const struct {
    v1::StreamClassifyRequest first;
    const char* says;
  } kBad[] = {{config(2147483647, 16000, 0, 0), "channel_count is 2147483647"},
              {config(1, 7999, 0, 0), "sample_rate_hertz"},
              {config(1, 16000, 0.0000625, 0), "config.hop_seconds is 6.25e-05"},
              {config(1, 16000, 4, 0), "config.hop_seconds is 4"},
              {config(1, 16000, std::nan(""), 0), "config.hop_seconds is nan"},
              {config(1, 16000, 0, std::nan("")), "threshold_dbfs is nan"},
              {config(1, 16000, 0, 3), "threshold_dbfs is 3"}};
  for (const auto& bad : kBad) {
    absl::StatusOr<StreamSetup> refused = CheckStreamConfig(bad.first, model, limits);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << bad.says;
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr(bad.says));
  }
}

// What the connection guard reads of a client's bytes: frame headers, in
// pieces of any size, and the limits on resets and control frames.
std::string Frame(uint8_t type, uint32_t stream, size_t payload) {
  std::string frame = {static_cast<char>(payload >> 16), static_cast<char>(payload >> 8),
                       static_cast<char>(payload), static_cast<char>(type), 0,
                       static_cast<char>(stream >> 24), static_cast<char>(stream >> 16),
                       static_cast<char>(stream >> 8), static_cast<char>(stream)};
  return frame + std::string(payload, 'x');
}

TEST(ConnectionGuardTest, CountsFramesInPiecesOfAnySizeAndClosesOnRapidResets) {
  ConnectionGuardOptions options;
  options.max_resets_per_second = 10;
  TokenBucket total(1000);
  Http2FrameCounter counter(options, &total);
  const absl::Time now = absl::Now();
  std::string bytes = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + Frame(0x4, 0, 12);
  for (uint32_t stream = 1; stream < 21; stream += 2) {
    bytes += Frame(0x1, stream, 40) + Frame(0x0, stream, 1000) + Frame(0x3, stream, 4);
  }
  // One byte at a time: a frame header may straddle reads.
  for (char byte : bytes) {
    ASSERT_EQ(counter.Feed(absl::string_view(&byte, 1), now), std::nullopt);
  }
  EXPECT_TRUE(counter.saw_preface());
  EXPECT_EQ(counter.frames(), 1 + 3 * 10);
  // The eleventh reset within the second is one too many.
  EXPECT_EQ(counter.Feed(Frame(0x1, 21, 40) + Frame(0x3, 21, 4), now), "rapid_reset");
  // A second later there is room again.
  Http2FrameCounter later(options, &total);
  for (int i = 0; i < 10; ++i) ASSERT_EQ(later.Feed(Frame(0x3, 1, 4), now), std::nullopt) << i;
  EXPECT_EQ(later.Feed(Frame(0x3, 1, 4), now + absl::Seconds(1)), std::nullopt);
}

TEST(ConnectionGuardTest, ManyConnectionsShareTheTotalResetBudget) {
  ConnectionGuardOptions options;
  options.max_resets_per_second = 10;
  TokenBucket total(15);
  Http2FrameCounter first(options, &total);
  Http2FrameCounter second(options, &total);
  const absl::Time now = absl::Now();
  const std::string preface(24, 'p');
  ASSERT_EQ(first.Feed(preface, now), std::nullopt);
  ASSERT_EQ(second.Feed(preface, now), std::nullopt);
  for (int i = 0; i < 10; ++i) ASSERT_EQ(first.Feed(Frame(0x3, 1, 4), now), std::nullopt);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(second.Feed(Frame(0x3, 1, 4), now), std::nullopt);
  EXPECT_EQ(second.Feed(Frame(0x3, 1, 4), now), "rapid_reset");
}

TEST(ConnectionGuardTest, ControlFramesFloodingIsClosedButWindowUpdatesAreNot) {
  ConnectionGuardOptions options;
  options.max_control_frames_per_second = 5;
  Http2FrameCounter counter(options, nullptr);
  const absl::Time now = absl::Now();
  ASSERT_EQ(counter.Feed(std::string(24, 'p'), now), std::nullopt);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(counter.Feed(Frame(0x8, 0, 4), now), std::nullopt);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(counter.Feed(Frame(0xFA, 0, 100), now), std::nullopt);
  ASSERT_EQ(counter.Feed(Frame(0x6, 0, 8) + Frame(0x4, 0, 6), now), std::nullopt);
  // The sixth within the second: a PING counts like the others.
  EXPECT_EQ(counter.Feed(Frame(0x6, 0, 8), now), "control_flood");
  // Pings a second apart are fine.
  Http2FrameCounter keepalive(options, nullptr);
  ASSERT_EQ(keepalive.Feed(std::string(24, 'p'), now), std::nullopt);
  for (int i = 0; i < 20; ++i) {
    ASSERT_EQ(keepalive.Feed(Frame(0x6, 0, 8), now + absl::Seconds(i)), std::nullopt) << i;
  }
}

// A frame with a given payload and flags.
std::string FrameWith(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload) {
  std::string frame = Frame(type, stream, 0);
  frame[0] = static_cast<char>(payload.size() >> 16);
  frame[1] = static_cast<char>(payload.size() >> 8);
  frame[2] = static_cast<char>(payload.size());
  frame[4] = static_cast<char>(flags);
  return frame + payload;
}

// gRPC's framing of one message: a flag byte and the length, big-endian.
std::string GrpcPrefix(uint32_t length) {
  return {0, static_cast<char>(length >> 24), static_cast<char>(length >> 16),
          static_cast<char>(length >> 8), static_cast<char>(length)};
}

// The frames of a byte stream, as (type, flags, stream, payload).
struct ParsedFrame {
  uint8_t type;
  uint8_t flags;
  uint32_t stream;
  std::string payload;
};
std::vector<ParsedFrame> ParseFrames(absl::string_view bytes) {
  std::vector<ParsedFrame> frames;
  Http2FrameReader reader(/*client_side=*/false);
  reader.Feed(bytes, [&](const Http2FrameReader::Piece& piece) {
    if (piece.part == Http2FrameReader::Part::kHeader) {
      frames.push_back({piece.frame->type, piece.frame->flags, piece.frame->stream, ""});
    } else {
      frames.back().payload.append(piece.bytes.data(), piece.bytes.size());
    }
  });
  EXPECT_TRUE(reader.at_boundary());
  return frames;
}

constexpr absl::string_view kPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

TEST(UploadAdmissionTest, MessagesThatFitPassUnchangedAndAreChargedUntilTheyArrive) {
  MemoryBudget budget(1 << 20, nullptr, "the upload budget");
  UploadAdmission uploads(&budget);
  // Stream 1: two messages of 100 KiB over three DATA frames, one padded.
  const std::string message(100 << 10, 'a');
  const std::string body = GrpcPrefix(message.size()) + message + GrpcPrefix(message.size()) +
                           message;
  const std::string padded = std::string(1, 7) + body.substr(0, 50000) + std::string(7, 'p');
  const std::string client =
      std::string(kPreface) + Frame(kHttp2Settings, 0, 0) +
      FrameWith(kHttp2Headers, kHttp2EndHeaders, 1, "hpack") +
      FrameWith(kHttp2Data, kHttp2Padded, 1, padded) +
      FrameWith(kHttp2Data, 0, 1, body.substr(50000, 100000)) +
      FrameWith(kHttp2Data, kHttp2EndStream, 1, body.substr(150000));
  std::string to_server;
  std::vector<int64_t> held;
  // In pieces of 1000 bytes: the budget holds the first message's declared
  // length while it arrives, then the second's.
  for (size_t at = 0; at < client.size(); at += 1000) {
    ASSERT_TRUE(uploads.FromClient(absl::string_view(client).substr(at, 1000), &to_server));
    held.push_back(budget.used());
  }
  EXPECT_EQ(to_server, client);
  EXPECT_THAT(held, testing::Contains(int64_t{100 << 10}));
  EXPECT_EQ(budget.used(), 0);  // END_STREAM: all arrived
  EXPECT_EQ(uploads.refused(), 0);
  std::string to_client;
  uploads.FromServer(Frame(kHttp2Settings, 0, 0), false, &to_client);
  EXPECT_EQ(to_client, Frame(kHttp2Settings, 0, 0));
}

TEST(UploadAdmissionTest, AMessageThatDoesNotFitIsRefusedWithTrailersAndItsDataDropped) {
  MemoryBudget budget(1 << 20, nullptr, "the upload budget", SmallLeaseReserve::EighthOf(1 << 20));
  UploadAdmission uploads(&budget);
  std::string to_server, to_client;
  const std::string server_settings = Frame(kHttp2Settings, 0, 0);
  uploads.FromServer(server_settings, false, &to_client);
  to_client.clear();
  // Stream 1 declares 800 KiB (fits in 7/8 of 1 MiB); stream 3 declares
  // 200 KiB more, which only the reserve could hold, and it is not small.
  const std::string first = std::string(kPreface) +
                            FrameWith(kHttp2Headers, kHttp2EndHeaders, 1, "h1") +
                            FrameWith(kHttp2Data, 0, 1, GrpcPrefix(800 << 10) + "abc");
  ASSERT_TRUE(uploads.FromClient(first, &to_server));
  EXPECT_EQ(to_server, first);
  EXPECT_EQ(budget.used(), 800 << 10);
  const std::string refused_frame =
      FrameWith(kHttp2Headers, kHttp2EndHeaders, 3, "h3") +
      FrameWith(kHttp2Data, 0, 3, GrpcPrefix(200 << 10) + std::string(1000, 'z'));
  ASSERT_TRUE(uploads.FromClient(refused_frame, &to_server));
  EXPECT_EQ(uploads.refused(), 1);
  EXPECT_EQ(budget.used(), 800 << 10);
  // gRPC gets the frame that revealed the length, then a reset of stream 3.
  std::vector<ParsedFrame> upstream = ParseFrames(to_server.substr(first.size()));
  ASSERT_EQ(upstream.size(), 3u);
  EXPECT_EQ(upstream[1].type, kHttp2Data);
  EXPECT_EQ(upstream[2].type, kHttp2RstStream);
  EXPECT_EQ(upstream[2].stream, 3u);
  EXPECT_EQ(upstream[2].payload, std::string("\0\0\0\x8", 4));  // CANCEL
  // The client gets trailers-only RESOURCE_EXHAUSTED and RST_STREAM NO_ERROR.
  uploads.FlushToClient(&to_client);
  std::vector<ParsedFrame> downstream = ParseFrames(to_client);
  ASSERT_EQ(downstream.size(), 2u);
  EXPECT_EQ(downstream[0].type, kHttp2Headers);
  EXPECT_EQ(downstream[0].stream, 3u);
  EXPECT_EQ(downstream[0].flags, kHttp2EndStream | kHttp2EndHeaders);
  EXPECT_THAT(downstream[0].payload, HasSubstr(":status"));
  EXPECT_THAT(downstream[0].payload, HasSubstr("grpc-status"));
  EXPECT_THAT(downstream[0].payload, HasSubstr("the upload budget is full"));
  EXPECT_EQ(downstream[1].type, kHttp2RstStream);
  EXPECT_EQ(downstream[1].payload, std::string(4, '\0'));
  // What the client still sends on stream 3 is dropped, and its connection
  // window credited; stream 1 goes on. A small message fits the reserve.
  to_server.clear();
  to_client.clear();
  const std::string late = FrameWith(kHttp2Data, 0, 3, std::string(5000, 'z'));
  const std::string small = FrameWith(kHttp2Headers, kHttp2EndHeaders, 5, "h5") +
                            FrameWith(kHttp2Data, kHttp2EndStream, 5, GrpcPrefix(4) + "tiny");
  const std::string more = FrameWith(kHttp2Data, 0, 1, "def");
  ASSERT_TRUE(uploads.FromClient(late + small + more, &to_server));
  EXPECT_EQ(to_server, small + more);
  EXPECT_EQ(budget.used(), 800 << 10);
  uploads.FlushToClient(&to_client);
  std::vector<ParsedFrame> credit = ParseFrames(to_client);
  ASSERT_EQ(credit.size(), 1u);
  EXPECT_EQ(credit[0].type, kHttp2WindowUpdate);
  EXPECT_EQ(credit[0].stream, 0u);
  EXPECT_EQ(credit[0].payload, std::string("\0\0\x13\x88", 4));  // 5000
  // gRPC's trailers for stream 1 end its charge.
  to_client.clear();
  const std::string trailers = FrameWith(kHttp2Headers, kHttp2EndStream | kHttp2EndHeaders, 1, "t");
  uploads.FromServer(trailers, false, &to_client);
  EXPECT_EQ(to_client, trailers);
  EXPECT_EQ(budget.used(), 0);
}

TEST(UploadAdmissionTest, AClientThatKeepsOpeningRefusedStreamsIsClosed) {
  MemoryBudget budget(1000, nullptr, "the upload budget");
  UploadAdmission uploads(&budget);
  std::string to_server;
  ASSERT_TRUE(uploads.FromClient(kPreface, &to_server));
  uint32_t stream = 1;
  for (size_t i = 0; i < UploadAdmission::kMaxRefusedStreams; ++i, stream += 2) {
    ASSERT_TRUE(uploads.FromClient(FrameWith(kHttp2Headers, kHttp2EndHeaders, stream, "h") +
                                       FrameWith(kHttp2Data, 0, stream, GrpcPrefix(5000)),
                                   &to_server))
        << i;
  }
  EXPECT_EQ(uploads.refused(), static_cast<int64_t>(UploadAdmission::kMaxRefusedStreams));
  EXPECT_FALSE(uploads.FromClient(FrameWith(kHttp2Headers, kHttp2EndHeaders, stream, "h") +
                                      FrameWith(kHttp2Data, 0, stream, GrpcPrefix(5000)),
                                  &to_server));
  EXPECT_EQ(budget.used(), 0);
}

TEST(UploadAdmissionTest, RefusalsWaitForABoundaryBetweenGrpcsFrames) {
  MemoryBudget budget(1000, nullptr, "the upload budget");
  UploadAdmission uploads(&budget);
  std::string to_server, to_client;
  const std::string response = FrameWith(kHttp2Data, 0, 7, std::string(100, 'r'));
  uploads.FromServer(Frame(kHttp2Settings, 0, 0) + response.substr(0, 50), false, &to_client);
  ASSERT_TRUE(uploads.FromClient(std::string(kPreface) +
                                     FrameWith(kHttp2Headers, kHttp2EndHeaders, 1, "h") +
                                     FrameWith(kHttp2Data, 0, 1, GrpcPrefix(5000)),
                                 &to_server));
  EXPECT_EQ(uploads.refused(), 1);
  const size_t before = to_client.size();
  uploads.FlushToClient(&to_client);  // in the middle of gRPC's frame: waits
  EXPECT_EQ(to_client.size(), before);
  uploads.FromServer(response.substr(50), false, &to_client);
  std::vector<ParsedFrame> frames = ParseFrames(to_client);
  ASSERT_EQ(frames.size(), 4u);
  EXPECT_EQ(frames[1].payload, std::string(100, 'r'));
  EXPECT_EQ(frames[2].type, kHttp2Headers);
  EXPECT_EQ(frames[3].type, kHttp2RstStream);
}

// gRPC 1.51 cancels a call whose request is still arriving when its
// shutdown begins, with trailers-only CANCELLED written as HPACK literals.
// Once the server is shutting down, such trailers for a call gRPC had not
// answered become UNAVAILABLE; anything else passes unchanged.
TEST(UploadAdmissionTest, CancellationsOfUnansweredCallsAreUnavailableOnceShuttingDown) {
  MemoryBudget budget(1 << 20, nullptr, "the upload budget");
  UploadAdmission uploads(&budget);
  std::string to_server, to_client;
  uploads.FromServer(Frame(kHttp2Settings, 0, 0), false, &to_client);
  std::string client(kPreface);
  for (uint32_t stream : {1, 3, 5, 7}) {
    client += FrameWith(kHttp2Headers, kHttp2EndHeaders, stream, "h") +
              FrameWith(kHttp2Data, kHttp2EndStream, stream, GrpcPrefix(4) + "tiny");
  }
  ASSERT_TRUE(uploads.FromClient(client, &to_server));
  const auto literal = [](absl::string_view name, absl::string_view value) {
    return std::string(1, '\0') + static_cast<char>(name.size()) + std::string(name) +
           static_cast<char>(value.size()) + std::string(value);
  };
  const auto trailers = [&](uint32_t stream, absl::string_view status) {
    return FrameWith(kHttp2Headers, kHttp2EndStream | kHttp2EndHeaders, stream,
                     literal(":status", "200") + literal("content-type", "application/grpc") +
                         literal("grpc-status", status) + literal("grpc-message", "CANCELLED"));
  };
  const auto through = [&](const std::string& bytes, bool shutting_down) {
    std::string out;
    for (char c : bytes) uploads.FromServer(std::string(1, c), shutting_down, &out);
    return out;
  };
  // Before the shutdown: unchanged.
  EXPECT_EQ(through(trailers(1, "1"), false), trailers(1, "1"));
  // Answered before: unchanged.
  const std::string answer = FrameWith(kHttp2Headers, kHttp2EndHeaders, 3, "\x88");
  EXPECT_EQ(through(answer, false), answer);
  EXPECT_EQ(through(trailers(3, "1"), true), trailers(3, "1"));
  // Another status: unchanged.
  EXPECT_EQ(through(trailers(7, "0"), true), trailers(7, "0"));
  // Unanswered and cancelled: UNAVAILABLE, saying why.
  std::vector<ParsedFrame> frames = ParseFrames(through(trailers(5, "1"), true));
  ASSERT_EQ(frames.size(), 1u);
  EXPECT_EQ(frames[0].type, kHttp2Headers);
  EXPECT_EQ(frames[0].stream, 5u);
  EXPECT_EQ(frames[0].flags, kHttp2EndStream | kHttp2EndHeaders);
  EXPECT_THAT(frames[0].payload, HasSubstr(literal("grpc-status", "14")));
  EXPECT_THAT(frames[0].payload, HasSubstr(literal(":status", "200")));
  EXPECT_THAT(frames[0].payload, HasSubstr("did not start the call"));
  EXPECT_THAT(frames[0].payload, testing::Not(HasSubstr("CANCELLED")));
  // gRPC's own encoding (indexed, Huffman-coded) is never touched.
  ASSERT_TRUE(uploads.FromClient(FrameWith(kHttp2Headers, kHttp2EndHeaders, 9, "h"), &to_server));
  const std::string indexed = FrameWith(kHttp2Headers, kHttp2EndStream | kHttp2EndHeaders, 9,
                                        "\x88\x40\x8agrpc-status\x01" "1");
  EXPECT_EQ(through(indexed, true), indexed);
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

TEST(ProtoConvertTest, DeadlinesConvertExactlyAndNoDeadlineIsInfiniteFuture) {
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
  metrics.SetModelInfo("m", "1", "cpu", "bf16");
  metrics.RecordCall("Classify", absl::StatusCode::kOk, "m", "1");
  metrics.RecordCall("Classify", absl::StatusCode::kInvalidArgument, "", "");
  metrics.RecordLatency("Classify", absl::Milliseconds(12), "m", "1");
  metrics.AddAudioSeconds(3.5);
  metrics.StreamStarted();
  EngineObserver* engine = metrics.ForModel("m", "1");
  engine->OnWindow(absl::Milliseconds(1), absl::Milliseconds(2));
  engine->OnBatch(4, absl::Milliseconds(20));
  engine->OnQueueDepth(7);
  metrics.ForModel("other", "2")->OnQueueDepth(3);
  metrics.SetModelState("m", "1", "ready");
  metrics.SetModelState("other", "2", "failed");
  metrics.ModelLoadFinished("loaded");
  metrics.OnDecoded(absl::Milliseconds(1), absl::Milliseconds(30));
  std::string text = metrics.Render();
  EXPECT_THAT(text, HasSubstr("emoserve_requests_total{code=\"OK\",method=\"Classify\",model=\"m\",version=\"1\"} 1"));
  // A call that ended before it had a model: empty labels, which Prometheus drops.
  EXPECT_THAT(text, HasSubstr("emoserve_requests_total{code=\"INVALID_ARGUMENT\",method=\"Classify\",model=\"\",version=\"\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_audio_seconds_total 3.5"));
  EXPECT_THAT(text, HasSubstr("emoserve_active_streams 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_queue_depth{model=\"m\",version=\"1\"} 7"));
  EXPECT_THAT(text, HasSubstr("emoserve_queue_depth{model=\"other\",version=\"2\"} 3"));
  EXPECT_THAT(text, HasSubstr("emoserve_batch_size_sum{model=\"m\",version=\"1\"} 4"));
  EXPECT_THAT(text, HasSubstr("emoserve_decode_wait_seconds_sum 0.001"));
  EXPECT_THAT(text, HasSubstr("emoserve_decode_seconds_bucket{le=\"0.025\"} 0"));
  EXPECT_THAT(text, HasSubstr("emoserve_decode_seconds_bucket{le=\"0.05\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_info{device=\"cpu\",name=\"m\",precision=\"bf16\",version=\"1\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_state{model=\"m\",state=\"ready\",version=\"1\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_state{model=\"m\",state=\"failed\",version=\"1\"} 0"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_state{model=\"other\",state=\"failed\",version=\"2\"} 1"));
  EXPECT_THAT(text, HasSubstr("emoserve_model_loads_total{result=\"loaded\"} 1"));
  EXPECT_THAT(text, HasSubstr(
      "emoserve_request_duration_seconds_bucket{method=\"Classify\",model=\"m\",version=\"1\",le=\"0.025\"} 1"));
  // A version gone: its series go with it.
  metrics.ForgetModel("other", "2");
  metrics.SetModelState("other", "2", "");
  text = metrics.Render();
  EXPECT_THAT(text, ::testing::Not(HasSubstr("model=\"other\"")));

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
