// The server's configuration: command-line flags, each also settable by an
// EMOSERVE_* environment variable (the flag wins).
#ifndef EMOSERVE_SERVER_CONFIG_H_
#define EMOSERVE_SERVER_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/log.h"

namespace emoserve {

struct ServerConfig {
  // Network.
  std::string host = "0.0.0.0";
  int port = 50051;          // 0: any free port (logged at startup)
  int metrics_port = 9464;   // 0: no metrics endpoint
  // Model and engine.
  std::string model = "models/default";
  std::string device = "cpu";
  int max_batch_size = 32;
  int max_queue_size = 2048;
  int max_queue_delay_ms = 0;
  int feature_threads = 0;   // 0: one per core
  int model_instances = 1;
  int torch_threads = 1;     // 0: one per core
  double vad_threshold_dbfs = -50.0;
  // Limits.
  int64_t max_message_bytes = 32 << 20;
  double max_unary_seconds = 600.0;
  double max_stream_seconds = 3600.0;
  int max_streams = 2048;
  int64_t max_chunk_bytes = 1 << 20;
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
