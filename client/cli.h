// The `emoserve` command line: commands, their options and the parser.
#ifndef EMOSERVE_CLIENT_CLI_H_
#define EMOSERVE_CLIENT_CLI_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "client/connection.h"
#include "core/audio.h"

namespace emoserve::client {

// --model NAME[:VERSION]: which of the server's models answers; an empty
// name is the server's default model, version 0 its highest ready one.
struct ModelSelector {
  std::string name;
  int64_t version = 0;
};

// "NAME" or "NAME:VERSION" (VERSION a positive integer); nullopt otherwise.
std::optional<ModelSelector> ParseModelSelector(const std::string& text);

// kText is the readable default (a table for `classify`).
enum class OutputFormat { kText, kJson, kCsv };

struct ClassifyCommandOptions {
  std::vector<std::string> files;
  int concurrency = 4;
  OutputFormat output = OutputFormat::kText;
  bool timeline = false;
  double hop_seconds = 0;  // 0: the server's default
  ModelSelector model;
  std::string speaker_file;  // --speaker: the files are one voice, in order
};

struct StreamCommandOptions {
  std::string input;  // a file decoded locally, or "-" for raw PCM on stdin
  int rate = 16000;
  PcmEncoding format = PcmEncoding::kS16LE;  // raw PCM on stdin
  int channels = 1;
  double chunk_ms = 100;
  bool fast = false;  // send as fast as the server takes it, not real time
  bool interim = true;
  double hop_seconds = 0;
  std::optional<double> vad_threshold_dbfs;  // unset: the server's default
  bool vad_disabled = false;
  ModelSelector model;
  OutputFormat output = OutputFormat::kText;
  std::string speaker_file;  // --speaker
};

struct InfoCommandOptions {
  ModelSelector model;
  OutputFormat output = OutputFormat::kText;
};

struct ModelsCommandOptions {
  OutputFormat output = OutputFormat::kText;
};

struct HealthCommandOptions {
  std::string service;  // "" = the whole server
  bool quiet = false;
};

struct BenchCommandOptions {
  std::vector<std::string> files;
  int concurrency = 8;      // closed loop: calls kept in flight
  double rps = 0;           // > 0: open loop at this rate
  int streams = 0;          // > 0: this many real-time streams instead
  double duration_seconds = 10;
  double warmup_seconds = 2;
  double chunk_ms = 100;    // streams
  bool timeline = false;    // unary: ask for per-window results
  int max_in_flight = 10000;  // open loop: sends beyond this are dropped
  double progress_seconds = 0;  // 0: every second on a TTY, else every 5 s
  ModelSelector model;
  OutputFormat output = OutputFormat::kText;
};

enum class Command { kClassify, kStream, kInfo, kModels, kHealth, kBench };

struct CliOptions {
  Command command = Command::kHealth;
  ConnectionOptions connection;
  ClassifyCommandOptions classify;
  StreamCommandOptions stream;
  InfoCommandOptions info;
  ModelsCommandOptions models;
  HealthCommandOptions health;
  BenchCommandOptions bench;
};

// What the parser decided: run `options`, or print a text (help, version,
// a usage error) and exit with `exit_code`.
struct ParsedCommandLine {
  std::optional<CliOptions> options;
  int exit_code = 0;
  std::string out;  // for stdout (help, version)
  std::string err;  // for stderr (usage errors)
};

// Exit statuses.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // a call or file failed, not serving
inline constexpr int kExitUsage = 2;    // bad command line

// Parses argv (argv[0] is the program). Reads EMOSERVE_SERVER from the
// environment as the default for --server.
ParsedCommandLine ParseCommandLine(const std::vector<std::string>& args);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_CLI_H_
