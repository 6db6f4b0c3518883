#include "server/proto_convert.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/feature_params.h"
#include "core/windowing.h"

namespace emoserve {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

absl::Time ToAbslDeadline(std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

absl::StatusOr<std::optional<RawPcmFormat>> RawPcmFormatFromProto(
    const v1::AudioFormat& format) {
  RawPcmFormat raw;
  switch (format.encoding()) {
    case v1::AUDIO_ENCODING_UNSPECIFIED:
      if (format.sample_rate_hertz() != 0 || format.channel_count() != 0) {
        return absl::InvalidArgumentError(
            "format.sample_rate_hertz/channel_count are set but format.encoding "
            "is AUDIO_ENCODING_UNSPECIFIED (a container file): set encoding to "
            "AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32 for raw PCM, or "
            "leave the format unset for WAV/FLAC/OGG/MP3 files");
      }
      return std::optional<RawPcmFormat>();
    case v1::AUDIO_ENCODING_LINEAR16:
      raw.encoding = PcmEncoding::kS16LE;
      break;
    case v1::AUDIO_ENCODING_FLOAT32:
      raw.encoding = PcmEncoding::kF32LE;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "format.encoding ", format.encoding(),
          " is unknown: use AUDIO_ENCODING_LINEAR16 or AUDIO_ENCODING_FLOAT32"));
  }
  if (absl::Status rate = ValidateSampleRate(format.sample_rate_hertz()); !rate.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "format.sample_rate_hertz: ", rate.message(),
        " (raw PCM must declare its rate)"));
  }
  raw.sample_rate = format.sample_rate_hertz();
  if (format.channel_count() < 0 || format.channel_count() > kMaxChannels) {
    return absl::InvalidArgumentError(absl::StrCat(
        "format.channel_count is ", format.channel_count(), "; use 1 to ", kMaxChannels,
        " (0 means 1)"));
  }
  raw.channels = std::max(1, format.channel_count());
  return std::optional<RawPcmFormat>(raw);
}

std::string AddSortedScores(
    const std::vector<std::string>& labels, absl::Span<const float> probabilities,
    google::protobuf::RepeatedPtrField<v1::EmotionScore>* scores) {
  const size_t n = std::min(labels.size(), probabilities.size());
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return probabilities[a] > probabilities[b];
  });
  for (size_t i : order) {
    v1::EmotionScore* score = scores->Add();
    score->set_label(labels[i]);
    score->set_probability(probabilities[i]);
  }
  return order.empty() ? std::string() : labels[order.front()];
}

absl::StatusOr<v1::ModelInfo> ModelInfoFromConfig(const ModelConfig& config,
                                                  const std::string& device,
                                                  int max_batch_size) {
  v1::ModelInfo info;
  info.set_name(config.name);
  info.set_version(config.version);
  for (const std::string& label : config.labels) info.add_labels(label);
  info.set_sample_rate_hertz(config.sample_rate);
  info.set_window_seconds(config.window_seconds);
  info.set_speaker_adaptation(config.speaker_normalization != SpeakerNormalization::kNone);
  info.set_default_hop_seconds(
      static_cast<double>(DefaultHopSamples(static_cast<size_t>(config.window_samples()))) /
      config.sample_rate);
  const std::string features = FeatureParamsToJson(config.features).dump();
  const auto parsed =
      google::protobuf::util::JsonStringToMessage(features, info.mutable_features());
  if (!parsed.ok()) {
    return absl::InternalError(absl::StrCat(
        "the model's feature parameters do not convert to a Struct: ", parsed.ToString()));
  }
  info.set_device(device);
  info.set_max_batch_size(max_batch_size);
  return info;
}

}  // namespace emoserve
