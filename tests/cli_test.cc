// The `emoserve` CLI: its parser, output formats and latency statistics in
// process; then the real binary against a real emoserve-server on
// 127.0.0.1 with real RAVDESS speech.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "client/bench.h"
#include "client/cli.h"
#include "client/connection.h"
#include "client/format.h"
#include "client/latency.h"
#include "core/audio.h"
#include "tests/server_test_support.h"
#include "tests/test_support.h"

extern char** environ;

namespace emoserve {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::StartsWith;
using Json = nlohmann::ordered_json;  // keeps the order of the output

// ---------------------------------------------------------------------------
// The command line.

client::ParsedCommandLine Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "emoserve");
  return client::ParseCommandLine(args);
}

// Sets (or unsets, with nullptr) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_.has_value()) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

TEST(CliParseTest, ConnectionDefaultsToPlainLocalhostAndFlagBeatsEnvironment) {
  {
    ScopedEnv env("EMOSERVE_SERVER", nullptr);
    const client::ParsedCommandLine parsed = Parse({"health"});
    ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
    EXPECT_EQ(parsed.options->command, client::Command::kHealth);
    EXPECT_EQ(parsed.options->connection.server, "localhost:50051");
    EXPECT_FALSE(parsed.options->connection.timeout_seconds.has_value());
    EXPECT_FALSE(parsed.options->connection.tls);
  }
  {
    ScopedEnv env("EMOSERVE_SERVER", "emo.example:9000");
    const client::ParsedCommandLine parsed = Parse({"info"});
    ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
    EXPECT_EQ(parsed.options->connection.server, "emo.example:9000");
    // The flag wins over the environment, before or after the command.
    EXPECT_EQ(Parse({"--server", "a:1", "info"}).options->connection.server,
              "a:1");
    EXPECT_EQ(Parse({"info", "--server", "b:2"}).options->connection.server,
              "b:2");
  }
}

TEST(CliParseTest, ClassifyFlagsAreParsedAndBadOnesAreUsageErrors) {
  const client::ParsedCommandLine parsed =
      Parse({"classify", "a.wav", "b.flac", "-j", "3", "--output", "csv",
             "--timeline", "--hop", "0.25", "--timeout", "7", "--ca",
             "ca.pem"});
  ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
  const client::CliOptions& options = *parsed.options;
  EXPECT_EQ(options.command, client::Command::kClassify);
  EXPECT_THAT(options.classify.files, ElementsAre("a.wav", "b.flac"));
  EXPECT_EQ(options.classify.concurrency, 3);
  EXPECT_EQ(options.classify.output, client::OutputFormat::kCsv);
  EXPECT_TRUE(options.classify.timeline);
  EXPECT_DOUBLE_EQ(options.classify.hop_seconds, 0.25);
  EXPECT_EQ(options.connection.timeout_seconds, 7.0);
  EXPECT_EQ(options.connection.ca_path, "ca.pem");

  EXPECT_EQ(Parse({"classify", "a.wav", "-o", "JSON"}).options->classify.output,
            client::OutputFormat::kJson);
  EXPECT_EQ(Parse({"classify", "a.wav"}).options->classify.output,
            client::OutputFormat::kText);
  // Usage errors: no file, an unknown format, a format of another command.
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"classify"},
        {"classify", "a.wav", "-o", "xml"},
        {"classify", "a.wav", "-o", "text"},
        {"classify", "a.wav", "-j", "0"}}) {
    const client::ParsedCommandLine bad = Parse(args);
    EXPECT_FALSE(bad.options.has_value()) << absl::StrJoin(args, " ");
    EXPECT_EQ(bad.exit_code, client::kExitUsage);
    EXPECT_THAT(bad.err, Not(IsEmpty()));
  }
}

// --model NAME[:VERSION] on the commands that call a model.
TEST(CliParseTest, ModelOptionNamesAModelAndOptionallyItsVersion) {
  const client::ParsedCommandLine classify =
      Parse({"classify", "a.wav", "--model", "fast:12"});
  ASSERT_TRUE(classify.options.has_value()) << classify.err;
  EXPECT_EQ(classify.options->classify.model.name, "fast");
  EXPECT_EQ(classify.options->classify.model.version, 12);
  const client::ParsedCommandLine stream = Parse({"stream", "a.wav", "-m", "accurate"});
  ASSERT_TRUE(stream.options.has_value()) << stream.err;
  EXPECT_EQ(stream.options->stream.model.name, "accurate");
  EXPECT_EQ(stream.options->stream.model.version, 0);
  EXPECT_EQ(Parse({"bench", "a.wav", "-m", "x:1"}).options->bench.model.name, "x");
  EXPECT_EQ(Parse({"info", "-m", "x:3"}).options->info.model.version, 3);
  EXPECT_EQ(Parse({"classify", "a.wav"}).options->classify.model.name, "");
  EXPECT_EQ(Parse({"models", "-o", "json"}).options->command, client::Command::kModels);
  for (const char* bad : {"fast:0", ":3", "fast:", "fast:x", "fast:-1", ""}) {
    const client::ParsedCommandLine refused = Parse({"classify", "a.wav", "--model", bad});
    EXPECT_FALSE(refused.options.has_value()) << bad;
    EXPECT_EQ(refused.exit_code, client::kExitUsage) << bad;
  }
}

TEST(CliParseTest, StreamFlagsAreParsedAndRawPcmFlagsAreForStdinOnly) {
  client::ParsedCommandLine parsed =
      Parse({"stream", "-", "--rate", "48000", "--format", "f32le",
             "--channels", "2", "--chunk-ms", "20", "--fast", "--no-interim",
             "--hop", "0.5", "--vad-threshold", "-40", "-o", "json"});
  ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
  const client::StreamCommandOptions& stream = parsed.options->stream;
  EXPECT_EQ(stream.input, "-");
  EXPECT_EQ(stream.rate, 48000);
  EXPECT_EQ(stream.format, PcmEncoding::kF32LE);
  EXPECT_EQ(stream.channels, 2);
  EXPECT_DOUBLE_EQ(stream.chunk_ms, 20);
  EXPECT_TRUE(stream.fast);
  EXPECT_FALSE(stream.interim);
  EXPECT_DOUBLE_EQ(stream.hop_seconds, 0.5);
  EXPECT_EQ(stream.vad_threshold_dbfs, -40.0);
  EXPECT_EQ(stream.output, client::OutputFormat::kJson);

  parsed = Parse({"stream", "speech.wav"});
  ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
  EXPECT_TRUE(parsed.options->stream.interim);
  EXPECT_FALSE(parsed.options->stream.fast);
  EXPECT_FALSE(parsed.options->stream.vad_threshold_dbfs.has_value());

  // A file's header says its format: raw-PCM flags are for stdin only.
  parsed = Parse({"stream", "speech.wav", "--rate", "8000"});
  EXPECT_FALSE(parsed.options.has_value());
  EXPECT_EQ(parsed.exit_code, client::kExitUsage);
  EXPECT_THAT(parsed.err, HasSubstr("raw PCM on stdin"));
  EXPECT_FALSE(Parse({"stream", "-", "--rate", "1000"}).options.has_value());
  EXPECT_FALSE(Parse({"stream", "-", "--format", "u8"}).options.has_value());
  EXPECT_FALSE(
      Parse({"stream", "-", "--no-vad", "--vad-threshold", "-40"}).options);
}

TEST(CliParseTest, BenchFlagsAreParsedAndItsModesExcludeEachOther) {
  client::ParsedCommandLine parsed =
      Parse({"bench", "a.wav", "--rps", "50", "-d", "3", "--warmup", "0.5",
             "--max-in-flight", "7", "-o", "json"});
  ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
  EXPECT_EQ(parsed.options->command, client::Command::kBench);
  EXPECT_DOUBLE_EQ(parsed.options->bench.rps, 50);
  EXPECT_DOUBLE_EQ(parsed.options->bench.duration_seconds, 3);
  EXPECT_DOUBLE_EQ(parsed.options->bench.warmup_seconds, 0.5);
  EXPECT_EQ(parsed.options->bench.max_in_flight, 7);

  parsed = Parse({"bench", "a.wav", "--streams", "4"});
  ASSERT_TRUE(parsed.options.has_value()) << parsed.err;
  EXPECT_EQ(parsed.options->bench.streams, 4);
  // Closed loop, open loop and streams exclude each other.
  EXPECT_FALSE(Parse({"bench", "a.wav", "--rps", "5", "-j", "2"}).options);
  EXPECT_FALSE(Parse({"bench", "a.wav", "--rps", "5", "--streams", "2"}).options);
  EXPECT_FALSE(Parse({"bench", "a.wav", "--rps", "0"}).options);
}

TEST(CliParseTest, HelpAndVersionExitZeroAndBadCommandLinesAreUsageErrors) {
  client::ParsedCommandLine parsed = Parse({"--help"});
  EXPECT_FALSE(parsed.options.has_value());
  EXPECT_EQ(parsed.exit_code, client::kExitOk);
  EXPECT_THAT(parsed.out, AllOf(HasSubstr("classify"), HasSubstr("stream"),
                                HasSubstr("bench"), HasSubstr("health"),
                                HasSubstr("EMOSERVE_SERVER")));
  parsed = Parse({"--version"});
  EXPECT_EQ(parsed.exit_code, client::kExitOk);
  EXPECT_THAT(parsed.out, StartsWith("emoserve "));
  parsed = Parse({});
  EXPECT_EQ(parsed.exit_code, client::kExitUsage);
  EXPECT_THAT(parsed.err, HasSubstr("subcommand"));
  EXPECT_EQ(Parse({"frobnicate"}).exit_code, client::kExitUsage);
  EXPECT_EQ(Parse({"health", "--timeout", "-1"}).exit_code, client::kExitUsage);
}

// ---------------------------------------------------------------------------
// Connections and errors.

TEST(ConnectionTest, AddressesGetPort50051AndBareIpv6GetsBrackets) {
  EXPECT_EQ(client::NormalizeServerAddress("host:123"), "host:123");
  EXPECT_EQ(client::NormalizeServerAddress("host"), "host:50051");
  EXPECT_EQ(client::NormalizeServerAddress("[::1]:9"), "[::1]:9");
  EXPECT_EQ(client::NormalizeServerAddress("[::1]"), "[::1]:50051");
  EXPECT_EQ(client::NormalizeServerAddress("::1"), "[::1]:50051");
  EXPECT_EQ(client::NormalizeServerAddress("unix:/run/emo.sock"),
            "unix:/run/emo.sock");
}

client::ConnectionOptions Connection(const std::string& server, bool tls) {
  client::ConnectionOptions options;
  options.server = server;
  options.tls = tls;
  return options;
}

TEST(ConnectionTest, RpcErrorsAreOneLineWithAHintWhenTheServerIsUnreachable) {
  const grpc::Status refused(
      grpc::StatusCode::UNAVAILABLE,
      "failed to connect to all addresses; last error: UNKNOWN: "
      "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused");
  EXPECT_TRUE(client::IsConnectionFailure(refused));
  EXPECT_EQ(client::DescribeRpcError(refused, Connection("localhost", false)),
            "cannot reach server localhost:50051 (connection refused); is "
            "emoserve-server running?");
  const grpc::Status dns(grpc::StatusCode::UNAVAILABLE,
                         "DNS resolution failed for nowhere:1: C-ares status "
                         "is not ARES_SUCCESS");
  EXPECT_THAT(client::DescribeRpcError(dns, Connection("nowhere:1", false)),
              StartsWith("cannot reach server nowhere:1 (cannot resolve"));
  // The server's own verdicts: code and message, on one line.
  const grpc::Status rejected(grpc::StatusCode::INVALID_ARGUMENT,
                              "audio: unrecognised format\nexpected WAV");
  EXPECT_FALSE(client::IsConnectionFailure(rejected));
  EXPECT_EQ(client::DescribeRpcError(rejected, Connection("h:1", false)),
            "INVALID_ARGUMENT: audio: unrecognised format expected WAV");
  const grpc::Status overloaded(grpc::StatusCode::UNAVAILABLE,
                                "the server is shutting down");
  EXPECT_FALSE(client::IsConnectionFailure(overloaded));
  EXPECT_EQ(client::DescribeRpcError(overloaded, Connection("h:1", false)),
            "UNAVAILABLE: the server is shutting down");
  // A server that hangs up at once: TLS wanted, or a client certificate.
  const grpc::Status closed(grpc::StatusCode::UNAVAILABLE,
                            "failed to connect to all addresses; last error: "
                            "UNAVAILABLE: ipv4:127.0.0.1:9: Socket closed");
  EXPECT_THAT(client::DescribeRpcError(closed, Connection("h:9", false)),
              HasSubstr("(--tls)"));
  EXPECT_THAT(client::DescribeRpcError(closed, Connection("h:9", true)),
              HasSubstr("(--cert, --key)"));
  EXPECT_EQ(client::StatusCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED),
            "RESOURCE_EXHAUSTED");
}

TEST(ConnectionTest, MissingCertificateFileIsAClearError) {
  client::ConnectionOptions options;
  options.ca_path = "/nonexistent/ca.pem";
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      client::MakeChannel(options);
  ASSERT_FALSE(channel.ok());
  EXPECT_THAT(std::string(channel.status().message()),
              AllOf(StartsWith("--ca: "), HasSubstr("/nonexistent/ca.pem")));
  options.ca_path.clear();
  options.cert_path = "cert.pem";  // without --key
  EXPECT_THAT(std::string(client::MakeChannel(options).status().message()),
              HasSubstr("--cert and --key go together"));
}

// ---------------------------------------------------------------------------
// Latency statistics.

// The exact nearest-rank percentile of `values`.
double ExactPercentile(std::vector<double> values, double percent) {
  std::sort(values.begin(), values.end());
  const size_t rank = std::max<size_t>(
      1, static_cast<size_t>(std::ceil(percent / 100.0 * values.size() - 1e-9)));
  return values[rank - 1];
}

TEST(LatencyHistogramTest, PercentilesMatchExactRanksWithinPrecision) {
  std::mt19937 random(42);
  std::lognormal_distribution<double> milliseconds(2.0, 1.0);  // ~7 ms median
  std::vector<double> values_us;
  client::LatencyHistogram histogram;
  for (int i = 0; i < 20000; ++i) {
    const double us = std::round(milliseconds(random) * 1000.0);
    values_us.push_back(us);
    histogram.Record(absl::Microseconds(us));
  }
  EXPECT_EQ(histogram.count(), 20000);
  for (double percent : {1.0, 50.0, 90.0, 99.0, 99.9}) {
    const double exact = ExactPercentile(values_us, percent);
    const double estimate =
        absl::ToDoubleMicroseconds(histogram.Percentile(percent));
    EXPECT_NEAR(estimate, exact, exact / 128 + 1) << "p" << percent;
  }
  EXPECT_EQ(absl::ToDoubleMicroseconds(histogram.max()),
            *std::max_element(values_us.begin(), values_us.end()));
  EXPECT_EQ(absl::ToDoubleMicroseconds(histogram.min()),
            *std::min_element(values_us.begin(), values_us.end()));
  EXPECT_EQ(histogram.Percentile(100), histogram.max());
  double sum = 0;
  for (double v : values_us) sum += v;
  EXPECT_NEAR(absl::ToDoubleMicroseconds(histogram.mean()), sum / 20000, 1e-6 * sum);
}

TEST(LatencyHistogramTest, SmallValuesAreExactAndRanksAreNearest) {
  client::LatencyHistogram histogram;
  for (int us = 1; us <= 10; ++us) histogram.Record(absl::Microseconds(us));
  EXPECT_EQ(histogram.Percentile(50), absl::Microseconds(5));
  EXPECT_EQ(histogram.Percentile(90), absl::Microseconds(9));
  EXPECT_EQ(histogram.Percentile(91), absl::Microseconds(10));
  EXPECT_EQ(histogram.Percentile(0), absl::Microseconds(1));
  histogram.Record(-absl::Seconds(1));  // counts as zero
  EXPECT_EQ(histogram.min(), absl::ZeroDuration());
}

TEST(LatencyHistogramTest, EmptyReportsZeroAndMergeCombinesTheRecordings) {
  client::LatencyHistogram empty;
  EXPECT_EQ(empty.count(), 0);
  EXPECT_EQ(empty.Percentile(99), absl::ZeroDuration());
  EXPECT_EQ(empty.mean(), absl::ZeroDuration());
  client::LatencyHistogram a;
  client::LatencyHistogram b;
  a.Record(absl::Milliseconds(10));
  b.Record(absl::Milliseconds(30));
  b.Record(absl::Milliseconds(20));
  a.Merge(b);
  a.Merge(empty);
  EXPECT_EQ(a.count(), 3);
  EXPECT_EQ(a.min(), absl::Milliseconds(10));
  EXPECT_EQ(a.max(), absl::Milliseconds(30));
  EXPECT_NEAR(absl::ToDoubleMilliseconds(a.Percentile(50)), 20, 20.0 / 128);
}

// ---------------------------------------------------------------------------
// Output formats.

v1::ClassifyResponse SampleResponse() {
  v1::ClassifyResponse response;
  for (const auto& [label, p] : std::vector<std::pair<std::string, float>>{
           {"angry", 0.7f}, {"sad", 0.2f}, {"calm", 0.1f}}) {
    v1::EmotionScore* score = response.add_scores();
    score->set_label(label);
    score->set_probability(p);
  }
  response.set_top_label("angry");
  response.set_audio_duration_seconds(3.5);
  response.set_model_name("m");
  response.set_model_version("1");
  response.set_window_count(2);
  response.set_speech_window_count(1);
  v1::WindowResult* speech = response.add_timeline();
  speech->set_start_seconds(0);
  speech->set_end_seconds(3);
  speech->set_speech(true);
  *speech->mutable_scores() = response.scores();
  v1::WindowResult* silence = response.add_timeline();
  silence->set_start_seconds(1.5);
  silence->set_end_seconds(3.5);
  silence->set_speech(false);
  return response;
}

// A clip without speech: every window classified, none speech.
v1::ClassifyResponse QuietResponse() {
  v1::ClassifyResponse response = SampleResponse();
  response.set_speech_window_count(0);
  for (v1::WindowResult& window : *response.mutable_timeline()) {
    window.set_speech(false);
    *window.mutable_scores() = response.scores();
  }
  return response;
}

std::vector<client::ClassifyOutcome> SampleOutcomes() {
  std::vector<client::ClassifyOutcome> outcomes(2);
  outcomes[0].file = "a, \"b\".wav";  // needs CSV quoting
  outcomes[0].response = SampleResponse();
  outcomes[0].latency = absl::Milliseconds(12.5);
  outcomes[1].file = "bad.wav";
  outcomes[1].error_code = "INVALID_ARGUMENT";
  outcomes[1].error_message = "unrecognised format";
  return outcomes;
}

TEST(FormatTest, ClassifyTableAlignsColumnsAndShowsTheTimelineOnRequest) {
  const std::string table =
      client::FormatClassifyTable(SampleOutcomes(), /*timeline=*/false);
  std::vector<std::string> lines = absl::StrSplit(table, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << table;  // failures go to stderr
  EXPECT_THAT(lines[0], AllOf(StartsWith("FILE"), HasSubstr("EMOTION")));
  EXPECT_THAT(lines[1], AllOf(StartsWith("a, \"b\".wav"), HasSubstr("angry"),
                              HasSubstr("70.0%"), HasSubstr("3.50 s"),
                              HasSubstr("1/2"), HasSubstr("sad 20.0%, calm 10.0%")));
  // Columns line up: EMOTION starts where "angry" does.
  EXPECT_EQ(lines[0].find("EMOTION"), lines[1].find("angry"));

  const std::string with_timeline =
      client::FormatClassifyTable(SampleOutcomes(), /*timeline=*/true);
  lines = absl::StrSplit(with_timeline, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u) << with_timeline;
  EXPECT_THAT(lines[2], AllOf(HasSubstr("0.00-"), HasSubstr("3.00 s"),
                              HasSubstr("angry 70.0%")));
  EXPECT_THAT(lines[3], AllOf(HasSubstr("1.50-"), HasSubstr("silence")));

  std::vector<client::ClassifyOutcome> quiet(1);
  quiet[0].file = "quiet.wav";
  quiet[0].response = QuietResponse();
  lines = absl::StrSplit(client::FormatClassifyTable(quiet, true), '\n',
                         absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_THAT(lines[1], AllOf(HasSubstr("angry"), HasSubstr("0/2")));
  EXPECT_THAT(lines[3], HasSubstr("(quiet) angry 70.0%"));
}

TEST(FormatTest, ClassifyJsonHasOneObjectPerFileWithResultOrError) {
  const Json json = Json::parse(
      client::ClassifyOutcomesJson(SampleOutcomes(), /*timeline=*/true).dump());
  ASSERT_TRUE(json.is_array());
  ASSERT_EQ(json.size(), 2u);
  EXPECT_EQ(json[0]["file"], "a, \"b\".wav");
  EXPECT_EQ(json[0]["ok"], true);
  EXPECT_EQ(json[0]["top_label"], "angry");
  EXPECT_NEAR(json[0]["confidence"].get<double>(), 0.7, 1e-6);
  EXPECT_NEAR(json[0]["scores"]["sad"].get<double>(), 0.2, 1e-6);
  EXPECT_EQ(json[0]["window_count"], 2);
  EXPECT_EQ(json[0]["speech_window_count"], 1);
  EXPECT_NEAR(json[0]["latency_ms"].get<double>(), 12.5, 1e-9);
  ASSERT_EQ(json[0]["timeline"].size(), 2u);
  EXPECT_EQ(json[0]["timeline"][1]["speech"], false);
  EXPECT_TRUE(json[0]["timeline"][1]["scores"].empty());
  EXPECT_EQ(json[1]["ok"], false);
  EXPECT_EQ(json[1]["error"]["code"], "INVALID_ARGUMENT");
  EXPECT_EQ(json[1]["error"]["message"], "unrecognised format");
  // Without --timeline, no timeline key.
  EXPECT_FALSE(client::ClassifyOutcomesJson(SampleOutcomes(), false)[0].contains(
      "timeline"));
}

TEST(FormatTest, ClassifyCsvQuotesFileNamesAndHasARowPerFileOrWindow) {
  const std::string csv = client::FormatClassifyCsv(SampleOutcomes(), false);
  EXPECT_EQ(csv,
            "file,top_label,confidence,duration_seconds,window_count,"
            "speech_window_count,angry,calm,sad,error\n"
            "\"a, \"\"b\"\".wav\",angry,0.700000,3.5000,2,1,0.700000,0.100000,"
            "0.200000,\n"
            "bad.wav,,,,,,,,,INVALID_ARGUMENT: unrecognised format\n");
  const std::string windows = client::FormatClassifyCsv(SampleOutcomes(), true);
  EXPECT_EQ(windows,
            "file,start_seconds,end_seconds,speech,top_label,confidence,angry,"
            "calm,sad,error\n"
            "\"a, \"\"b\"\".wav\",0.000,3.000,true,angry,0.700000,0.700000,"
            "0.100000,0.200000,\n"
            "\"a, \"\"b\"\".wav\",1.500,3.500,false,,,,,,\n"
            "bad.wav,,,,,,,,,INVALID_ARGUMENT: unrecognised format\n");
}

TEST(FormatTest, EachStreamResponseIsOneLineOfTextOrJson) {
  v1::StreamClassifyResponse window;
  *window.mutable_window() = SampleResponse().timeline(0);
  v1::StreamClassifyResponse started;
  started.mutable_speech_event()->set_type(v1::SpeechEvent::SPEECH_STARTED);
  started.mutable_speech_event()->set_time_seconds(1.25);
  v1::StreamClassifyResponse utterance;
  utterance.mutable_utterance()->set_start_seconds(1.5);
  utterance.mutable_utterance()->set_end_seconds(4.5);
  *utterance.mutable_utterance()->mutable_scores() = SampleResponse().scores();
  utterance.mutable_utterance()->set_top_label("angry");
  utterance.mutable_utterance()->set_window_count(3);

  EXPECT_THAT(client::FormatStreamResponse(window, false),
              AllOf(HasSubstr("window"), HasSubstr("angry 70.0%"),
                    HasSubstr("(sad 20.0%, calm 10.0%)")));
  EXPECT_THAT(client::FormatStreamResponse(started, false),
              AllOf(HasSubstr("1.25 s"), HasSubstr("speech started")));
  EXPECT_THAT(client::FormatStreamResponse(utterance, false),
              AllOf(HasSubstr("UTTERANCE"), HasSubstr("angry 70.0%"),
                    HasSubstr("[3 windows]")));

  const Json window_json =
      Json::parse(client::FormatStreamResponse(window, true));
  EXPECT_EQ(window_json["type"], "window");
  EXPECT_EQ(window_json["end_seconds"], 3.0);
  EXPECT_NEAR(window_json["scores"]["angry"].get<double>(), 0.7, 1e-6);
  EXPECT_EQ(Json::parse(client::FormatStreamResponse(started, true))["type"],
            "speech_started");
  const Json utterance_json =
      Json::parse(client::FormatStreamResponse(utterance, true));
  EXPECT_EQ(utterance_json["type"], "utterance");
  EXPECT_EQ(utterance_json["window_count"], 3);
  EXPECT_EQ(utterance_json["top_label"], "angry");
  // One line each.
  for (const v1::StreamClassifyResponse& response : {window, started, utterance}) {
    const std::string line = client::FormatStreamResponse(response, true);
    EXPECT_EQ(std::count(line.begin(), line.end(), '\n'), 1) << line;
  }
}

TEST(FormatTest, BenchReportGivesCountsThroughputAndLatencyInJsonAndText) {
  client::BenchReport report;
  report.mode = "open_loop";
  report.server = "h:1";
  report.model = "m 1 (cpu)";
  report.target_rps = 20;
  report.duration_seconds = 2;
  report.requests = 40;
  report.ok = 38;
  report.errors["RESOURCE_EXHAUSTED"] = 2;
  report.dropped = 1;
  report.audio_seconds = 133;
  for (int ms = 1; ms <= 38; ++ms) report.latency.Record(absl::Milliseconds(ms));

  const Json json = Json::parse(client::BenchReportJson(report).dump());
  EXPECT_EQ(json["mode"], "open_loop");
  EXPECT_EQ(json["target_rps"], 20.0);
  EXPECT_EQ(json["requests"], 40);
  EXPECT_EQ(json["ok"], 38);
  EXPECT_EQ(json["errors"]["RESOURCE_EXHAUSTED"], 2);
  EXPECT_EQ(json["dropped"], 1);
  EXPECT_DOUBLE_EQ(json["throughput_rps"].get<double>(), 19.0);
  EXPECT_EQ(json["latency_ms"]["count"], 38);
  EXPECT_NEAR(json["latency_ms"]["p50"].get<double>(), 19, 19.0 / 128);
  EXPECT_EQ(json["latency_ms"]["max"], 38.0);
  EXPECT_FALSE(json.contains("final_latency_ms"));

  const std::string text = client::FormatBenchReport(report);
  EXPECT_THAT(text, AllOf(HasSubstr("open loop at 20 requests/s"),
                          HasSubstr("40 (38 ok, 2 failed, 1 dropped)"),
                          HasSubstr("19.0 requests/s"), HasSubstr("p99"),
                          HasSubstr("RESOURCE_EXHAUSTED 2")));
}

// ---------------------------------------------------------------------------
// The binary against a real server.

// How a run of the binary ended.
struct ProcessResult {
  int exit_code = -1;  // 128 + N when killed by signal N
  std::string out;
  std::string err;
};

struct RunOptions {
  std::string stdin_data;
  // Replaces the environment's EMOSERVE_SERVER (unset when empty).
  std::string server_env;
};

RunOptions WithStdin(std::string data) {
  RunOptions options;
  options.stdin_data = std::move(data);
  return options;
}

// Runs the emoserve binary with `args` to completion, stdout and stderr
// captured in files (no pipe to fill up).
ProcessResult RunCli(const std::vector<std::string>& args,
                     const RunOptions& options = {}) {
  ProcessResult result;
  const std::string dir = testing::ScratchDir();
  static int runs = 0;
  const std::string prefix = absl::StrCat(dir, "/cli_", getpid(), "_", ++runs);
  const std::string in_path = prefix + ".in";
  const std::string out_path = prefix + ".out";
  const std::string err_path = prefix + ".err";
  std::ofstream(in_path, std::ios::binary) << options.stdin_data;

  std::vector<std::string> argv_storage = {
      std::string(EMOSERVE_BINARY_DIR) + "/client/emoserve"};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "EMOSERVE_SERVER=")) env_storage.push_back(*e);
  }
  if (!options.server_env.empty()) {
    env_storage.push_back("EMOSERVE_SERVER=" + options.server_env);
  }
  std::vector<char*> envp;
  for (std::string& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, in_path.c_str(), O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = 0;
  const int error =
      posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    ADD_FAILURE() << "cannot run " << argv[0] << ": " << std::strerror(error);
    return result;
  }
  // A hung CLI fails the test rather than hanging it.
  const absl::Time until = absl::Now() + testing::kPatience;
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) != pid) {
    if (absl::Now() > until) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << "emoserve " << absl::StrJoin(args, " ") << " hung";
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status)
                                       : 128 + WTERMSIG(status);
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  };
  result.out = slurp(out_path);
  result.err = slurp(err_path);
  for (const std::string& path : {in_path, out_path, err_path}) {
    std::filesystem::remove(path);
  }
  return result;
}

std::string Describe(const ProcessResult& result) {
  return absl::StrCat("exit ", result.exit_code, "\nstdout:\n", result.out,
                      "\nstderr:\n", result.err);
}

Json ParseJson(const std::string& text) {
  Json json = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(json.is_discarded()) << "not JSON:\n" << text;
  return json;
}

// JSON lines (stream --output json).
std::vector<Json> ParseJsonLines(const std::string& text) {
  std::vector<Json> lines;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    lines.push_back(ParseJson(std::string(line)));
  }
  return lines;
}

std::vector<Json> OfType(const std::vector<Json>& events,
                         const std::string& type) {
  std::vector<Json> out;
  for (const Json& event : events) {
    if (event["type"] == type) out.push_back(event);
  }
  return out;
}

std::string UnreachableLine(int port) {
  return absl::StrCat("emoserve: cannot reach server 127.0.0.1:", port,
                      " (connection refused); is emoserve-server running?\n");
}

// Two RAVDESS clips and their durations from the manifest.
struct Clip {
  std::string path;
  double duration_seconds = 0;
};

// emoserve-server on 127.0.0.1 serving `model`, once it is SERVING (the
// model loaded and warmed up); its port in `port`.
absl::StatusOr<std::unique_ptr<testing::ServerProcess>> StartServing(
    const std::string& model, const std::vector<std::string>& more_args, int* port) {
  std::vector<std::string> args = {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                   "--model", model, "--torch-threads", "1",
                                   "--feature-threads", "2"};
  args.insert(args.end(), more_args.begin(), more_args.end());
  absl::StatusOr<std::unique_ptr<testing::ServerProcess>> server =
      testing::ServerProcess::Start(args);
  if (!server.ok()) return server.status();
  absl::StatusOr<int> listening = (*server)->WaitForPort();
  if (!listening.ok()) return listening.status();
  *port = *listening;
  std::shared_ptr<grpc::Channel> channel = testing::Connect(*port);
  const absl::Time until = absl::Now() + testing::kPatience;
  while (true) {
    absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> health =
        testing::CheckHealth(*channel);
    if (health.ok() && *health == grpc::health::v1::HealthCheckResponse::SERVING) {
      return server;
    }
    if (absl::Now() > until) {
      return absl::DeadlineExceededError("the server never got to SERVING:\n" +
                                         (*server)->Log());
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

class CliServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<testing::ServerProcess>> server =
        StartServing(testing::TestModelDir(), {}, &port_);
    if (!server.ok()) {
      setup_error_ = new std::string(server.status().ToString());
      return;
    }
    server_ = server->release();
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    ASSERT_EQ(setup_error_, nullptr) << *setup_error_;
  }

  static std::string Address() { return absl::StrCat("127.0.0.1:", port_); }

  // `args` against this suite's server.
  static ProcessResult Run(std::vector<std::string> args,
                           const RunOptions& options = {}) {
    args.insert(args.begin(), {"--server", Address()});
    return RunCli(args, options);
  }

  // The first `count` clips of Actor_01 in the manifest; skips without
  // the shared folder.
  static std::vector<Clip> Clips(int count) {
    std::vector<Clip> clips;
    const std::optional<std::string> shared = testing::SharedDir();
    if (!shared.has_value()) return clips;
    const std::string root = *shared + "/datasets/ravdess/";
    std::ifstream manifest(root + "manifest.tsv");
    std::string line;
    std::getline(manifest, line);  // header
    while (static_cast<int>(clips.size()) < count &&
           std::getline(manifest, line)) {
      const std::vector<std::string> fields = absl::StrSplit(line, '\t');
      Clip clip;
      if (fields.size() < 7 ||
          !absl::SimpleAtod(fields[6], &clip.duration_seconds)) {
        ADD_FAILURE() << "bad manifest line: " << line;
        continue;
      }
      clip.path = root + fields[0];
      clips.push_back(clip);
    }
    EXPECT_EQ(static_cast<int>(clips.size()), count)
        << "the manifest " << root << "manifest.tsv lists too few clips";
    return clips;
  }

  static testing::ServerProcess* server_;
  static int port_;
  static std::string* setup_error_;
};

testing::ServerProcess* CliServerTest::server_ = nullptr;
int CliServerTest::port_ = 0;
std::string* CliServerTest::setup_error_ = nullptr;

#define REQUIRE_SHARED_DATA()                                              \
  if (!testing::SharedDir().has_value()) {                                 \
    GTEST_SKIP() << "no shared data folder (set EMOSERVE_SHARED_DIR): the " \
                    "CLI is tested on RAVDESS speech";                     \
  }

TEST_F(CliServerTest, ClassifyPrintsTableJsonAndCsv) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(2);
  ASSERT_EQ(clips.size(), 2u);

  const ProcessResult json_run =
      Run({"classify", "-o", "json", clips[0].path, clips[1].path});
  ASSERT_EQ(json_run.exit_code, 0) << Describe(json_run);
  EXPECT_EQ(json_run.err, "");
  const Json results = ParseJson(json_run.out);
  ASSERT_TRUE(results.is_array());
  ASSERT_EQ(results.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const Json& result = results[i];
    SCOPED_TRACE(clips[i].path);
    EXPECT_EQ(result["file"], clips[i].path);  // input order
    EXPECT_EQ(result["ok"], true);
    EXPECT_NEAR(result["duration_seconds"].get<double>(),
                clips[i].duration_seconds, 1e-3);
    EXPECT_EQ(result["model"], "test-default-architecture");
    // Eight RAVDESS labels, probabilities summing to one, highest first.
    ASSERT_EQ(result["scores"].size(), 8u);
    double sum = 0;
    double previous = 1;
    for (const auto& [label, probability] : result["scores"].items()) {
      sum += probability.get<double>();
      EXPECT_LE(probability.get<double>(), previous + 1e-9);
      previous = probability.get<double>();
    }
    EXPECT_NEAR(sum, 1.0, 1e-4);
    EXPECT_EQ(result["top_label"], result["scores"].begin().key());
    EXPECT_EQ(result["confidence"], result["scores"].begin().value());
    EXPECT_GT(result["window_count"].get<int>(), 0);
    EXPECT_GE(result["window_count"], result["speech_window_count"]);
    EXPECT_FALSE(result.contains("timeline"));
  }

  // The table says the same, one row per file.
  const ProcessResult table_run =
      Run({"classify", "-j", "1", clips[0].path, clips[1].path});
  ASSERT_EQ(table_run.exit_code, 0) << Describe(table_run);
  const std::vector<std::string> rows =
      absl::StrSplit(table_run.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(rows.size(), 3u) << table_run.out;
  EXPECT_THAT(rows[0], StartsWith("FILE"));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_THAT(rows[i + 1],
                AllOf(StartsWith(clips[i].path),
                      HasSubstr(results[i]["top_label"].get<std::string>()),
                      HasSubstr(absl::StrFormat(
                          "%.2f s", results[i]["duration_seconds"].get<double>()))));
  }

  // CSV: a header, a row per file, a column per label with the same values.
  const ProcessResult csv_run =
      Run({"classify", "--output", "csv", clips[0].path, clips[1].path});
  ASSERT_EQ(csv_run.exit_code, 0) << Describe(csv_run);
  const std::vector<std::string> lines =
      absl::StrSplit(csv_run.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 3u) << csv_run.out;
  const std::vector<std::string> header = absl::StrSplit(lines[0], ',');
  ASSERT_EQ(header.size(), 6u + 8u + 1u) << lines[0];
  EXPECT_EQ(header.back(), "error");
  for (size_t i = 0; i < 2; ++i) {
    const std::vector<std::string> fields = absl::StrSplit(lines[i + 1], ',');
    ASSERT_EQ(fields.size(), header.size()) << lines[i + 1];
    EXPECT_EQ(fields[0], clips[i].path);
    EXPECT_EQ(fields[1], results[i]["top_label"]);
    for (size_t column = 6; column + 1 < header.size(); ++column) {
      double probability = 0;
      ASSERT_TRUE(absl::SimpleAtod(fields[column], &probability));
      EXPECT_NEAR(probability,
                  results[i]["scores"][header[column]].get<double>(), 2e-6)
          << header[column];
    }
    EXPECT_EQ(fields.back(), "");
  }
}

TEST_F(CliServerTest, ClassifyTimelineShowsEveryWindow) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(1);
  ASSERT_EQ(clips.size(), 1u);
  const ProcessResult run =
      Run({"classify", "--timeline", "--hop", "0.25", "-o", "json",
           clips[0].path});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  const Json result = ParseJson(run.out)[0];
  const Json& timeline = result["timeline"];
  ASSERT_EQ(timeline.size(), result["window_count"].get<size_t>());
  ASSERT_GE(timeline.size(), 2u);
  int speech_windows = 0;
  std::map<std::string, double> speech_sums;
  for (size_t i = 0; i < timeline.size(); ++i) {
    const Json& window = timeline[i];
    // 3 s windows every 0.25 s (the --hop), the last cut at the clip's end.
    EXPECT_NEAR(window["start_seconds"].get<double>(), 0.25 * i, 1e-3);
    EXPECT_LE(window["end_seconds"].get<double>(),
              window["start_seconds"].get<double>() + 3.0 + 1e-3);
    if (window["speech"].get<bool>()) {
      ++speech_windows;
      EXPECT_EQ(window["scores"].size(), 8u);
      for (const auto& [label, p] : window["scores"].items()) {
        speech_sums[label] += p.get<double>();
      }
    } else {
      EXPECT_TRUE(window["scores"].empty());
    }
  }
  EXPECT_EQ(speech_windows, result["speech_window_count"]);
  // The clip's scores are its speech windows' mean.
  ASSERT_GT(speech_windows, 0) << "RAVDESS speech with no speech window";
  for (const auto& [label, sum] : speech_sums) {
    EXPECT_NEAR(result["scores"][label].get<double>(), sum / speech_windows,
                1e-4)
        << label;
  }

  // The readable table lists the same windows beneath the file's row.
  const ProcessResult table =
      Run({"classify", "--timeline", "--hop", "0.25", clips[0].path});
  ASSERT_EQ(table.exit_code, 0) << Describe(table);
  const std::vector<std::string> lines =
      absl::StrSplit(table.out, '\n', absl::SkipEmpty());
  EXPECT_EQ(lines.size(), 2 + timeline.size()) << table.out;
}

TEST_F(CliServerTest, ClassifyReportsEachFailureAndGoesOn) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(1);
  ASSERT_EQ(clips.size(), 1u);
  const std::string bad = testing::ScratchDir() + "/not_audio.wav";
  std::ofstream(bad) << "this is not audio at all, just some text\n";
  const std::string missing = testing::ScratchDir() + "/missing.wav";

  const ProcessResult run =
      Run({"classify", "-o", "json", bad, clips[0].path, missing});
  EXPECT_EQ(run.exit_code, 1) << Describe(run);
  // One line per failure, the server's message for the rejected file.
  const std::vector<std::string> errors =
      absl::StrSplit(run.err, '\n', absl::SkipEmpty());
  ASSERT_EQ(errors.size(), 2u) << run.err;
  EXPECT_THAT(errors[0], StartsWith("emoserve: " + bad + ": INVALID_ARGUMENT: "));
  EXPECT_THAT(errors[0], HasSubstr("format"));
  EXPECT_EQ(errors[1], "emoserve: cannot open '" + missing +
                           "': No such file or directory");
  // The good file is still classified, between the two failures.
  const Json results = ParseJson(run.out);
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0]["ok"], false);
  EXPECT_EQ(results[0]["error"]["code"], "INVALID_ARGUMENT");
  EXPECT_EQ(results[1]["ok"], true);
  EXPECT_EQ(results[1]["file"], clips[0].path);
  EXPECT_EQ(results[2]["error"]["code"], "NOT_FOUND");

  // The table shows what worked; stderr what did not.
  const ProcessResult table = Run({"classify", bad, clips[0].path});
  EXPECT_EQ(table.exit_code, 1);
  EXPECT_THAT(table.out, HasSubstr(clips[0].path));
  EXPECT_THAT(table.out, Not(HasSubstr(bad)));
  EXPECT_THAT(table.err, HasSubstr("INVALID_ARGUMENT"));
}

TEST_F(CliServerTest, StreamFilePrintsWindowsEventsAndUtterances) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(1);
  ASSERT_EQ(clips.size(), 1u);
  // Without voice-activity detection every window is speech: one utterance
  // that spans them all ends with the stream.
  const ProcessResult run =
      Run({"stream", "--fast", "--no-vad", "-o", "json", clips[0].path});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  const std::vector<Json> events = ParseJsonLines(run.out);
  const std::vector<Json> windows = OfType(events, "window");
  const std::vector<Json> utterances = OfType(events, "utterance");
  ASSERT_GE(windows.size(), 2u) << run.out;
  for (size_t i = 0; i < windows.size(); ++i) {
    EXPECT_NEAR(windows[i]["start_seconds"].get<double>(), 1.5 * i, 1e-3);
    EXPECT_EQ(windows[i]["speech"], true);
    EXPECT_EQ(windows[i]["scores"].size(), 8u);
  }
  ASSERT_EQ(utterances.size(), 1u) << run.out;
  EXPECT_EQ(utterances[0]["window_count"], static_cast<int>(windows.size()));
  EXPECT_EQ(utterances[0]["scores"].size(), 8u);
  EXPECT_EQ(utterances[0]["top_label"], utterances[0]["scores"].begin().key());
  EXPECT_EQ(OfType(events, "speech_started").size(), 1u);

  // --no-interim: the same final result without the windows.
  const ProcessResult finals = Run({"stream", "--fast", "--no-vad",
                                    "--no-interim", "-o", "json",
                                    clips[0].path});
  ASSERT_EQ(finals.exit_code, 0) << Describe(finals);
  const std::vector<Json> final_events = ParseJsonLines(finals.out);
  EXPECT_TRUE(OfType(final_events, "window").empty()) << finals.out;
  ASSERT_EQ(OfType(final_events, "utterance").size(), 1u);
  EXPECT_EQ(OfType(final_events, "utterance")[0], utterances[0]);

  // Real-time pace (the default), readable output, the server's VAD.
  const ProcessResult live = Run({"stream", "--chunk-ms", "200", clips[0].path});
  ASSERT_EQ(live.exit_code, 0) << Describe(live);
  EXPECT_THAT(live.out, AllOf(HasSubstr("window"), HasSubstr("speech started"),
                              HasSubstr("UTTERANCE")));
}

TEST_F(CliServerTest, StreamFromStdinMatchesTheFile) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(1);
  ASSERT_EQ(clips.size(), 1u);
  absl::StatusOr<Audio> audio = DecodeAudioFile(clips[0].path);
  ASSERT_TRUE(audio.ok()) << audio.status();
  ASSERT_EQ(audio->sample_rate, 16000);

  const ProcessResult from_file =
      Run({"stream", "--fast", "--no-vad", "-o", "json", clips[0].path});
  ASSERT_EQ(from_file.exit_code, 0) << Describe(from_file);
  const std::vector<Json> expected = ParseJsonLines(from_file.out);
  ASSERT_FALSE(OfType(expected, "utterance").empty());

  // 16-bit FLAC decodes to exact multiples of 1/32768: s16le carries the
  // same samples, and a stereo copy mixes down to them. Results must agree.
  struct Variant {
    std::string name;
    std::string pcm;
    std::vector<std::string> flags;
  };
  const std::vector<Variant> variants = {
      {"s16le mono", testing::ToLinear16(audio->samples), {}},
      {"f32le stereo", testing::ToFloat32(audio->samples, 2),
       {"--format", "f32le", "--channels", "2"}},
  };
  for (const Variant& variant : variants) {
    SCOPED_TRACE(variant.name);
    std::vector<std::string> args = {"stream", "-",  "--fast", "--no-vad",
                                     "-o",     "json", "--rate", "16000",
                                     "--chunk-ms", "30"};
    args.insert(args.end(), variant.flags.begin(), variant.flags.end());
    const ProcessResult run = Run(args, WithStdin(variant.pcm));
    ASSERT_EQ(run.exit_code, 0) << Describe(run);
    const std::vector<Json> events = ParseJsonLines(run.out);
    ASSERT_EQ(events.size(), expected.size()) << run.out;
    for (size_t i = 0; i < events.size(); ++i) {
      EXPECT_EQ(events[i]["type"], expected[i]["type"]);
      if (!expected[i].contains("scores")) continue;
      for (const auto& [label, p] : expected[i]["scores"].items()) {
        EXPECT_NEAR(events[i]["scores"][label].get<double>(), p.get<double>(),
                    1e-4)
            << i << " " << label;
      }
    }
  }

  // A configuration the server refuses (a hop longer than the window) is
  // its message, on one line.
  const ProcessResult refused =
      Run({"stream", "-", "--fast", "--hop", "100"},
          WithStdin(testing::ToLinear16(audio->samples)));
  EXPECT_EQ(refused.exit_code, 1) << Describe(refused);
  EXPECT_THAT(refused.err,
              AllOf(StartsWith("emoserve: INVALID_ARGUMENT: "), HasSubstr("hop")));
  EXPECT_EQ(std::count(refused.err.begin(), refused.err.end(), '\n'), 1);
}

TEST_F(CliServerTest, InfoDescribesTheModel) {
  const ProcessResult json_run = Run({"info", "--output", "json"});
  ASSERT_EQ(json_run.exit_code, 0) << Describe(json_run);
  const Json info = ParseJson(json_run.out);
  EXPECT_EQ(info["name"], "test-default-architecture");
  EXPECT_EQ(info["labels"],
            Json({"neutral", "calm", "happy", "sad", "angry", "fearful",
                  "disgust", "surprised"}));
  EXPECT_EQ(info["sample_rate_hertz"], 16000);
  EXPECT_EQ(info["window_seconds"], 3.0);
  EXPECT_EQ(info["default_hop_seconds"], 1.5);
  EXPECT_EQ(info["device"], "cpu");
  EXPECT_GE(info["max_batch_size"].get<int>(), 1);
  // The features object of model.json, as the server read it.
  std::ifstream model_json(testing::TestModelDir() + "/model.json");
  const Json expected_features = Json::parse(model_json)["features"];
  EXPECT_EQ(info["features"], expected_features);

  const ProcessResult text = Run({"info"});
  ASSERT_EQ(text.exit_code, 0) << Describe(text);
  EXPECT_THAT(text.out,
              AllOf(HasSubstr("test-default-architecture"),
                    HasSubstr("neutral, calm, happy, sad, angry, fearful, "
                              "disgust, surprised"),
                    HasSubstr("16000 Hz"), HasSubstr("3 s"), HasSubstr("cpu")));
}

// `emoserve models`: the server's models and states; --model picks one,
// and an unknown one fails the call with the server's reason.
TEST_F(CliServerTest, ModelsListsTheServedModelsAndModelPicksOne) {
  const ProcessResult text = Run({"models"});
  ASSERT_EQ(text.exit_code, 0) << Describe(text);
  // One model directory: version 1, which responses call model.json's "0".
  EXPECT_THAT(text.out, AllOf(HasSubstr("test-default-architecture"), HasSubstr("ready"),
                              HasSubstr("responses say version \"0\"; serves calls naming no model")));
  const ProcessResult json_run = Run({"models", "-o", "json"});
  ASSERT_EQ(json_run.exit_code, 0) << Describe(json_run);
  const Json models = ParseJson(json_run.out)["models"];
  ASSERT_EQ(models.size(), 1u);
  EXPECT_EQ(models[0]["name"], "test-default-architecture");
  EXPECT_EQ(models[0]["is_default"], true);
  EXPECT_EQ(models[0]["default_version"], 1);
  EXPECT_EQ(models[0]["versions"][0]["state"], "ready");
  EXPECT_EQ(models[0]["versions"][0]["reported_version"], "0");

  const ProcessResult picked = Run({"info", "--model", "test-default-architecture:1"});
  EXPECT_EQ(picked.exit_code, 0) << Describe(picked);
  const ProcessResult unknown = Run({"info", "--model", "nope"});
  EXPECT_EQ(unknown.exit_code, client::kExitFailure);
  EXPECT_THAT(unknown.err, HasSubstr("no model named \"nope\""));
  // Any bytes: the model is looked up before the audio is decoded.
  const ProcessResult classify =
      Run({"classify", "--model", "nope", testing::TestModelDir() + "/model.json"});
  EXPECT_EQ(classify.exit_code, client::kExitFailure);
  EXPECT_THAT(classify.out + classify.err, HasSubstr("test-default-architecture"));
}

// --speaker keeps one voice's statistics in a file: the files of one call
// are classified in order, each adapted to those before it, and later calls
// and streams start from the file. A model that does not adapt refuses it.
TEST_F(CliServerTest, SpeakerFileCarriesAVoiceAcrossCallsAndStreams) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(3);
  ASSERT_EQ(clips.size(), 3u);
  const std::string file = ::testing::TempDir() + "/cli_voice.espk";
  std::remove(file.c_str());
  const ProcessResult refused = Run({"classify", "--speaker", file, clips[0].path});
  EXPECT_EQ(refused.exit_code, client::kExitFailure);
  EXPECT_THAT(refused.err, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_FALSE(std::filesystem::exists(file));

  int port = 0;
  absl::StatusOr<std::unique_ptr<testing::ServerProcess>> adaptive =
      StartServing(std::string(EMOSERVE_SOURCE_DIR) + "/models/speaker-adaptive",
                   {"--adaptation-min-speech-seconds", "1.5"}, &port);
  ASSERT_TRUE(adaptive.ok()) << adaptive.status();
  const std::string server = absl::StrCat("127.0.0.1:", port);
  const ProcessResult two = RunCli({"--server", server, "classify", "-o", "json", "--speaker",
                                    file, clips[0].path, clips[1].path});
  ASSERT_EQ(two.exit_code, 0) << Describe(two);
  const Json results = ParseJson(two.out);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_FALSE(results[0].contains("speaker_adapted")) << results[0].dump();
  EXPECT_EQ(results[1].value("speaker_adapted", false), true) << results[1].dump();
  absl::StatusOr<std::string> kept = ReadFileBytes(file);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->substr(0, 4), "ESPK");

  const ProcessResult streamed = RunCli({"--server", server, "stream", "--fast", "-o", "json",
                                         "--speaker", file, clips[2].path});
  ASSERT_EQ(streamed.exit_code, 0) << Describe(streamed);
  EXPECT_THAT(streamed.out, HasSubstr("\"speaker_adapted\":true"));
  absl::StatusOr<std::string> after = ReadFileBytes(file);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->size(), kept->size());
  EXPECT_NE(*after, *kept) << "the stream added its utterance to the file";

  ASSERT_TRUE(std::ofstream(file, std::ios::trunc) << "not statistics");
  const ProcessResult garbage = RunCli({"--server", server, "classify", "--speaker", file,
                                        clips[0].path});
  EXPECT_EQ(garbage.exit_code, client::kExitFailure);
  EXPECT_THAT(garbage.err, HasSubstr("speaker_statistics"));
}

TEST_F(CliServerTest, HealthExitStatusFollowsTheServer) {
  ProcessResult run = Run({"health"});
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(run.out, "SERVING\n");
  EXPECT_EQ(run.err, "");
  run = Run({"health", "--quiet"});
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(run.out + run.err, "");
  // The server address from the environment, as in a container.
  RunOptions from_environment;
  from_environment.server_env = Address();
  run = RunCli({"health"}, from_environment);
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  // A service the server does not know is not healthy.
  run = Run({"health", "--service", "no.such.Service"});
  EXPECT_NE(run.exit_code, 0) << Describe(run);
  EXPECT_THAT(run.err, StartsWith("emoserve: NOT_FOUND"));
}

TEST_F(CliServerTest, BenchUnaryReportsConsistentStatistics) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(2);
  ASSERT_EQ(clips.size(), 2u);
  const double shortest =
      std::min(clips[0].duration_seconds, clips[1].duration_seconds);
  const double longest =
      std::max(clips[0].duration_seconds, clips[1].duration_seconds);

  auto check_report = [&](const Json& report) {
    const int64_t ok = report["ok"].get<int64_t>();
    EXPECT_GT(ok, 0);
    EXPECT_EQ(report["requests"], ok);
    EXPECT_TRUE(report["errors"].empty()) << report.dump();
    EXPECT_EQ(report["model"], "test-default-architecture 0 (cpu)");
    EXPECT_EQ(report["server"], Address());
    const Json& latency = report["latency_ms"];
    EXPECT_EQ(latency["count"], ok);
    EXPECT_GT(latency["min"].get<double>(), 0);
    EXPECT_LE(latency["min"].get<double>(), latency["p50"].get<double>());
    EXPECT_LE(latency["p50"].get<double>(), latency["p90"].get<double>());
    EXPECT_LE(latency["p90"].get<double>(), latency["p99"].get<double>());
    EXPECT_LE(latency["p99"].get<double>(), latency["max"].get<double>());
    EXPECT_NEAR(report["throughput_rps"].get<double>(),
                static_cast<double>(ok) /
                    report["duration_seconds"].get<double>(),
                1e-3);
    // Every OK call classified one of the two clips.
    const double audio = report["audio_seconds"].get<double>();
    EXPECT_GE(audio, ok * shortest - 0.01);
    EXPECT_LE(audio, ok * longest + 0.01);
  };

  const ProcessResult closed =
      Run({"bench", "-j", "2", "--duration", "1", "--warmup", "0.3", "-o",
           "json", clips[0].path, clips[1].path});
  ASSERT_EQ(closed.exit_code, 0) << Describe(closed);
  const Json closed_report = ParseJson(closed.out);
  EXPECT_EQ(closed_report["mode"], "closed_loop");
  EXPECT_EQ(closed_report["concurrency"], 2);
  check_report(closed_report);

  // Open loop: sends are due at i / rps, so 1 s at 8/s schedules 8 calls
  // after the warmup whatever the server's speed; each answered or
  // dropped at --max-in-flight.
  const ProcessResult open =
      Run({"bench", "--rps", "8", "--duration", "1", "--warmup", "0.25",
           "-o", "json", clips[0].path, clips[1].path});
  ASSERT_EQ(open.exit_code, 0) << Describe(open);
  const Json open_report = ParseJson(open.out);
  EXPECT_EQ(open_report["mode"], "open_loop");
  EXPECT_EQ(open_report["target_rps"], 8.0);
  EXPECT_EQ(open_report["requests"].get<int64_t>() +
                open_report["dropped"].get<int64_t>(),
            8);
  check_report(open_report);

  // The readable report.
  const ProcessResult text = Run({"bench", "-j", "1", "--duration", "0.5",
                                  "--warmup", "0", clips[0].path});
  ASSERT_EQ(text.exit_code, 0) << Describe(text);
  EXPECT_THAT(text.out, AllOf(HasSubstr("closed loop, concurrency 1"),
                              HasSubstr("throughput"), HasSubstr("p50"),
                              HasSubstr("p99"), HasSubstr("max")));
}

TEST_F(CliServerTest, BenchStreamsReportsWindowAndFinalLatency) {
  REQUIRE_SHARED_DATA();
  const std::vector<Clip> clips = Clips(1);
  ASSERT_EQ(clips.size(), 1u);
  // Two real-time streams of a ~3.3 s clip, started in the first 0.5 s.
  const ProcessResult run =
      Run({"bench", "--streams", "2", "--duration", "0.5", "--warmup", "0",
           "--chunk-ms", "100", "-o", "json", clips[0].path});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  const Json report = ParseJson(run.out);
  EXPECT_EQ(report["mode"], "streams");
  EXPECT_EQ(report["streams"], 2);
  EXPECT_EQ(report["requests"], 2);
  EXPECT_EQ(report["ok"], 2);
  EXPECT_TRUE(report["errors"].empty()) << report.dump();
  EXPECT_NEAR(report["audio_seconds"].get<double>(),
              2 * clips[0].duration_seconds, 0.01);
  // Every window of both streams was timed, and both finals.
  EXPECT_GE(report["windows"].get<int>(), 2);
  EXPECT_EQ(report["latency_ms"]["count"], report["windows"]);
  EXPECT_EQ(report["final_latency_ms"]["count"], 2);
  EXPECT_LE(report["latency_ms"]["p50"].get<double>(),
            report["latency_ms"]["max"].get<double>());
}

TEST(CliUnreachableTest, EveryCommandSaysSoInOneLine) {
  const int port = testing::FreePort();
  ASSERT_GT(port, 0);
  const std::string server = absl::StrCat("127.0.0.1:", port);
  const std::string file = testing::ScratchDir() + "/some.wav";
  std::ofstream(file) << "bytes";
  const std::vector<std::vector<std::string>> commands = {
      {"classify", file, file},  // one line, not one per file
      {"info"},
      {"health"},
      {"bench", "--duration", "1", file},
      {"stream", "-", "--fast"},
  };
  for (std::vector<std::string> args : commands) {
    SCOPED_TRACE(args[0]);
    args.insert(args.begin(), {"--server", server});
    const ProcessResult run = RunCli(args, WithStdin(std::string(3200, '\0')));
    EXPECT_EQ(run.exit_code, 1) << Describe(run);
    EXPECT_EQ(run.err, UnreachableLine(port));
  }
  // A quiet health check is only its exit status.
  const ProcessResult quiet = RunCli({"--server", server, "health", "-q"});
  EXPECT_EQ(quiet.exit_code, 1);
  EXPECT_EQ(quiet.out + quiet.err, "");
}

TEST(CliTlsTest, TlsFlagsReachAMutualTlsServer) {
  const std::string dir = testing::ScratchDir() + "/tls";
  std::filesystem::create_directories(dir);
  // One self-signed certificate for all: the server's, the CA it checks
  // clients against, and the client's.
  const std::string cert = dir + "/cert.pem";
  const std::string key = dir + "/key.pem";
  const std::string command = absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout ",
      key, " -out ", cert, " 2>/dev/null");
  ASSERT_EQ(std::system(command.c_str()), 0)
      << "openssl (scripts/install-deps.sh installs it) failed: " << command;

  absl::StatusOr<std::unique_ptr<testing::ServerProcess>> server =
      testing::ServerProcess::Start(
          {"--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--model", testing::TestModelDir(), "--torch-threads", "1",
           "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", cert});
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<int> port = (*server)->WaitForPort();
  ASSERT_TRUE(port.ok()) << port.status();
  const std::string address = absl::StrCat("localhost:", *port);
  const std::vector<std::string> mutual_tls = {
      "--server", address, "--ca", cert, "--cert", cert, "--key", key};
  auto run_with = [](std::vector<std::string> args,
                     const std::vector<std::string>& more) {
    args.insert(args.end(), more.begin(), more.end());
    return RunCli(args);
  };

  // SERVING once the model is up: the CLI's own health check, over TLS.
  ProcessResult run;
  const absl::Time until = absl::Now() + testing::kPatience;
  do {
    run = run_with(mutual_tls, {"health"});
    if (run.exit_code == 0) break;
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < until);
  ASSERT_EQ(run.exit_code, 0) << Describe(run) << (*server)->Log();
  EXPECT_EQ(run.out, "SERVING\n");
  run = run_with(mutual_tls, {"info", "-o", "json"});
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(ParseJson(run.out)["name"], "test-default-architecture");

  // Each missing piece is one line that says what to check.
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--server", address}, "(--tls)"},                          // plaintext
      {{"--server", address, "--tls"}, "--ca"},                    // untrusted
      {{"--server", address, "--ca", cert}, "(--cert, --key)"},    // no client cert
  };
  for (const auto& [args, hint] : cases) {
    run = run_with(args, {"health"});
    EXPECT_EQ(run.exit_code, 1) << Describe(run);
    EXPECT_THAT(run.err, AllOf(StartsWith("emoserve: cannot reach server " +
                                          address + " ("),
                               HasSubstr(hint)));
    EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
  }
  run = run_with({"--server", address, "--ca", dir + "/missing.pem"}, {"health"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.err, StartsWith("emoserve: --ca: cannot open"));
}

}  // namespace
}  // namespace emoserve
