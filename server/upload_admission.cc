#include "server/upload_admission.h"

#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace emoserve {
namespace {

// RST_STREAM error codes (RFC 9113, section 7).
constexpr uint32_t kNoError = 0x0;
constexpr uint32_t kCancel = 0x8;
// gRPC's status codes.
constexpr absl::string_view kGrpcCancelled = "1";
constexpr int kResourceExhausted = 8;
constexpr absl::string_view kGrpcUnavailable = "14";
// The largest trailers held to be checked for a cancellation: gRPC's are
// under 100 bytes.
constexpr uint32_t kMaxHeldTrailers = 1024;

void AppendFrameHeader(uint32_t length, uint8_t type, uint8_t flags, uint32_t stream,
                       std::string* out) {
  const char header[9] = {
      static_cast<char>(length >> 16), static_cast<char>(length >> 8),
      static_cast<char>(length),       static_cast<char>(type),
      static_cast<char>(flags),        static_cast<char>((stream >> 24) & 0x7f),
      static_cast<char>(stream >> 16), static_cast<char>(stream >> 8),
      static_cast<char>(stream)};
  out->append(header, sizeof(header));
}

void AppendUint32(uint32_t value, std::string* out) {
  const char bytes[4] = {static_cast<char>(value >> 24), static_cast<char>(value >> 16),
                         static_cast<char>(value >> 8), static_cast<char>(value)};
  out->append(bytes, sizeof(bytes));
}

void AppendRstStream(uint32_t stream, uint32_t error_code, std::string* out) {
  AppendFrameHeader(4, kHttp2RstStream, 0, stream, out);
  AppendUint32(error_code, out);
}

// An HPACK string (RFC 7541, 5.2), not Huffman-coded.
void AppendHpackString(absl::string_view text, std::string* out) {
  size_t length = text.size();
  if (length < 127) {
    out->push_back(static_cast<char>(length));
  } else {
    out->push_back(static_cast<char>(127));
    length -= 127;
    while (length >= 128) {
      out->push_back(static_cast<char>(0x80 | (length & 0x7f)));
      length >>= 7;
    }
    out->push_back(static_cast<char>(length));
  }
  out->append(text.data(), text.size());
}

// "Literal Header Field without Indexing, New Name" (RFC 7541, 6.2.2): it
// leaves the client's dynamic table alone, so gRPC's own header
// compression stays in step with the client.
void AppendHpackLiteral(absl::string_view name, absl::string_view value, std::string* out) {
  out->push_back(0);
  AppendHpackString(name, out);
  AppendHpackString(value, out);
}

// grpc-message is percent-encoded (gRPC's PROTOCOL-HTTP2.md).
std::string PercentEncode(absl::string_view text) {
  std::string encoded;
  for (unsigned char c : text) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      encoded.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&encoded, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return encoded;
}

// The fields of a header block written only with literals without
// indexing, new name, not Huffman-coded (RFC 7541, 6.2.2, lengths under
// 127): how gRPC 1.51 writes the trailers of a call it cancels before
// answering. Anything else: nullopt.
std::optional<std::vector<std::pair<std::string, std::string>>> PlainLiterals(
    absl::string_view block) {
  std::vector<std::pair<std::string, std::string>> fields;
  const auto read_string = [&block](std::string* out) {
    if (block.empty() || static_cast<unsigned char>(block[0]) >= 127) return false;
    const size_t length = static_cast<unsigned char>(block[0]);
    if (block.size() < 1 + length) return false;
    out->assign(block.data() + 1, length);
    block.remove_prefix(1 + length);
    return true;
  };
  while (!block.empty()) {
    if (block[0] != 0) return std::nullopt;
    block.remove_prefix(1);
    std::pair<std::string, std::string> field;
    if (!read_string(&field.first) || !read_string(&field.second)) return std::nullopt;
    fields.push_back(std::move(field));
  }
  return fields;
}

// gRPC's trailers-only CANCELLED, as UNAVAILABLE saying why; nullopt when
// `frame` (header and block) is anything else.
std::optional<std::string> CancellationAsUnavailable(absl::string_view frame) {
  std::optional<std::vector<std::pair<std::string, std::string>>> fields =
      PlainLiterals(frame.substr(9));
  if (!fields.has_value()) return std::nullopt;
  bool cancelled = false;
  std::string block;
  for (const auto& [name, value] : *fields) {
    if (name == "grpc-status") {
      cancelled = value == kGrpcCancelled;
      AppendHpackLiteral(name, kGrpcUnavailable, &block);
    } else if (name == "grpc-message") {
      AppendHpackLiteral(name,
                         PercentEncode("the server is shutting down and did not start the "
                                       "call; send it again (to another instance)"),
                         &block);
    } else {
      AppendHpackLiteral(name, value, &block);
    }
  }
  if (!cancelled) return std::nullopt;
  std::string rewritten(frame.data(), 9);
  rewritten[0] = static_cast<char>(block.size() >> 16);
  rewritten[1] = static_cast<char>(block.size() >> 8);
  rewritten[2] = static_cast<char>(block.size());
  return rewritten + block;
}

// Ends a call on the server's behalf: its trailers (a trailers-only
// response when gRPC has not answered yet), then RST_STREAM NO_ERROR so
// that the client stops sending (RFC 9113, 8.1).
void AppendRefusal(uint32_t stream, bool answered, const absl::Status& why, std::string* out) {
  std::string block;
  if (!answered) {
    AppendHpackLiteral(":status", "200", &block);
    AppendHpackLiteral("content-type", "application/grpc", &block);
  }
  AppendHpackLiteral("grpc-status", absl::StrCat(kResourceExhausted), &block);
  AppendHpackLiteral("grpc-message", PercentEncode(why.message()), &block);
  AppendFrameHeader(static_cast<uint32_t>(block.size()), kHttp2Headers,
                    kHttp2EndStream | kHttp2EndHeaders, stream, out);
  out->append(block);
  AppendRstStream(stream, kNoError, out);
}

}  // namespace

struct UploadAdmission::Upload {
  explicit Upload(MemoryBudget* budget) : lease(budget) {}
  BudgetLease lease;  // the declared length of the message being received
  unsigned char prefix[5];
  size_t prefix_have = 0;
  uint64_t message_left = 0;
};

UploadAdmission::UploadAdmission(MemoryBudget* budget) : budget_(budget) {}
UploadAdmission::~UploadAdmission() = default;

bool UploadAdmission::FromClient(absl::string_view bytes, std::string* to_server) {
  from_client_.Feed(bytes, [&](const Http2FrameReader::Piece& piece) {
    OnClientPiece(piece, to_server);
  });
  return !too_many_refused_;
}

void UploadAdmission::OnClientPiece(const Http2FrameReader::Piece& piece,
                                    std::string* to_server) {
  if (piece.part == Http2FrameReader::Part::kPreface) {
    to_server->append(piece.bytes.data(), piece.bytes.size());
    return;
  }
  const Http2FrameHeader& frame = *piece.frame;
  if (piece.part == Http2FrameReader::Part::kHeader) {
    pad_ = 0;
    dropping_ = frame.type == kHttp2Data && refused_streams_.contains(frame.stream);
    if (dropping_) {
      window_credit_ += frame.length;  // the client's connection window, given back
    } else {
      to_server->append(piece.bytes.data(), piece.bytes.size());
    }
    // A new stream: its HEADERS. Client streams are odd and only increase.
    if (frame.type == kHttp2Headers && frame.stream % 2 == 1 &&
        frame.stream > last_client_stream_) {
      last_client_stream_ = frame.stream;
      uploads_[frame.stream] = std::make_unique<Upload>(budget_);
      unanswered_.insert(frame.stream);
    }
  } else if (!dropping_) {
    to_server->append(piece.bytes.data(), piece.bytes.size());
    auto it = uploads_.find(frame.stream);
    if (frame.type == kHttp2Data && it != uploads_.end()) {
      // The data between the pad length and the padding.
      absl::string_view data = piece.bytes;
      uint32_t offset = piece.offset;
      if ((frame.flags & kHttp2Padded) != 0 && offset == 0) {
        pad_ = static_cast<uint8_t>(data[0]);
        data.remove_prefix(1);
        offset = 1;
      }
      const uint32_t data_end = frame.length > pad_ ? frame.length - pad_ : 0;
      if (offset < data_end) {
        data = data.substr(0, data_end - offset);
        ReadMessages(frame.stream, *it->second, data);
      }
    }
  }
  if (!piece.frame_ends) return;
  const bool client_ends =
      ((frame.type == kHttp2Data || frame.type == kHttp2Headers) &&
       (frame.flags & kHttp2EndStream) != 0) ||
      frame.type == kHttp2RstStream;
  if (client_ends) {
    uploads_.erase(frame.stream);
    refused_streams_.erase(frame.stream);
    if (frame.type == kHttp2RstStream) {
      answered_.erase(frame.stream);
      unanswered_.erase(frame.stream);
    }
  }
  to_server->append(to_server_after_frame_);
  to_server_after_frame_.clear();
}

void UploadAdmission::ReadMessages(uint32_t stream, Upload& upload, absl::string_view data) {
  while (!data.empty()) {
    if (upload.message_left > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(upload.message_left, data.size()));
      upload.message_left -= n;
      data.remove_prefix(n);
      // Arrived: gRPC hands it to the service, whose own budgets take over.
      if (upload.message_left == 0) upload.lease.Shrink(upload.lease.bytes());
      continue;
    }
    const size_t n = std::min(sizeof(upload.prefix) - upload.prefix_have, data.size());
    std::memcpy(upload.prefix + upload.prefix_have, data.data(), n);
    upload.prefix_have += n;
    data.remove_prefix(n);
    if (upload.prefix_have < sizeof(upload.prefix)) return;
    upload.prefix_have = 0;
    const unsigned char* p = upload.prefix;
    upload.message_left = (uint64_t{p[1]} << 24) | (uint64_t{p[2]} << 16) |
                          (uint64_t{p[3]} << 8) | p[4];
    if (absl::Status admitted = upload.lease.Grow(static_cast<int64_t>(upload.message_left));
        !admitted.ok()) {
      Refuse(stream, admitted);  // destroys `upload`
      return;
    }
  }
}

void UploadAdmission::Refuse(uint32_t stream, const absl::Status& why) {
  uploads_.erase(stream);
  if (refused_streams_.size() >= kMaxRefusedStreams) {
    too_many_refused_ = true;
    return;
  }
  refused_streams_.insert(stream);
  ++refused_;
  AppendRstStream(stream, kCancel, &to_server_after_frame_);
  AppendRefusal(stream, answered_.contains(stream), why, &to_client_pending_);
  answered_.erase(stream);
  unanswered_.erase(stream);
}

void UploadAdmission::FromServer(absl::string_view bytes, bool shutting_down,
                                 std::string* to_client) {
  from_server_.Feed(bytes, [&](const Http2FrameReader::Piece& piece) {
    if (piece.part == Http2FrameReader::Part::kHeader) {
      const Http2FrameHeader& frame = *piece.frame;
      holding_ = shutting_down && frame.type == kHttp2Headers &&
                 (frame.flags & (kHttp2EndStream | kHttp2EndHeaders | kHttp2Padded)) ==
                     (kHttp2EndStream | kHttp2EndHeaders) &&
                 frame.length <= kMaxHeldTrailers && unanswered_.contains(frame.stream);
      OnServerFrame(frame);
    }
    if (holding_) {
      held_.append(piece.bytes.data(), piece.bytes.size());
    } else {
      to_client->append(piece.bytes.data(), piece.bytes.size());
    }
    if (piece.frame_ends) {
      if (holding_) {
        std::optional<std::string> unavailable = CancellationAsUnavailable(held_);
        to_client->append(unavailable.has_value() ? *unavailable : held_);
        held_.clear();
        holding_ = false;
      }
      server_started_ = true;
      FlushToClient(to_client);
    }
  });
}

void UploadAdmission::OnServerFrame(const Http2FrameHeader& frame) {
  const bool server_ends = (frame.type == kHttp2Headers && (frame.flags & kHttp2EndStream) != 0) ||
                           frame.type == kHttp2RstStream;
  if (frame.type == kHttp2Headers || frame.type == kHttp2RstStream) {
    unanswered_.erase(frame.stream);
  }
  if (server_ends) {
    // gRPC ended the call (it may have refused it early): nothing more of
    // it reaches the service.
    uploads_.erase(frame.stream);
    answered_.erase(frame.stream);
  } else if (frame.type == kHttp2Headers && uploads_.contains(frame.stream)) {
    answered_.insert(frame.stream);
  }
}

void UploadAdmission::FlushToClient(std::string* to_client) {
  if (!server_started_ || !from_server_.at_boundary()) return;
  while (window_credit_ > 0) {
    const uint32_t increment =
        static_cast<uint32_t>(std::min<uint64_t>(window_credit_, 0x7fffffff));
    AppendFrameHeader(4, kHttp2WindowUpdate, 0, 0, to_client);
    AppendUint32(increment, to_client);
    window_credit_ -= increment;
  }
  to_client->append(to_client_pending_);
  to_client_pending_.clear();
}

}  // namespace emoserve
