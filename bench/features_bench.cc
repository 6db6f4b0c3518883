// Feature extraction speed on a 3 s clip: 16 kHz and 48 kHz MFCC (the
// librosa comparison) and the bundled model's own features. Run with
//   features_bench --benchmark_repetitions=10
//                  --benchmark_report_aggregates_only=true
// bench/README.md compares its medians with librosa's on the same clips.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/feature_params.h"
#include "core/features.h"
#include "core/model_config.h"

namespace emoserve {
namespace {

constexpr double kSeconds = 3.0;

// A two-pole resonator (a formant).
class Resonator {
 public:
  Resonator(double hz, double bandwidth_hz, int rate) {
    const double r = std::exp(-M_PI * bandwidth_hz / rate);
    a1_ = 2 * r * std::cos(2 * M_PI * hz / rate);
    a2_ = -r * r;
    gain_ = 1 - r;
  }
  double operator()(double x) {
    const double y = gain_ * x + a1_ * y1_ + a2_ * y2_;
    y2_ = y1_;
    y1_ = y;
    return y;
  }

 private:
  double a1_, a2_, gain_;
  double y1_ = 0, y2_ = 0;
};

// Deterministic speech-like signal: a glottal pulse train with a wandering
// pitch through three formants, breath noise, and 4 Hz syllables with
// pauses.
std::vector<float> SpeechLike(int rate) {
  const size_t n = static_cast<size_t>(kSeconds * rate);
  Resonator f1(700, 130, rate), f2(1220, 70, rate), f3(2600, 160, rate);
  Resonator fricative(std::min(5000.0, rate * 0.4), 2000, rate);
  uint32_t seed = 12345;
  const auto noise = [&seed] {
    seed = seed * 1664525u + 1013904223u;
    return static_cast<double>(seed >> 8) / (1 << 24) - 0.5;
  };
  std::vector<float> out(n);
  double phase = 0;
  for (size_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(i) / rate;
    const double f0 = 140 + 40 * std::sin(2 * M_PI * 0.7 * t);
    phase += f0 / rate;
    const double pulse = phase >= 1 ? 1.0 : 0.0;
    if (phase >= 1) phase -= 1;
    const double syllable = std::max(0.0, std::sin(2 * M_PI * 4 * t));
    const double voiced = f1(pulse) + 0.5 * f2(pulse) + 0.25 * f3(pulse);
    const double unvoiced = 0.3 * fricative(noise());
    out[i] = static_cast<float>(syllable * (20 * voiced + unvoiced) +
                                1e-3 * noise());
  }
  return out;
}

FeatureParams Params16k() {
  FeatureParams p;
  p.kind = FeatureKind::kMfcc;
  p.n_mfcc = 40;
  p.n_fft = 512;
  p.win_length = 400;
  p.hop_length = 160;
  p.window = WindowType::kHamming;
  p.center = true;
  p.pad_mode = PadMode::kConstant;
  p.n_mels = 64;
  return p;
}

FeatureParams Params48k() {
  FeatureParams p = Params16k();
  p.n_fft = 1024;
  p.win_length = 512;
  p.hop_length = 512;
  p.pad_mode = PadMode::kReflect;
  p.n_mels = 128;
  return p;
}

// The `features` of models/default/model.json (log-mel, 128 bands of a
// 1024-point FFT, dB relative to the window's loudest cell).
absl::StatusOr<FeatureParams> BundledParams() {
  absl::StatusOr<ModelConfig> config =
      LoadModelConfig(EMOSERVE_SOURCE_DIR "/models/default/model.json");
  if (!config.ok()) return config.status();
  return config->features;
}

void Run(benchmark::State& state, const absl::StatusOr<FeatureParams>& params, int rate) {
  // Shared by the threads of a multi-threaded run, as in the service.
  static std::unique_ptr<FeatureExtractor> extractor;
  static std::vector<float> clip;
  if (state.thread_index() == 0) {
    extractor.reset();
    if (!params.ok()) {
      state.SkipWithError(params.status().ToString().c_str());
      return;
    }
    auto created = FeatureExtractor::Create(*params, rate);
    if (!created.ok()) {
      state.SkipWithError(created.status().ToString().c_str());
      return;
    }
    extractor = *std::move(created);
    clip = SpeechLike(rate);
  }
  FeatureMatrix out;
  for (auto _ : state) {
    if (extractor == nullptr) break;  // Thread 0's setup failed.
    const absl::Status status = extractor->Compute(clip, &out);
    if (!status.ok()) {
      state.SkipWithError(status.ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(out.data.data());
  }
  state.SetItemsProcessed(state.iterations());  // Clips.
}

void BM_Mfcc16k(benchmark::State& state) { Run(state, Params16k(), 16000); }
void BM_Mfcc48k(benchmark::State& state) { Run(state, Params48k(), 48000); }
void BM_Bundled16k(benchmark::State& state) { Run(state, BundledParams(), 16000); }

BENCHMARK(BM_Mfcc16k)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Mfcc48k)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Bundled16k)->Unit(benchmark::kMicrosecond);
// Throughput with one extractor shared by two threads (items_per_second is
// clips per second over both).
BENCHMARK(BM_Mfcc16k)->Unit(benchmark::kMicrosecond)->Threads(2)->UseRealTime();
BENCHMARK(BM_Mfcc48k)->Unit(benchmark::kMicrosecond)->Threads(2)->UseRealTime();

}  // namespace
}  // namespace emoserve

BENCHMARK_MAIN();
