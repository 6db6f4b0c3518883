// Asynchronous calls on the gRPC callback API, shared by `classify`,
// `stream` and `bench`: no thread waits on a call, so one process can keep
// thousands in flight.
#ifndef EMOSERVE_CLIENT_CALLS_H_
#define EMOSERVE_CLIENT_CALLS_H_

#include <deque>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/connection.h"
#include "emoserve/v1/emoserve.grpc.pb.h"

namespace emoserve::client {

// Counts calls in flight, to bound them and to wait for the last one.
// Thread-safe.
class InFlightCounter {
 public:
  // Blocks until fewer than `limit` calls are in flight, then counts one.
  void WaitAndAdd(int limit);
  // Counts one if fewer than `limit` are in flight; false otherwise.
  bool TryAdd(int limit);
  void Remove();
  // Blocks until no call is in flight or `timeout` passes; true when none.
  bool WaitForNone(absl::Duration timeout);
  int count() const;

 private:
  mutable absl::Mutex mutex_;
  int count_ ABSL_GUARDED_BY(mutex_) = 0;
};

// Called once, on a gRPC thread, when a Classify call ends. Must not block.
using ClassifyDone =
    std::function<void(const grpc::Status&, const v1::ClassifyResponse&)>;

// Starts a Classify call. `request` is shared (and only read), so that many
// calls can send one payload without copying it.
void StartClassify(v1::EmotionService::Stub* stub,
                   std::shared_ptr<const v1::ClassifyRequest> request,
                   const ConnectionOptions& connection,
                   double default_timeout_seconds, ClassifyDone done);

// One StreamClassify call. Audio may be queued from any thread at any pace;
// it is written in order, one message at a time. The call keeps itself
// alive until it ends, so queuing to a finished call is harmless.
class StreamCall
    : public grpc::ClientBidiReactor<v1::StreamClassifyRequest,
                                     v1::StreamClassifyResponse> {
 public:
  // Both run on gRPC threads and must not block; `on_response` calls are
  // never concurrent, and `on_done` comes once, after the last of them.
  using ResponseHandler = std::function<void(const v1::StreamClassifyResponse&)>;
  using DoneHandler = std::function<void(const grpc::Status&)>;

  // Starts the call with `config` as its first message. No deadline unless
  // connection.timeout_seconds is set.
  static std::shared_ptr<StreamCall> Start(v1::EmotionService::Stub* stub,
                                           const v1::StreamingConfig& config,
                                           const ConnectionOptions& connection,
                                           ResponseHandler on_response,
                                           DoneHandler on_done);

  // Queues raw PCM. False (and nothing is sent) once the call has ended or
  // CloseSend was called.
  bool SendAudio(std::string pcm);
  // Ends the send side after the queued audio: the server then flushes and
  // sends the final results.
  void CloseSend();
  // Ends the call now (on_done gets CANCELLED unless it already ended).
  void Cancel();

  // grpc::ClientBidiReactor
  void OnWriteDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  StreamCall(ResponseHandler on_response, DoneHandler on_done);
  // Starts the next write (audio, then the close) unless one is in flight.
  void WriteNext();

  grpc::ClientContext context_;
  v1::StreamClassifyResponse response_;
  ResponseHandler on_response_;
  DoneHandler on_done_;

  absl::Mutex mutex_;
  // The message being written; touched only by whoever set writing_.
  v1::StreamClassifyRequest current_;
  std::deque<std::string> queued_ ABSL_GUARDED_BY(mutex_);
  bool writing_ ABSL_GUARDED_BY(mutex_) = false;
  bool close_requested_ ABSL_GUARDED_BY(mutex_) = false;
  bool closed_ ABSL_GUARDED_BY(mutex_) = false;
  bool ended_ ABSL_GUARDED_BY(mutex_) = false;
  std::shared_ptr<StreamCall> self_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_CALLS_H_
