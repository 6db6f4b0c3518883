#include "core/model.h"

#include <malloc.h>

#include <cmath>
#include <filesystem>
#include <new>
#include <thread>
#include <utility>

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace emoserve {

struct Model::Module {
  torch::jit::Module module;
  torch::Device device{torch::kCPU};
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

}  // namespace

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
  // Only now: the optimised graph drops the plain one's shape checks (a
  // wrong input shape can crash it), and the input's shape is checked.
  if (options.optimize) model->optimized_ = model->Optimize(zeros, *probabilities);
  return model;
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

absl::StatusOr<std::vector<float>> Model::Predict(
    absl::Span<const float> features, int batch_size) const {
  const int64_t f = config_.num_features();
  const int64_t t = config_.num_frames();
  if (batch_size <= 0 ||
      features.size() != static_cast<size_t>(batch_size) * f * t) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Predict: expected ", batch_size, " x ", f, " x ", t, " floats, got ",
        features.size()));
  }
  try {
    c10::InferenceMode inference_mode;
    // from_blob does not copy; the module never writes to its input.
    torch::Tensor input = torch::from_blob(const_cast<float*>(features.data()),
                                           {batch_size, 1, f, t},
                                           torch::kFloat32);
    if (module_->device != torch::Device(torch::kCPU)) {
      input = input.to(module_->device);
    }
    torch::Tensor output = module_->module.forward({input}).toTensor();
    output = output.to(torch::kCPU, torch::kFloat32).contiguous();
    const int64_t classes = num_classes();
    if (output.dim() != 2 || output.size(0) != batch_size ||
        output.size(1) != classes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the module returned shape ", c10::str(output.sizes()),
          " but model.json declares ", classes, " labels: expected [",
          batch_size, ", ", classes, "]"));
    }
    const float* data = output.data_ptr<float>();
    return std::vector<float>(data, data + batch_size * classes);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        "model forward failed: out of memory; retry later or send less audio");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("model forward failed: ", e.what()));
  }
}

}  // namespace emoserve
