#include "server/config.h"

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"

namespace emoserve {
namespace {

// "max-batch-size" -> "EMOSERVE_MAX_BATCH_SIZE".
std::string EnvName(absl::string_view flag) {
  return absl::StrCat("EMOSERVE_",
                      absl::AsciiStrToUpper(absl::StrReplaceAll(flag, {{"-", "_"}})));
}

// "cpu", "cuda" or "cuda:N"; whether the device exists is the model's to say.
std::string CheckDevice(const std::string& device) {
  if (device == "cpu" || device == "cuda") return "";
  absl::string_view index = device;
  int n = 0;
  if (absl::ConsumePrefix(&index, "cuda:") && absl::SimpleAtoi(index, &n) && n >= 0) {
    return "";
  }
  return absl::StrCat("device \"", device, "\" is not cpu, cuda or cuda:N");
}

}  // namespace

absl::StatusOr<CommandLine> ParseCommandLine(int argc, const char* const* argv) {
  CommandLine result;
  ServerConfig& c = result.config;
  std::string log_level(LogLevelName(c.log_level));

  CLI::App app(
      "emoserve-server: tells which emotion a voice carries, over gRPC.\n"
      "Every flag can also be set by the environment variable shown (the flag "
      "wins).",
      "emoserve-server");
  app.get_formatter()->column_width(36);
  // Every option is added the same way: flag, its EMOSERVE_* variable, and
  // its default shown in --help.
  auto add = [&app](const std::string& flag, auto& value, const std::string& help) {
    return app.add_option("--" + flag, value, help)
        ->envname(EnvName(flag))
        ->capture_default_str();
  };

  add("host", c.host, "Address to listen on (gRPC, and metrics unless --metrics-host)");
  add("port", c.port, "gRPC port (0: any free port)")->check(CLI::Range(0, 65535));
  add("metrics-host", c.metrics_host, "Address of the metrics endpoint (empty: --host)");
  add("metrics-port", c.metrics_port, "Prometheus /metrics port (0: disabled)")
      ->check(CLI::Range(0, 65535));
  add("metrics-threads", c.metrics_threads,
      "Metrics endpoint workers (each slow or idle connection holds one)")
      ->check(CLI::Range(1, 64));
  add("metrics-timeout-ms", c.metrics_timeout_ms,
      "How long the metrics endpoint waits for a request before closing the connection")
      ->check(CLI::Range(100, 60000));
  add("http-host", c.http_host, "Address of the HTTP/JSON API (empty: --host)");
  add("http-port", c.http_port, "HTTP/JSON API port (0: disabled)")->check(CLI::Range(0, 65535));
  add("http-threads", c.http_threads,
      "HTTP connections answered at once (a thread each; others wait to be accepted)")
      ->check(CLI::Range(1, 1024));
  add("reflection", c.reflection, "Serve gRPC server reflection (for grpcurl)");
  add("model", c.model, "Model directory (model.json + model.pt)")
      ->check(CLI::ExistingDirectory);
  add("model-repository", c.model_repository,
      "Model repository: NAME/VERSION/ directories (model.json + model.pt), the highest "
      "ready VERSION answering for its NAME; when set, --model is not used")
      ->check(CLI::ExistingDirectory);
  add("default-model", c.default_model,
      "The repository's model that answers requests naming none (needed when it has several)");
  add("model-poll-seconds", c.model_poll_seconds,
      "How often the repository is rescanned for new and removed versions (0: only on SIGHUP)")
      ->check(CLI::Range(0.0, 86400.0));
  add("max-loaded-versions", c.max_loaded_versions,
      "Model versions of the repository loaded at once (each holds a model and an engine; "
      "versions still finishing calls count); more are reported failed until there is room")
      ->check(CLI::Range(1, 1024));
  add("device", c.device, "Inference device: cpu, cuda or cuda:N")
      ->check(CLI::Validator(CheckDevice, "DEVICE"));
  add("precision", c.precision,
      "Arithmetic the model runs in: fp32, bf16 (CPUs with AVX512_BF16) or int8 (default: "
      "model.json's precision, else fp32); check a model first with emoserve-train eval "
      "--precision")
      ->check(CLI::IsMember({"fp32", "bf16", "int8"}));
  add("max-batch-size", c.max_batch_size, "Largest batch handed to the model")
      ->check(CLI::Range(1, 4096));
  add("max-queue-size", c.max_queue_size,
      "Windows waiting beyond which requests get RESOURCE_EXHAUSTED (also the most one call makes)")
      ->check(CLI::Range(1, 1000000));
  add("max-queue-delay-ms", c.max_queue_delay_ms,
      "How long a partial batch waits for more windows (0: never)")
      ->check(CLI::Range(0, 10000));
  add("feature-threads", c.feature_threads, "Feature/decoding threads (0: one per core)")
      ->check(CLI::Range(0, 1024));
  add("model-instances", c.model_instances, "Model runner threads")
      ->check(CLI::Range(1, 64));
  add("torch-threads", c.intra_op_threads,
      "LibTorch intra-op threads per model runner (0: one per core)")
      ->check(CLI::Range(0, 1024));
  add("vad-threshold-dbfs", c.vad_threshold_dbfs,
      "Default voice-activity threshold: quieter windows are silence")
      ->check(CLI::Range(-200.0, 0.0));
  add("adaptation-min-speech-seconds", c.adaptation_min_speech_seconds,
      "Speech a voice's statistics must hold before results are adapted to them "
      "(speaker-normalised models)")
      ->check(CLI::Range(0.0, 86400.0));
  add("max-message-bytes", c.max_message_bytes, "Largest gRPC message accepted")
      ->check(CLI::Range(int64_t{1024}, int64_t{2147483647}));
  add("max-unary-seconds", c.max_unary_seconds, "Longest audio one Classify call takes")
      ->check(CLI::Range(0.1, 86400.0));
  add("max-stream-seconds", c.max_stream_seconds,
      "Longest audio one stream takes (then OUT_OF_RANGE)")
      ->check(CLI::Range(0.1, 604800.0));
  add("max-chunk-bytes", c.max_chunk_bytes, "Largest audio message in a stream")
      ->check(CLI::Range(int64_t{2}, int64_t{2147483647}));
  add("min-hop-seconds", c.min_hop_seconds,
      "Smallest hop between windows a call may ask for (the model's work is 1/hop per second)")
      ->check(CLI::Range(0.0, 60.0));
  add("stream-idle-seconds", c.stream_idle_seconds,
      "A stream with no message, result or write for this long ends (DEADLINE_EXCEEDED)")
      ->check(CLI::Range(0.1, 86400.0));
  add("max-audio-memory-mb", c.max_audio_memory_mb,
      "Audio in flight (requests, decoded audio, stream buffers and windows) beyond which calls "
      "get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(1, 1 << 20));
  add("max-streams", c.max_streams, "Concurrent streams (more: RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(1, 1000000));
  add("max-health-watches", c.max_health_watches,
      "Concurrent health Watch calls (more: RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(1, 1000000));
  add("max-reflection-calls", c.max_reflection_calls,
      "Concurrent reflection calls (more: RESOURCE_EXHAUSTED)")
      ->check(CLI::Range(1, 1024));
  add("connection-guard", c.connection_guard,
      "Plaintext connections go through a relay that closes those that flood HTTP/2 control "
      "frames or resets (gRPC 1.51 has no defence of its own); off: gRPC listens itself")
      ->capture_default_str();
  add("max-connections", c.max_connections,
      "Open connections (more are closed at once; with --connection-guard)")
      ->check(CLI::Range(1, 1000000));
  add("max-resets-per-second", c.max_resets_per_second,
      "Call cancellations (RST_STREAM) one connection may send per second before it is closed, "
      "four times that for all together (with --connection-guard)")
      ->check(CLI::Range(1, 1000000));
  add("grpc-memory-mb", c.grpc_memory_mb,
      "Memory of gRPC's transport (buffers of all connections); half of it bounds the messages "
      "being received (by their declared lengths; a message that does not fit is refused with "
      "RESOURCE_EXHAUSTED, with --connection-guard); past all of it gRPC refuses new "
      "connections and cancels calls")
      ->check(CLI::Range(16, 1 << 20));
  add("max-concurrent-streams", c.max_concurrent_streams,
      "Calls open at once on one connection")
      ->check(CLI::Range(1, 1000000));
  add("handshake-timeout-seconds", c.handshake_timeout_seconds,
      "A new connection must finish its HTTP/2 (and TLS) handshake within this")
      ->check(CLI::Range(0.1, 3600.0));
  add("keepalive-seconds", c.keepalive_seconds,
      "Ping a connection after this long without activity, to find dead peers")
      ->check(CLI::Range(1.0, 86400.0));
  add("keepalive-timeout-seconds", c.keepalive_timeout_seconds,
      "Close a connection whose ping is not answered within this")
      ->check(CLI::Range(1.0, 3600.0));
  add("min-ping-interval-seconds", c.min_ping_interval_seconds,
      "Clients that ping more often get GOAWAY (too_many_pings)")
      ->check(CLI::Range(0.0, 86400.0));
  add("max-connection-idle-seconds", c.max_connection_idle_seconds,
      "Close a connection without calls after this long")
      ->check(CLI::Range(1.0, 604800.0));
  add("max-connection-age-seconds", c.max_connection_age_seconds,
      "Ask a client to reconnect (GOAWAY) after this long, so that clients rebalance across pods")
      ->check(CLI::Range(1.0, 604800.0));
  add("max-connection-age-grace-seconds", c.max_connection_age_grace_seconds,
      "How long calls open at --max-connection-age-seconds may go on")
      ->check(CLI::Range(0.0, 604800.0));
  add("grace-seconds", c.grace_seconds,
      "On SIGTERM/SIGINT: streams are flushed, calls in flight get this long, then the server "
      "exits, whatever clients do")
      ->check(CLI::Range(0.0, 3600.0));
  add("tls-cert", c.tls_cert, "PEM server certificate (enables TLS)")
      ->check(CLI::ExistingFile);
  add("tls-key", c.tls_key, "PEM private key of --tls-cert")->check(CLI::ExistingFile);
  add("tls-client-ca", c.tls_client_ca,
      "PEM CA that client certificates must chain to (enables mutual TLS)")
      ->check(CLI::ExistingFile);
  add("log-level", log_level, "debug, info, warning or error")
      ->check(CLI::IsMember({"debug", "info", "warning", "error"}));

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    result.help = app.help();
    return result;
  } catch (const CLI::ParseError& e) {
    return absl::InvalidArgumentError(e.what());
  }

  absl::StatusOr<LogLevel> level = ParseLogLevel(log_level);
  if (!level.ok()) return level.status();
  c.log_level = *level;
  if (!c.default_model.empty() && c.model_repository.empty()) {
    return absl::InvalidArgumentError("--default-model names a model of --model-repository");
  }
  if (c.tls_cert.empty() != c.tls_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert and --tls-key go together: set both for TLS, or neither");
  }
  if (!c.tls_client_ca.empty() && c.tls_cert.empty()) {
    return absl::InvalidArgumentError(
        "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)");
  }
  // Half of gRPC's memory is for messages being received, and the last
  // eighth of each budget is kept for small calls: the largest message
  // must fit in what is left.
  if ((int64_t{c.grpc_memory_mb} << 20) / 2 * 7 / 8 < c.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--grpc-memory-mb (", c.grpc_memory_mb,
        " MiB) is too small for the largest message (--max-message-bytes ", c.max_message_bytes,
        "): half of it is for messages being received, 7/8 of that for large ones"));
  }
  if ((int64_t{c.max_audio_memory_mb} << 20) * 7 / 8 < c.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-audio-memory-mb (", c.max_audio_memory_mb,
        " MiB) must hold the largest message in its 7/8 for large calls (--max-message-bytes ",
        c.max_message_bytes, ")"));
  }
  if (c.max_chunk_bytes > c.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-chunk-bytes (", c.max_chunk_bytes,
        ") is larger than --max-message-bytes (", c.max_message_bytes, ")"));
  }
  return result;
}

}  // namespace emoserve
