// The HTTP front door's reading of client bytes: request heads in pieces of
// any size, bodies skipped by Content-Length, chunked bodies and oversized
// heads refused with their HTTP status, WebSocket frames over the limit
// refused from their header alone.
#include "server/http_request_reader.h"

#include <string>

#include <gtest/gtest.h>

namespace emoserve {
namespace {

HttpReaderLimits Limits() {
  HttpReaderLimits limits;
  limits.max_head_bytes = 256;
  limits.max_frame_bytes = 1000;
  return limits;
}

// Feeds `bytes` in pieces of `piece` bytes; the first refusal, if any.
std::optional<HttpRequestReader::Refusal> FeedInPieces(HttpRequestReader& reader,
                                                       const std::string& bytes, size_t piece) {
  for (size_t at = 0; at < bytes.size(); at += piece) {
    if (auto refused = reader.Feed(absl::string_view(bytes).substr(at, piece))) return refused;
  }
  return std::nullopt;
}

// A client-to-server WebSocket frame header (masked) for `length` bytes.
std::string FrameHeader(uint64_t length) {
  std::string header = {static_cast<char>(0x82)};
  if (length < 126) {
    header += static_cast<char>(0x80 | length);
  } else if (length <= 0xffff) {
    header += static_cast<char>(0x80 | 126);
    header += static_cast<char>(length >> 8);
    header += static_cast<char>(length & 0xff);
  } else {
    header += static_cast<char>(0x80 | 127);
    for (int i = 7; i >= 0; --i) header += static_cast<char>((length >> (8 * i)) & 0xff);
  }
  return header + "mask";
}

const char kUpgrade[] =
    "GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";

TEST(HttpRequestReaderTest, RequestsWithBodiesPassInPiecesOfAnySize) {
  const std::string body(300, 'b');  // longer than a head may be: skipped, not kept
  const std::string requests =
      "POST /v1/classify HTTP/1.1\r\nContent-Length: 300\r\n\r\n" + body +
      "GET /readyz HTTP/1.1\r\n\r\n" + "POST /x HTTP/1.1\r\ncontent-length:  0 \r\n\r\n";
  for (size_t piece : {size_t{1}, size_t{3}, size_t{64}, requests.size()}) {
    HttpRequestReader reader(Limits());
    EXPECT_FALSE(FeedInPieces(reader, requests, piece).has_value()) << piece;
    EXPECT_FALSE(reader.in_websocket());
    EXPECT_FALSE(reader.in_body());
    EXPECT_EQ(reader.heads(), 3);
  }
  HttpRequestReader reader(Limits());
  EXPECT_FALSE(reader.Feed("POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab").has_value());
  EXPECT_TRUE(reader.in_body());  // an answer now would be an early one
  EXPECT_FALSE(reader.Feed("cd").has_value());
  EXPECT_FALSE(reader.in_body());
}

TEST(HttpRequestReaderTest, OversizedHeadsChunkedBodiesAndBadLengthsAreRefused) {
  HttpRequestReader long_head(Limits());
  auto refused = long_head.Feed("GET / HTTP/1.1\r\nX: " + std::string(300, 'x'));
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->http_status, 431);

  HttpRequestReader chunked(Limits());
  refused = chunked.Feed("POST /v1/classify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->http_status, 411);

  for (const char* length : {"-1", "12x", "1, 2"}) {
    HttpRequestReader reader(Limits());
    refused = reader.Feed(std::string("POST / HTTP/1.1\r\nContent-Length: ") + length + "\r\n\r\n");
    ASSERT_TRUE(refused.has_value()) << length;
    EXPECT_EQ(refused->http_status, 400);
  }
  HttpRequestReader twice(Limits());
  refused = twice.Feed("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n");
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->http_status, 400);
}

TEST(HttpRequestReaderTest, WebSocketFramesUpToTheLimitPassAndLargerOnesAreRefusedByTheirHeader) {
  std::string frames = kUpgrade;
  for (uint64_t length : {0, 5, 125, 126, 1000}) {
    frames += FrameHeader(length) + std::string(length, 'a');
  }
  for (size_t piece : {size_t{1}, size_t{7}, frames.size()}) {
    HttpRequestReader reader(Limits());
    EXPECT_FALSE(FeedInPieces(reader, frames, piece).has_value()) << piece;
    EXPECT_TRUE(reader.in_websocket());
  }
  for (uint64_t length : {uint64_t{1001}, uint64_t{70000}, uint64_t{1} << 40, ~uint64_t{0}}) {
    HttpRequestReader reader(Limits());
    auto refused = FeedInPieces(reader, kUpgrade + FrameHeader(length), 1);
    ASSERT_TRUE(refused.has_value()) << length;
    EXPECT_EQ(refused->http_status, 0);  // within a WebSocket: closed, not answered
    EXPECT_EQ(refused->status.code(), absl::StatusCode::kResourceExhausted);
  }
}

}  // namespace
}  // namespace emoserve
