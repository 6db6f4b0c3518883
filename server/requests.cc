#include "server/requests.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/windowing.h"
#include "server/proto_convert.h"

namespace emoserve {

absl::StatusOr<std::optional<RawPcmFormat>> CheckClassifyRequest(
    const v1::ClassifyRequest& request, const ModelConfig& model,
    const RequestLimits& limits) {
  if (request.audio().empty()) {
    return absl::InvalidArgumentError(
        "audio is empty: put the file's bytes (or raw PCM with `format`) in "
        "ClassifyRequest.audio");
  }
  absl::StatusOr<std::optional<RawPcmFormat>> raw = RawPcmFormatFromProto(request.format());
  if (!raw.ok()) return raw.status();
  absl::StatusOr<size_t> hop =
      HopSamples(request.hop_seconds(), model.window_samples(), model.sample_rate,
                 limits.min_hop_seconds, "hop_seconds");
  if (!hop.ok()) return hop.status();
  return raw;
}

namespace {

// A request's statistics blob for `model`, with the field's name in errors.
absl::StatusOr<SpeakerStatistics> ParseSpeakerStatistics(const std::string& blob,
                                                         const Model& model,
                                                         absl::string_view field) {
  absl::StatusOr<SpeakerStatistics> statistics =
      SpeakerStatistics::Parse(blob, model.summary_key(), model.summary_size());
  if (!statistics.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": ", statistics.status().message()));
  }
  return statistics;
}

}  // namespace

absl::StatusOr<ClipSpeaker> CheckClassifySpeaker(const v1::ClassifyRequest& request,
                                                 const Model& model, const RequestLimits& limits) {
  ClipSpeaker speaker;
  if (request.speaker_statistics().empty() && !request.return_speaker_statistics()) {
    return speaker;
  }
  const char* field = request.speaker_statistics().empty() ? "return_speaker_statistics"
                                                           : "speaker_statistics";
  if (absl::Status adapts = CheckAdaptsToSpeakers(model, field); !adapts.ok()) return adapts;
  SpeakerStatistics statistics(model.summary_key(), model.summary_size());
  if (!request.speaker_statistics().empty()) {
    absl::StatusOr<SpeakerStatistics> parsed =
        ParseSpeakerStatistics(request.speaker_statistics(), model, "speaker_statistics");
    if (!parsed.ok()) return parsed.status();
    statistics = *std::move(parsed);
  }
  const ModelConfig& config = model.config();
  absl::StatusOr<size_t> hop = HopSamples(request.hop_seconds(), config.window_samples(),
                                          config.sample_rate, limits.min_hop_seconds);
  if (!hop.ok()) return hop.status();
  const double hop_seconds = static_cast<double>(*hop) / config.sample_rate;
  if (statistics.EnoughToAdapt(hop_seconds, limits.adaptation_min_speech_seconds)) {
    speaker.mean = statistics.Mean();
  }
  if (request.return_speaker_statistics()) speaker.statistics = std::move(statistics);
  return speaker;
}

absl::Status SetStreamSpeaker(const v1::StreamingConfig& config, const Model& model,
                              const RequestLimits& limits, StreamOptions* options) {
  const v1::SpeakerAdaptationConfig& adaptation = config.speaker_adaptation();
  options->speaker_adaptation = !adaptation.disabled();
  options->adaptation_min_speech_seconds = limits.adaptation_min_speech_seconds;
  if (adaptation.speaker_statistics().empty()) return absl::OkStatus();
  const char* field = "config.speaker_adaptation.speaker_statistics";
  if (absl::Status adapts = CheckAdaptsToSpeakers(model, field); !adapts.ok()) return adapts;
  if (adaptation.disabled()) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " was set with config.speaker_adaptation.disabled: drop one of them"));
  }
  absl::StatusOr<SpeakerStatistics> parsed =
      ParseSpeakerStatistics(adaptation.speaker_statistics(), model, field);
  if (!parsed.ok()) return parsed.status();
  options->speaker_statistics = *std::move(parsed);
  return absl::OkStatus();
}

absl::StatusOr<Audio> DecodeClassifyAudio(
    const v1::ClassifyRequest& request, const std::optional<RawPcmFormat>& raw,
    const ModelConfig& model, const RequestLimits& limits,
    std::function<absl::Status(size_t)> reserve,
    std::function<absl::Status()> keep_going) {
  DecodeOptions options;
  options.max_duration_seconds = limits.max_unary_seconds;
  options.raw = raw;
  options.output_sample_rate = model.sample_rate;
  options.reserve = std::move(reserve);
  options.keep_going = std::move(keep_going);
  absl::StatusOr<Audio> audio = DecodeAudio(request.audio(), options);
  if (audio.ok()) return audio;
  const absl::Status& error = audio.status();
  if (absl::IsOutOfRange(error)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        error.message(), "; this server's --max-unary-seconds is ", limits.max_unary_seconds,
        ": use StreamClassify for longer audio"));
  }
  if (absl::IsInvalidArgument(error)) {
    return absl::InvalidArgumentError(absl::StrCat("audio: ", error.message()));
  }
  return error;  // the budget, the deadline, cancellation: said as they are
}

void FillClassifyResponse(const ClipResult& result, const ModelConfig& model,
                          double duration_seconds, bool include_timeline,
                          v1::ClassifyResponse* response) {
  response->set_top_label(
      AddSortedScores(model.labels, result.probabilities, response->mutable_scores()));
  response->set_audio_duration_seconds(duration_seconds);
  response->set_model_name(model.name);
  response->set_model_version(model.version);
  response->set_window_count(static_cast<int>(result.windows.size()));
  response->set_speech_window_count(result.speech_windows);
  response->set_speaker_adapted(result.speaker_adapted);
  if (result.speaker_statistics.has_value()) {
    response->set_speaker_statistics(result.speaker_statistics->Serialize());
  }
  if (!include_timeline) return;
  for (const WindowResult& window : result.windows) {
    v1::WindowResult* out = response->add_timeline();
    out->set_start_seconds(window.start_seconds);
    out->set_end_seconds(window.end_seconds);
    out->set_speech(window.speech);
    out->set_speaker_adapted(result.speaker_adapted && !window.probabilities.empty());
    // A window has probabilities when it reached the model: speech, or
    // every window of a clip without speech.
    AddSortedScores(model.labels, window.probabilities, out->mutable_scores());
  }
}

absl::StatusOr<StreamSetup> CheckStreamConfig(const v1::StreamClassifyRequest& first,
                                              const ModelConfig& model,
                                              const RequestLimits& limits) {
  if (first.streaming_request_case() != v1::StreamClassifyRequest::kConfig) {
    return absl::InvalidArgumentError(
        "the first message of a stream carries only `config` (format, hop, "
        "voice activity); audio came first");
  }
  const v1::StreamingConfig& config = first.config();
  absl::StatusOr<std::optional<RawPcmFormat>> raw = RawPcmFormatFromProto(config.format());
  if (!raw.ok()) return raw.status();
  if (!raw->has_value()) {
    return absl::InvalidArgumentError(
        "config.format.encoding is unset: streams carry raw PCM, so set "
        "AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32 and sample_rate_hertz");
  }
  if (absl::Status valid = ValidateRawPcmFormat(**raw); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config.format: ", valid.message()));
  }
  absl::StatusOr<size_t> hop =
      HopSamples(config.hop_seconds(), model.window_samples(), model.sample_rate,
                 limits.min_hop_seconds, "config.hop_seconds");
  if (!hop.ok()) return hop.status();
  const double threshold = config.voice_activity().threshold_dbfs();
  if (!std::isfinite(threshold) || threshold > 0 || threshold < -200) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.voice_activity.threshold_dbfs is ", threshold,
        "; use a level in [-200, 0) dBFS such as -45, or 0 for the server's default"));
  }
  StreamSetup setup;
  setup.format = **raw;
  setup.options.input_sample_rate = setup.format.sample_rate;
  setup.options.hop_seconds = config.hop_seconds();
  setup.options.vad_enabled = !config.voice_activity().disabled();
  setup.options.vad_threshold_dbfs = threshold == 0 ? limits.vad_threshold_dbfs : threshold;
  setup.options.max_seconds = limits.max_stream_seconds;
  setup.interim_results = config.interim_results();
  return setup;
}

StreamAudioDecoder::StreamAudioDecoder(const RawPcmFormat& format)
    : format_(format),
      pcm_frame_bytes_(static_cast<size_t>(format.encoding == PcmEncoding::kS16LE ? 2 : 4) *
                   format.channels) {}

absl::Status StreamAudioDecoder::Decode(
    const v1::StreamClassifyRequest& message, const RequestLimits& limits,
    const std::function<absl::Status(absl::Span<const float>)>& push) {
  if (message.streaming_request_case() == v1::StreamClassifyRequest::kConfig) {
    return absl::InvalidArgumentError(
        "`config` may only come in the first message; later messages carry only audio");
  }
  const std::string& chunk = message.audio();
  if (chunk.size() > static_cast<size_t>(limits.max_chunk_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "an audio message of ", chunk.size(), " bytes is over this server's limit of ",
        limits.max_chunk_bytes, " (--max-chunk-bytes): send smaller chunks, e.g. 100 ms each"));
  }
  absl::string_view rest = chunk;
  if (!partial_.empty()) {
    const size_t take = std::min(pcm_frame_bytes_ - partial_.size(), rest.size());
    partial_.append(rest.data(), take);
    rest.remove_prefix(take);
    if (partial_.size() < pcm_frame_bytes_) return absl::OkStatus();
    const std::string completed = std::move(partial_);
    partial_.clear();
    if (absl::Status s = DecodeWholeFrames(completed, push); !s.ok()) return s;
  }
  const size_t whole = rest.size() / pcm_frame_bytes_ * pcm_frame_bytes_;
  partial_.assign(rest.data() + whole, rest.size() - whole);
  if (whole == 0) return absl::OkStatus();
  return DecodeWholeFrames(rest.substr(0, whole), push);
}

absl::Status StreamAudioDecoder::DecodeWholeFrames(
    absl::string_view bytes, const std::function<absl::Status(absl::Span<const float>)>& push) {
  DecodeOptions options;
  options.raw = format_;
  // The session enforces the stream's length; a message is bounded by bytes.
  options.max_duration_seconds = std::numeric_limits<double>::infinity();
  absl::StatusOr<Audio> audio = DecodeAudio(std::string_view(bytes.data(), bytes.size()), options);
  if (!audio.ok()) {
    return absl::Status(audio.status().code(),
                        absl::StrCat("audio: ", audio.status().message()));
  }
  return push(audio->samples);
}

std::optional<v1::StreamClassifyResponse> StreamResponse(const StreamEvent& event,
                                                         const ModelConfig& model,
                                                         bool interim_results) {
  const std::vector<std::string>& labels = model.labels;
  v1::StreamClassifyResponse response;
  switch (event.type) {
    case StreamEvent::Type::kWindow: {
      if (!interim_results) return std::nullopt;
      v1::WindowResult* window = response.mutable_window();
      window->set_start_seconds(event.start_seconds);
      window->set_end_seconds(event.end_seconds);
      window->set_speech(event.speech);
      window->set_speaker_adapted(event.speaker_adapted);
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
      utterance->set_speaker_adapted(event.speaker_adapted);
      utterance->set_speaker_statistics(event.speaker_statistics);
      break;
    }
  }
  return response;
}

}  // namespace emoserve
