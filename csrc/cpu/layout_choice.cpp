#include "layout_choice.h"

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <tuple>

namespace mtp::cpu {
namespace {

// The trial order (1: vocabulary-major): each layout early and late, so that a drift of the
// machine's speed during the trials weighs on both alike.
constexpr std::array<bool, 6> kTrials = {false, true, true, false, false, true};

struct Trial {
  int next = 0;                          // chunks handed out
  std::vector<double> per_row[2];        // seconds per row: row-major, vocabulary-major
  int choice = -1;                       // -1 trying, else 0 or 1
};

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t>;

std::mutex g_mutex;
std::map<Key, Trial>& trials() {
  static std::map<Key, Trial> t;
  return t;
}

Key key_of(const ChunkShape& s) {
  return {static_cast<int>(s.dtype), s.chunk_rows, s.D, s.V, s.work};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

bool large(const ChunkShape& s) {
  return double(s.chunk_rows) * double(s.D) * double(s.V) >= kLayoutTrialWork;
}

}  // namespace

bool choose_vocab_major(const ChunkShape& shape, bool fallback) {
  if (!large(shape)) return fallback;
  std::lock_guard<std::mutex> lock(g_mutex);
  Trial& t = trials()[key_of(shape)];
  if (t.choice >= 0) return t.choice == 1;
  // Past the trial order (chunks handed out but not yet timed, on other threads): the default.
  return t.next < int(kTrials.size()) ? kTrials[t.next++] : fallback;
}

void record_chunk_time(const ChunkShape& shape, bool vocab_major, int64_t c, double seconds) {
  if (!large(shape) || c <= 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  Trial& t = trials()[key_of(shape)];
  if (t.choice >= 0) return;
  t.per_row[vocab_major].push_back(seconds / double(c));
  const size_t each = kTrials.size() / 2;
  if (t.per_row[0].size() >= each && t.per_row[1].size() >= each) {
    t.choice = median(t.per_row[1]) < median(t.per_row[0]) ? 1 : 0;
  }
}

std::vector<std::vector<double>> layout_trials() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::vector<double>> out;
  for (const auto& [k, t] : trials()) {
    out.push_back({double(std::get<0>(k)), double(std::get<1>(k)), double(std::get<2>(k)),
                   double(std::get<3>(k)), double(std::get<4>(k)), double(t.choice),
                   median(t.per_row[0]) * 1e6, median(t.per_row[1]) * 1e6,
                   double(t.per_row[0].size() + t.per_row[1].size())});
  }
  return out;
}

}  // namespace mtp::cpu
