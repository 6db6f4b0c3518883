// emoserve-server: the gRPC service. See `emoserve-server --help`.
#include <signal.h>
#include <sys/resource.h>

#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/config.h"
#include "server/log.h"
#include "server/server.h"

int main(int argc, char** argv) {
  // SIGTERM/SIGINT (stop) and SIGHUP (rescan the model repository) are
  // taken by sigwait below; blocked before any thread starts so that every
  // thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // Every connection is a file descriptor: take all the kernel allows
  // (a default soft limit of 1024 would be the first resource to run out).
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }

  absl::StatusOr<emoserve::CommandLine> command_line =
      emoserve::ParseCommandLine(argc, argv);
  if (!command_line.ok()) {
    std::fprintf(stderr, "emoserve-server: error: %s (see --help)\n",
                 std::string(command_line.status().message()).c_str());
    return 2;
  }
  if (command_line->help.has_value()) {
    std::cout << *command_line->help;
    return 0;
  }
  const emoserve::ServerConfig& config = command_line->config;
  emoserve::SetUpModelRuntime(config.intra_op_threads);
  using emoserve::Log;
  using emoserve::LogLevel;
  emoserve::SetLogLevel(config.log_level);

  absl::StatusOr<std::unique_ptr<emoserve::Server>> server = emoserve::Server::Start(config);
  if (!server.ok()) {
    Log(LogLevel::kError, "startup_failed", {{"error", server.status().message()}});
    return 1;
  }
  const std::string& models =
      config.model_repository.empty() ? config.model : config.model_repository;
  Log(LogLevel::kInfo, "startup",
      {{config.model_repository.empty() ? "model" : "model_repository", models},
       {"device", config.device},
       {"precision", config.precision.empty() ? "model.json's" : config.precision},
       {"host", config.host},
       {"port", (*server)->port()},
       {"metrics_host", config.metrics_host.empty() ? config.host : config.metrics_host},
       {"metrics_port", config.metrics_port},
       {"http_port", (*server)->http_port()},
       {"tls", config.tls_cert.empty() ? "off" : config.tls_client_ca.empty() ? "on" : "mutual"},
       {"reflection", config.reflection},
       {"max_batch_size", config.max_batch_size},
       {"max_queue_size", config.max_queue_size},
       {"max_queue_delay_ms", config.max_queue_delay_ms},
       {"feature_threads", config.feature_threads},
       {"model_instances", config.model_instances},
       {"intra_op_threads", config.intra_op_threads},
       {"max_message_bytes", config.max_message_bytes},
       {"max_unary_seconds", config.max_unary_seconds},
       {"max_stream_seconds", config.max_stream_seconds},
       {"max_chunk_bytes", config.max_chunk_bytes},
       {"min_hop_seconds", config.min_hop_seconds},
       {"stream_idle_seconds", config.stream_idle_seconds},
       {"max_audio_memory_mb", config.max_audio_memory_mb},
       {"max_streams", config.max_streams},
       {"max_health_watches", config.max_health_watches},
       {"grpc_memory_mb", config.grpc_memory_mb},
       {"max_concurrent_streams", config.max_concurrent_streams},
       {"vad_threshold_dbfs", config.vad_threshold_dbfs},
       {"adaptation_min_speech_seconds", config.adaptation_min_speech_seconds},
       {"grace_seconds", config.grace_seconds}});

  const absl::Time load_start = absl::Now();
  if (absl::Status loaded = (*server)->LoadModel(); !loaded.ok()) {
    Log(LogLevel::kError, "model_load_failed",
        {{"model", models}, {"device", config.device}, {"error", loaded.message()}});
    (*server)->Shutdown(absl::ZeroDuration());
    return 1;
  }
  Log(LogLevel::kInfo, "serving",
      {{"model", models},
       {"load_and_warmup_ms", absl::ToInt64Milliseconds(absl::Now() - load_start)}});

  int signal_number = 0;
  while (sigwait(&signals, &signal_number) == 0 && signal_number == SIGHUP) {
    Log(LogLevel::kInfo, "reload_requested", {{"signal", "SIGHUP"}});
    (*server)->ReloadModels();
  }
  Log(LogLevel::kInfo, "shutdown",
      {{"signal", signal_number == SIGINT ? "SIGINT" : "SIGTERM"},
       {"grace_seconds", config.grace_seconds}});
  const absl::Time stop_start = absl::Now();
  (*server)->Shutdown(absl::Seconds(config.grace_seconds));
  Log(LogLevel::kInfo, "stopped",
      {{"shutdown_ms", absl::ToInt64Milliseconds(absl::Now() - stop_start)}});
  return 0;
}
