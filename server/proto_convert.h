// Conversions between emoserve.v1 messages / gRPC statuses and core/ types.
#ifndef EMOSERVE_SERVER_PROTO_CONVERT_H_
#define EMOSERVE_SERVER_PROTO_CONVERT_H_

#include <optional>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/audio.h"
#include "core/model_config.h"
#include "emoserve/v1/emoserve.pb.h"

namespace emoserve {

// Same code (absl's codes are gRPC's), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// A gRPC deadline (time_point::max() when none) as an absl::Time.
absl::Time ToAbslDeadline(std::chrono::system_clock::time_point deadline);

// The raw PCM format of `format`, or nullopt for a container file
// (AUDIO_ENCODING_UNSPECIFIED). kInvalidArgument names the field to fix.
absl::StatusOr<std::optional<RawPcmFormat>> RawPcmFormatFromProto(
    const v1::AudioFormat& format);

// Adds one score per label, highest probability first (ties keep label
// order), and returns the top label ("" when `probabilities` is empty).
// `probabilities` is in the model's label order.
std::string AddSortedScores(
    const std::vector<std::string>& labels, absl::Span<const float> probabilities,
    google::protobuf::RepeatedPtrField<v1::EmotionScore>* scores);

// ModelInfo for a loaded model.
absl::StatusOr<v1::ModelInfo> ModelInfoFromConfig(const ModelConfig& config,
                                                  const std::string& device,
                                                  int max_batch_size);

}  // namespace emoserve

#endif  // EMOSERVE_SERVER_PROTO_CONVERT_H_
