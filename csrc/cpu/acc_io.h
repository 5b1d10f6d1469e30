// Loads and stores of a kernel's input dtype as vectors of its accumulation dtype:
// float32/float64 as they are, bfloat16/float16 widened to float32. A "pack" is
// Vectorized<scalar_t>::size() elements, held as kVecs accumulation vectors (1, or 2 for
// the 16-bit types), so one loop body serves all four dtypes.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace dbx::cpu {

template <typename scalar_t> struct AccIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Raw = at::vec::Vectorized<scalar_t>;
  static constexpr bool kReduced = !std::is_same_v<acc_t, scalar_t>;
  static constexpr int64_t kSize = Raw::size();        // elements per pack
  static constexpr int64_t kVecs = kSize / Vec::size();  // accumulation vectors per pack

  // A full pack.
  static inline void load(const scalar_t* p, Vec* v) {
    if constexpr (kReduced) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(Raw::loadu(p));
      v[0] = a;
      v[1] = b;
    } else {
      v[0] = Vec::loadu(p);
    }
  }
  // The first n < kSize elements; the other lanes read as 0.
  static inline void load(const scalar_t* p, int64_t n, Vec* v) {
    if constexpr (kReduced) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(Raw::loadu(p, n));
      v[0] = a;
      v[1] = b;
    } else {
      v[0] = Vec::loadu(p, n);
    }
  }
  static inline void store(scalar_t* p, const Vec* v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
  static inline void store(scalar_t* p, int64_t n, const Vec* v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, static_cast<int>(n));
    } else {
      v[0].store(p, static_cast<int>(n));
    }
  }
  // Lane-wise: lanes [0, n) of the pack from v, the rest `fill` (for masked reductions).
  static inline void mask_tail(Vec* v, int64_t n, acc_t fill) {
    for (int64_t k = 0; k < kVecs; ++k) {
      const int64_t live = n - k * Vec::size();
      if (live <= 0) {
        v[k] = Vec(fill);
      } else if (live < Vec::size()) {
        v[k] = Vec::set(Vec(fill), v[k], live);
      }
    }
  }
};

}  // namespace dbx::cpu
