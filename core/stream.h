// A live stream's windows: PCM chunks of any size in, a window every hop,
// energy-based voice activity, utterances with a final aggregated result.
#ifndef EMOSERVE_CORE_STREAM_H_
#define EMOSERVE_CORE_STREAM_H_

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/engine.h"

namespace emoserve {

struct StreamOptions {
  int input_sample_rate = 16000;  // resampled to the model's rate inside
  double hop_seconds = 0;         // 0 = half the model's window
  bool vad_enabled = true;
  double vad_threshold_dbfs = -50.0;
  // The stream fails with kOutOfRange past this much audio.
  double max_seconds = 3600.0;
  absl::Time deadline = absl::InfiniteFuture();
};

struct StreamEvent {
  enum class Type {
    kWindow,         // every window (speech or silence), in order
    kSpeechStarted,  // first speech window of an utterance
    kSpeechEnded,    // first silence window after speech (or stream end)
    kUtterance,      // final result of the utterance that just ended
  };
  Type type = Type::kWindow;
  // Seconds from the start of the stream.
  double start_seconds = 0;
  double end_seconds = 0;
  bool speech = false;
  std::vector<float> probabilities;  // kWindow (speech) and kUtterance
  int window_count = 0;              // kUtterance
};

// One per stream; not thread-safe (one caller feeds it). Events are
// delivered in stream order through `on_event`, on engine threads, never
// concurrently; `on_done` is called exactly once after the last event, with
// OK after Finish() or the first error.
class StreamSession {
 public:
  static absl::StatusOr<std::unique_ptr<StreamSession>> Create(
      Engine* engine, const StreamOptions& options,
      std::function<void(const StreamEvent&)> on_event,
      std::function<void(absl::Status)> on_done);
  ~StreamSession();  // Cancels outstanding work; waits for callbacks to end.

  // Mono samples at options.input_sample_rate. Errors (e.g. kOutOfRange past
  // max_seconds) end the stream: on_done gets the same status.
  absl::Status Push(absl::Span<const float> samples);
  // End of audio: the last partial window is padded and classified, an open
  // utterance is closed, then on_done(OK).
  void Finish();
  // Abandons the stream: on_done(kCancelled) unless already done.
  void Cancel();

  // Bounded by one window plus one chunk, whatever the stream's length.
  size_t buffered_samples() const;

 private:
  struct Impl;
  explicit StreamSession(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_STREAM_H_
