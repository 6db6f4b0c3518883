// emoserve: the command-line client of emoserve-server.
#include <cstdlib>
#include <cstdio>
#include <string>
#include <vector>

#include <grpc/support/log.h>

#include "client/cli.h"
#include "client/commands.h"

namespace {

// gRPC's own log lines (handshake failures, ...) would bury the one-line
// messages the commands print; GRPC_VERBOSITY brings them back.
void SilenceGrpcLog(gpr_log_func_args*) {}

}  // namespace

int main(int argc, char** argv) {
  using namespace emoserve::client;  // NOLINT: a program's entry point
  if (std::getenv("GRPC_VERBOSITY") == nullptr) {
    gpr_set_log_function(SilenceGrpcLog);
  }
  const ParsedCommandLine parsed =
      ParseCommandLine(std::vector<std::string>(argv, argv + argc));
  std::fputs(parsed.out.c_str(), stdout);
  std::fputs(parsed.err.c_str(), stderr);
  if (!parsed.options.has_value()) return parsed.exit_code;
  const CliOptions& options = *parsed.options;
  switch (options.command) {
    case Command::kClassify:
      return RunClassify(options.connection, options.classify);
    case Command::kStream:
      return RunStream(options.connection, options.stream);
    case Command::kInfo:
      return RunInfo(options.connection, options.info);
    case Command::kModels:
      return RunModels(options.connection, options.models);
    case Command::kHealth:
      return RunHealth(options.connection, options.health);
    case Command::kBench:
      return RunBench(options.connection, options.bench);
  }
  return kExitUsage;
}
