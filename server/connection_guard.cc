#include "server/connection_guard.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace emoserve {
namespace {

// Bytes read at once per direction of a connection (what is buffered is
// this, plus the guard's own frames).
constexpr size_t kReadBytes = 32 << 10;

// One direction of a relay: bytes read from one socket (as the guard
// passes them on), not yet written to the other.
struct Buffer {
  std::string data;
  size_t begin = 0;
  bool empty() const { return begin == data.size(); }
};

struct Connection {
  int client = -1;
  int backend = -1;  // our end of the socket pair whose other end gRPC has
  Buffer up;         // client -> gRPC, its frames counted and admitted
  Buffer down;       // gRPC -> client, with the guard's refusals
  bool client_eof = false;
  bool backend_eof = false;
  bool up_shut = false;
  bool down_shut = false;
  // gRPC closed its end while the client still sent: what the client sends
  // is dropped until gRPC's last bytes (its reason) have reached it.
  bool backend_gone = false;
  uint32_t client_events = 0;
  uint32_t backend_events = 0;
  absl::Time opened;
  Http2FrameCounter counter;
  UploadAdmission uploads;

  Connection(const ConnectionGuardOptions& options, TokenBucket* total_resets,
             MemoryBudget* upload_budget)
      : counter(options, total_resets), uploads(upload_budget) {}
};

// kClosed: the destination cannot take bytes any more.
enum class Pumped { kOk, kClosed, kRefused };

absl::Status ErrnoError(absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

}  // namespace

TokenBucket::TokenBucket(double per_second)
    : per_second_(per_second), tokens_(per_second), last_(absl::Now()) {}

bool TokenBucket::Take(absl::Time now) {
  tokens_ = std::min(per_second_, tokens_ + absl::ToDoubleSeconds(now - last_) * per_second_);
  last_ = now;
  if (tokens_ < 1.0) return false;
  tokens_ -= 1.0;
  return true;
}

Http2FrameCounter::Http2FrameCounter(const ConnectionGuardOptions& options,
                                     TokenBucket* total_resets)
    : resets_(options.max_resets_per_second),
      control_(options.max_control_frames_per_second),
      total_resets_(total_resets) {}

std::optional<std::string> Http2FrameCounter::Feed(absl::string_view bytes, absl::Time now) {
  std::optional<std::string> reason;
  reader_.Feed(bytes, [&](const Http2FrameReader::Piece& piece) {
    if (piece.part != Http2FrameReader::Part::kHeader || reason.has_value()) return;
    ++frames_;
    reason = OnFrame(piece.frame->type, now);
  });
  return reason;
}

std::optional<std::string> Http2FrameCounter::OnFrame(uint8_t type, absl::Time now) {
  if (type == kHttp2RstStream) {
    // Both buckets pay: a connection may not take more than its share, and
    // many connections together may not take more than the total.
    const bool own = resets_.Take(now);
    const bool total = total_resets_ == nullptr || total_resets_->Take(now);
    if (!own || !total) return "rapid_reset";
  } else if (type == kHttp2Priority || type == kHttp2Settings || type == kHttp2Ping ||
             type > kHttp2Continuation) {
    // Clients send these rarely: gRPC's send no PRIORITY and no unknown
    // types, and ping for keepalive (seconds apart) and bandwidth probes
    // (one at a time, each a round trip). Each PING or SETTINGS makes gRPC
    // queue an answer, and gRPC 1.51 reads a whole buffer of them before
    // its own ping policy closes the connection (a flood grows its memory
    // by hundreds of MB). WINDOW_UPDATE is left alone: flow control sends
    // many.
    if (!control_.Take(now)) return "control_flood";
  }
  return std::nullopt;
}

struct ConnectionGuard::Impl {
  ConnectionGuardOptions options;
  std::function<void(int)> attach;
  Observer observer;
  int listener = -1;
  int epoll = -1;
  int wake = -1;  // eventfd: the destructor stops the loop through it
  int port = 0;
  std::atomic<bool> stopping{false};
  std::atomic<bool> shutting_down{false};  // see EnterShutdown
  std::thread thread;
  TokenBucket total_resets{1};
  std::unique_ptr<MemoryBudget> upload_budget;  // null: no limit
  std::unique_ptr<char[]> scratch = std::make_unique<char[]>(kReadBytes);

  // Touched by the loop's thread only. Epoll data: 0 the listener, 1 the
  // wake-up, 2 * id + side for a connection's sockets (side 0 the client).
  absl::flat_hash_map<uint64_t, std::unique_ptr<Connection>> connections;
  uint64_t next_id = 1;

  ~Impl() {
    for (auto& [id, connection] : connections) {
      close(connection->client);
      close(connection->backend);
    }
    for (int fd : {listener, epoll, wake}) {
      if (fd >= 0) close(fd);
    }
  }

  void Loop() {
    std::vector<epoll_event> events(256);
    absl::Time last_sweep = absl::Now();
    while (!stopping.load()) {
      const int n = epoll_wait(epoll, events.data(), static_cast<int>(events.size()), 250);
      const absl::Time now = absl::Now();
      for (int i = 0; i < n; ++i) {
        const uint64_t key = events[i].data.u64;
        if (key == 0) {
          AcceptAll(now);
        } else if (key >= 2) {
          auto it = connections.find(key / 2);
          if (it != connections.end()) Service(it->first, *it->second, now);
        }
      }
      if (listener_paused_until != absl::InfinitePast() && now >= listener_paused_until) {
        epoll_event event{};
        event.events = EPOLLIN;
        event.data.u64 = 0;
        epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &event);
        listener_paused_until = absl::InfinitePast();
      }
      if (now - last_sweep > absl::Seconds(1)) {
        CloseSilentConnections(now);
        last_sweep = now;
      }
    }
  }

  void AcceptAll(absl::Time now) {
    for (;;) {
      const int client = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (client < 0) {
        if (errno == EMFILE || errno == ENFILE) {
          // Out of descriptors: the pending connection would wake the loop
          // at once, over and over; listen again a little later.
          epoll_ctl(epoll, EPOLL_CTL_DEL, listener, nullptr);
          listener_paused_until = now + absl::Milliseconds(100);
        }
        return;  // EAGAIN: all accepted
      }
      if (static_cast<int>(connections.size()) >= options.max_connections) {
        close(client);
        Refused("max_connections");
        continue;
      }
      int pair[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) != 0) {
        close(client);
        continue;
      }
      const int one = 1;
      setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto connection =
          std::make_unique<Connection>(options, &total_resets, upload_budget.get());
      connection->client = client;
      connection->backend = pair[0];
      connection->opened = now;
      const uint64_t id = next_id++;
      Connection& c = *connection;
      connections.emplace(id, std::move(connection));
      attach(pair[1]);
      UpdateInterest(id, c);
      Counted();
    }
  }

  // Moves what can move both ways, then closes or re-arms the connection.
  void Service(uint64_t id, Connection& c, absl::Time now) {
    const int64_t refused_before = c.uploads.refused();
    Pumped up = c.backend_gone ? Drop(c.client, &c.client_eof) : Pump(c, /*up=*/true, now);
    if (c.uploads.refused() > refused_before && observer.on_uploads_refused) {
      observer.on_uploads_refused(static_cast<int>(c.uploads.refused() - refused_before));
    }
    if (up == Pumped::kRefused) {
      Refused(last_reason);
      Close(id);
      return;
    }
    if (up == Pumped::kClosed && !c.backend_gone) {
      // gRPC hung up (it may have said why, e.g. headers too large): let
      // its last bytes reach the client before closing.
      c.backend_gone = true;
      c.up.data.clear();
      c.up.begin = 0;
      up = Drop(c.client, &c.client_eof);
    }
    // Refusals of uploads go out between gRPC's frames.
    c.uploads.FlushToClient(&c.down.data);
    const Pumped down = Pump(c, /*up=*/false, now);
    const bool client_done = c.client_eof || c.backend_gone;
    const bool finished = client_done && c.backend_eof && c.up.empty() && c.down.empty();
    if (up == Pumped::kClosed || down != Pumped::kOk || finished) {
      Close(id);
      return;
    }
    UpdateInterest(id, c);
  }

  // Reads and drops what the client sends (gRPC is gone).
  Pumped Drop(int client, bool* eof) {
    char sink[4096];
    for (;;) {
      const ssize_t n = read(client, sink, sizeof(sink));
      if (n > 0) continue;
      if (n == 0) {
        *eof = true;
        return Pumped::kOk;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Pumped::kOk;
      if (errno == EINTR) continue;
      return Pumped::kClosed;
    }
  }

  // Relays one way (client -> gRPC when `up`) until a side would block.
  // What the client sends is counted and admitted; what gRPC sends gets the
  // guard's refusals between its frames.
  Pumped Pump(Connection& c, bool up, absl::Time now) {
    const int src = up ? c.client : c.backend;
    const int dst = up ? c.backend : c.client;
    Buffer& buffer = up ? c.up : c.down;
    bool* eof = up ? &c.client_eof : &c.backend_eof;
    for (;;) {
      while (!buffer.empty()) {
        const ssize_t n = send(dst, buffer.data.data() + buffer.begin,
                               buffer.data.size() - buffer.begin, MSG_NOSIGNAL);
        if (n > 0) {
          buffer.begin += static_cast<size_t>(n);
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Pumped::kOk;
        if (n < 0 && errno == EINTR) continue;
        return Pumped::kClosed;
      }
      buffer.data.clear();
      buffer.begin = 0;
      if (*eof) break;
      // A client that does not read what it is sent is not read either:
      // what it sends may make gRPC answer (PING, SETTINGS), and the
      // answers would pile up in gRPC's buffers.
      if (up && !c.down.empty()) return Pumped::kOk;
      const ssize_t n = read(src, scratch.get(), kReadBytes);
      if (n > 0) {
        const absl::string_view bytes(scratch.get(), static_cast<size_t>(n));
        if (!up) {
          c.uploads.FromServer(bytes, shutting_down.load(), &buffer.data);
          continue;
        }
        if (std::optional<std::string> reason = c.counter.Feed(bytes, now)) {
          last_reason = *reason;
          return Pumped::kRefused;
        }
        if (!c.uploads.FromClient(bytes, &buffer.data)) {
          last_reason = "refused_uploads";
          return Pumped::kRefused;
        }
        continue;
      }
      if (n == 0) {
        *eof = true;
        break;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Pumped::kOk;
      if (errno == EINTR) continue;
      return Pumped::kClosed;
    }
    // The source ended and everything it sent is through: end the other way.
    bool* shut = up ? &c.up_shut : &c.down_shut;
    if (!*shut) {
      shutdown(dst, SHUT_WR);
      *shut = true;
    }
    return Pumped::kOk;
  }

  void UpdateInterest(uint64_t id, Connection& c) {
    // Read a side only while what it sent before is through (the buffer is
    // empty): a side that does not read stops the other side's reads. The
    // client is read only while it also takes what gRPC sends.
    const uint32_t client = (!c.client_eof && c.up.empty() && c.down.empty() ? EPOLLIN : 0u) |
                            (!c.down.empty() ? EPOLLOUT : 0u);
    const uint32_t backend = (!c.backend_eof && c.down.empty() ? EPOLLIN : 0u) |
                             (!c.up.empty() && !c.backend_gone ? EPOLLOUT : 0u);
    Arm(c.client, 2 * id, client, &c.client_events);
    Arm(c.backend, 2 * id + 1, backend, &c.backend_events);
  }

  void Arm(int fd, uint64_t key, uint32_t events, uint32_t* registered) {
    if (events == *registered) return;
    epoll_event event{};
    event.events = events;
    event.data.u64 = key;
    if (*registered == 0 && events != 0) {
      epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
    } else if (events == 0) {
      epoll_ctl(epoll, EPOLL_CTL_DEL, fd, nullptr);
    } else {
      epoll_ctl(epoll, EPOLL_CTL_MOD, fd, &event);
    }
    *registered = events;
  }

  void Close(uint64_t id) {
    auto it = connections.find(id);
    if (it == connections.end()) return;
    close(it->second->client);  // also removes both from the epoll set
    close(it->second->backend);
    connections.erase(it);
    Counted();
  }

  // Connections that have not sent the HTTP/2 preface in time (gRPC's own
  // handshake timeout does not see connections handed to it).
  void CloseSilentConnections(absl::Time now) {
    std::vector<uint64_t> silent;
    for (const auto& [id, c] : connections) {
      if (!c->counter.saw_preface() && now - c->opened > options.preface_timeout) {
        silent.push_back(id);
      }
    }
    for (uint64_t id : silent) {
      Refused("no_preface");
      Close(id);
    }
  }

  void Counted() {
    if (observer.on_connections) observer.on_connections(static_cast<int>(connections.size()));
  }
  void Refused(absl::string_view reason) {
    if (observer.on_refused) observer.on_refused(reason);
  }

  std::string last_reason;
  absl::Time listener_paused_until = absl::InfinitePast();
};

absl::StatusOr<std::unique_ptr<ConnectionGuard>> ConnectionGuard::Start(
    const std::string& host, int port, const ConnectionGuardOptions& options,
    std::function<void(int fd)> attach, Observer observer) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->attach = std::move(attach);
  impl->observer = std::move(observer);
  impl->total_resets = TokenBucket(options.max_total_resets_per_second);
  if (options.max_upload_bytes > 0) {
    impl->upload_budget = std::make_unique<MemoryBudget>(
        options.max_upload_bytes, impl->observer.on_upload_memory,
        "the server's memory for messages being received (half of --grpc-memory-mb)",
        SmallLeaseReserve::EighthOf(options.max_upload_bytes));
  }

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  addrinfo* found = nullptr;
  const std::string service = absl::StrCat(port);
  if (getaddrinfo(host.c_str(), service.c_str(), &hints, &found) != 0 || found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot listen on host '", host,
                                                   "': not a numeric IPv4 or IPv6 address"));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> address(found, freeaddrinfo);
  impl->listener = socket(address->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (impl->listener < 0) return ErrnoError("socket");
  const int one = 1;
  setsockopt(impl->listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(impl->listener, address->ai_addr, address->ai_addrlen) != 0) {
    return ErrnoError(absl::StrCat("cannot listen on ", host, ":", port));
  }
  if (listen(impl->listener, SOMAXCONN) != 0) return ErrnoError("listen");
  sockaddr_storage bound{};
  socklen_t length = sizeof(bound);
  getsockname(impl->listener, reinterpret_cast<sockaddr*>(&bound), &length);
  impl->port = ntohs(bound.ss_family == AF_INET6
                         ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                         : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);

  impl->epoll = epoll_create1(EPOLL_CLOEXEC);
  impl->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (impl->epoll < 0 || impl->wake < 0) return ErrnoError("epoll");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = 0;
  epoll_ctl(impl->epoll, EPOLL_CTL_ADD, impl->listener, &event);
  event.data.u64 = 1;
  epoll_ctl(impl->epoll, EPOLL_CTL_ADD, impl->wake, &event);
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  return std::unique_ptr<ConnectionGuard>(new ConnectionGuard(std::move(impl)));
}

ConnectionGuard::ConnectionGuard(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ConnectionGuard::~ConnectionGuard() {
  impl_->stopping = true;
  const uint64_t one = 1;
  if (write(impl_->wake, &one, sizeof(one)) < 0) {
    // The loop still wakes within its 250 ms timeout.
  }
  impl_->thread.join();
}

int ConnectionGuard::port() const { return impl_->port; }

void ConnectionGuard::EnterShutdown() { impl_->shutting_down = true; }

}  // namespace emoserve
