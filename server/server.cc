#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_posix.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "core/audio.h"
#include "core/model.h"
#include "server/log.h"

namespace emoserve {
namespace {

// Threads that wait for synchronous calls (reflection), besides those
// that serve them.
constexpr int kSyncPollerThreads = 2;

std::string HostPort(const std::string& host, int port) {
  // IPv6 literals go in brackets.
  return host.find(':') != std::string::npos ? absl::StrCat("[", host, "]:", port)
                                             : absl::StrCat(host, ":", port);
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(
    const ServerConfig& config) {
  if (config.tls_cert.empty()) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> cert = ReadFileBytes(config.tls_cert);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFileBytes(config.tls_key);
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(
      config.tls_client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                   : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!config.tls_client_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadFileBytes(config.tls_client_ca);
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
  }
  options.pem_key_cert_pairs.push_back({*std::move(key), *std::move(cert)});
  return grpc::SslServerCredentials(options);
}

// Takes a plugin out of a ServerBuilder: linking libgrpc++_reflection
// registers its plugin for every builder in the process, so turning
// reflection off means removing it.
class WithoutPlugin final : public grpc::ServerBuilderOption {
 public:
  explicit WithoutPlugin(std::string name) : name_(std::move(name)) {}
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(std::remove_if(plugins->begin(), plugins->end(),
                                  [this](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                                    return plugin->name() == name_;
                                  }),
                   plugins->end());
  }

 private:
  const std::string name_;
};

int Milliseconds(double seconds) {
  return static_cast<int>(std::min(seconds * 1000.0, static_cast<double>(INT32_MAX)));
}

// What one client or connection may take of the transport (see the flags
// in config.cc and docs/limits.md).
void ApplyTransportLimits(const ServerConfig& config, grpc::ServerBuilder& builder) {
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  // All connections' buffers together; under pressure gRPC shrinks its
  // read buffers, refuses new connections and cancels calls (Buffers full,
  // RESOURCE_EXHAUSTED). Threads bound the synchronous services (reflection):
  // calls beyond them are answered RESOURCE_EXHAUSTED.
  grpc::ResourceQuota quota("emoserve");
  quota.Resize(static_cast<size_t>(config.grpc_memory_mb) << 20);
  quota.SetMaxThreads(config.max_reflection_calls + kSyncPollerThreads);
  builder.SetResourceQuota(quota);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::NUM_CQS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 1);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS,
                              kSyncPollerThreads);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, config.max_concurrent_streams);
  // No read-ahead beyond what a call asked for: with bandwidth-delay
  // probing gRPC grows each stream's HTTP/2 window to megabytes, so a client
  // could queue tens of MiB of stream audio in the transport, past the
  // stream's own backpressure. Without it a stream's window is 64 KiB beyond
  // the message being read, and a large message still gets a window for all
  // of itself once it is read.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  // Request metadata keeps gRPC's default limit: in gRPC 1.51 an explicit
  // GRPC_ARG_MAX_METADATA_SIZE lets a flood of CONTINUATION frames grow
  // memory without bound, where the default closes the connection
  // (tests/abuse: http2_floods).
  // Audio does not compress: compressed requests are refused before they
  // are inflated (a 256 KiB gzip bomb would otherwise take 256 MiB).
  builder.SetCompressionAlgorithmSupportStatus(GRPC_COMPRESS_DEFLATE, false);
  builder.SetCompressionAlgorithmSupportStatus(GRPC_COMPRESS_GZIP, false);

  builder.AddChannelArgument("grpc.server_handshake_timeout_ms",
                             Milliseconds(config.handshake_timeout_seconds));
  // Dead peers: ping after keepalive_seconds of silence, close when the
  // ping is not answered. Misbehaving peers: pings closer together than
  // min_ping_interval_seconds are strikes; two strikes close the connection.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Milliseconds(config.keepalive_seconds));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             Milliseconds(config.keepalive_timeout_seconds));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             Milliseconds(config.min_ping_interval_seconds));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  // Idle connections close; long-lived ones are asked to reconnect now and
  // then, so that clients rebalance over the pods behind the headless
  // Service.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             Milliseconds(config.max_connection_idle_seconds));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                             Milliseconds(config.max_connection_age_seconds));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             Milliseconds(config.max_connection_age_grace_seconds));
}

// One window of a quiet tone through the whole engine path (features,
// batcher, model) so that the first client does not pay for lazy set-up.
absl::Status WarmUp(Engine& engine) {
  const ModelConfig& model = engine.model().config();
  ClipRequest clip;
  clip.samples.resize(model.window_samples());
  for (size_t i = 0; i < clip.samples.size(); ++i) {
    clip.samples[i] = static_cast<float>(0.1 * std::sin(2 * M_PI * 220.0 * i / model.sample_rate));
  }
  clip.vad_threshold_dbfs = -std::numeric_limits<double>::infinity();
  absl::Notification done;
  absl::Status status;
  clip.done = [&](absl::StatusOr<ClipResult> result) {
    if (!result.ok()) {
      status = result.status();
    } else if (static_cast<int>(result->probabilities.size()) != engine.model().num_classes()) {
      status = absl::InternalError("the warm-up classification returned no probabilities");
    }
    done.Notify();
  };
  engine.Classify(std::move(clip));
  done.WaitForNotification();
  return status;
}

}  // namespace

Server::Server(const ServerConfig& config) : config_(config) {}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerConfig& config) {
  std::unique_ptr<Server> server(new Server(config));
  server->metrics_ = std::make_unique<ServerMetrics>();
  if (config.metrics_port > 0) {
    const std::string& metrics_host = config.metrics_host.empty() ? config.host : config.metrics_host;
    if (absl::Status s = server->metrics_->Expose(metrics_host, config.metrics_port,
                                                  config.metrics_threads,
                                                  config.metrics_timeout_ms);
        !s.ok()) {
      return s;
    }
  }
  server->health_ = std::make_unique<HealthService>(
      std::vector<std::string>{std::string(v1::EmotionService::service_full_name())},
      config.max_health_watches);
  server->service_ = std::make_unique<EmotionService>(config, server->metrics_.get());

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = Credentials(config);
  if (!credentials.ok()) return credentials.status();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  if (!config.reflection) {
    builder.SetOption(std::make_unique<WithoutPlugin>("proto_server_reflection"));
  }
  const std::string address = HostPort(config.host, config.port);
  // Plaintext connections come through the guard (it listens and hands
  // gRPC each connection); TLS ones straight to gRPC.
  const bool guarded = config.connection_guard && config.tls_cert.empty();
  if (!guarded) builder.AddListeningPort(address, *credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.RegisterService(server->health_.get());
  ApplyTransportLimits(config, builder);
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ != nullptr && guarded) {
    ConnectionGuardOptions options;
    options.max_connections = config.max_connections;
    options.max_resets_per_second = config.max_resets_per_second;
    options.max_total_resets_per_second = 4 * config.max_resets_per_second;
    options.preface_timeout = absl::Seconds(config.handshake_timeout_seconds);
    // Half of gRPC's memory for messages being received: gRPC's quota
    // (which cancels streams at random when full) is not reached by them.
    options.max_upload_bytes = (int64_t{config.grpc_memory_mb} << 20) / 2;
    ServerMetrics* metrics = server->metrics_.get();
    grpc::Server* grpc_server = server->grpc_server_.get();
    absl::StatusOr<std::unique_ptr<ConnectionGuard>> guard = ConnectionGuard::Start(
        config.host, config.port, options,
        [grpc_server](int fd) { grpc::AddInsecureChannelFromFd(grpc_server, fd); },
        {[metrics](int open) { metrics->SetConnections(open); },
         [metrics](absl::string_view reason) { metrics->ConnectionRefused(reason); },
         [metrics](int count) { metrics->UploadsRefused(count); },
         [metrics](int64_t bytes) { metrics->SetUploadMemory(bytes); }});
    if (!guard.ok()) {
      server->grpc_server_->Shutdown();
      server->grpc_server_.reset();
      return absl::UnavailableError(
          absl::StrCat("cannot serve gRPC on ", address, ": ", guard.status().message(),
                       " (is the port in use?)"));
    }
    server->port_ = (*guard)->port();
    server->guard_ = *std::move(guard);
  }
  if (server->grpc_server_ == nullptr || server->port_ == 0) {
    server->grpc_server_.reset();
    return absl::UnavailableError(absl::StrCat(
        "cannot serve gRPC on ", address,
        config.tls_cert.empty() ? " (is the port in use?)"
                                : " (is the port in use? are --tls-cert/--tls-key a "
                                  "matching PEM certificate and key?)"));
  }
  if (config.http_port > 0) {
    // Civetweb on a loopback port, behind the front door that takes the
    // connections (server/http_front_door.h: TLS, WebSocket frame limits).
    HttpOptions http;
    http.host = "127.0.0.1";
    http.port = 0;
    http.threads = config.http_threads;
    http.max_body_bytes = config.max_message_bytes;
    http.max_stream_message_bytes = int64_t{config.max_chunk_bytes} + (64 << 10);
    http.websocket_timeout_ms = static_cast<int>(
        std::min(config.stream_idle_seconds * 1000.0 + 10000.0, 1e9));
    HealthService* health = server->health_.get();
    absl::StatusOr<std::unique_ptr<HttpServer>> started = HttpServer::Start(
        http, server->service_.get(), [health] { return health->serving(); });
    absl::StatusOr<std::unique_ptr<HttpFrontDoor>> front_door = absl::UnknownError("");
    if (started.ok()) {
      HttpFrontDoorOptions door;
      door.max_connections = 16 * config.http_threads;
      // Above the stream's message limit, so that a message just over it
      // is refused with its error by the stream, not cut off here.
      door.limits.max_frame_bytes = int64_t{config.max_chunk_bytes} + (128 << 10);
      door.tls_cert = config.tls_cert;
      door.tls_key = config.tls_key;
      door.tls_client_ca = config.tls_client_ca;
      door.handshake_timeout = absl::Seconds(config.handshake_timeout_seconds);
      front_door = HttpFrontDoor::Start(config.http_host.empty() ? config.host : config.http_host,
                                        config.http_port, (*started)->port(), door);
    }
    if (!started.ok() || !front_door.ok()) {
      server->grpc_server_->Shutdown();
      server->grpc_server_.reset();
      return started.ok() ? front_door.status() : started.status();
    }
    server->http_ = *std::move(started);
    server->http_front_door_ = *std::move(front_door);
  }
  return server;
}

absl::StatusOr<std::unique_ptr<Engine>> Server::LoadEngine(const std::string& dir,
                                                           const std::string& name,
                                                           const std::string& version) {
  ModelOptions model_options;
  model_options.device = config_.device;
  if (!config_.precision.empty()) {
    absl::StatusOr<Precision> precision = ParsePrecision(config_.precision);
    if (!precision.ok()) return precision.status();
    model_options.precision = *precision;
  }
  absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(dir, model_options);
  if (!model.ok()) return model.status();
  if (!(*model)->precision_fallback().empty()) {
    Log(LogLevel::kWarning, "precision_fallback",
        {{"model", dir}, {"reason", (*model)->precision_fallback()}});
  }
  if (absl::Status s = (*model)->WarmUp(config_.max_batch_size); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("warm-up failed: ", s.message()));
  }
  EngineOptions options;
  options.max_batch_size = config_.max_batch_size;
  options.max_queue_size = config_.max_queue_size;
  options.max_queue_delay = absl::Milliseconds(config_.max_queue_delay_ms);
  options.feature_workers = feature_workers_;  // one set for every loaded version
  options.model_instances = config_.model_instances;
  options.vad_threshold_dbfs = config_.vad_threshold_dbfs;
  options.min_hop_seconds = config_.min_hop_seconds;
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create(std::shared_ptr<const Model>(*std::move(model)), options,
                     metrics_->ForModel(name, version));
  if (!engine.ok()) return engine.status();
  if (absl::Status s = WarmUp(**engine); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("warm-up failed: ", s.message()));
  }
  const Model& loaded = (*engine)->model();
  Log(LogLevel::kInfo, "model_loaded",
      {{"dir", dir},
       {"name", loaded.config().name},
       {"version", loaded.config().version},
       {"device", loaded.device()},
       {"optimized_for_inference", loaded.optimized()},
       {"precision", PrecisionName(loaded.precision())}});
  return engine;
}

void Server::OnRepositoryEvent(const RepositoryEvent& event) {
  const std::string& version = event.version_label;
  switch (event.type) {
    case RepositoryEvent::Type::kLoaded:
      metrics_->ModelLoadFinished("loaded");
      metrics_->SetModelState(event.name, version, "ready");
      Log(LogLevel::kInfo, "model_ready",
          {{"model", event.name},
           {"version", version},
           {"load_ms", absl::ToInt64Milliseconds(event.load_time)}});
      break;
    case RepositoryEvent::Type::kFailed:
      metrics_->ForgetModel(event.name, version);  // series of an engine that did not start
      metrics_->ModelLoadFinished("failed");
      metrics_->SetModelState(event.name, version, "failed");
      Log(LogLevel::kError, "model_load_failed",
          {{"model", event.name}, {"version", version}, {"error", event.detail}});
      break;
    case RepositoryEvent::Type::kRetired:
      metrics_->SetModelState(event.name, version, "");
      Log(LogLevel::kInfo, "model_retired", {{"model", event.name}, {"version", version}});
      break;
    case RepositoryEvent::Type::kUnloaded:
      metrics_->ForgetModel(event.name, event.version_label);
      Log(LogLevel::kInfo, "model_unloaded", {{"model", event.name}, {"version", version}});
      break;
  }
}

absl::Status Server::LoadModel() {
  absl::StatusOr<std::shared_ptr<FeatureWorkers>> workers = FeatureWorkers::Create(
      config_.feature_threads, EngineOptions().feature_thread_nice);
  if (!workers.ok()) return workers.status();
  feature_workers_ = *std::move(workers);
  RepositoryOptions options;
  options.single_model = config_.model_repository.empty();
  options.root = options.single_model ? config_.model : config_.model_repository;
  options.default_model = config_.default_model;
  options.max_loaded_versions = config_.max_loaded_versions;
  options.load = [this](const std::string& dir, const std::string& name,
                        const std::string& version) { return LoadEngine(dir, name, version); };
  options.on_event = [this](const RepositoryEvent& event) { OnRepositoryEvent(event); };
  if (!options.single_model) {
    options.on_released = [this] {
      absl::MutexLock lock(&watch_mu_);
      unload_requested_ = true;
    };
  }
  absl::StatusOr<std::unique_ptr<ModelRepository>> repository =
      ModelRepository::Open(std::move(options));
  if (!repository.ok()) return repository.status();
  repository_ = *std::move(repository);
  absl::StatusOr<std::shared_ptr<const ServedModel>> served = repository_->Find("", 0);
  if (!served.ok()) return served.status();
  const Model& model = (*served)->engine().model();
  metrics_->SetModelInfo((*served)->name(), (*served)->version_label(), model.device(),
                         PrecisionName(model.precision()));
  service_->SetRepository(repository_.get());
  health_->SetServing(true);
  if (!config_.model_repository.empty()) watcher_ = std::thread([this] { WatchRepository(); });
  return absl::OkStatus();
}

void Server::ReloadModels() {
  absl::MutexLock lock(&watch_mu_);
  reload_requested_ = true;
}

void Server::WatchRepository() {
  const absl::Duration period = config_.model_poll_seconds > 0
                                    ? absl::Seconds(config_.model_poll_seconds)
                                    : absl::InfiniteDuration();
  for (;;) {
    bool rescan = false;
    {
      absl::MutexLock lock(&watch_mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(watch_mu_) {
        return reload_requested_ || unload_requested_ || stop_watching_;
      };
      const bool woken = watch_mu_.AwaitWithTimeout(absl::Condition(&wake), period);
      if (stop_watching_) return;
      rescan = reload_requested_ || !woken;  // SIGHUP, or the poll period is up
      reload_requested_ = false;
      unload_requested_ = false;
    }
    if (!rescan) {
      // A removed version's last call ended: unloaded here, off the
      // threads of its engine.
      repository_->UnloadReleased();
    } else if (absl::Status s = repository_->Reload(); !s.ok()) {
      Log(LogLevel::kError, "model_reload_failed", {{"error", s.message()}});
    }
  }
}

void Server::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  // Everything is over by `deadline`, whatever clients do: calls still
  // open at `cutoff` are cancelled, which takes well under the margin.
  const absl::Time deadline = absl::Now() + grace;
  const absl::Time cutoff = deadline - std::min(absl::Seconds(1), grace / 4);
  health_->SetServing(false);
  service_->StartDraining();  // refuses new calls, flushes open streams
  if (!service_->WaitForIdle(cutoff)) {
    Log(LogLevel::kWarning, "shutdown_grace_expired",
        {{"grace_seconds", absl::ToDoubleSeconds(grace)}});
    service_->CancelAll();
  } else if (guard_ != nullptr) {
    // Whatever gRPC cancels from here on never reached the service.
    guard_->EnterShutdown();
  }
  // Its calls are over or cancelled: the answers being written (and the
  // 503s of requests that came late) go out before its connections close.
  if (http_ != nullptr) http_->WaitUntilIdle(deadline);
  http_.reset();
  http_front_door_.reset();  // after civetweb: the answers it wrote reach the clients
  {
    absl::MutexLock lock(&watch_mu_);
    stop_watching_ = true;
  }
  if (watcher_.joinable()) watcher_.join();  // after a load in progress
  if (repository_ != nullptr) {
    repository_->Shutdown(std::max(absl::ZeroDuration(), cutoff - absl::Now()));
  }
  health_->Shutdown();
  // Cancels whatever still runs (health watches, reflection) at the
  // deadline.
  grpc_server_->Shutdown(absl::ToChronoTime(std::max(deadline, absl::Now())));
  grpc_server_->Wait();
  guard_.reset();  // closes whatever connections are left
}

Server::~Server() {
  if (grpc_server_ != nullptr) Shutdown(absl::Seconds(config_.grace_seconds));
  grpc_server_.reset();
  repository_.reset();
}

}  // namespace emoserve
