// `emoserve-train train`: trains the parallel CNN + Transformer on RAVDESS
// and writes a model directory (model.pt, model.json) with its reports.
#ifndef EMOSERVE_TRAIN_TRAINER_H_
#define EMOSERVE_TRAIN_TRAINER_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/feature_params.h"
#include "train/architectures.h"

namespace emoserve {

struct TrainOptions {
  std::string data_dir;
  std::string out_dir;
  std::string model_name = "emoserve-ravdess";
  std::string model_version = "1";
  std::string command_line;  // recorded in model.json's provenance

  // Speaker-independent split. Test actors are evaluated once, at the end,
  // and never used for training or model selection.
  std::set<int> train_actors;  // empty: every actor not in val or test
  std::set<int> val_actors = {19, 20};
  std::set<int> test_actors = {21, 22, 23, 24};

  int sample_rate = 16000;
  double window_seconds = 3.0;
  FeatureParams features;  // defaults set in DefaultTrainFeatures()
  ArchitectureOptions architecture;  // num_features/frames/classes derived
  // Adds pitch statistics to the statistics branch (log-mel input; the
  // pitch rows are derived from the mel bands: ArchitectureOptions).
  bool pitch = false;

  int epochs = 100;
  int batch_size = 32;
  double learning_rate = 1e-3;  // peak of the one-cycle schedule
  double weight_decay = 1e-2;
  double label_smoothing = 0.1;
  // Weighs each class's loss by (clips / (classes * clips of the class)):
  // RAVDESS has half as many neutral clips as any other emotion, and
  // without weights the model learns never to predict it.
  bool balance_classes = true;
  uint64_t seed = 1;
  int intra_op_threads = 0;  // LibTorch intra-op threads; 0 = all cores

  // Augmentation, drawn afresh for every example of every epoch.
  double noise_probability = 0.8;  // additive white noise...
  double noise_snr_min_db = 15.0;  // ...at an SNR drawn from this range
  double noise_snr_max_db = 30.0;
  double speed_probability = 0.5;  // speed perturbation (resampling)
  double speed_min = 0.9;
  double speed_max = 1.1;
  // A gain drawn uniformly from +-gain_db dB (0 = none): the recording's
  // level depends on the microphone, not on the voice.
  double gain_db = 0;
  int time_masks = 2;  // SpecAugment-style masks
  int time_mask_max_frames = 20;
  int feature_masks = 2;
  int feature_mask_max_rows = 5;
  double mixup_alpha = 0.2;  // 0 disables mixup
  // Speaker-adversarial training: a speaker classifier on the model's
  // embedding behind a gradient reversal of this strength, so that the
  // embedding learns to carry less of who speaks. 0 disables it.
  double speaker_adversarial_weight = 0.0;
  // Speaker normalisation (statistics-only models): each example's summary
  // is moved by how its actor's mean summary, over a random few of the
  // actor's other clips (no labels), differs from all training actors'. The
  // model learns what a stream sees once it has heard its speaker
  // (model.json: speaker_normalization summary_mean).
  bool speaker_normalization = false;
  // Validation, selection and model.pt use an exponential moving average of
  // the weights with this decay per step (0 = the raw weights): it smooths
  // the step-to-step noise that a small validation set otherwise selects on.
  double ema_decay = 0.0;
  // Which epoch model.pt keeps: true, the best validation UAR (the
  // validation actors then choose the model, so its validation score is
  // optimistic: cross-validation folds kept this way overstate the recipe by
  // about 0.04 here); false, the last epoch (validation only reports, and a
  // fold's validation score is an unbiased estimate).
  bool keep_best_epoch = true;
};

// 40 MFCCs of a 64-band Slaney mel spectrogram: 25 ms Hamming windows every
// 10 ms at 16 kHz.
FeatureParams DefaultTrainFeatures();

absl::Status Train(const TrainOptions& options);

struct EnsembleOptions {
  std::vector<std::string> member_dirs;  // model directories written by Train
  std::string data_dir;                  // RAVDESS, for the final evaluation
  std::string out_dir;
  std::string model_name;  // empty: the first member's
  std::string model_version;
  std::string command_line;  // recorded in model.json's provenance
};

// `emoserve-train ensemble`: one model directory whose module averages the
// probabilities of models that Train wrote with the same features, labels
// and test actors (none of which any member trained or validated on).
// Members that differ in their validation actors (cross-validation folds)
// are validated out of fold. Its model.json records every member's command
// and metrics; its reports are the ensemble's confusion matrices and the
// members' training curves.
absl::Status Ensemble(const EnsembleOptions& options);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_TRAINER_H_
