#include "server/metrics.h"

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <exception>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

// civetweb (the Exposer's web server, and the HTTP API's) starts its threads with 100 KiB
// stacks (Debian builds it with USE_STACK_SIZE=102400). glibc carves a
// thread's static TLS out of its stack, and LibTorch's dependencies have
// more than that (OpenBLAS 60 KiB, glog 30 KiB, ...), so pthread_create
// fails with EINVAL and /metrics would never be served in a process that
// runs the model. This definition takes precedence over glibc's for every
// library (the executable exports it: see server/CMakeLists.txt) and only
// raises stack sizes that are too small to hold the TLS.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t stack_size) {
  constexpr size_t kMinStackSize = size_t{1} << 20;
  using SetStackSize = int (*)(pthread_attr_t*, size_t);
  static const auto glibc_set_stack_size =
      reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return glibc_set_stack_size(attr, std::max(stack_size, kMinStackSize));
}

namespace emoserve {
namespace {

// Latencies from a millisecond (a batch of one on a fast machine) to half a
// minute (a long clip under load).
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
      0.25,   0.5,   1.0,    2.5,   5.0,  10.0,  30.0};
  return *buckets;
}

prometheus::Histogram* AddLatencyHistogram(prometheus::Registry& registry,
                                           const std::string& name,
                                           const std::string& help) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add(
      {}, LatencyBuckets());
}

const prometheus::Histogram::BucketBoundaries& BatchSizeBuckets() {
  static const auto* buckets =
      new prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256};
  return *buckets;
}

prometheus::Labels ModelLabels(absl::string_view model, absl::string_view version) {
  return {{"model", std::string(model)}, {"version", std::string(version)}};
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()) {
  prometheus::Registry& r = *registry_;
  calls_ = &prometheus::BuildCounter()
                .Name("emoserve_requests_total")
                .Help("Finished gRPC calls by method and status code")
                .Register(r);
  call_latency_ = &prometheus::BuildHistogram()
                       .Name("emoserve_request_duration_seconds")
                       .Help("Time from a unary call's arrival to its response")
                       .Register(r);
  model_info_ = &prometheus::BuildGauge()
                     .Name("emoserve_model_info")
                     .Help("The served model (always 1)")
                     .Register(r);
  model_state_ = &prometheus::BuildGauge()
                      .Name("emoserve_model_state")
                      .Help("1 for each model version's state (loading, ready, failed), else 0")
                      .Register(r);
  model_loads_ = &prometheus::BuildCounter()
                      .Name("emoserve_model_loads_total")
                      .Help("Model versions loaded at start or reload, by result (loaded, failed)")
                      .Register(r);
  decode_wait_ = AddLatencyHistogram(r, "emoserve_decode_wait_seconds",
                                     "Time a Classify call waited for a decoding worker");
  decode_ = AddLatencyHistogram(r, "emoserve_decode_seconds",
                                "Decoding and resampling one Classify call's audio");
  queue_wait_ = &prometheus::BuildHistogram()
                     .Name("emoserve_queue_wait_seconds")
                     .Help("Time a window waited for a feature worker and the model")
                     .Register(r);
  features_ = &prometheus::BuildHistogram()
                   .Name("emoserve_feature_extraction_seconds")
                   .Help("Feature extraction time per window")
                   .Register(r);
  inference_ = &prometheus::BuildHistogram()
                    .Name("emoserve_inference_seconds")
                    .Help("Model time per batch")
                    .Register(r);
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("emoserve_batch_size")
                     .Help("Windows per batch run on the model")
                     .Register(r);
  queue_depth_ = &prometheus::BuildGauge()
                      .Name("emoserve_queue_depth")
                      .Help("Windows waiting for features or the model, per model version")
                      .Register(r);
  active_streams_ = &prometheus::BuildGauge()
                         .Name("emoserve_active_streams")
                         .Help("Open StreamClassify calls")
                         .Register(r)
                         .Add({});
  connections_ = &prometheus::BuildGauge()
                      .Name("emoserve_connections")
                      .Help("Open plaintext gRPC connections (through the connection guard)")
                      .Register(r)
                      .Add({});
  connections_refused_ = &prometheus::BuildCounter()
                              .Name("emoserve_connections_refused_total")
                              .Help("Connections the guard closed, by reason: rapid_reset, "
                                    "control_flood, max_connections, no_preface, "
                                    "refused_uploads")
                              .Register(r);
  upload_memory_ = &prometheus::BuildGauge()
                        .Name("emoserve_upload_memory_bytes")
                        .Help("Declared lengths of the gRPC messages being received "
                              "(half of --grpc-memory-mb at most)")
                        .Register(r)
                        .Add({});
  uploads_refused_ = &prometheus::BuildCounter()
                          .Name("emoserve_uploads_refused_total")
                          .Help("Messages refused (RESOURCE_EXHAUSTED) because the memory for "
                                "messages being received was full")
                          .Register(r)
                          .Add({});
  audio_memory_ = &prometheus::BuildGauge()
                       .Name("emoserve_audio_memory_bytes")
                       .Help("Audio in flight charged to the budget (requests, decoded audio, "
                             "stream buffers and windows)")
                       .Register(r)
                       .Add({});
  audio_memory_limit_ = &prometheus::BuildGauge()
                             .Name("emoserve_audio_memory_limit_bytes")
                             .Help("The budget of audio in flight (--max-audio-memory-mb)")
                             .Register(r)
                             .Add({});
  audio_seconds_ = &prometheus::BuildCounter()
                        .Name("emoserve_audio_seconds_total")
                        .Help("Seconds of audio accepted for classification")
                        .Register(r)
                        .Add({});
}

ServerMetrics::~ServerMetrics() = default;

absl::Status ServerMetrics::Expose(const std::string& host, int port, int threads,
                                   int request_timeout_ms) {
  // IPv6 literals need brackets in civetweb's listening_ports.
  const std::string address = host.find(':') != std::string::npos
                                  ? absl::StrCat("[", host, "]:", port)
                                  : absl::StrCat(host, ":", port);
  try {
    // civetweb: a worker per connection; request_timeout_ms bounds how long
    // one waits for a request; keep-alive off so that a scraper's idle
    // connection does not hold a worker between scrapes.
    auto exposer = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", address, "num_threads", absl::StrCat(threads),
        "request_timeout_ms", absl::StrCat(request_timeout_ms), "enable_keep_alive", "no"});
    exposer->RegisterCollectable(registry_);
    exposer_ = std::move(exposer);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve metrics on ", address, ": ", e.what(),
        " (is the port in use? --metrics-port 0 disables metrics)"));
  }
  return absl::OkStatus();
}

void ServerMetrics::SetModelInfo(absl::string_view name, absl::string_view version,
                                 absl::string_view device, absl::string_view precision) {
  model_info_
      ->Add({{"name", std::string(name)},
             {"version", std::string(version)},
             {"device", std::string(device)},
             {"precision", std::string(precision)}})
      .Set(1);
}

void ServerMetrics::SetModelState(absl::string_view model, absl::string_view version,
                                  absl::string_view state) {
  for (absl::string_view s : {"loading", "ready", "failed"}) {
    prometheus::Labels labels{
        {"model", std::string(model)}, {"version", std::string(version)}, {"state", std::string(s)}};
    if (state.empty()) {
      if (model_state_->Has(labels)) model_state_->Remove(&model_state_->Add(labels));
    } else {
      model_state_->Add(labels).Set(s == state ? 1 : 0);
    }
  }
}

void ServerMetrics::ModelLoadFinished(absl::string_view result) {
  model_loads_->Add({{"result", std::string(result)}}).Increment();
}

void ServerMetrics::OnDecoded(absl::Duration wait, absl::Duration decoding) {
  decode_wait_->Observe(absl::ToDoubleSeconds(wait));
  decode_->Observe(absl::ToDoubleSeconds(decoding));
}

void ServerMetrics::RecordCall(absl::string_view method, absl::StatusCode code,
                               absl::string_view model, absl::string_view version) {
  prometheus::Labels labels = ModelLabels(model, version);
  labels.emplace("method", std::string(method));
  labels.emplace("code", absl::StatusCodeToString(code));
  calls_->Add(labels).Increment();
}

void ServerMetrics::RecordLatency(absl::string_view method, absl::Duration latency,
                                  absl::string_view model, absl::string_view version) {
  prometheus::Labels labels = ModelLabels(model, version);
  labels.emplace("method", std::string(method));
  call_latency_->Add(labels, LatencyBuckets()).Observe(absl::ToDoubleSeconds(latency));
}

// One model version's series, as its engine's observer.
class ServerMetrics::ModelMetrics final : public EngineObserver {
 public:
  ModelMetrics(ServerMetrics& m, const prometheus::Labels& labels)
      : queue_wait_(m.queue_wait_->Add(labels, LatencyBuckets())),
        features_(m.features_->Add(labels, LatencyBuckets())),
        inference_(m.inference_->Add(labels, LatencyBuckets())),
        batch_size_(m.batch_size_->Add(labels, BatchSizeBuckets())),
        queue_depth_(m.queue_depth_->Add(labels)) {}

  void Remove(ServerMetrics& m) {
    m.queue_wait_->Remove(&queue_wait_);
    m.features_->Remove(&features_);
    m.inference_->Remove(&inference_);
    m.batch_size_->Remove(&batch_size_);
    m.queue_depth_->Remove(&queue_depth_);
  }

  void OnWindow(absl::Duration queue_wait, absl::Duration features) override {
    queue_wait_.Observe(absl::ToDoubleSeconds(queue_wait));
    features_.Observe(absl::ToDoubleSeconds(features));
  }
  void OnBatch(int batch_size, absl::Duration inference) override {
    batch_size_.Observe(batch_size);
    inference_.Observe(absl::ToDoubleSeconds(inference));
  }
  void OnQueueDepth(int depth) override { queue_depth_.Set(depth); }

 private:
  prometheus::Histogram& queue_wait_;
  prometheus::Histogram& features_;
  prometheus::Histogram& inference_;
  prometheus::Histogram& batch_size_;
  prometheus::Gauge& queue_depth_;
};

EngineObserver* ServerMetrics::ForModel(const std::string& model, const std::string& version) {
  absl::MutexLock lock(&models_mu_);
  std::unique_ptr<ModelMetrics>& metrics = models_[{model, version}];
  if (metrics == nullptr) {
    metrics = std::make_unique<ModelMetrics>(*this, ModelLabels(model, version));
  }
  return metrics.get();
}

void ServerMetrics::ForgetModel(const std::string& model, const std::string& version) {
  std::unique_ptr<ModelMetrics> gone;
  {
    absl::MutexLock lock(&models_mu_);
    auto it = models_.find({model, version});
    if (it == models_.end()) return;
    gone = std::move(it->second);
    models_.erase(it);
  }
  gone->Remove(*this);
}

void ServerMetrics::AddAudioSeconds(double seconds) {
  if (seconds > 0) audio_seconds_->Increment(seconds);
}

void ServerMetrics::StreamStarted() { active_streams_->Increment(); }

void ServerMetrics::StreamEnded() { active_streams_->Decrement(); }

void ServerMetrics::SetConnections(int open) { connections_->Set(open); }

void ServerMetrics::ConnectionRefused(absl::string_view reason) {
  connections_refused_->Add({{"reason", std::string(reason)}}).Increment();
}

void ServerMetrics::SetUploadMemory(int64_t bytes) {
  upload_memory_->Set(static_cast<double>(bytes));
}

void ServerMetrics::UploadsRefused(int count) { uploads_refused_->Increment(count); }

void ServerMetrics::SetAudioMemory(int64_t bytes) {
  audio_memory_->Set(static_cast<double>(bytes));
}

void ServerMetrics::SetAudioMemoryLimit(int64_t bytes) {
  audio_memory_limit_->Set(static_cast<double>(bytes));
}

std::string ServerMetrics::Render() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

}  // namespace emoserve
