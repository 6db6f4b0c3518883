// HTTP/JSON beside gRPC, on its own port (civetweb, already in the process
// through prometheus-cpp): POST /v1/classify, GET /v1/model, GET /v1/models,
// GET /healthz and GET /readyz. Calls go through the same EmotionService
// code as gRPC (admission, limits, budget, metrics); responses are the
// proto's canonical JSON, errors {"error": {"code", "message"}} with the
// gRPC code's name and the matching HTTP status. Plaintext only: Debian
// 12's civetweb (1.15) crashes on TLS with OpenSSL 3 (it looks up
// SSL_get_peer_certificate, which OpenSSL 3 no longer exports), so a server
// configured for TLS does not serve HTTP (see Server::Start).
#ifndef EMOSERVE_SERVER_HTTP_SERVER_H_
#define EMOSERVE_SERVER_HTTP_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/emotion_service.h"
#include "server/websocket_stream.h"

struct mg_context;
struct mg_connection;
namespace google::protobuf {
class Message;
}

namespace emoserve {

struct HttpOptions {
  std::string host = "0.0.0.0";
  int port = 8080;
  // Connections served at once (a thread each); others wait in the
  // listen queue.
  int threads = 16;
  // Largest request body (the audio of a classify call).
  int64_t max_body_bytes = 32 << 20;
  // Largest WebSocket stream message (audio up to --max-chunk-bytes, a
  // config); a larger one ends its stream.
  int64_t max_stream_message_bytes = 128 << 10;
  // A request's headers and body must arrive within this.
  int request_timeout_ms = 30000;
  // A WebSocket client that sends nothing for this long is disconnected
  // (the stream's own idle limit, --stream-idle-seconds, ends it first).
  int websocket_timeout_ms = 60000;
  // A classify call's deadline unless the request sets ?timeout_seconds=.
  double default_timeout_seconds = 120.0;
};

// The HTTP status for a gRPC status code (400, 404, 413, 429, 503, 504...).
int HttpStatusFor(absl::StatusCode code);
// {"error": {"code": "NOT_FOUND", "message": "..."}}: the gRPC code's name
// and the status's message.
std::string ErrorJson(const absl::Status& status);
// The proto's canonical JSON, every field (defaults too).
absl::StatusOr<std::string> MessageJson(const google::protobuf::Message& message);

class HttpServer {
 public:
  // Listens on options.host:options.port. `ready` says whether the server
  // is SERVING (for /readyz). `service` must outlive the HTTP server.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpOptions& options,
                                                           EmotionService* service,
                                                           std::function<bool()> ready);
  // Waits until no request is being handled (their calls are over, their
  // answers written), or until `deadline`. For shutdown: the service
  // refuses new calls first, so requests still arriving get 503 quickly.
  bool WaitUntilIdle(absl::Time deadline);
  // Stops listening and closes every connection (an answer still being
  // written is cut: WaitUntilIdle first).
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }

 private:
  HttpServer(const HttpOptions& options, EmotionService* service, std::function<bool()> ready);
  static int Handle(mg_connection* connection, void* self);
  void HandleRequest(mg_connection* connection);
  void Classify(mg_connection* connection, const std::string& query, int64_t content_length);

  const HttpOptions options_;
  EmotionService* const service_;
  const std::function<bool()> ready_;
  mg_context* context_ = nullptr;
  int port_ = 0;
  std::unique_ptr<WebSocketStreams> streams_;
  absl::Mutex mu_;
  int handling_ ABSL_GUARDED_BY(mu_) = 0;  // requests in HandleRequest
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_HTTP_SERVER_H_
