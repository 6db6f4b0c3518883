// The trainable parallel CNN + Transformer, built as a TorchScript module from
// C++ so that the trainer's module is the very module that model.pt stores:
// no Python needed to export it, and Python can torch.jit.load it.
#ifndef EMOSERVE_CORE_MODEL_ARCHITECTURE_H_
#define EMOSERVE_CORE_MODEL_ARCHITECTURE_H_

#include <cstdint>
#include <string>
#include <vector>

#include <torch/script.h>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace emoserve {

struct ArchitectureOptions {
  int num_features = 40;   // F: MFCC or mel rows
  int num_frames = 301;    // T: frames in one window
  int num_classes = 8;
  // CNN branch: 3x3 convolutions with these output channels, each followed
  // by batch norm, ReLU, max-pooling (square, the given size) and dropout.
  int conv_channels[3] = {16, 32, 64};
  int conv_pool[3] = {2, 4, 4};
  double conv_dropout = 0.3;
  // How the last block's [C, F', T'] output reaches the final layer: false
  // flattens it (the original; each cell has its own weights, so the
  // embedding depends on where in the window things happen), true takes the
  // mean and the max of each channel over its cells ([2C], shift-invariant).
  bool conv_global_pooling = false;
  // Transformer branch: max-pool over time, then an encoder whose d_model
  // is num_features, then the mean over time.
  int time_pool = 4;
  int transformer_layers = 4;
  int transformer_heads = 4;
  int transformer_feedforward = 512;
  double transformer_dropout = 0.4;
  // Subtract each window's mean over time from every feature row (cepstral
  // mean normalisation) after the global normalisation: removes much of the
  // speaker's and the channel's fixed colouring.
  bool window_mean_normalization = false;
};

absl::StatusOr<ArchitectureOptions> ArchitectureOptionsFromJson(
    const nlohmann::json& json);
nlohmann::json ArchitectureOptionsToJson(const ArchitectureOptions& options);

// Builds a freshly initialised module (PyTorch's default initialisations,
// from torch's global generator: seed it first for reproducibility).
// Methods:
//   forward(x: [B,1,F,T]) -> probabilities [B, num_classes]
//   logits(x: [B,1,F,T])  -> logits [B, num_classes]
//   embedding(x)          -> the concatenated branches that feed the
//                            final linear layer (fc_weight, fc_bias)
// Buffers feature_mean / feature_std ([F]) normalise the input inside the
// module; the trainer fills them from the training data.
absl::StatusOr<torch::jit::Module> BuildParallelCnnTransformer(
    const ArchitectureOptions& options);

// An ensemble of modules that follow the model contract (same input, same
// classes): forward(x) -> the mean of the members' probabilities;
// logits(x) -> its log. At least two members.
absl::StatusOr<torch::jit::Module> BuildEnsemble(
    std::vector<torch::jit::Module> members);

}  // namespace emoserve

#endif  // EMOSERVE_CORE_MODEL_ARCHITECTURE_H_
