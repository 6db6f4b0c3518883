// Admission of the messages clients upload, at the HTTP/2 level. gRPC 1.51
// opens a call's flow-control window to the whole message once it starts
// receiving it, for every call at once: 40 calls of 32 MiB on one
// connection hold 1.3 GB in gRPC's buffers before any reaches the service,
// and gRPC's memory quota then cancels streams at random, well-behaved ones
// included. The connection guard reads each gRPC message's 5-byte length
// prefix and charges the declared length to a server-wide budget until the
// message has arrived. A message that does not fit ends its call with
// RESOURCE_EXHAUSTED at once: the guard answers the client with trailers of
// its own, resets the stream towards gRPC and drops the rest of its data
// (crediting the client's connection window for it).
#ifndef EMOSERVE_SERVER_UPLOAD_ADMISSION_H_
#define EMOSERVE_SERVER_UPLOAD_ADMISSION_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "core/memory_budget.h"

namespace emoserve {

// HTTP/2 frame types and flags (RFC 9113, section 6).
inline constexpr uint8_t kHttp2Data = 0x0;
inline constexpr uint8_t kHttp2Headers = 0x1;
inline constexpr uint8_t kHttp2Priority = 0x2;
inline constexpr uint8_t kHttp2RstStream = 0x3;
inline constexpr uint8_t kHttp2Settings = 0x4;
inline constexpr uint8_t kHttp2Ping = 0x6;
inline constexpr uint8_t kHttp2WindowUpdate = 0x8;
inline constexpr uint8_t kHttp2Continuation = 0x9;
inline constexpr uint8_t kHttp2EndStream = 0x1;
inline constexpr uint8_t kHttp2EndHeaders = 0x4;
inline constexpr uint8_t kHttp2Padded = 0x8;

struct Http2FrameHeader {
  uint32_t length = 0;
  uint8_t type = 0;
  uint8_t flags = 0;
  uint32_t stream = 0;
};

// Splits one direction of an HTTP/2 connection into frames, from pieces of
// any size. The client's direction starts with the 24-byte preface.
class Http2FrameReader {
 public:
  enum class Part { kPreface, kHeader, kPayload };
  struct Piece {
    Part part;
    absl::string_view bytes;
    const Http2FrameHeader* frame;  // null for the preface
    uint32_t offset;                // of `bytes` in the frame's payload
    bool frame_ends;                // the frame's last piece
  };

  explicit Http2FrameReader(bool client_side) : preface_left_(client_side ? 24 : 0) {}

  // Calls on_piece(const Piece&) for every piece of `bytes`, in order; a
  // frame's header is one piece (given once all 9 bytes are in).
  template <typename OnPiece>
  void Feed(absl::string_view bytes, OnPiece&& on_piece);

  // Between frames (no frame begun and not ended).
  bool at_boundary() const { return preface_left_ == 0 && header_have_ == 0 && payload_left_ == 0; }
  bool saw_preface() const { return preface_left_ == 0; }

 private:
  size_t preface_left_;
  unsigned char header_bytes_[9];
  size_t header_have_ = 0;
  Http2FrameHeader header_;
  uint32_t payload_left_ = 0;
};

// One connection's uploads. Not thread-safe (the guard's loop owns it);
// the budget is shared by all connections.
class UploadAdmission {
 public:
  // Refused streams remembered per connection; a client that keeps opening
  // streams that are refused is closed beyond this.
  static constexpr size_t kMaxRefusedStreams = 1024;

  explicit UploadAdmission(MemoryBudget* budget);
  ~UploadAdmission();
  UploadAdmission(const UploadAdmission&) = delete;
  UploadAdmission& operator=(const UploadAdmission&) = delete;

  // Client -> gRPC: appends to `to_server` what gRPC is to get. False when
  // the connection must be closed (kMaxRefusedStreams).
  bool FromClient(absl::string_view bytes, std::string* to_server);
  // gRPC -> client: appends to `to_client` what the client is to get, the
  // guard's own frames inserted between gRPC's. `shutting_down`: the
  // service has ended every call it took and gRPC is shutting down. A call
  // gRPC now cancels before answering never reached the service (gRPC 1.51
  // cancels a call whose request was still arriving when its shutdown
  // began), and its client is told UNAVAILABLE, safe to send again
  // elsewhere, instead of CANCELLED.
  void FromServer(absl::string_view bytes, bool shutting_down, std::string* to_client);
  // The guard's frames still waiting, appended when gRPC's output is
  // between frames.
  void FlushToClient(std::string* to_client);

  int64_t refused() const { return refused_; }

 private:
  struct Upload;  // one open stream's message being received
  void OnClientPiece(const Http2FrameReader::Piece& piece, std::string* to_server);
  void ReadMessages(uint32_t stream, Upload& upload, absl::string_view data);
  void Refuse(uint32_t stream, const absl::Status& why);
  void OnServerFrame(const Http2FrameHeader& frame);

  MemoryBudget* const budget_;
  Http2FrameReader from_client_{true};
  Http2FrameReader from_server_{false};
  absl::flat_hash_map<uint32_t, std::unique_ptr<Upload>> uploads_;
  absl::flat_hash_set<uint32_t> refused_streams_;
  absl::flat_hash_set<uint32_t> answered_;  // gRPC sent response headers
  // Streams the client opened that gRPC has neither answered nor reset (at
  // most gRPC's concurrent streams: it resets those beyond).
  absl::flat_hash_set<uint32_t> unanswered_;
  // gRPC's current frame, held whole: trailers that may be a cancellation
  // to rewrite (see FromServer).
  bool holding_ = false;
  std::string held_;
  uint32_t last_client_stream_ = 0;
  bool dropping_ = false;  // the current client frame is not forwarded
  uint8_t pad_ = 0;        // padding of the current DATA frame
  std::string to_server_after_frame_;
  std::string to_client_pending_;
  uint64_t window_credit_ = 0;
  bool server_started_ = false;  // gRPC's first frame (SETTINGS) has passed
  int64_t refused_ = 0;
  bool too_many_refused_ = false;
};

template <typename OnPiece>
void Http2FrameReader::Feed(absl::string_view bytes, OnPiece&& on_piece) {
  while (!bytes.empty()) {
    if (preface_left_ > 0) {
      const size_t n = std::min(preface_left_, bytes.size());
      preface_left_ -= n;
      on_piece(Piece{Part::kPreface, bytes.substr(0, n), nullptr, 0, false});
      bytes.remove_prefix(n);
      continue;
    }
    if (payload_left_ > 0) {
      const size_t n = std::min<size_t>(payload_left_, bytes.size());
      const uint32_t offset = header_.length - payload_left_;
      payload_left_ -= static_cast<uint32_t>(n);
      on_piece(Piece{Part::kPayload, bytes.substr(0, n), &header_, offset, payload_left_ == 0});
      bytes.remove_prefix(n);
      continue;
    }
    const size_t n = std::min(sizeof(header_bytes_) - header_have_, bytes.size());
    std::memcpy(header_bytes_ + header_have_, bytes.data(), n);
    header_have_ += n;
    bytes.remove_prefix(n);
    if (header_have_ < sizeof(header_bytes_)) break;
    header_have_ = 0;
    const unsigned char* h = header_bytes_;
    header_.length = (uint32_t{h[0]} << 16) | (uint32_t{h[1]} << 8) | h[2];
    header_.type = h[3];
    header_.flags = h[4];
    header_.stream = ((uint32_t{h[5]} & 0x7f) << 24) | (uint32_t{h[6]} << 16) |
                     (uint32_t{h[7]} << 8) | h[8];
    payload_left_ = header_.length;
    on_piece(Piece{Part::kHeader,
                   absl::string_view(reinterpret_cast<const char*>(header_bytes_), 9), &header_,
                   0, header_.length == 0});
  }
}

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_UPLOAD_ADMISSION_H_
