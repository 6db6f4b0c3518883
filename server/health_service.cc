#include "server/health_service.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace emoserve {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch call: sends the current status, then every change. Changes that
// arrive while a write is in flight collapse into the latest one.
class HealthService::Watcher final
    : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  Watcher(HealthService* service, std::string name)
      : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // Called with the service's mutex held (so the watcher cannot go away).
  // Only changes are sent.
  void Send(ServingStatus status) {
    absl::MutexLock lock(&mu_);
    if (finishing_ || last_sent_ == status) return;
    last_sent_ = status;
    if (write_in_flight_) {
      pending_ = status;
      return;
    }
    StartWriteLocked(status);
  }

  // Ends the call after the writes already asked for.
  void End(grpc::Status status) {
    absl::MutexLock lock(&mu_);
    end_status_ = std::move(status);
    if (!write_in_flight_) FinishLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    write_in_flight_ = false;
    if (!ok) {
      // The client went away; OnCancel follows or has run.
      FinishLocked(grpc::Status::CANCELLED);
      return;
    }
    if (pending_.has_value()) {
      const ServingStatus next = *pending_;
      pending_.reset();
      StartWriteLocked(next);
    } else if (end_status_.has_value()) {
      FinishLocked();
    }
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    service_->Unregister(this);
    delete this;
  }

 private:
  void StartWriteLocked(ServingStatus status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    response_.set_status(status);
    write_in_flight_ = true;
    StartWrite(&response_);
  }

  void FinishLocked(std::optional<grpc::Status> status = std::nullopt)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finishing_) return;
    finishing_ = true;
    Finish(status.has_value() ? *status : *end_status_);
  }

  HealthService* const service_;
  const std::string name_;
  absl::Mutex mu_;
  HealthCheckResponse response_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<ServingStatus> pending_ ABSL_GUARDED_BY(mu_);
  // The latest status sent or queued.
  std::optional<ServingStatus> last_sent_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> end_status_ ABSL_GUARDED_BY(mu_);
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
};

HealthService::HealthService(std::vector<std::string> services, int max_watches)
    : services_(std::move(services)), max_watches_(static_cast<size_t>(std::max(1, max_watches))) {}

HealthService::~HealthService() {
  // The gRPC server is shut down first; wait for its last OnDone.
  absl::MutexLock lock(&mu_);
  while (!watchers_.empty()) watchers_gone_.Wait(&mu_);
}

HealthService::ServingStatus HealthService::StatusOf(
    const std::string& service) const {
  const bool known = service.empty() ||
                     std::find(services_.begin(), services_.end(), service) !=
                         services_.end();
  if (!known) return HealthCheckResponse::SERVICE_UNKNOWN;
  return serving_ ? HealthCheckResponse::SERVING : HealthCheckResponse::NOT_SERVING;
}

void HealthService::SetServing(bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_ || serving_ == serving) return;
  serving_ = serving;
  for (Watcher* watcher : watchers_) watcher->Send(StatusOf(watcher->name()));
}

bool HealthService::serving() const {
  absl::MutexLock lock(&mu_);
  return serving_ && !shut_down_;
}

void HealthService::Shutdown() {
  absl::MutexLock lock(&mu_);
  serving_ = false;
  shut_down_ = true;
  for (Watcher* watcher : watchers_) {
    watcher->Send(StatusOf(watcher->name()));
    watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"));
  }
}

void HealthService::Unregister(Watcher* watcher) {
  absl::MutexLock lock(&mu_);
  watchers_.erase(watcher);
  if (watchers_.empty()) watchers_gone_.SignalAll();
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::MutexLock lock(&mu_);
  const ServingStatus status = StatusOf(request->service());
  if (status == HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("unknown service \"", request->service(),
                     "\"; this server answers for \"\" and ",
                     absl::StrJoin(services_, ", "))));
    return reactor;
  }
  response->set_status(status);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*context*/, const HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, request->service());
  absl::MutexLock lock(&mu_);
  const bool full = watchers_.size() >= max_watches_;
  watchers_.insert(watcher);
  if (full) {
    watcher->End(grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("the server already holds its maximum of ", max_watches_,
                     " health Watch calls (--max-health-watches); use Check, or retry later")));
    return watcher;
  }
  watcher->Send(StatusOf(watcher->name()));
  if (shut_down_) {
    watcher->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server is shutting down"));
  }
  return watcher;
}

}  // namespace emoserve
