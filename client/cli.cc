#include "client/cli.h"

#include <map>
#include <sstream>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace emoserve::client {
namespace {

constexpr char kVersion[] = "emoserve 0.1.0";

constexpr char kDescription[] =
    "emoserve: tells which emotion a voice carries, with an emoserve "
    "server.\n"
    "Examples:\n"
    "  emoserve classify a.wav b.flac --output json\n"
    "  emoserve stream speech.wav\n"
    "  arecord -q -f S16_LE -r 16000 -c 1 -t raw | emoserve stream - "
    "--rate 16000\n"
    "  emoserve bench --rps 200 --duration 30 clips/*.flac\n"
    "  emoserve health   # exit status 0 only when SERVING";

constexpr char kTableFormats[] = "table|json|csv";
constexpr char kTextFormats[] = "text|json";

// A value CliOptions holds as std::optional, set only when its option is
// given: CLI11 parses into `value`, CopyIfGiven moves it over afterwards.
struct GivenDouble {
  CLI::Option* option = nullptr;
  double value = 0;
};

// The stream options whose presence the steps after parsing check.
struct StreamGiven {
  GivenDouble vad_threshold;
  std::vector<const CLI::Option*> raw_pcm;  // --rate, --format, --channels
};

// What the steps after parsing read besides CliOptions: which sub-command
// ran, and the options whose presence matters, not only their value.
struct Declarations {
  GivenDouble timeout;
  CLI::App* classify = nullptr;
  CLI::App* stream = nullptr;
  CLI::App* info = nullptr;
  CLI::App* models = nullptr;
  CLI::App* health = nullptr;
  StreamGiven stream_given;
};

// --output for a command that knows the formats in `names`; the first of
// `choices` ("table|json|csv") is the default.
void AddOutputOption(CLI::App* command, const std::string& choices,
                     OutputFormat* output) {
  static const std::map<std::string, OutputFormat> kNames = {
      {"table", OutputFormat::kText},
      {"text", OutputFormat::kText},
      {"json", OutputFormat::kJson},
      {"csv", OutputFormat::kCsv}};
  std::map<std::string, OutputFormat> names;
  for (absl::string_view choice : absl::StrSplit(choices, '|')) {
    names.emplace(std::string(choice), kNames.at(std::string(choice)));
  }
  command->add_option("-o,--output", *output, "Output format")
      ->transform(
          CLI::CheckedTransformer(names, CLI::ignore_case).description(""))
      ->type_name(choices)
      ->default_str(choices.substr(0, choices.find('|')));
}

// Options that several sub-commands have, each declared once so that it
// reads the same in every sub-command's --help.

// The required FILE positional: one path (stream) or several.
template <typename Files>
void AddFileArgument(CLI::App* command, const std::string& description,
                     Files* files) {
  command->add_option("FILE", *files, description)->required();
}

CLI::Option* AddConcurrencyOption(CLI::App* command,
                                  const std::string& description, int most,
                                  int* concurrency) {
  return command->add_option("-j,--concurrency", *concurrency, description)
      ->check(CLI::Range(1, most))
      ->capture_default_str();
}

void AddHopOption(CLI::App* command, double* hop_seconds) {
  command
      ->add_option("--hop", *hop_seconds,
                   "Seconds between windows (0: the server's default)")
      ->check(CLI::NonNegativeNumber);
}

void AddChunkMsOption(CLI::App* command, const std::string& description,
                      double* chunk_ms) {
  command->add_option("--chunk-ms", *chunk_ms, description)
      ->check(CLI::Range(1.0, 10000.0))
      ->capture_default_str();
}

// --model NAME[:VERSION], checked as it is parsed.
void AddModelOption(CLI::App* command, ModelSelector* model) {
  command
      ->add_option_function<std::string>(
          "-m,--model",
          [model](const std::string& text) { *model = *ParseModelSelector(text); },
          "The server's model to use, and optionally its version (default: the "
          "server's default model, its highest ready version); see `emoserve models`")
      ->type_name("NAME[:VERSION]")
      ->envname("EMOSERVE_MODEL")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            return ParseModelSelector(text).has_value()
                       ? ""
                       : "expected NAME or NAME:VERSION (VERSION a positive integer)";
          },
          "NAME[:VERSION]"));
}

// Options of the top-level command, shared by every sub-command: where the
// server is, how long a call may take, TLS.
void AddConnectionOptions(CLI::App* app, ConnectionOptions* connection,
                          GivenDouble* timeout) {
  app->add_option("-s,--server", connection->server,
                  "Server address host:port")
      ->envname("EMOSERVE_SERVER")
      ->capture_default_str();
  timeout->option =
      app->add_option("-t,--timeout", timeout->value,
                      "Per-call deadline in seconds (default: 30 for "
                      "classify/info/bench calls, 2 for health, none for "
                      "streams; 0 = none)")
          ->check(CLI::NonNegativeNumber);
  app->add_flag("--tls", connection->tls, "Connect over TLS");
  app->add_option("--ca", connection->ca_path,
                  "PEM root certificates to trust (implies --tls)");
  app->add_option("--cert", connection->cert_path,
                  "PEM client certificate for mutual TLS (implies --tls)");
  app->add_option("--key", connection->key_path,
                  "PEM client private key for mutual TLS (implies --tls)");
}

// Speaker adaptation (models that adapt; see `emoserve info`): the voice's
// statistics kept in a file between calls.
void AddSpeakerOption(CLI::App* command, const std::string& description,
                      std::string* path) {
  command->add_option("--speaker", *path, description)->type_name("FILE");
}

CLI::App* AddClassifyCommand(CLI::App* app, ClassifyCommandOptions* classify) {
  CLI::App* command = app->add_subcommand(
      "classify",
      "Classify audio files (WAV, FLAC, OGG, MP3: the server decodes them)");
  AddFileArgument(command, "Audio files", &classify->files);
  AddConcurrencyOption(command, "Files classified in parallel", 1024,
                       &classify->concurrency);
  AddOutputOption(command, kTableFormats, &classify->output);
  command->add_flag("--timeline", classify->timeline,
                    "Also print each window's result (long audio)");
  AddHopOption(command, &classify->hop_seconds);
  AddModelOption(command, &classify->model);
  AddSpeakerOption(command,
                   "The files are one voice: classified in order, each adapted to this "
                   "file's statistics, which are updated with what each adds",
                   &classify->speaker_file);
  return command;
}

// The format of raw PCM on stdin; `given` gets the options, which the steps
// after parsing refuse with a file.
void AddRawPcmOptions(CLI::App* command, StreamCommandOptions* stream,
                      std::vector<const CLI::Option*>* given) {
  given->push_back(
      command->add_option("-r,--rate", stream->rate, "stdin: sample rate in Hz")
          ->check(CLI::Range(8000, 192000))
          ->capture_default_str());
  given->push_back(
      command->add_option("-f,--format", stream->format, "stdin: sample format")
          ->transform(CLI::CheckedTransformer(
                          std::map<std::string, PcmEncoding>{
                              {"s16le", PcmEncoding::kS16LE},
                              {"f32le", PcmEncoding::kF32LE}},
                          CLI::ignore_case)
                          .description(""))
          ->type_name("s16le|f32le")
          ->default_str("s16le"));
  given->push_back(
      command
          ->add_option("-c,--channels", stream->channels,
                       "stdin: interleaved channels (mixed to mono)")
          ->check(CLI::Range(1, 64))
          ->capture_default_str());
}

CLI::App* AddStreamCommand(CLI::App* app, StreamCommandOptions* stream,
                           StreamGiven* given) {
  CLI::App* command = app->add_subcommand(
      "stream",
      "Stream audio live: a file (decoded here) or raw PCM on stdin (\"-\")");
  AddFileArgument(command, "Audio file, or - for stdin", &stream->input);
  AddRawPcmOptions(command, stream, &given->raw_pcm);
  AddChunkMsOption(command, "Milliseconds of audio per message",
                   &stream->chunk_ms);
  command->add_flag("--fast", stream->fast,
                    "Send as fast as possible instead of real time");
  command->add_flag("--interim,!--no-interim", stream->interim,
                    "Print every window's result as it comes "
                    "(default) or only speech events and finals");
  AddHopOption(command, &stream->hop_seconds);
  GivenDouble& vad_threshold = given->vad_threshold;
  vad_threshold.option =
      command
          ->add_option("--vad-threshold", vad_threshold.value,
                       "Voice-activity threshold in dBFS (e.g. -45; default: "
                       "the server's)")
          ->check(CLI::Range(-200.0, 0.0));
  command
      ->add_flag("--no-vad", stream->vad_disabled,
                 "Classify every window, silence included")
      ->excludes(vad_threshold.option);
  AddModelOption(command, &stream->model);
  AddSpeakerOption(command,
                   "Start from this file's statistics of the voice and keep the "
                   "stream's in it after each utterance",
                   &stream->speaker_file);
  AddOutputOption(command, kTextFormats, &stream->output);
  return command;
}

CLI::App* AddInfoCommand(CLI::App* app, InfoCommandOptions* info) {
  CLI::App* command = app->add_subcommand("info", "Describe a served model (the default one unless --model)");
  AddModelOption(command, &info->model);
  AddOutputOption(command, kTextFormats, &info->output);
  return command;
}

CLI::App* AddModelsCommand(CLI::App* app, ModelsCommandOptions* models) {
  CLI::App* command = app->add_subcommand(
      "models", "List the server's models, their versions and the state of each");
  AddOutputOption(command, kTextFormats, &models->output);
  return command;
}

CLI::App* AddHealthCommand(CLI::App* app, HealthCommandOptions* health) {
  CLI::App* command = app->add_subcommand(
      "health",
      "Check the server's health (exit status 0 only when SERVING); fit for "
      "a container health check");
  command->add_option("--service", health->service,
                      "Service name to check (default: the server)");
  command->add_flag("-q,--quiet", health->quiet,
                    "Print nothing; the exit status tells");
  return command;
}

// Closed loop, open loop or streams: one of them, so they exclude each other.
void AddBenchLoadOptions(CLI::App* command, BenchCommandOptions* bench) {
  CLI::Option* concurrency =
      AddConcurrencyOption(command, "Closed loop: calls kept in flight",
                           100000, &bench->concurrency);
  CLI::Option* rps =
      command
          ->add_option("--rps", bench->rps,
                       "Open loop: requests per second, sent on schedule "
                       "whatever the server's pace")
          ->check(CLI::PositiveNumber)
          ->excludes(concurrency);
  command
      ->add_option("--streams", bench->streams,
                   "Real-time streams kept open (each file streamed at its "
                   "own pace, then the next)")
      ->check(CLI::Range(1, 100000))
      ->excludes(concurrency)
      ->excludes(rps);
}

void AddBenchCommand(CLI::App* app, BenchCommandOptions* bench) {
  CLI::App* command = app->add_subcommand(
      "bench",
      "Load-test the server with audio files: closed loop (--concurrency), "
      "open loop (--rps) or real-time streams (--streams)");
  AddFileArgument(command, "Audio files to send", &bench->files);
  AddBenchLoadOptions(command, bench);
  command
      ->add_option("-d,--duration", bench->duration_seconds,
                   "Seconds measured")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command
      ->add_option("--warmup", bench->warmup_seconds,
                   "Seconds of load before measuring")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  AddChunkMsOption(command, "Streams: milliseconds of audio per message",
                   &bench->chunk_ms);
  AddModelOption(command, &bench->model);
  command->add_flag("--timeline", bench->timeline,
                    "Unary: ask for per-window results too");
  command
      ->add_option("--max-in-flight", bench->max_in_flight,
                   "Open loop: sends due while this many calls are in flight "
                   "are dropped (and counted)")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  command
      ->add_option("--progress-every", bench->progress_seconds,
                   "Seconds between progress lines (default: 1 on a "
                   "terminal, 5 otherwise)")
      ->check(CLI::NonNegativeNumber);
  AddOutputOption(command, kTextFormats, &bench->output);
}

// Runs CLI11 on `args`. False when that ends the command line: help and
// --version (exit status 0) or a usage error, with the text in `parsed`.
bool RunParser(CLI::App* app, const std::vector<std::string>& args,
               ParsedCommandLine* parsed) {
  std::vector<const char*> argv;
  argv.reserve(args.size());
  for (const std::string& arg : args) argv.push_back(arg.c_str());
  std::ostringstream out;
  std::ostringstream err;
  try {
    app->parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError& e) {
    // Help and --version are "errors" with exit code 0.
    const int code = app->exit(e, out, err);
    parsed->exit_code = code == 0 ? kExitOk : kExitUsage;
    parsed->out = out.str();
    parsed->err = err.str();
    return false;
  }
  return true;
}

ParsedCommandLine UsageError(const std::string& message) {
  ParsedCommandLine parsed;
  parsed.exit_code = kExitUsage;
  parsed.err =
      "emoserve: " + message + "\nRun with --help for more information.\n";
  return parsed;
}

void CopyIfGiven(const GivenDouble& given, std::optional<double>* target) {
  if (given.option->count() > 0) *target = given.value;
}

// The sub-command that ran; require_subcommand(1) makes it exactly one.
Command ParsedCommand(const Declarations& declared) {
  if (declared.classify->parsed()) return Command::kClassify;
  if (declared.stream->parsed()) return Command::kStream;
  if (declared.info->parsed()) return Command::kInfo;
  if (declared.models->parsed()) return Command::kModels;
  if (declared.health->parsed()) return Command::kHealth;
  return Command::kBench;
}

// A file's own header gives its format, so the raw PCM options go only with
// stdin. Empty when the input and its options agree.
std::string CheckStreamInput(const StreamCommandOptions& stream,
                             const StreamGiven& given) {
  if (stream.input == "-") return "";
  for (const CLI::Option* option : given.raw_pcm) {
    if (option->count() > 0) {
      return "--rate, --format and --channels describe raw PCM on stdin "
             "(FILE \"-\"); a file's own header gives its format";
    }
  }
  return "";
}

}  // namespace

std::optional<ModelSelector> ParseModelSelector(const std::string& text) {
  ModelSelector selector;
  const size_t colon = text.rfind(':');
  selector.name = text.substr(0, colon);
  if (selector.name.empty()) return std::nullopt;
  if (colon != std::string::npos) {
    const std::string version = text.substr(colon + 1);
    if (version.empty() || version[0] == '0' ||
        version.find_first_not_of("0123456789") != std::string::npos ||
        !absl::SimpleAtoi(version, &selector.version)) {
      return std::nullopt;
    }
  }
  return selector;
}

ParsedCommandLine ParseCommandLine(const std::vector<std::string>& args) {
  CliOptions options;
  CLI::App app(kDescription, "emoserve");
  app.set_version_flag("--version", kVersion);
  app.fallthrough();
  Declarations declared;
  AddConnectionOptions(&app, &options.connection, &declared.timeout);
  declared.classify = AddClassifyCommand(&app, &options.classify);
  declared.stream =
      AddStreamCommand(&app, &options.stream, &declared.stream_given);
  declared.info = AddInfoCommand(&app, &options.info);
  declared.models = AddModelsCommand(&app, &options.models);
  declared.health = AddHealthCommand(&app, &options.health);
  AddBenchCommand(&app, &options.bench);
  app.require_subcommand(1);

  ParsedCommandLine parsed;
  if (!RunParser(&app, args, &parsed)) return parsed;
  CopyIfGiven(declared.timeout, &options.connection.timeout_seconds);
  options.command = ParsedCommand(declared);
  if (options.command == Command::kStream) {
    CopyIfGiven(declared.stream_given.vad_threshold,
                &options.stream.vad_threshold_dbfs);
    const std::string error =
        CheckStreamInput(options.stream, declared.stream_given);
    if (!error.empty()) return UsageError(error);
  }
  parsed.options = std::move(options);
  return parsed;
}

}  // namespace emoserve::client
