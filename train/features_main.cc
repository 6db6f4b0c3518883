// emoserve-features: the service's features for one audio file, for
// comparison with Python (librosa) pipelines.
//   emoserve-features --params P.json --input AUDIO --output OUT.f32
// P.json is a params object or a golden case file (its "params"). The audio
// is resampled to the params' sample_rate when it names one. The output is
// little-endian float32, row-major [feature][frame].
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"
#include "core/feature_params.h"
#include "core/features.h"
#include "core/resampler.h"

namespace emoserve {
namespace {

absl::Status WriteFloats(const std::string& path, const std::vector<float>& data) {
  static_assert(sizeof(float) == 4, "float32 output");
  // x86-64 and aarch64 are little-endian, the output's byte order.
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::NotFoundError(absl::StrCat("cannot create ", path));
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size() * sizeof(float)));
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::Status Run(const std::string& params_path, const std::string& input_path,
                 const std::string& output_path) {
  absl::StatusOr<std::string> params_text = ReadFileBytes(params_path);
  if (!params_text.ok()) return params_text.status();
  absl::StatusOr<FeatureParams> params = ParseFeatureParams(*params_text);
  if (!params.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(params_path, ": ", params.status().message()));
  }
  // No length limit: this is an offline tool.
  DecodeOptions options;
  options.max_duration_seconds = 1e9;
  absl::StatusOr<Audio> audio = DecodeAudioFile(input_path, options);
  if (!audio.ok()) {
    return absl::Status(audio.status().code(),
                        absl::StrCat(input_path, ": ", audio.status().message()));
  }
  const int rate = params->sample_rate.value_or(audio->sample_rate);
  absl::StatusOr<std::vector<float>> samples =
      Resample(audio->samples, audio->sample_rate, rate);
  if (!samples.ok()) return samples.status();
  absl::StatusOr<std::unique_ptr<FeatureExtractor>> extractor =
      FeatureExtractor::Create(*params, rate);
  if (!extractor.ok()) return extractor.status();
  absl::StatusOr<FeatureMatrix> features = (*extractor)->Compute(*samples);
  if (!features.ok()) return features.status();
  if (absl::Status s = WriteFloats(output_path, features->data); !s.ok()) {
    return s;
  }
  std::fprintf(stderr, "%s: %d features x %d frames at %d Hz (input %d Hz)\n",
               output_path.c_str(), features->rows, features->cols, rate,
               audio->sample_rate);
  return absl::OkStatus();
}

}  // namespace
}  // namespace emoserve

int main(int argc, char** argv) {
  CLI::App app{
      "emoserve-features: librosa-compatible MFCC / log-mel features of an "
      "audio file, as little-endian float32 [feature][frame]"};
  std::string params_path, input_path, output_path;
  app.add_option("--params", params_path,
                 "feature params JSON (a params object or a golden case file)")
      ->required();
  app.add_option("--input", input_path, "audio file (WAV, FLAC, OGG, MP3, ...)")
      ->required();
  app.add_option("--output", output_path, "output .f32 file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "emoserve-features: %s (see --help)\n", e.what());
    return 1;
  }

  const absl::Status status =
      emoserve::Run(params_path, input_path, output_path);
  if (!status.ok()) {
    std::fprintf(stderr, "emoserve-features: %s\n",
                 std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
