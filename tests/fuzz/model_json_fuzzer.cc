// libFuzzer: model.json as the server reads it. A text it accepts must
// describe a usable model (a window of at least one frame, features of at
// most the documented sizes) and survive a round trip through
// ModelConfigToJson unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace emoserve;
  absl::StatusOr<ModelConfig> config =
      ParseModelConfig(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!config.ok()) return 0;
  if (config->window_samples() <= 0 || config->num_frames() <= 0 ||
      config->num_features() <= 0) {
    std::abort();
  }
  const nlohmann::json json = ModelConfigToJson(*config);
  absl::StatusOr<ModelConfig> again = ModelConfigFromJson(json);
  if (!again.ok() || ModelConfigToJson(*again) != json) std::abort();
  return 0;
}
