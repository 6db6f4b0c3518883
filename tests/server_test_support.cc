#include "tests/server_test_support.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "core/audio.h"
#include "tests/test_model.h"
#include "tests/test_support.h"
#include "train/ravdess.h"

extern char** environ;

namespace emoserve::testing {

const std::string& ScratchDir() {
  static const std::string* dir = [] {
    auto* path = new std::string(
        (std::filesystem::path(::testing::TempDir()) /
         absl::StrCat("emoserve_server_test_", getpid()))
            .string());
    std::filesystem::create_directories(*path);
    std::atexit([] { std::filesystem::remove_all(ScratchDir()); });
    return path;
  }();
  return *dir;
}

const std::string& TestModelDir() {
  static const std::string* dir = [] {
    auto* path = new std::string(ScratchDir() + "/model");
    const absl::Status written = WriteTestModel(DefaultModelConfig(), *path);
    if (!written.ok()) ADD_FAILURE() << "cannot write the test model: " << written;
    return path;
  }();
  return *dir;
}

ServerConfig TestServerConfig() {
  ServerConfig config;
  config.host = "127.0.0.1";
  config.port = 0;
  config.metrics_port = 0;
  config.http_port = 0;
  config.model = TestModelDir();
  config.intra_op_threads = 1;
  config.feature_threads = 2;
  config.grace_seconds = 5;
  config.log_level = LogLevel::kWarning;
  return config;
}

absl::StatusOr<std::unique_ptr<Server>> StartServer(const ServerConfig& config,
                                                    bool load_model) {
  SetUpModelRuntime(config.intra_op_threads);
  SetLogLevel(config.log_level);
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(config);
  if (!server.ok() || !load_model) return server;
  if (absl::Status loaded = (*server)->LoadModel(); !loaded.ok()) return loaded;
  return server;
}

std::shared_ptr<grpc::Channel> Connect(int port,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials,
                                       const std::string& host) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // The client sends anything; the server's limits are what is tested.
  args.SetMaxSendMessageSize(-1);
  args.SetMaxReceiveMessageSize(-1);
  if (credentials == nullptr) credentials = grpc::InsecureChannelCredentials();
  return grpc::CreateCustomChannel(absl::StrCat(host, ":", port), credentials, args);
}

absl::StatusOr<std::vector<std::vector<float>>> RavdessClips(int count) {
  const std::optional<std::string> shared = SharedDir();
  if (!shared.has_value()) return absl::NotFoundError("no shared folder");
  return LoadRavdessClips(*shared + "/datasets/ravdess", count);
}

absl::StatusOr<std::string> FirstRavdessFlac() {
  const std::optional<std::string> shared = SharedDir();
  if (!shared.has_value()) return absl::NotFoundError("no shared folder");
  const std::string path = *shared + "/datasets/ravdess/Actor_01/03-01-01-01-01-01-01.flac";
  if (!std::filesystem::exists(path)) return absl::NotFoundError(path + " is missing");
  return path;
}

std::string ToLinear16(absl::Span<const float> samples, int channels) {
  std::string out;
  out.reserve(samples.size() * 2 * channels);
  for (float x : samples) {
    const long v = std::clamp(std::lrint(x * 32768.0), -32768L, 32767L);
    const auto s = static_cast<uint16_t>(static_cast<int16_t>(v));
    for (int c = 0; c < channels; ++c) {
      out.push_back(static_cast<char>(s & 0xff));
      out.push_back(static_cast<char>(s >> 8));
    }
  }
  return out;
}

std::string ToFloat32(absl::Span<const float> samples, int channels) {
  std::string out;
  out.reserve(samples.size() * 4 * channels);
  for (float x : samples) {
    char bytes[4];
    std::memcpy(bytes, &x, 4);  // x86-64 is little-endian
    for (int c = 0; c < channels; ++c) out.append(bytes, 4);
  }
  return out;
}

v1::AudioFormat Format(v1::AudioEncoding encoding, int rate, int channels) {
  v1::AudioFormat format;
  format.set_encoding(encoding);
  format.set_sample_rate_hertz(rate);
  format.set_channel_count(channels);
  return format;
}

std::vector<v1::WindowResult> StreamOutcome::windows() const {
  std::vector<v1::WindowResult> out;
  for (const auto& r : responses) {
    if (r.has_window()) out.push_back(r.window());
  }
  return out;
}

std::vector<v1::UtteranceResult> StreamOutcome::utterances() const {
  std::vector<v1::UtteranceResult> out;
  for (const auto& r : responses) {
    if (r.has_utterance()) out.push_back(r.utterance());
  }
  return out;
}

std::vector<v1::SpeechEvent> StreamOutcome::speech_events() const {
  std::vector<v1::SpeechEvent> out;
  for (const auto& r : responses) {
    if (r.has_speech_event()) out.push_back(r.speech_event());
  }
  return out;
}

StreamOutcome RunStream(v1::EmotionService::Stub& stub, const v1::StreamingConfig& config,
                        const std::string& pcm, size_t chunk_bytes, absl::Duration timeout) {
  StreamOutcome outcome;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  std::unique_ptr<grpc::ClientReaderWriter<v1::StreamClassifyRequest, v1::StreamClassifyResponse>>
      stream = stub.StreamClassify(&context);
  std::thread reader([&] {
    v1::StreamClassifyResponse response;
    while (stream->Read(&response)) outcome.responses.push_back(response);
  });
  v1::StreamClassifyRequest request;
  *request.mutable_config() = config;
  bool writing = stream->Write(request);
  for (size_t i = 0; writing && i < pcm.size(); i += chunk_bytes) {
    request.set_audio(pcm.substr(i, chunk_bytes));
    writing = stream->Write(request);
  }
  stream->WritesDone();
  reader.join();
  outcome.status = stream->Finish();
  return outcome;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    grpc::Channel& channel, const std::string& service) {
  std::shared_ptr<grpc::Channel> shared(&channel, [](grpc::Channel*) {});
  auto stub = grpc::health::v1::Health::NewStub(shared);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        status.error_message());
  }
  return response.status();
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  int port = 0;
  socklen_t length = sizeof(address);
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
    port = ntohs(address.sin_port);
  }
  close(fd);
  return port;
}

std::string ServerBinary() { return std::string(EMOSERVE_BINARY_DIR) + "/server/emoserve-server"; }

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::vector<std::string>& args, const std::vector<std::string>& env) {
  static int started = 0;
  const std::string log_path = absl::StrCat(ScratchDir(), "/server_", ++started, ".log");
  std::vector<std::string> argv_storage = {ServerBinary()};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  // No HTTP port unless the test asks for one: tests run side by side.
  const auto names_http_port = [](const std::string& arg) {
    return absl::StartsWith(arg, "--http-port") || absl::StartsWith(arg, "EMOSERVE_HTTP_PORT=");
  };
  if (std::none_of(args.begin(), args.end(), names_http_port) &&
      std::none_of(env.begin(), env.end(), names_http_port)) {
    argv_storage.insert(argv_storage.end(), {"--http-port", "0"});
  }
  std::vector<char*> argv;
  for (std::string& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);
  std::vector<char*> envp;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "EMOSERVE_")) envp.push_back(*e);
  }
  std::vector<std::string> env_storage = env;
  for (std::string& variable : env_storage) envp.push_back(variable.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = 0;
  const int error = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    return absl::InternalError(absl::StrCat("cannot start ", argv[0], ": ", std::strerror(error)));
  }
  return std::unique_ptr<ServerProcess>(new ServerProcess(pid, log_path));
}

ServerProcess::~ServerProcess() {
  if (!exited_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::string ServerProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<int> ServerProcess::WaitForPort(absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  while (absl::Now() < until) {
    for (absl::string_view line : absl::StrSplit(Log(), '\n')) {
      if (!absl::StrContains(line, "event=startup")) continue;
      for (absl::string_view field : absl::StrSplit(line, ' ')) {
        int port = 0;
        if (absl::ConsumePrefix(&field, "port=") && absl::SimpleAtoi(field, &port)) return port;
      }
    }
    int status = 0;
    if (!exited_ && waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      return absl::FailedPreconditionError("the server exited before listening:\n" + Log());
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError("no startup line:\n" + Log());
}

void ServerProcess::Signal(int signal_number) {
  if (!exited_) kill(pid_, signal_number);
}

absl::StatusOr<int> ServerProcess::WaitForExit(absl::Duration timeout) {
  const absl::Time until = absl::Now() + timeout;
  while (absl::Now() < until) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      return 128 + WTERMSIG(status);
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError("the server did not exit:\n" + Log());
}

}  // namespace emoserve::testing
