#include "core/features.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/feature_params.h"
#include "nlohmann/json.hpp"
#include "tests/test_support.h"

namespace emoserve {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

// ---------------------------------------------------------------------------
// File helpers. The golden inputs are read here rather than through
// DecodeAudioFile so that this test checks the features alone.

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

uint32_t Le32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(s[at + i]);
  return v;
}

// A mono 32-bit IEEE float WAV (format 3, or extensible with a float
// subformat, whose GUID starts with 3).
std::optional<std::vector<float>> ReadFloatWav(const std::string& bytes) {
  if (bytes.size() < 12 || bytes.compare(0, 4, "RIFF") != 0 ||
      bytes.compare(8, 4, "WAVE") != 0) {
    return std::nullopt;
  }
  bool format_ok = false;
  for (size_t at = 12; at + 8 <= bytes.size();) {
    const std::string id = bytes.substr(at, 4);
    const size_t size = Le32(bytes, at + 4);
    const size_t body = at + 8;
    if (body + size > bytes.size()) return std::nullopt;
    if (id == "fmt ") {
      if (size < 16) return std::nullopt;
      const uint32_t format = Le32(bytes, body) & 0xffff;
      const uint32_t channels = Le32(bytes, body + 2) & 0xffff;
      const uint32_t bits = Le32(bytes, body + 14) & 0xffff;
      const bool is_float =
          format == 3 || (format == 0xfffe && size >= 26 &&
                          (Le32(bytes, body + 24) & 0xffff) == 3);
      format_ok = is_float && channels == 1 && bits == 32;
    } else if (id == "data") {
      if (!format_ok || size % 4 != 0) return std::nullopt;
      std::vector<float> samples(size / 4);
      std::memcpy(samples.data(), bytes.data() + body, size);
      return samples;
    }
    at = body + size + (size & 1);
  }
  return std::nullopt;
}

std::optional<std::vector<float>> ReadF32(const std::string& path) {
  const std::optional<std::string> bytes = ReadFile(path);
  if (!bytes.has_value() || bytes->size() % 4 != 0) return std::nullopt;
  std::vector<float> out(bytes->size() / 4);
  std::memcpy(out.data(), bytes->data(), bytes->size());
  return out;
}

// ---------------------------------------------------------------------------
// Signals.

// Deterministic noise plus two tones: a flat-ish spectrum that exercises
// every mel band.
std::vector<float> TestSignal(size_t n, int rate, uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> noise(-0.05f, 0.05f);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(i) / rate;
    out[i] = static_cast<float>(0.3 * std::sin(2 * M_PI * 440 * t) +
                                0.1 * std::sin(2 * M_PI * 2500 * t)) +
             noise(rng);
  }
  return out;
}

// ---------------------------------------------------------------------------
// An independent double-precision reference of the librosa 0.10 pipeline,
// written the slow, literal way: numpy-style padding, librosa.stft's
// head/middle/tail framing, an O(n^2) DFT, the mel filterbank from its
// formula, power_to_db and a direct DCT-II.

// np.pad(x, (left, right), mode), reflect done numpy's way: reflect chunks
// of at most len-1 samples, each time off the array padded so far.
std::vector<double> NpPad(std::vector<double> x, int left, int right,
                          PadMode mode) {
  if (mode == PadMode::kConstant || x.size() == 1) {
    const double lv = mode == PadMode::kConstant ? 0.0 : x.front();
    const double rv = mode == PadMode::kConstant ? 0.0 : x.back();
    x.insert(x.begin(), left, lv);
    x.insert(x.end(), right, rv);
    return x;
  }
  while (left > 0 || right > 0) {
    if (left > 0) {
      const int chunk = std::min<int>(left, static_cast<int>(x.size()) - 1);
      std::vector<double> pre(x.begin() + 1, x.begin() + 1 + chunk);
      std::reverse(pre.begin(), pre.end());
      x.insert(x.begin(), pre.begin(), pre.end());
      left -= chunk;
    }
    if (right > 0) {
      const int chunk = std::min<int>(right, static_cast<int>(x.size()) - 1);
      std::vector<double> post(x.end() - 1 - chunk, x.end() - 1);
      std::reverse(post.begin(), post.end());
      x.insert(x.end(), post.begin(), post.end());
      right -= chunk;
    }
  }
  return x;
}

// librosa.util.frame: 1 + (len - n) // hop frames of n samples.
void AppendFrames(const std::vector<double>& x, int n, int hop,
                  std::vector<std::vector<double>>* frames,
                  int max_frames = INT32_MAX) {
  if (static_cast<int>(x.size()) < n) return;
  const int count =
      std::min(max_frames, 1 + (static_cast<int>(x.size()) - n) / hop);
  for (int i = 0; i < count; ++i) {
    frames->emplace_back(x.begin() + i * hop, x.begin() + i * hop + n);
  }
}

std::vector<double> Slice(const std::vector<double>& y, long from, long to) {
  from = std::clamp<long>(from, 0, y.size());
  to = std::clamp<long>(to, from, y.size());
  return std::vector<double>(y.begin() + from, y.begin() + to);
}

long PyFloorDiv(long a, long b) {
  return static_cast<long>(std::floor(static_cast<double>(a) / b));
}

std::vector<std::vector<double>> LibrosaFrames(const std::vector<double>& y,
                                               const FeatureParams& p) {
  const int n_fft = p.n_fft, hop = p.hop_length, half = n_fft / 2;
  const long n = y.size();
  std::vector<std::vector<double>> frames;
  if (!p.center) {
    AppendFrames(y, n_fft, hop, &frames);
    return frames;
  }
  const long start_k =
      static_cast<long>(std::ceil(static_cast<double>(half) / hop));
  const long tail_k = PyFloorDiv(n + half - n_fft, hop) + 1;
  if (tail_k <= start_k) {
    AppendFrames(NpPad(y, half, half, p.pad_mode), n_fft, hop, &frames);
    return frames;
  }
  const long start = start_k * hop - half;
  AppendFrames(NpPad(Slice(y, 0, (start_k - 1) * hop - half + n_fft + 1),
                     half, 0, p.pad_mode),
               n_fft, hop, &frames, start_k);
  AppendFrames(Slice(y, start, n), n_fft, hop, &frames);
  if (tail_k * hop - half + n_fft <= n + half) {
    AppendFrames(NpPad(Slice(y, tail_k * hop - half, n), 0, half, p.pad_mode),
                 n_fft, hop, &frames);
  }
  return frames;
}

double RefHzToMel(double f) {
  const double f_sp = 200.0 / 3, min_log_hz = 1000.0;
  const double logstep = std::log(6.4) / 27.0;
  return f >= min_log_hz
             ? min_log_hz / f_sp + std::log(f / min_log_hz) / logstep
             : f / f_sp;
}

double RefMelToHz(double m) {
  const double f_sp = 200.0 / 3, min_log_hz = 1000.0;
  const double logstep = std::log(6.4) / 27.0;
  const double min_log_mel = min_log_hz / f_sp;
  return m >= min_log_mel ? min_log_hz * std::exp(logstep * (m - min_log_mel))
                          : f_sp * m;
}

// Returns [feature][frame].
std::vector<std::vector<double>> ReferenceFeatures(const std::vector<float>& y32,
                                                   const FeatureParams& p,
                                                   int sr) {
  const std::vector<double> y(y32.begin(), y32.end());
  const int n_fft = p.n_fft, n_bins = n_fft / 2 + 1, n_mels = p.n_mels;
  // Periodic window, zero-padded to n_fft, centred.
  const double alpha = p.window == WindowType::kHann ? 0.5 : 0.54;
  std::vector<double> window(n_fft, 0.0);
  const int lpad = (n_fft - p.win_length) / 2;
  for (int i = 0; i < p.win_length; ++i) {
    window[lpad + i] =
        alpha - (1 - alpha) * std::cos(2 * M_PI * i / p.win_length);
  }
  // Mel filterbank.
  const double fmax = p.fmax.value_or(sr / 2.0);
  std::vector<double> mel_f(n_mels + 2);
  const double mlo = RefHzToMel(p.fmin), mhi = RefHzToMel(fmax);
  for (int i = 0; i < n_mels + 2; ++i) {
    mel_f[i] = RefMelToHz(mlo + (mhi - mlo) * i / (n_mels + 1));
  }
  std::vector<std::vector<double>> fb(n_mels, std::vector<double>(n_bins));
  for (int i = 0; i < n_mels; ++i) {
    for (int k = 0; k < n_bins; ++k) {
      const double f = static_cast<double>(k) * sr / n_fft;
      const double lower = (f - mel_f[i]) / (mel_f[i + 1] - mel_f[i]);
      const double upper = (mel_f[i + 2] - f) / (mel_f[i + 2] - mel_f[i + 1]);
      fb[i][k] = std::max(0.0, std::min(lower, upper)) * 2.0 /
                 (mel_f[i + 2] - mel_f[i]);
    }
  }
  // STFT -> power -> mel.
  const std::vector<std::vector<double>> frames = LibrosaFrames(y, p);
  const int cols = frames.size();
  std::vector<std::vector<double>> mel(n_mels, std::vector<double>(cols));
  for (int t = 0; t < cols; ++t) {
    std::vector<double> power(n_bins);
    for (int k = 0; k < n_bins; ++k) {
      double re = 0, im = 0;
      for (int j = 0; j < n_fft; ++j) {
        const double a = -2 * M_PI * static_cast<double>((long(k) * j) % n_fft) / n_fft;
        re += window[j] * frames[t][j] * std::cos(a);
        im += window[j] * frames[t][j] * std::sin(a);
      }
      power[k] = re * re + im * im;
    }
    for (int i = 0; i < n_mels; ++i) {
      double s = 0;
      for (int k = 0; k < n_bins; ++k) s += fb[i][k] * power[k];
      mel[i][t] = s;
    }
  }
  // power_to_db.
  double max_s = 0;
  for (const auto& row : mel) {
    for (double v : row) max_s = std::max(max_s, v);
  }
  const double ref =
      p.db_ref == DbRef::kMax ? 10 * std::log10(std::max(p.amin, max_s)) : 0.0;
  double max_db = -INFINITY;
  for (auto& row : mel) {
    for (double& v : row) {
      v = 10 * std::log10(std::max(p.amin, v)) - ref;
      max_db = std::max(max_db, v);
    }
  }
  if (p.top_db.has_value()) {
    for (auto& row : mel) {
      for (double& v : row) v = std::max(v, max_db - *p.top_db);
    }
  }
  if (p.kind == FeatureKind::kLogMel) return mel;
  std::vector<std::vector<double>> mfcc(p.n_mfcc, std::vector<double>(cols));
  for (int k = 0; k < p.n_mfcc; ++k) {
    const double scale = std::sqrt((k == 0 ? 1.0 : 2.0) / n_mels);
    for (int t = 0; t < cols; ++t) {
      double s = 0;
      for (int m = 0; m < n_mels; ++m) {
        s += mel[m][t] * std::cos(M_PI * k * (2 * m + 1) / (2.0 * n_mels));
      }
      mfcc[k][t] = scale * s;
    }
  }
  return mfcc;
}

struct Diff {
  double max_abs = 0;
  double mean_abs = 0;
};

Diff Compare(const FeatureMatrix& got, const float* want) {
  Diff d;
  const size_t n = got.data.size();
  for (size_t i = 0; i < n; ++i) {
    const double e = std::abs(static_cast<double>(got.data[i]) - want[i]);
    d.max_abs = std::max(d.max_abs, e);
    d.mean_abs += e;
  }
  if (n > 0) d.mean_abs /= n;
  return d;
}

FeatureParams BaseParams() {
  FeatureParams p;  // ser16k: hamming 512/400/160, 64 mels, 40 MFCC.
  p.fmax = 8000.0;
  return p;
}

// ---------------------------------------------------------------------------
// Golden cases (librosa 0.10.2 outputs).

TEST(FeaturesGoldenTest, MatchesLibrosaOnEveryCase) {
  const std::optional<std::string> shared = testing::SharedDir();
  if (!shared.has_value()) {
    GTEST_SKIP() << "no shared data folder (set EMOSERVE_SHARED_DIR)";
  }
  const std::string dir = *shared + "/golden/features/";
  const std::optional<std::string> cases = ReadFile(dir + "cases.txt");
  ASSERT_TRUE(cases.has_value()) << "missing " << dir << "cases.txt";
  std::istringstream lines(*cases);
  std::string name;
  int checked = 0;
  while (std::getline(lines, name)) {
    if (name.empty()) continue;
    SCOPED_TRACE(name);
    const std::optional<std::string> json_text = ReadFile(dir + name + ".json");
    ASSERT_TRUE(json_text.has_value()) << "missing " << name << ".json";
    const Json json = Json::parse(*json_text);
    const absl::StatusOr<FeatureParams> params = ParseFeatureParams(*json_text);
    ASSERT_TRUE(params.ok()) << params.status();
    const std::optional<std::string> wav =
        ReadFile(dir + json.at("input").get<std::string>());
    ASSERT_TRUE(wav.has_value()) << "missing input of " << name;
    const std::optional<std::vector<float>> samples = ReadFloatWav(*wav);
    ASSERT_TRUE(samples.has_value()) << "not a mono float WAV";
    ASSERT_EQ(samples->size(), json.at("samples").get<size_t>());
    const std::optional<std::vector<float>> want =
        ReadF32(dir + json.at("output").get<std::string>());
    ASSERT_TRUE(want.has_value()) << "missing output of " << name;

    const int rate = json.at("sample_rate").get<int>();
    auto extractor = FeatureExtractor::Create(*params, rate);
    ASSERT_TRUE(extractor.ok()) << extractor.status();
    const absl::StatusOr<FeatureMatrix> got = (*extractor)->Compute(*samples);
    ASSERT_TRUE(got.ok()) << got.status();
    const int rows = json.at("shape")[0].get<int>();
    const int cols = json.at("shape")[1].get<int>();
    ASSERT_EQ(got->rows, rows);
    ASSERT_EQ(got->cols, cols);
    ASSERT_EQ(want->size(), static_cast<size_t>(rows) * cols);
    const Diff d = Compare(*got, want->data());
    const double max_tol = json.at("tolerance").at("max_abs").get<double>();
    const double mean_tol = json.at("tolerance").at("mean_abs").get<double>();
    EXPECT_LE(d.max_abs, max_tol);
    EXPECT_LE(d.mean_abs, mean_tol);
    std::cout << "[ golden   ] " << name << " " << rows << "x" << cols
              << " max_abs=" << d.max_abs << " mean_abs=" << d.mean_abs
              << "\n";
    ++checked;
  }
  EXPECT_GT(checked, 0) << "cases.txt lists no case";
}

// ---------------------------------------------------------------------------
// Against the double-precision reference, for parameter sets the golden
// cases do not cover.

struct RefCase {
  std::string name;
  std::string params_json;
  int rate;
  size_t samples;
};

void PrintTo(const RefCase& c, std::ostream* os) { *os << c.name; }

class FeaturesReferenceTest : public ::testing::TestWithParam<RefCase> {};

TEST_P(FeaturesReferenceTest, MatchesDoubleReference) {
  const RefCase& c = GetParam();
  const absl::StatusOr<FeatureParams> p = ParseFeatureParams(c.params_json);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::vector<float> y = TestSignal(c.samples, c.rate);
  auto extractor = FeatureExtractor::Create(*p, c.rate);
  ASSERT_TRUE(extractor.ok()) << extractor.status();
  const absl::StatusOr<FeatureMatrix> got = (*extractor)->Compute(y);
  ASSERT_TRUE(got.ok()) << got.status();
  const auto want = ReferenceFeatures(y, *p, c.rate);
  ASSERT_EQ(got->rows, static_cast<int>(want.size()));
  ASSERT_EQ(got->cols, static_cast<int>(want[0].size()));
  ASSERT_EQ(got->cols, p->NumFrames(y.size()));
  double max_abs = 0;
  for (int r = 0; r < got->rows; ++r) {
    for (int t = 0; t < got->cols; ++t) {
      max_abs = std::max(max_abs, std::abs(got->at(r, t) - want[r][t]));
    }
  }
  EXPECT_LT(max_abs, 2e-3);
}

INSTANTIATE_TEST_SUITE_P(
    ParameterSets, FeaturesReferenceTest,
    ::testing::Values(
        RefCase{"HannFullWindowConstant",
                R"({"kind": "mfcc", "n_mfcc": 13, "n_fft": 256,
                    "win_length": 256, "hop_length": 64, "window": "hann",
                    "center": true, "pad_mode": "constant", "n_mels": 40,
                    "fmin": 0.0, "fmax": null, "db_ref": "one",
                    "top_db": 80.0})",
                8000, 1500},
        RefCase{"HammingShortWindowReflectDbMaxNoFloor",
                R"({"kind": "log_mel", "n_fft": 512, "win_length": 301,
                    "hop_length": 128, "window": "hamming", "center": true,
                    "pad_mode": "reflect", "n_mels": 48, "fmin": 30.0,
                    "fmax": null, "db_ref": "max", "top_db": null})",
                16000, 2500},
        RefCase{"NotCentred",
                R"({"kind": "mfcc", "n_mfcc": 20, "n_fft": 400,
                    "win_length": 400, "hop_length": 160, "window": "hann",
                    "center": false, "pad_mode": "constant", "n_mels": 40,
                    "fmin": 50.0, "fmax": 4000.0, "db_ref": "max",
                    "top_db": 60.0})",
                16000, 2000},
        RefCase{"OddFftSize",
                R"({"kind": "mfcc", "n_mfcc": 24, "n_fft": 255,
                    "win_length": 200, "hop_length": 100, "window": "hann",
                    "center": true, "pad_mode": "reflect", "n_mels": 31,
                    "fmin": 0.0, "fmax": 5000.0, "db_ref": "one",
                    "top_db": 80.0})",
                11025, 1234},
        // tail_k * hop - n_fft/2 leaves a tail of exactly n_fft/2 samples,
        // which librosa pads on its own: the reflection wraps inside it.
        RefCase{"ReflectShortTailSegment",
                R"({"kind": "log_mel", "n_fft": 64, "win_length": 64,
                    "hop_length": 32, "window": "hann", "center": true,
                    "pad_mode": "reflect", "n_mels": 16, "fmin": 0.0,
                    "fmax": null, "db_ref": "one", "top_db": null})",
                8000, 320},
        RefCase{"HopLongerThanFft",
                R"({"kind": "mfcc", "n_mfcc": 10, "n_fft": 128,
                    "win_length": 100, "hop_length": 300, "window": "hamming",
                    "center": true, "pad_mode": "reflect", "n_mels": 20,
                    "fmin": 0.0, "fmax": null, "db_ref": "one",
                    "top_db": 80.0})",
                8000, 3001},
        // Reflect padding longer than the signal: periodic mirroring.
        RefCase{"ReflectLongerThanSignal",
                R"({"kind": "log_mel", "n_fft": 128, "win_length": 128,
                    "hop_length": 16, "window": "hann", "center": true,
                    "pad_mode": "reflect", "n_mels": 20, "fmin": 0.0,
                    "fmax": null, "db_ref": "max", "top_db": null})",
                8000, 11},
        RefCase{"ReflectTwoSamples",
                R"({"kind": "log_mel", "n_fft": 64, "win_length": 50,
                    "hop_length": 16, "window": "hamming", "center": true,
                    "pad_mode": "reflect", "n_mels": 12, "fmin": 0.0,
                    "fmax": null, "db_ref": "max", "top_db": null})",
                8000, 2},
        RefCase{"ReflectOneSample",
                R"({"kind": "log_mel", "n_fft": 64, "win_length": 64,
                    "hop_length": 16, "window": "hann", "center": true,
                    "pad_mode": "reflect", "n_mels": 12, "fmin": 0.0,
                    "fmax": null, "db_ref": "max", "top_db": 80.0})",
                8000, 1},
        RefCase{"AllCoefficientsOddMels",
                R"({"kind": "mfcc", "n_mfcc": 33, "n_fft": 512,
                    "win_length": 512, "hop_length": 256, "window": "hann",
                    "center": true, "pad_mode": "constant", "n_mels": 33,
                    "fmin": 100.0, "fmax": 7000.0, "db_ref": "one",
                    "top_db": 50.0})",
                16000, 3000},
        RefCase{"FirstCoefficientOnly",
                R"({"kind": "mfcc", "n_mfcc": 1, "n_fft": 128,
                    "win_length": 100, "hop_length": 50, "window": "hamming",
                    "center": true, "pad_mode": "reflect", "n_mels": 5,
                    "fmin": 0.0, "fmax": null, "db_ref": "max",
                    "top_db": null})",
                8000, 1000},
        RefCase{"TwoCoefficients",
                R"({"kind": "mfcc", "n_mfcc": 2, "n_fft": 128,
                    "win_length": 128, "hop_length": 64, "window": "hann",
                    "center": false, "pad_mode": "constant", "n_mels": 2,
                    "fmin": 0.0, "fmax": null, "db_ref": "one",
                    "top_db": 80.0})",
                8000, 1000},
        // More filters than bins: most are empty, as in librosa.
        RefCase{"MoreMelsThanBins",
                R"({"kind": "mfcc", "n_mfcc": 30, "n_fft": 64,
                    "win_length": 48, "hop_length": 20, "window": "hann",
                    "center": true, "pad_mode": "constant", "n_mels": 60,
                    "fmin": 0.0, "fmax": null, "db_ref": "max",
                    "top_db": 80.0})",
                16000, 700},
        RefCase{"TinyEvenFft",
                R"({"kind": "log_mel", "n_fft": 2, "win_length": 2,
                    "hop_length": 1, "window": "hann", "center": true,
                    "pad_mode": "reflect", "n_mels": 2, "fmin": 0.0,
                    "fmax": null, "db_ref": "one", "top_db": null})",
                8000, 30},
        RefCase{"TinyOddFft",
                R"({"kind": "log_mel", "n_fft": 3, "win_length": 3,
                    "hop_length": 2, "window": "hamming", "center": false,
                    "pad_mode": "reflect", "n_mels": 1, "fmin": 0.0,
                    "fmax": null, "db_ref": "max", "top_db": null})",
                8000, 31},
        RefCase{"ConstantShorterThanFft",
                R"({"kind": "mfcc", "n_mfcc": 40, "n_fft": 512,
                    "win_length": 400, "hop_length": 160,
                    "window": "hamming", "center": true,
                    "pad_mode": "constant", "n_mels": 64, "fmin": 0.0,
                    "fmax": 8000.0, "db_ref": "one", "top_db": 80.0})",
                16000, 100},
        // The padding's zero power floors at amin = -200 dB, unclipped.
        RefCase{"SmallAminShorterThanFft",
                R"({"kind": "log_mel", "n_fft": 512, "win_length": 400,
                    "hop_length": 160, "window": "hamming", "center": true,
                    "pad_mode": "constant", "n_mels": 64, "fmin": 0.0,
                    "fmax": 8000.0, "db_ref": "max", "top_db": null,
                    "amin": 1e-20})",
                16000, 100}),
    [](const ::testing::TestParamInfo<RefCase>& info) {
      return info.param.name;
    });

// ---------------------------------------------------------------------------
// Shapes and edge cases.

TEST(FeaturesTest, FrameCountsFollowLibrosa) {
  for (bool center : {true, false}) {
    for (int n_fft : {255, 256, 512}) {
      for (int hop : {1, 64, 160, 600}) {
        FeatureParams p = BaseParams();
        p.center = center;
        p.n_fft = n_fft;
        p.win_length = n_fft;
        p.hop_length = hop;
        p.n_mels = 16;
        p.n_mfcc = 8;
        auto extractor = FeatureExtractor::Create(p, 16000);
        ASSERT_TRUE(extractor.ok()) << extractor.status();
        for (size_t n : {1, 2, 100, 255, 256, 257, 513, 4000}) {
          SCOPED_TRACE(absl::StrCat("center=", center, " n_fft=", n_fft,
                                    " hop=", hop, " n=", n));
          const long padded = n + (center ? 2 * (n_fft / 2) : 0);
          const int want = padded < n_fft ? 0 : 1 + (padded - n_fft) / hop;
          EXPECT_EQ(p.NumFrames(n), want);
          const absl::StatusOr<FeatureMatrix> m =
              (*extractor)->Compute(TestSignal(n, 16000));
          if (want == 0) {
            EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
          } else {
            ASSERT_TRUE(m.ok()) << m.status();
            EXPECT_EQ(m->cols, want);
            EXPECT_EQ(m->rows, 8);
          }
        }
      }
    }
  }
}

TEST(FeaturesTest, EmptyNonFiniteOrTooShortSignalsAreRefused) {
  auto extractor = FeatureExtractor::Create(BaseParams(), 16000);
  ASSERT_TRUE(extractor.ok());
  EXPECT_EQ((*extractor)->Compute({}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> y = TestSignal(1000, 16000);
  y[500] = NAN;
  EXPECT_THAT((*extractor)->Compute(y).status().message(),
              HasSubstr("non-finite"));
  y[500] = INFINITY;
  EXPECT_EQ((*extractor)->Compute(y).status().code(),
            absl::StatusCode::kInvalidArgument);

  FeatureParams p = BaseParams();
  p.center = false;
  auto uncentred = FeatureExtractor::Create(p, 16000);
  ASSERT_TRUE(uncentred.ok());
  EXPECT_THAT((*uncentred)->Compute(TestSignal(511, 16000)).status().message(),
              HasSubstr("too large for uncentered"));
  EXPECT_EQ((*uncentred)->Compute(TestSignal(512, 16000))->cols, 1);
}

TEST(FeaturesTest, SilenceIsFlooredNotNan) {
  auto extractor = FeatureExtractor::Create(BaseParams(), 16000);
  ASSERT_TRUE(extractor.ok());
  const absl::StatusOr<FeatureMatrix> m =
      (*extractor)->Compute(std::vector<float>(1600, 0.0f));
  ASSERT_TRUE(m.ok());
  // All mel bands at 10 log10(amin) = -100 dB: only c0 is non-zero.
  EXPECT_NEAR(m->at(0, 3), -100.0 * std::sqrt(64.0), 1e-2);
  EXPECT_NEAR(m->at(5, 3), 0.0, 1e-3);
}

TEST(FeaturesTest, ReusesOutputAndMatchesAllocatingCompute) {
  auto extractor = FeatureExtractor::Create(BaseParams(), 16000);
  ASSERT_TRUE(extractor.ok());
  const std::vector<float> y = TestSignal(16000, 16000);
  const absl::StatusOr<FeatureMatrix> want = (*extractor)->Compute(y);
  ASSERT_TRUE(want.ok());
  FeatureMatrix out;
  out.data.assign(10, 123.0f);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE((*extractor)->Compute(y, &out).ok());
    EXPECT_EQ(out.rows, want->rows);
    EXPECT_EQ(out.cols, want->cols);
    EXPECT_EQ(out.data, want->data);
  }
}

TEST(FeaturesTest, ConcurrentComputeIsDeterministic) {
  FeatureParams logmel = BaseParams();
  logmel.kind = FeatureKind::kLogMel;
  logmel.pad_mode = PadMode::kReflect;
  auto a = FeatureExtractor::Create(BaseParams(), 16000);
  auto b = FeatureExtractor::Create(logmel, 16000);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::vector<float> y = TestSignal(24000, 16000);
  const FeatureMatrix want_a = *(*a)->Compute(y);
  const FeatureMatrix want_b = *(*b)->Compute(y);
  constexpr int kThreads = 4;
  std::vector<int> mismatches(kThreads, 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      // Each thread also plans and destroys its own extractor while the
      // others run: planning must not disturb execution.
      auto own = FeatureExtractor::Create(logmel, 16000);
      for (int iter = 0; iter < 20; ++iter) {
        const FeatureExtractor& e = (i + iter) % 2 == 0 ? **a : **b;
        const FeatureMatrix& want = (i + iter) % 2 == 0 ? want_a : want_b;
        const absl::StatusOr<FeatureMatrix> got = e.Compute(y);
        if (!got.ok() || got->data != want.data) ++mismatches[i];
        if (!own.ok() || (*own)->Compute(y)->data != want_b.data) {
          ++mismatches[i];
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) EXPECT_EQ(mismatches[i], 0) << i;
}

TEST(FeaturesTest, CreateChecksRateDependentParams) {
  FeatureParams p = BaseParams();
  p.fmax = 8000.0;
  EXPECT_THAT(FeatureExtractor::Create(p, 8000).status().message(),
              HasSubstr("fmax"));
  p.fmax.reset();
  p.fmin = 4000.0;
  EXPECT_THAT(FeatureExtractor::Create(p, 8000).status().message(),
              HasSubstr("fmin"));
  p.fmin = 0.0;
  EXPECT_FALSE(FeatureExtractor::Create(p, 0).ok());
  p.sample_rate = 16000;
  EXPECT_THAT(FeatureExtractor::Create(p, 22050).status().message(),
              HasSubstr("resample"));
  EXPECT_TRUE(FeatureExtractor::Create(p, 16000).ok());
  FeatureParams bad = BaseParams();
  bad.win_length = 1000;  // Hand-built params are validated too.
  EXPECT_EQ(FeatureExtractor::Create(bad, 16000).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto e = FeatureExtractor::Create(BaseParams(), 16000);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ((*e)->sample_rate(), 16000);
  EXPECT_EQ((*e)->num_features(), 40);
  EXPECT_EQ((*e)->params().n_mels, 64);
}

// ---------------------------------------------------------------------------
// Params parsing.

TEST(FeatureParamsTest, EveryKeyIsReadIntoTheParamsIncludingNulls) {
  const absl::StatusOr<FeatureParams> p = ParseFeatureParams(R"({
      "kind": "log_mel", "n_mfcc": 13, "n_fft": 1024, "win_length": 512,
      "hop_length": 256, "window": "hann", "center": false,
      "pad_mode": "reflect", "n_mels": 128, "fmin": 20.5, "fmax": null,
      "db_ref": "max", "top_db": null, "sample_rate": 48000})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->kind, FeatureKind::kLogMel);
  EXPECT_EQ(p->n_mfcc, 13);
  EXPECT_EQ(p->n_fft, 1024);
  EXPECT_EQ(p->win_length, 512);
  EXPECT_EQ(p->hop_length, 256);
  EXPECT_EQ(p->window, WindowType::kHann);
  EXPECT_FALSE(p->center);
  EXPECT_EQ(p->pad_mode, PadMode::kReflect);
  EXPECT_EQ(p->n_mels, 128);
  EXPECT_EQ(p->fmin, 20.5);
  EXPECT_FALSE(p->fmax.has_value());
  EXPECT_EQ(p->db_ref, DbRef::kMax);
  EXPECT_FALSE(p->top_db.has_value());
  EXPECT_EQ(p->sample_rate, 48000);
  EXPECT_EQ(p->num_features(), 128);
}

// With decibels relative to the window's loudest cell and an amin far below
// any signal, a much quieter copy of a signal (-80 dB) has the same features;
// librosa's default amin (-100 dB) floors the quiet copy's weak cells
// instead, so it differs.
TEST(FeaturesTest, MaxReferenceWithSmallAminIgnoresTheLevel) {
  const std::vector<float> loud = TestSignal(16000, 16000);
  std::vector<float> quiet = loud;
  for (float& s : quiet) s *= 1e-4f;
  for (const double amin : {1e-20, 1e-10}) {
    FeatureParams p = BaseParams();
    p.kind = FeatureKind::kLogMel;
    p.db_ref = DbRef::kMax;
    p.amin = amin;
    auto extractor = FeatureExtractor::Create(p, 16000);
    ASSERT_TRUE(extractor.ok()) << extractor.status();
    const absl::StatusOr<FeatureMatrix> a = (*extractor)->Compute(loud);
    const absl::StatusOr<FeatureMatrix> b = (*extractor)->Compute(quiet);
    ASSERT_TRUE(a.ok() && b.ok());
    const double largest_change = testing::MaxAbsDifference(a->data, b->data);
    if (amin == 1e-20) {
      EXPECT_LT(largest_change, 1e-3);
    } else {
      EXPECT_GT(largest_change, 1.0);
    }
  }
}

TEST(FeatureParamsTest, AbsentKeysKeepDefaults) {
  const absl::StatusOr<FeatureParams> p = ParseFeatureParams("{}");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(FeatureParamsToJson(*p), FeatureParamsToJson(FeatureParams()));
}

TEST(FeatureParamsTest, MalformedJsonUnknownKeysAndBadValuesAreInvalidArgument) {
  const struct {
    const char* json;
    const char* message;
  } kCases[] = {
      {R"({"n_fft": 512, "n_ftt": 256})", "unknown key \"n_ftt\""},
      {R"([1, 2])", "JSON object"},
      {R"({"n_fft": 512)", "not valid JSON"},
      {R"({"kind": "mfc"})", "\"kind\" must be one of"},
      {R"({"window": "hanning"})", "\"window\""},
      {R"({"pad_mode": "edge"})", "\"pad_mode\""},
      {R"({"db_ref": 1.0})", "\"db_ref\""},
      {R"({"center": "yes"})", "\"center\""},
      {R"({"n_fft": 0})", "\"n_fft\""},
      {R"({"n_fft": -512})", "\"n_fft\""},
      {R"({"n_fft": 512.5})", "\"n_fft\" must be an integer"},
      {R"({"n_fft": 99999999999})", "out of range"},
      {R"({"n_fft": 256, "win_length": 400})", "\"win_length\""},
      {R"({"win_length": 0})", "\"win_length\""},
      {R"({"hop_length": 0})", "\"hop_length\""},
      {R"({"n_mels": 0})", "\"n_mels\""},
      {R"({"n_mels": 20, "n_mfcc": 40})", "\"n_mfcc\""},
      {R"({"n_mfcc": 0})", "\"n_mfcc\""},
      {R"({"fmin": -1})", "\"fmin\""},
      {R"({"fmin": 100, "fmax": 100})", "\"fmax\""},
      {R"({"fmax": "8000"})", "\"fmax\" must be a number"},
      {R"({"top_db": -10})", "\"top_db\""},
      {R"({"amin": 0})", "\"amin\""},
      {R"({"amin": 1e-40})", "\"amin\""},
      {R"({"amin": "1e-10"})", "\"amin\" must be a number"},
      {R"({"sample_rate": 0})", "\"sample_rate\""},
      {R"({"sample_rate": 16000.0})", "\"sample_rate\""},
      {R"({"sample_rate": 16000, "fmax": 9000})", "sample_rate/2"},
      {R"({"sample_rate": 8000, "fmin": 4000})", "\"fmin\""},
  };
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.json);
    const absl::StatusOr<FeatureParams> p = ParseFeatureParams(c.json);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(p.status().message(), HasSubstr(c.message));
  }
  // n_mfcc only matters for MFCC.
  EXPECT_TRUE(ParseFeatureParams(
                  R"({"kind": "log_mel", "n_mels": 20, "n_mfcc": 40})")
                  .ok());
}

TEST(FeatureParamsTest, ToJsonAndBackGivesTheSameParams) {
  FeatureParams a = BaseParams();
  FeatureParams b;
  b.kind = FeatureKind::kLogMel;
  b.window = WindowType::kHann;
  b.center = false;
  b.pad_mode = PadMode::kReflect;
  b.fmin = 12.25;
  b.fmax.reset();
  b.db_ref = DbRef::kMax;
  b.top_db.reset();
  b.amin = 1e-20;
  b.sample_rate = 22050;
  for (const FeatureParams& p : {a, b}) {
    const Json json = FeatureParamsToJson(p);
    const absl::StatusOr<FeatureParams> back = FeatureParamsFromJson(json);
    ASSERT_TRUE(back.ok()) << back.status() << json.dump();
    EXPECT_EQ(FeatureParamsToJson(*back), json);
    EXPECT_EQ(back->fmax, p.fmax);
    EXPECT_EQ(back->top_db, p.top_db);
    EXPECT_EQ(back->sample_rate, p.sample_rate);
    const absl::StatusOr<FeatureParams> text = ParseFeatureParams(json.dump());
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(FeatureParamsToJson(*text), json);
  }
}

TEST(FeatureParamsTest, CaseFileUsesItsParamsAndRate) {
  const Json params = {{"kind", "mfcc"},       {"n_mfcc", 20},
                       {"n_fft", 2048},        {"win_length", 2048},
                       {"hop_length", 512},    {"window", "hann"},
                       {"center", true},       {"pad_mode", "constant"},
                       {"n_mels", 128},        {"fmin", 0.0},
                       {"fmax", 11025.0},      {"db_ref", "one"},
                       {"top_db", 80.0}};
  const Json case_file = {{"name", "x"},
                          {"sample_rate", 22050},
                          {"params", params},
                          {"shape", {20, 169}}};
  const absl::StatusOr<FeatureParams> bare = ParseFeatureParams(params.dump());
  const absl::StatusOr<FeatureParams> from_case =
      ParseFeatureParams(case_file.dump());
  ASSERT_TRUE(bare.ok()) << bare.status();
  ASSERT_TRUE(from_case.ok()) << from_case.status();
  EXPECT_FALSE(bare->sample_rate.has_value());
  EXPECT_EQ(from_case->sample_rate, 22050);
  FeatureParams expected = *bare;
  expected.sample_rate = 22050;
  EXPECT_EQ(FeatureParamsToJson(*from_case), FeatureParamsToJson(expected));
  // Unknown keys inside params are still errors.
  Json bad = case_file;
  bad["params"]["nfft"] = 1;
  EXPECT_THAT(ParseFeatureParams(bad.dump()).status().message(),
              HasSubstr("nfft"));
}

}  // namespace
}  // namespace emoserve
