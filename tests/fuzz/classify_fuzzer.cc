// libFuzzer: a Classify request from its serialized bytes to the response,
// as the service runs it: the request's checks, decoding straight to the
// model's rate within a budget, windows, voice activity, real features and
// batching on the engine (a stand-in model instead of LibTorch), the
// response. Every charge to the budget must come back.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/memory_budget.h"
#include "emoserve/v1/emoserve.pb.h"
#include "server/requests.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace emoserve;
  v1::ClassifyRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  Engine& engine = fuzz::SharedEngine();
  const ModelConfig& model = engine.model().config();
  const RequestLimits limits = fuzz::Limits();
  absl::StatusOr<std::optional<RawPcmFormat>> raw = CheckClassifyRequest(request, model, limits);
  if (!raw.ok()) return 0;
  MemoryBudget budget(32 << 20);
  {
    auto lease = std::make_shared<BudgetLease>(&budget);
    absl::StatusOr<Audio> audio = DecodeClassifyAudio(
        request, *raw, model, limits,
        [&](size_t capacity) { return lease->Resize(static_cast<int64_t>(capacity * 4)); },
        [] { return absl::OkStatus(); });
    if (audio.ok()) {
      absl::Notification done;
      absl::StatusOr<ClipResult> result;
      ClipRequest clip;
      clip.samples = std::move(audio->samples);
      clip.hop_seconds = request.hop_seconds();
      clip.lease = std::move(lease);
      clip.done = [&](absl::StatusOr<ClipResult> r) {
        result = std::move(r);
        done.Notify();
      };
      engine.Classify(std::move(clip));
      if (!done.WaitForNotificationWithTimeout(absl::Seconds(60))) std::abort();
      if (result.ok()) {
        v1::ClassifyResponse response;
        FillClassifyResponse(*result, model, audio->duration_seconds(),
                             request.include_timeline(), &response);
        double sum = 0;
        for (const v1::EmotionScore& score : response.scores()) {
          if (!std::isfinite(score.probability())) std::abort();
          sum += score.probability();
        }
        if (std::abs(sum - 1.0) > 1e-3) std::abort();
      }
    }
  }
  // The engine lets go of the clip's audio with its last window.
  const absl::Time until = absl::Now() + absl::Seconds(60);
  while (budget.used() != 0) {
    if (absl::Now() > until) std::abort();
    absl::SleepFor(absl::Microseconds(100));
  }
  return 0;
}
