#include "train/architectures.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/json_numbers.h"

namespace emoserve {
namespace {

using torch::jit::Module;

// A 3x3 convolution, batch norm, ReLU, max-pool, dropout.
constexpr char kConvBlockSource[] = R"(
def forward(self, x):
    x = torch.conv2d(x, self.conv_weight, self.conv_bias, [1, 1], [1, 1])
    x = torch.batch_norm(x, self.bn_weight, self.bn_bias, self.bn_running_mean,
                         self.bn_running_var, self.training, 0.1, 1e-5, False)
    x = torch.relu(x)
    x = torch.max_pool2d(x, [self.pool, self.pool], [self.pool, self.pool])
    return torch.dropout(x, self.dropout, self.training)
)";

// torch.nn.TransformerEncoderLayer (post-norm, ReLU) on [B, S, D].
constexpr char kEncoderLayerSource[] = R"(
def forward(self, x):
    b = x.size(0)
    s = x.size(1)
    d = x.size(2)
    h = self.num_heads
    qkv = torch.linear(x, self.in_proj_weight, self.in_proj_bias)
    q, k, v = qkv.chunk(3, -1)
    q = q.reshape(b, s, h, d // h).transpose(1, 2)
    k = k.reshape(b, s, h, d // h).transpose(1, 2)
    v = v.reshape(b, s, h, d // h).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
    attention = torch.dropout(torch.softmax(scores, -1), self.dropout, self.training)
    attended = torch.matmul(attention, v).transpose(1, 2).reshape(b, s, d)
    attended = torch.linear(attended, self.out_proj_weight, self.out_proj_bias)
    x = torch.layer_norm(x + torch.dropout(attended, self.dropout, self.training),
                         [d], self.norm1_weight, self.norm1_bias, 1e-5, False)
    hidden = torch.relu(torch.linear(x, self.linear1_weight, self.linear1_bias))
    hidden = torch.dropout(hidden, self.dropout, self.training)
    hidden = torch.linear(hidden, self.linear2_weight, self.linear2_bias)
    return torch.layer_norm(x + torch.dropout(hidden, self.dropout, self.training),
                            [d], self.norm2_weight, self.norm2_bias, 1e-5, False)
)";

// The CNN and Transformer branches; ENCODER_CALLS is replaced by the chain
// of encoder layers.
constexpr char kParallelBranchesSource[] = R"(x = self.branch_input(x)
    x = (x - self.feature_mean.view(1, 1, -1, 1)) / self.feature_std.view(1, 1, -1, 1)
    if self.window_mean_normalization:
        x = x - x.mean(3, True)
    conv = self.conv2.forward(self.conv1.forward(self.conv0.forward(x)))
    if self.conv_global_pooling:
        cells = torch.flatten(conv, 2)
        conv = torch.cat([cells.mean(2), cells.amax(2)], 1)
    else:
        conv = torch.flatten(conv, 1)
    seq = torch.max_pool2d(x, [1, self.time_pool], [1, self.time_pool])
    seq = seq.squeeze(1).transpose(1, 2)
    ENCODER_CALLS
    parts.append(conv)
    parts.append(seq.mean(1)))";

// Utterance-level statistics of the raw input rows (summary, no weights;
// head: the trained part) over the frames within
// range_db of the loudest one (the rest is silence or zero padding):
// mean, standard deviation, RMS and mean magnitude of the delta (librosa's
// 5-frame regression, edges repeated), the share of such frames; batch
// norm, a hidden layer, ReLU, dropout. With statistics_cepstral, also the
// deviation and delta RMS of each frame's first DCT coefficients (their
// means are linear in the rows' means, so left out).
constexpr char kStatisticsSource[] = R"(
def forward(self, x):
    return self.head(self.summary(x))

def summary(self, x):
    x = x.squeeze(1)
    energy = x.amax(1)
    kept = (energy > energy.amax(1, True) - self.range_db).to(x.dtype).unsqueeze(1)
    count = kept.sum(2).clamp_min(1.0)
    mean, std, delta, delta_rms = self.moments(x, kept, count)
    delta_magnitude = (delta.abs() * kept).sum(2) / count
    share = kept.mean(2)
    s = torch.cat([mean, std, delta_rms, delta_magnitude, share], 1)
    CEPSTRAL_CALL
    PITCH_CALL
    return s

def head(self, s):
    s = torch.batch_norm(s, self.bn_weight, self.bn_bias, self.bn_running_mean,
                         self.bn_running_var, self.training, 0.1, 1e-5, False)
    hidden = torch.relu(torch.linear(s, self.hidden_weight, self.hidden_bias))
    return torch.dropout(hidden, self.dropout, self.training)

def moments(self, x, kept, count):
    mean = (x * kept).sum(2) / count
    centered = (x - mean.unsqueeze(2)) * kept
    std = torch.sqrt((centered * centered).sum(2) / count + 1e-5)
    delta = self.delta(x)
    delta_rms = torch.sqrt((delta * delta * kept).sum(2) / count + 1e-5)
    return mean, std, delta, delta_rms

def delta(self, x):
    first = x[:, :, :1]
    last = x[:, :, -1:]
    padded = torch.cat([first, first, x, last, last], 2)
    return (2.0 * (padded[:, :, 4:] - padded[:, :, :-4]) +
            (padded[:, :, 3:-1] - padded[:, :, 1:-3])) / 10.0
)";

// The pitch statistics (ArchitectureOptions::pitch_rows) of x [B, F, T]
// given each frame's loudest band: the periodicity spectrum of the low rows
// (mean removed, Hann-windowed DFT as matrices), normalised per frame; its
// mean and deviation over voiced frames; the log F0 at its peak, with its
// mean, deviation and delta RMS.
constexpr char kPitchSource[] = R"(
def pitch(self, x, energy):
    voiced = (energy > energy.amax(1, True) - self.pitch_range_db).to(x.dtype)
    low = x[:, 1:self.pitch_rows]
    low = low - low.mean(1, True)
    real = torch.matmul(self.pitch_cos, low)
    imaginary = torch.matmul(self.pitch_sin, low)
    spectrum = torch.sqrt(real * real + imaginary * imaginary + 1e-12)
    spectrum = spectrum / (spectrum.sum(1, True) + 1e-6)
    count = voiced.sum(1, True).clamp_min(1.0)
    weights = voiced.unsqueeze(1)
    mean = (spectrum * weights).sum(2) / count
    centered = (spectrum - mean.unsqueeze(2)) * weights
    std = torch.sqrt((centered * centered).sum(2) / count + 1e-8)
    f0 = self.pitch_log_hz[spectrum.argmax(1)]
    f0_mean = (f0 * voiced).sum(1, True) / count
    f0_centered = (f0 - f0_mean) * voiced
    f0_std = torch.sqrt((f0_centered * f0_centered).sum(1, True) / count + 1e-5)
    f0_delta = self.delta(f0.unsqueeze(1)).squeeze(1) * voiced
    f0_delta_rms = torch.sqrt((f0_delta * f0_delta).sum(1, True) / count + 1e-5)
    return torch.cat([mean, std, f0_mean, f0_std, f0_delta_rms], 1)
)";

// The pitch search: F0 from kPitchMinHz to kPitchMaxHz, read off a DFT of
// kPitchDftSize points over the low rows (zero-padded: finer F0 steps), on
// frames within kPitchRangeDb of the loudest (voiced speech, not breath).
constexpr double kPitchMinHz = 75.0;
constexpr double kPitchMaxHz = 450.0;
constexpr int kPitchDftSize = 256;
constexpr double kPitchRangeDb = 30.0;

// DFT bins k whose period (kPitchDftSize / k rows) is an F0 in the search
// range, for rows row_hz apart.
std::vector<int> PitchBins(double row_hz) {
  std::vector<int> bins;
  for (int k = 1; k <= kPitchDftSize / 2; ++k) {
    const double f0 = kPitchDftSize * row_hz / k;
    if (f0 >= kPitchMinHz && f0 <= kPitchMaxHz) bins.push_back(k);
  }
  return bins;
}

// The whole model. BRANCH_INPUT, PARALLEL_BRANCHES and STATISTICS_CALL are
// replaced by the code of the options' optional parts.
constexpr char kModelSource[] = R"(
def branch_input(self, x):
    BRANCH_INPUT

def embedding(self, x):
    raw = x
    parts: List[torch.Tensor] = []
    PARALLEL_BRANCHES
    STATISTICS_CALL
    return torch.cat(parts, 1)

def logits(self, x):
    return torch.linear(self.embedding(x), self.fc_weight, self.fc_bias)

def forward(self, x):
    return torch.softmax(self.logits(x), 1)
)";

// A statistics-only model's probabilities in two steps, so that an ensemble
// of such models computes the weight-free summary once for all
// (BuildEnsemble): forward(x) = from_summary(summary(x)), exactly.
// adapted(s, speaker_mean): the probabilities of the summary s moved by how
// its speaker's mean summary differs from the training speakers'
// (speaker_reference): speaker normalisation (TrainOptions).
constexpr char kSummarySource[] = R"(
def summary(self, x):
    return self.statistics.summary(x)

def summary_logits(self, s):
    return torch.linear(self.statistics.head(s), self.fc_weight, self.fc_bias)

def from_summary(self, s):
    return torch.softmax(self.summary_logits(s), 1)

def adapted(self, s, speaker_mean):
    return self.from_summary(s - speaker_mean + self.speaker_reference)
)";

// What a statistics-only model's summary() computes: members of an ensemble
// with the same key compute the same function of x. The "v1" changes with
// kStatisticsSource's summary.
std::string SummaryKey(const ArchitectureOptions& o) {
  return absl::StrCat("statistics summary v1: rows ", o.num_features, ", range ",
                      o.statistics_range_db, " dB, cepstral ", o.statistics_cepstral,
                      ", pitch rows ", o.pitch_rows, " at ", o.pitch_row_hz, " Hz");
}

// The orthonormal DCT-II rows 0..count-1 over `size` points (scipy's
// dct(type=2, norm="ortho"), as librosa's MFCC applies it to log-mel).
torch::Tensor OrthonormalDct(int count, int size) {
  torch::Tensor k = torch::arange(count, torch::kDouble).unsqueeze(1);
  torch::Tensor n = torch::arange(size, torch::kDouble).unsqueeze(0);
  torch::Tensor dct = torch::cos(M_PI * k * (2 * n + 1) / (2.0 * size)) * std::sqrt(2.0 / size);
  dct[0] /= std::sqrt(2.0);
  return dct.to(torch::kFloat);
}

// PyTorch's default for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
// for weight (kaiming_uniform with a=sqrt(5)) and bias.
torch::Tensor UniformFanIn(std::vector<int64_t> shape, int64_t fan_in) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  return torch::empty(shape).uniform_(-bound, bound);
}

torch::Tensor XavierUniform(int64_t rows, int64_t cols) {
  const double bound = std::sqrt(6.0 / static_cast<double>(rows + cols));
  return torch::empty({rows, cols}).uniform_(-bound, bound);
}

Module NewModule(const std::string& name,
                 const std::shared_ptr<torch::jit::CompilationUnit>& unit) {
  Module module(c10::QualifiedName(absl::StrCat("__torch__.emoserve.", name)),
                unit, /*shouldMangle=*/true);
  module.register_attribute("training", c10::BoolType::get(), true);
  return module;
}

Module ConvBlock(int index, int in_channels, int out_channels, int pool,
                 double dropout,
                 const std::shared_ptr<torch::jit::CompilationUnit>& unit) {
  Module block = NewModule(absl::StrCat("ConvBlock", index), unit);
  const int64_t fan_in = static_cast<int64_t>(in_channels) * 9;
  block.register_parameter(
      "conv_weight", UniformFanIn({out_channels, in_channels, 3, 3}, fan_in),
      false);
  block.register_parameter("conv_bias", UniformFanIn({out_channels}, fan_in),
                           false);
  block.register_parameter("bn_weight", torch::ones({out_channels}), false);
  block.register_parameter("bn_bias", torch::zeros({out_channels}), false);
  block.register_buffer("bn_running_mean", torch::zeros({out_channels}));
  block.register_buffer("bn_running_var", torch::ones({out_channels}));
  block.register_attribute("pool", c10::IntType::get(), pool);
  block.register_attribute("dropout", c10::FloatType::get(), dropout);
  block.define(kConvBlockSource);
  return block;
}

Module EncoderLayer(int index, int d_model, int heads, int feedforward,
                    double dropout,
                    const std::shared_ptr<torch::jit::CompilationUnit>& unit) {
  Module layer = NewModule(absl::StrCat("EncoderLayer", index), unit);
  layer.register_parameter("in_proj_weight", XavierUniform(3 * d_model, d_model),
                           false);
  layer.register_parameter("in_proj_bias", torch::zeros({3 * d_model}), false);
  layer.register_parameter("out_proj_weight",
                           UniformFanIn({d_model, d_model}, d_model), false);
  layer.register_parameter("out_proj_bias", torch::zeros({d_model}), false);
  layer.register_parameter("linear1_weight",
                           UniformFanIn({feedforward, d_model}, d_model), false);
  layer.register_parameter("linear1_bias", UniformFanIn({feedforward}, d_model),
                           false);
  layer.register_parameter("linear2_weight",
                           UniformFanIn({d_model, feedforward}, feedforward),
                           false);
  layer.register_parameter("linear2_bias", UniformFanIn({d_model}, feedforward),
                           false);
  layer.register_parameter("norm1_weight", torch::ones({d_model}), false);
  layer.register_parameter("norm1_bias", torch::zeros({d_model}), false);
  layer.register_parameter("norm2_weight", torch::ones({d_model}), false);
  layer.register_parameter("norm2_bias", torch::zeros({d_model}), false);
  layer.register_attribute("num_heads", c10::IntType::get(), heads);
  layer.register_attribute("scale", c10::FloatType::get(),
                           1.0 / std::sqrt(static_cast<double>(d_model / heads)));
  layer.register_attribute("dropout", c10::FloatType::get(), dropout);
  layer.define(kEncoderLayerSource);
  return layer;
}

Module StatisticsBlock(const ArchitectureOptions& o,
                       const std::shared_ptr<torch::jit::CompilationUnit>& unit) {
  Module block = NewModule("Statistics", unit);
  const int hidden = o.statistics_hidden;
  int64_t width = 4 * static_cast<int64_t>(o.num_features) + 1;
  std::string source = kStatisticsSource;
  std::string pitch_call;
  if (o.pitch_rows > 0) {
    const std::vector<int> bins = PitchBins(o.pitch_row_hz);
    const int64_t length = o.pitch_rows - 1;  // row 0 (from 0 Hz) is left out
    torch::Tensor k = torch::tensor(std::vector<int64_t>(bins.begin(), bins.end()), torch::kDouble)
                          .unsqueeze(1);
    torch::Tensor n = torch::arange(length, torch::kDouble).unsqueeze(0);
    torch::Tensor hann = 0.5 - 0.5 * torch::cos(2 * M_PI * n / (length - 1));
    torch::Tensor phase = 2 * M_PI * k * n / kPitchDftSize;
    block.register_buffer("pitch_cos", (hann * torch::cos(phase)).to(torch::kFloat));
    block.register_buffer("pitch_sin", (hann * torch::sin(phase)).to(torch::kFloat));
    block.register_buffer("pitch_log_hz",
                          torch::log(kPitchDftSize * o.pitch_row_hz / k.squeeze(1)).to(torch::kFloat));
    block.register_attribute("pitch_rows", c10::IntType::get(), o.pitch_rows);
    block.register_attribute("pitch_range_db", c10::FloatType::get(), kPitchRangeDb);
    width += 2 * static_cast<int64_t>(bins.size()) + 3;
    pitch_call = "s = torch.cat([s, self.pitch(x, energy)], 1)";
    source += kPitchSource;
  }
  std::string cepstral_call;
  if (o.statistics_cepstral > 0) {
    block.register_buffer("statistics_dct",
                          OrthonormalDct(o.statistics_cepstral, o.num_features));
    width += 2 * static_cast<int64_t>(o.statistics_cepstral);
    cepstral_call =
        "cepstra = self.moments(torch.matmul(self.statistics_dct, x), kept, count)\n"
        "    s = torch.cat([s, cepstra[1], cepstra[3]], 1)";
  }
  block.register_parameter("bn_weight", torch::ones({width}), false);
  block.register_parameter("bn_bias", torch::zeros({width}), false);
  block.register_buffer("bn_running_mean", torch::zeros({width}));
  block.register_buffer("bn_running_var", torch::ones({width}));
  block.register_parameter("hidden_weight", UniformFanIn({hidden, width}, width), false);
  block.register_parameter("hidden_bias", UniformFanIn({hidden}, width), false);
  block.register_attribute("range_db", c10::FloatType::get(), o.statistics_range_db);
  block.register_attribute("dropout", c10::FloatType::get(), o.statistics_dropout);
  block.define(absl::StrReplaceAll(
      source, {{"PITCH_CALL", pitch_call}, {"CEPSTRAL_CALL", cepstral_call}}));
  return block;
}

// Rows that the CNN and Transformer branches see.
int BranchRows(const ArchitectureOptions& o) {
  return o.cepstral_coefficients > 0 ? o.cepstral_coefficients : o.num_features;
}

absl::Status Validate(const ArchitectureOptions& o) {
  if (o.num_features <= 0 || o.num_frames <= 0 || o.num_classes < 2) {
    return absl::InvalidArgumentError(
        "architecture: num_features and num_frames must be positive and "
        "num_classes at least 2");
  }
  if (o.cepstral_coefficients < 0 || o.cepstral_coefficients > o.num_features) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture: cepstral_coefficients (", o.cepstral_coefficients,
        ") must be within [0, num_features = ", o.num_features, "]"));
  }
  if (o.statistics_hidden < 0 || !(o.statistics_range_db > 0) ||
      o.statistics_dropout < 0 || o.statistics_dropout >= 1) {
    return absl::InvalidArgumentError(
        "architecture: statistics_hidden must be >= 0, statistics_range_db > 0 and "
        "statistics_dropout in [0, 1)");
  }
  if (o.statistics_cepstral < 0 || o.statistics_cepstral > o.num_features ||
      (o.statistics_cepstral > 0 && o.statistics_hidden == 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture: statistics_cepstral (", o.statistics_cepstral, ") must be within [0, ",
        o.num_features, "] and needs the statistics branch (statistics_hidden > 0)"));
  }
  if (o.pitch_rows != 0) {
    if (o.statistics_hidden == 0) {
      return absl::InvalidArgumentError(
          "architecture: pitch statistics are part of the statistics branch "
          "(statistics_hidden > 0)");
    }
    if (o.pitch_rows < 8 || o.pitch_rows > o.num_features) {
      return absl::InvalidArgumentError(absl::StrCat(
          "architecture: pitch_rows (", o.pitch_rows, ") must be within [8, num_features = ",
          o.num_features, "]"));
    }
    if (!(o.pitch_row_hz > 0) || o.pitch_row_hz > kPitchMinHz / 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "architecture: pitch_row_hz (", o.pitch_row_hz, ") must be in (0, ", kPitchMinHz / 2,
          "]: two rows per harmonic at ", kPitchMinHz, " Hz (use more mel bands)"));
    }
  }
  if (!o.parallel_branches) {
    if (o.statistics_hidden == 0) {
      return absl::InvalidArgumentError(
          "architecture: without the parallel branches the statistics branch is needed "
          "(statistics_hidden > 0)");
    }
    return absl::OkStatus();  // the CNN's and Transformer's sizes do not apply
  }
  const int branch_rows = BranchRows(o);
  int rows = branch_rows;
  int cols = o.num_frames;
  for (int i = 0; i < 3; ++i) {
    if (o.conv_channels[i] <= 0 || o.conv_pool[i] <= 0) {
      return absl::InvalidArgumentError(
          "architecture: conv channels and pools must be positive");
    }
    rows /= o.conv_pool[i];
    cols /= o.conv_pool[i];
  }
  if (rows == 0 || cols == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture: a ", branch_rows, "x", o.num_frames,
        " input is too small for the CNN branch's pooling"));
  }
  if (o.time_pool <= 0 || o.num_frames / o.time_pool == 0) {
    return absl::InvalidArgumentError("architecture: bad time_pool");
  }
  if (o.transformer_layers <= 0 || o.transformer_heads <= 0 ||
      branch_rows % o.transformer_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture: d_model (", branch_rows,
        ") must be a multiple of transformer_heads (", o.transformer_heads,
        ") and layers must be positive"));
  }
  if (o.conv_dropout < 0 || o.conv_dropout >= 1 || o.transformer_dropout < 0 ||
      o.transformer_dropout >= 1) {
    return absl::InvalidArgumentError("architecture: dropout must be in [0, 1)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PitchRows> PitchRowsOf(const std::vector<double>& mel_frequencies) {
  PitchRows pitch;
  // Row m is centred at mel_frequencies[m + 1].
  for (size_t m = 1; m + 1 < mel_frequencies.size() && mel_frequencies[m] < 1000.0; ++m) {
    ++pitch.rows;
  }
  if (pitch.rows >= 2) pitch.row_hz = mel_frequencies[2] - mel_frequencies[1];
  if (pitch.rows < 8 || pitch.row_hz > kPitchMinHz / 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pitch statistics need at least 8 mel bands below 1 kHz at most ", kPitchMinHz / 2,
        " Hz apart; these features have ", pitch.rows, " bands ", pitch.row_hz,
        " Hz apart (use more mel bands, e.g. 128)"));
  }
  return pitch;
}

absl::StatusOr<ArchitectureOptions> ArchitectureOptionsFromJson(
    const nlohmann::json& json) {
  ArchitectureOptions o;
  if (!json.is_object()) {
    return absl::InvalidArgumentError("architecture must be a JSON object");
  }
  try {
    for (const auto& [key, value] : json.items()) {
      // Numbers through JsonToInt/JsonToDouble: get<int>() of 1e35 is
      // undefined behaviour.
      const std::string what = absl::StrCat("architecture: '", key, "'");
      absl::Status s;
      if (key == "num_features") s = JsonToInt(value, what, &o.num_features);
      else if (key == "num_frames") s = JsonToInt(value, what, &o.num_frames);
      else if (key == "num_classes") s = JsonToInt(value, what, &o.num_classes);
      else if (key == "conv_channels" || key == "conv_pool") {
        if (!value.is_array() || value.size() != 3) {
          return absl::InvalidArgumentError(
              absl::StrCat("architecture: ", key, " needs 3 values"));
        }
        int* target = key == "conv_channels" ? o.conv_channels : o.conv_pool;
        for (int i = 0; i < 3 && s.ok(); ++i) s = JsonToInt(value[i], what, &target[i]);
      } else if (key == "conv_dropout") s = JsonToDouble(value, what, &o.conv_dropout);
      else if (key == "time_pool") s = JsonToInt(value, what, &o.time_pool);
      else if (key == "transformer_layers") s = JsonToInt(value, what, &o.transformer_layers);
      else if (key == "transformer_heads") s = JsonToInt(value, what, &o.transformer_heads);
      else if (key == "transformer_feedforward") s = JsonToInt(value, what, &o.transformer_feedforward);
      else if (key == "transformer_dropout") s = JsonToDouble(value, what, &o.transformer_dropout);
      else if (key == "window_mean_normalization") o.window_mean_normalization = value.get<bool>();
      else if (key == "conv_global_pooling") o.conv_global_pooling = value.get<bool>();
      else if (key == "cepstral_coefficients") s = JsonToInt(value, what, &o.cepstral_coefficients);
      else if (key == "statistics_hidden") s = JsonToInt(value, what, &o.statistics_hidden);
      else if (key == "statistics_range_db") s = JsonToDouble(value, what, &o.statistics_range_db);
      else if (key == "statistics_dropout") s = JsonToDouble(value, what, &o.statistics_dropout);
      else if (key == "statistics_cepstral") s = JsonToInt(value, what, &o.statistics_cepstral);
      else if (key == "parallel_branches") o.parallel_branches = value.get<bool>();
      else if (key == "pitch_rows") s = JsonToInt(value, what, &o.pitch_rows);
      else if (key == "pitch_row_hz") s = JsonToDouble(value, what, &o.pitch_row_hz);
      else if (key == "name") continue;
      else return absl::InvalidArgumentError(absl::StrCat("architecture: unknown key '", key, "'"));
      if (!s.ok()) return s;
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("architecture: ", e.what()));
  }
  if (absl::Status s = Validate(o); !s.ok()) return s;
  return o;
}

nlohmann::json ArchitectureOptionsToJson(const ArchitectureOptions& o) {
  return {{"name", "parallel_cnn_transformer"},
          {"num_features", o.num_features},
          {"num_frames", o.num_frames},
          {"num_classes", o.num_classes},
          {"conv_channels", std::vector<int>(o.conv_channels, o.conv_channels + 3)},
          {"conv_pool", std::vector<int>(o.conv_pool, o.conv_pool + 3)},
          {"conv_dropout", o.conv_dropout},
          {"conv_global_pooling", o.conv_global_pooling},
          {"time_pool", o.time_pool},
          {"transformer_layers", o.transformer_layers},
          {"transformer_heads", o.transformer_heads},
          {"transformer_feedforward", o.transformer_feedforward},
          {"transformer_dropout", o.transformer_dropout},
          {"window_mean_normalization", o.window_mean_normalization},
          {"cepstral_coefficients", o.cepstral_coefficients},
          {"statistics_hidden", o.statistics_hidden},
          {"statistics_range_db", o.statistics_range_db},
          {"statistics_dropout", o.statistics_dropout},
          {"statistics_cepstral", o.statistics_cepstral},
          {"parallel_branches", o.parallel_branches},
          {"pitch_rows", o.pitch_rows},
          {"pitch_row_hz", o.pitch_row_hz}};
}

absl::StatusOr<torch::jit::Module> BuildArchitecture(const ArchitectureOptions& o) {
  if (absl::Status s = Validate(o); !s.ok()) return s;
  try {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    Module model = NewModule("ParallelCnnTransformer", unit);
    const int branch_rows = BranchRows(o);
    model.register_buffer("feature_mean", torch::zeros({branch_rows}));
    model.register_buffer("feature_std", torch::ones({branch_rows}));
    std::string branch_input = "return x";
    if (o.cepstral_coefficients > 0) {
      model.register_buffer("cepstral_dct",
                            OrthonormalDct(o.cepstral_coefficients, o.num_features));
      branch_input = "return torch.matmul(self.cepstral_dct, x)";
    }
    std::string statistics_call;
    if (o.statistics_hidden > 0) {
      model.register_module("statistics",
                            StatisticsBlock(o, unit));
      statistics_call = "parts.append(self.statistics.forward(raw))";
    }
    int64_t fc_in = o.statistics_hidden;
    std::string parallel_branches;
    if (o.parallel_branches) {
      int in_channels = 1;
      int rows = branch_rows;
      int cols = o.num_frames;
      for (int i = 0; i < 3; ++i) {
        model.register_module(absl::StrCat("conv", i),
                              ConvBlock(i, in_channels, o.conv_channels[i], o.conv_pool[i],
                                        o.conv_dropout, unit));
        in_channels = o.conv_channels[i];
        rows /= o.conv_pool[i];
        cols /= o.conv_pool[i];
      }
      std::string encoder_calls;
      for (int i = 0; i < o.transformer_layers; ++i) {
        model.register_module(absl::StrCat("encoder", i),
                              EncoderLayer(i, branch_rows, o.transformer_heads,
                                           o.transformer_feedforward, o.transformer_dropout,
                                           unit));
        absl::StrAppend(&encoder_calls, i == 0 ? "" : "\n    ", "seq = self.encoder", i,
                        ".forward(seq)");
      }
      parallel_branches =
          absl::StrReplaceAll(kParallelBranchesSource, {{"ENCODER_CALLS", encoder_calls}});
      const int64_t conv_width = o.conv_global_pooling
                                     ? 2 * static_cast<int64_t>(in_channels)
                                     : static_cast<int64_t>(in_channels) * rows * cols;
      fc_in += conv_width + branch_rows;
    }
    model.register_attribute("time_pool", c10::IntType::get(), o.time_pool);
    model.register_attribute("window_mean_normalization", c10::BoolType::get(),
                             o.window_mean_normalization);
    model.register_attribute("conv_global_pooling", c10::BoolType::get(),
                             o.conv_global_pooling);
    model.register_parameter("fc_weight",
                             UniformFanIn({o.num_classes, fc_in}, fc_in), false);
    model.register_parameter("fc_bias", UniformFanIn({o.num_classes}, fc_in),
                             false);
    model.define(absl::StrReplaceAll(kModelSource, {{"BRANCH_INPUT", branch_input},
                                                    {"PARALLEL_BRANCHES", parallel_branches},
                                                    {"STATISTICS_CALL", statistics_call}}));
    if (!o.parallel_branches) {
      model.register_attribute("summary_key", c10::StringType::get(), SummaryKey(o));
      model.register_buffer(
          "speaker_reference",
          torch::zeros_like(model.attr("statistics").toModule().attr("bn_running_mean").toTensor()));
      model.define(kSummarySource);
    }
    return model;
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("building the model failed: ", e.what()));
  }
}

absl::StatusOr<torch::jit::Module> BuildCepstralAdapter(torch::jit::Module member,
                                                        int coefficients, int rows) {
  if (coefficients <= 0 || coefficients > rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a cepstral adapter needs 1 to ", rows, " coefficients, not ", coefficients));
  }
  try {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    Module adapter = NewModule("CepstralAdapter", unit);
    adapter.register_module("member", member);
    adapter.register_buffer("cepstral_dct", OrthonormalDct(coefficients, rows));
    adapter.define(R"(
def forward(self, x):
    return self.member.forward(torch.matmul(self.cepstral_dct, x))

def logits(self, x):
    return self.member.logits(torch.matmul(self.cepstral_dct, x))
)");
    adapter.eval();
    return adapter;
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the cepstral adapter failed: ", e.what()));
  }
}

absl::StatusOr<torch::jit::Module> BuildEnsemble(
    std::vector<torch::jit::Module> members) {
  if (members.size() < 2) {
    return absl::InvalidArgumentError("an ensemble needs at least two members");
  }
  try {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    Module ensemble = NewModule("Ensemble", unit);
    // Statistics-only members with the same summary share its computation:
    // summary i is computed by the first member with that key.
    std::map<std::string, size_t> first_with_key;
    std::string summaries;  // lines computing the shared summaries
    std::string sum;        // lines adding up the members' probabilities
    for (size_t i = 0; i < members.size(); ++i) {
      ensemble.register_module(absl::StrCat("member", i), members[i]);
      absl::StrAppend(&sum, i == 0 ? "    p = " : "    p = p + ");
      const bool has_summary = members[i].hasattr("summary_key") &&
                               members[i].find_method("from_summary").has_value();
      if (!has_summary) {
        absl::StrAppend(&sum, "self.member", i, ".forward(x)\n");
        continue;
      }
      const auto [it, first] =
          first_with_key.emplace(members[i].attr("summary_key").toStringRef(), i);
      if (first) absl::StrAppend(&summaries, "    summary", i, " = self.member", i, ".summary(x)\n");
      absl::StrAppend(&sum, "self.member", i, ".from_summary(summary", it->second, ")\n");
    }
    std::string source = absl::StrCat("def forward(self, x):\n", summaries, sum);
    absl::StrAppend(&source, "    return p / ", members.size(),
                    "\n\ndef logits(self, x):\n    return torch.log(self.forward(x))\n");
    // Members that all share one summary and adapt to a speaker make an
    // ensemble that does (each member against its own reference).
    const bool adaptive =
        first_with_key.size() == 1 && first_with_key.begin()->second == 0 &&
        std::all_of(members.begin(), members.end(), [](const Module& m) {
          return m.hasattr("summary_key") && m.find_method("adapted").has_value();
        });
    if (adaptive) {
      ensemble.register_attribute("summary_key", c10::StringType::get(),
                                  members[0].attr("summary_key").toStringRef());
      absl::StrAppend(&source, "\ndef summary(self, x):\n    return self.member0.summary(x)\n");
      for (const char* method : {"from_summary(s)", "adapted(s, speaker_mean)"}) {
        absl::StrAppend(&source, "\ndef ", absl::StrReplaceAll(method, {{"(s", "(self, s"}}),
                        ":\n");
        for (size_t i = 0; i < members.size(); ++i) {
          absl::StrAppend(&source, i == 0 ? "    p = " : "    p = p + ", "self.member", i, ".",
                          method, "\n");
        }
        absl::StrAppend(&source, "    return p / ", members.size(), "\n");
      }
    }
    // Members loaded from different files hold distinct classes of one name
    // (each fold's __torch__.emoserve.Statistics); with such homonyms
    // TorchScript's alias analysis of the new methods grows exponentially
    // with the members (30: over 8 GB). Saving renames clashing classes
    // apart, so the ensemble is compiled from a save/load round trip.
    std::stringstream saved;
    ensemble.save(saved);
    ensemble = torch::jit::load(saved);
    ensemble.define(source);
    ensemble.eval();
    return ensemble;
  } catch (const std::exception& e) {
    return absl::InternalError(
        absl::StrCat("building the ensemble failed: ", e.what()));
  }
}

}  // namespace emoserve
