// Prometheus metrics of the server: calls by method, code and model,
// latencies by stage, batch sizes, queue depth (per model version),
// streams, audio processed, models and their states. Each model version's
// engine reports its stages through its own EngineObserver (ForModel); the
// service counts calls. Prometheus stays in server/.
#ifndef EMOSERVE_SERVER_METRICS_H_
#define EMOSERVE_SERVER_METRICS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/engine.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace emoserve {

class ServerMetrics {
 public:
  ServerMetrics();
  ~ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  // Serves GET /metrics on host:port in the text exposition format, with
  // `threads` workers; a connection that sends no complete request within
  // `request_timeout_ms` is closed, so that idle or slow connections cannot
  // hold every worker.
  absl::Status Expose(const std::string& host, int port, int threads = 16,
                      int request_timeout_ms = 1000);

  void SetModelInfo(absl::string_view name, absl::string_view version,
                    absl::string_view device, absl::string_view precision);
  // emoserve_model_state{model,version,state}: 1 for the version's state
  // ("loading", "ready", "failed"), 0 for the others; "" removes the
  // version (unloaded, or gone from the repository).
  void SetModelState(absl::string_view model, absl::string_view version,
                     absl::string_view state);
  // One version loaded ("loaded") or not ("failed") by a start or reload.
  void ModelLoadFinished(absl::string_view result);
  // One finished call of `method` ("Classify", ...) with its gRPC code, on
  // model `model` version `version` ("" when it ended before it had one).
  void RecordCall(absl::string_view method, absl::StatusCode code, absl::string_view model,
                  absl::string_view version);
  // Time from a unary call's arrival to its response.
  void RecordLatency(absl::string_view method, absl::Duration latency, absl::string_view model,
                     absl::string_view version);
  // The observer of one model version's engine: its stage latencies, batch
  // sizes and queue depth, labelled model and version. Lives until
  // ForgetModel, which may only come once that engine is gone.
  EngineObserver* ForModel(const std::string& model, const std::string& version);
  void ForgetModel(const std::string& model, const std::string& version);
  // A Classify call's audio: time it waited for a decoding worker, and
  // decoding it to the model's rate.
  void OnDecoded(absl::Duration wait, absl::Duration decoding);
  // Audio accepted for classification, in seconds of signal.
  void AddAudioSeconds(double seconds);
  void StreamStarted();
  void StreamEnded();
  // Connections open (through the connection guard), and one it closed.
  void SetConnections(int open);
  void ConnectionRefused(absl::string_view reason);
  // The budget of audio in flight: bytes in use, and its size.
  void SetUploadMemory(int64_t bytes);
  void UploadsRefused(int count);
  void SetAudioMemory(int64_t bytes);
  void SetAudioMemoryLimit(int64_t bytes);

  // The current metrics in the text format, as /metrics serves them.
  std::string Render() const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Family<prometheus::Counter>* calls_;
  prometheus::Family<prometheus::Histogram>* call_latency_;
  prometheus::Family<prometheus::Gauge>* model_info_;
  prometheus::Family<prometheus::Gauge>* model_state_;
  prometheus::Family<prometheus::Counter>* model_loads_;
  prometheus::Histogram* decode_wait_;
  prometheus::Histogram* decode_;
  class ModelMetrics;
  prometheus::Family<prometheus::Histogram>* queue_wait_;
  prometheus::Family<prometheus::Histogram>* features_;
  prometheus::Family<prometheus::Histogram>* inference_;
  prometheus::Family<prometheus::Histogram>* batch_size_;
  prometheus::Family<prometheus::Gauge>* queue_depth_;
  absl::Mutex models_mu_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<ModelMetrics>> models_
      ABSL_GUARDED_BY(models_mu_);
  prometheus::Gauge* active_streams_;
  prometheus::Gauge* connections_;
  prometheus::Family<prometheus::Counter>* connections_refused_;
  prometheus::Gauge* upload_memory_;
  prometheus::Counter* uploads_refused_;
  prometheus::Gauge* audio_memory_;
  prometheus::Gauge* audio_memory_limit_;
  prometheus::Counter* audio_seconds_;
};

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_METRICS_H_
