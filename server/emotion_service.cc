#include "server/emotion_service.h"

#include <cmath>
#include <deque>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/audio.h"
#include "core/resampler.h"
#include "core/stream.h"
#include "server/log.h"
#include "server/proto_convert.h"

namespace emoserve {
namespace {

constexpr absl::string_view kClassify = "Classify";
constexpr absl::string_view kStreamClassify = "StreamClassify";
constexpr absl::string_view kGetModelInfo = "GetModelInfo";

// Stream responses waiting to be written beyond which a stream stops reading
// audio until its client reads: memory stays bounded with a slow reader.
constexpr size_t kMaxQueuedResponses = 64;

// Windows that `samples` at `rate` make with `hop_seconds` (0: half the
// window), as the engine splits them.
size_t CountWindows(size_t samples, const ModelConfig& model, double hop_seconds) {
  const size_t window = static_cast<size_t>(model.window_samples());
  const size_t hop =
      hop_seconds == 0
          ? std::max<size_t>(1, window / 2)
          : std::max<size_t>(1, static_cast<size_t>(std::llround(hop_seconds * model.sample_rate)));
  if (samples <= window) return 1;
  return (samples - window + hop - 1) / hop + 1;
}

absl::Status CheckHop(double hop_seconds, const ModelConfig& model,
                      absl::string_view field) {
  if (!std::isfinite(hop_seconds) || hop_seconds < 0 ||
      hop_seconds > model.window_seconds ||
      (hop_seconds > 0 && std::llround(hop_seconds * model.sample_rate) < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " is ", hop_seconds, "; use 0 (half the model's window) or a value in (0, ",
        model.window_seconds, "] seconds"));
  }
  return absl::OkStatus();
}

// Why a call that the client no longer waits for ended.
absl::Status Abandoned(absl::Time deadline) {
  return absl::Now() >= deadline ? absl::DeadlineExceededError("the call's deadline passed")
                                 : absl::CancelledError("the client cancelled the call");
}

// The outcome to report: a cancelled call (gRPC cancels at the deadline
// too) ended that way, whatever the work's status; the client saw no other.
absl::Status Outcome(const absl::Status& status, grpc::CallbackServerContext* context,
                     absl::Time deadline) {
  if (absl::IsCancelled(status) || context->IsCancelled()) return Abandoned(deadline);
  return status;
}

}  // namespace

// --------------------------------------------------------------------------
// Classify: validate on the gRPC thread, decode and resample on the worker
// pool, classify on the engine, finish from the engine's completion.

class EmotionService::ClassifyCall final : public grpc::ServerUnaryReactor {
 public:
  ClassifyCall(EmotionService* service, grpc::CallbackServerContext* context,
               const v1::ClassifyRequest* request, v1::ClassifyResponse* response)
      : service_(service),
        context_(context),
        request_(request),
        response_(response),
        deadline_(ToAbslDeadline(context->deadline())) {
    absl::StatusOr<Engine*> engine = service_->Admit(CallKind::kUnary);
    if (!engine.ok()) {
      Complete(engine.status());
      return;
    }
    admitted_ = true;
    engine_ = *engine;
    if (absl::Status valid = Validate(); !valid.ok()) {
      Complete(valid);
      return;
    }
    if (!service_->decode_pool_.TryPost([this] { DecodeAndClassify(); })) {
      Complete(absl::ResourceExhaustedError(absl::StrCat(
          "the server's decoding queue is full (", service_->config_.max_queue_size,
          " requests wait); retry with backoff")));
    }
  }

  void OnCancel() override { cancel_->Cancel(); }

  void OnDone() override {
    if (admitted_) service_->Release(CallKind::kUnary);
    delete this;
  }

 private:
  absl::Status Validate() {
    if (request_->audio().empty()) {
      return absl::InvalidArgumentError(
          "audio is empty: put the file's bytes (or raw PCM with `format`) in "
          "ClassifyRequest.audio");
    }
    absl::StatusOr<std::optional<RawPcmFormat>> raw =
        RawPcmFormatFromProto(request_->format());
    if (!raw.ok()) return raw.status();
    raw_ = *raw;
    return CheckHop(request_->hop_seconds(), engine_->model().config(), "hop_seconds");
  }

  void DecodeAndClassify() {
    if (cancel_->cancelled()) {
      Complete(Abandoned(deadline_));
      return;
    }
    if (absl::Now() >= deadline_) {
      Complete(absl::DeadlineExceededError("the call's deadline passed before decoding"));
      return;
    }
    const ServerConfig& config = service_->config_;
    DecodeOptions options;
    options.max_duration_seconds = config.max_unary_seconds;
    options.raw = raw_;
    absl::StatusOr<Audio> audio = DecodeAudio(request_->audio(), options);
    if (!audio.ok()) {
      if (absl::IsOutOfRange(audio.status())) {
        Complete(absl::ResourceExhaustedError(absl::StrCat(
            audio.status().message(), "; this server's --max-unary-seconds is ",
            config.max_unary_seconds, ": use StreamClassify for longer audio")));
      } else {
        Complete(absl::Status(audio.status().code(),
                              absl::StrCat("audio: ", audio.status().message())));
      }
      return;
    }
    const ModelConfig& model = engine_->model().config();
    absl::StatusOr<std::vector<float>> samples =
        Resample(audio->samples, audio->sample_rate, model.sample_rate);
    if (!samples.ok()) {
      Complete(samples.status());
      return;
    }
    const size_t windows = CountWindows(samples->size(), model, request_->hop_seconds());
    if (windows > static_cast<size_t>(config.max_queue_size)) {
      Complete(absl::ResourceExhaustedError(absl::StrCat(
          "the audio makes ", windows, " windows at this hop; the server takes at most ",
          config.max_queue_size, " per call: use a larger hop_seconds or shorter audio")));
      return;
    }
    duration_seconds_ = audio->duration_seconds();
    ClipRequest clip;
    clip.samples = *std::move(samples);
    clip.hop_seconds = request_->hop_seconds();
    clip.deadline = deadline_;
    clip.cancel = cancel_;
    clip.done = [this](absl::StatusOr<ClipResult> result) {
      OnClassified(std::move(result));
    };
    // May complete inline; nothing of this object is touched after it.
    engine_->Classify(std::move(clip));
  }

  void OnClassified(absl::StatusOr<ClipResult> result) {
    if (!result.ok()) {
      Complete(result.status());
      return;
    }
    const ModelConfig& model = engine_->model().config();
    response_->set_top_label(
        AddSortedScores(model.labels, result->probabilities, response_->mutable_scores()));
    response_->set_audio_duration_seconds(duration_seconds_);
    response_->set_model_name(model.name);
    response_->set_model_version(model.version);
    response_->set_window_count(static_cast<int>(result->windows.size()));
    response_->set_speech_window_count(result->speech_windows);
    if (request_->include_timeline()) {
      for (const WindowResult& window : result->windows) {
        v1::WindowResult* out = response_->add_timeline();
        out->set_start_seconds(window.start_seconds);
        out->set_end_seconds(window.end_seconds);
        out->set_speech(window.speech);
        // A window has probabilities when it reached the model: speech, or
        // every window of a clip without speech.
        AddSortedScores(model.labels, window.probabilities, out->mutable_scores());
      }
    }
    service_->metrics_->AddAudioSeconds(duration_seconds_);
    Complete(absl::OkStatus());
  }

  // Records the outcome and finishes the call. The last thing this object
  // does: OnDone may delete it on another thread right after.
  void Complete(const absl::Status& status) {
    const absl::Status outcome = Outcome(status, context_, deadline_);
    service_->RecordCall(kClassify, outcome, start_);
    Finish(ToGrpcStatus(outcome));
  }

  EmotionService* const service_;
  grpc::CallbackServerContext* const context_;
  const v1::ClassifyRequest* const request_;
  v1::ClassifyResponse* const response_;
  const absl::Time start_ = absl::Now();
  const absl::Time deadline_;
  const std::shared_ptr<CancelFlag> cancel_ = std::make_shared<CancelFlag>();
  bool admitted_ = false;
  Engine* engine_ = nullptr;
  std::optional<RawPcmFormat> raw_;
  double duration_seconds_ = 0;
};

grpc::ServerUnaryReactor* EmotionService::Classify(grpc::CallbackServerContext* context,
                                                   const v1::ClassifyRequest* request,
                                                   v1::ClassifyResponse* response) {
  return new ClassifyCall(this, context, request, response);
}

// --------------------------------------------------------------------------
// StreamClassify: reads are sequential (one in flight), each chunk is fed to
// the StreamSession on the gRPC thread (cheap: conversion and a resampler
// step); the session's events arrive on engine threads and are queued for
// writing. The call finishes once the session is done and its responses
// are written.
//
// Finish() is always the last thing a path does, outside the mutexes:
// gRPC may run OnDone (which deletes the call) on another thread as soon as
// it is called. Paths that run outside gRPC's reactions (engine callbacks,
// EndStreams) rely on that ordering; EndStreams also holds the service's
// mutex, which OnDone needs before it deletes.

class EmotionService::StreamCall final
    : public grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse> {
 public:
  StreamCall(EmotionService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context), deadline_(ToAbslDeadline(context->deadline())) {
    absl::StatusOr<Engine*> engine = service_->Admit(CallKind::kStream, this);
    if (!engine.ok()) {
      End(engine.status());
      return;
    }
    admitted_ = true;
    engine_ = *engine;
    absl::MutexLock lock(&write_mu_);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      OnClientDone();
      return;
    }
    const bool configured = HasSession();
    absl::Status status = configured ? FeedAudio() : Configure();
    if (!status.ok()) {
      Fail(status);
      return;
    }
    absl::MutexLock lock(&write_mu_);
    if (finishing_ || done_status_.has_value()) return;
    if (queue_.size() > kMaxQueuedResponses) {
      read_paused_ = true;  // OnWriteDone resumes
      return;
    }
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    std::optional<absl::Status> finish;
    {
      absl::MutexLock lock(&write_mu_);
      queue_.pop_front();
      write_in_flight_ = false;
      if (!ok) {
        // The client is gone: nobody reads what is left.
        queue_.clear();
        if (!override_.has_value()) {
          override_ = absl::CancelledError("the client stopped receiving");
        }
      }
      if (!queue_.empty()) {
        StartWriteLocked();
      } else if (done_status_.has_value()) {
        finish = TakeFinishLocked();
      }
      if (ok && read_paused_ && !finishing_ && !done_status_.has_value() &&
          queue_.size() <= kMaxQueuedResponses / 2) {
        read_paused_ = false;
        StartRead(&request_);
      }
    }
    if (finish.has_value()) {
      Complete(*finish);
    } else if (!ok) {
      CancelSession();
    }
  }

  void OnCancel() override { Fail(Abandoned(deadline_)); }

  void OnDone() override {
    std::unique_ptr<StreamSession> session;
    {
      absl::MutexLock lock(&session_mu_);
      session = std::move(session_);
    }
    session.reset();  // waits for its callbacks to return
    if (admitted_) service_->Release(CallKind::kStream, this);
    delete this;
  }

  // Ends the stream with `status` (instead of the session's own outcome).
  // Called from reactions, or with the service's mutex held.
  void Fail(const absl::Status& status) {
    {
      absl::MutexLock lock(&write_mu_);
      if (!override_.has_value()) override_ = status;
    }
    if (!CancelSession()) End(status);
  }

 private:
  bool HasSession() {
    absl::MutexLock lock(&session_mu_);
    return session_ != nullptr;
  }

  // Cancels the session (its on_done follows); false when there is none.
  bool CancelSession() {
    absl::MutexLock lock(&session_mu_);
    if (session_ == nullptr) return false;
    session_->Cancel();
    return true;
  }

  // No more requests: the client half-closed (flush and finish) or the call
  // broke (abandon it).
  void OnClientDone() {
    if (context_->IsCancelled()) {
      Fail(Abandoned(deadline_));
      return;
    }
    {
      absl::MutexLock lock(&session_mu_);
      if (session_ != nullptr) {
        session_->Finish();
        return;
      }
    }
    End(absl::InvalidArgumentError(
        "the stream ended before its config: the first message carries only `config`"));
  }

  absl::Status Configure() {
    if (request_.streaming_request_case() != v1::StreamClassifyRequest::kConfig) {
      return absl::InvalidArgumentError(
          "the first message of a stream carries only `config` (format, hop, "
          "voice activity); audio came first");
    }
    const v1::StreamingConfig& config = request_.config();
    absl::StatusOr<std::optional<RawPcmFormat>> raw = RawPcmFormatFromProto(config.format());
    if (!raw.ok()) return raw.status();
    if (!raw->has_value()) {
      return absl::InvalidArgumentError(
          "config.format.encoding is unset: streams carry raw PCM, so set "
          "AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32 and sample_rate_hertz");
    }
    const ServerConfig& server = service_->config_;
    if (absl::Status hop =
            CheckHop(config.hop_seconds(), engine_->model().config(), "config.hop_seconds");
        !hop.ok()) {
      return hop;
    }
    StreamOptions options;
    options.input_sample_rate = (*raw)->sample_rate;
    options.hop_seconds = config.hop_seconds();
    options.vad_enabled = !config.voice_activity().disabled();
    const double threshold = config.voice_activity().threshold_dbfs();
    if (!std::isfinite(threshold) || threshold > 0 || threshold < -200) {
      return absl::InvalidArgumentError(absl::StrCat(
          "config.voice_activity.threshold_dbfs is ", threshold,
          "; use a level in [-200, 0) dBFS such as -45, or 0 for the server's default"));
    }
    options.vad_threshold_dbfs = threshold == 0 ? server.vad_threshold_dbfs : threshold;
    options.max_seconds = server.max_stream_seconds;
    options.deadline = deadline_;
    format_ = **raw;
    frame_bytes_ = static_cast<size_t>(format_.encoding == PcmEncoding::kS16LE ? 2 : 4) *
                   format_.channels;
    interim_results_ = config.interim_results();
    absl::StatusOr<std::unique_ptr<StreamSession>> session = StreamSession::Create(
        engine_, options, [this](const StreamEvent& event) { OnEvent(event); },
        [this](absl::Status status) { OnSessionDone(std::move(status)); });
    if (!session.ok()) {
      return absl::Status(session.status().code(),
                          absl::StrCat("config: ", session.status().message()));
    }
    absl::MutexLock lock(&session_mu_);
    session_ = *std::move(session);
    return absl::OkStatus();
  }

  absl::Status FeedAudio() {
    if (request_.streaming_request_case() == v1::StreamClassifyRequest::kConfig) {
      return absl::InvalidArgumentError(
          "`config` may only come in the first message; later messages carry only audio");
    }
    const std::string& chunk = request_.audio();
    if (chunk.size() > static_cast<size_t>(service_->config_.max_chunk_bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "an audio message of ", chunk.size(), " bytes is over this server's limit of ",
          service_->config_.max_chunk_bytes,
          " (--max-chunk-bytes): send smaller chunks, e.g. 100 ms each"));
    }
    // A frame may straddle two messages: keep the incomplete tail for the
    // next one.
    absl::string_view bytes = chunk;
    std::string joined;
    if (!partial_frame_.empty()) {
      joined = absl::StrCat(partial_frame_, chunk);
      bytes = joined;
    }
    const size_t whole = bytes.size() / frame_bytes_ * frame_bytes_;
    std::string tail(bytes.substr(whole));
    partial_frame_ = std::move(tail);
    if (whole == 0) return absl::OkStatus();
    DecodeOptions options;
    options.raw = format_;
    // The session enforces the stream's length; a chunk is bounded by bytes.
    options.max_duration_seconds = std::numeric_limits<double>::max();
    absl::StatusOr<Audio> audio = DecodeAudio(std::string_view(bytes.data(), whole), options);
    if (!audio.ok()) {
      return absl::Status(audio.status().code(),
                          absl::StrCat("audio: ", audio.status().message()));
    }
    service_->metrics_->AddAudioSeconds(audio->duration_seconds());
    absl::MutexLock lock(&session_mu_);
    return session_->Push(audio->samples);
  }

  void OnEvent(const StreamEvent& event) {
    const std::vector<std::string>& labels = engine_->model().config().labels;
    v1::StreamClassifyResponse response;
    switch (event.type) {
      case StreamEvent::Type::kWindow: {
        if (!interim_results_) return;
        v1::WindowResult* window = response.mutable_window();
        window->set_start_seconds(event.start_seconds);
        window->set_end_seconds(event.end_seconds);
        window->set_speech(event.speech);
        AddSortedScores(labels, event.probabilities, window->mutable_scores());
        break;
      }
      case StreamEvent::Type::kSpeechStarted:
        response.mutable_speech_event()->set_type(v1::SpeechEvent::SPEECH_STARTED);
        response.mutable_speech_event()->set_time_seconds(event.start_seconds);
        break;
      case StreamEvent::Type::kSpeechEnded:
        response.mutable_speech_event()->set_type(v1::SpeechEvent::SPEECH_ENDED);
        response.mutable_speech_event()->set_time_seconds(event.end_seconds);
        break;
      case StreamEvent::Type::kUtterance: {
        v1::UtteranceResult* utterance = response.mutable_utterance();
        utterance->set_start_seconds(event.start_seconds);
        utterance->set_end_seconds(event.end_seconds);
        utterance->set_top_label(
            AddSortedScores(labels, event.probabilities, utterance->mutable_scores()));
        utterance->set_window_count(event.window_count);
        break;
      }
    }
    absl::MutexLock lock(&write_mu_);
    if (finishing_) return;
    queue_.push_back(std::move(response));
    if (!write_in_flight_) StartWriteLocked();
  }

  void OnSessionDone(absl::Status status) {
    std::optional<absl::Status> finish;
    {
      absl::MutexLock lock(&write_mu_);
      done_status_ = override_.has_value() ? *override_ : std::move(status);
      if (!write_in_flight_) finish = TakeFinishLocked();
    }
    if (finish.has_value()) Complete(*finish);
  }

  // Ends a call that has no session (so no writes).
  void End(const absl::Status& status) {
    {
      absl::MutexLock lock(&write_mu_);
      if (finishing_) return;
      finishing_ = true;
    }
    Complete(status);
  }

  void StartWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) {
    write_in_flight_ = true;
    StartWrite(&queue_.front());
  }

  std::optional<absl::Status> TakeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) {
    if (finishing_) return std::nullopt;
    finishing_ = true;
    return *done_status_;
  }

  // See the comment above the class: the last thing a path does.
  void Complete(const absl::Status& status) {
    const absl::Status outcome = Outcome(status, context_, deadline_);
    service_->RecordCall(kStreamClassify, outcome, start_);
    Finish(ToGrpcStatus(outcome));
  }

  EmotionService* const service_;
  grpc::CallbackServerContext* const context_;
  const absl::Time start_ = absl::Now();
  const absl::Time deadline_;
  bool admitted_ = false;
  Engine* engine_ = nullptr;

  // Touched only by reactions, which gRPC runs one read at a time.
  v1::StreamClassifyRequest request_;
  RawPcmFormat format_;
  size_t frame_bytes_ = 2;
  std::string partial_frame_;
  bool interim_results_ = false;

  absl::Mutex session_mu_;
  std::unique_ptr<StreamSession> session_ ABSL_GUARDED_BY(session_mu_);

  absl::Mutex write_mu_;
  // The front is being written; deque keeps it in place as others are added.
  std::deque<v1::StreamClassifyResponse> queue_ ABSL_GUARDED_BY(write_mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(write_mu_) = false;
  bool read_paused_ ABSL_GUARDED_BY(write_mu_) = false;
  // Replaces the session's outcome when the server ends the stream.
  std::optional<absl::Status> override_ ABSL_GUARDED_BY(write_mu_);
  // The session's outcome, once it is done.
  std::optional<absl::Status> done_status_ ABSL_GUARDED_BY(write_mu_);
  bool finishing_ ABSL_GUARDED_BY(write_mu_) = false;
};

grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>*
EmotionService::StreamClassify(grpc::CallbackServerContext* context) {
  return new StreamCall(this, context);
}

// --------------------------------------------------------------------------

grpc::ServerUnaryReactor* EmotionService::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::GetModelInfoRequest* /*request*/,
    v1::ModelInfo* response) {
  const absl::Time start = absl::Now();
  absl::Status status;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      status = absl::UnavailableError("the server is shutting down");
    } else if (!model_info_.has_value()) {
      status = absl::UnavailableError(
          "the model is still loading; retry when the health service reports SERVING");
    } else {
      *response = *model_info_;
    }
  }
  RecordCall(kGetModelInfo, status, start);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// --------------------------------------------------------------------------

EmotionService::EmotionService(const ServerConfig& config, ServerMetrics* metrics)
    : config_(config),
      metrics_(metrics),
      decode_pool_(config.feature_threads, config.max_queue_size) {}

EmotionService::~EmotionService() = default;

absl::Status EmotionService::SetEngine(Engine* engine) {
  absl::StatusOr<v1::ModelInfo> info = ModelInfoFromConfig(
      engine->model().config(), engine->model().device(), engine->options().max_batch_size);
  if (!info.ok()) return info.status();
  absl::MutexLock lock(&mu_);
  engine_ = engine;
  model_info_ = *std::move(info);
  return absl::OkStatus();
}

void EmotionService::StartDraining() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

bool EmotionService::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_calls_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void EmotionService::EndStreams(const absl::Status& status) {
  // Holding mu_ keeps every listed stream alive: OnDone needs it (Release)
  // before deleting.
  absl::MutexLock lock(&mu_);
  for (StreamCall* stream : streams_) stream->Fail(status);
}

absl::StatusOr<Engine*> EmotionService::Admit(CallKind kind, StreamCall* stream) {
  absl::MutexLock lock(&mu_);
  if (draining_) {
    return absl::UnavailableError(
        "the server is shutting down; retry on another instance");
  }
  if (engine_ == nullptr) {
    return absl::UnavailableError(
        "the model is still loading; retry when the health service reports SERVING");
  }
  if (kind == CallKind::kStream) {
    if (static_cast<int>(streams_.size()) >= config_.max_streams) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the server already holds its maximum of ", config_.max_streams,
          " streams (--max-streams); retry later or on another instance"));
    }
    streams_.insert(stream);
    metrics_->StreamStarted();
  }
  ++open_calls_;
  return engine_;
}

void EmotionService::Release(CallKind kind, StreamCall* stream) {
  absl::MutexLock lock(&mu_);
  if (kind == CallKind::kStream) {
    streams_.erase(stream);
    metrics_->StreamEnded();
  }
  --open_calls_;
}

void EmotionService::RecordCall(absl::string_view method, const absl::Status& status,
                                absl::Time start) {
  const absl::Duration elapsed = absl::Now() - start;
  metrics_->RecordCall(method, status.code());
  if (method != kStreamClassify) metrics_->RecordLatency(method, elapsed);
  const bool server_fault = status.code() == absl::StatusCode::kInternal ||
                            status.code() == absl::StatusCode::kUnknown;
  const LogLevel level = server_fault ? LogLevel::kError : LogLevel::kDebug;
  if (!LogEnabled(level)) return;
  Log(level, "call",
      {{"method", method},
       {"code", absl::StatusCodeToString(status.code())},
       {"duration_ms", absl::ToDoubleMilliseconds(elapsed)},
       {"message", status.message()}});
}

}  // namespace emoserve
