// A live stream's windows: PCM chunks of any size in, a window every hop,
// energy-based voice activity, utterances with a final aggregated result.
#ifndef EMOSERVE_CORE_STREAM_H_
#define EMOSERVE_CORE_STREAM_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/engine.h"
#include "core/memory_budget.h"
#include "core/speaker_statistics.h"

namespace emoserve {

struct StreamOptions {
  int input_sample_rate = 16000;  // resampled to the model's rate inside
  double hop_seconds = 0;         // 0 = half the model's window
  bool vad_enabled = true;
  double vad_threshold_dbfs = EngineOptions().vad_threshold_dbfs;
  // The stream fails with kOutOfRange past this much audio.
  double max_seconds = 3600.0;
  absl::Time deadline = absl::InfiniteFuture();
  // When set, each speech window's samples are charged to it from the
  // moment the window is sent until its result is back; a window the
  // budget cannot cover ends the stream with kResourceExhausted.
  MemoryBudget* budget = nullptr;
  // Speaker-normalised models (Model::summary_size() > 0; ignored for
  // others): the session keeps its voice's statistics, adds each speech
  // window's summary in stream order, and answers a speech window adapted
  // to the windows before it once they hold adaptation_min_speech_seconds
  // of speech (SpeakerStatistics::speech_seconds at this stream's hop).
  bool speaker_adaptation = true;
  double adaptation_min_speech_seconds = kDefaultAdaptationMinSpeechSeconds;
  // The voice's statistics from earlier audio (a blob's) to start from;
  // needs speaker_adaptation and a speaker-normalised model.
  std::optional<SpeakerStatistics> speaker_statistics;
};

struct StreamEvent {
  enum class Type {
    kWindow,         // every window (speech or silence), in order
    kSpeechStarted,  // before the kWindow of an utterance's first window
    kSpeechEnded,    // after its last speech window, at the first silence
                     // window (before that window's kWindow) or at Finish
    kUtterance,      // right after kSpeechEnded: the utterance's result
  };
  Type type = Type::kWindow;
  // Seconds from the start of the stream: the window's span (the last,
  // padded window ends where the audio ends), or for kSpeechEnded and
  // kUtterance the utterance's span (first window's start, last's end).
  double start_seconds = 0;
  double end_seconds = 0;
  bool speech = false;
  std::vector<float> probabilities;  // kWindow (speech) and kUtterance
  int window_count = 0;              // kUtterance
  // kWindow: its probabilities were adapted to the voice's statistics;
  // kUtterance: at least one of its windows' were.
  bool speaker_adapted = false;
  // kUtterance, while the session keeps statistics: they, after the
  // utterance's windows (SpeakerStatistics::Serialize).
  std::string speaker_statistics;
};

// One per stream; not thread-safe (one caller feeds it), except Cancel.
// Windows start every hop at the model's rate, as Engine::Classify's do over
// the same audio, and are judged speech or silence by their RMS level as
// Classify judges them; silent windows skip the model. Events are delivered
// in stream order through `on_event`, never concurrently, on engine threads
// or inside Push/Finish/Cancel (silent windows need no engine); `on_done` is
// called exactly once after the last event, with OK after Finish() or the
// first error. An utterance is a run of consecutive speech windows. The
// engine must outlive the session.
class StreamSession {
 public:
  static absl::StatusOr<std::unique_ptr<StreamSession>> Create(
      Engine* engine, const StreamOptions& options,
      std::function<void(const StreamEvent&)> on_event,
      std::function<void(absl::Status)> on_done);
  // Cancels outstanding work (on_done(kCancelled) unless already done) and
  // waits for a callback running on another thread to return; no callback
  // follows. May be called from inside on_event / on_done.
  ~StreamSession();

  // Mono samples at options.input_sample_rate. Errors (e.g. kOutOfRange past
  // max_seconds) end the stream: on_done gets the same status.
  absl::Status Push(absl::Span<const float> samples);
  // End of audio: the last partial window is padded and classified, an open
  // utterance is closed, then on_done(OK).
  void Finish();
  // Abandons the stream: on_done(kCancelled) unless already done; no event
  // follows. Callable from any thread.
  void Cancel();

  // Speech windows sent to the engine whose results are not back yet (the
  // caller's backpressure: stop reading audio while this is high).
  int windows_in_flight() const;

  // Samples held: the ring buffer (under one window) plus the last chunk
  // resampled; bounded whatever the stream's length.
  size_t buffered_samples() const;

 private:
  struct Impl;
  explicit StreamSession(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_STREAM_H_
