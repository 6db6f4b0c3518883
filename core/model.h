// A loaded model: model.pt (TorchScript) checked against model.json.
// LibTorch stays behind this interface.
#ifndef EMOSERVE_CORE_MODEL_H_
#define EMOSERVE_CORE_MODEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/model_config.h"

namespace emoserve {

struct ModelOptions {
  // "cpu", "cuda" or "cuda:N".
  std::string device = "cpu";
  // Runs the module as optimised for inference (frozen: weights become
  // constants the graph passes fold, e.g. batch norm into the convolution
  // before it; then LibTorch's inference rewrites, oneDNN's on CPU). Its
  // outputs equal the plain module's to float rounding. A module the passes
  // cannot handle runs plain (Model::optimized() says which).
  bool optimize = true;
  // The arithmetic to run in; unset: the one model.json names (fp32 when
  // it names none). Reduced precisions run on CPU only; bf16 needs a CPU
  // with AVX512_BF16 (CpuSupports). Asked for here, a precision the device
  // cannot run fails the load; named by model.json, it is a preference:
  // the model runs in fp32 instead and Model::precision_fallback() says why.
  std::optional<Precision> precision;
};

// Whether this machine's CPU runs `precision` natively (bf16: AVX512_BF16;
// without it LibTorch would emulate bfloat16, slower than fp32).
bool CpuSupports(Precision precision);

// OK when a model on `device` ("cpu", "cuda", "cuda:N") can run in
// `precision`; otherwise kFailedPrecondition saying why.
absl::Status CheckPrecisionRuns(Precision precision, const std::string& device);

// LibTorch intra-op threads a server runs the model on. One leaves the
// other cores to the feature workers; a model that splits each op over
// cores pays OpenMP's hand-offs between its many small ops (engine_bench
// measures both).
inline constexpr int kDefaultIntraOpThreads = 1;

// Sets the process up for running models: glibc malloc keeps the memory
// it frees (handing LibTorch's large buffers back to the kernel after every
// forward makes inference several times slower), and LibTorch runs each op
// on `intra_op_threads` threads (<= 0: one per core). Both settings are
// process-wide, so this is the one place that makes them: every binary
// that runs a model calls it before loading one; a later call changes the
// thread count.
void SetUpModelRuntime(int intra_op_threads);

class Model;

// OK when `model` adapts to speakers (a speaker-normalised model, with
// summary_size() > 0); else kFailedPrecondition saying so, after `what`
// (the field or option that asked).
absl::Status CheckAdaptsToSpeakers(const Model& model, absl::string_view what);

class Model {
 public:
  // Loads <dir>/model.json and <dir>/model.pt, moves the module to the
  // device and runs a dry forward of the declared [1, 1, F, T] shape; any
  // disagreement (shape, label count, output not probabilities) is a clear
  // kInvalidArgument / kFailedPrecondition error.
  static absl::StatusOr<std::unique_ptr<Model>> Load(
      const std::string& dir, const ModelOptions& options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  const std::string& device() const { return device_; }
  // Whether the module runs as optimised for inference (ModelOptions).
  bool optimized() const { return optimized_; }
  Precision precision() const { return precision_; }
  // Why model.json's precision gave way to fp32 on this machine (empty
  // when it did not).
  const std::string& precision_fallback() const { return precision_fallback_; }
  int num_classes() const { return static_cast<int>(config_.labels.size()); }
  // Floats in one input ([F][T]) and one output row.
  int input_size() const { return config_.num_features() * config_.num_frames(); }

  // `features` holds `batch_size` inputs of input_size() floats each
  // ([B][F][T], contiguous). Returns batch_size * num_classes()
  // probabilities, row-major. Thread-safe.
  absl::StatusOr<std::vector<float>> Predict(absl::Span<const float> features,
                                             int batch_size) const;

  // Speaker normalisation (config().speaker_normalization is
  // kSummaryMean). The width of a window's summary: 0 for a model without.
  int summary_size() const { return summary_size_; }
  // What names the summary's function (the module's summary_key): speaker
  // statistics carry over between models with the same key only.
  const std::string& summary_key() const { return summary_key_; }
  // The summaries of `batch_size` inputs (laid out as Predict's):
  // batch_size * summary_size() floats, what a speaker's statistics average.
  absl::StatusOr<std::vector<float>> Summarize(absl::Span<const float> features,
                                               int batch_size) const;
  // The probabilities of `count` summaries (Summarize's), each normalised
  // by its speaker's mean summary (speaker_means: count * summary_size()
  // floats), or unadapted when speaker_means is empty (Predict's answer, to
  // float rounding). Runs the module as loaded, in fp32.
  absl::StatusOr<std::vector<float>> PredictFromSummaries(
      absl::Span<const float> summaries, int count, absl::Span<const float> speaker_means) const;
  // PredictFromSummaries of the inputs' summaries.
  absl::StatusOr<std::vector<float>> PredictAdapted(absl::Span<const float> features,
                                                    int batch_size,
                                                    absl::Span<const float> speaker_means) const;

  // Runs each batch size from 1 to max_batch_size (at most the first
  // kMaxWarmUpBatchSizes) once: LibTorch specialises and optimises the
  // graph for each input shape on its first call, which takes several
  // times as long as the next ones.
  static constexpr int kMaxWarmUpBatchSizes = 64;
  absl::Status WarmUp(int max_batch_size) const;

 private:
  struct Module;
  Model(ModelConfig config, std::string device, std::unique_ptr<Module> module);
  // Swaps in the module optimised for inference if it gives `expected` for
  // `input` (one input, the plain module's probabilities); false otherwise,
  // keeping the plain module.
  bool Optimize(absl::Span<const float> input, absl::Span<const float> expected);
  // Makes the module run in `precision`; checks that it still returns
  // probabilities for `input`.
  absl::Status SetPrecision(Precision precision, absl::Span<const float> input);
  // Checks that a speaker-normalised module has summary() and adapted();
  // sets summary_size_.
  absl::Status CheckSpeakerNormalization(absl::Span<const float> input);
  // The error mapping and output check every run shares: `run` returns a
  // [rows, width] output.
  template <typename Run>
  absl::StatusOr<std::vector<float>> RunModule(int rows, int64_t width, const char* what,
                                               const Run& run) const;
  // RunModule with the input check: `run` maps the [B, 1, F, T] input to a
  // [B, width] output.
  template <typename Run>
  absl::StatusOr<std::vector<float>> RunBatch(absl::Span<const float> features, int batch_size,
                                              int64_t width, const char* what,
                                              const Run& run) const;
  ModelConfig config_;
  std::string device_;
  std::unique_ptr<Module> module_;
  bool optimized_ = false;
  Precision precision_ = Precision::kFp32;
  std::string precision_fallback_;
  int summary_size_ = 0;
  std::string summary_key_;
};

inline absl::Status CheckAdaptsToSpeakers(const Model& model, absl::string_view what) {
  if (model.summary_size() > 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      what, ": model ", model.config().name, " version ", model.config().version,
      " does not adapt to speakers (its model.json's speaker_normalization is none; "
      "ModelInfo.speaker_adaptation is false)"));
}

}  // namespace emoserve

#endif  // EMOSERVE_CORE_MODEL_H_
