#include "server/http_front_door.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/http_server.h"

namespace emoserve {
namespace {

constexpr size_t kRelayBytes = 16 << 10;  // read at once, per direction

absl::Status ErrnoError(absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

std::string OpenSslError() {
  const unsigned long code = ERR_get_error();
  if (code == 0) return "unknown error";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

}  // namespace

struct HttpFrontDoor::Impl {
  HttpFrontDoorOptions options;
  int backend_port = 0;
  int listener = -1;
  int port = 0;
  int wake[2] = {-1, -1};  // a pipe: the destructor stops accepting through it
  SSL_CTX* tls = nullptr;  // null: plaintext
  std::atomic<bool> stopping{false};  // no more connections
  std::atomic<bool> cutting{false};   // relays end now
  std::thread acceptor;

  absl::Mutex mu;
  absl::flat_hash_set<int> clients ABSL_GUARDED_BY(mu);  // connections being relayed
  // Those still waiting for their first request's head, and since when.
  absl::flat_hash_map<int, absl::Time> waiting ABSL_GUARDED_BY(mu);

  ~Impl() {
    for (int fd : {listener, wake[0], wake[1]}) {
      if (fd >= 0) close(fd);
    }
    if (tls != nullptr) SSL_CTX_free(tls);
  }

  void Accept() {
    for (;;) {
      pollfd fds[2] = {{listener, POLLIN, 0}, {wake[0], POLLIN, 0}};
      if (poll(fds, 2, -1) < 0 && errno != EINTR) return;
      if (stopping.load()) return;
      if ((fds[0].revents & POLLIN) == 0) continue;
      const int client = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (client < 0) {
        if (errno == EMFILE || errno == ENFILE) usleep(100 * 1000);  // out of descriptors
        continue;
      }
      {
        absl::MutexLock lock(&mu);
        if (static_cast<int>(clients.size()) >= options.max_connections &&
            !EvictLongestWaitingLocked()) {
          close(client);
          continue;
        }
        clients.insert(client);
        waiting[client] = absl::Now();
      }
      std::thread([this, client] {
        Serve(client);
        absl::MutexLock lock(&mu);
        clients.erase(client);
        waiting.erase(client);
        close(client);
      }).detach();
    }
  }

  // At the limit, the connection that has waited longest for its first
  // request makes room for a new one: idle connections cannot lock
  // clients out (its thread sees the shutdown at once and ends).
  bool EvictLongestWaitingLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto oldest = waiting.end();
    for (auto it = waiting.begin(); it != waiting.end(); ++it) {
      if (oldest == waiting.end() || it->second < oldest->second) oldest = it;
    }
    if (oldest == waiting.end()) return false;
    shutdown(oldest->first, SHUT_RDWR);
    waiting.erase(oldest);
    return true;
  }

  // One connection: the TLS handshake, then the relay.
  void Serve(int client) {
    SSL* ssl = nullptr;
    if (tls != nullptr) {
      ssl = SSL_new(tls);
      if (ssl == nullptr || SSL_set_fd(ssl, client) != 1 || !Handshake(ssl, client)) {
        if (ssl != nullptr) SSL_free(ssl);
        return;
      }
    }
    HttpRequestReader reader(options.limits);
    std::string first;
    const bool whole = FirstHead(client, ssl, &reader, &first);
    {
      absl::MutexLock lock(&mu);
      waiting.erase(client);
    }
    if (whole) {
      const int backend = ConnectBackend();
      if (backend >= 0) {
        Relay(client, ssl, backend, &reader, std::move(first));
        close(backend);
      }
    }
    if (ssl != nullptr) {
      SSL_shutdown(ssl);  // close_notify, best effort (non-blocking)
      SSL_free(ssl);
    }
  }

  bool Handshake(SSL* ssl, int client) {
    const absl::Time deadline = absl::Now() + options.handshake_timeout;
    for (;;) {
      const int accepted = SSL_accept(ssl);
      if (accepted == 1) return true;
      const int error = SSL_get_error(ssl, accepted);
      short events = 0;
      if (error == SSL_ERROR_WANT_READ) events = POLLIN;
      if (error == SSL_ERROR_WANT_WRITE) events = POLLOUT;
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (events == 0 || left_ms <= 0 || cutting.load()) {
        ERR_clear_error();
        return false;
      }
      pollfd fd = {client, events, 0};
      poll(&fd, 1, static_cast<int>(std::min<int64_t>(left_ms, 250)));
    }
  }

  int ConnectBackend() {
    const int backend = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (backend < 0) return -1;
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(backend_port));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(backend, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
      close(backend);
      return -1;
    }
    fcntl(backend, F_SETFL, fcntl(backend, F_GETFL) | O_NONBLOCK);
    return backend;
  }

  // What a non-blocking read or write on a side did.
  enum class Io { kDone, kWantRead, kWantWrite, kClosed };

  static Io Result(SSL* ssl, int n) {
    if (n > 0) return Io::kDone;
    if (ssl != nullptr) {
      const int error = SSL_get_error(ssl, n);
      if (error == SSL_ERROR_WANT_READ) return Io::kWantRead;
      if (error == SSL_ERROR_WANT_WRITE) return Io::kWantWrite;
      ERR_clear_error();
      return Io::kClosed;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return Io::kWantRead;
    return Io::kClosed;
  }

  static int Read(int fd, SSL* ssl, char* data, size_t size) {
    return ssl != nullptr ? SSL_read(ssl, data, static_cast<int>(size))
                          : static_cast<int>(recv(fd, data, size, 0));
  }

  static int Write(int fd, SSL* ssl, const char* data, size_t size) {
    return ssl != nullptr ? SSL_write(ssl, data, static_cast<int>(size))
                          : static_cast<int>(send(fd, data, size, MSG_NOSIGNAL));
  }

  // Relays until either side closes (or the front door stops). The
  // client's bytes pass through the request reader first; each direction
  // holds at most one read's worth, so a side that does not read stops
  // the other from being read.
  // Reads until the first request's head is whole (into `first`), within
  // handshake_timeout; false: the client was too slow, left, or was refused.
  bool FirstHead(int client, SSL* ssl, HttpRequestReader* reader, std::string* first) {
    const absl::Time deadline = absl::Now() + options.handshake_timeout;
    auto buffer = std::make_unique<char[]>(kRelayBytes);
    while (reader->heads() == 0) {
      const int n = Read(client, ssl, buffer.get(), kRelayBytes);
      const Io io = Result(ssl, n);
      if (io == Io::kClosed) return false;
      if (io == Io::kDone) {
        if (std::optional<HttpRequestReader::Refusal> refused =
                reader->Feed(absl::string_view(buffer.get(), static_cast<size_t>(n)))) {
          if (refused->http_status != 0) Answer(client, ssl, *refused);
          return false;
        }
        first->append(buffer.get(), static_cast<size_t>(n));
        continue;
      }
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left_ms <= 0 || cutting.load()) return false;
      pollfd fd = {client, static_cast<short>(io == Io::kWantWrite ? POLLOUT : POLLIN), 0};
      poll(&fd, 1, static_cast<int>(std::min<int64_t>(left_ms, 250)));
    }
    return true;
  }

  void Relay(int client, SSL* ssl, int backend, HttpRequestReader* reader_state,
             std::string first) {
    HttpRequestReader& reader = *reader_state;
    std::string up = std::move(first), down;  // client to civetweb, civetweb to client
    size_t up_sent = 0, down_sent = 0;
    bool client_done = false, backend_done = false, backend_shut = false;
    // Civetweb answered before the request's body was whole (a refusal:
    // 413, 400, 429...): once the answer is out the connection closes, so
    // civetweb does not wait on a thread for a body it will discard.
    bool answered_early = false;
    auto buffer = std::make_unique<char[]>(kRelayBytes);
    while (!cutting.load()) {
      bool progress = false;
      short client_events = 0, backend_events = 0;
      const auto want = [](Io io, short* events) {
        if (io == Io::kWantRead) *events |= POLLIN;
        if (io == Io::kWantWrite) *events |= POLLOUT;
      };
      if (up.empty() && !client_done && !answered_early) {
        const int n = Read(client, ssl, buffer.get(), kRelayBytes);
        const Io io = Result(ssl, n);
        if (io == Io::kDone) {
          if (std::optional<HttpRequestReader::Refusal> refused =
                  reader.Feed(absl::string_view(buffer.get(), static_cast<size_t>(n)))) {
            if (refused->http_status != 0) Answer(client, ssl, *refused);
            return;
          }
          up.assign(buffer.get(), static_cast<size_t>(n));
          up_sent = 0;
          progress = true;
        } else if (io == Io::kClosed) {
          client_done = true;
        }
        want(io, &client_events);
      }
      if (!up.empty()) {
        const int n = Write(backend, nullptr, up.data() + up_sent, up.size() - up_sent);
        const Io io = Result(nullptr, n);
        if (io == Io::kClosed) return;
        if (io == Io::kDone) {
          up_sent += static_cast<size_t>(n);
          if (up_sent == up.size()) up.clear();
          progress = true;
        } else {
          backend_events |= POLLOUT;
        }
      }
      if (client_done && up.empty() && !backend_shut) {
        shutdown(backend, SHUT_WR);  // civetweb sees the client's end
        backend_shut = true;
      }
      if (down.empty() && !backend_done) {
        const int n = Read(backend, nullptr, buffer.get(), kRelayBytes);
        const Io io = Result(nullptr, n);
        if (io == Io::kDone) {
          down.assign(buffer.get(), static_cast<size_t>(n));
          down_sent = 0;
          progress = true;
          if (reader.in_body()) answered_early = true;
        } else if (io == Io::kClosed) {
          backend_done = true;
        } else {
          backend_events |= POLLIN;
        }
      }
      if (!down.empty()) {
        const int n = Write(client, ssl, down.data() + down_sent, down.size() - down_sent);
        const Io io = Result(ssl, n);
        if (io == Io::kClosed) return;
        if (io == Io::kDone) {
          down_sent += static_cast<size_t>(n);
          if (down_sent == down.size()) down.clear();
          progress = true;
        } else {
          // A plaintext write that would block waits for POLLOUT.
          want(ssl != nullptr ? io : Io::kWantWrite, &client_events);
        }
      }
      if (backend_done && down.empty()) return;  // civetweb closed: so does the client
      // An early answer is whole once civetweb has nothing more to say for
      // a moment; then the client is closed (and civetweb sees the end).
      if (answered_early && down.empty() && !progress) {
        pollfd fd = {backend, POLLIN, 0};
        if (poll(&fd, 1, 100) == 0) return;
        continue;
      }
      if (client_done && backend_done) return;
      if (progress) continue;
      pollfd fds[2] = {{client, client_events, 0}, {backend, backend_events, 0}};
      poll(fds, 2, 250);
    }
  }

  // The refusal as an HTTP answer, written within a second.
  void Answer(int client, SSL* ssl, const HttpRequestReader::Refusal& refusal) {
    const std::string body = ErrorJson(refusal.status);
    const std::string answer = absl::StrCat(
        "HTTP/1.1 ", refusal.http_status, " ",
        refusal.http_status == 431   ? "Request Header Fields Too Large"
        : refusal.http_status == 411 ? "Length Required"
                                     : "Bad Request",
        "\r\nContent-Type: application/json\r\nContent-Length: ", body.size(),
        "\r\nConnection: close\r\n\r\n", body);
    size_t sent = 0;
    const absl::Time deadline = absl::Now() + absl::Seconds(1);
    while (sent < answer.size() && absl::Now() < deadline) {
      const int n = Write(client, ssl, answer.data() + sent, answer.size() - sent);
      const Io io = Result(ssl, n);
      if (io == Io::kClosed) return;
      if (io == Io::kDone) {
        sent += static_cast<size_t>(n);
        continue;
      }
      pollfd fd = {client, static_cast<short>(io == Io::kWantRead && ssl ? POLLIN : POLLOUT), 0};
      poll(&fd, 1, 100);
    }
  }
};

absl::StatusOr<std::unique_ptr<HttpFrontDoor>> HttpFrontDoor::Start(
    const std::string& host, int port, int backend_port, const HttpFrontDoorOptions& options) {
  // A client that leaves mid-write must not kill the process (SSL_write
  // writes to the socket without MSG_NOSIGNAL).
  std::signal(SIGPIPE, SIG_IGN);
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->backend_port = backend_port;
  if (!options.tls_cert.empty()) {
    impl->tls = SSL_CTX_new(TLS_server_method());
    if (impl->tls == nullptr) return absl::InternalError("TLS: " + OpenSslError());
    SSL_CTX_set_min_proto_version(impl->tls, TLS1_2_VERSION);
    SSL_CTX_set_mode(impl->tls,
                     SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (SSL_CTX_use_certificate_chain_file(impl->tls, options.tls_cert.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(impl->tls, options.tls_key.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(impl->tls) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("HTTPS: --tls-cert/--tls-key: ", OpenSslError()));
    }
    if (!options.tls_client_ca.empty()) {
      STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options.tls_client_ca.c_str());
      if (names == nullptr ||
          SSL_CTX_load_verify_locations(impl->tls, options.tls_client_ca.c_str(), nullptr) != 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("HTTPS: --tls-client-ca: ", OpenSslError()));
      }
      SSL_CTX_set_client_CA_list(impl->tls, names);
      SSL_CTX_set_verify(impl->tls, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    }
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = absl::StrCat(port);
  if (getaddrinfo(host.c_str(), service.c_str(), &hints, &found) != 0 || found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot resolve --http-host ", host));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> address(found, &freeaddrinfo);
  impl->listener = socket(address->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (impl->listener < 0) return ErrnoError("socket");
  const int one = 1;
  setsockopt(impl->listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(impl->listener, address->ai_addr, address->ai_addrlen) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", host, ":", port, ": ",
                                               std::strerror(errno),
                                               " (is the port in use? --http-port 0 disables HTTP)"));
  }
  if (listen(impl->listener, 128) != 0) return ErrnoError("listen");
  sockaddr_storage bound{};
  socklen_t bound_size = sizeof(bound);
  getsockname(impl->listener, reinterpret_cast<sockaddr*>(&bound), &bound_size);
  impl->port = ntohs(bound.ss_family == AF_INET6
                         ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                         : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  if (pipe2(impl->wake, O_CLOEXEC) != 0) return ErrnoError("pipe");
  Impl* raw = impl.get();
  impl->acceptor = std::thread([raw] { raw->Accept(); });
  return std::unique_ptr<HttpFrontDoor>(new HttpFrontDoor(std::move(impl)));
}

HttpFrontDoor::HttpFrontDoor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpFrontDoor::~HttpFrontDoor() {
  impl_->stopping.store(true);
  const char one = 1;
  if (write(impl_->wake[1], &one, 1) < 0) {
    // Cannot happen while the pipe is open; the acceptor would then block.
  }
  impl_->acceptor.join();
  absl::MutexLock lock(&impl_->mu);
  const auto drained = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl_->mu) {
    return impl_->clients.empty();
  };
  // Relays whose civetweb side has closed finish writing what it said.
  if (impl_->mu.AwaitWithTimeout(absl::Condition(&drained), absl::Seconds(2))) return;
  impl_->cutting.store(true);
  for (int client : impl_->clients) shutdown(client, SHUT_RDWR);
  impl_->mu.Await(absl::Condition(&drained));
}

int HttpFrontDoor::port() const { return impl_->port; }

}  // namespace emoserve
