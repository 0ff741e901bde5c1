// mmjax_rowdot: y = x · W for a few rows x, with W stored output-major, as an XLA:CPU FFI handler.
//
//   wt [N, K] (W transposed: one contiguous row of K inputs per output), x [M, K], y [M, N], fp32,
//   row-major:   y[m, n] = Σ_k wt[n, k] · x[m, k]
//
// A decode step multiplies the batch's few rows by every weight of the model once, so the product is
// as fast as the weights stream from memory. The kernel reads wt once, front to back. A tile of
// NB = 3 wt rows meets R ≤ 4 rows of x (which stay in L1) in NB·R = 12 independent AVX2
// accumulators: per 8 inputs, 3 + 4 loads feed 12 FMAs, enough in flight to cover the FMA latency
// and within the 16 ymm registers. Groups of 4 x rows re-read the tile's wt rows from L1. The next
// tile's rows are prefetched, which on a 2-core AMD EPYC (Zen 2) took one thread from 6 to 8 GB/s
// of weights at 8 rows. Lanes are summed at the end of a tile (hadd tree) and stored as scalars.
//
// Threads: chunks of wt rows are spread over XLA's intra-op pool (mmjax::parallel_for in common.h).
//
// Built by mmjax/ops/cpu/library.py with -mavx2 -mfma; used only where the CPU has both.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTileRows = 3;     // NB: wt rows per tile
constexpr int kXRows = 4;        // R: x rows per pass over a tile
constexpr int kPrefetchRows = 3; // prefetch distance, in wt rows (the next tile)

// The first `rem` lanes on (rem in 1..7): loads of the last K % 8 inputs.
inline __m256i tail_mask(int64_t rem) {
  alignas(32) static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - rem));
}

using mmjax::lane_sums;

// y[r, n + b] for b < NB, r < R: wt rows w[b·K ...], x rows xr[r·K ...], y rows yr[r·N ...].
template <int NB, int R>
inline void tile(const float* w, const float* xr, float* yr, int64_t N, int64_t K, int64_t n, __m256i mask) {
  const int64_t k8 = K - K % 8;
  __m256 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NB];
    for (int b = 0; b < NB; ++b) {
      wv[b] = _mm256_loadu_ps(w + b * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (b + kPrefetchRows) * K + k), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xr + r * K + k);
      for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(wv[b], xv, acc[b][r]);
    }
  }
  if (k8 < K) {
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(xr + r * K + k8, mask);
      for (int b = 0; b < NB; ++b)
        acc[b][r] = _mm256_fmadd_ps(_mm256_maskload_ps(w + b * K + k8, mask), xv, acc[b][r]);
    }
  }
  constexpr int kAcc = NB * R;
  constexpr int kPadded = (kAcc + 7) / 8 * 8;
  __m256 flat[kPadded];
  for (int i = 0; i < kPadded; ++i) flat[i] = i < kAcc ? acc[i / R][i % R] : _mm256_setzero_ps();
  alignas(32) float sums[kPadded];
  for (int i = 0; i < kPadded; i += 8)
    _mm256_store_ps(sums + i, lane_sums(flat[i], flat[i + 1], flat[i + 2], flat[i + 3], flat[i + 4], flat[i + 5],
                                        flat[i + 6], flat[i + 7]));
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) yr[r * N + n + b] = sums[b * R + r];
}

// Every x row against tiles of NB wt rows starting at n.
template <int NB>
inline void all_rows(const float* wt, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n,
                     __m256i mask) {
  const float* w = wt + n * K;
  int64_t m = 0;
  for (; m + kXRows <= M; m += kXRows) tile<NB, kXRows>(w, x + m * K, y + m * N, N, K, n, mask);
  switch (M - m) {
    case 1: tile<NB, 1>(w, x + m * K, y + m * N, N, K, n, mask); break;
    case 2: tile<NB, 2>(w, x + m * K, y + m * N, N, K, n, mask); break;
    case 3: tile<NB, 3>(w, x + m * K, y + m * N, N, K, n, mask); break;
    default: break;
  }
}

// y[:, n0:n1].
void columns(const float* wt, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const __m256i mask = tail_mask(K % 8 == 0 ? 8 : K % 8);
  int64_t n = n0;
  for (; n + kTileRows <= n1; n += kTileRows) all_rows<kTileRows>(wt, x, y, M, N, K, n, mask);
  for (; n < n1; ++n) all_rows<1>(wt, x, y, M, N, K, n, mask);
}

ffi::Error RowDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> wt, ffi::Buffer<ffi::F32> x,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = wt.dimensions();
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (wd.size() != 2 || xd.size() != 2 || yd.size() != 2 || wd[1] != xd[1] || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("mmjax_rowdot: expects wt [N, K], x [M, K] and y [M, N]");
  const int64_t N = wd[0], K = wd[1], M = xd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* w = wt.typed_data();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // About 192 KiB of weights per chunk (whole tiles). Longer runs of contiguous rows stream faster (the
  // hardware prefetcher ramps up on each new run): on a decoder's matmul chain, 8 rows, 48 KiB chunks
  // took 15.3-16.3 ms, 192 KiB 13.7-14.1, 384 KiB 14.3, 768 KiB 14.9 (alternated medians).
  const int64_t chunk = std::max<int64_t>(1, 49152 / std::max<int64_t>(K, 1) / kTileRows) * kTileRows;
  mmjax::parallel_for(pool, (N + chunk - 1) / chunk, [=](int64_t c) {
    columns(w, xp, yp, M, N, K, c * chunk, std::min(N, c * chunk + chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxRowDot, RowDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// mmjax_transpose: y [N, K] = x [K, N]ᵀ, fp32: the output-major copies of the kernels that rowdot
// multiplies, made once per generation call. XLA:CPU transposed a decoder's 167 MB of kernels at 3.2-3.5
// GB/s (reads + writes; 5.9-6.9 with huge pages) on a 2-core AMD EPYC, this at 5.8-7.0 (8.3-9.6); here 8×8 blocks are transposed in registers (unpack /
// shuffle / permute, the classic AVX2 sequence) within 32×32 tiles, so each cache line read or written
// is used whole, and the tiles' rows of y are split over XLA's intra-op threads.
namespace {

inline void transpose8(const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m256 r0 = _mm256_loadu_ps(x + 0 * ldx), r1 = _mm256_loadu_ps(x + 1 * ldx);
  __m256 r2 = _mm256_loadu_ps(x + 2 * ldx), r3 = _mm256_loadu_ps(x + 3 * ldx);
  __m256 r4 = _mm256_loadu_ps(x + 4 * ldx), r5 = _mm256_loadu_ps(x + 5 * ldx);
  __m256 r6 = _mm256_loadu_ps(x + 6 * ldx), r7 = _mm256_loadu_ps(x + 7 * ldx);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(y + 0 * ldy, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(y + 1 * ldy, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(y + 2 * ldy, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(y + 3 * ldy, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(y + 4 * ldy, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(y + 5 * ldy, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(y + 6 * ldy, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(y + 7 * ldy, _mm256_permute2f128_ps(s3, s7, 0x31));
}

constexpr int64_t kTile = 32;

// y[n0:n1, :] = x[:, n0:n1]ᵀ, x [K, N], y [N, K].
void transpose_rows(const float* x, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k1 = std::min(K, k0 + kTile);
    for (int64_t n = n0; n < n1; n += 8) {
      int64_t k = k0;
      if (n + 8 <= n1)
        for (; k + 8 <= k1; k += 8) transpose8(x + k * N + n, N, y + n * K + k, K);
      for (int64_t nn = n; nn < std::min(n + 8, n1); ++nn)  // the edges, element by element
        for (int64_t kk = (n + 8 <= n1 ? k : k0); kk < k1; ++kk) y[nn * K + kk] = x[kk * N + nn];
    }
  }
}

ffi::Error Transpose(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[1] || yd[1] != xd[0])
    return ffi::Error::InvalidArgument("mmjax_transpose: expects x [K, N] and y [N, K]");
  const int64_t K = xd[0], N = xd[1];
  if (K == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t chunk = kTile;  // rows of y per task
  mmjax::parallel_for(pool, (N + chunk - 1) / chunk, [=](int64_t c) {
    transpose_rows(xp, yp, K, N, c * chunk, std::min(N, c * chunk + chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxTranspose, Transpose,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
