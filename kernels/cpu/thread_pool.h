// kvloom::parallel_for: at::parallel_for's contract on a small pool of spinning worker threads.
//
// Why not OpenMP: libgomp counts the worker threads of every thread that ever opened a parallel
// region. Once the application's main thread has run a parallel torch op (loading the model does)
// and the engine steps on its own thread, that count exceeds the cores and libgomp stops spinning
// between regions: each of the ~200 kernel calls of a decode step then pays a futex wake-up
// (measured 90 us per call on 2 cores; a token 1.5x slower than the same engine on the main thread).
// This pool spins for a short while after each job (the gap between two layers' kernels) and then
// sleeps. One caller at a time uses the workers; a concurrent or nested caller runs its range
// inline. After fork() the child starts a fresh pool (threads do not survive).
// On the process's main thread the kernels keep OpenMP (at::parallel_for): there libgomp's team
// spins between regions as it should, and a second spinning pool would only fight it for the
// cores around torch's own parallel ops (measured: 16-sequence batches 20% slower).
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace kvloom {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

class SpinPool {
 public:
  using Task = void (*)(void* ctx, int64_t begin, int64_t end);

  // Runs task over [begin, end) in `chunks` pieces of `chunk` items, which the caller and up to
  // `workers` pool threads claim one at a time: a worker the OS has not scheduled simply claims
  // nothing, and the caller does the rest. Returns false (nothing run) when another caller holds
  // the pool.
  bool run(Task task, void* ctx, int64_t begin, int64_t end, int64_t chunk, int chunks, int workers) {
    std::unique_lock<std::mutex> busy(call_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(workers);
    task_.store(task, std::memory_order_release);
    ctx_.store(ctx, std::memory_order_release);
    begin_.store(begin, std::memory_order_release);
    end_.store(end, std::memory_order_release);
    chunk_.store(chunk, std::memory_order_release);
    chunks_.store(chunks, std::memory_order_release);
    active_.store(workers, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t job = ++job_;
    claim_.store(static_cast<uint64_t>(job) << 32, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    in_pool() = true;
    int64_t index;
    while ((index = claim(job, chunks)) >= 0) {
      const int64_t start = begin + index * chunk;
      task(ctx, start, std::min(end, start + chunk));
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
    in_pool() = false;
    // Every chunk is claimed: close the job, so that a late worker holding this job's number cannot
    // claim a chunk counted against the next job's fields (it reads those with acquire, which makes
    // this store visible to its claim).
    claim_.store((static_cast<uint64_t>(job) << 32) | 0xFFFFFFFFu, std::memory_order_release);
    for (int i = 1; done_.load(std::memory_order_acquire) < chunks; ++i) {
      cpu_relax();
      if ((i & 63) == 0) std::this_thread::yield();  // a claimed chunk's worker may share our core
    }
    return true;
  }

  static bool& in_pool() {
    thread_local bool inside = false;
    return inside;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(500);

  // The next chunk index of job `job`, or -1 when none is left (or the job is no longer current).
  int64_t claim(uint32_t job, int chunks) {
    uint64_t state = claim_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(state >> 32) != job) return -1;
      const uint32_t next = static_cast<uint32_t>(state);
      if (next >= static_cast<uint32_t>(chunks)) return -1;
      if (claim_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) return next;
    }
  }

  void grow(int workers) {
    while (static_cast<int>(threads_) < workers) {
      const int index = static_cast<int>(threads_++) + 1;
      // The job about to be posted is the first one a new worker must see.
      const uint64_t seen = generation_.load(std::memory_order_relaxed);
      std::thread([this, index, seen] { work(index, seen); }).detach();
    }
  }

  void work(int index, uint64_t seen) {
    in_pool() = true;
    for (;;) {
      seen = wait_for_job(seen);
      const uint32_t job = static_cast<uint32_t>(claim_.load(std::memory_order_acquire) >> 32);
      if (index > active_.load(std::memory_order_acquire)) continue;
      const Task task = task_.load(std::memory_order_acquire);
      void* ctx = ctx_.load(std::memory_order_acquire);
      const int64_t begin = begin_.load(std::memory_order_acquire), end = end_.load(std::memory_order_acquire);
      const int64_t chunk = chunk_.load(std::memory_order_acquire);
      const int chunks = chunks_.load(std::memory_order_acquire);
      // Fields read while a newer job was being posted are caught by the claim: claims carry the job
      // number, a job's fields are final before its number is published, and a job is closed before
      // the next one's fields are written.
      int64_t i;
      while ((i = claim(job, chunks)) >= 0) {
        const int64_t start = begin + i * chunk;
        task(ctx, start, std::min(end, start + chunk));
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    for (int i = 1;; ++i) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      cpu_relax();
      if ((i & 255) == 0) {
        if (std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::yield();  // spin politely when the cores are shared
      }
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleeping_.fetch_add(1, std::memory_order_seq_cst);
    uint64_t now;
    while ((now = generation_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
    sleeping_.fetch_sub(1, std::memory_order_relaxed);
    return now;
  }

  std::mutex call_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0}, claim_{0};
  std::atomic<int> sleeping_{0}, active_{0}, chunks_{0}, done_{0};
  std::atomic<Task> task_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> begin_{0}, end_{0}, chunk_{0};
  uint32_t job_ = 0;
  size_t threads_ = 0;
};

inline SpinPool*& pool_slot() {
  static SpinPool* pool = nullptr;
  return pool;
}

inline SpinPool& pool() {
  static std::once_flag once;
  std::call_once(once, [] {
    // The child of a fork has none of the workers: it leaks the parent's pool object and starts anew.
    pthread_atfork(nullptr, nullptr, [] { pool_slot() = new SpinPool(); });
  });
  static std::mutex create;
  std::lock_guard<std::mutex> lock(create);
  if (pool_slot() == nullptr) pool_slot() = new SpinPool();
  return *pool_slot();
}

inline bool on_main_thread() {
  thread_local const bool main = syscall(SYS_gettid) == getpid();
  return main;
}

// at::parallel_for(begin, end, grain, f) with f(int64_t begin, int64_t end), on the spinning pool.
// Uses at::get_num_threads() threads (the caller's torch setting), the caller included.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t pieces = (range + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  if (threads <= 1 || pieces <= 1 || SpinPool::in_pool()) {
    f(begin, end);
    return;
  }
  if (on_main_thread()) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  // A few chunks per thread balance the load when a thread starts late or shares its core.
  const int64_t chunks = std::min<int64_t>(pieces, threads * 4);
  const int64_t chunk = (range + chunks - 1) / chunks;
  const int workers = static_cast<int>(std::min<int64_t>(threads, chunks) - 1);
  auto task = [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); };
  const int used = static_cast<int>((range + chunk - 1) / chunk);
  if (!pool().run(task, const_cast<F*>(&f), begin, end, chunk, used, workers)) f(begin, end);
}

}  // namespace kvloom
