#include "tests/fuzz/fuzz_support.h"

#include <cstdio>
#include <cstdlib>
#include <memory>

namespace emoserve::fuzz {

Engine& SharedEngine() {
  static Engine* engine = [] {
    absl::StatusOr<std::unique_ptr<Model>> model =
        Model::Load(EMOSERVE_SOURCE_DIR "/tests/fuzz/model");
    if (!model.ok()) {
      std::fprintf(stderr, "fuzz: %s\n", std::string(model.status().message()).c_str());
      std::abort();
    }
    EngineOptions options;
    options.feature_threads = 1;
    options.feature_thread_nice = 0;
    options.max_batch_size = 8;
    absl::StatusOr<std::unique_ptr<Engine>> created =
        Engine::Create(std::shared_ptr<const Model>(*std::move(model)), options);
    if (!created.ok()) {
      std::fprintf(stderr, "fuzz: %s\n", std::string(created.status().message()).c_str());
      std::abort();
    }
    return created->release();  // lives as long as the process
  }();
  return *engine;
}

RequestLimits Limits() {
  RequestLimits limits;
  limits.max_unary_seconds = 20;
  limits.max_stream_seconds = 20;
  limits.max_chunk_bytes = 64 << 10;
  limits.min_hop_seconds = 0.25;
  return limits;
}

}  // namespace emoserve::fuzz
