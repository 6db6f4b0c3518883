// Sample-rate conversion with libsoxr (high quality).
#ifndef EMOSERVE_CORE_RESAMPLER_H_
#define EMOSERVE_CORE_RESAMPLER_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace emoserve {

// Converts a whole signal. Returns the input unchanged when the rates match.
absl::StatusOr<std::vector<float>> Resample(absl::Span<const float> input,
                                            int from_rate, int to_rate);

// Converts a signal that arrives in chunks (a live stream). Not thread-safe:
// one instance per stream.
class StreamResampler {
 public:
  static absl::StatusOr<std::unique_ptr<StreamResampler>> Create(int from_rate,
                                                                 int to_rate);
  ~StreamResampler();
  StreamResampler(const StreamResampler&) = delete;
  StreamResampler& operator=(const StreamResampler&) = delete;

  // Appends the output available so far for `input` to `output`.
  absl::Status Process(absl::Span<const float> input,
                       std::vector<float>* output);
  // Appends the remaining output (end of stream); Process may not follow.
  absl::Status Flush(std::vector<float>* output);

  int from_rate() const { return from_rate_; }
  int to_rate() const { return to_rate_; }

 private:
  StreamResampler(void* soxr, int from_rate, int to_rate);
  void* soxr_;  // soxr_t; opaque here so that callers need no soxr header.
  int from_rate_;
  int to_rate_;
};

}  // namespace emoserve

#endif  // EMOSERVE_CORE_RESAMPLER_H_
