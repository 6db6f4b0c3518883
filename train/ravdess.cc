#include "train/ravdess.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/audio.h"

namespace emoserve {

const std::vector<std::string>& RavdessLabels() {
  static const auto* labels = new std::vector<std::string>{
      "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"};
  return *labels;
}

namespace {

// Parses "03-01-EE-II-SS-RR-AA"; false for anything else (song clips,
// video clips, stray files).
bool ParseStem(const std::string& stem, int* emotion, int* actor) {
  std::vector<std::string> fields = absl::StrSplit(stem, '-');
  if (fields.size() != 7) return false;
  int values[7];
  for (int i = 0; i < 7; ++i) {
    if (fields[i].size() != 2 || !absl::SimpleAtoi(fields[i], &values[i])) return false;
  }
  if (values[0] != 3 || values[1] != 1) return false;  // audio-only speech
  if (values[2] < 1 || values[2] > 8 || values[6] < 1 || values[6] > 24) return false;
  *emotion = values[2] - 1;
  *actor = values[6];
  return true;
}

}  // namespace

absl::StatusOr<std::vector<RavdessClip>> ListRavdess(const std::string& dir,
                                                     const std::set<int>& actors) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    return absl::NotFoundError(absl::StrCat("RAVDESS folder not found: ", dir));
  }
  std::vector<RavdessClip> clips;
  for (fs::recursive_directory_iterator it(dir, error), end; it != end && !error;
       it.increment(error)) {
    if (!it->is_regular_file()) continue;
    std::string extension = absl::AsciiStrToLower(it->path().extension().string());
    if (extension != ".wav" && extension != ".flac") continue;
    RavdessClip clip;
    if (!ParseStem(it->path().stem().string(), &clip.emotion, &clip.actor)) continue;
    if (!actors.empty() && !actors.count(clip.actor)) continue;
    clip.path = it->path().string();
    clips.push_back(std::move(clip));
  }
  if (error) {
    return absl::InternalError(absl::StrCat("listing ", dir, ": ", error.message()));
  }
  if (clips.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no RAVDESS speech clips (Actor_NN/03-01-EE-II-SS-RR-AA.flac|wav) for the "
        "requested actors under ", dir));
  }
  std::sort(clips.begin(), clips.end(),
            [](const RavdessClip& a, const RavdessClip& b) { return a.path < b.path; });
  return clips;
}

absl::StatusOr<std::vector<std::vector<float>>> LoadRavdessClips(const std::string& dir,
                                                                 int count, int sample_rate) {
  absl::StatusOr<std::vector<RavdessClip>> listed = ListRavdess(dir);
  if (!listed.ok()) return listed.status();
  if (static_cast<int>(listed->size()) < count) {
    return absl::NotFoundError(
        absl::StrCat("only ", listed->size(), " RAVDESS clips under ", dir));
  }
  std::vector<std::vector<float>> clips;
  for (int i = 0; i < count; ++i) {
    absl::StatusOr<Audio> audio = DecodeAudioFile((*listed)[i].path);
    if (!audio.ok()) return audio.status();
    if (audio->sample_rate != sample_rate) {
      return absl::FailedPreconditionError(absl::StrCat(
          (*listed)[i].path, " is at ", audio->sample_rate, " Hz, expected ", sample_rate));
    }
    clips.push_back(std::move(audio->samples));
  }
  return clips;
}

absl::StatusOr<std::set<int>> ParseActorSet(absl::string_view text) {
  std::set<int> actors;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    std::vector<absl::string_view> range = absl::StrSplit(part, '-');
    int first = 0;
    int last = 0;
    bool ok = range.size() == 1
                  ? absl::SimpleAtoi(range[0], &first) && (last = first, true)
                  : range.size() == 2 && absl::SimpleAtoi(range[0], &first) &&
                        absl::SimpleAtoi(range[1], &last);
    if (!ok || first < 1 || last > 24 || first > last) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad actor list '", text, "': use numbers 1-24 like '21-24' or '1,3,5-7'"));
    }
    for (int a = first; a <= last; ++a) actors.insert(a);
  }
  if (actors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("empty actor list '", text, "'"));
  }
  return actors;
}

std::vector<float> BalancedClassWeights(const std::vector<RavdessClip>& clips,
                                        size_t num_classes) {
  std::vector<double> counts(num_classes, 0.0);
  for (const RavdessClip& clip : clips) {
    if (clip.emotion >= 0 && static_cast<size_t>(clip.emotion) < num_classes) {
      counts[clip.emotion] += 1;
    }
  }
  std::vector<float> weights(num_classes, 0.0f);
  for (size_t c = 0; c < num_classes; ++c) {
    if (counts[c] > 0) weights[c] = static_cast<float>(clips.size() / (num_classes * counts[c]));
  }
  return weights;
}

}  // namespace emoserve
