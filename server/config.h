// The server's configuration: command-line flags, each also settable by an
// EMOSERVE_* environment variable (the flag wins).
#ifndef EMOSERVE_SERVER_CONFIG_H_
#define EMOSERVE_SERVER_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/model.h"
#include "core/stream.h"
#include "server/log.h"

namespace emoserve {

struct ServerConfig {
  // Network.
  std::string host = "0.0.0.0";
  int port = 50051;          // 0: any free port (logged at startup)
  std::string metrics_host;  // "": the same as host
  int metrics_port = 9464;   // 0: no metrics endpoint
  int metrics_threads = 16;
  int metrics_timeout_ms = 1000;  // a metrics request must arrive within this
  std::string http_host;  // "": the same as host
  int http_port = 8080;   // HTTP/JSON; 0: none
  int http_threads = 16;  // connections answered at once
  bool reflection = true;
  // Model and engine.
  std::string model = "models/default";  // one model directory
  // A repository (NAME/VERSION/ directories); when set, `model` is unused.
  std::string model_repository;
  std::string default_model;          // "": the repository's only model
  double model_poll_seconds = 10.0;   // rescans of the repository; 0: SIGHUP only
  int max_loaded_versions = 4;        // of the repository, at once
  std::string device = "cpu";
  std::string precision;  // "": the one model.json names (fp32 unless it names one)
  // The engine's and the streams' own defaults (core/engine.h,
  // core/stream.h) are the flags' defaults.
  int max_batch_size = EngineOptions().max_batch_size;
  int max_queue_size = EngineOptions().max_queue_size;
  int max_queue_delay_ms =
      static_cast<int>(absl::ToInt64Milliseconds(EngineOptions().max_queue_delay));
  int feature_threads = EngineOptions().feature_threads;  // 0: one per core
  int model_instances = EngineOptions().model_instances;
  int intra_op_threads = kDefaultIntraOpThreads;  // LibTorch's; 0: one per core
  double vad_threshold_dbfs = EngineOptions().vad_threshold_dbfs;
  // Speech a voice's statistics must hold before results are adapted to
  // them (speaker-normalised models).
  double adaptation_min_speech_seconds = kDefaultAdaptationMinSpeechSeconds;
  // Limits of a call.
  int64_t max_message_bytes = 32 << 20;
  double max_unary_seconds = 600.0;
  double max_stream_seconds = StreamOptions().max_seconds;
  int64_t max_chunk_bytes = 64 << 10;
  double min_hop_seconds = EngineOptions().min_hop_seconds;
  double stream_idle_seconds = 30.0;
  // Limits of the server.
  int max_audio_memory_mb = 256;
  int max_streams = 1024;
  int max_health_watches = 256;
  int max_reflection_calls = 8;
  // Transport (per connection unless said).
  bool connection_guard = true;  // plaintext: relay and check every connection
  int max_connections = 1024;
  int max_resets_per_second = 1000;
  int grpc_memory_mb = 256;  // the whole transport, all connections
  int max_concurrent_streams = 100;
  double handshake_timeout_seconds = 10.0;
  double keepalive_seconds = 60.0;
  double keepalive_timeout_seconds = 20.0;
  double min_ping_interval_seconds = 10.0;
  double max_connection_idle_seconds = 600.0;
  double max_connection_age_seconds = 1800.0;
  double max_connection_age_grace_seconds = 3600.0;
  // Lifecycle.
  double grace_seconds = 10.0;
  // TLS: a certificate and key turn it on; a client CA makes it mutual.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  LogLevel log_level = LogLevel::kInfo;
};

struct CommandLine {
  ServerConfig config;
  // Set when --help was asked for: print it and exit 0.
  std::optional<std::string> help;
};

// Parses flags and EMOSERVE_* environment variables. A bad value is
// kInvalidArgument with a one-line message naming the flag.
absl::StatusOr<CommandLine> ParseCommandLine(int argc, const char* const* argv);

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_CONFIG_H_
