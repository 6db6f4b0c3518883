#include "server/websocket_stream.h"

#include <civetweb.h>

#include <deque>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>

#include <google/protobuf/util/json_util.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"
#include "server/http_server.h"

namespace emoserve {
namespace {

constexpr char kStreamMethod[] = "WebSocket /v1/stream";

// One WebSocket connection's stream. Civetweb's connection thread reads
// (OnMessage, one message at a time, waiting while the call is not ready
// for the next one, so a fast sender is paced); a writer thread of its own
// sends responses and the end, so engine threads never wait on a socket.
class WebSocketStream final : public EmotionService::StreamTransport {
 public:
  WebSocketStream(mg_connection* connection, int64_t max_message_bytes)
      : connection_(connection), max_message_bytes_(max_message_bytes) {}

  void Start(EmotionService* service) {
    writer_ = std::thread([this] { WriteLoop(); });
    // May tell Finish at once (admission refused): the writer sends it.
    EmotionService::StreamEvents* events = service->StreamFor(kStreamMethod, this);
    absl::MutexLock lock(&mu_);
    events_ = events;
  }

  // A frame from the client, on the connection's thread. False: close the
  // connection.
  bool OnFrame(int bits, const char* data, size_t size) {
    const int opcode = bits & 0x0f;
    const bool last_fragment = (bits & 0x80) != 0;
    switch (opcode) {
      case MG_WEBSOCKET_OPCODE_CONNECTION_CLOSE:
        return false;
      case MG_WEBSOCKET_OPCODE_PING:
        mg_websocket_write(connection_, MG_WEBSOCKET_OPCODE_PONG, data, size);
        return true;
      case MG_WEBSOCKET_OPCODE_PONG:
        return true;
      case MG_WEBSOCKET_OPCODE_TEXT:
      case MG_WEBSOCKET_OPCODE_BINARY:
        message_opcode_ = opcode;
        message_.clear();
        break;
      case MG_WEBSOCKET_OPCODE_CONTINUATION:
        if (message_opcode_ != 0) break;
        [[fallthrough]];
      default:
        return Deliver(absl::InvalidArgumentError("a WebSocket frame out of place"));
    }
    if (static_cast<int64_t>(message_.size() + size) > max_message_bytes_) {
      message_opcode_ = 0;
      return Deliver(absl::ResourceExhaustedError(
          absl::StrCat("a message over this server's limit of ", max_message_bytes_,
                       " bytes (--max-chunk-bytes of audio, and room for a config)")));
    }
    message_.append(data, size);
    if (!last_fragment) return true;
    const bool text = message_opcode_ == MG_WEBSOCKET_OPCODE_TEXT;
    message_opcode_ = 0;
    return Deliver(std::variant<bool, absl::Status>(text));
  }

  // The connection is closing (the client closed it, or the server
  // stops): the call is told the client left, and this waits until the
  // call is done with the transport.
  void OnClose() {
    {
      absl::MutexLock lock(&mu_);
      client_gone_ = true;
    }
    Tell([](EmotionService::StreamEvents* events) { events->Gone(); });
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
  }

  ~WebSocketStream() override {
    if (writer_.joinable()) writer_.join();
  }

  // StreamTransport: called by the call, sometimes under its lock.
  void Read(v1::StreamClassifyRequest* into) override {
    absl::MutexLock lock(&mu_);
    read_into_ = into;
  }
  void Write(const v1::StreamClassifyResponse* response) override {
    absl::MutexLock lock(&mu_);
    outgoing_.push_back(response);
  }
  void Finish(const absl::Status& outcome) override {
    absl::MutexLock lock(&mu_);
    outcome_ = outcome;
  }
  bool Cancelled() const override {
    absl::MutexLock lock(&mu_);
    return client_gone_ || cancelled_;
  }
  void Cancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }

 private:
  // Hands the message in message_ to the call once it reads: `text` says
  // whether it was a text message; a status refuses what the client sent.
  // False once the stream is over (the connection closes).
  bool Deliver(const std::variant<bool, absl::Status>& message) {
    v1::StreamClassifyRequest* into = nullptr;
    {
      absl::MutexLock lock(&mu_);
      const auto readable = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return read_into_ != nullptr || outcome_.has_value() || cancelled_;
      };
      mu_.Await(absl::Condition(&readable));
      if (read_into_ == nullptr) {
        // The call is ending: drop the message, close once the end is sent.
        mu_.Await(absl::Condition(&done_));
        return false;
      }
      into = std::exchange(read_into_, nullptr);
    }
    absl::Status refused;
    bool half_close = false;
    if (const absl::Status* status = std::get_if<absl::Status>(&message)) {
      refused = *status;
    } else {
      refused = Parse(std::get<bool>(message), into, &half_close);
    }
    Tell([&](EmotionService::StreamEvents* events) {
      if (!refused.ok()) {
        events->MessageRefused(refused);
      } else {
        events->MessageRead(!half_close);
      }
    });
    return true;
  }

  // message_ as the call's next message.
  absl::Status Parse(bool text, v1::StreamClassifyRequest* into, bool* half_close) {
    into->Clear();
    if (!configured_) {
      if (!text) {
        return absl::InvalidArgumentError(
            "the first message is the StreamingConfig as JSON text, not binary audio");
      }
      google::protobuf::util::JsonParseOptions options;
      options.ignore_unknown_fields = false;
      const auto parsed =
          google::protobuf::util::JsonStringToMessage(message_, into->mutable_config(), options);
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the first message is not a StreamingConfig in JSON: ", parsed.message().ToString()));
      }
      configured_ = true;
      return absl::OkStatus();
    }
    if (!text) {
      into->set_audio(std::move(message_));
      message_.clear();
      return absl::OkStatus();
    }
    const nlohmann::json end = nlohmann::json::parse(message_, nullptr, /*allow_exceptions=*/false);
    if (!end.is_object() || end.size() != 1 || !end.contains("end") ||
        end["end"] != nlohmann::json(true)) {
      return absl::InvalidArgumentError(
          "after the config, audio goes in binary messages and the only text message is "
          "{\"end\": true}");
    }
    *half_close = true;
    return absl::OkStatus();
  }

  // Calls `tell` with the call's events unless the call is done with this
  // transport; Done waits for such calls to return.
  template <typename Telling>
  void Tell(Telling tell) {
    EmotionService::StreamEvents* events = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (done_ || events_ == nullptr) return;
      events = events_;
      ++telling_;
    }
    tell(events);
    absl::MutexLock lock(&mu_);
    --telling_;
  }

  // The writer thread: responses in order, a cancellation, then the end.
  void WriteLoop() {
    bool gone_told = false;
    for (;;) {
      const v1::StreamClassifyResponse* response = nullptr;
      std::optional<absl::Status> outcome;
      bool tell_gone = false;
      {
        absl::MutexLock lock(&mu_);
        const auto work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return !outgoing_.empty() || outcome_.has_value() || (cancelled_ && !gone_told);
        };
        mu_.Await(absl::Condition(&work));
        if (!outgoing_.empty()) {
          response = outgoing_.front();
          outgoing_.pop_front();
        } else if (cancelled_ && !gone_told) {
          tell_gone = gone_told = true;
        } else {
          outcome = outcome_;
        }
      }
      if (tell_gone) {
        Tell([](EmotionService::StreamEvents* events) { events->Gone(); });
      } else if (response != nullptr) {
        const bool written = Send(*response);
        Tell([&](EmotionService::StreamEvents* events) { events->Written(written); });
      } else {
        SendEnd(*outcome);
        EmotionService::StreamEvents* events = nullptr;
        {
          absl::MutexLock lock(&mu_);
          const auto quiet = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
            return telling_ == 0 && events_ != nullptr;
          };
          mu_.Await(absl::Condition(&quiet));
          done_ = true;
          events = events_;
        }
        events->Done();
        return;
      }
    }
  }

  bool Sendable() {
    absl::MutexLock lock(&mu_);
    return !client_gone_ && !cancelled_;
  }

  bool Send(const v1::StreamClassifyResponse& response) {
    absl::StatusOr<std::string> json = MessageJson(response);
    if (!json.ok() || !Sendable()) return false;
    return mg_websocket_write(connection_, MG_WEBSOCKET_OPCODE_TEXT, json->data(),
                              json->size()) > 0;
  }

  void SendEnd(const absl::Status& outcome) {
    if (!Sendable()) return;
    if (!outcome.ok()) {
      const std::string error = ErrorJson(outcome);
      mg_websocket_write(connection_, MG_WEBSOCKET_OPCODE_TEXT, error.data(), error.size());
    }
    // The close frame's payload: a 2-byte code and a short reason.
    const int code = outcome.ok() ? 1000 : 4000 + static_cast<int>(outcome.code());
    std::string payload = {static_cast<char>(code >> 8), static_cast<char>(code & 0xff)};
    payload += absl::StatusCodeToString(outcome.code());
    mg_websocket_write(connection_, MG_WEBSOCKET_OPCODE_CONNECTION_CLOSE, payload.data(),
                       payload.size());
  }

  mg_connection* const connection_;
  const int64_t max_message_bytes_;
  // The connection thread's message being assembled from fragments.
  int message_opcode_ = 0;
  std::string message_;
  bool configured_ = false;

  mutable absl::Mutex mu_;
  EmotionService::StreamEvents* events_ ABSL_GUARDED_BY(mu_) = nullptr;
  v1::StreamClassifyRequest* read_into_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::deque<const v1::StreamClassifyResponse*> outgoing_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> outcome_ ABSL_GUARDED_BY(mu_);
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  int telling_ ABSL_GUARDED_BY(mu_) = 0;  // events being told outside mu_
  bool done_ ABSL_GUARDED_BY(mu_) = false;  // the call was told Done
  std::thread writer_;
};

int OnConnect(const mg_connection* /*connection*/, void* /*streams*/) { return 0; }

void OnReady(mg_connection* connection, void* streams) {
  auto* owner = static_cast<WebSocketStreams*>(streams);
  auto* stream = new WebSocketStream(connection, owner->max_message_bytes());
  mg_set_user_connection_data(connection, stream);
  stream->Start(owner->service());
}

int OnData(mg_connection* connection, int bits, char* data, size_t size, void* /*streams*/) {
  auto* stream = static_cast<WebSocketStream*>(mg_get_user_connection_data(connection));
  return stream != nullptr && stream->OnFrame(bits, data, size) ? 1 : 0;
}

void OnClose(const mg_connection* connection, void* /*streams*/) {
  auto* stream = static_cast<WebSocketStream*>(mg_get_user_connection_data(connection));
  if (stream == nullptr) return;
  stream->OnClose();
  delete stream;
}

}  // namespace

WebSocketStreams::WebSocketStreams(mg_context* context, const char* path,
                                   EmotionService* service, int64_t max_message_bytes)
    : service_(service), max_message_bytes_(max_message_bytes) {
  mg_set_websocket_handler(context, path, &OnConnect, &OnReady, &OnData, &OnClose, this);
}

}  // namespace emoserve
