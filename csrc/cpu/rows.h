// Row-segmented parallel loop for [N, M] tensors whose per-example coefficients depend
// only on the row: the flat range [0, N*M) is split across threads (so N = 1 with a large
// M parallelises as well as a large N), and each thread walks its range row segment by
// row segment, computing the row's coefficients once per segment.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace dbx::cpu {

// Elements per task: below this the threading overhead exceeds the work.
constexpr int64_t kGrain = 32768;

// fn(row, col_begin, col_end, flat_begin)
template <typename Fn>
void for_each_row_segment(int64_t rows, int64_t cols, const Fn& fn) {
  if (rows == 0 || cols == 0) return;
  at::parallel_for(0, rows * cols, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / cols, col = i - row * cols;
      const int64_t len = std::min(cols - col, end - i);
      fn(row, col, col + len, i);
      i += len;
    }
  });
}

}  // namespace dbx::cpu
