// Shared by the server tests: a model directory, in-process servers on
// 127.0.0.1, the server binary as a child process, PCM and stream helpers.
#ifndef EMOSERVE_TESTS_SERVER_TEST_SUPPORT_H_
#define EMOSERVE_TESTS_SERVER_TEST_SUPPORT_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "emoserve/v1/emoserve.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/config.h"
#include "server/server.h"

namespace emoserve::testing {

// How long a test waits for something that should happen; only a bound on
// a hang, never a performance assertion.
inline constexpr absl::Duration kPatience = absl::Seconds(120);

// A model directory with the bundled model's shape (DefaultModelConfig:
// 16 kHz, 3 s windows, 40 MFCCs, the 8 RAVDESS labels), freshly initialised
// and written once per process under a private temporary directory.
const std::string& TestModelDir();

// An in-process server's configuration: 127.0.0.1, any free port, no
// metrics endpoint, the test model, one LibTorch thread.
ServerConfig TestServerConfig();

// Starts a server with `config` and, when `load_model`, loads its model.
absl::StatusOr<std::unique_ptr<Server>> StartServer(const ServerConfig& config,
                                                    bool load_model = true);

// A channel with a connection of its own (not shared with other channels).
std::shared_ptr<grpc::Channel> Connect(
    int port, std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr,
    const std::string& host = "127.0.0.1");

// The first `count` RAVDESS clips (16 kHz mono), or an error; callers skip
// when SharedDir() is absent.
absl::StatusOr<std::vector<std::vector<float>>> RavdessClips(int count);
// The path of the first RAVDESS clip's FLAC file.
absl::StatusOr<std::string> FirstRavdessFlac();

// Raw little-endian PCM; each mono sample repeated on `channels` channels.
std::string ToLinear16(absl::Span<const float> samples, int channels = 1);
std::string ToFloat32(absl::Span<const float> samples, int channels = 1);

v1::AudioFormat Format(v1::AudioEncoding encoding, int rate, int channels = 1);

// One whole StreamClassify call: `config`, then `pcm` in messages of
// `chunk_bytes`, then half-close; responses are read concurrently.
struct StreamOutcome {
  grpc::Status status;
  std::vector<v1::StreamClassifyResponse> responses;

  std::vector<v1::WindowResult> windows() const;
  std::vector<v1::UtteranceResult> utterances() const;
  std::vector<v1::SpeechEvent> speech_events() const;
};
StreamOutcome RunStream(v1::EmotionService::Stub& stub, const v1::StreamingConfig& config,
                        const std::string& pcm, size_t chunk_bytes,
                        absl::Duration timeout = kPatience);

// Health of `service` ("" = the server): the status, or the call's error.
absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    grpc::Channel& channel, const std::string& service = "");

// A TCP port that was free on 127.0.0.1 a moment ago.
int FreePort();

// emoserve-server (the built binary) as a child process; its stderr goes to
// a file that the test reads.
class ServerProcess {
 public:
  // Starts the binary with `args` and the environment of this process less
  // its EMOSERVE_* variables, plus `env` ("NAME=value").
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::vector<std::string>& args, const std::vector<std::string>& env = {});
  // Kills the process if it still runs.
  ~ServerProcess();

  // Waits for the startup log line and returns its port= value.
  absl::StatusOr<int> WaitForPort(absl::Duration timeout = kPatience);
  void Signal(int signal_number);
  // The exit code (128 + signal when killed by one), or an error on timeout.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout = kPatience);
  // Everything written to stderr so far.
  std::string Log() const;

 private:
  ServerProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  std::string log_path_;
  bool exited_ = false;
};

// The server binary's path (built beside the tests).
std::string ServerBinary();

// A scratch directory for this process, removed at exit.
const std::string& ScratchDir();

}  // namespace emoserve::testing

#endif  // EMOSERVE_TESTS_SERVER_TEST_SUPPORT_H_
