// What the service does with a request's fields, without gRPC: checking a
// Classify request and decoding its audio at the model's rate, checking a
// stream's config, decoding a stream's audio messages, and turning results
// into responses. The gRPC reactors (emotion_service.cc) and the fuzz
// targets (tests/fuzz/) run these same functions.
#ifndef EMOSERVE_SERVER_REQUESTS_H_
#define EMOSERVE_SERVER_REQUESTS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/audio.h"
#include "core/engine.h"
#include "core/model.h"
#include "core/model_config.h"
#include "core/speaker_statistics.h"
#include "core/stream.h"
#include "emoserve/v1/emoserve.pb.h"
#include "server/config.h"

namespace emoserve {

// The limits a request is checked against: the server's flags (their
// defaults by default).
struct RequestLimits {
  double max_unary_seconds = ServerConfig().max_unary_seconds;
  double max_stream_seconds = ServerConfig().max_stream_seconds;
  int64_t max_chunk_bytes = ServerConfig().max_chunk_bytes;
  double min_hop_seconds = ServerConfig().min_hop_seconds;
  // The threshold of calls that set none.
  double vad_threshold_dbfs = ServerConfig().vad_threshold_dbfs;
  double adaptation_min_speech_seconds = ServerConfig().adaptation_min_speech_seconds;
};

// The raw PCM format of a Classify request (nullopt: a container file),
// once its audio, format and hop check out.
absl::StatusOr<std::optional<RawPcmFormat>> CheckClassifyRequest(
    const v1::ClassifyRequest& request, const ModelConfig& model,
    const RequestLimits& limits);

// What a Classify request asks of speaker adaptation (ClipRequest's
// fields): the mean to adapt to, when its statistics hold enough speech,
// and the statistics to add the clip to, when they are to be returned.
struct ClipSpeaker {
  std::vector<float> mean;
  std::optional<SpeakerStatistics> statistics;
};

// Checks a Classify request's speaker fields against `model` (and parses
// its blob).
absl::StatusOr<ClipSpeaker> CheckClassifySpeaker(const v1::ClassifyRequest& request,
                                                 const Model& model, const RequestLimits& limits);

// Decodes a checked request's audio straight to the model's rate. `reserve`
// and `keep_going` are DecodeOptions': the budget, and the call's deadline
// and cancellation. Audio over the unary limit is kResourceExhausted with a
// hint to stream it.
absl::StatusOr<Audio> DecodeClassifyAudio(
    const v1::ClassifyRequest& request, const std::optional<RawPcmFormat>& raw,
    const ModelConfig& model, const RequestLimits& limits,
    std::function<absl::Status(size_t)> reserve,
    std::function<absl::Status()> keep_going);

// The response for a classified clip of `duration_seconds`.
void FillClassifyResponse(const ClipResult& result, const ModelConfig& model,
                          double duration_seconds, bool include_timeline,
                          v1::ClassifyResponse* response);

// A stream as its first message configures it.
struct StreamSetup {
  RawPcmFormat format;
  StreamOptions options;  // budget and deadline left for the caller
  bool interim_results = false;
};

// Checks a stream's first message as fully as a Classify request: raw PCM
// only, rate, channels, hop, voice activity.
absl::StatusOr<StreamSetup> CheckStreamConfig(const v1::StreamClassifyRequest& first,
                                              const ModelConfig& model,
                                              const RequestLimits& limits);

// Sets `options`' speaker adaptation from a checked config, for `model`.
absl::Status SetStreamSpeaker(const v1::StreamingConfig& config, const Model& model,
                              const RequestLimits& limits, StreamOptions* options);

// A stream's audio messages to samples. A PCM frame (one sample of every
// channel) may straddle two messages: the bytes of an incomplete PCM frame
// wait for the next message, and never more than one PCM frame's worth is
// kept.
class StreamAudioDecoder {
 public:
  explicit StreamAudioDecoder(const RawPcmFormat& format);

  // Checks an audio message (not a config, not over the chunk limit) and
  // passes its whole PCM frames, as mono samples, to `push` (at most twice:
  // the PCM frame completed from the previous message, then the rest).
  absl::Status Decode(const v1::StreamClassifyRequest& message, const RequestLimits& limits,
                      const std::function<absl::Status(absl::Span<const float>)>& push);

  size_t pending_bytes() const { return partial_.size(); }
  size_t pcm_frame_bytes() const { return pcm_frame_bytes_; }

 private:
  absl::Status DecodeWholeFrames(absl::string_view bytes,
                                 const std::function<absl::Status(absl::Span<const float>)>& push);

  RawPcmFormat format_;
  size_t pcm_frame_bytes_;
  std::string partial_;  // under one PCM frame
};

// The response for a session event, or nullopt for a window event when
// interim results are off.
std::optional<v1::StreamClassifyResponse> StreamResponse(const StreamEvent& event,
                                                         const ModelConfig& model,
                                                         bool interim_results);

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_REQUESTS_H_
