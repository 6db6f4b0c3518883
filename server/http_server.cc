#include "server/http_server.h"

#include <civetweb.h>

#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "server/page_assets.h"

namespace emoserve {
namespace {

constexpr char kClassifyMethod[] = "POST /v1/classify";
constexpr char kModelMethod[] = "GET /v1/model";
constexpr char kModelsMethod[] = "GET /v1/models";

// Answers `body`; `headers` are extra lines, each ending in \r\n.
void Respond(mg_connection* connection, int status, absl::string_view body, bool close = false,
             absl::string_view content_type = "application/json",
             absl::string_view headers = "Cache-Control: no-store\r\n", bool head = false) {
  const std::string head_lines = absl::StrCat(
      "HTTP/1.1 ", status, " ", mg_get_response_code_text(connection, status),
      "\r\nContent-Type: ", content_type, "\r\nContent-Length: ", body.size(),
      "\r\nX-Content-Type-Options: nosniff\r\n", headers,
      close ? "Connection: close\r\n" : "", "\r\n");
  mg_write(connection, head_lines.data(), head_lines.size());
  if (!head) mg_write(connection, body.data(), body.size());
}

// The page's own files only: no inline code, no other origin (the
// WebSocket is this origin).
constexpr absl::string_view kPageHeaders =
    "Cache-Control: no-cache\r\n"
    "Content-Security-Policy: default-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'\r\n"
    "Referrer-Policy: no-referrer\r\n";

// ErrorJson with the matching HTTP status (or `http_status` when the
// transport knows better, e.g. 413).
void RespondError(mg_connection* connection, const absl::Status& status, int http_status = 0,
                  bool close = false) {
  Respond(connection, http_status != 0 ? http_status : HttpStatusFor(status.code()),
          ErrorJson(status), close);
}

void RespondMessage(mg_connection* connection, const google::protobuf::Message& message) {
  absl::StatusOr<std::string> json = MessageJson(message);
  json.ok() ? Respond(connection, 200, *json) : RespondError(connection, json.status());
}

// The query's parameters, URL-decoded; kInvalidArgument for a name not in
// `known` (a misspelt option would otherwise be silently ignored).
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> QueryParameters(
    const std::string& query, const std::vector<absl::string_view>& known) {
  std::vector<std::pair<std::string, std::string>> parameters;
  for (absl::string_view part : absl::StrSplit(query, '&', absl::SkipEmpty())) {
    const std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(part, '=');
    std::string name(kv.first.size() + 1, '\0'), value(kv.second.size() + 1, '\0');
    const int name_size = mg_url_decode(kv.first.data(), static_cast<int>(kv.first.size()),
                                        name.data(), static_cast<int>(name.size()), 1);
    const int value_size = mg_url_decode(kv.second.data(), static_cast<int>(kv.second.size()),
                                         value.data(), static_cast<int>(value.size()), 1);
    if (name_size < 0 || value_size < 0) {
      return absl::InvalidArgumentError("the query string is not valid URL encoding");
    }
    name.resize(name_size);
    value.resize(value_size);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      std::string names;
      for (absl::string_view k : known) absl::StrAppend(&names, names.empty() ? "" : ", ", k);
      return absl::InvalidArgumentError(absl::StrCat("unknown query parameter \"", name.substr(0, 64),
                                                     "\"; this endpoint takes: ", names));
    }
    parameters.emplace_back(std::move(name), std::move(value));
  }
  return parameters;
}

absl::Status BadValue(absl::string_view name, absl::string_view value, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("query parameter ", name, "=",
                                                 value.substr(0, 64), ": ", what));
}

absl::Status ParseBool(absl::string_view name, absl::string_view value, bool* out) {
  if (value == "true" || value == "1" || value.empty()) {
    *out = true;
  } else if (value == "false" || value == "0") {
    *out = false;
  } else {
    return BadValue(name, value, "expected true or false");
  }
  return absl::OkStatus();
}

// "NAME" or "NAME:VERSION" (a positive integer).
absl::Status ParseModel(absl::string_view value, std::string* name, int64_t* version) {
  const size_t colon = value.rfind(':');
  *name = std::string(value.substr(0, colon));
  *version = 0;
  if (colon != absl::string_view::npos &&
      (!absl::SimpleAtoi(value.substr(colon + 1), version) || *version < 1)) {
    return BadValue("model", value, "expected NAME or NAME:VERSION (a positive integer)");
  }
  return absl::OkStatus();
}

// The classify request the query describes (the audio comes after).
absl::Status ParseClassifyQuery(const std::string& query, v1::ClassifyRequest* request,
                                double* timeout_seconds) {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> parameters = QueryParameters(
      query, {"encoding", "sample_rate_hertz", "channel_count", "timeline", "hop_seconds", "model",
              "timeout_seconds", "speaker_statistics", "return_speaker_statistics"});
  if (!parameters.ok()) return parameters.status();
  for (const auto& [name, value] : *parameters) {
    if (name == "encoding") {
      if (value == "linear16" || value == "AUDIO_ENCODING_LINEAR16") {
        request->mutable_format()->set_encoding(v1::AUDIO_ENCODING_LINEAR16);
      } else if (value == "float32" || value == "AUDIO_ENCODING_FLOAT32") {
        request->mutable_format()->set_encoding(v1::AUDIO_ENCODING_FLOAT32);
      } else {
        return BadValue(name, value, "expected linear16 or float32 (omit it for a container)");
      }
    } else if (name == "sample_rate_hertz" || name == "channel_count") {
      int32_t number = 0;
      if (!absl::SimpleAtoi(value, &number)) return BadValue(name, value, "expected an integer");
      if (name == "sample_rate_hertz") {
        request->mutable_format()->set_sample_rate_hertz(number);
      } else {
        request->mutable_format()->set_channel_count(number);
      }
    } else if (name == "timeline" || name == "return_speaker_statistics") {
      bool flag = false;
      if (absl::Status s = ParseBool(name, value, &flag); !s.ok()) return s;
      if (name == "timeline") {
        request->set_include_timeline(flag);
      } else {
        request->set_return_speaker_statistics(flag);
      }
    } else if (name == "speaker_statistics") {
      // URL-safe base64 (RFC 4648 section 5) or the standard alphabet, as
      // the JSON responses carry it.
      std::string blob;
      if (!absl::WebSafeBase64Unescape(value, &blob) && !absl::Base64Unescape(value, &blob)) {
        return BadValue(name, "(not shown)", "expected the blob in base64");
      }
      request->set_speaker_statistics(std::move(blob));
    } else if (name == "hop_seconds" || name == "timeout_seconds") {
      double number = 0;
      if (!absl::SimpleAtod(value, &number) || !std::isfinite(number) || number < 0 ||
          (name == "timeout_seconds" && number == 0)) {
        return BadValue(name, value, "expected a number of seconds (a timeout above 0)");
      }
      if (name == "hop_seconds") {
        request->set_hop_seconds(number);
      } else {
        *timeout_seconds = number;
      }
    } else if (name == "model") {
      std::string model;
      int64_t version = 0;
      if (absl::Status s = ParseModel(value, &model, &version); !s.ok()) return s;
      request->set_model_name(model);
      request->set_model_version(version);
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::string ErrorJson(const absl::Status& status) {
  nlohmann::json body;
  body["error"]["code"] = absl::StatusCodeToString(status.code());
  body["error"]["message"] = std::string(status.message());
  return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

absl::StatusOr<std::string> MessageJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) {
    return absl::InternalError("the response could not be written as JSON");
  }
  return json;
}

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

HttpServer::HttpServer(const HttpOptions& options, EmotionService* service,
                       std::function<bool()> ready)
    : options_(options), service_(service), ready_(std::move(ready)) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpOptions& options,
                                                              EmotionService* service,
                                                              std::function<bool()> ready) {
  std::unique_ptr<HttpServer> server(new HttpServer(options, service, std::move(ready)));
  // IPv6 literals need brackets in civetweb's listening_ports.
  const std::string address = absl::StrCat(
      options.host.find(':') != std::string::npos ? absl::StrCat("[", options.host, "]")
                                                  : options.host,
      ":", options.port);
  const std::string threads = absl::StrCat(options.threads);
  const std::string timeout = absl::StrCat(options.request_timeout_ms);
  const std::string websocket_timeout = absl::StrCat(options.websocket_timeout_ms);
  const char* civetweb_options[] = {"listening_ports",      address.c_str(),
                                    "num_threads",          threads.c_str(),
                                    "request_timeout_ms",   timeout.c_str(),
                                    "websocket_timeout_ms", websocket_timeout.c_str(),
                                    "enable_keep_alive",    "yes",
                                    nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  server->context_ = mg_start(&callbacks, server.get(), civetweb_options);
  if (server->context_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve HTTP on ", address,
        " (is the port in use? --http-port 0 disables HTTP)"));
  }
  mg_set_request_handler(server->context_, "/", &HttpServer::Handle, server.get());
  server->streams_ = std::make_unique<WebSocketStreams>(server->context_, "/v1/stream", service,
                                                        options.max_stream_message_bytes);
  mg_server_port ports[4];
  const int count = mg_get_server_ports(server->context_, 4, ports);
  server->port_ = count > 0 ? ports[0].port : options.port;
  return server;
}

HttpServer::~HttpServer() {
  if (context_ != nullptr) mg_stop(context_);
}

int HttpServer::Handle(mg_connection* connection, void* self) {
  HttpServer* server = static_cast<HttpServer*>(self);
  {
    absl::MutexLock lock(&server->mu_);
    ++server->handling_;
  }
  server->HandleRequest(connection);
  absl::MutexLock lock(&server->mu_);
  --server->handling_;
  return 1;
}

bool HttpServer::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  const auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return handling_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void HttpServer::HandleRequest(mg_connection* connection) {
  const mg_request_info* info = mg_get_request_info(connection);
  const std::string method = info->request_method != nullptr ? info->request_method : "";
  const std::string path = info->local_uri != nullptr ? info->local_uri : "";
  const std::string query = info->query_string != nullptr ? info->query_string : "";
  const auto allow = [&](const char* wanted) {
    if (method == wanted) return true;
    RespondError(connection,
                 absl::InvalidArgumentError(absl::StrCat(path, " takes ", wanted, ", not ", method)),
                 405, /*close=*/true);
    return false;
  };
  for (const PageFile& file : PageFiles()) {
    if (path != file.path) continue;
    if (method != "HEAD" && !allow("GET")) return;
    return Respond(connection, 200, file.body, false, file.content_type, kPageHeaders,
                   /*head=*/method == "HEAD");
  }
  if (path == "/v1/classify") {
    if (allow("POST")) Classify(connection, query, info->content_length);
  } else if (path == "/v1/model") {
    if (!allow("GET")) return;
    v1::GetModelInfoRequest request;
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> parameters =
        QueryParameters(query, {"model"});
    if (!parameters.ok()) return RespondError(connection, parameters.status());
    for (const auto& [name, value] : *parameters) {
      std::string model;
      int64_t version = 0;
      if (absl::Status s = ParseModel(value, &model, &version); !s.ok()) {
        return RespondError(connection, s);
      }
      request.set_model_name(model);
      request.set_model_version(version);
    }
    absl::StatusOr<v1::ModelInfo> model = service_->ModelInfoFor(kModelMethod, request);
    model.ok() ? RespondMessage(connection, *model) : RespondError(connection, model.status());
  } else if (path == "/v1/models") {
    if (!allow("GET")) return;
    absl::StatusOr<v1::ListModelsResponse> models = service_->ModelsFor(kModelsMethod);
    models.ok() ? RespondMessage(connection, *models) : RespondError(connection, models.status());
  } else if (path == "/v1/stream") {
    RespondError(connection,
                 absl::InvalidArgumentError(
                     "/v1/stream is a WebSocket: send GET with Upgrade: websocket"),
                 426, /*close=*/true);
  } else if (path == "/healthz") {
    if (allow("GET")) Respond(connection, 200, R"({"status":"live"})");
  } else if (path == "/readyz") {
    if (!allow("GET")) return;
    const bool ready = ready_();
    Respond(connection, ready ? 200 : 503,
            ready ? R"({"status":"SERVING"})" : R"({"status":"NOT_SERVING"})");
  } else {
    RespondError(connection,
                 absl::NotFoundError(absl::StrCat(
                     "no such endpoint; this server answers GET / (the page), POST /v1/classify, "
                     "GET /v1/model, GET /v1/models, the WebSocket /v1/stream, GET /healthz and "
                     "GET /readyz")),
                 404, /*close=*/method != "GET" && method != "HEAD");
  }
}

void HttpServer::Classify(mg_connection* connection, const std::string& query,
                          int64_t content_length) {
  auto request = std::make_unique<v1::ClassifyRequest>();
  double timeout_seconds = options_.default_timeout_seconds;
  if (absl::Status s = ParseClassifyQuery(query, request.get(), &timeout_seconds); !s.ok()) {
    return RespondError(connection, s, 0, /*close=*/true);
  }
  // The body is charged to the budget of audio in flight before it is read,
  // so its size must be known.
  if (content_length < 0) {
    return RespondError(connection,
                        absl::InvalidArgumentError(
                            "send the audio with a Content-Length (chunked uploads are not taken)"),
                        411, /*close=*/true);
  }
  if (content_length > options_.max_body_bytes) {
    return RespondError(connection,
                        absl::ResourceExhaustedError(absl::StrCat(
                            "the request body of ", content_length,
                            " bytes is over this server's limit of ", options_.max_body_bytes,
                            " (--max-message-bytes)")),
                        413, /*close=*/true);
  }
  absl::StatusOr<std::unique_ptr<BudgetLease>> lease =
      service_->ReserveRequestBytes(content_length);
  if (!lease.ok()) return RespondError(connection, lease.status(), 0, /*close=*/true);
  std::string* audio = request->mutable_audio();
  audio->resize(static_cast<size_t>(content_length));
  int64_t received = 0;
  while (received < content_length) {
    const int n = mg_read(connection, audio->data() + received,
                          static_cast<size_t>(content_length - received));
    if (n <= 0) {
      // The client stopped sending (or request_timeout_ms passed): nobody
      // is left to answer.
      return RespondError(connection,
                          absl::InvalidArgumentError("the request body ended early"), 0,
                          /*close=*/true);
    }
    received += n;
  }
  absl::Notification answered;
  absl::Status status;
  v1::ClassifyResponse response;
  service_->ClassifyFor(kClassifyMethod, std::move(request),
                        absl::Now() + absl::Seconds(timeout_seconds), *std::move(lease),
                        [&](const absl::Status& outcome, v1::ClassifyResponse result) {
                          status = outcome;
                          response = std::move(result);
                          answered.Notify();
                        });
  answered.WaitForNotification();
  status.ok() ? RespondMessage(connection, response) : RespondError(connection, status);
}

}  // namespace emoserve
