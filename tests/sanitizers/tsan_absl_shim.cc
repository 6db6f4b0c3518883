// ThreadSanitizer builds only (EMOSERVE_SANITIZE=thread): teaches TSan that
// absl::Mutex, absl::CondVar and absl::Notification synchronise.
//
// Debian's libabsl is not built with -fsanitize=thread, so its Mutex (an
// atomic word and futexes, not pthread mutexes) is invisible to TSan, which
// then reports every pair of accesses under one absl::Mutex from two threads
// as a data race. This file defines the exported member functions in the
// executable, where they take precedence over the library's for our code
// and, since the executable exports them (the top CMakeLists.txt), for gRPC's and
// absl's own calls too. Each forwards to the library's definition (dlsym
// RTLD_NEXT) and adds the happens-before edges:
//   unlock-type call: __tsan_release(mutex) before it;
//   lock-type call:   __tsan_acquire(mutex) after it (when it got the lock);
//   waits (CondVar::Wait*, Mutex::Await*, LockWhen*): release before,
//                     acquire after, since they unlock and re-lock inside.
// absl evaluates an Await/LockWhen Condition with the mutex held but inside
// its own lock and unlock code, and often on another thread (the unlocking
// one, on behalf of the waiter): the shim passes a wrapper Condition that
// acquires the mutex before the evaluation and releases it after.
// Reader locks are treated as exclusive (TSan might miss a race between two
// readers; it reports no false one). Lock-order checks stay off.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#if !defined(__SANITIZE_THREAD__)
#error "tsan_absl_shim.cc is for -fsanitize=thread builds only"
#endif

namespace {

#define EMOSERVE_STR2(x) #x
#define EMOSERVE_STR(x) EMOSERVE_STR2(x)

// The library's definition of a member function: `member` is the mangled
// name after the namespace prefix, e.g. "5Mutex4LockEv"; `constness` is ""
// or "K" (const member functions).
void* Real(const char* constness, const char* member) {
  const std::string ns = EMOSERVE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string("_ZN") + constness + "4absl" +
                           std::to_string(ns.size()) + ns + member;
  void* f = dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr, "tsan_absl_shim: %s not found after the executable\n", name.c_str());
    std::abort();
  }
  return f;
}

#define REAL(type, constness, member) \
  static const auto real = reinterpret_cast<type>(Real(constness, member))

// absl::Notification::notified_yet_ (private), for HasBeenNotified(): an
// inline acquire load in our (instrumented) code. Explicit instantiation
// may name private members.
struct NotifiedYet {
  using type = std::atomic<bool> absl::Notification::*;
  friend type Get(NotifiedYet);
};
template <typename Tag, typename Tag::type M>
struct Rob {
  friend typename Tag::type Get(Tag) { return M; }
};
template struct Rob<NotifiedYet, &absl::Notification::notified_yet_>;

// A Condition evaluated as if under `mu` (see the top).
struct Annotated {
  const absl::Condition* cond;
  absl::Mutex* mu;
  absl::Condition Wrapper() { return absl::Condition(&Eval, this); }
  static bool Eval(Annotated* a) {
    __tsan_acquire(a->mu);
    const bool r = a->cond->Eval();
    __tsan_release(a->mu);
    return r;
  }
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

// Mutex ----------------------------------------------------------------------

void Mutex::Lock() {
  REAL(void (*)(Mutex*), "", "5Mutex4LockEv");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderLock() {
  REAL(void (*)(Mutex*), "", "5Mutex10ReaderLockEv");
  real(this);
  __tsan_acquire(this);
}

bool Mutex::TryLock() {
  REAL(bool (*)(Mutex*), "", "5Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) __tsan_acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  REAL(bool (*)(Mutex*), "", "5Mutex13ReaderTryLockEv");
  const bool locked = real(this);
  if (locked) __tsan_acquire(this);
  return locked;
}

void Mutex::Unlock() {
  REAL(void (*)(Mutex*), "", "5Mutex6UnlockEv");
  __tsan_release(this);
  real(this);
}

void Mutex::ReaderUnlock() {
  REAL(void (*)(Mutex*), "", "5Mutex12ReaderUnlockEv");
  __tsan_release(this);
  real(this);
}

// LockWhen* evaluate the condition with the lock held, and may hand the lock
// over from an unlocking thread: acquire after. The *WithTimeout/Deadline
// forms hold the lock on return whatever they return.
void Mutex::LockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "", "5Mutex8LockWhenERKNS0_9ConditionE");
  Annotated a{&cond, this};
  real(this, a.Wrapper());
  __tsan_acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "", "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Annotated a{&cond, this};
  real(this, a.Wrapper());
  __tsan_acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration), "",
       "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), timeout);
  __tsan_acquire(this);
  return r;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration), "",
       "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), timeout);
  __tsan_acquire(this);
  return r;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "",
       "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), deadline);
  __tsan_acquire(this);
  return r;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "",
       "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), deadline);
  __tsan_acquire(this);
  return r;
}

// Await* release the lock while they wait and hold it again on return.
void Mutex::Await(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "", "5Mutex5AwaitERKNS0_9ConditionE");
  __tsan_release(this);
  Annotated a{&cond, this};
  real(this, a.Wrapper());
  __tsan_acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, Duration), "",
       "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  __tsan_release(this);
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), timeout);
  __tsan_acquire(this);
  return r;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, Time), "",
       "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  __tsan_release(this);
  Annotated a{&cond, this};
  const bool r = real(this, a.Wrapper(), deadline);
  __tsan_acquire(this);
  return r;
}

// CondVar ----------------------------------------------------------------------

void CondVar::Wait(Mutex* mu) {
  REAL(void (*)(CondVar*, Mutex*), "", "7CondVar4WaitEPNS0_5MutexE");
  __tsan_release(mu);
  real(this, mu);
  __tsan_acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  REAL(bool (*)(CondVar*, Mutex*, Duration), "",
       "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  __tsan_release(mu);
  const bool r = real(this, mu, timeout);
  __tsan_acquire(mu);
  return r;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  REAL(bool (*)(CondVar*, Mutex*, Time), "",
       "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  __tsan_release(mu);
  const bool r = real(this, mu, deadline);
  __tsan_acquire(mu);
  return r;
}

// Notification -----------------------------------------------------------------

void Notification::Notify() {
  REAL(void (*)(Notification*), "", "12Notification6NotifyEv");
  __tsan_release(this);
  __tsan_release(&(this->*Get(NotifiedYet{})));  // for HasBeenNotified()
  real(this);
}

void Notification::WaitForNotification() const {
  REAL(void (*)(const Notification*), "K", "12Notification19WaitForNotificationEv");
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  REAL(bool (*)(const Notification*, Duration), "K",
       "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  const bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  REAL(bool (*)(const Notification*, Time), "K",
       "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  const bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
