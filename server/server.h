// The whole server: gRPC (EmotionService, health, reflection), metrics, the
// model and its engine, and the orderly shutdown. main() and the tests use
// it the same way: Start, LoadModel, ..., Shutdown.
#ifndef EMOSERVE_SERVER_SERVER_H_
#define EMOSERVE_SERVER_SERVER_H_

#include <memory>

#include <grpcpp/server.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "server/config.h"
#include "server/connection_guard.h"
#include "server/emotion_service.h"
#include "server/health_service.h"
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

  // Loads config.model on config.device, starts the engine, runs a warm-up
  // classification through it, then reports SERVING.
  absl::Status LoadModel();

  // Health goes NOT_SERVING and new calls get UNAVAILABLE; calls in flight
  // may finish within `grace`; streams still open then end with
  // UNAVAILABLE, queued work is dropped, and gRPC stops.
  void Shutdown(absl::Duration grace);

  // The bound gRPC port (the chosen one when config.port is 0).
  int port() const { return port_; }
  const ServerConfig& config() const { return config_; }
  ServerMetrics& metrics() { return *metrics_; }

 private:
  explicit Server(const ServerConfig& config);

  const ServerConfig config_;
  int port_ = 0;
  bool shut_down_ = false;
  // Declared in destruction order's reverse: the gRPC server goes first,
  // then the engine its calls used, then the services and metrics.
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<EmotionService> service_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<grpc::Server> grpc_server_;
  // Plaintext: the listener in front of gRPC (destroyed before gRPC).
  std::unique_ptr<ConnectionGuard> guard_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_SERVER_H_
