// emoserve.v1.EmotionService on gRPC's callback API. gRPC's threads only
// hand work over: decoding, resampling and windowing run on a worker pool,
// features and the model on the engine's threads; every call is charged to
// the server's budget of audio in flight and gives it back when it ends.
#ifndef EMOSERVE_SERVER_EMOTION_SERVICE_H_
#define EMOSERVE_SERVER_EMOTION_SERVICE_H_

#include <functional>
#include <memory>
#include <optional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/model_repository.h"
#include "core/memory_budget.h"
#include "emoserve/v1/emoserve.grpc.pb.h"
#include "server/config.h"
#include "server/metrics.h"
#include "server/requests.h"
#include "server/worker_pool.h"

namespace emoserve {

class EmotionService final : public v1::EmotionService::CallbackService {
 public:
  // `metrics` must outlive the service.
  EmotionService(const ServerConfig& config, ServerMetrics* metrics);
  // The gRPC server must have shut down first.
  ~EmotionService() override;

  // Calls are answered UNAVAILABLE until the repository is set; it must
  // outlive every call (shut the gRPC server down before destroying it).
  void SetRepository(const ModelRepository* repository);

  // Shutdown, in this order. StartDraining: new calls get UNAVAILABLE and
  // open streams are flushed (their last window and open utterance are
  // classified, then they end OK). WaitForIdle: true once no call is open,
  // false at `deadline`. CancelAll: cancels every call still open.
  void StartDraining();
  bool WaitForIdle(absl::Time deadline);
  void CancelAll();

  const MemoryBudget& budget() const { return budget_; }

  // For other transports (HTTP/JSON): the same admission, limits, model
  // lookup and metrics (under `method`) as the gRPC methods.
  using ClassifyDone = std::function<void(const absl::Status&, v1::ClassifyResponse)>;
  // Classify; `request_lease` holds the request's bytes when the transport
  // charged them before reading them (null: charged here). `done` is called
  // once, on any thread, possibly before this returns.
  void ClassifyFor(absl::string_view method, std::unique_ptr<v1::ClassifyRequest> request,
                   absl::Time deadline, std::unique_ptr<BudgetLease> request_lease,
                   ClassifyDone done);
  // Charges `bytes` of a request about to be read to the budget of audio in
  // flight (RESOURCE_EXHAUSTED when full).
  absl::StatusOr<std::unique_ptr<BudgetLease>> ReserveRequestBytes(int64_t bytes);

  // A stream over another transport (WebSocket), with StreamClassify's
  // session, limits and metrics. The transport implements StreamTransport
  // and reports to the StreamEvents that StreamFor returns. The service
  // calls the transport from its own threads, sometimes holding the call's
  // lock: a transport never calls an event from inside one of its methods.
  class StreamTransport {
   public:
    virtual ~StreamTransport() = default;
    // Read the client's next message into `into`, then MessageRead (or
    // MessageRefused). One read at a time.
    virtual void Read(v1::StreamClassifyRequest* into) = 0;
    // Send `response` (alive until Written), then Written. One at a time.
    virtual void Write(const v1::StreamClassifyResponse* response) = 0;
    // The call is over: send `outcome`, then Done. Called once, last.
    virtual void Finish(const absl::Status& outcome) = 0;
    // Whether the client left (or Cancel was called).
    virtual bool Cancelled() const = 0;
    // Cut the client off (shutdown grace over; a client that reads
    // nothing), then report Gone.
    virtual void Cancel() = 0;
  };
  class StreamEvents {
   public:
    // The read is done: ok, or the client ended its side (cleanly unless
    // StreamTransport::Cancelled()).
    virtual void MessageRead(bool ok) = 0;
    // What the client sent is not a valid message: the call fails with `why`.
    virtual void MessageRefused(const absl::Status& why) = 0;
    virtual void Written(bool ok) = 0;
    // The client left (or Cancel took effect).
    virtual void Gone() = 0;
    // After Finish: the transport calls nothing more; the call may be
    // deleted before this returns.
    virtual void Done() = 0;

   protected:
    ~StreamEvents() = default;
  };
  // Starts a stream on `transport` (which must outlive Done); its metrics
  // are under `method`. The transport may be told Finish before this returns.
  StreamEvents* StreamFor(absl::string_view method, StreamTransport* transport);
  absl::StatusOr<v1::ModelInfo> ModelInfoFor(absl::string_view method,
                                             const v1::GetModelInfoRequest& request);
  absl::StatusOr<v1::ListModelsResponse> ModelsFor(absl::string_view method);

  grpc::ServerUnaryReactor* Classify(grpc::CallbackServerContext* context,
                                     const v1::ClassifyRequest* request,
                                     v1::ClassifyResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>*
  StreamClassify(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

 private:
  class Call;
  class ClassifyCall;
  class GrpcClassifyCall;
  class HttpClassifyCall;
  class StreamCall;
  class GrpcStreamCall;
  class ExternalStreamCall;
  enum class CallKind { kUnary, kStream };

  // Admits `call`, or UNAVAILABLE (loading, draining) or
  // RESOURCE_EXHAUSTED (too many streams). An admitted call is registered
  // until Release, which it calls once, when gRPC is done with it.
  absl::Status Admit(Call* call, CallKind kind);
  // The model version a call asks for (see ModelRepository::Find).
  absl::StatusOr<std::shared_ptr<const ServedModel>> FindModel(absl::string_view name,
                                                               int64_t version);
  void Release(Call* call, CallKind kind);
  // Metrics and the debug log line of a finished call, on `model` (null
  // when it ended before it had one).
  void RecordCall(absl::string_view method, const absl::Status& status, absl::Time start,
                  const ServedModel* model, CallKind kind);
  // Ends streams that have been idle for config_.stream_idle_seconds.
  void WatchIdleStreams();

  const ServerConfig config_;
  const RequestLimits limits_;
  ServerMetrics* const metrics_;
  MemoryBudget budget_;
  WorkerPool workers_;

  absl::Mutex mu_;
  const ModelRepository* repository_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Open Classify and StreamClassify calls; an entry stays alive while mu_
  // is held (a call's OnDone needs mu_ to leave before it is deleted).
  absl::flat_hash_set<Call*> calls_ ABSL_GUARDED_BY(mu_);
  int streams_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread idle_watcher_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_EMOTION_SERVICE_H_
