// libFuzzer: a StreamClassify call's message sequence, as the service runs
// it. The input is a list of messages, each a 2-byte little-endian length
// and a serialized StreamClassifyRequest; the first configures the stream
// (checked as the service checks it), the rest are decoded (frames may
// straddle messages) and pushed into a real session on the engine (a
// stand-in model), then the stream is finished. The session must end
// exactly once, every event must make a response, and every charge to
// the budget must come back.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/memory_budget.h"
#include "core/stream.h"
#include "emoserve/v1/emoserve.pb.h"
#include "server/requests.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace emoserve;
  std::vector<v1::StreamClassifyRequest> messages;
  for (size_t pos = 0; pos + 2 <= size && messages.size() < 256;) {
    const size_t length = data[pos] | (static_cast<size_t>(data[pos + 1]) << 8);
    pos += 2;
    if (length > size - pos) break;
    v1::StreamClassifyRequest message;
    if (!message.ParseFromArray(data + pos, static_cast<int>(length))) break;
    messages.push_back(std::move(message));
    pos += length;
  }
  if (messages.empty()) return 0;
  Engine& engine = fuzz::SharedEngine();
  const ModelConfig& model = engine.model().config();
  const RequestLimits limits = fuzz::Limits();
  absl::StatusOr<StreamSetup> setup = CheckStreamConfig(messages[0], model, limits);
  if (!setup.ok()) return 0;
  MemoryBudget budget(32 << 20);
  setup->options.budget = &budget;
  absl::Mutex mu;
  int done_calls = 0;
  absl::Notification done;
  {
    absl::StatusOr<std::unique_ptr<StreamSession>> session = StreamSession::Create(
        &engine, setup->options,
        [&](const StreamEvent& event) {
          absl::MutexLock lock(&mu);
          if (done_calls > 0) std::abort();  // an event after the end
          StreamResponse(event, model, setup->interim_results);
        },
        [&](absl::Status) {
          absl::MutexLock lock(&mu);
          if (++done_calls == 1) done.Notify();
        });
    if (!session.ok()) std::abort();  // the config was checked
    StreamAudioDecoder decoder(setup->format);
    bool failed = false;
    for (size_t i = 1; i < messages.size() && !failed; ++i) {
      const absl::Status status = decoder.Decode(
          messages[i], limits, [&](absl::Span<const float> samples) {
            return (*session)->Push(samples);
          });
      if (decoder.pending_bytes() >= decoder.pcm_frame_bytes()) std::abort();
      failed = !status.ok();
    }
    if (failed) {
      (*session)->Cancel();
    } else {
      (*session)->Finish();
    }
    if (!done.WaitForNotificationWithTimeout(absl::Seconds(60))) std::abort();
  }
  {
    absl::MutexLock lock(&mu);
    if (done_calls != 1) std::abort();
  }
  const absl::Time until = absl::Now() + absl::Seconds(60);
  while (budget.used() != 0) {
    if (absl::Now() > until) std::abort();
    absl::SleepFor(absl::Microseconds(100));
  }
  return 0;
}
