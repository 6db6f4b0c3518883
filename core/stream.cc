#include "core/stream.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/audio.h"
#include "core/exceptions.h"
#include "core/resampler.h"
#include "core/windowing.h"

namespace emoserve {
namespace {

// The memory of one libsoxr resampler (high quality, one channel), with
// margin: 84-131 KB measured for 8-192 kHz to 16 kHz.
constexpr int64_t kResamplerBytes = 160 << 10;

// What the delivery loop receives, in stream order: a window's outcome or
// the end of the stream.
struct Slot {
  bool end = false;
  // A window.
  double start_seconds = 0;
  double end_seconds = 0;
  bool speech = false;
  absl::StatusOr<std::vector<float>> probabilities = std::vector<float>();
  // A speech window's summary, while the session keeps speaker statistics.
  std::shared_ptr<std::vector<float>> summary;
  // The end: OK after Finish, else the error that ended the stream.
  absl::Status end_status;
};

}  // namespace

struct StreamSession::Impl : std::enable_shared_from_this<Impl> {
  Engine* engine = nullptr;
  StreamOptions options;
  std::function<void(const StreamEvent&)> on_event;
  std::function<void(absl::Status)> on_done;
  double model_rate = 0;
  size_t window = 0;  // samples at the model's rate
  size_t hop = 0;
  // Bytes charged while a speech window is at the engine: its samples and
  // its summary.
  int64_t window_bytes = 0;
  uint64_t flow = 0;  // the engine's turn-taking unit: the whole stream
  uint64_t max_input_samples = 0;
  // Speech windows sent to the engine whose results are not back, and the
  // budget they are charged to.
  std::atomic<int> windows_in_flight{0};
  std::unique_ptr<BudgetLease> lease;
  const std::shared_ptr<CancelFlag> cancel = std::make_shared<CancelFlag>();

  // The feeder's side (Push/Finish, one caller).
  std::unique_ptr<StreamResampler> resampler;  // null when the rates match
  std::vector<float> resampled;                // one chunk at the model's rate
  // Ring buffer of one window: the model-rate samples
  // [next_start, next_start + ring_count), the first at ring[ring_head].
  std::vector<float> ring;
  size_t ring_head = 0;
  size_t ring_count = 0;
  uint64_t next_start = 0;     // model-rate index of the next window's start
  uint64_t model_samples = 0;  // model-rate samples received
  uint64_t input_samples = 0;
  uint64_t windows_emitted = 0;
  uint64_t next_seq = 0;
  bool feeding_closed = false;  // after Finish or a feeding error

  // Delivery, from any thread: slots wait in `pending` until every earlier
  // one was delivered; one thread at a time delivers.
  absl::Mutex mu;
  absl::CondVar delivered_cv;
  std::map<uint64_t, Slot> pending ABSL_GUARDED_BY(mu);
  uint64_t next_delivery ABSL_GUARDED_BY(mu) = 0;
  bool delivering ABSL_GUARDED_BY(mu) = false;
  std::thread::id deliverer ABSL_GUARDED_BY(mu);
  bool done ABSL_GUARDED_BY(mu) = false;  // on_done called (or being called)
  absl::Status final_status ABSL_GUARDED_BY(mu);
  // Cancel or destruction: ends the stream before any further event.
  std::optional<absl::Status> abort ABSL_GUARDED_BY(mu);

  // The open utterance; touched only by the delivering thread.
  bool in_speech = false;
  double utterance_start = 0;
  double utterance_end = 0;
  std::vector<float> utterance_sum;
  int utterance_windows = 0;
  bool utterance_adapted = false;
  // The voice's statistics (speaker-normalised models with adaptation on);
  // touched only by the delivering thread.
  std::optional<SpeakerStatistics> speaker;

  // Feeder side ----------------------------------------------------------

  // With the first audio: the ring buffer and the resampler, charged to the
  // budget for the rest of the stream (a stream that sends no audio holds
  // neither).
  absl::Status Start() {
    const bool resampling = options.input_sample_rate != model_rate;
    const int64_t bytes = static_cast<int64_t>(window * sizeof(float)) +
                          (resampling ? kResamplerBytes : 0) +
                          (speaker.has_value() ? static_cast<int64_t>(speaker->bytes()) : 0);
    if (absl::Status s = lease->Grow(bytes); !s.ok()) return s;
    if (resampling) {
      absl::StatusOr<std::unique_ptr<StreamResampler>> created =
          StreamResampler::Create(options.input_sample_rate, static_cast<int>(model_rate));
      if (!created.ok()) return created.status();
      resampler = *std::move(created);
    }
    ring.resize(window);
    return absl::OkStatus();
  }

  // The voice's statistics, for a speaker-normalised model with adaptation
  // on: `options`' or empty.
  absl::Status StartSpeaker(const Model& model, const StreamOptions& options) {
    if (options.speaker_statistics.has_value()) {
      if (absl::Status adapts = CheckAdaptsToSpeakers(model, "speaker statistics");
          !adapts.ok()) {
        return adapts;
      }
      if (!options.speaker_adaptation) {
        return absl::InvalidArgumentError(
            "speaker statistics were given to a stream with speaker adaptation off");
      }
    }
    if (!(options.adaptation_min_speech_seconds >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad adaptation_min_speech_seconds ", options.adaptation_min_speech_seconds));
    }
    if (!options.speaker_adaptation || model.summary_size() == 0) return absl::OkStatus();
    if (options.speaker_statistics.has_value()) {
      if (options.speaker_statistics->width() != model.summary_size()) {
        return absl::InvalidArgumentError("speaker statistics of another model's summary");
      }
      speaker = options.speaker_statistics;
    } else {
      speaker.emplace(model.summary_key(), model.summary_size());
    }
    return absl::OkStatus();
  }

  // Ends feeding with `status` (an error): delivered after the windows
  // already under way.
  absl::Status FailFeeding(absl::Status status) {
    feeding_closed = true;
    Slot end;
    end.end = true;
    end.end_status = status;
    Insert(next_seq++, std::move(end));
    return status;
  }

  // Windows every hop as the ring fills; stops at the first window that
  // cannot be sent.
  absl::Status Feed(absl::Span<const float> samples) {
    size_t i = 0;
    while (i < samples.size()) {
      const size_t take = std::min(window - ring_count, samples.size() - i);
      const size_t tail = (ring_head + ring_count) % window;
      const size_t first = std::min(take, window - tail);
      std::memcpy(ring.data() + tail, samples.data() + i, first * sizeof(float));
      std::memcpy(ring.data(), samples.data() + i + first, (take - first) * sizeof(float));
      ring_count += take;
      model_samples += take;
      i += take;
      if (ring_count == window) {
        if (absl::Status s = EmitWindow(); !s.ok()) return s;
        ring_head = (ring_head + hop) % window;
        ring_count -= hop;
        next_start += hop;
      }
    }
    return absl::OkStatus();
  }

  // Sends the window at next_start: the ring's samples, zero-padded. A speech
  // window's samples are charged to the budget until its result is back.
  absl::Status EmitWindow() {
    std::vector<float> samples(window, 0.0f);
    const size_t first = std::min(ring_count, window - ring_head);
    std::memcpy(samples.data(), ring.data() + ring_head, first * sizeof(float));
    std::memcpy(samples.data() + first, ring.data(), (ring_count - first) * sizeof(float));
    ++windows_emitted;
    const uint64_t seq = next_seq++;
    Slot slot;
    slot.start_seconds = next_start / model_rate;
    slot.end_seconds = (next_start + ring_count) / model_rate;
    slot.speech = !options.vad_enabled || RmsDbfs(samples) >= options.vad_threshold_dbfs;
    if (!slot.speech) {
      Insert(seq, std::move(slot));
      return absl::OkStatus();
    }
    {
      absl::MutexLock lock(&mu);
      if (done) return absl::OkStatus();  // nobody listens any more
    }
    if (absl::Status charged = lease->Grow(window_bytes); !charged.ok()) {
      // The window's place in the order carries the error, which ends the
      // stream after the windows before it.
      feeding_closed = true;
      slot.probabilities = charged;
      Insert(seq, std::move(slot));
      return charged;
    }
    windows_in_flight.fetch_add(1, std::memory_order_relaxed);
    WindowRequest request;
    request.samples = std::move(samples);
    request.flow = flow;
    request.deadline = options.deadline;
    request.cancel = cancel;
    if (speaker.has_value()) {
      slot.summary = std::make_shared<std::vector<float>>();
      request.summary = slot.summary;
    }
    request.done = [self = shared_from_this(), seq, slot = std::move(slot)](
                       absl::StatusOr<std::vector<float>> probabilities) mutable {
      self->lease->Shrink(self->window_bytes);
      self->windows_in_flight.fetch_sub(1, std::memory_order_relaxed);
      slot.probabilities = std::move(probabilities);
      self->Insert(seq, std::move(slot));
    };
    engine->Submit(std::move(request));
    return absl::OkStatus();
  }

  // The window still owed at the end of the stream: the one unary
  // windowing (WindowStarts) ends with when the audio did not end exactly
  // at a window's end.
  bool OwesLastWindow() const {
    if (model_samples == 0) return false;
    if (windows_emitted == 0) return true;
    return next_start - hop + window < model_samples;
  }

  // Delivery side --------------------------------------------------------

  void Insert(uint64_t seq, Slot slot) {
    absl::MutexLock lock(&mu);
    if (done) return;
    try {
      pending.emplace(seq, std::move(slot));
    } catch (...) {
      // Without the slot the stream cannot go on in order: end it.
      if (!abort.has_value()) abort = StatusFromCurrentException("queueing a stream result");
    }
    DeliverLocked();
  }

  // Delivers what is ready, in order, unless another thread is at it (it
  // will see what was added).
  void DeliverLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (delivering) return;
    delivering = true;
    deliverer = std::this_thread::get_id();
    while (!done) {
      if (abort.has_value()) {
        FinishLocked(*abort);
        break;
      }
      auto it = pending.find(next_delivery);
      if (it == pending.end()) break;
      Slot slot = std::move(it->second);
      pending.erase(it);
      ++next_delivery;
      std::vector<StreamEvent> events;
      std::optional<absl::Status> end;
      mu.Unlock();
      Process(std::move(slot), &events, &end);
      mu.Lock();
      for (const StreamEvent& event : events) {
        if (done || abort.has_value()) break;
        mu.Unlock();
        on_event(event);
        mu.Lock();
      }
      if (end.has_value() && !done && !abort.has_value()) FinishLocked(*end);
    }
    delivering = false;
    delivered_cv.SignalAll();
  }

  // Calls on_done (once) and drops whatever is still under way.
  void FinishLocked(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    done = true;
    final_status = status;
    pending.clear();
    cancel->Cancel();
    mu.Unlock();
    on_done(std::move(status));
    mu.Lock();
  }

  // Turns one slot into events and the utterance bookkeeping.
  void Process(Slot slot, std::vector<StreamEvent>* events,
               std::optional<absl::Status>* end) {
    if (slot.end) {
      if (slot.end_status.ok()) CloseUtterance(events);
      *end = slot.end_status;
      return;
    }
    if (!slot.probabilities.ok()) {
      *end = slot.probabilities.status();
      return;
    }
    StreamEvent window;
    window.type = StreamEvent::Type::kWindow;
    window.start_seconds = slot.start_seconds;
    window.end_seconds = slot.end_seconds;
    window.speech = slot.speech;
    if (slot.speech) {
      if (absl::Status s = Adapt(slot, &window); !s.ok()) {
        *end = s;
        return;
      }
      if (!in_speech) {
        in_speech = true;
        utterance_start = slot.start_seconds;
        utterance_sum.assign(slot.probabilities->size(), 0.0f);
        utterance_windows = 0;
        utterance_adapted = false;
        StreamEvent started = window;
        started.type = StreamEvent::Type::kSpeechStarted;
        events->push_back(std::move(started));
      }
      utterance_end = slot.end_seconds;
      ++utterance_windows;
      utterance_adapted = utterance_adapted || window.speaker_adapted;
      for (size_t c = 0; c < utterance_sum.size(); ++c) {
        utterance_sum[c] += (*slot.probabilities)[c];
      }
      window.probabilities = *std::move(slot.probabilities);
    } else {
      CloseUtterance(events);
    }
    events->push_back(std::move(window));
  }

  // A speech window, in stream order: adapted to the windows before it once
  // they hold enough speech, then added to the voice's statistics.
  absl::Status Adapt(Slot& slot, StreamEvent* window) {
    if (!speaker.has_value()) return absl::OkStatus();
    const double hop_seconds = hop / model_rate;
    if (speaker->EnoughToAdapt(hop_seconds, options.adaptation_min_speech_seconds)) {
      absl::StatusOr<std::vector<float>> adapted =
          engine->model().PredictFromSummaries(*slot.summary, 1, speaker->Mean());
      if (!adapted.ok()) return adapted.status();
      slot.probabilities = *std::move(adapted);
      window->speaker_adapted = true;
    }
    return speaker->Add(*slot.summary);
  }

  void CloseUtterance(std::vector<StreamEvent>* events) {
    if (!in_speech) return;
    in_speech = false;
    StreamEvent ended;
    ended.type = StreamEvent::Type::kSpeechEnded;
    ended.start_seconds = utterance_start;
    ended.end_seconds = utterance_end;
    StreamEvent utterance = ended;
    utterance.type = StreamEvent::Type::kUtterance;
    utterance.speech = true;
    utterance.window_count = utterance_windows;
    utterance.speaker_adapted = utterance_adapted;
    if (speaker.has_value()) utterance.speaker_statistics = speaker->Serialize();
    utterance.probabilities = utterance_sum;
    for (float& p : utterance.probabilities) p /= static_cast<float>(utterance_windows);
    events->push_back(std::move(ended));
    events->push_back(std::move(utterance));
  }

  // Why Push/Finish may not go on, or OK.
  absl::Status Closed() {
    absl::MutexLock lock(&mu);
    if (done) {
      return final_status.ok()
                 ? absl::FailedPreconditionError("the stream has already finished")
                 : final_status;
    }
    if (abort.has_value()) return *abort;
    if (feeding_closed) return absl::FailedPreconditionError("the stream was finished");
    return absl::OkStatus();
  }

  // Cancel and destruction: no event after this.
  void Abort(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    cancel->Cancel();
    if (!done && !abort.has_value()) abort = std::move(status);
  }
};

StreamSession::StreamSession(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<StreamSession>> StreamSession::Create(
    Engine* engine, const StreamOptions& options,
    std::function<void(const StreamEvent&)> on_event,
    std::function<void(absl::Status)> on_done) {
  if (engine == nullptr || on_event == nullptr || on_done == nullptr) {
    return absl::InvalidArgumentError("StreamSession needs an engine and both callbacks");
  }
  if (absl::Status rate = ValidateSampleRate(options.input_sample_rate); !rate.ok()) {
    return rate;
  }
  const ModelConfig& config = engine->model().config();
  auto impl = std::make_shared<Impl>();
  impl->window = static_cast<size_t>(config.window_samples());
  impl->model_rate = config.sample_rate;
  absl::StatusOr<size_t> hop = HopSamples(options.hop_seconds, impl->window, config.sample_rate,
                                          engine->options().min_hop_seconds);
  if (!hop.ok()) return hop.status();
  impl->hop = *hop;
  if (!(options.max_seconds > 0) || std::isnan(options.vad_threshold_dbfs)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad max_seconds ", options.max_seconds, " or vad_threshold_dbfs ",
                     options.vad_threshold_dbfs));
  }
  if (absl::Status speaker = impl->StartSpeaker(engine->model(), options); !speaker.ok()) {
    return speaker;
  }
  impl->window_bytes = static_cast<int64_t>(impl->window * sizeof(float)) +
                       (impl->speaker.has_value() ? engine->model().summary_size() * 4 : 0);
  impl->engine = engine;
  impl->flow = engine->NewFlow();
  impl->lease = std::make_unique<BudgetLease>(options.budget);
  impl->options = options;
  impl->options.speaker_statistics.reset();  // held as impl->speaker
  impl->on_event = std::move(on_event);
  impl->on_done = std::move(on_done);
  impl->max_input_samples =
      static_cast<uint64_t>(std::floor(options.max_seconds * options.input_sample_rate));
  return std::unique_ptr<StreamSession>(new StreamSession(std::move(impl)));
}

StreamSession::~StreamSession() {
  Impl& impl = *impl_;
  absl::MutexLock lock(&impl.mu);
  impl.Abort(absl::CancelledError("the stream session was destroyed"));
  if (impl.delivering && impl.deliverer == std::this_thread::get_id()) {
    // Destroyed from inside one of its own callbacks: end it here; the
    // delivery loop below us sees `done` and stops.
    if (!impl.done) impl.FinishLocked(*impl.abort);
    return;
  }
  impl.DeliverLocked();
  // Another thread may be inside on_event; it calls on_done next.
  while (impl.delivering) impl.delivered_cv.Wait(&impl.mu);
}

absl::Status StreamSession::Push(absl::Span<const float> samples) {
  // A callback may destroy this session while we deliver.
  const std::shared_ptr<Impl> impl = impl_;
  if (absl::Status closed = impl->Closed(); !closed.ok()) return closed;
  if (absl::Status valid = CheckSamples(samples, impl->input_samples); !valid.ok()) {
    return impl->FailFeeding(valid);
  }
  if (impl->input_samples + samples.size() > impl->max_input_samples) {
    return impl->FailFeeding(absl::OutOfRangeError(absl::StrCat(
        "the stream is longer than its limit of ", impl->options.max_seconds, " s")));
  }
  if (absl::Now() >= impl->options.deadline) {
    return impl->FailFeeding(absl::DeadlineExceededError("the stream's deadline passed"));
  }
  impl->input_samples += samples.size();
  try {
    if (impl->ring.empty()) {
      if (absl::Status s = impl->Start(); !s.ok()) return impl->FailFeeding(s);
    }
    absl::Span<const float> at_model_rate = samples;
    if (impl->resampler != nullptr) {
      impl->resampled.clear();
      if (absl::Status s = impl->resampler->Process(samples, &impl->resampled); !s.ok()) {
        return impl->FailFeeding(s);
      }
      at_model_rate = impl->resampled;
    }
    if (absl::Status s = impl->Feed(at_model_rate); !s.ok()) return s;
  } catch (...) {
    return impl->FailFeeding(StatusFromCurrentException("processing stream audio"));
  }
  return absl::OkStatus();
}

void StreamSession::Finish() {
  const std::shared_ptr<Impl> impl = impl_;
  if (!impl->Closed().ok()) return;
  try {
    if (impl->resampler != nullptr) {
      impl->resampled.clear();
      if (absl::Status s = impl->resampler->Flush(&impl->resampled); !s.ok()) {
        impl->FailFeeding(s).IgnoreError();  // on_done reports it
        return;
      }
      if (!impl->Feed(impl->resampled).ok()) return;  // on_done reports it
    }
    if (impl->OwesLastWindow() && !impl->EmitWindow().ok()) return;
  } catch (...) {
    impl->FailFeeding(StatusFromCurrentException("finishing the stream")).IgnoreError();
    return;
  }
  impl->feeding_closed = true;
  Slot end;
  end.end = true;
  impl->Insert(impl->next_seq++, std::move(end));
}

void StreamSession::Cancel() {
  const std::shared_ptr<Impl> impl = impl_;
  absl::MutexLock lock(&impl->mu);
  impl->Abort(absl::CancelledError("the stream was cancelled"));
  impl->DeliverLocked();
}

int StreamSession::windows_in_flight() const {
  return impl_->windows_in_flight.load(std::memory_order_relaxed);
}

size_t StreamSession::buffered_samples() const {
  return impl_->ring_count + impl_->resampled.size();
}

}  // namespace emoserve
