#include "core/resampler.h"

#include <soxr.h>

#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/audio.h"

namespace emoserve {
namespace {

soxr_t AsSoxr(void* soxr) { return static_cast<soxr_t>(soxr); }

absl::Status SoxrError(soxr_error_t error, const char* what) {
  return absl::InternalError(absl::StrCat("libsoxr ", what, ": ", error));
}

// Output capacity for `input_frames` at `ratio`, plus slack for the samples
// soxr holds back between calls.
size_t OutputCapacity(size_t input_frames, double ratio) {
  return static_cast<size_t>(std::ceil(input_frames * ratio)) + 64;
}

}  // namespace

absl::StatusOr<std::vector<float>> Resample(absl::Span<const float> input,
                                            int from_rate, int to_rate) {
  if (absl::Status s = ValidateSampleRate(from_rate); !s.ok()) return s;
  if (absl::Status s = ValidateSampleRate(to_rate); !s.ok()) return s;
  if (from_rate == to_rate)
    return std::vector<float>(input.begin(), input.end());
  // One code path for whole signals and streams, so they cannot drift apart.
  absl::StatusOr<std::unique_ptr<StreamResampler>> resampler =
      StreamResampler::Create(from_rate, to_rate);
  if (!resampler.ok()) return resampler.status();
  std::vector<float> output;
  output.reserve(
      OutputCapacity(input.size(), static_cast<double>(to_rate) / from_rate));
  if (absl::Status s = (*resampler)->Process(input, &output); !s.ok()) return s;
  if (absl::Status s = (*resampler)->Flush(&output); !s.ok()) return s;
  return output;
}

absl::StatusOr<std::unique_ptr<StreamResampler>> StreamResampler::Create(
    int from_rate, int to_rate) {
  if (absl::Status s = ValidateSampleRate(from_rate); !s.ok()) return s;
  if (absl::Status s = ValidateSampleRate(to_rate); !s.ok()) return s;
  const soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
  const soxr_quality_spec_t quality = soxr_quality_spec(SOXR_HQ, 0);
  // One thread per stream: the server runs many streams concurrently, and
  // soxr's OpenMP threads would only contend with each other.
  const soxr_runtime_spec_t runtime = soxr_runtime_spec(1);
  soxr_error_t error = nullptr;
  soxr_t soxr = soxr_create(from_rate, to_rate, /*num_channels=*/1, &error, &io,
                            &quality, &runtime);
  if (error != nullptr) {
    soxr_delete(soxr);
    return SoxrError(error, "create");
  }
  return std::unique_ptr<StreamResampler>(
      new StreamResampler(soxr, from_rate, to_rate));
}

StreamResampler::StreamResampler(void* soxr, int from_rate, int to_rate)
    : soxr_(soxr), from_rate_(from_rate), to_rate_(to_rate) {}

StreamResampler::~StreamResampler() {
  if (soxr_ != nullptr) soxr_delete(AsSoxr(soxr_));
}

absl::Status StreamResampler::Process(absl::Span<const float> input,
                                      std::vector<float>* output) {
  // Flush deletes the soxr object, so a null one means the stream ended.
  if (soxr_ == nullptr) {
    return absl::FailedPreconditionError(
        "StreamResampler::Process called after Flush");
  }
  // soxr treats a null input pointer as end of stream, which an empty span
  // may carry; an empty chunk simply produces nothing.
  if (input.empty()) return absl::OkStatus();
  const double ratio = static_cast<double>(to_rate_) / from_rate_;
  size_t consumed = 0;
  while (consumed < input.size()) {
    const size_t start = output->size();
    const size_t capacity = OutputCapacity(input.size() - consumed, ratio);
    output->resize(start + capacity);
    size_t in_done = 0;
    size_t out_done = 0;
    soxr_error_t error = soxr_process(
        AsSoxr(soxr_), input.data() + consumed, input.size() - consumed,
        &in_done, output->data() + start, capacity, &out_done);
    output->resize(start + out_done);
    if (error != nullptr) return SoxrError(error, "process");
    if (in_done == 0 && out_done == 0) {
      // Cannot happen with the capacity given; avoids spinning forever.
      return absl::InternalError("libsoxr process made no progress");
    }
    consumed += in_done;
  }
  return absl::OkStatus();
}

absl::Status StreamResampler::Flush(std::vector<float>* output) {
  if (soxr_ == nullptr) {
    return absl::FailedPreconditionError("StreamResampler::Flush called twice");
  }
  // Drain the filter's delay line; soxr pads the end with silence.
  constexpr size_t kBlock = 1024;
  size_t out_done = 0;
  do {
    const size_t start = output->size();
    output->resize(start + kBlock);
    soxr_error_t error =
        soxr_process(AsSoxr(soxr_), nullptr, 0, nullptr, output->data() + start,
                     kBlock, &out_done);
    output->resize(start + out_done);
    if (error != nullptr) return SoxrError(error, "flush");
  } while (out_done > 0);
  soxr_delete(AsSoxr(soxr_));
  soxr_ = nullptr;
  return absl::OkStatus();
}

}  // namespace emoserve
