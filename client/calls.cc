#include "client/calls.h"

#include <utility>

namespace emoserve::client {
namespace {

// A Classify call's state, alive until its callback has run.
struct ClassifyCall {
  grpc::ClientContext context;
  std::shared_ptr<const v1::ClassifyRequest> request;
  v1::ClassifyResponse response;
  ClassifyDone done;
};

}  // namespace

void StartClassify(v1::EmotionService::Stub* stub,
                   std::shared_ptr<const v1::ClassifyRequest> request,
                   const ConnectionOptions& connection,
                   double default_timeout_seconds, ClassifyDone done) {
  auto* call = new ClassifyCall;
  call->request = std::move(request);
  call->done = std::move(done);
  SetCallDeadline(connection, default_timeout_seconds, &call->context);
  stub->async()->Classify(&call->context, call->request.get(), &call->response,
                          [call](grpc::Status status) {
                            // The call's state goes before `done` runs: once
                            // it has, the caller may return and the process
                            // exit (ASan saw a double free of a call freed
                            // during exit).
                            ClassifyDone done = std::move(call->done);
                            const v1::ClassifyResponse response =
                                std::move(call->response);
                            delete call;
                            done(status, response);
                          });
}

void InFlightCounter::WaitAndAdd(int limit) {
  auto has_room = [this, limit]() ABSL_SHARED_LOCKS_REQUIRED(mutex_) {
    return count_ < limit;
  };
  absl::MutexLock lock(&mutex_, absl::Condition(&has_room));
  ++count_;
}

bool InFlightCounter::TryAdd(int limit) {
  absl::MutexLock lock(&mutex_);
  if (count_ >= limit) return false;
  ++count_;
  return true;
}

void InFlightCounter::Remove() {
  absl::MutexLock lock(&mutex_);
  --count_;
}

bool InFlightCounter::WaitForNone(absl::Duration timeout) {
  auto none = [this]() ABSL_SHARED_LOCKS_REQUIRED(mutex_) {
    return count_ == 0;
  };
  absl::MutexLock lock(&mutex_);
  return mutex_.AwaitWithTimeout(absl::Condition(&none), timeout);
}

int InFlightCounter::count() const {
  absl::MutexLock lock(&mutex_);
  return count_;
}

StreamCall::StreamCall(ResponseHandler on_response, DoneHandler on_done)
    : on_response_(std::move(on_response)), on_done_(std::move(on_done)) {}

std::shared_ptr<StreamCall> StreamCall::Start(
    v1::EmotionService::Stub* stub, const v1::StreamingConfig& config,
    const ConnectionOptions& connection, ResponseHandler on_response,
    DoneHandler on_done) {
  std::shared_ptr<StreamCall> call(
      new StreamCall(std::move(on_response), std::move(on_done)));
  // Streams last as long as their audio: a deadline only when asked for.
  SetCallDeadline(connection, /*default_seconds=*/0, &call->context_);
  {
    absl::MutexLock lock(&call->mutex_);
    call->self_ = call;
    call->writing_ = true;  // the config
  }
  *call->current_.mutable_config() = config;
  stub->async()->StreamClassify(&call->context_, call.get());
  call->StartWrite(&call->current_);
  call->StartRead(&call->response_);
  call->StartCall();
  return call;
}

bool StreamCall::SendAudio(std::string pcm) {
  {
    absl::MutexLock lock(&mutex_);
    if (ended_ || close_requested_) return false;
    queued_.push_back(std::move(pcm));
  }
  WriteNext();
  return true;
}

void StreamCall::CloseSend() {
  {
    absl::MutexLock lock(&mutex_);
    close_requested_ = true;
  }
  WriteNext();
}

void StreamCall::Cancel() { context_.TryCancel(); }

void StreamCall::WriteNext() {
  enum { kNothing, kAudio, kClose } next = kNothing;
  std::string audio;
  {
    absl::MutexLock lock(&mutex_);
    if (writing_ || ended_ || closed_) return;
    if (!queued_.empty()) {
      audio = std::move(queued_.front());
      queued_.pop_front();
      writing_ = true;
      next = kAudio;
    } else if (close_requested_) {
      closed_ = true;
      next = kClose;
    }
  }
  // Started outside the lock: gRPC may run the reaction on this thread.
  if (next == kAudio) {
    current_.set_audio(std::move(audio));
    StartWrite(&current_);
  } else if (next == kClose) {
    StartWritesDone();
  }
}

void StreamCall::OnWriteDone(bool ok) {
  {
    absl::MutexLock lock(&mutex_);
    writing_ = false;
    // A failed write means the call is over; OnDone tells how.
    if (!ok) {
      queued_.clear();
      closed_ = true;
      return;
    }
  }
  WriteNext();
}

void StreamCall::OnReadDone(bool ok) {
  if (!ok) return;  // no more responses; OnDone follows
  on_response_(response_);
  StartRead(&response_);
}

void StreamCall::OnDone(const grpc::Status& status) {
  std::shared_ptr<StreamCall> keep_alive;
  {
    absl::MutexLock lock(&mutex_);
    ended_ = true;
    queued_.clear();
    keep_alive = std::move(self_);
  }
  // The call lets go of itself before telling the caller, which may then
  // return from main: were the last reference dropped after on_done, the
  // call (its ClientContext) could be destroyed on this gRPC thread while
  // the process tears gRPC down (ASan saw such a report cut off at exit).
  DoneHandler on_done = std::move(on_done_);
  keep_alive.reset();  // may destroy this object: no member is used below
  on_done(status);
}

}  // namespace emoserve::client
