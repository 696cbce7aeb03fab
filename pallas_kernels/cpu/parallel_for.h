// Splitting a kernel's work over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace fineserve {

// Calls fn(begin, end) over [0, units) in pieces of at most `chunk`, on the calling thread
// and on pool tasks, and returns when all are done. Pieces are taken from a shared counter,
// so the caller never waits on a task that has not started (it does the work itself); the
// state outlives tasks that start late and find nothing left.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t units, int64_t chunk, Fn fn) {
  struct State {
    explicit State(Fn f) : fn(std::move(f)) {}
    Fn fn;
    int64_t units = 0, chunk = 1;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (;;) {
        const int64_t begin = next.fetch_add(chunk);
        if (begin >= units) return;
        const int64_t end = std::min(units, begin + chunk);
        fn(begin, end);
        done.fetch_add(end - begin, std::memory_order_release);
      }
    }
  };
  if (units <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  auto state = std::make_shared<State>(std::move(fn));
  state->units = units;
  state->chunk = chunk;
  const int64_t pieces = (units + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), pieces) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < units) {
    std::this_thread::yield();  // the last pieces are with tasks that have started
  }
}

}  // namespace fineserve
