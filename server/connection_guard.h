// The server's front door for plaintext gRPC: it accepts TCP connections
// itself, hands gRPC one end of a socket pair for each, and relays the
// bytes, reading the frame headers of what clients send. A connection that
// floods frames gRPC 1.51 cannot absorb (RST_STREAM right after HEADERS,
// the "rapid reset" that grows its memory without bound; SETTINGS,
// PRIORITY or unknown frames by the thousand) is closed, and connections
// are counted and bounded. TLS connections go to gRPC directly (the bytes
// are encrypted); see docs/limits.md.
#ifndef EMOSERVE_SERVER_CONNECTION_GUARD_H_
#define EMOSERVE_SERVER_CONNECTION_GUARD_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/upload_admission.h"

namespace emoserve {

struct ConnectionGuardOptions {
  int max_connections = 1024;
  // RST_STREAM frames a connection may send per second (and in one burst),
  // and all connections together.
  int max_resets_per_second = 1000;
  int max_total_resets_per_second = 4000;
  // SETTINGS, PRIORITY, PING and frames of unknown types per second.
  int max_control_frames_per_second = 256;
  // A connection must send the HTTP/2 preface within this.
  absl::Duration preface_timeout = absl::Seconds(10);
  // The gRPC messages all clients are sending at once, by their declared
  // lengths (see upload_admission.h); the last eighth is kept for small
  // messages. 0: no limit.
  int64_t max_upload_bytes = 128 << 20;
};

// A rate of events with a burst as large as a second's worth.
class TokenBucket {
 public:
  explicit TokenBucket(double per_second);
  // Takes one event; false when over the rate.
  bool Take(absl::Time now);

 private:
  double per_second_;
  double tokens_;
  absl::Time last_;
};

// Reads a client's side of an HTTP/2 connection (the preface, then 9-byte
// frame headers, skipping payloads), in pieces of any size.
class Http2FrameCounter {
 public:
  Http2FrameCounter(const ConnectionGuardOptions& options, TokenBucket* total_resets);

  // The reason to close the connection, once a limit is broken.
  std::optional<std::string> Feed(absl::string_view bytes, absl::Time now);
  int64_t frames() const { return frames_; }
  bool saw_preface() const { return reader_.saw_preface(); }

 private:
  std::optional<std::string> OnFrame(uint8_t type, absl::Time now);

  Http2FrameReader reader_{true};
  int64_t frames_ = 0;
  TokenBucket resets_;
  TokenBucket control_;
  TokenBucket* total_resets_;
};

class ConnectionGuard {
 public:
  struct Observer {
    // Connections open, after each change.
    std::function<void(int)> on_connections;
    // A connection closed by a limit: the reason ("rapid_reset",
    // "control_flood", "max_connections", "no_preface", "refused_uploads").
    std::function<void(absl::string_view reason)> on_refused;
    // Messages refused by max_upload_bytes.
    std::function<void(int count)> on_uploads_refused;
    // The bytes of uploads admitted, after each change (any thread).
    std::function<void(int64_t)> on_upload_memory;
  };

  // Listens on host:port (0: any free port) and passes gRPC's end of each
  // connection's socket pair to `attach` (which owns it from then on).
  static absl::StatusOr<std::unique_ptr<ConnectionGuard>> Start(
      const std::string& host, int port, const ConnectionGuardOptions& options,
      std::function<void(int fd)> attach, Observer observer = {});
  // Closes the listener and every connection.
  ~ConnectionGuard();
  ConnectionGuard(const ConnectionGuard&) = delete;
  ConnectionGuard& operator=(const ConnectionGuard&) = delete;

  int port() const;

  // Called once the service has ended every call it took, before gRPC
  // shuts down: gRPC then cancels the calls whose request was still
  // arriving, which never reached the service, and their clients are told
  // UNAVAILABLE (safe to send elsewhere) instead of CANCELLED (see
  // UploadAdmission::FromServer).
  void EnterShutdown();

 private:
  struct Impl;
  explicit ConnectionGuard(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_CONNECTION_GUARD_H_
