// TLS and mutual TLS, with certificates made by openssl at test time.
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/audio.h"
#include "tests/server_test_support.h"

namespace emoserve {
namespace {

using ::emoserve::testing::Connect;
using ::emoserve::testing::ScratchDir;
using ::emoserve::testing::StartServer;
using ::emoserve::testing::TestServerConfig;

// A CA, a server certificate for localhost/127.0.0.1 and a client
// certificate signed by it, and a client certificate from a stranger CA.
struct Certificates {
  std::string dir;
  std::string ca_cert() const { return dir + "/ca.pem"; }
  std::string server_cert() const { return dir + "/server.pem"; }
  std::string server_key() const { return dir + "/server.key"; }
  std::string client_cert() const { return dir + "/client.pem"; }
  std::string client_key() const { return dir + "/client.key"; }
  std::string stranger_cert() const { return dir + "/stranger.pem"; }
  std::string stranger_key() const { return dir + "/stranger.key"; }
};

absl::StatusOr<Certificates> MakeCertificates() {
  Certificates certs{ScratchDir() + "/tls"};
  const std::string d = certs.dir;
  const std::string script = absl::StrCat(
      "set -e; mkdir -p ", d, "; cd ", d, "\n",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=emoserve-test-ca "
      "-keyout ca.key -out ca.pem\n",
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > server.ext\n",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr\n",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
      "-extfile server.ext -out server.pem\n",
      "openssl req -newkey rsa:2048 -nodes -subj /CN=emoserve-test-client -keyout client.key "
      "-out client.csr\n",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
      "-out client.pem\n",
      "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=stranger "
      "-keyout stranger.key -out stranger.pem\n");
  const std::string script_path = d + ".sh";
  std::ofstream(script_path) << script;
  const std::string command = absl::StrCat("bash ", script_path, " > ", d, ".log 2>&1");
  if (std::system(command.c_str()) != 0) {
    std::ifstream log(d + ".log");
    std::stringstream text;
    text << log.rdbuf();
    return absl::InternalError(absl::StrCat(
        "openssl could not make the test certificates (is the openssl package installed?):\n",
        text.str()));
  }
  return certs;
}

std::string Read(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? *bytes : "";
}

std::shared_ptr<grpc::ChannelCredentials> TlsCredentials(const Certificates& certs,
                                                         const std::string& cert = "",
                                                         const std::string& key = "") {
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = Read(certs.ca_cert());
  if (!cert.empty()) {
    options.pem_cert_chain = Read(cert);
    options.pem_private_key = Read(key);
  }
  return grpc::SslCredentials(options);
}

// GetModelInfo's status over `channel`, given a few seconds (a refused
// handshake fails the call as UNAVAILABLE).
grpc::Status Probe(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = v1::EmotionService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
  v1::ModelInfo info;
  return stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
}

TEST(ServerTlsTest, ServesOverTlsAndRefusesPlaintext) {
  absl::StatusOr<Certificates> certs = MakeCertificates();
  ASSERT_TRUE(certs.ok()) << certs.status();
  ServerConfig config = TestServerConfig();
  config.tls_cert = certs->server_cert();
  config.tls_key = certs->server_key();
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();

  const grpc::Status tls = Probe(Connect(port, TlsCredentials(*certs)));
  EXPECT_TRUE(tls.ok()) << tls.error_message();
  const grpc::Status by_name = Probe(Connect(port, TlsCredentials(*certs), "localhost"));
  EXPECT_TRUE(by_name.ok()) << by_name.error_message();
  const grpc::Status plaintext = Probe(Connect(port));
  EXPECT_EQ(plaintext.error_code(), grpc::StatusCode::UNAVAILABLE);
  // A client that does not trust the server's CA refuses it.
  grpc::SslCredentialsOptions stranger_roots;
  stranger_roots.pem_root_certs = Read(certs->stranger_cert());
  const grpc::Status untrusted = Probe(Connect(port, grpc::SslCredentials(stranger_roots)));
  EXPECT_EQ(untrusted.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(ServerTlsTest, MutualTlsRequiresAClientCertificateFromTheCa) {
  absl::StatusOr<Certificates> certs = MakeCertificates();
  ASSERT_TRUE(certs.ok()) << certs.status();
  ServerConfig config = TestServerConfig();
  config.tls_cert = certs->server_cert();
  config.tls_key = certs->server_key();
  config.tls_client_ca = certs->ca_cert();
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();

  const grpc::Status with_cert =
      Probe(Connect(port, TlsCredentials(*certs, certs->client_cert(), certs->client_key())));
  EXPECT_TRUE(with_cert.ok()) << with_cert.error_message();
  const grpc::Status without_cert = Probe(Connect(port, TlsCredentials(*certs)));
  EXPECT_EQ(without_cert.error_code(), grpc::StatusCode::UNAVAILABLE);
  const grpc::Status stranger =
      Probe(Connect(port, TlsCredentials(*certs, certs->stranger_cert(), certs->stranger_key())));
  EXPECT_EQ(stranger.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(ServerTlsTest, MismatchedKeyIsAClearStartupError) {
  absl::StatusOr<Certificates> certs = MakeCertificates();
  ASSERT_TRUE(certs.ok()) << certs.status();
  ServerConfig config = TestServerConfig();
  config.tls_cert = certs->server_cert();
  config.tls_key = certs->client_key();  // not the certificate's key
  absl::StatusOr<std::unique_ptr<Server>> server = StartServer(config, false);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(server.status().message(), ::testing::HasSubstr("--tls-key"));
}

}  // namespace
}  // namespace emoserve
