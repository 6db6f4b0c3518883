// The whole server: gRPC (EmotionService, health, reflection), metrics, the
// model and its engine, and the orderly shutdown. main() and the tests use
// it the same way: Start, LoadModel, ..., Shutdown.
#ifndef EMOSERVE_SERVER_SERVER_H_
#define EMOSERVE_SERVER_SERVER_H_

#include <memory>
#include <thread>

#include <grpcpp/server.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/engine.h"
#include "core/model_repository.h"
#include "server/config.h"
#include "server/connection_guard.h"
#include "server/emotion_service.h"
#include "server/health_service.h"
#include "server/http_front_door.h"
#include "server/http_server.h"
#include "server/metrics.h"

namespace emoserve {

class Server {
 public:
  // Listens for gRPC (and metrics when config.metrics_port > 0). Health is
  // NOT_SERVING and calls get UNAVAILABLE until LoadModel succeeds.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerConfig& config);
  // Shuts down (with config.grace_seconds) unless done already.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Loads config.model (or every version of config.model_repository) on
  // config.device, each with its engine and a warm-up classification, then
  // reports SERVING and starts watching the repository.
  absl::Status LoadModel();

  // Rescans the repository now (SIGHUP), on the thread that watches it:
  // returns at once.
  void ReloadModels();

  // Health goes NOT_SERVING and new calls get UNAVAILABLE; calls in flight
  // may finish within `grace`; streams still open then end with
  // UNAVAILABLE, queued work is dropped, and gRPC stops.
  void Shutdown(absl::Duration grace);

  // The bound gRPC port (the chosen one when config.port is 0).
  int port() const { return port_; }
  // The HTTP/JSON port; 0 when config.http_port is 0.
  int http_port() const { return http_front_door_ != nullptr ? http_front_door_->port() : 0; }
  const ServerConfig& config() const { return config_; }
  ServerMetrics& metrics() { return *metrics_; }

 private:
  explicit Server(const ServerConfig& config);
  // Loads, warms up and starts the engine of one model directory.
  absl::StatusOr<std::unique_ptr<Engine>> LoadEngine(const std::string& dir,
                                                     const std::string& name,
                                                     const std::string& version);
  void OnRepositoryEvent(const RepositoryEvent& event);
  // The repository watcher: rescans every config.model_poll_seconds and
  // when asked, until Shutdown.
  void WatchRepository();

  const ServerConfig config_;
  int port_ = 0;
  bool shut_down_ = false;
  // Declared in destruction order's reverse: the gRPC server goes first,
  // then the engine its calls used, then the services and metrics.
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<EmotionService> service_;
  std::shared_ptr<FeatureWorkers> feature_workers_;  // shared by every version's engine
  std::unique_ptr<ModelRepository> repository_;
  std::thread watcher_;
  absl::Mutex watch_mu_;
  bool reload_requested_ ABSL_GUARDED_BY(watch_mu_) = false;
  bool unload_requested_ ABSL_GUARDED_BY(watch_mu_) = false;  // a version was released
  bool stop_watching_ ABSL_GUARDED_BY(watch_mu_) = false;
  std::unique_ptr<grpc::Server> grpc_server_;
  // Stopped before the service whose calls it makes.
  std::unique_ptr<HttpServer> http_;
  std::unique_ptr<HttpFrontDoor> http_front_door_;
  // Plaintext: the listener in front of gRPC (destroyed before gRPC).
  std::unique_ptr<ConnectionGuard> guard_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_SERVER_H_
