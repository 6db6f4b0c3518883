#include "core/speaker_statistics.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace emoserve {
namespace {

constexpr char kMagic[4] = {'E', 'S', 'P', 'K'};
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderBytes = 24;

// FNV-1a: a stable hash of the summary's key, so that statistics of one
// model's summary are not read as another's.
uint64_t KeyHash(absl::string_view key) {
  uint64_t hash = 14695981039346656037ull;
  for (unsigned char c : key) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

template <typename T>
void Put(std::string& out, T value) {
  unsigned char bytes[sizeof(T)];
  for (size_t i = 0; i < sizeof(T); ++i) {
    bytes[i] = static_cast<unsigned char>(static_cast<uint64_t>(value) >> (8 * i));
  }
  out.append(reinterpret_cast<const char*>(bytes), sizeof(T));
}

template <typename T>
T Get(absl::string_view in, size_t at) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(in[at + i])) << (8 * i);
  }
  return static_cast<T>(value);
}

absl::Status Invalid(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("speaker_statistics: ", what));
}

}  // namespace

SpeakerStatistics::SpeakerStatistics(absl::string_view summary_key, int width)
    : key_hash_(KeyHash(summary_key)), mean_(static_cast<size_t>(width > 0 ? width : 0), 0.0f) {}

absl::Status SpeakerStatistics::Add(absl::Span<const float> summary) {
  if (summary.size() != mean_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("a summary of ", summary.size(),
                                                   " values for statistics of ", mean_.size()));
  }
  for (float v : summary) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("a summary that is not finite");
  }
  if (windows_ >= kMaxWindows) return absl::OkStatus();  // the mean no longer moves
  ++windows_;
  const float share = 1.0f / static_cast<float>(windows_);
  for (size_t k = 0; k < mean_.size(); ++k) mean_[k] += (summary[k] - mean_[k]) * share;
  return absl::OkStatus();
}

absl::Status SpeakerStatistics::Merge(const SpeakerStatistics& other) {
  if (other.key_hash_ != key_hash_) {
    return absl::InvalidArgumentError("statistics of another model's summary");
  }
  return AddMean(other.mean_, other.windows_);
}

absl::Status SpeakerStatistics::AddMean(absl::Span<const float> mean, int64_t windows) {
  if (mean.size() != mean_.size() || windows < 0) {
    return absl::InvalidArgumentError(absl::StrCat("a mean of ", mean.size(), " values over ",
                                                   windows, " windows for statistics of ",
                                                   mean_.size()));
  }
  if (windows == 0) return absl::OkStatus();
  for (float v : mean) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("a mean that is not finite");
  }
  const int64_t total = std::min(windows_ + windows, kMaxWindows);
  const double share = static_cast<double>(windows) / (windows_ + windows);
  for (size_t k = 0; k < mean_.size(); ++k) {
    mean_[k] += static_cast<float>((mean[k] - mean_[k]) * share);
  }
  windows_ = total;
  return absl::OkStatus();
}

std::vector<float> SpeakerStatistics::Mean() const {
  if (windows_ == 0) return {};
  return mean_;
}

std::string SpeakerStatistics::Serialize() const {
  std::string out(kMagic, sizeof(kMagic));
  out.reserve(kHeaderBytes + 4 * mean_.size());
  Put<uint16_t>(out, kVersion);
  Put<uint16_t>(out, 0);
  Put<uint64_t>(out, key_hash_);
  Put<uint32_t>(out, static_cast<uint32_t>(windows_));
  Put<uint32_t>(out, static_cast<uint32_t>(mean_.size()));
  for (float v : mean_) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    Put<uint32_t>(out, bits);
  }
  return out;
}

absl::StatusOr<SpeakerStatistics> SpeakerStatistics::Parse(absl::string_view blob,
                                                           absl::string_view summary_key,
                                                           int width) {
  if (blob.size() < kHeaderBytes || std::memcmp(blob.data(), kMagic, sizeof(kMagic)) != 0) {
    return Invalid("not a statistics blob (send back the bytes a response returned)");
  }
  if (Get<uint16_t>(blob, 4) != kVersion) {
    return Invalid(absl::StrCat("version ", Get<uint16_t>(blob, 4), " is not supported (",
                                kVersion, " is)"));
  }
  if (Get<uint16_t>(blob, 6) != 0) return Invalid("its reserved bytes are not zero");
  SpeakerStatistics statistics(summary_key, width);
  if (Get<uint64_t>(blob, 8) != statistics.key_hash_) {
    return Invalid("made by a model with another summary; statistics only carry over "
                   "between calls to the same model");
  }
  const int64_t windows = Get<uint32_t>(blob, 16);
  const uint32_t blob_width = Get<uint32_t>(blob, 20);
  if (blob_width != static_cast<uint32_t>(width) ||
      blob.size() != kHeaderBytes + 4 * static_cast<size_t>(width)) {
    return Invalid(absl::StrCat("holds ", blob_width, " values in ", blob.size(),
                                " bytes; this model's statistics have ", width));
  }
  if (windows > kMaxWindows) {
    return Invalid(absl::StrCat("claims ", windows, " windows, over the limit of ", kMaxWindows));
  }
  for (int k = 0; k < width; ++k) {
    const uint32_t bits = Get<uint32_t>(blob, kHeaderBytes + 4 * static_cast<size_t>(k));
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    if (!std::isfinite(v)) return Invalid("holds a value that is not finite");
    statistics.mean_[k] = v;
  }
  if (windows == 0) {
    for (float v : statistics.mean_) {
      if (v != 0.0f) return Invalid("holds values but no window");
    }
  }
  statistics.windows_ = windows;
  return statistics;
}

}  // namespace emoserve
