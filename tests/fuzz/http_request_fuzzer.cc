// libFuzzer: the HTTP front door's reading of client bytes (request heads,
// bodies, WebSocket frame headers) on anything. The input is a sequence of
// chunks, each a length byte and its bytes, fed as they would arrive. The
// reader must never crash, and once it refuses, a refusal says why.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "absl/strings/string_view.h"
#include "server/http_request_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  emoserve::HttpReaderLimits limits;
  limits.max_head_bytes = 512;  // small, so that limits are reached
  limits.max_frame_bytes = 4096;
  emoserve::HttpRequestReader reader(limits);
  size_t at = 0;
  while (at < size) {
    const size_t length = std::min<size_t>(data[at++], size - at);
    const absl::string_view chunk(reinterpret_cast<const char*>(data + at), length);
    at += length;
    if (auto refused = reader.Feed(chunk)) {
      if (refused->status.ok() || refused->status.message().empty()) std::abort();
      if (refused->http_status != 0 && reader.in_websocket()) std::abort();
      break;
    }
  }
  return 0;
}
