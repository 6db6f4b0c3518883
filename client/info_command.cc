// `emoserve info` and `emoserve health`, and what all commands share.
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/commands.h"
#include "client/format.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace emoserve::client {

void PrintError(absl::string_view line) {
  const std::string text = absl::StrCat("emoserve: ", line, "\n");
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
}

absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> MakeStub(
    const ConnectionOptions& connection) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      MakeChannel(connection);
  if (!channel.ok()) return channel.status();
  return v1::EmotionService::NewStub(*channel);
}

namespace {

// One unary call on the service, printing its formatted response (or the
// error): what `info` and `models` share.
template <typename Response, typename Call, typename Format>
int CallAndPrint(const ConnectionOptions& connection, Call call, Format format) {
  absl::StatusOr<std::unique_ptr<v1::EmotionService::Stub>> stub =
      MakeStub(connection);
  if (!stub.ok()) {
    PrintError(stub.status().message());
    return kExitFailure;
  }
  grpc::ClientContext context;
  SetCallDeadline(connection, kDefaultCallTimeoutSeconds, &context);
  Response response;
  const grpc::Status status = call(**stub, &context, &response);
  if (!status.ok()) {
    PrintError(DescribeRpcError(status, connection));
    return kExitFailure;
  }
  const std::string out = format(response);
  std::fwrite(out.data(), 1, out.size(), stdout);
  return kExitOk;
}

}  // namespace

int RunInfo(const ConnectionOptions& connection,
            const InfoCommandOptions& options) {
  return CallAndPrint<v1::ModelInfo>(
      connection,
      [&](v1::EmotionService::Stub& stub, grpc::ClientContext* context, v1::ModelInfo* info) {
        return stub.GetModelInfo(context, ModelInfoRequest(options.model), info);
      },
      [&](const v1::ModelInfo& info) {
        return FormatModelInfo(info, options.output == OutputFormat::kJson);
      });
}

v1::GetModelInfoRequest ModelInfoRequest(const ModelSelector& model) {
  v1::GetModelInfoRequest request;
  request.set_model_name(model.name);
  request.set_model_version(model.version);
  return request;
}

int RunModels(const ConnectionOptions& connection,
              const ModelsCommandOptions& options) {
  return CallAndPrint<v1::ListModelsResponse>(
      connection,
      [](v1::EmotionService::Stub& stub, grpc::ClientContext* context,
         v1::ListModelsResponse* models) {
        return stub.ListModels(context, v1::ListModelsRequest(), models);
      },
      [&](const v1::ListModelsResponse& models) {
        return FormatModels(models, options.output == OutputFormat::kJson);
      });
}

int RunHealth(const ConnectionOptions& connection,
              const HealthCommandOptions& options) {
  using ::grpc::health::v1::Health;
  using ::grpc::health::v1::HealthCheckRequest;
  using ::grpc::health::v1::HealthCheckResponse;
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      MakeChannel(connection);
  if (!channel.ok()) {
    if (!options.quiet) PrintError(channel.status().message());
    return kExitFailure;
  }
  grpc::ClientContext context;
  SetCallDeadline(connection, kDefaultHealthTimeoutSeconds, &context);
  HealthCheckRequest request;
  request.set_service(options.service);
  HealthCheckResponse response;
  const grpc::Status status =
      Health::NewStub(*channel)->Check(&context, request, &response);
  if (!status.ok()) {
    if (!options.quiet) {
      PrintError(DescribeRpcError(status, connection));
    }
    return kExitFailure;
  }
  if (!options.quiet) {
    std::printf("%s\n",
                HealthCheckResponse::ServingStatus_Name(response.status())
                    .c_str());
  }
  return response.status() == HealthCheckResponse::SERVING ? kExitOk
                                                           : kExitFailure;
}

}  // namespace emoserve::client
