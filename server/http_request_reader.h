// What the HTTP front door (http_front_door.h) reads of the bytes a client
// sends, without a socket: also what http_request_fuzzer runs.
#ifndef EMOSERVE_SERVER_HTTP_REQUEST_READER_H_
#define EMOSERVE_SERVER_HTTP_REQUEST_READER_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace emoserve {

struct HttpReaderLimits {
  // A request's head (request line and headers).
  int64_t max_head_bytes = 64 << 10;
  // A WebSocket frame's payload.
  int64_t max_frame_bytes = 192 << 10;
};

// Reads the client's side of an HTTP/1.1 connection in pieces of any size:
// request heads (bodies by Content-Length), then, after a WebSocket
// upgrade, frame headers. Feed says why to close the connection once a
// limit is broken: with an HTTP status to answer while in HTTP (0 within a
// WebSocket, where the connection is just closed).
class HttpRequestReader {
 public:
  struct Refusal {
    int http_status;
    absl::Status status;
  };
  explicit HttpRequestReader(const HttpReaderLimits& limits);
  std::optional<Refusal> Feed(absl::string_view bytes);
  bool in_websocket() const { return part_ == Part::kWebSocket; }
  // Within a request's body (more of it is to come).
  bool in_body() const { return part_ == Part::kBody; }
  // Request heads read whole so far.
  int64_t heads() const { return heads_; }

 private:
  enum class Part { kHead, kBody, kWebSocket };
  std::optional<Refusal> OnHead();
  std::optional<Refusal> OnFrameHeader();

  const int64_t max_head_bytes_;
  const int64_t max_frame_bytes_;
  Part part_ = Part::kHead;
  std::string head_;
  int64_t body_left_ = 0;
  bool upgrade_ = false;  // the head being read asks for a WebSocket
  std::string frame_header_;
  int64_t payload_left_ = 0;
  int64_t heads_ = 0;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_HTTP_REQUEST_READER_H_
