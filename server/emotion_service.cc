#include "server/emotion_service.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/exceptions.h"
#include "core/stream.h"
#include "server/log.h"
#include "server/proto_convert.h"

namespace emoserve {
namespace {

constexpr absl::string_view kClassify = "Classify";
constexpr absl::string_view kStreamClassify = "StreamClassify";
constexpr absl::string_view kGetModelInfo = "GetModelInfo";
constexpr absl::string_view kListModels = "ListModels";

// A stream reads its next message only while fewer responses than this wait
// to be written (a client that does not read stops being read)...
constexpr size_t kMaxQueuedResponses = 64;
// ...and fewer of its windows than this wait for the model (a client that
// sends faster than the model computes is paced by it).
constexpr int kMaxStreamWindowsInFlight = 16;
// What an open stream holds besides its audio (the reactor, its messages,
// the session, queued responses), charged to the budget at admission.
constexpr int64_t kStreamBaseBytes = 32 << 10;

RequestLimits LimitsOf(const ServerConfig& config) {
  RequestLimits limits;
  limits.max_unary_seconds = config.max_unary_seconds;
  limits.max_stream_seconds = config.max_stream_seconds;
  limits.max_chunk_bytes = config.max_chunk_bytes;
  limits.min_hop_seconds = config.min_hop_seconds;
  limits.vad_threshold_dbfs = config.vad_threshold_dbfs;
  limits.adaptation_min_speech_seconds = config.adaptation_min_speech_seconds;
  return limits;
}

// Why a call that the client no longer waits for ended.
absl::Status Abandoned(absl::Time deadline) {
  return absl::Now() >= deadline ? absl::DeadlineExceededError("the call's deadline passed")
                                 : absl::CancelledError("the client cancelled the call");
}

// The outcome to report: a cancelled call (gRPC cancels at the deadline
// too) ended that way, whatever the work's status; the client saw no other.
absl::Status Outcome(const absl::Status& status, bool cancelled, absl::Time deadline) {
  if (absl::IsCancelled(status) || cancelled) return Abandoned(deadline);
  return status;
}

}  // namespace

// What the service can ask of any open call.
class EmotionService::Call {
 public:
  virtual ~Call() = default;
  // Shutdown has begun: a stream flushes and ends; a unary call goes on.
  virtual void Drain() {}
  // The grace period is over: the call is cancelled.
  virtual void Cancel() = 0;
  // A stream that has done nothing since `idle_since` ends.
  virtual void EndIfIdle(absl::Time /*idle_since*/) {}
};

// --------------------------------------------------------------------------
// Classify: checked on the transport's thread, decoded to the model's rate
// on the worker pool (block by block, charged to the budget, stopping when
// the call is cancelled or its deadline passes), classified by the engine,
// and finished from the engine's completion. One implementation for both
// transports: gRPC (GrpcClassifyCall) and HTTP (HttpClassifyCall).

class EmotionService::ClassifyCall : public EmotionService::Call {
 public:
  // Admits the call, finds its model and starts the work; completes the
  // call at once when any of that fails. Called once, after construction.
  void Begin() {
    if (absl::Status admitted = service_->Admit(this, CallKind::kUnary); !admitted.ok()) {
      Complete(admitted);
      return;
    }
    admitted_ = true;
    absl::StatusOr<std::shared_ptr<const ServedModel>> model =
        service_->FindModel(request_->model_name(), request_->model_version());
    if (!model.ok()) {
      Complete(model.status());
      return;
    }
    model_ = *std::move(model);
    engine_ = &model_->engine();
    absl::Status started;
    try {
      started = Start();
    } catch (...) {
      started = StatusFromCurrentException("Classify");
    }
    if (!started.ok()) Complete(started);
  }

 protected:
  // `request_lease` holds the request's bytes when the transport charged
  // them itself (null: charged here).
  ClassifyCall(EmotionService* service, absl::string_view method,
               const v1::ClassifyRequest* request, v1::ClassifyResponse* response,
               absl::Time deadline, std::unique_ptr<BudgetLease> request_lease)
      : service_(service),
        method_(method),
        request_(request),
        response_(response),
        deadline_(deadline),
        lease_(request_lease != nullptr ? std::move(request_lease)
                                        : std::make_unique<BudgetLease>(&service->budget_)),
        audio_lease_(std::make_shared<BudgetLease>(&service->budget_)) {}

  // Whether the transport saw the call cancelled (the client left).
  virtual bool TransportCancelled() const = 0;
  // Whether the server cut the call off at shutdown (Cancel), where the
  // transport can still say so instead of "cancelled".
  virtual bool CancelledByShutdown() const { return false; }
  // Hands the outcome to the transport (response_ is filled when it is
  // OK). The last thing the call does: it may be deleted at once.
  virtual void Deliver(const absl::Status& outcome) = 0;

  EmotionService* const service_;
  const std::shared_ptr<CancelFlag> cancel_ = std::make_shared<CancelFlag>();
  bool admitted_ = false;

 private:
  absl::Status Start() {
    request_bytes_ = static_cast<int64_t>(request_->audio().size());
    if (request_bytes_ > lease_->bytes()) {
      if (absl::Status charged = lease_->Grow(request_bytes_ - lease_->bytes()); !charged.ok()) {
        return charged;
      }
    }
    absl::StatusOr<std::optional<RawPcmFormat>> raw =
        CheckClassifyRequest(*request_, engine_->model().config(), service_->limits_);
    if (!raw.ok()) return raw.status();
    raw_ = *raw;
    absl::StatusOr<ClipSpeaker> speaker =
        CheckClassifySpeaker(*request_, engine_->model(), service_->limits_);
    if (!speaker.ok()) return speaker.status();
    speaker_ = *std::move(speaker);
    posted_ = absl::Now();
    if (!service_->workers_.TryPost([this] { Run(); })) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the server's decoding queue is full (", service_->config_.max_queue_size,
          " calls wait); retry with backoff"));
    }
    return absl::OkStatus();
  }

  // On a worker. Completes the call (or hands it to the engine, which does).
  void Run() {
    absl::Status status;
    try {
      status = DecodeAndClassify();
    } catch (...) {
      status = StatusFromCurrentException("decoding the audio");
    }
    if (!status.ok()) Complete(status);
  }

  absl::Status DecodeAndClassify() {
    if (absl::Status going = KeepGoing(); !going.ok()) return going;
    const absl::Time decoding = absl::Now();
    const ModelConfig& model = engine_->model().config();
    absl::StatusOr<Audio> audio = DecodeClassifyAudio(
        *request_, raw_, model, service_->limits_,
        [this](size_t capacity) {
          return audio_lease_->Resize(static_cast<int64_t>(capacity * sizeof(float)));
        },
        [this] { return KeepGoing(); });
    if (!audio.ok()) return audio.status();
    service_->metrics_->OnDecoded(decoding - posted_, absl::Now() - decoding);
    duration_seconds_ = audio->duration_seconds();
    ClipRequest clip;
    clip.samples = std::move(audio->samples);
    clip.lease = std::move(audio_lease_);
    clip.hop_seconds = request_->hop_seconds();
    clip.deadline = deadline_;
    clip.cancel = cancel_;
    clip.speaker_mean = std::move(speaker_.mean);
    clip.speaker_statistics = std::move(speaker_.statistics);
    clip.done = [this](absl::StatusOr<ClipResult> result) { OnClassified(std::move(result)); };
    // May complete inline; nothing of this object is touched after it.
    engine_->Classify(std::move(clip));
    return absl::OkStatus();
  }

  // Between decoded blocks: stops the work the client no longer waits for.
  absl::Status KeepGoing() const {
    if (cancel_->cancelled()) return Abandoned(deadline_);
    if (absl::Now() >= deadline_) {
      return absl::DeadlineExceededError("the call's deadline passed while its audio was decoded");
    }
    return absl::OkStatus();
  }

  void OnClassified(absl::StatusOr<ClipResult> result) {
    absl::Status status = result.status();
    if (status.ok()) {
      try {
        FillClassifyResponse(*result, engine_->model().config(), duration_seconds_,
                             request_->include_timeline(), response_);
        response_->set_model_name(model_->name());
        response_->set_model_version(model_->version_label());
        service_->metrics_->AddAudioSeconds(duration_seconds_);
      } catch (...) {
        status = StatusFromCurrentException("building the response");
      }
    }
    Complete(status);
  }

  // Records the outcome and finishes the call. The last thing this object
  // does: OnDone may delete it on another thread right after.
  void Complete(const absl::Status& status) {
    absl::Status outcome = Outcome(status, TransportCancelled(), deadline_);
    if (absl::IsCancelled(outcome) && CancelledByShutdown()) {
      outcome = absl::UnavailableError(
          "the server shut down before the call finished (--grace-seconds); retry on another "
          "instance");
    }
    service_->RecordCall(method_, outcome, start_, model_.get(), CallKind::kUnary);
    Deliver(outcome);
  }

  const absl::string_view method_;
  const v1::ClassifyRequest* const request_;
  v1::ClassifyResponse* const response_;
  const absl::Time start_ = absl::Now();
  absl::Time posted_;  // handed to the decoding workers
  const absl::Time deadline_;
  const std::unique_ptr<BudgetLease> lease_;  // the request's bytes, until the call ends
  // The decoded audio's, handed to the engine with it.
  std::shared_ptr<BudgetLease> audio_lease_;
  int64_t request_bytes_ = 0;
  // The version the call runs on, held until the call ends.
  std::shared_ptr<const ServedModel> model_;
  Engine* engine_ = nullptr;
  std::optional<RawPcmFormat> raw_;
  ClipSpeaker speaker_;
  double duration_seconds_ = 0;
};

class EmotionService::GrpcClassifyCall final : public grpc::ServerUnaryReactor,
                                               public EmotionService::ClassifyCall {
 public:
  GrpcClassifyCall(EmotionService* service, grpc::CallbackServerContext* context,
                   const v1::ClassifyRequest* request, v1::ClassifyResponse* response)
      : ClassifyCall(service, kClassify, request, response, ToAbslDeadline(context->deadline()),
                     nullptr),
        context_(context) {}

  void OnCancel() override { cancel_->Cancel(); }

  void OnDone() override {
    // Pairs with Deliver's release: gRPC hands the call from Finish to
    // OnDone through its core, whose atomics ThreadSanitizer does not see.
    completed_.load(std::memory_order_acquire);
    if (admitted_) service_->Release(this, CallKind::kUnary);
    delete this;
  }

  void Cancel() override { context_->TryCancel(); }

 private:
  bool TransportCancelled() const override { return context_->IsCancelled(); }
  void Deliver(const absl::Status& outcome) override {
    completed_.store(true, std::memory_order_release);
    Finish(ToGrpcStatus(outcome));
  }

  grpc::CallbackServerContext* const context_;
  std::atomic<bool> completed_{false};
};

grpc::ServerUnaryReactor* EmotionService::Classify(grpc::CallbackServerContext* context,
                                                   const v1::ClassifyRequest* request,
                                                   v1::ClassifyResponse* response) {
  auto* call = new GrpcClassifyCall(this, context, request, response);
  call->Begin();
  return call;
}

// The HTTP transport's Classify: owns its request and response, and hands
// the outcome to `done` once.
class EmotionService::HttpClassifyCall final : public EmotionService::ClassifyCall {
 public:
  HttpClassifyCall(EmotionService* service, absl::string_view method,
                   std::unique_ptr<v1::ClassifyRequest> request, absl::Time deadline,
                   std::unique_ptr<BudgetLease> request_lease, ClassifyDone done)
      : HttpClassifyCall(service, method, request.get(), std::make_unique<v1::ClassifyResponse>(),
                         deadline, std::move(request_lease), std::move(done)) {
    request_storage_ = std::move(request);
  }

  // The shutdown grace is over: the work stops where it is.
  void Cancel() override {
    shut_down_.store(true);
    cancel_->Cancel();
  }

 private:
  HttpClassifyCall(EmotionService* service, absl::string_view method,
                   const v1::ClassifyRequest* request,
                   std::unique_ptr<v1::ClassifyResponse> response, absl::Time deadline,
                   std::unique_ptr<BudgetLease> request_lease, ClassifyDone done)
      : ClassifyCall(service, method, request, response.get(), deadline,
                     std::move(request_lease)),
        response_storage_(std::move(response)),
        done_(std::move(done)) {}

  bool TransportCancelled() const override { return false; }
  bool CancelledByShutdown() const override { return shut_down_.load(); }
  void Deliver(const absl::Status& outcome) override {
    ClassifyDone done = std::move(done_);
    std::unique_ptr<v1::ClassifyResponse> response = std::move(response_storage_);
    if (admitted_) service_->Release(this, CallKind::kUnary);
    delete this;  // before `done`: the transport may stop the service once it has its answer
    done(outcome, outcome.ok() ? std::move(*response) : v1::ClassifyResponse());
  }

  std::unique_ptr<v1::ClassifyRequest> request_storage_;
  std::unique_ptr<v1::ClassifyResponse> response_storage_;
  ClassifyDone done_;
  std::atomic<bool> shut_down_{false};
};

void EmotionService::ClassifyFor(absl::string_view method,
                                 std::unique_ptr<v1::ClassifyRequest> request,
                                 absl::Time deadline, std::unique_ptr<BudgetLease> request_lease,
                                 ClassifyDone done) {
  auto* call = new HttpClassifyCall(this, method, std::move(request), deadline,
                                    std::move(request_lease), std::move(done));
  call->Begin();
}

absl::StatusOr<std::unique_ptr<BudgetLease>> EmotionService::ReserveRequestBytes(int64_t bytes) {
  auto lease = std::make_unique<BudgetLease>(&budget_);
  if (absl::Status s = lease->Grow(bytes); !s.ok()) return s;
  return lease;
}

// --------------------------------------------------------------------------
// StreamClassify. One message at a time: a read completes on a transport
// thread, the message is processed on a worker (the config creates the
// session; audio is decoded, resampled and windowed into it), and the next
// read starts only when that is done, fewer than kMaxQueuedResponses
// responses wait to be written and fewer than kMaxStreamWindowsInFlight
// windows wait for the model. The session's results arrive on engine
// threads and are written in order. One implementation for both transports:
// gRPC (GrpcStreamCall) and WebSocket (ExternalStreamCall).
//
// The call's life is one State, under mu_, that only moves forward:
//
//   kOpen ──(shutdown while a message is processed)──> kFlushPending
//     │  └─(half-close, or shutdown)──> kFlushing ──(session done)──┐
//     └──(error, cancellation, idle, client gone)──> kFailing ──────┤
//                                                                    v
//   (session failed, or no session to flush or cancel) ───────> kEnding
//   kEnding ──(no message in process, no write in flight)──> kFinished
//
// Flushing lets the session close its last window and utterance and ends
// with the session's outcome; failing cancels the session and ends with the
// failure. FinishIfDone is the one place that finishes the call.
//
// Locking: the session may call back (OnEvent, OnSessionDone) from inside
// Finish/Cancel, so it is told outside mu_, through a shared_ptr copy taken
// under mu_ (TransportDone drops the call's own copy). FinishTransport is
// called outside mu_: the transport may report TransportDone on another
// thread as soon as it is. TransportDone lets go of the transport's hold on
// the call; the paths that go on after a finish they may have caused hold
// it too, and the last hold deletes it.

class EmotionService::StreamCall : public EmotionService::Call {
 public:
  // Admits the call and asks for its first message, or ends it at once.
  // Called once, after construction.
  void Begin() {
    if (absl::Status admitted = service_->Admit(this, CallKind::kStream); !admitted.ok()) {
      End(admitted);
      return;
    }
    admitted_ = true;
    if (absl::Status charged = lease_.Grow(kStreamBaseBytes); !charged.ok()) {
      End(charged);
      return;
    }
    absl::MutexLock lock(&mu_);
    ReadIfReadyLocked();
  }

  void Drain() override {
    SessionOrder order;
    {
      absl::MutexLock lock(&mu_);
      if (state_ != State::kOpen) return;
      if (processing_) {
        state_ = State::kFlushPending;  // DoneProcessing flushes
        return;
      }
      order = FlushLocked(absl::UnavailableError(
          "the server is shutting down; reconnect (to another instance) and resend"));
    }
    Tell(order);
    FinishIfDone();
  }

  void Cancel() override { CancelTransport(); }

  void EndIfIdle(absl::Time idle_since) override {
    bool write_stuck = false;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kFinished || processing_ || last_activity_ > idle_since) return;
      write_stuck = write_in_flight_;
    }
    if (write_stuck) {
      // The client reads nothing, so not even an error would reach it.
      CancelTransport();
      return;
    }
    Fail(absl::DeadlineExceededError(absl::StrCat(
        "the stream was idle (no audio, no results) for ", service_->config_.stream_idle_seconds,
        " s (--stream-idle-seconds); send audio continuously (silence too) or close the stream")));
  }

 protected:
  StreamCall(EmotionService* service, absl::string_view method, absl::Time deadline)
      : service_(service), method_(method), deadline_(deadline), lease_(&service->budget_) {}
  ~StreamCall() override = default;

  // The transport's side, implemented by each transport. Reads and writes
  // are asked for under mu_, so a transport never completes them inline.
  // Reads the next message into `into`; then ReadDone.
  virtual void ReadNext(v1::StreamClassifyRequest* into) = 0;
  // Writes `response` (alive until WriteDone); then WriteDone.
  virtual void WriteNext(const v1::StreamClassifyResponse* response) = 0;
  // Ends the call with `outcome`; then TransportDone. Called once, outside mu_.
  virtual void FinishTransport(const absl::Status& outcome) = 0;
  // Whether the client left (or the transport cancelled the call).
  virtual bool TransportCancelled() const = 0;
  // Cuts the call off (shutdown grace over, or a client that reads
  // nothing); the transport then reports the client gone.
  virtual void CancelTransport() = 0;

  // The transport's events. ReadDone(false): the client ended its side,
  // cleanly unless TransportCancelled().
  void ReadDone(bool ok) {
    if (!ok) {
      ClientDone();
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      last_activity_ = absl::Now();
      if (state_ != State::kOpen) return;  // flushing or ending: not processed
      processing_ = true;
    }
    message_bytes_ = static_cast<int64_t>(request_.audio().size());
    absl::Status accepted = lease_.Grow(message_bytes_);
    if (!accepted.ok()) {
      message_bytes_ = 0;
    } else if (!service_->workers_.TryPost([this] { Process(); })) {
      accepted = absl::ResourceExhaustedError(
          "the server's decoding queue is full; retry with backoff");
    }
    if (!accepted.ok()) DoneProcessing(accepted);
  }

  void WriteDone(bool ok) {
    Hold();  // alive until here: the write in flight keeps the call from finishing
    SessionOrder order;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      write_in_flight_ = false;
      last_activity_ = absl::Now();
      if (!ok) {
        // The client is gone: nobody reads what is left.
        queue_.clear();
        order = FailLocked(absl::CancelledError("the client stopped receiving"));
      } else if (!queue_.empty()) {
        StartWriteLocked();
      }
      ReadIfReadyLocked();
    }
    Tell(order);
    FinishIfDone();
    Unhold();
  }

  // The client left, or CancelTransport took effect.
  void ClientGone() { Fail(Abandoned(deadline_)); }
  // What the client sent is not a message of this call (the transport's
  // own encoding was broken); the call fails with `why`.
  void RefuseMessage(const absl::Status& why) { Fail(why); }

  // The transport is done with the call (after FinishTransport). The call
  // may be deleted before this returns.
  void TransportDone() {
    std::shared_ptr<StreamSession> session;
    {
      absl::MutexLock lock(&mu_);
      session = std::move(session_);
    }
    session.reset();  // waits for its callbacks to return
    // After the session: the server's shutdown waits for the last Release
    // before it stops the engine the session runs on.
    if (admitted_) service_->Release(this, CallKind::kStream);
    Unhold();
  }

 private:
  // See the diagram above the class.
  enum class State { kOpen, kFlushPending, kFlushing, kFailing, kEnding, kFinished };

  // What the session is to be told once mu_ is released.
  struct SessionOrder {
    enum class Verb { kNone, kFlush, kCancel } verb = Verb::kNone;
    std::shared_ptr<StreamSession> session;
  };

  // No more messages; the session flushes and its outcome ends the call.
  // Without a session yet, the call ends with `without_session`.
  SessionOrder FlushLocked(const absl::Status& without_session)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (session_ == nullptr) {
      EndLocked(without_session);
      return {};
    }
    state_ = State::kFlushing;
    return {SessionOrder::Verb::kFlush, session_};
  }

  // No more messages; the call ends with `failure`, whatever the session
  // says. The first failure wins; a call already ending keeps its outcome.
  SessionOrder FailLocked(const absl::Status& failure) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (state_ >= State::kFailing) return {};
    if (session_ == nullptr) {
      EndLocked(failure);
      return {};
    }
    state_ = State::kFailing;
    outcome_ = failure;
    return {SessionOrder::Verb::kCancel, session_};
  }

  void EndLocked(const absl::Status& outcome) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    state_ = State::kEnding;
    outcome_ = outcome;
  }

  // Outside mu_: the session may call OnEvent / OnSessionDone inline.
  static void Tell(const SessionOrder& order) {
    switch (order.verb) {
      case SessionOrder::Verb::kNone:
        break;
      case SessionOrder::Verb::kFlush:
        order.session->Finish();
        break;
      case SessionOrder::Verb::kCancel:
        order.session->Cancel();  // its on_done (OnSessionDone) follows
        break;
    }
  }

  void Fail(const absl::Status& failure) {
    SessionOrder order;
    {
      absl::MutexLock lock(&mu_);
      order = FailLocked(failure);
    }
    Tell(order);
    FinishIfDone();
  }

  // Ends the call before it has read anything.
  void End(const absl::Status& outcome) {
    {
      absl::MutexLock lock(&mu_);
      EndLocked(outcome);
    }
    FinishIfDone();
  }

  // The client half-closed (flush) or the call broke (fail).
  void ClientDone() {
    if (TransportCancelled()) {
      Fail(Abandoned(deadline_));
      return;
    }
    SessionOrder order;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (state_ != State::kOpen) return;
      order = FlushLocked(absl::InvalidArgumentError(
          "the stream ended before its config: the first message carries only `config`"));
    }
    Tell(order);
    FinishIfDone();
  }

  // On a worker: the message in request_.
  void Process() {
    absl::Status status;
    try {
      status = configured_ ? FeedAudio() : Configure();
    } catch (...) {
      status = StatusFromCurrentException("processing a stream message");
    }
    lease_.Shrink(message_bytes_);
    message_bytes_ = 0;
    DoneProcessing(status);
  }

  // The message is processed (or refused). Until processing_ is cleared
  // the call cannot finish; after that another thread may finish it at
  // once, hence the hold.
  void DoneProcessing(const absl::Status& status) {
    Hold();
    SessionOrder order;
    {
      absl::MutexLock lock(&mu_);
      last_activity_ = absl::Now();
      if (!status.ok()) {
        order = FailLocked(status);
      } else if (state_ == State::kFlushPending) {
        order = FlushLocked(absl::UnavailableError(
            "the server is shutting down; reconnect (to another instance) and resend"));
      }
    }
    Tell(order);
    {
      absl::MutexLock lock(&mu_);
      processing_ = false;
      ReadIfReadyLocked();
    }
    FinishIfDone();
    Unhold();
  }

  // The transport's TransportDone and the paths that may run on after
  // FinishTransport (a worker done with a message, a write completing) each
  // hold the call; the last to let go deletes it.
  void Hold() { holds_.fetch_add(1, std::memory_order_relaxed); }
  void Unhold() {
    if (holds_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  absl::Status Configure() {
    absl::StatusOr<std::shared_ptr<const ServedModel>> served = service_->FindModel(
        request_.config().model_name(), request_.config().model_version());
    if (!served.ok()) return served.status();
    model_ = *std::move(served);
    engine_ = &model_->engine();
    const ModelConfig& model = engine_->model().config();
    absl::StatusOr<StreamSetup> setup = CheckStreamConfig(request_, model, service_->limits_);
    if (!setup.ok()) return setup.status();
    if (absl::Status speaker = SetStreamSpeaker(request_.config(), engine_->model(),
                                                service_->limits_, &setup->options);
        !speaker.ok()) {
      return speaker;
    }
    setup->options.deadline = deadline_;
    setup->options.budget = &service_->budget_;
    interim_results_ = setup->interim_results;
    input_rate_ = setup->format.sample_rate;
    decoder_.emplace(setup->format);
    absl::StatusOr<std::unique_ptr<StreamSession>> session = StreamSession::Create(
        engine_, setup->options, [this](const StreamEvent& event) { OnEvent(event); },
        [this](absl::Status status) { OnSessionDone(status); });
    if (!session.ok()) {
      return absl::Status(session.status().code(),
                          absl::StrCat("config: ", session.status().message()));
    }
    configured_ = true;
    absl::MutexLock lock(&mu_);
    session_ = *std::move(session);
    return absl::OkStatus();
  }

  absl::Status FeedAudio() {
    // The session outlives this message: the call cannot finish while it
    // is processed.
    StreamSession* session = nullptr;
    {
      absl::MutexLock lock(&mu_);
      session = session_.get();
    }
    return decoder_->Decode(request_, service_->limits_,
                            [&](absl::Span<const float> samples) {
                              service_->metrics_->AddAudioSeconds(
                                  static_cast<double>(samples.size()) / input_rate_);
                              return session->Push(samples);
                            });
  }

  // Session events, in order, on engine threads (or inline in Push/Finish).
  void OnEvent(const StreamEvent& event) {
    std::optional<v1::StreamClassifyResponse> response;
    absl::Status failed;
    try {
      response = StreamResponse(event, engine_->model().config(), interim_results_);
    } catch (...) {
      failed = StatusFromCurrentException("building a stream response");
    }
    StreamSession* cancel = nullptr;
    {
      absl::MutexLock lock(&mu_);
      last_activity_ = absl::Now();
      if (!failed.ok()) {
        cancel = FailLocked(failed).session.get();
      } else {
        if (event.type == StreamEvent::Type::kWindow) ReadIfReadyLocked();  // a window came back
        // Failing or ending: the session's last results go nowhere.
        if (!response.has_value() || state_ >= State::kFailing) return;
        queue_.push_back(*std::move(response));
        if (!write_in_flight_) StartWriteLocked();
      }
    }
    // Inside the session's callback: the session may be cancelled here. It
    // reports done only after this returns, so the call still holds it; no
    // copy is kept, lest the last one be dropped inside its own callback.
    if (cancel != nullptr) cancel->Cancel();
  }

  // The session's on_done: once, after its last event.
  void OnSessionDone(const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kFailing) {
        state_ = State::kEnding;  // with the failure as the outcome
      } else if (state_ < State::kFailing) {
        EndLocked(status);
      }
    }
    FinishIfDone();
  }

  // The one way the call ends: once its outcome is known, no message is
  // processed and no write is in flight. The last thing a path does.
  void FinishIfDone() {
    absl::Status outcome;
    {
      absl::MutexLock lock(&mu_);
      if (state_ != State::kEnding || processing_ || write_in_flight_) return;
      state_ = State::kFinished;
      outcome = Outcome(outcome_, TransportCancelled(), deadline_);
    }
    service_->RecordCall(method_, outcome, start_, model_.get(), CallKind::kStream);
    FinishTransport(outcome);
  }

  void ReadIfReadyLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || processing_ || state_ != State::kOpen) return;
    if (queue_.size() >= kMaxQueuedResponses) return;  // OnWriteDone resumes
    if (session_ != nullptr && session_->windows_in_flight() >= kMaxStreamWindowsInFlight) {
      return;  // OnEvent resumes
    }
    reading_ = true;
    ReadNext(&request_);
  }

  void StartWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    write_in_flight_ = true;
    WriteNext(&queue_.front());
  }

  EmotionService* const service_;
  const absl::string_view method_;
  const absl::Time start_ = absl::Now();
  const absl::Time deadline_;
  std::atomic<int> holds_{1};  // the transport's, given back by TransportDone
  BudgetLease lease_;  // the base, plus the message being processed
  bool admitted_ = false;
  // The version the stream runs on (set by its config), held until it ends.
  std::shared_ptr<const ServedModel> model_;
  Engine* engine_ = nullptr;

  // Touched by one message's processing at a time (reads are sequential).
  v1::StreamClassifyRequest request_;
  int64_t message_bytes_ = 0;
  bool configured_ = false;
  bool interim_results_ = false;
  std::optional<StreamAudioDecoder> decoder_;
  int input_rate_ = 1;

  absl::Mutex mu_;
  State state_ ABSL_GUARDED_BY(mu_) = State::kOpen;
  // Set when the state reaches kFailing or kEnding.
  absl::Status outcome_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<StreamSession> session_ ABSL_GUARDED_BY(mu_);
  // The three operations that may be under way at once, one of each kind.
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool processing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_activity_ ABSL_GUARDED_BY(mu_) = absl::Now();
  // The front is being written; deque keeps it in place as others are added.
  std::deque<v1::StreamClassifyResponse> queue_ ABSL_GUARDED_BY(mu_);
};

class EmotionService::GrpcStreamCall final
    : public grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>,
      public EmotionService::StreamCall {
 public:
  GrpcStreamCall(EmotionService* service, grpc::CallbackServerContext* context)
      : StreamCall(service, kStreamClassify, ToAbslDeadline(context->deadline())),
        context_(context) {}

  void OnReadDone(bool ok) override { ReadDone(ok); }
  void OnWriteDone(bool ok) override { WriteDone(ok); }
  void OnCancel() override { ClientGone(); }
  void OnDone() override { TransportDone(); }

 private:
  void ReadNext(v1::StreamClassifyRequest* into) override { StartRead(into); }
  void WriteNext(const v1::StreamClassifyResponse* response) override { StartWrite(response); }
  void FinishTransport(const absl::Status& outcome) override { Finish(ToGrpcStatus(outcome)); }
  bool TransportCancelled() const override { return context_->IsCancelled(); }
  void CancelTransport() override { context_->TryCancel(); }

  grpc::CallbackServerContext* const context_;
};

grpc::ServerBidiReactor<v1::StreamClassifyRequest, v1::StreamClassifyResponse>*
EmotionService::StreamClassify(grpc::CallbackServerContext* context) {
  auto* call = new GrpcStreamCall(this, context);
  call->Begin();
  return call;
}

// Another transport's stream (WebSocket): the transport's calls and
// events go through StreamTransport and StreamEvents.
class EmotionService::ExternalStreamCall final : public EmotionService::StreamCall,
                                                 public EmotionService::StreamEvents {
 public:
  ExternalStreamCall(EmotionService* service, absl::string_view method,
                     StreamTransport* transport)
      : StreamCall(service, method, absl::InfiniteFuture()), transport_(transport) {}

  void MessageRead(bool ok) override { ReadDone(ok); }
  void Written(bool ok) override { WriteDone(ok); }
  void MessageRefused(const absl::Status& why) override { RefuseMessage(why); }
  void Gone() override { ClientGone(); }
  void Done() override { TransportDone(); }

 private:
  void ReadNext(v1::StreamClassifyRequest* into) override { transport_->Read(into); }
  void WriteNext(const v1::StreamClassifyResponse* response) override {
    transport_->Write(response);
  }
  void FinishTransport(const absl::Status& outcome) override { transport_->Finish(outcome); }
  bool TransportCancelled() const override { return transport_->Cancelled(); }
  void CancelTransport() override { transport_->Cancel(); }

  StreamTransport* const transport_;
};

EmotionService::StreamEvents* EmotionService::StreamFor(absl::string_view method,
                                                        StreamTransport* transport) {
  auto* call = new ExternalStreamCall(this, method, transport);
  call->Begin();
  return call;
}

// --------------------------------------------------------------------------

absl::StatusOr<v1::ModelInfo> EmotionService::ModelInfoFor(
    absl::string_view method, const v1::GetModelInfoRequest& request) {
  const absl::Time start = absl::Now();
  bool draining = false;
  {
    absl::MutexLock lock(&mu_);
    draining = draining_;
  }
  absl::StatusOr<std::shared_ptr<const ServedModel>> model =
      draining ? absl::UnavailableError("the server is shutting down")
               : FindModel(request.model_name(), request.model_version());
  absl::StatusOr<v1::ModelInfo> info = absl::UnknownError("");  // set below
  if (!model.ok()) {
    info = model.status();
  } else {
    const Engine& engine = (*model)->engine();
    info = ModelInfoFromConfig(engine.model().config(), engine.model().device(),
                               engine.options().max_batch_size);
    if (info.ok()) {
      info->set_name((*model)->name());
      info->set_version((*model)->version_label());
    }
  }
  RecordCall(method, info.status(), start, model.ok() ? model->get() : nullptr, CallKind::kUnary);
  return info;
}

absl::StatusOr<v1::ListModelsResponse> EmotionService::ModelsFor(absl::string_view method) {
  const absl::Time start = absl::Now();
  const ModelRepository* repository = nullptr;
  {
    absl::MutexLock lock(&mu_);
    repository = repository_;
  }
  absl::StatusOr<v1::ListModelsResponse> response = absl::UnavailableError(
      "the models are still loading; retry when the health service reports SERVING");
  if (repository != nullptr) {
    response = v1::ListModelsResponse();
    for (const ModelStatus& model : repository->List()) {
      v1::ModelStatus* out = response->add_models();
      out->set_name(model.name);
      out->set_default_version(model.default_version);
      out->set_is_default(model.is_default);
      for (const ModelVersionStatus& version : model.versions) {
        v1::ModelVersionStatus* v = out->add_versions();
        v->set_version(version.version);
        v->set_state(version.state == ModelState::kReady    ? v1::MODEL_STATE_READY
                     : version.state == ModelState::kFailed ? v1::MODEL_STATE_FAILED
                                                            : v1::MODEL_STATE_LOADING);
        v->set_error(version.error);
        v->set_reported_version(version.version_label);
      }
    }
  }
  RecordCall(method, response.status(), start, nullptr, CallKind::kUnary);
  return response;
}

grpc::ServerUnaryReactor* EmotionService::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::GetModelInfoRequest* request,
    v1::ModelInfo* response) {
  absl::StatusOr<v1::ModelInfo> info = ModelInfoFor(kGetModelInfo, *request);
  if (info.ok()) *response = *std::move(info);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(info.status()));
  return reactor;
}

grpc::ServerUnaryReactor* EmotionService::ListModels(grpc::CallbackServerContext* context,
                                                     const v1::ListModelsRequest* /*request*/,
                                                     v1::ListModelsResponse* response) {
  absl::StatusOr<v1::ListModelsResponse> models = ModelsFor(kListModels);
  if (models.ok()) *response = *std::move(models);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(models.status()));
  return reactor;
}

// --------------------------------------------------------------------------

EmotionService::EmotionService(const ServerConfig& config, ServerMetrics* metrics)
    : config_(config),
      limits_(LimitsOf(config)),
      metrics_(metrics),
      budget_(int64_t{config.max_audio_memory_mb} << 20,
              [metrics](int64_t used) { metrics->SetAudioMemory(used); },
              "the server's memory for audio in flight (--max-audio-memory-mb)",
              SmallLeaseReserve::EighthOf(int64_t{config.max_audio_memory_mb} << 20)),
      workers_(config.feature_threads, config.max_queue_size) {
  metrics_->SetAudioMemoryLimit(budget_.capacity());
  idle_watcher_ = std::thread([this] { WatchIdleStreams(); });
}

EmotionService::~EmotionService() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  idle_watcher_.join();
}

void EmotionService::SetRepository(const ModelRepository* repository) {
  absl::MutexLock lock(&mu_);
  repository_ = repository;
}

void EmotionService::StartDraining() {
  // Holding mu_ keeps every listed call alive (see calls_).
  absl::MutexLock lock(&mu_);
  draining_ = true;
  for (Call* call : calls_) call->Drain();
}

bool EmotionService::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return calls_.empty(); };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void EmotionService::CancelAll() {
  absl::MutexLock lock(&mu_);
  for (Call* call : calls_) call->Cancel();
}

void EmotionService::WatchIdleStreams() {
  const absl::Duration idle = absl::Seconds(config_.stream_idle_seconds);
  const absl::Duration period = std::clamp(idle / 4, absl::Milliseconds(20), absl::Seconds(1));
  absl::MutexLock lock(&mu_);
  for (;;) {
    auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    if (mu_.AwaitWithTimeout(absl::Condition(&stopping), period)) return;
    const absl::Time idle_since = absl::Now() - idle;
    for (Call* call : calls_) call->EndIfIdle(idle_since);
  }
}

absl::Status EmotionService::Admit(Call* call, CallKind kind) {
  absl::MutexLock lock(&mu_);
  if (draining_) {
    return absl::UnavailableError(
        "the server is shutting down; retry on another instance");
  }
  if (repository_ == nullptr) {
    return absl::UnavailableError(
        "the model is still loading; retry when the health service reports SERVING");
  }
  if (kind == CallKind::kStream) {
    if (streams_ >= config_.max_streams) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the server already holds its maximum of ", config_.max_streams,
          " streams (--max-streams); retry later or on another instance"));
    }
    ++streams_;
    metrics_->StreamStarted();
  }
  calls_.insert(call);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ServedModel>> EmotionService::FindModel(
    absl::string_view name, int64_t version) {
  // Not refused while draining: a call admitted before draining began
  // (a stream whose config arrives late) still runs, and flushes.
  const ModelRepository* repository = nullptr;
  {
    absl::MutexLock lock(&mu_);
    repository = repository_;
  }
  if (repository == nullptr) {
    return absl::UnavailableError(
        "the model is still loading; retry when the health service reports SERVING");
  }
  if (version < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model_version ", version, " is negative (0: the highest ready version)"));
  }
  return repository->Find(name, version);
}

void EmotionService::Release(Call* call, CallKind kind) {
  absl::MutexLock lock(&mu_);
  if (kind == CallKind::kStream) {
    --streams_;
    metrics_->StreamEnded();
  }
  calls_.erase(call);
}

void EmotionService::RecordCall(absl::string_view method, const absl::Status& status,
                                absl::Time start, const ServedModel* model, CallKind kind) {
  const absl::Duration elapsed = absl::Now() - start;
  const std::string empty;
  const std::string& name = model != nullptr ? model->name() : empty;
  const std::string& version = model != nullptr ? model->version_label() : empty;
  metrics_->RecordCall(method, status.code(), name, version);
  if (kind == CallKind::kUnary) metrics_->RecordLatency(method, elapsed, name, version);
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
