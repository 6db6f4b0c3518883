// StreamClassify over a WebSocket (GET /v1/stream on the HTTP port): the
// first message is the StreamingConfig as JSON text, then binary messages
// carry the audio, and a text message {"end": true} ends it (the server
// then flushes, as on a gRPC half-close). Each StreamClassifyResponse comes
// back as a JSON text message; the stream ends with a close frame, code
// 1000 when it ended OK, else 4000 + the gRPC code after a text message
// {"error": {"code", "message"}}. The session is StreamClassify's own
// (EmotionService::StreamFor): the same limits, metrics and shutdown.
#ifndef EMOSERVE_SERVER_WEBSOCKET_STREAM_H_
#define EMOSERVE_SERVER_WEBSOCKET_STREAM_H_

#include <cstdint>

#include "server/emotion_service.h"

struct mg_context;

namespace emoserve {

class WebSocketStreams {
 public:
  // Serves streams on `path` of `context`; `service` and this object must
  // outlive the context (mg_stop). A message over `max_message_bytes`
  // (assembled from its fragments) fails its stream.
  WebSocketStreams(mg_context* context, const char* path, EmotionService* service,
                   int64_t max_message_bytes);

  EmotionService* service() const { return service_; }
  int64_t max_message_bytes() const { return max_message_bytes_; }

 private:
  EmotionService* const service_;
  const int64_t max_message_bytes_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_WEBSOCKET_STREAM_H_
