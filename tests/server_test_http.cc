// The HTTP/JSON API in process (so that ThreadSanitizer sees it): HTTP and
// gRPC calls at once agree, and a shutdown answers every HTTP call;
// WebSocket streams end, leave and are flushed at shutdown.
#include <civetweb.h>

#include <atomic>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tests/server_test_support.h"
#include "tests/test_support.h"

namespace emoserve {
namespace {

using ::emoserve::testing::Connect;
using ::emoserve::testing::FreePort;
using ::emoserve::testing::StartServer;
using ::emoserve::testing::TestServerConfig;

struct HttpResult {
  int status = 0;  // 0: no answer
  std::string body;
};

// POST `body` to 127.0.0.1:`port``path` with civetweb's client; `sent`
// (when given) counts the requests whose body is out.
HttpResult Post(int port, const std::string& path, const std::string& body,
                std::atomic<int>* sent = nullptr) {
  char error[256] = "";
  mg_connection* connection = mg_connect_client("127.0.0.1", port, 0, error, sizeof(error));
  if (connection == nullptr) return {};
  mg_printf(connection,
            "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %zu\r\n"
            "Connection: close\r\n\r\n",
            path.c_str(), body.size());
  mg_write(connection, body.data(), body.size());
  if (sent != nullptr) ++*sent;
  HttpResult result;
  if (mg_get_response(connection, error, sizeof(error), 120000) >= 0) {
    result.status = mg_get_response_info(connection)->status_code;
    char buffer[4096];
    for (int n; (n = mg_read(connection, buffer, sizeof(buffer))) > 0;) result.body.append(buffer, n);
  }
  mg_close_connection(connection);
  return result;
}

constexpr int kRate = 16000;

std::string RawPath() {
  return absl::StrCat("/v1/classify?encoding=linear16&sample_rate_hertz=", kRate);
}

TEST(HttpServerTest, HttpAndGrpcCallsAtOnceAgreeAndShutdownAnswersEveryCall) {
  ServerConfig config = TestServerConfig();
  config.http_port = FreePort();
  config.http_threads = 4;
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_EQ((*server)->http_port(), config.http_port);
  const std::string audio = testing::ToLinear16(testing::Sine(220, 0.3, kRate, 4.0));

  v1::ClassifyRequest request;
  request.set_audio(audio);
  *request.mutable_format() = testing::Format(v1::AUDIO_ENCODING_LINEAR16, kRate);
  v1::ClassifyResponse reference;
  {
    auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Classify(&context, request, &reference).ok());
  }

  // Four HTTP clients and four gRPC clients, three calls each, at once.
  std::vector<std::thread> clients;
  std::atomic<int> agreed{0};
  for (int c = 0; c < 8; ++c) {
    clients.emplace_back([&, c] {
      auto stub = v1::EmotionService::NewStub(Connect((*server)->port()));
      for (int i = 0; i < 3; ++i) {
        v1::ClassifyResponse response;
        if (c % 2 == 0) {
          const HttpResult http = Post(config.http_port, RawPath(), audio);
          if (http.status != 200) continue;
          if (!google::protobuf::util::JsonStringToMessage(http.body, &response).ok()) continue;
        } else {
          grpc::ClientContext context;
          if (!stub->Classify(&context, request, &response).ok()) continue;
        }
        bool same = response.scores_size() == reference.scores_size();
        for (int s = 0; same && s < response.scores_size(); ++s) {
          same = response.scores(s).label() == reference.scores(s).label() &&
                 std::abs(response.scores(s).probability() - reference.scores(s).probability()) <
                     1e-5;
        }
        agreed += same ? 1 : 0;
      }
    });
  }
  for (std::thread& client : clients) client.join();
  EXPECT_EQ(agreed, 24);

  // Calls in flight when the server shuts down are answered: 200 when they
  // finished within the grace, 503 when they came too late.
  const std::string long_audio = testing::ToLinear16(testing::Sine(220, 0.3, kRate, 30.0));
  std::vector<HttpResult> answers(4);
  std::atomic<int> sent{0};
  clients.clear();
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back(
        [&, c] { answers[c] = Post(config.http_port, RawPath(), long_audio, &sent); });
  }
  while (sent < 4) absl::SleepFor(absl::Milliseconds(5));
  absl::SleepFor(absl::Milliseconds(50));
  (*server)->Shutdown(absl::Seconds(10));
  for (std::thread& client : clients) client.join();
  for (const HttpResult& answer : answers) {
    EXPECT_TRUE(answer.status == 200 || answer.status == 503)
        << answer.status << " " << answer.body;
    if (answer.status == 503) EXPECT_NE(answer.body.find("UNAVAILABLE"), std::string::npos);
  }
  EXPECT_EQ(Post(config.http_port, RawPath(), audio).status, 0);  // closed
}

// A WebSocket client (civetweb's) that keeps the server's text messages
// and the close frame's code.
class WebSocketClient {
 public:
  explicit WebSocketClient(int port) {
    char error[256] = "";
    connection_ = mg_connect_websocket_client("127.0.0.1", port, 0, error, sizeof(error),
                                              "/v1/stream", nullptr, &OnData, &OnClose, this);
    EXPECT_NE(connection_, nullptr) << error;
  }
  ~WebSocketClient() {
    if (connection_ != nullptr) mg_close_connection(connection_);
  }
  bool connected() const { return connection_ != nullptr; }

  void SendText(const std::string& text) { Send(MG_WEBSOCKET_OPCODE_TEXT, text); }
  void SendAudio(const std::string& pcm) {
    for (size_t at = 0; at < pcm.size(); at += 6400) {
      Send(MG_WEBSOCKET_OPCODE_BINARY, pcm.substr(at, 6400));
    }
  }
  // The messages until the server closed (close code; 0: still open at the deadline).
  int WaitForClose(std::vector<std::string>* messages) {
    absl::MutexLock lock(&mu_);
    const auto closed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return close_code_ != 0; };
    mu_.AwaitWithTimeout(absl::Condition(&closed), absl::Seconds(120));
    *messages = messages_;
    return close_code_;
  }
  size_t received() {
    absl::MutexLock lock(&mu_);
    return messages_.size();
  }

 private:
  void Send(int opcode, const std::string& data) {
    mg_websocket_client_write(connection_, opcode, data.data(), data.size());
  }
  static int OnData(mg_connection* /*connection*/, int bits, char* data, size_t size,
                    void* self) {
    auto* client = static_cast<WebSocketClient*>(self);
    absl::MutexLock lock(&client->mu_);
    if ((bits & 0x0f) == MG_WEBSOCKET_OPCODE_TEXT) {
      client->messages_.emplace_back(data, size);
    } else if ((bits & 0x0f) == MG_WEBSOCKET_OPCODE_CONNECTION_CLOSE) {
      client->close_code_ =
          size >= 2 ? (static_cast<uint8_t>(data[0]) << 8) | static_cast<uint8_t>(data[1]) : -1;
    }
    return 1;
  }
  static void OnClose(const mg_connection* /*connection*/, void* self) {
    auto* client = static_cast<WebSocketClient*>(self);
    absl::MutexLock lock(&client->mu_);
    if (client->close_code_ == 0) client->close_code_ = -1;  // closed without a close frame
  }

  mg_connection* connection_ = nullptr;
  absl::Mutex mu_;
  std::vector<std::string> messages_ ABSL_GUARDED_BY(mu_);
  int close_code_ ABSL_GUARDED_BY(mu_) = 0;
};

bool Has(const std::vector<std::string>& messages, absl::string_view kind) {
  for (const std::string& message : messages) {
    if (message.find(absl::StrCat("{\"", kind, "\"")) == 0) return true;
  }
  return false;
}

TEST(HttpServerTest, WebSocketStreamsEndLeaveAndAreFlushedAtShutdown) {
  ServerConfig config = TestServerConfig();
  config.http_port = FreePort();
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string stream_config = absl::StrCat(
      R"({"format":{"encoding":"AUDIO_ENCODING_LINEAR16","sampleRateHertz":)", kRate,
      R"(},"interimResults":true})");
  const std::string audio = testing::ToLinear16(testing::Sine(220, 0.3, kRate, 4.0));

  // Three streams at once: one ends, one leaves, one is open at shutdown.
  WebSocketClient ending(config.http_port), open(config.http_port);
  std::optional<WebSocketClient> leaving(std::in_place, config.http_port);
  ASSERT_TRUE(ending.connected() && leaving->connected() && open.connected());
  for (WebSocketClient* client : {&ending, &*leaving, &open}) {
    client->SendText(stream_config);
    client->SendAudio(audio);
  }
  ending.SendText(R"({"end": true})");
  std::vector<std::string> messages;
  EXPECT_EQ(ending.WaitForClose(&messages), 1000);
  EXPECT_TRUE(Has(messages, "window"));
  EXPECT_TRUE(Has(messages, "utterance"));

  leaving.reset();  // gone without a close frame or an end
  leaving.emplace(config.http_port);  // and a new stream is admitted
  EXPECT_TRUE(leaving->connected());

  while (open.received() == 0) absl::SleepFor(absl::Milliseconds(5));  // configured
  (*server)->Shutdown(absl::Seconds(10));
  EXPECT_EQ(open.WaitForClose(&messages), 1000);
  EXPECT_TRUE(Has(messages, "utterance"));  // flushed
}

}  // namespace
}  // namespace emoserve
