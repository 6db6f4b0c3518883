// grpc.health.v1.Health: NOT_SERVING until the model is loaded and warmed
// up, SERVING while calls are taken, NOT_SERVING again while shutting down.
#ifndef EMOSERVE_SERVER_HEALTH_SERVICE_H_
#define EMOSERVE_SERVER_HEALTH_SERVICE_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "grpc/health/v1/health.grpc.pb.h"  // emoserve_health_proto

namespace emoserve {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // `services` are the fully qualified names answered besides "" (the whole
  // server); they all share one status, NOT_SERVING at first. Watch calls
  // beyond `max_watches` open at once get RESOURCE_EXHAUSTED.
  explicit HealthService(std::vector<std::string> services, int max_watches = 256);
  ~HealthService() override;

  void SetServing(bool serving);
  bool serving() const;
  // NOT_SERVING for good; open Watch calls end with UNAVAILABLE so that the
  // server's shutdown does not wait for them.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request,
      grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;

  ServingStatus StatusOf(const std::string& service) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unregister(Watcher* watcher);

  const std::vector<std::string> services_;
  const size_t max_watches_;
  mutable absl::Mutex mu_;
  bool serving_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<Watcher*> watchers_ ABSL_GUARDED_BY(mu_);
  absl::CondVar watchers_gone_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_HEALTH_SERVICE_H_
