// mmjax_norm_fwd / mmjax_norm_bwd: LayerNorm and RMSNorm over the last axis, as XLA FFI handlers.
//
//   x [N, D] fp32 rows, scale γ [D], bias β [D] (LayerNorm; may be empty), eps:
//   LayerNorm:  μ = mean(x),  r = 1/sqrt(mean((x − μ)²) + eps),  x̂ = (x − μ)·r,  y = x̂·γ + β
//   RMSNorm:    μ = 0,        r = 1/sqrt(mean(x²) + eps),        x̂ = x·r,        y = x̂·γ
//
// The forward also returns μ and r [N] for the backward, which with g = dy·γ computes
//
//   dx = r·(g − mean(g) − x̂·mean(g·x̂))      (RMSNorm: without the mean(g) term)
//   dγ = Σ_rows dy·x̂,   dβ = Σ_rows dy
//
// in one pass over dy and x per row. XLA:CPU spread the backward over several fusions that each read
// four or five [N, D] arrays (tiny CLIP: about 3.5 ms per LayerNorm backward of [8320, 128]).
//
// Threads: rows in fixed chunks, spread over XLA's intra-op pool (mmjax::parallel_for in common.h).
// Each chunk writes its partial dγ, dβ to a row of its own, summed in chunk order at the end, so the
// result does not depend on which thread ran which chunk.
//
// Built by mmjax/ops/cpu/library.py with -mavx2 -mfma; used only where the CPU has both.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mmjax::hsum;
using mmjax::parallel_for;

constexpr int64_t kChunkRows = 64;

// Σ a[i] and Σ a[i]·b[i] (b may be null) over n floats.
inline void sums(const float* a, const float* b, int64_t n, float& s1, float& s2) {
  __m256 v1 = _mm256_setzero_ps(), v2 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(a + i);
    v1 = _mm256_add_ps(v1, x);
    if (b) v2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i), v2);
  }
  s1 = hsum(v1);
  s2 = hsum(v2);
  for (; i < n; ++i) {
    s1 += a[i];
    if (b) s2 += a[i] * b[i];
  }
}

ffi::Error NormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float eps, bool rms) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("mmjax_norm_fwd: x must be [N, D]");
  const int64_t N = xd[0], D = xd[1];
  const bool has_bias = bias.element_count() != 0;
  if (scale.element_count() != D || (has_bias && bias.element_count() != D) || y->element_count() != N * D ||
      mean->element_count() != N || rstd->element_count() != N)
    return ffi::Error::InvalidArgument("mmjax_norm_fwd: scale and bias [D], y [N, D], mean and rstd [N]");
  if (N == 0 || D == 0) return ffi::Error::Success();
  const float *xp = x.typed_data(), *gp = scale.typed_data(), *bp = has_bias ? bias.typed_data() : nullptr;
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  const float inv_d = 1.0f / static_cast<float>(D);
  parallel_for(pool, (N + kChunkRows - 1) / kChunkRows, [=](int64_t c) {
    for (int64_t n = c * kChunkRows, end = std::min(N, n + kChunkRows); n < end; ++n) {
      const float* xr = xp + n * D;
      float* yr = yp + n * D;
      float mu = 0.0f, ss = 0.0f, unused;
      if (!rms) {
        sums(xr, nullptr, D, mu, unused);
        mu *= inv_d;
      }
      // Second pass over the row (in L1): Σ (x − μ)², as jnp.mean(jnp.square(x - mean)).
      const __m256 vmu = _mm256_set1_ps(mu);
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        const __m256 c0 = _mm256_sub_ps(_mm256_loadu_ps(xr + i), vmu);
        acc = _mm256_fmadd_ps(c0, c0, acc);
      }
      ss = hsum(acc);
      for (; i < D; ++i) ss += (xr[i] - mu) * (xr[i] - mu);
      const float r = 1.0f / std::sqrt(ss * inv_d + eps);
      mp[n] = mu;
      rp[n] = r;
      const __m256 vr = _mm256_set1_ps(r);
      for (i = 0; i + 8 <= D; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vmu), vr),
                                 _mm256_loadu_ps(gp + i));
        if (bp) v = _mm256_add_ps(v, _mm256_loadu_ps(bp + i));
        _mm256_storeu_ps(yr + i, v);
      }
      for (; i < D; ++i) yr[i] = (xr[i] - mu) * r * gp[i] + (bp ? bp[i] : 0.0f);
    }
  });
  return ffi::Error::Success();
}

ffi::Error NormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                   ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                   ffi::ResultBuffer<ffi::F32> dbias, bool rms) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("mmjax_norm_bwd: x must be [N, D]");
  const int64_t N = xd[0], D = xd[1];
  if (scale.element_count() != D || mean.element_count() != N || rstd.element_count() != N ||
      dy.element_count() != N * D || dx->element_count() != N * D || dscale->element_count() != D ||
      dbias->element_count() != D)
    return ffi::Error::InvalidArgument("mmjax_norm_bwd: scale, dscale, dbias [D]; mean, rstd [N]; dy, dx [N, D]");
  float *dgp = dscale->typed_data(), *dbp = dbias->typed_data();
  std::fill(dgp, dgp + D, 0.0f);
  std::fill(dbp, dbp + D, 0.0f);
  if (N == 0 || D == 0) return ffi::Error::Success();
  const float *xp = x.typed_data(), *gp = scale.typed_data(), *mp = mean.typed_data(), *rp = rstd.typed_data();
  const float* dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  std::vector<float> partial(static_cast<size_t>(chunks) * 2 * D);  // per chunk: dγ [D], then dβ [D]
  float* pp = partial.data();
  const float inv_d = 1.0f / static_cast<float>(D);
  parallel_for(pool, chunks, [=](int64_t c) {
    float* pg = pp + c * 2 * D;
    float* pb = pg + D;
    std::vector<float> xhat(D), g(D);
    for (int64_t n = c * kChunkRows, end = std::min(N, n + kChunkRows); n < end; ++n) {
      const float *xr = xp + n * D, *dyr = dyp + n * D;
      const float mu = rms ? 0.0f : mp[n], r = rp[n];
      const __m256 vmu = _mm256_set1_ps(mu), vr = _mm256_set1_ps(r);
      __m256 sg = _mm256_setzero_ps(), sgx = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), vmu), vr);
        const __m256 d = _mm256_loadu_ps(dyr + i);
        const __m256 gi = _mm256_mul_ps(d, _mm256_loadu_ps(gp + i));
        _mm256_storeu_ps(xhat.data() + i, xh);
        _mm256_storeu_ps(g.data() + i, gi);
        sg = _mm256_add_ps(sg, gi);
        sgx = _mm256_fmadd_ps(gi, xh, sgx);
        _mm256_storeu_ps(pg + i, _mm256_fmadd_ps(d, xh, _mm256_loadu_ps(pg + i)));
        _mm256_storeu_ps(pb + i, _mm256_add_ps(d, _mm256_loadu_ps(pb + i)));
      }
      float s_g = hsum(sg), s_gx = hsum(sgx);
      for (; i < D; ++i) {
        xhat[i] = (xr[i] - mu) * r;
        g[i] = dyr[i] * gp[i];
        s_g += g[i];
        s_gx += g[i] * xhat[i];
        pg[i] += dyr[i] * xhat[i];
        pb[i] += dyr[i];
      }
      const float mg = rms ? 0.0f : s_g * inv_d, mgx = s_gx * inv_d;
      const __m256 vmg = _mm256_set1_ps(mg), vmgx = _mm256_set1_ps(mgx);
      float* dxr = dxp + n * D;
      for (i = 0; i + 8 <= D; i += 8) {
        const __m256 t = _mm256_fnmadd_ps(_mm256_loadu_ps(xhat.data() + i), vmgx,
                                          _mm256_sub_ps(_mm256_loadu_ps(g.data() + i), vmg));
        _mm256_storeu_ps(dxr + i, _mm256_mul_ps(t, vr));
      }
      for (; i < D; ++i) dxr[i] = (g[i] - mg - xhat[i] * mgx) * r;
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < D; ++i) {
      dgp[i] += pp[c * 2 * D + i];
      dbp[i] += pp[c * 2 * D + D + i];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxNormFwd, NormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("rms"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxNormBwd, NormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rms"));
