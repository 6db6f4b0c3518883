#include "core/model.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <new>
#include <optional>
#include <thread>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace emoserve {

struct Model::Module {
  torch::jit::Module module;
  // The module as loaded, for the methods speaker normalisation calls
  // (optimising keeps forward only); held only by models that use them.
  torch::jit::Module plain;
  torch::Device device{torch::kCPU};
  // Precision::kBf16: LibTorch's CPU autocast runs the matrix products and
  // convolutions in bfloat16 (oneDNN, AVX512_BF16) and keeps the ops that
  // need range or accuracy (softmax, normalisation, sums) in fp32.
  bool autocast_bf16 = false;
};

namespace {

absl::StatusOr<torch::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return torch::Device(torch::kCPU);
  if (name == "cuda" || absl::StartsWith(name, "cuda:")) {
    if (!torch::cuda::is_available()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "device '", name,
          "' requested but this LibTorch build has no CUDA support or no GPU "
          "is visible; use --device cpu"));
    }
    int index = 0;
    if (name != "cuda" && !absl::SimpleAtoi(name.substr(5), &index)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad device '", name, "'; expected cuda:N"));
    }
    if (index < 0 || index >= static_cast<int>(torch::cuda::device_count())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device '", name, "' does not exist; this machine has ",
          torch::cuda::device_count(), " CUDA device(s)"));
    }
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device '", name, "'; use cpu, cuda or cuda:N"));
}

// Turns LibTorch's CPU autocast to bfloat16 on for this thread while alive
// (autocast is thread-local), restoring what was there.
class CpuAutocastBf16 {
 public:
  CpuAutocastBf16()
      : was_enabled_(at::autocast::is_cpu_enabled()),
        was_dtype_(at::autocast::get_autocast_cpu_dtype()) {
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  }
  ~CpuAutocastBf16() {
    at::autocast::set_cpu_enabled(was_enabled_);
    at::autocast::set_autocast_cpu_dtype(was_dtype_);
  }
  CpuAutocastBf16(const CpuAutocastBf16&) = delete;
  CpuAutocastBf16& operator=(const CpuAutocastBf16&) = delete;

 private:
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

// quantized::linear_prepack of `weight` ([out, in]) as int8, one symmetric
// scale per output row, and `bias` (None or a tensor).
c10::IValue PackInt8LinearWeight(const torch::Tensor& weight, const c10::IValue& bias) {
  torch::Tensor scales =
      std::get<0>(weight.abs().max(1)).to(torch::kDouble).clamp_min(1e-8) / 127.0;
  torch::Tensor zero_points = torch::zeros({weight.size(0)}, torch::kLong);
  torch::Tensor quantized =
      at::quantize_per_channel(weight.contiguous(), scales, zero_points, 0, at::kQInt8);
  static const c10::OperatorHandle prepack =
      c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_prepack", "");
  torch::jit::Stack stack{quantized, bias};
  prepack.callBoxed(&stack);
  return stack.at(0);
}

// Replaces each aten::linear of a frozen graph whose weight is a constant by
// quantized::linear_dynamic on the int8 weight (activations are quantized
// per call from their own range). Returns how many it replaced.
int QuantizeLinearLayers(torch::jit::Graph& graph) {
  static const c10::Symbol kLinear = c10::Symbol::fromQualString("aten::linear");
  static const c10::Symbol kLinearDynamic =
      c10::Symbol::fromQualString("quantized::linear_dynamic");
  // fbgemm's kernels take each call's activation scale as an argument;
  // oneDNN's (LibTorch 1.13) build a new primitive for every new scale,
  // i.e. for nearly every batch (several ms each). The engine a weight is
  // packed with is the one that runs it.
  const std::vector<at::QEngine>& engines = at::globalContext().supportedQEngines();
  if (std::find(engines.begin(), engines.end(), at::QEngine::FBGEMM) != engines.end()) {
    at::globalContext().setQEngine(at::QEngine::FBGEMM);
  }
  // fbgemm can saturate a 16-bit sum unless activations keep 7 bits.
  const bool reduce_range = at::globalContext().qEngine() == at::QEngine::FBGEMM;
  std::vector<torch::jit::Node*> linears;
  for (torch::jit::Node* node : graph.nodes()) {
    if (node->kind() != kLinear) continue;
    c10::optional<c10::IValue> weight = torch::jit::toIValue(node->input(1));
    c10::optional<c10::IValue> bias = torch::jit::toIValue(node->input(2));
    if (weight && weight->isTensor() && weight->toTensor().dim() == 2 && bias) {
      linears.push_back(node);
    }
  }
  for (torch::jit::Node* node : linears) {
    torch::jit::WithInsertPoint insert_before(node);
    c10::IValue packed = PackInt8LinearWeight(torch::jit::toIValue(node->input(1))->toTensor(),
                                              *torch::jit::toIValue(node->input(2)));
    torch::jit::Value* quantized = graph.insert(
        kLinearDynamic,
        {node->input(0), graph.insertConstant(packed), graph.insertConstant(reduce_range)});
    node->output()->replaceAllUsesWith(quantized);
    node->destroy();
  }
  return static_cast<int>(linears.size());
}

}  // namespace

bool CpuSupports(Precision precision) {
  if (precision != Precision::kBf16) return true;
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

absl::Status CheckPrecisionRuns(Precision precision, const std::string& device) {
  if (precision == Precision::kFp32) return absl::OkStatus();
  const char* name = PrecisionName(precision);
  if (device != "cpu") {
    return absl::FailedPreconditionError(
        absl::StrCat("precision ", name, " runs on CPU only; use --precision fp32 on ", device));
  }
  if (!CpuSupports(precision)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "precision ", name,
        " needs a CPU with AVX512_BF16 and this one has none (LibTorch would emulate it, "
        "slower than fp32); use --precision fp32 or int8"));
  }
  return absl::OkStatus();
}

void SetUpModelRuntime(int intra_op_threads) {
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  if (intra_op_threads <= 0) {
    intra_op_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  at::set_num_threads(intra_op_threads);
}

Model::Model(ModelConfig config, std::string device,
             std::unique_ptr<Module> module)
    : config_(std::move(config)),
      device_(std::move(device)),
      module_(std::move(module)) {}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const ModelOptions& options) {
  absl::StatusOr<ModelConfig> config =
      LoadModelConfig((std::filesystem::path(dir) / "model.json").string());
  if (!config.ok()) return config.status();
  absl::StatusOr<torch::Device> device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  const std::string pt_path = (std::filesystem::path(dir) / "model.pt").string();
  if (!std::filesystem::exists(pt_path)) {
    return absl::NotFoundError(absl::StrCat("no model.pt in ", dir));
  }
  auto module = std::make_unique<Module>();
  module->device = *device;
  try {
    module->module = torch::jit::load(pt_path, *device);
    module->module.eval();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(pt_path, " is not a loadable TorchScript module: ", e.what()));
  }
  if (config->speaker_normalization != SpeakerNormalization::kNone) {
    module->plain = module->module;
  }
  auto model = std::unique_ptr<Model>(
      new Model(*std::move(config), options.device, std::move(module)));

  // Dry forward of the declared shape: catches a json that does not
  // describe this module before the first request does.
  std::vector<float> zeros(model->input_size(), 0.0f);
  absl::StatusOr<std::vector<float>> probabilities = model->Predict(zeros, 1);
  if (!probabilities.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": model.pt does not accept the input model.json declares (",
        kInputLayoutBatchChannelFeatureTime, " = [1, 1, ",
        model->config().num_features(), ", ", model->config().num_frames(),
        "]): ", probabilities.status().message()));
  }
  double sum = 0.0;
  for (float p : *probabilities) {
    if (!std::isfinite(p) || p < 0.0f) sum = -1.0;
    sum += p;
  }
  if (std::abs(sum - 1.0) > 1e-3) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": model.pt's forward must return probabilities (softmax over ",
        model->num_classes(), " classes); a dry run's outputs sum to ", sum));
  }
  if (absl::Status s = model->CheckSpeakerNormalization(zeros); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": ", s.message()));
  }
  // Only now: the optimised graph drops the plain one's shape checks (a
  // wrong input shape can crash it), and the input's shape is checked.
  Precision precision = options.precision.value_or(model->config().precision);
  if (!options.precision.has_value()) {
    if (absl::Status runs = CheckPrecisionRuns(precision, model->device_); !runs.ok()) {
      model->precision_fallback_ =
          absl::StrCat("model.json asks for ", PrecisionName(precision),
                       ", which does not run here (", runs.message(), "); running fp32");
      precision = Precision::kFp32;
    }
  }
  // int8 rewrites the frozen graph before the inference passes, which turn
  // its Linear layers into other ops.
  if (options.optimize && precision != Precision::kInt8) {
    model->optimized_ = model->Optimize(zeros, *probabilities);
  }
  if (absl::Status s = model->SetPrecision(precision, zeros); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(dir, ": ", s.message()));
  }
  return model;
}

absl::Status Model::SetPrecision(Precision precision, absl::Span<const float> input) {
  if (precision == Precision::kFp32) return absl::OkStatus();
  const char* name = PrecisionName(precision);
  if (absl::Status runs = CheckPrecisionRuns(precision, device_); !runs.ok()) return runs;
  if (precision == Precision::kBf16) {
    module_->autocast_bf16 = true;
  } else {
    try {
      torch::jit::Module frozen = torch::jit::freeze(module_->module);
      if (QuantizeLinearLayers(*frozen.get_method("forward").graph()) == 0) {
        return absl::FailedPreconditionError(
            "precision int8 quantizes Linear layers (aten::linear with constant weights) "
            "and this module has none; use fp32 or bf16");
      }
      module_->module = torch::jit::optimize_for_inference(frozen);
      optimized_ = true;
    } catch (const std::exception& e) {
      return absl::FailedPreconditionError(
          absl::StrCat("precision int8: the module cannot be quantized: ", e.what()));
    }
  }
  precision_ = precision;
  absl::StatusOr<std::vector<float>> got = Predict(input, 1);
  if (!got.ok()) return got.status();
  double sum = 0;
  for (float p : *got) sum += std::isfinite(p) && p >= 0.0f ? p : -2.0;
  if (std::abs(sum - 1.0) > 1e-2) {
    return absl::FailedPreconditionError(absl::StrCat(
        "in precision ", name, " the module's outputs are no longer probabilities (sum ",
        sum, "); use fp32"));
  }
  return absl::OkStatus();
}

bool Model::Optimize(absl::Span<const float> input, absl::Span<const float> expected) {
  // Freezing copies the module, so the plain one stays usable.
  torch::jit::Module plain = module_->module;
  try {
    torch::jit::Module frozen = torch::jit::freeze(plain);
    module_->module = torch::jit::optimize_for_inference(frozen);
  } catch (const std::exception&) {
    return false;  // the passes refuse this module: it runs plain
  }
  absl::StatusOr<std::vector<float>> got = Predict(input, 1);
  bool same = got.ok() && got->size() == expected.size();
  for (size_t i = 0; same && i < expected.size(); ++i) {
    same = std::abs((*got)[i] - expected[i]) <= 1e-4f;
  }
  if (!same) module_->module = std::move(plain);
  return same;
}

absl::Status Model::WarmUp(int max_batch_size) const {
  const int largest = std::min(max_batch_size, kMaxWarmUpBatchSizes);
  const std::vector<float> zeros(static_cast<size_t>(std::max(largest, 1)) * input_size(), 0.0f);
  for (int batch = 1; batch <= largest; ++batch) {
    absl::StatusOr<std::vector<float>> probabilities =
        Predict(absl::MakeConstSpan(zeros).subspan(0, batch * input_size()), batch);
    if (!probabilities.ok()) return probabilities.status();
  }
  return absl::OkStatus();
}

template <typename Run>
absl::StatusOr<std::vector<float>> Model::RunModule(int rows, int64_t width, const char* what,
                                                    const Run& run) const {
  try {
    c10::InferenceMode inference_mode;
    torch::Tensor output = run();
    output = output.to(torch::kCPU, torch::kFloat32).contiguous();
    if (output.dim() != 2 || output.size(0) != rows || output.size(1) != width) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": the module returned shape ", c10::str(output.sizes()), ", expected [", rows,
          ", ", width, "] (model.json declares ", num_classes(), " labels)"));
    }
    const float* data = output.data_ptr<float>();
    return std::vector<float>(data, data + rows * width);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        "model forward failed: out of memory; retry later or send less audio");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("model forward failed: ", e.what()));
  }
}

template <typename Run>
absl::StatusOr<std::vector<float>> Model::RunBatch(absl::Span<const float> features,
                                                   int batch_size, int64_t width,
                                                   const char* what, const Run& run) const {
  const int64_t f = config_.num_features();
  const int64_t t = config_.num_frames();
  if (batch_size <= 0 ||
      features.size() != static_cast<size_t>(batch_size) * f * t) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": expected ", batch_size, " x ", f, " x ", t, " floats, got ",
        features.size()));
  }
  return RunModule(batch_size, width, what, [&] {
    // from_blob does not copy; the module never writes to its input.
    torch::Tensor input = torch::from_blob(const_cast<float*>(features.data()),
                                           {batch_size, 1, f, t}, torch::kFloat32);
    return run(input.to(module_->device));
  });
}

absl::StatusOr<std::vector<float>> Model::Predict(
    absl::Span<const float> features, int batch_size) const {
  return RunBatch(features, batch_size, num_classes(), "Predict", [&](const torch::Tensor& x) {
    std::optional<CpuAutocastBf16> autocast;
    if (module_->autocast_bf16) autocast.emplace();
    return module_->module.forward({x}).toTensor();
  });
}

absl::Status Model::CheckSpeakerNormalization(absl::Span<const float> input) {
  if (config_.speaker_normalization == SpeakerNormalization::kNone) return absl::OkStatus();
  for (const char* method : {"summary", "from_summary", "adapted"}) {
    if (!module_->plain.find_method(method).has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.json declares speaker_normalization ",
          SpeakerNormalizationName(config_.speaker_normalization), " but model.pt has no ",
          method, "() method"));
    }
  }
  if (!module_->plain.hasattr("summary_key") ||
      !module_->plain.attr("summary_key").isString()) {
    return absl::InvalidArgumentError(
        "model.pt has no summary_key string naming what its summary() computes");
  }
  summary_key_ = module_->plain.attr("summary_key").toStringRef();
  try {
    c10::InferenceMode inference_mode;
    torch::Tensor x = torch::from_blob(const_cast<float*>(input.data()),
                                       {1, 1, config_.num_features(), config_.num_frames()})
                          .to(module_->device);
    torch::Tensor summary = module_->plain.run_method("summary", x).toTensor();
    if (summary.dim() != 2 || summary.size(0) != 1 || summary.size(1) < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model.pt's summary() returns shape ", c10::str(summary.sizes()), ", not [1, W]"));
    }
    summary_size_ = static_cast<int>(summary.size(1));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("model.pt's summary() fails: ", e.what()));
  }
  absl::StatusOr<std::vector<float>> summary = Summarize(input, 1);
  if (!summary.ok()) return summary.status();
  return PredictAdapted(input, 1, *summary).status();
}

absl::StatusOr<std::vector<float>> Model::Summarize(absl::Span<const float> features,
                                                    int batch_size) const {
  if (summary_size_ == 0) {
    return absl::FailedPreconditionError("this model has no speaker normalization");
  }
  return RunBatch(features, batch_size, summary_size_, "Summarize", [&](const torch::Tensor& x) {
    return module_->plain.run_method("summary", x).toTensor();
  });
}

absl::StatusOr<std::vector<float>> Model::PredictFromSummaries(
    absl::Span<const float> summaries, int count, absl::Span<const float> speaker_means) const {
  if (summary_size_ == 0) {
    return absl::FailedPreconditionError("this model has no speaker normalization");
  }
  const size_t size = static_cast<size_t>(count) * summary_size_;
  if (count <= 0 || summaries.size() != size ||
      (!speaker_means.empty() && speaker_means.size() != size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PredictFromSummaries: expected ", count, " x ", summary_size_,
        " summaries and speaker statistics, got ", summaries.size(), " and ",
        speaker_means.size()));
  }
  return RunModule(count, num_classes(), "PredictFromSummaries", [&] {
    const auto tensor = [&](absl::Span<const float> values) {
      return torch::from_blob(const_cast<float*>(values.data()), {count, summary_size_})
          .to(module_->device);
    };
    if (speaker_means.empty()) {
      return module_->plain.run_method("from_summary", tensor(summaries)).toTensor();
    }
    return module_->plain.run_method("adapted", tensor(summaries), tensor(speaker_means))
        .toTensor();
  });
}

absl::StatusOr<std::vector<float>> Model::PredictAdapted(
    absl::Span<const float> features, int batch_size,
    absl::Span<const float> speaker_means) const {
  absl::StatusOr<std::vector<float>> summaries = Summarize(features, batch_size);
  if (!summaries.ok()) return summaries.status();
  return PredictFromSummaries(*summaries, batch_size, speaker_means);
}

}  // namespace emoserve
