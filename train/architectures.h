// The trainable architectures (the parallel CNN + Transformer, the
// statistics branch alone) and the modules that combine trained models,
// built as TorchScript modules from C++ so that the trainer's module is the
// very module that model.pt stores: no Python needed to export it, and
// Python can torch.jit.load it.
#ifndef EMOSERVE_TRAIN_ARCHITECTURES_H_
#define EMOSERVE_TRAIN_ARCHITECTURES_H_

#include <cstdint>
#include <string>
#include <vector>

#include <torch/script.h>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace emoserve {

struct ArchitectureOptions {
  int num_features = 40;   // F: MFCC or mel rows of the input
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
  // When positive, the CNN and Transformer branches see the first this many
  // DCT-II (orthonormal) coefficients of each input frame instead of the
  // frame itself: with log-mel input these are librosa's MFCCs, exactly, so
  // the statistics branch can see the mel bands while the other two see
  // cepstra. 0: the branches see the input rows.
  int cepstral_coefficients = 0;
  // Transformer branch: max-pool over time, then an encoder whose d_model
  // is the branch's rows (num_features, or cepstral_coefficients), then the
  // mean over time.
  int time_pool = 4;
  int transformer_layers = 4;
  int transformer_heads = 4;
  int transformer_feedforward = 512;
  double transformer_dropout = 0.4;
  // Subtract each window's mean over time from every feature row (cepstral
  // mean normalisation) after the global normalisation: removes much of the
  // speaker's and the channel's fixed colouring.
  bool window_mean_normalization = false;
  // Statistics branch (0 = off): per input row, the mean and standard
  // deviation over the window's frames that lie within statistics_range_db
  // of its loudest frame, and the RMS and mean magnitude of the row's delta
  // over those frames, plus the share of such frames; batch norm, then a
  // hidden layer of this width (ReLU, dropout). Utterance-level statistics
  // are what generalises best to new speakers in small emotion corpora (an
  // MLP on them alone is on par with the CNN on unseen RAVDESS actors, and
  // its errors differ); they need the input to be in dB (log-mel, or MFCC
  // row 0's scale).
  int statistics_hidden = 0;
  double statistics_range_db = 80.0;
  double statistics_dropout = 0.5;
  // When positive, the statistics branch also takes the deviation and delta
  // RMS of each frame's first this many DCT-II coefficients (log-mel input:
  // MFCCs): deviations of the rows alone miss how the bands move together.
  int statistics_cepstral = 0;
  // Pitch statistics in the statistics branch (0 = off). The input's first
  // pitch_rows rows must be log-mel bands pitch_row_hz apart (the linear,
  // equally spaced part of the Slaney scale below 1 kHz; see
  // PitchRowsOf). A voiced frame's harmonics repeat across those rows every
  // F0 / pitch_row_hz rows, so the magnitude of their DFT over the rows
  // peaks at F0's period. The branch adds, over frames within 30 dB of the
  // loudest, the mean and deviation of that normalised periodicity spectrum
  // (F0 from 75 to 450 Hz) and the mean, deviation and delta RMS of the log
  // F0 at its peak. Pitch is what the band statistics miss most: it adds
  // about 0.05 of cross-validated UAR on RAVDESS (docs/training.md). Rows must be at
  // most 37.5 Hz apart (two rows per harmonic at 75 Hz): e.g. 128 mel bands
  // of a 1024-sample window at 16 kHz (23.4 Hz).
  int pitch_rows = 0;
  double pitch_row_hz = 0.0;
  // false leaves out the CNN and Transformer branches: the statistics branch
  // alone (statistics_hidden must be positive), a model that costs almost
  // nothing beside the others, for ensembles with them.
  bool parallel_branches = true;
};

// The pitch_rows and pitch_row_hz of a log-mel input: its rows centred
// below 1 kHz and their spacing. kInvalidArgument when fewer than 8 rows lie
// there or they are too far apart for pitch (see pitch_rows).
struct PitchRows {
  int rows = 0;
  double row_hz = 0.0;
};
absl::StatusOr<PitchRows> PitchRowsOf(const std::vector<double>& mel_frequencies);

absl::StatusOr<ArchitectureOptions> ArchitectureOptionsFromJson(
    const nlohmann::json& json);
nlohmann::json ArchitectureOptionsToJson(const ArchitectureOptions& options);

// Builds a freshly initialised module of the architecture `options`
// describe: the parallel CNN + Transformer (with the statistics branch when
// statistics_hidden is positive), or the statistics branch alone
// (parallel_branches false). PyTorch's default initialisations, from
// torch's global generator: seed it first for reproducibility. Methods:
//   forward(x: [B,1,F,T]) -> probabilities [B, num_classes]
//   branch_input(x)       -> what the CNN and Transformer branches see
//                            before normalisation ([B,1,D,T]: the cepstra
//                            with cepstral_coefficients, else x)
//   logits(x: [B,1,F,T])  -> logits [B, num_classes]
//   embedding(x)          -> the concatenated branches that feed the
//                            final linear layer (fc_weight, fc_bias)
// and, statistics-only (parallel_branches false):
//   summary(x)            -> the statistics before any weight [B, W]
//   from_summary(s)       -> probabilities: forward(x) = from_summary(summary(x))
//   adapted(s, speaker_mean [B, W]) -> probabilities of s speaker-normalised:
//                            from_summary(s - speaker_mean + speaker_reference)
//   summary_key           -> a string attribute naming what summary computes
//   speaker_reference     -> buffer [W]: the training speakers' mean summary
//                            (zeros unless trained speaker-normalised)
// Buffers feature_mean / feature_std ([D]) normalise branch_input inside
// the module; the trainer fills them from the training data.
absl::StatusOr<torch::jit::Module> BuildArchitecture(const ArchitectureOptions& options);

// A model trained on MFCCs, served on the log-mel spectrogram they were
// computed from: forward(x) = member.forward(DCT(x)) (and logits alike),
// DCT being the first `coefficients` orthonormal DCT-II rows over `rows`
// bands, which is librosa's MFCC of that log-mel. Lets an MFCC model join
// an ensemble whose input is log-mel.
absl::StatusOr<torch::jit::Module> BuildCepstralAdapter(torch::jit::Module member,
                                                        int coefficients, int rows);

// An ensemble of modules that follow the model contract (same input, same
// classes): forward(x) -> the mean of the members' probabilities;
// logits(x) -> its log. At least two members. Statistics-only members
// (parallel_branches false) with the same statistics options compute their
// weight-free summary of x once between them: a bag of such models costs
// little more than one. When every member is such a model, the ensemble
// also has summary(x), from_summary(s) and adapted(s, speaker_mean) (the
// members' means).
absl::StatusOr<torch::jit::Module> BuildEnsemble(
    std::vector<torch::jit::Module> members);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_ARCHITECTURES_H_
