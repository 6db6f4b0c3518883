// The HTTP port's front door: it accepts connections itself, terminates TLS
// when it is configured, and relays each connection to civetweb on a
// loopback port, reading what the client sends on the way. Civetweb
// allocates a WebSocket frame's whole declared length (up to 2 GiB) before
// it reads it, and Debian 12's civetweb crashes on TLS with OpenSSL 3; the
// front door refuses frames over the limit and does TLS with OpenSSL
// itself. One thread per connection, connections bounded.
#ifndef EMOSERVE_SERVER_HTTP_FRONT_DOOR_H_
#define EMOSERVE_SERVER_HTTP_FRONT_DOOR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "server/http_request_reader.h"

namespace emoserve {

struct HttpFrontDoorOptions {
  // Connections relayed at once. At the limit a new connection replaces
  // the one that has waited longest for its first request, or is closed.
  int max_connections = 256;
  // What a client may send (heads, WebSocket frames).
  HttpReaderLimits limits;
  // TLS: PEM files; an empty cert means plaintext. With a client CA,
  // clients must present a certificate it signed.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  // The TLS handshake, and then the first request's head, must each
  // arrive within this: a connection reaches civetweb (whose threads wait
  // on it) only with a whole request.
  absl::Duration handshake_timeout = absl::Seconds(10);
};

class HttpFrontDoor {
 public:
  // Listens on host:port (0: any free port) and relays to 127.0.0.1:backend_port.
  static absl::StatusOr<std::unique_ptr<HttpFrontDoor>> Start(const std::string& host, int port,
                                                              int backend_port,
                                                              const HttpFrontDoorOptions& options);
  // Closes the listener and every connection.
  ~HttpFrontDoor();
  HttpFrontDoor(const HttpFrontDoor&) = delete;
  HttpFrontDoor& operator=(const HttpFrontDoor&) = delete;

  int port() const;

 private:
  struct Impl;
  explicit HttpFrontDoor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_HTTP_FRONT_DOOR_H_
