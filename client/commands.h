// The CLI's commands. Each returns the process exit status (kExitOk, ...)
// and reports failures as single lines on stderr.
#ifndef EMOSERVE_CLIENT_COMMANDS_H_
#define EMOSERVE_CLIENT_COMMANDS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/cli.h"
#include "client/connection.h"
#include "emoserve/v1/emoserve.grpc.pb.h"

namespace emoserve::client {

// Per-call deadlines when --timeout is not given.
inline constexpr double kDefaultCallTimeoutSeconds = 30;
inline constexpr double kDefaultHealthTimeoutSeconds = 2;

int RunClassify(const ConnectionOptions& connection,
                const ClassifyCommandOptions& options);
int RunStream(const ConnectionOptions& connection,
              const StreamCommandOptions& options);
int RunInfo(const ConnectionOptions& connection,
            const InfoCommandOptions& options);
int RunModels(const ConnectionOptions& connection,
              const ModelsCommandOptions& options);
int RunHealth(const ConnectionOptions& connection,
              const HealthCommandOptions& options);
int RunBench(const ConnectionOptions& connection,
             const BenchCommandOptions& options);

// Prints "emoserve: <line>" on stderr.
void PrintError(absl::string_view line);

// GetModelInfo of --model (the default model when none is given).
v1::GetModelInfoRequest ModelInfoRequest(const ModelSelector& model);

// A stub on a new channel to connection.server.
absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> MakeStub(
    const ConnectionOptions& connection);

}  // namespace emoserve::client

#endif  // EMOSERVE_CLIENT_COMMANDS_H_
