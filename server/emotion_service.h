// emoserve.v1.EmotionService on gRPC's callback API: calls hand their work
// to the engine (or, for whole-file decoding, to a small worker pool) and
// finish from the engine's completion; no thread waits on a call.
#ifndef EMOSERVE_SERVER_EMOTION_SERVICE_H_
#define EMOSERVE_SERVER_EMOTION_SERVICE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "emoserve/v1/emoserve.grpc.pb.h"
#include "server/config.h"
#include "server/metrics.h"
#include "server/worker_pool.h"

namespace emoserve {

class EmotionService final : public v1::EmotionService::CallbackService {
 public:
  // `metrics` must outlive the service.
  EmotionService(const ServerConfig& config, ServerMetrics* metrics);
  // The gRPC server must have shut down first.
  ~EmotionService() override;

  // Calls are answered UNAVAILABLE until the engine is set; it must outlive
  // every call (shut the gRPC server down before destroying it).
  absl::Status SetEngine(Engine* engine);

  // From now on new calls get UNAVAILABLE.
  void StartDraining();
  // Waits until no Classify or StreamClassify call is open, or `deadline`.
  // True when none is.
  bool WaitForIdle(absl::Time deadline);
  // Ends every open stream with `status` (after the results already
  // computed are sent).
  void EndStreams(const absl::Status& status);

  grpc::ServerUnaryReactor* Classify(grpc::CallbackServerContext* context,
                                     const v1::ClassifyRequest* request,
                                     v1::ClassifyResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>*
  StreamClassify(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

 private:
  class ClassifyCall;
  class StreamCall;
  enum class CallKind { kUnary, kStream };

  // Admits a call of `kind`: the engine, or UNAVAILABLE (loading, draining)
  // or RESOURCE_EXHAUSTED (too many streams). An admitted call calls
  // Release once, when gRPC is done with it.
  absl::StatusOr<Engine*> Admit(CallKind kind, StreamCall* stream = nullptr);
  void Release(CallKind kind, StreamCall* stream = nullptr);
  // Metrics and the debug log line of a finished call.
  void RecordCall(absl::string_view method, const absl::Status& status,
                  absl::Time start);

  const ServerConfig config_;
  ServerMetrics* const metrics_;
  WorkerPool decode_pool_;

  absl::Mutex mu_;
  Engine* engine_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::optional<v1::ModelInfo> model_info_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int open_calls_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<StreamCall*> streams_ ABSL_GUARDED_BY(mu_);
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_EMOTION_SERVICE_H_
