#include "client/connection.h"

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "core/audio.h"

namespace emoserve::client {
namespace {

constexpr char kDefaultPort[] = "50051";

// Reads a PEM file named by a TLS flag; empty path gives empty contents.
absl::StatusOr<std::string> ReadPem(const std::string& path,
                                    absl::string_view flag) {
  if (path.empty()) return std::string();
  absl::StatusOr<std::string> pem = ReadFileBytes(path);
  if (!pem.ok()) {
    return absl::Status(pem.status().code(),
                        absl::StrCat(flag, ": ", pem.status().message()));
  }
  return pem;
}

// Why a connection failed, in a few words, with a hint.
struct ConnectionFailureReason {
  std::string reason;
  std::string hint;
};

// Nullopt when `message` is not a connection failure (the server answered).
std::optional<ConnectionFailureReason> ConnectionFailure(
    absl::string_view message, bool tls) {
  constexpr absl::string_view kCheckServer = "check --server or EMOSERVE_SERVER";
  constexpr absl::string_view kCheckTls =
      "does the server use TLS, with a certificate that --ca trusts?";
  // A server that closes the connection at once wants TLS (when we spoke
  // plaintext) or a client certificate (when we spoke TLS).
  const absl::string_view closed_hint =
      tls ? "does the server require a client certificate (--cert, --key)?"
          : "does the server expect TLS (--tls)?";
  struct Pattern {
    absl::string_view needle;
    absl::string_view reason;
    absl::string_view hint;
  };
  const Pattern patterns[] = {
      {"Connection refused", "connection refused",
       "is emoserve-server running?"},
      {"DNS resolution failed", "cannot resolve the host name", kCheckServer},
      {"Handshake", "TLS handshake failed", kCheckTls},
      {"handshake", "TLS handshake failed", kCheckTls},
      {"Socket closed", "connection closed by the server", closed_hint},
      {"Connection reset", "connection reset by the server", closed_hint},
      {"No route to host", "no route to host", kCheckServer},
      {"Network is unreachable", "network is unreachable", kCheckServer},
      {"Connection timed out", "connection timed out", kCheckServer},
  };
  for (const Pattern& pattern : patterns) {
    if (absl::StrContains(message, pattern.needle)) {
      return ConnectionFailureReason{std::string(pattern.reason),
                                     std::string(pattern.hint)};
    }
  }
  if (absl::StrContains(message, "failed to connect to all addresses")) {
    absl::string_view detail = message;
    if (size_t last = detail.rfind(": "); last != absl::string_view::npos) {
      detail = detail.substr(last + 2);
    }
    return ConnectionFailureReason{absl::AsciiStrToLower(detail),
                                   "is emoserve-server running?"};
  }
  return std::nullopt;
}

bool UsesTls(const ConnectionOptions& options) {
  return options.tls || !options.ca_path.empty() ||
         !options.cert_path.empty() || !options.key_path.empty();
}

}  // namespace

std::string NormalizeServerAddress(const std::string& server) {
  absl::string_view address = server;
  // gRPC target URIs ("dns:///host:port", "unix:/path") are left alone.
  if (absl::StrContains(address, "/")) return server;
  // "[::1]:50051" and "host:50051" carry a port; "[::1]" and "host" do not.
  // A bare IPv6 address ("::1") is taken as a host too.
  const size_t bracket = address.rfind(']');
  const size_t colon = address.rfind(':');
  const bool has_port =
      colon != absl::string_view::npos &&
      (bracket != absl::string_view::npos
           ? colon > bracket
           : address.find(':') == colon);  // exactly one colon
  if (has_port) return server;
  if (bracket == absl::string_view::npos &&
      address.find(':') != absl::string_view::npos) {
    return absl::StrCat("[", address, "]:", kDefaultPort);
  }
  return absl::StrCat(address, ":", kDefaultPort);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const ConnectionOptions& options) {
  grpc::ChannelArguments arguments;
  // Timelines of long audio can exceed gRPC's 4 MiB default.
  arguments.SetMaxReceiveMessageSize(-1);
  arguments.SetMaxSendMessageSize(-1);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (UsesTls(options)) {
    if (options.cert_path.empty() != options.key_path.empty()) {
      return absl::InvalidArgumentError(
          "--cert and --key go together (mutual TLS needs both)");
    }
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> roots = ReadPem(options.ca_path, "--ca");
    if (!roots.ok()) return roots.status();
    absl::StatusOr<std::string> cert = ReadPem(options.cert_path, "--cert");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem(options.key_path, "--key");
    if (!key.ok()) return key.status();
    ssl.pem_root_certs = *std::move(roots);
    ssl.pem_cert_chain = *std::move(cert);
    ssl.pem_private_key = *std::move(key);
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(NormalizeServerAddress(options.server),
                                   credentials, arguments);
}

std::optional<std::chrono::system_clock::time_point> CallDeadline(
    const ConnectionOptions& options, double default_seconds) {
  const double seconds = options.timeout_seconds.value_or(default_seconds);
  if (!(seconds > 0)) return std::nullopt;
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(
             std::chrono::duration<double>(seconds));
}

void SetCallDeadline(const ConnectionOptions& options, double default_seconds,
                     grpc::ClientContext* context) {
  if (auto deadline = CallDeadline(options, default_seconds)) {
    context->set_deadline(*deadline);
  }
}

std::string StatusCodeName(grpc::StatusCode code) {
  // gRPC's codes and Abseil's share their numbers and names.
  const int value = static_cast<int>(code);
  if (value < 0 || value > 16) return absl::StrCat("CODE_", value);
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(value));
}

bool IsConnectionFailure(const grpc::Status& status) {
  return status.error_code() == grpc::StatusCode::UNAVAILABLE &&
         ConnectionFailure(status.error_message(), false).has_value();
}

std::string DescribeRpcError(const grpc::Status& status,
                             const ConnectionOptions& connection) {
  const std::string address = NormalizeServerAddress(connection.server);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    if (auto failure =
            ConnectionFailure(status.error_message(), UsesTls(connection))) {
      return absl::StrCat("cannot reach server ", address, " (",
                          failure->reason, "); ", failure->hint);
    }
  }
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::StrCat("DEADLINE_EXCEEDED: no answer from ", address,
                        " before the deadline (raise --timeout?)");
  }
  std::string line = StatusCodeName(status.error_code());
  if (!status.error_message().empty()) {
    // One line, whatever the server wrote.
    absl::StrAppend(&line, ": ",
                    absl::StrReplaceAll(status.error_message(),
                                        {{"\r\n", " "}, {"\n", " "}}));
  }
  return line;
}

}  // namespace emoserve::client
