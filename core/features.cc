#include "core/features.h"

#include <fftw3.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/base/const_init.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

// The hot loops are written for the auto-vectoriser. On x86-64 GCC also
// builds an AVX2+FMA clone of each and picks one at load time, so that the
// binary still runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMOSERVE_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EMOSERVE_VECTOR_CLONES
#endif

namespace emoserve {
namespace {

// FFTW's planner (plan creation and destruction) is not thread-safe; plan
// execution on new arrays is.
ABSL_CONST_INIT absl::Mutex g_fftw_planner_mu(absl::kConstInit);

// Frames per block. The mel filterbank runs on a block at once with the
// frames along the vector lanes: filters are short and of varying length,
// so summing along the bins of one frame would not vectorise.
constexpr int kBlock = 16;

// Four floats: the portable SIMD width used by the hand-vectorised block
// transpose and filterbank (GCC/Clang vector extensions).
using Float4 = float __attribute__((vector_size(16)));
using Int4 = int __attribute__((vector_size(16)));

Float4 Load4(const float* p) {
  Float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
void Store4(float* p, Float4 v) { std::memcpy(p, &v, sizeof(v)); }

struct FftwDeleter {
  void operator()(void* p) const { fftwf_free(p); }
};
template <typename T>
using FftwBuffer = std::unique_ptr<T[], FftwDeleter>;

// SIMD-aligned (as FFTW plans assume) and zeroed.
template <typename T>
FftwBuffer<T> FftwAlloc(size_t n) {
  FftwBuffer<T> buffer(static_cast<T*>(fftwf_malloc(sizeof(T) * n)));
  if (buffer != nullptr) std::memset(buffer.get(), 0, sizeof(T) * n);
  return buffer;
}

// Python's // on integers (floors, unlike C++ division).
int64_t FloorDiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// numpy's pad(mode="reflect") index for position `i` of the segment
// [lo, hi) extended on either side, however far: the mirror extension is
// periodic with period 2 (L - 1); a single sample is repeated.
int64_t ReflectIndex(int64_t i, int64_t lo, int64_t hi) {
  const int64_t len = hi - lo;
  if (len == 1) return lo;
  const int64_t period = 2 * (len - 1);
  int64_t r = (i - lo) % period;
  if (r < 0) r += period;
  return lo + (r < len ? r : period - r);
}

// librosa's slaney mel scale (htk=False).
constexpr double kMelFsp = 200.0 / 3;
constexpr double kMinLogHz = 1000.0;
constexpr double kMinLogMel = kMinLogHz / kMelFsp;
const double kMelLogStep = std::log(6.4) / 27.0;

double HzToMel(double hz) {
  if (hz >= kMinLogHz) return kMinLogMel + std::log(hz / kMinLogHz) / kMelLogStep;
  return hz / kMelFsp;
}

double MelToHz(double mel) {
  if (mel >= kMinLogMel) {
    return kMinLogHz * std::exp(kMelLogStep * (mel - kMinLogMel));
  }
  return kMelFsp * mel;
}

// numpy.linspace(start, stop, num) (endpoint=True), same rounding.
std::vector<double> Linspace(double start, double stop, int num) {
  std::vector<double> out(num);
  const int div = num - 1;
  const double step = div > 0 ? (stop - start) / div : 0.0;
  for (int i = 0; i < num; ++i) out[i] = i * step + start;
  if (num > 1) out[num - 1] = stop;
  return out;
}

// 10 * log10(x) for positive normal floats, branch-free so that the compiler
// vectorises it (libm's log10f is not, and would dominate the run time).
// Splits x into 2^e * m with m in [sqrt(1/2), sqrt(2)) (the integer trick of
// musl's logf) and sums the atanh series of ln(m); error below 1e-5 dB.
inline float FastDb(float x) {
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3;  // sqrt(0.5f)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t shifted = bits - kSqrtHalfBits;
  const int32_t e = static_cast<int32_t>(shifted) >> 23;
  const uint32_t m_bits = bits - (shifted & 0xff800000u);
  float m;
  std::memcpy(&m, &m_bits, sizeof(m));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series =
      1.0f +
      s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  constexpr float kDbPerOctave = 3.01029995663981195f;  // 10 log10(2)
  constexpr float kDbPerNeper = 4.34294481903251828f;   // 10 / ln(10)
  return static_cast<float>(e) * kDbPerOctave +
         (2.0f * kDbPerNeper) * s * series;
}

// ---------------------------------------------------------------------------
// Kernels. Each runs over a whole row or block, so that the dispatch of the
// cloned versions costs nothing.

// Whether any sample is Inf or NaN. (exponent + 1) carries into bit 31 only
// for an all-ones exponent; unlike std::isfinite this vectorises.
EMOSERVE_VECTOR_CLONES
bool AnyNonFinite(const float* __restrict x, size_t n) {
  uint32_t acc = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], sizeof(bits));
    acc |= (bits & 0x7f800000u) + 0x00800000u;
  }
  return (acc & 0x80000000u) != 0;
}

EMOSERVE_VECTOR_CLONES
void MultiplyWindow(const float* __restrict window,
                    const float* __restrict x, int n, float* __restrict out) {
  for (int i = 0; i < n; ++i) out[i] = window[i] * x[i];
}

// |X[k]|^2 for k in [0, M] of the real FFT of an even-length frame x
// (N = 2M samples), from z = the M-point complex FFT of x read as complex
// pairs (x[2n] + i x[2n+1]); FFTW's complex codelets are about twice as
// fast as its real-input ones here. With a = z[k], b = z[M-k] (indices mod
// M) and w = exp(-2 pi i k / N):
//   X[k] = (a + conj(b)) / 2 - i w (a - conj(b)) / 2,
// and X[M-k] shares all its products with X[k], so bins come in pairs.
// cos_tw/sin_tw hold cos/sin(2 pi k / N) for k in [0, M]; `scratch` holds
// 3 M floats.
EMOSERVE_VECTOR_CLONES
void HalfSpectrumPower(const float* __restrict z, int m,
                       const float* __restrict cos_tw,
                       const float* __restrict sin_tw,
                       float* __restrict scratch, float* __restrict power) {
  // Bins 0 and M pair z[0] with itself.
  const float x0 = z[0] + z[1], xm = z[0] - z[1];
  power[0] = x0 * x0;
  power[m] = xm * xm;
  // Pairs (k, M-k) for k in [1, M/2]; for even M the middle bin is its own
  // pair and is written twice. Reading b = z[M-k] and writing X[M-k]
  // backwards does not vectorise, so both go through forward scratch
  // arrays with reversed copies (of 8-byte complex values, and of floats).
  const int half = m / 2;
  float* b_fwd = scratch;          // b_fwd[k] = z[M-k]
  float* upper = scratch + 2 * m;  // upper[k] = |X[M-k]|^2
  for (int k = 1; k <= half; ++k) {
    std::memcpy(b_fwd + 2 * k, z + 2 * (m - k), 2 * sizeof(float));
  }
  for (int k = 1; k <= half; ++k) {
    const float ar = z[2 * k], ai = z[2 * k + 1];
    const float br = b_fwd[2 * k], bi = b_fwd[2 * k + 1];
    const float sum_r = ar + br, diff_i = ai - bi;
    const float sum_i = ai + bi, diff_r = br - ar;
    const float q = cos_tw[k] * sum_i + sin_tw[k] * diff_r;
    const float r = cos_tw[k] * diff_r - sin_tw[k] * sum_i;
    const float xr = sum_r + q, xi = diff_i + r;    // 2 X[k]
    const float yr = sum_r - q, yi = r - diff_i;    // 2 X[M-k]
    power[k] = 0.25f * (xr * xr + xi * xi);
    upper[k] = 0.25f * (yr * yr + yi * yi);
  }
  for (int k = 1; k <= half; ++k) power[m - k] = upper[k];
}

// |X[k]|^2 for all bins of an interleaved complex spectrum.
EMOSERVE_VECTOR_CLONES
void ComplexPower(const float* __restrict spectrum, int n_bins,
                  float* __restrict power) {
  for (int k = 0; k < n_bins; ++k) {
    const float re = spectrum[2 * k], im = spectrum[2 * k + 1];
    power[k] = re * re + im * im;
  }
}

// Lanes i0..i3 of the 8 lanes of a and b; GCC and clang spell it
// differently.
#if defined(__clang__)
#define Shuffle4(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define Shuffle4(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, Int4{i0, i1, i2, i3})
#endif

// out[k][b] = rows[b][k] for kBlock rows of `n` values (row stride
// `stride`), in 4x4 tiles.
void TransposeBlock(const float* __restrict rows, int stride, int n,
                    float* __restrict out) {
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    for (int b = 0; b < kBlock; b += 4) {
      const Float4 r0 = Load4(rows + (b + 0) * stride + k);
      const Float4 r1 = Load4(rows + (b + 1) * stride + k);
      const Float4 r2 = Load4(rows + (b + 2) * stride + k);
      const Float4 r3 = Load4(rows + (b + 3) * stride + k);
      const Float4 t0 = Shuffle4(r0, r1, 0, 4, 1, 5);
      const Float4 t1 = Shuffle4(r2, r3, 0, 4, 1, 5);
      const Float4 t2 = Shuffle4(r0, r1, 2, 6, 3, 7);
      const Float4 t3 = Shuffle4(r2, r3, 2, 6, 3, 7);
      Store4(out + (k + 0) * kBlock + b, Shuffle4(t0, t1, 0, 1, 4, 5));
      Store4(out + (k + 1) * kBlock + b, Shuffle4(t0, t1, 2, 3, 6, 7));
      Store4(out + (k + 2) * kBlock + b, Shuffle4(t2, t3, 0, 1, 4, 5));
      Store4(out + (k + 3) * kBlock + b, Shuffle4(t2, t3, 2, 3, 6, 7));
    }
  }
  for (; k < n; ++k) {
    for (int b = 0; b < kBlock; ++b) out[k * kBlock + b] = rows[b * stride + k];
  }
}

// A sparse mel filterbank: each filter's non-zero weights only.
struct MelFilters {
  std::vector<int> begin, end;  // Bin range of filter m.
  std::vector<int> offset;      // Where filter m's weights start.
  std::vector<float> weights;
};

// The filterbank on a block: block[k][b] is the power of bin
// (first_bin + k) in frame b; writes mel[m * stride + b] and raises
// max[b] to the largest value of frame b.
EMOSERVE_VECTOR_CLONES
void ApplyMelBlock(const MelFilters& filters, int first_bin,
                   const float* __restrict block, size_t stride,
                   float* __restrict mel, Float4 max[kBlock / 4]) {
  static_assert(kBlock == 16, "four Float4 accumulators");
  const int n_mels = static_cast<int>(filters.begin.size());
  for (int m = 0; m < n_mels; ++m) {
    Float4 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    const float* w = filters.weights.data() + filters.offset[m];
    for (int k = filters.begin[m]; k < filters.end[m]; ++k) {
      const float c = *w++;
      const float* p = block + (k - first_bin) * kBlock;
      acc0 += c * Load4(p);
      acc1 += c * Load4(p + 4);
      acc2 += c * Load4(p + 8);
      acc3 += c * Load4(p + 12);
    }
    float* out = mel + m * stride;
    Store4(out, acc0);
    Store4(out + 4, acc1);
    Store4(out + 8, acc2);
    Store4(out + 12, acc3);
    max[0] = acc0 > max[0] ? acc0 : max[0];
    max[1] = acc1 > max[1] ? acc1 : max[1];
    max[2] = acc2 > max[2] ? acc2 : max[2];
    max[3] = acc3 > max[3] ? acc3 : max[3];
  }
}

// out[i] = max(10 log10(max(amin, in[i])) - ref_db, floor_db) for powers
// in[i] >= +0. May run in place.
EMOSERVE_VECTOR_CLONES
void PowerToDb(const float* in, size_t n, float amin, float ref_db, float floor_db,
               float* out) {
  int32_t amin_bits;
  std::memcpy(&amin_bits, &amin, sizeof(amin_bits));
  for (size_t i = 0; i < n; ++i) {
    // max(in[i], amin) on the bit patterns (ordered like the values for
    // non-negative floats), as arithmetic: with a comparison GCC splits the
    // loop on it (FastDb(amin) being a constant) and stops vectorising.
    int32_t bits;
    std::memcpy(&bits, &in[i], sizeof(bits));
    const int32_t below = (bits - amin_bits) >> 31;  // All ones if < amin.
    bits += (amin_bits - bits) & below;
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    const float db = FastDb(x) - ref_db;
    out[i] = db > floor_db ? db : floor_db;
  }
}

// mean[t] = mean over rows of data[r][t]; then data[r][t] -= mean[t].
// Centring each frame before the DCT keeps the float partial sums small:
// the dB values share a large offset, which only the first coefficient
// needs, and it is exactly sqrt(rows) * mean.
EMOSERVE_VECTOR_CLONES
void CenterColumns(float* __restrict data, int rows, int cols, size_t stride,
                   double* __restrict mean) {
  for (int t = 0; t < cols; ++t) mean[t] = 0.0;
  for (int r = 0; r < rows; ++r) {
    const float* row = data + r * stride;
    for (int t = 0; t < cols; ++t) mean[t] += row[t];
  }
  for (int t = 0; t < cols; ++t) mean[t] /= rows;
  for (int r = 0; r < rows; ++r) {
    float* row = data + r * stride;
    for (int t = 0; t < cols; ++t) row[t] -= static_cast<float>(mean[t]);
  }
}

// The DCT-II basis is symmetric about the middle mel band: row k of the
// matrix at band N-1-m is (-1)^k times its value at m. So rows m and N-1-m
// are replaced by their sum (all even k need) and difference (all odd k
// need), which halves the DCT's work. For odd N the middle row is kept.
EMOSERVE_VECTOR_CLONES
void FoldMirrorRows(float* __restrict data, int rows, int cols,
                    size_t stride) {
  for (int m = 0; m < rows / 2; ++m) {
    float* a = data + m * stride;
    float* b = data + (rows - 1 - m) * stride;
    for (int t = 0; t < cols; ++t) {
      const float sum = a[t] + b[t], diff = a[t] - b[t];
      a[t] = sum;
      b[t] = diff;
    }
  }
}

// out[i * out_stride + t] = sum_m coeffs[i][m] * in[m * in_stride + t] for
// i < n_out, m < n_in. Innermost over frames so that it vectorises, four
// input rows per pass so that loads and stores of `out` do not bound it, and
// blocked over frames so that the block of `in` it reads stays in cache for
// every i.
EMOSERVE_VECTOR_CLONES
void ApplyDct(const float* __restrict coeffs, int n_out, int n_in,
              const float* __restrict in, size_t in_stride, int cols,
              float* __restrict out, size_t out_stride) {
  constexpr int kCols = 256;
  for (int t0 = 0; t0 < cols; t0 += kCols) {
    const int tn = std::min(kCols, cols - t0);
    for (int i = 0; i < n_out; ++i) {
      float* o = out + i * out_stride + t0;
      const float* c = coeffs + static_cast<size_t>(i) * n_in;
      std::fill_n(o, tn, 0.0f);
      int m = 0;
      for (; m + 4 <= n_in; m += 4) {
        const float c0 = c[m], c1 = c[m + 1], c2 = c[m + 2], c3 = c[m + 3];
        const float* r0 = in + m * in_stride + t0;
        const float* r1 = r0 + in_stride;
        const float* r2 = r1 + in_stride;
        const float* r3 = r2 + in_stride;
        for (int t = 0; t < tn; ++t) {
          o[t] += (c0 * r0[t] + c1 * r1[t]) + (c2 * r2[t] + c3 * r3[t]);
        }
      }
      for (; m < n_in; ++m) {
        const float cm = c[m];
        const float* row = in + m * in_stride + t0;
        for (int t = 0; t < tn; ++t) o[t] += cm * row[t];
      }
    }
  }
}

// Where a signal's frames come from, as librosa.stft lays them out. With
// centring, frames reading past the end start at `tail_frame`; when those
// do not overlap the frames reading before the start, librosa pads the tail
// on its own (np.pad of y[tail_lo:]), so a reflection longer than that
// suffix wraps inside it rather than inside the whole signal.
struct FrameLayout {
  int64_t num_samples = 0;
  int64_t offset = 0;  // Signal index of frame 0's first sample.
  int64_t tail_frame = 0;
  int64_t tail_lo = 0;
};

}  // namespace

struct FeatureExtractor::Impl {
  FeatureParams params;
  int sample_rate = 0;
  int win_offset = 0;         // Where the window starts in the n_fft frame.
  std::vector<float> window;  // The win_length non-zero samples.
  // Even n_fft: an n_fft/2-point complex FFT (see HalfSpectrumPower), with
  // its twiddles; odd n_fft: a real-input FFT.
  bool half_complex = false;
  fftwf_plan plan = nullptr;
  std::vector<float> cos_tw, sin_tw;
  int spectrum_floats = 0;  // Size of the FFT's output.

  MelFilters filters;
  // Bins that some filter uses; no others reach the filterbank.
  int first_bin = 0, end_bin = 0;

  // MFCC only: the DCT matrix's even rows k = 2, 4, ... over the folded
  // rows [0, (N+1)/2) and odd rows k = 1, 3, ... over the folded rows
  // [N - N/2, N) (see FoldMirrorRows); row-major.
  std::vector<float> dct_even, dct_odd;

  ~Impl() {
    if (plan != nullptr) {
      absl::MutexLock lock(&g_fftw_planner_mu);
      fftwf_destroy_plan(plan);
    }
  }

  absl::Status Init();
  void BuildWindow();
  void BuildMelFilters();
  void BuildDct();
  FrameLayout Layout(int64_t num_samples) const;
  void FillFrame(const float* samples, const FrameLayout& layout, int64_t t,
                 float* frame) const;
  absl::Status Compute(absl::Span<const float> samples,
                       FeatureMatrix* out) const;
};

absl::Status FeatureExtractor::Impl::Init() {
  BuildWindow();
  BuildMelFilters();
  if (params.kind == FeatureKind::kMfcc) BuildDct();

  const int n_fft = params.n_fft;
  half_complex = n_fft % 2 == 0;
  if (half_complex) {
    const int m = n_fft / 2;
    cos_tw.resize(m + 1);
    sin_tw.resize(m + 1);
    for (int k = 0; k <= m; ++k) {
      cos_tw[k] = static_cast<float>(std::cos(2.0 * M_PI * k / n_fft));
      sin_tw[k] = static_cast<float>(std::sin(2.0 * M_PI * k / n_fft));
    }
    spectrum_floats = 2 * m;
  } else {
    spectrum_floats = 2 * (n_fft / 2 + 1);
  }
  // Plan on scratch arrays with the alignment fftwf_malloc gives every
  // Compute's buffers, so that the new-array execute functions may use them.
  auto in = FftwAlloc<float>(n_fft);
  auto out = FftwAlloc<float>(spectrum_floats);
  if (in == nullptr || out == nullptr) {
    return absl::ResourceExhaustedError("features: out of memory for FFT");
  }
  {
    // FFTW_ESTIMATE, not FFTW_MEASURE: a measured plan depends on timings,
    // so two processes may pick different algorithms whose results differ
    // in the last bits, and training with the same seed would not give the
    // same model. Estimated plans cost a little more, a small share of a
    // window's model time (bench/README.md).
    absl::MutexLock lock(&g_fftw_planner_mu);
    if (half_complex) {
      plan = fftwf_plan_dft_1d(n_fft / 2,
                               reinterpret_cast<fftwf_complex*>(in.get()),
                               reinterpret_cast<fftwf_complex*>(out.get()),
                               FFTW_FORWARD, FFTW_ESTIMATE);
    } else {
      plan = fftwf_plan_dft_r2c_1d(
          n_fft, in.get(), reinterpret_cast<fftwf_complex*>(out.get()),
          FFTW_ESTIMATE);
    }
  }
  if (plan == nullptr) {
    return absl::InternalError(
        absl::StrCat("features: FFTW could not plan n_fft=", n_fft));
  }
  return absl::OkStatus();
}

void FeatureExtractor::Impl::BuildWindow() {
  // scipy.signal.get_window(name, win_length, fftbins=True): periodic.
  const double alpha = params.window == WindowType::kHann ? 0.5 : 0.54;
  const int n = params.win_length;
  window.resize(n);
  for (int i = 0; i < n; ++i) {
    window[i] = static_cast<float>(alpha - (1.0 - alpha) *
                                               std::cos(2.0 * M_PI * i / n));
  }
  // librosa.util.pad_center.
  win_offset = (params.n_fft - n) / 2;
}

std::vector<double> MelFrequencies(const FeatureParams& params, int sample_rate) {
  const double fmax = params.fmax.value_or(sample_rate / 2.0);
  std::vector<double> mel_f =
      Linspace(HzToMel(params.fmin), HzToMel(fmax), params.n_mels + 2);
  std::transform(mel_f.begin(), mel_f.end(), mel_f.begin(), MelToHz);
  return mel_f;
}

void FeatureExtractor::Impl::BuildMelFilters() {
  // librosa.filters.mel(htk=False, norm="slaney"), in double as librosa
  // computes it; the triangle is rounded to float32 before the slaney
  // normalisation, as librosa's float32 weights array does.
  const int n_mels = params.n_mels;
  const int n_bins = params.n_fft / 2 + 1;
  const std::vector<double> mel_f = MelFrequencies(params, sample_rate);
  // numpy.fft.rfftfreq(n_fft, 1 / sr).
  const double bin_hz = 1.0 / (params.n_fft * (1.0 / sample_rate));

  filters.begin.assign(n_mels, 0);
  filters.end.assign(n_mels, 0);
  filters.offset.assign(n_mels, 0);
  filters.weights.clear();
  first_bin = n_bins;
  end_bin = 0;
  std::vector<float> row(n_bins);
  for (int m = 0; m < n_mels; ++m) {
    const double lower_diff = mel_f[m + 1] - mel_f[m];
    const double upper_diff = mel_f[m + 2] - mel_f[m + 1];
    const double enorm = 2.0 / (mel_f[m + 2] - mel_f[m]);
    int begin = n_bins, end = 0;
    for (int k = 0; k < n_bins; ++k) {
      const double f = k * bin_hz;
      const double lower = -(mel_f[m] - f) / lower_diff;
      const double upper = (mel_f[m + 2] - f) / upper_diff;
      const float tri =
          static_cast<float>(std::max(0.0, std::min(lower, upper)));
      row[k] = static_cast<float>(static_cast<double>(tri) * enorm);
      if (row[k] != 0.0f) {
        begin = std::min(begin, k);
        end = k + 1;
      }
    }
    if (begin >= end) begin = end = 0;  // An empty filter (librosa warns).
    filters.begin[m] = begin;
    filters.end[m] = end;
    filters.offset[m] = static_cast<int>(filters.weights.size());
    filters.weights.insert(filters.weights.end(), row.begin() + begin,
                           row.begin() + end);
    if (begin < end) {
      first_bin = std::min(first_bin, begin);
      end_bin = std::max(end_bin, end);
    }
  }
  if (first_bin >= end_bin) first_bin = end_bin = 0;
}

void FeatureExtractor::Impl::BuildDct() {
  // scipy.fft.dct(type=2, norm="ortho") along the mel axis, as matrices.
  const int n = params.n_mels;
  const int n_even = (n + 1) / 2, n_odd = n / 2;
  const auto basis = [n](int k, int m) {
    return static_cast<float>(std::sqrt(2.0 / n) *
                              std::cos(M_PI * k * (2 * m + 1) / (2.0 * n)));
  };
  dct_even.clear();
  dct_odd.clear();
  for (int k = 1; k < params.n_mfcc; ++k) {
    if (k % 2 == 0) {
      for (int m = 0; m < n_even; ++m) dct_even.push_back(basis(k, m));
    } else {
      // Folded row N - n_odd + j holds band pair m = n_odd - 1 - j.
      for (int j = 0; j < n_odd; ++j) dct_odd.push_back(basis(k, n_odd - 1 - j));
    }
  }
}

FrameLayout FeatureExtractor::Impl::Layout(int64_t num_samples) const {
  FrameLayout layout;
  layout.num_samples = num_samples;
  if (!params.center) {
    layout.tail_frame = INT64_MAX;
    return layout;
  }
  const int64_t half = params.n_fft / 2;
  const int64_t hop = params.hop_length;
  layout.offset = -half;
  // librosa.stft's start_k and tail_k.
  const int64_t head_frames = (half + hop - 1) / hop;
  const int64_t tail_frame =
      FloorDiv(num_samples + half - params.n_fft, hop) + 1;
  if (tail_frame > head_frames) {
    layout.tail_frame = tail_frame;
    layout.tail_lo = tail_frame * hop - half;
  }  // Else librosa pads the whole signal at once: tail_frame = tail_lo = 0.
  return layout;
}

// Writes the windowed samples of frame `t` into frame[win_offset, +win);
// the rest of `frame` stays zero.
void FeatureExtractor::Impl::FillFrame(const float* samples,
                                       const FrameLayout& layout, int64_t t,
                                       float* frame) const {
  const int win = params.win_length;
  const int64_t first = layout.offset + t * params.hop_length + win_offset;
  float* dst = frame + win_offset;
  if (first >= 0 && first + win <= layout.num_samples) {
    MultiplyWindow(window.data(), samples + first, win, dst);
    return;
  }
  // The frame reaches into the padding.
  const int64_t n = layout.num_samples;
  const int64_t lo = t >= layout.tail_frame ? layout.tail_lo : 0;
  for (int j = 0; j < win; ++j) {
    const int64_t i = first + j;
    float x;
    if (i >= 0 && i < n) {
      x = samples[i];
    } else if (params.pad_mode == PadMode::kConstant) {
      x = 0.0f;
    } else {
      x = samples[ReflectIndex(i, lo, n)];
    }
    dst[j] = window[j] * x;
  }
}

absl::Status FeatureExtractor::Impl::Compute(absl::Span<const float> samples,
                                             FeatureMatrix* out) const {
  const int64_t n = static_cast<int64_t>(samples.size());
  if (n == 0) return absl::InvalidArgumentError("features: empty signal");
  // Non-finite samples would poison the whole matrix (through max and
  // top_db); librosa rejects them too.
  if (AnyNonFinite(samples.data(), samples.size())) {
    return absl::InvalidArgumentError(
        "features: the signal has non-finite samples");
  }
  if (!params.center && n < params.n_fft) {
    return absl::InvalidArgumentError(absl::StrCat(
        "features: n_fft=", params.n_fft,
        " is too large for uncentered analysis of a signal of length ", n));
  }
  const int cols = params.NumFrames(samples.size());
  const int n_mels = params.n_mels;
  const int n_bins = params.n_fft / 2 + 1;
  const int n_bins_used = end_bin - first_bin;
  // The mel power matrix [mel][frame], with rows padded to whole blocks.
  const size_t stride = (cols + kBlock - 1) / kBlock * kBlock;

  auto frame = FftwAlloc<float>(params.n_fft);  // Zero outside the window.
  auto spectrum = FftwAlloc<float>(spectrum_floats);
  if (frame == nullptr || spectrum == nullptr) {
    return absl::ResourceExhaustedError("features: out of memory for FFT");
  }
  // Scratch that is written before it is read, so left uninitialised.
  const size_t mel_size = n_mels * stride;
  const size_t block_size = kBlock * static_cast<size_t>(n_bins_used);
  const size_t rows_size = kBlock * static_cast<size_t>(n_bins);
  std::unique_ptr<float[]> mel(new float[mel_size]);
  std::unique_ptr<float[]> rows(new float[rows_size]);  // [frame][bin]
  std::unique_ptr<float[]> block(new float[block_size]);
  std::unique_ptr<float[]> scratch(new float[3 * params.n_fft / 2]);

  const FrameLayout layout = Layout(n);
  Float4 max4[kBlock / 4] = {};
  for (int t0 = 0; t0 < cols; t0 += kBlock) {
    const int frames = std::min(kBlock, cols - t0);
    for (int b = 0; b < frames; ++b) {
      FillFrame(samples.data(), layout, t0 + b, frame.get());
      float* power = rows.get() + static_cast<size_t>(b) * n_bins;
      if (half_complex) {
        fftwf_execute_dft(plan, reinterpret_cast<fftwf_complex*>(frame.get()),
                          reinterpret_cast<fftwf_complex*>(spectrum.get()));
        HalfSpectrumPower(spectrum.get(), params.n_fft / 2, cos_tw.data(),
                          sin_tw.data(), scratch.get(), power);
      } else {
        fftwf_execute_dft_r2c(plan, frame.get(),
                              reinterpret_cast<fftwf_complex*>(spectrum.get()));
        ComplexPower(spectrum.get(), n_bins, power);
      }
    }
    // Frames past the end (last block only) are silent.
    std::fill(rows.get() + static_cast<size_t>(frames) * n_bins,
              rows.get() + rows_size, 0.0f);
    TransposeBlock(rows.get() + first_bin, n_bins, n_bins_used, block.get());
    ApplyMelBlock(filters, first_bin, block.get(), stride, mel.get() + t0,
                  max4);
  }
  float max_power = 0.0f;
  for (const Float4& v : max4) {
    for (int i = 0; i < 4; ++i) max_power = std::max(max_power, v[i]);
  }

  // librosa.power_to_db, with ref and top_db over the whole matrix.
  const float amin = static_cast<float>(params.amin);
  const float max_db = FastDb(std::max(amin, max_power));
  const float ref_db = params.db_ref == DbRef::kMax ? max_db : 0.0f;
  const float floor_db =
      params.top_db.has_value()
          ? max_db - ref_db - static_cast<float>(*params.top_db)
          : -INFINITY;

  out->rows = params.num_features();
  out->cols = cols;
  out->data.resize(static_cast<size_t>(out->rows) * cols);
  if (params.kind == FeatureKind::kLogMel) {
    for (int m = 0; m < n_mels; ++m) {
      PowerToDb(mel.get() + m * stride, cols, amin, ref_db, floor_db,
                out->data.data() + static_cast<size_t>(m) * cols);
    }
    return absl::OkStatus();
  }
  PowerToDb(mel.get(), mel_size, amin, ref_db, floor_db, mel.get());
  std::vector<double> mean(cols);
  CenterColumns(mel.get(), n_mels, cols, stride, mean.data());
  const double c0_scale = std::sqrt(static_cast<double>(n_mels));
  for (int t = 0; t < cols; ++t) {
    out->data[t] = static_cast<float>(c0_scale * mean[t]);
  }
  FoldMirrorRows(mel.get(), n_mels, cols, stride);
  const int n_even = (n_mels + 1) / 2, n_odd = n_mels / 2;
  const size_t two_rows = 2 * static_cast<size_t>(cols);
  if (const int rows = (params.n_mfcc - 1) / 2; rows > 0) {  // k = 2, 4, ...
    ApplyDct(dct_even.data(), rows, n_even, mel.get(), stride, cols,
             out->data.data() + two_rows, two_rows);
  }
  if (const int rows = params.n_mfcc / 2; rows > 0) {  // k = 1, 3, ...
    ApplyDct(dct_odd.data(), rows, n_odd,
             mel.get() + (n_mels - n_odd) * stride, stride, cols,
             out->data.data() + cols, two_rows);
  }
  return absl::OkStatus();
}

FeatureExtractor::FeatureExtractor(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

FeatureExtractor::~FeatureExtractor() = default;

absl::StatusOr<std::unique_ptr<FeatureExtractor>> FeatureExtractor::Create(
    const FeatureParams& params, int sample_rate) {
  // Re-validate: callers may build FeatureParams by hand.
  if (absl::StatusOr<FeatureParams> checked =
          FeatureParamsFromJson(FeatureParamsToJson(params));
      !checked.ok()) {
    return checked.status();
  }
  if (sample_rate <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "features: sample rate must be positive, got ", sample_rate));
  }
  if (params.sample_rate.has_value() && *params.sample_rate != sample_rate) {
    return absl::InvalidArgumentError(absl::StrCat(
        "features: the params are defined at ", *params.sample_rate,
        " Hz but the audio is at ", sample_rate, " Hz; resample it first"));
  }
  const double nyquist = sample_rate / 2.0;
  const double fmax = params.fmax.value_or(nyquist);
  if (fmax > nyquist) {
    return absl::InvalidArgumentError(
        absl::StrCat("features: fmax=", fmax,
                     " is above the Nyquist frequency ", nyquist, " Hz"));
  }
  if (params.fmin >= fmax) {
    return absl::InvalidArgumentError(absl::StrCat(
        "features: fmin=", params.fmin, " must be below fmax=", fmax, " Hz"));
  }
  auto impl = std::make_unique<Impl>();
  impl->params = params;
  impl->sample_rate = sample_rate;
  if (absl::Status s = impl->Init(); !s.ok()) return s;
  return std::unique_ptr<FeatureExtractor>(
      new FeatureExtractor(std::move(impl)));
}

absl::StatusOr<FeatureMatrix> FeatureExtractor::Compute(
    absl::Span<const float> samples) const {
  FeatureMatrix out;
  if (absl::Status s = impl_->Compute(samples, &out); !s.ok()) return s;
  return out;
}

absl::Status FeatureExtractor::Compute(absl::Span<const float> samples,
                                       FeatureMatrix* out) const {
  return impl_->Compute(samples, out);
}

const FeatureParams& FeatureExtractor::params() const { return impl_->params; }
int FeatureExtractor::sample_rate() const { return impl_->sample_rate; }
int FeatureExtractor::num_features() const {
  return impl_->params.num_features();
}

}  // namespace emoserve
