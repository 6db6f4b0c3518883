// librosa-exact features (stft -> melspectrogram -> power_to_db -> MFCC or
// log-mel) on FFTW.
#ifndef EMOSERVE_CORE_FEATURES_H_
#define EMOSERVE_CORE_FEATURES_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/feature_params.h"

namespace emoserve {

// Row-major [feature][frame], a frame being one STFT frame (a hop).
struct FeatureMatrix {
  int rows = 0;  // features
  int cols = 0;  // frames
  std::vector<float> data;

  float at(int row, int col) const {
    return data[static_cast<size_t>(row) * cols + col];
  }
};

// Computes features for one parameter set at one sample rate. Construction
// makes the FFTW plans and the filterbanks once; Compute is thread-safe and
// may be called from any number of threads at once.
class FeatureExtractor {
 public:
  static absl::StatusOr<std::unique_ptr<FeatureExtractor>> Create(
      const FeatureParams& params, int sample_rate);
  ~FeatureExtractor();

  absl::StatusOr<FeatureMatrix> Compute(absl::Span<const float> samples) const;
  // Same, reusing `out`'s storage.
  absl::Status Compute(absl::Span<const float> samples,
                       FeatureMatrix* out) const;

  const FeatureParams& params() const;
  int sample_rate() const;
  int num_features() const;

 private:
  struct Impl;
  explicit FeatureExtractor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// librosa.mel_frequencies(n_mels + 2, fmin, fmax, htk=False): the edges of
// the Slaney mel filters, in Hz; row m of the mel spectrogram is centred at
// element m + 1. Equally spaced below 1 kHz, where the scale is linear.
std::vector<double> MelFrequencies(const FeatureParams& params, int sample_rate);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_FEATURES_H_
