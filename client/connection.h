// How the CLI reaches the server: address, deadline, TLS, and one-line
// descriptions of failed calls.
#ifndef EMOSERVE_CLIENT_CONNECTION_H_
#define EMOSERVE_CLIENT_CONNECTION_H_

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"

namespace emoserve::client {

inline constexpr char kDefaultServer[] = "localhost:50051";

struct ConnectionOptions {
  // host:port; a bare host gets the default port 50051.
  std::string server = kDefaultServer;
  // Per-call deadline; nullopt means the command's own default.
  std::optional<double> timeout_seconds;
  bool tls = false;
  std::string ca_path;    // PEM roots (system roots when empty)
  std::string cert_path;  // PEM client certificate (mutual TLS)
  std::string key_path;   // PEM client key (mutual TLS)
};

// `server` with the default port appended when it names none.
std::string NormalizeServerAddress(const std::string& server);

// A channel to options.server, over TLS when options.tls (or any of the
// certificate paths) is set. Fails only when a certificate file cannot be
// read; the connection itself is made lazily by the first call.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ConnectionOptions& options);

// The deadline for a call that starts now: options.timeout_seconds, or
// `default_seconds` when unset; none when the result is <= 0.
std::optional<std::chrono::system_clock::time_point> CallDeadline(
    const ConnectionOptions& options, double default_seconds);

// Applies CallDeadline to `context`.
void SetCallDeadline(const ConnectionOptions& options, double default_seconds,
                     grpc::ClientContext* context);

// "INVALID_ARGUMENT", "UNAVAILABLE", ... for a gRPC status code.
std::string StatusCodeName(grpc::StatusCode code);

// True when the call failed because the server could not be reached (as
// opposed to the server's own verdict).
bool IsConnectionFailure(const grpc::Status& status);

// One line for a failed call, without gRPC's internals: an unreachable
// server reads "cannot reach server HOST:PORT (connection refused); is
// emoserve-server running?", anything else "CODE: message".
std::string DescribeRpcError(const grpc::Status& status,
                             const ConnectionOptions& connection);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_CONNECTION_H_
