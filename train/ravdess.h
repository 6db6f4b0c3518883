// The RAVDESS speech corpus as laid out on disk: Actor_NN/MM-VV-EE-II-SS-RR-AA.ext
// (16 kHz FLAC as in ../shared, or the original 48 kHz WAV release).
#ifndef EMOSERVE_TRAIN_RAVDESS_H_
#define EMOSERVE_TRAIN_RAVDESS_H_

#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace emoserve {

// Labels in RAVDESS's emotion-code order (code 01 = index 0).
const std::vector<std::string>& RavdessLabels();

struct RavdessClip {
  std::string path;
  int actor = 0;    // 1..24
  int emotion = 0;  // index into RavdessLabels()
};

// Lists the speech clips (modality 03, vocal channel 01) under `dir` whose
// actor is in `actors` (all when empty), sorted by path. Errors when the
// folder is missing or holds no clip.
absl::StatusOr<std::vector<RavdessClip>> ListRavdess(const std::string& dir,
                                                     const std::set<int>& actors = {});

// The first `count` clips of ListRavdess(dir), decoded; each must be at
// `sample_rate` Hz. Real speech for tests and benchmarks.
absl::StatusOr<std::vector<std::vector<float>>> LoadRavdessClips(const std::string& dir,
                                                                 int count,
                                                                 int sample_rate = 16000);

// Loss weights that make every class count alike: clips / (classes * clips
// of the class), 0 for a class without clips.
std::vector<float> BalancedClassWeights(const std::vector<RavdessClip>& clips,
                                        size_t num_classes);

// Parses actor lists like "21-24" or "1,3,5-7".
absl::StatusOr<std::set<int>> ParseActorSet(absl::string_view text);

}  // namespace emoserve

#endif  // EMOSERVE_TRAIN_RAVDESS_H_
