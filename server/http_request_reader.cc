#include "server/http_request_reader.h"

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace emoserve {
namespace {

HttpRequestReader::Refusal Refuse(int http_status, absl::Status status) {
  return {http_status, std::move(status)};
}

}  // namespace

HttpRequestReader::HttpRequestReader(const HttpReaderLimits& limits)
    : max_head_bytes_(limits.max_head_bytes), max_frame_bytes_(limits.max_frame_bytes) {}

std::optional<HttpRequestReader::Refusal> HttpRequestReader::Feed(absl::string_view bytes) {
  while (!bytes.empty()) {
    switch (part_) {
      case Part::kHead: {
        const size_t before = head_.size();
        // At most the limit and the 4 bytes that end a head.
        const size_t take =
            std::min(bytes.size(), static_cast<size_t>(max_head_bytes_) + 4 - before);
        head_.append(bytes.data(), take);
        // The end may straddle pieces: look from just before this one.
        const size_t end = head_.find("\r\n\r\n", before < 3 ? 0 : before - 3);
        if (end == std::string::npos) {
          if (static_cast<int64_t>(head_.size()) > max_head_bytes_) {
            return Refuse(431, absl::InvalidArgumentError(absl::StrCat(
                                   "the request's headers are over ", max_head_bytes_, " bytes")));
          }
          bytes.remove_prefix(take);
          break;
        }
        bytes.remove_prefix(end + 4 - before);
        head_.resize(end + 4);
        if (std::optional<Refusal> refused = OnHead()) return refused;
        head_.clear();
        break;
      }
      case Part::kBody: {
        const int64_t take = std::min<int64_t>(body_left_, static_cast<int64_t>(bytes.size()));
        body_left_ -= take;
        bytes.remove_prefix(static_cast<size_t>(take));
        if (body_left_ == 0) part_ = Part::kHead;
        break;
      }
      case Part::kWebSocket: {
        if (payload_left_ > 0) {
          const int64_t take = std::min<int64_t>(payload_left_, static_cast<int64_t>(bytes.size()));
          payload_left_ -= take;
          bytes.remove_prefix(static_cast<size_t>(take));
          break;
        }
        // A frame header: 2 bytes, an extended length of 2 or 8, a mask of 4.
        frame_header_.push_back(bytes.front());
        bytes.remove_prefix(1);
        if (std::optional<Refusal> refused = OnFrameHeader()) return refused;
        break;
      }
    }
  }
  return std::nullopt;
}

std::optional<HttpRequestReader::Refusal> HttpRequestReader::OnHead() {
  ++heads_;
  int64_t content_length = 0;
  bool has_length = false;
  upgrade_ = false;
  std::vector<absl::string_view> lines = absl::StrSplit(head_, "\r\n");
  for (size_t i = 1; i < lines.size(); ++i) {
    const size_t colon = lines[i].find(':');
    if (colon == absl::string_view::npos) continue;
    const absl::string_view name = absl::StripAsciiWhitespace(lines[i].substr(0, colon));
    const absl::string_view value = absl::StripAsciiWhitespace(lines[i].substr(colon + 1));
    if (absl::EqualsIgnoreCase(name, "Content-Length")) {
      int64_t length = 0;
      if (has_length || !absl::SimpleAtoi(value, &length) || length < 0) {
        return Refuse(400, absl::InvalidArgumentError("a bad or repeated Content-Length"));
      }
      has_length = true;
      content_length = length;
    } else if (absl::EqualsIgnoreCase(name, "Transfer-Encoding")) {
      // Chunked bodies are not taken (a classify body is charged before it
      // is read, so its size must be known); refusing them here also keeps
      // this reader in step with the requests.
      return Refuse(411, absl::InvalidArgumentError(
                             "send the body with a Content-Length (chunked uploads are not taken)"));
    } else if (absl::EqualsIgnoreCase(name, "Upgrade") &&
               absl::EqualsIgnoreCase(value, "websocket")) {
      upgrade_ = true;
    }
  }
  if (upgrade_) {
    // Civetweb answers 101 and the connection carries frames from here on
    // (a refused upgrade is answered with an error and the client closes).
    part_ = Part::kWebSocket;
  } else if (content_length > 0) {
    part_ = Part::kBody;
    body_left_ = content_length;
  }
  return std::nullopt;
}

std::optional<HttpRequestReader::Refusal> HttpRequestReader::OnFrameHeader() {
  const auto byte = [this](size_t i) { return static_cast<uint8_t>(frame_header_[i]); };
  if (frame_header_.size() < 2) return std::nullopt;
  const int length7 = byte(1) & 0x7f;
  const size_t length_bytes = length7 == 126 ? 2 : length7 == 127 ? 8 : 0;
  const size_t mask_bytes = (byte(1) & 0x80) != 0 ? 4 : 0;
  if (frame_header_.size() < 2 + length_bytes + mask_bytes) return std::nullopt;
  uint64_t length = static_cast<uint64_t>(length7);
  if (length_bytes > 0) {
    length = 0;
    for (size_t i = 0; i < length_bytes; ++i) length = (length << 8) | byte(2 + i);
  }
  frame_header_.clear();
  if (length > static_cast<uint64_t>(max_frame_bytes_)) {
    return Refuse(0, absl::ResourceExhaustedError(
                         absl::StrCat("a WebSocket frame of ", length, " bytes is over ",
                                      max_frame_bytes_, " (--max-chunk-bytes + 128 KiB)")));
  }
  payload_left_ = static_cast<int64_t>(length);
  return std::nullopt;
}

}  // namespace emoserve
