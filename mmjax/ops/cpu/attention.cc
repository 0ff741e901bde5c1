// mmjax_attention_fwd / mmjax_attention_bwd: softmax attention for training on the CPU, as XLA FFI handlers.
//
//   q [B, T, H, Dh], k and v [B, S, Hkv, Dh] (H = G·Hkv; query head h reads kv head h / G), fp32,
//   mask [Bm, Hm, T, S] bool (Bm in {1, B}, Hm in {1, H}; True = attend) or none,
//
//   P = softmax_s(where(mask, scale · Q Kᵀ, -0.7·FLT_MAX))          [B, H, T, S]
//   O = P V                                                          [B, T, H, Dh]
//
// as jax.nn.dot_product_attention computes it (a fully masked row gets uniform weights). The forward
// can keep P for the backward, which needs no second Q Kᵀ:
//
//   D_t = Σ_d dO[t, d] O[t, d]        dP = dO Vᵀ        dS = where(mask, P ⊙ (dP − D) · scale, 0)
//   dQ = dS K        dK = Σ_g dSᵀ Q        dV = Σ_g Pᵀ dO        (the sums over a kv head's G query heads)
//
// Why: XLA:CPU runs these as batched dots of [T, S] per (b, h) with the softmax, the transposes of
// q/k/v into head-major order and the backward's elementwise terms as separate passes over
// [B, H, T, S] arrays; here each (b, h) (each (b, kv head) in the backward) is one task whose [T, S]
// block stays in the core's cache, and q, k, v, o are read in place with strides (no transposes).
//
// The matrix products use one register-blocked kernel: C[MR, NR] (+)= A[MR, K] · Bp[K, NR] with A read
// through any (row, column) strides as broadcast scalars and B packed into panels two vectors wide:
// per k, 2 panel loads and MR broadcasts feed 2·MR FMAs (AVX2: NR = 16, MR ≤ 6, 12 ymm accumulators,
// the BLIS Haswell shape; AVX-512: NR = 32, MR ≤ 12, 24 zmm). The six products of the forward and
// backward are this kernel with different strides and packings.
//
// Threads: the tasks are spread over XLA's intra-op pool (mmjax::parallel_for in common.h); each thread
// keeps its scratch (the [T, S] block, packed panels) from call to call.
//
// Built by mmjax/ops/cpu/library.py with -mavx2 -mfma (and -mavx512f where the CPU has it); used only
// where the CPU has AVX2 and FMA.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The products' register blocks: two vectors wide. With AVX-512 (built with -mavx512f where the CPU has
// it) zmm, 32 columns and up to 12 rows (24 accumulators of 32 registers); else ymm, 16 and 6 (12 of 16).
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kMR = 12;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kMR = 6;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#endif
constexpr int kNR = 2 * kLanes;  // panel width
constexpr float kMasked = -0.7f * FLT_MAX;  // jax.nn.dot_product_attention's large negative number

// exp(x) for 8 lanes: x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 polynomial (Cephes' expf
// coefficients), 2^n through the exponent bits. Relative error about 2e-7; inputs below -87.3 give 0.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float exp1(float x) {
  alignas(32) float v[8];
  _mm256_store_ps(v, exp256(_mm256_set1_ps(x)));
  return v[0];
}

using mmjax::hmax;
using mmjax::hsum;

// 8 mask bytes → lanes all-ones where the byte is nonzero.
inline __m256 mask8(const uint8_t* m) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
}

// C[i, j] (+)= Σ_k A[i·rs + k·cs] · Bp[k·kNR + j] for i < MR, j < n (n ≤ kNR; C row stride ldc).
template <int MR>
inline void block(int64_t K, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C, int64_t ldc,
                  int n, bool accumulate) {
  Vec c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vzero();
  const float* a = A;
  for (int64_t k = 0; k < K; ++k, a += cs, Bp += kNR) {
    const Vec b0 = vload(Bp), b1 = vload(Bp + kLanes);
    for (int i = 0; i < MR; ++i) {
      const Vec ai = vbroadcast(a + i * rs);
      c0[i] = vfma(ai, b0, c0[i]);
      c1[i] = vfma(ai, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (n == kNR) {
      if (accumulate) {
        c0[i] = vadd(c0[i], vload(c));
        c1[i] = vadd(c1[i], vload(c + kLanes));
      }
      vstore(c, c0[i]);
      vstore(c + kLanes, c1[i]);
    } else {
      float t[kNR];
      vstore(t, c0[i]);
      vstore(t + kLanes, c1[i]);
      for (int j = 0; j < n; ++j) c[j] = accumulate ? c[j] + t[j] : t[j];
    }
  }
}

// block<rows> for the last rows < kMR of a product.
template <int MR>
inline void block_tail(int rows, int64_t K, const float* A, int64_t rs, int64_t cs, const float* Bp, float* C,
                       int64_t ldc, int n, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) return block<MR>(K, A, rs, cs, Bp, C, ldc, n, accumulate);
    block_tail<MR - 1>(rows, K, A, rs, cs, Bp, C, ldc, n, accumulate);
  }
}

// B operand of a product, packed: ceil(N / kNR) panels of [K, kNR] (zero-padded columns), 64-byte aligned.
struct Packed {
  std::vector<float, std::allocator<float>> storage;
  float* data = nullptr;
  int64_t K = 0, N = 0;

  float* reserve(int64_t k, int64_t n) {
    K = k;
    N = n;
    const size_t need = static_cast<size_t>((n + kNR - 1) / kNR) * k * kNR + 16;
    if (storage.size() < need) storage.resize(need);
    data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
    return data;
  }
  const float* panel(int64_t j) const { return data + (j / kNR) * K * kNR; }
};

// B[k, j] = src[k·ld + j]: rows of a matrix as they are (k < K rows, j < N contiguous columns).
void pack_rows(Packed& p, const float* src, int64_t ld, int64_t K, int64_t N) {
  float* d = p.reserve(K, N);
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const int64_t n = std::min<int64_t>(kNR, N - j0);
    for (int64_t k = 0; k < K; ++k, d += kNR) {
      std::memcpy(d, src + k * ld + j0, sizeof(float) * n);
      std::memset(d + n, 0, sizeof(float) * (kNR - n));
    }
  }
}

// B[k, j] = src[j·ld + k]: a matrix transposed (its j-th row holds column j of B).
void pack_cols(Packed& p, const float* src, int64_t ld, int64_t K, int64_t N) {
  float* d = p.reserve(K, N);
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const int64_t n = std::min<int64_t>(kNR, N - j0);
    for (int64_t k = 0; k < K; ++k, d += kNR)
      for (int64_t j = 0; j < kNR; ++j) d[j] = j < n ? src[(j0 + j) * ld + k] : 0.0f;
  }
}

// C[M, N] (+)= A[M, K] · B[K, N], A[i, k] = A[i·rs + k·cs], B packed, C row stride ldc.
void gemm(int64_t M, const float* A, int64_t rs, int64_t cs, const Packed& B, float* C, int64_t ldc,
          bool accumulate) {
  const int64_t K = B.K, N = B.N;
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const float* bp = B.panel(j0);
    const int n = static_cast<int>(std::min<int64_t>(kNR, N - j0));
    int64_t i = 0;
    for (; i + kMR <= M; i += kMR) block<kMR>(K, A + i * rs, rs, cs, bp, C + i * ldc + j0, ldc, n, accumulate);
    if (i < M)
      block_tail<kMR - 1>(static_cast<int>(M - i), K, A + i * rs, rs, cs, bp, C + i * ldc + j0, ldc, n, accumulate);
  }
}

struct Dims {
  int64_t B, T, S, H, Hkv, G, Dh;
  int64_t mask_b_stride = 0, mask_h_stride = 0;  // in mask rows of S bytes; the mask's [T, S] block per (b, h)
  bool has_mask = false;
  float scale = 1.0f;
  int64_t q_row() const { return H * Dh; }    // stride between tokens of q, o, dq, do
  int64_t kv_row() const { return Hkv * Dh; } // of k, v, dk, dv
};

const uint8_t* mask_block(const Dims& d, const uint8_t* mask, int64_t b, int64_t h) {
  return d.has_mask ? mask + (b * d.mask_b_stride + h * d.mask_h_stride) * d.T * d.S : nullptr;
}

// Row t of the logits L [S] → P [S] in place: P = softmax(where(mask, scale·L, kMasked)).
void softmax_row(float* L, const uint8_t* m, int64_t S, float scale) {
  const __m256 vs = _mm256_set1_ps(scale), vmasked = _mm256_set1_ps(kMasked);
  __m256 vmax = _mm256_set1_ps(-FLT_MAX);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(L + s), vs);
    if (m) x = _mm256_blendv_ps(vmasked, x, mask8(m + s));
    _mm256_storeu_ps(L + s, x);
    vmax = _mm256_max_ps(vmax, x);
  }
  float mx = hmax(vmax);
  for (; s < S; ++s) {
    const float x = (m && !m[s]) ? kMasked : L[s] * scale;
    L[s] = x;
    mx = std::max(mx, x);
  }
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(L + s), vmx));
    _mm256_storeu_ps(L + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; s < S; ++s) {
    L[s] = exp1(L[s] - mx);
    sum += L[s];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (s = 0; s + 8 <= S; s += 8) _mm256_storeu_ps(L + s, _mm256_mul_ps(_mm256_loadu_ps(L + s), inv));
  for (; s < S; ++s) L[s] *= 1.0f / sum;
}

// Row t of dP [S] → dS in place: where(mask, P ⊙ (dP − D) · scale, 0).
void dsoftmax_row(float* dP, const float* P, const uint8_t* m, int64_t S, float D, float scale) {
  const __m256 vd = _mm256_set1_ps(D), vs = _mm256_set1_ps(scale);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(P + s), _mm256_sub_ps(_mm256_loadu_ps(dP + s), vd)), vs);
    if (m) g = _mm256_and_ps(g, mask8(m + s));
    _mm256_storeu_ps(dP + s, g);
  }
  for (; s < S; ++s) dP[s] = (m && !m[s]) ? 0.0f : P[s] * (dP[s] - D) * scale;
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct FwdScratch {
  Packed kt, v;
  std::vector<float> logits;
};

struct BwdScratch {
  Packed vt, k, q, dout;
  std::vector<float> dp, dsum;
};

// The dimensions of q [B, T, H, Dh], k and v ([B, S, Hkv, Dh], or head_major [B, Hkv, S, Dh]: a KV
// cache) and the mask [1 or B, 1 or H, T, S].
ffi::Error dims_of(Dims& d, ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, ffi::Span<const int64_t> v,
                   ffi::Span<const int64_t> mask, bool has_mask, float scale, bool head_major = false) {
  const char* name = head_major ? "mmjax_cache_attention" : "mmjax_attention";
  const char* layout = head_major ? "[B, Hkv, S, Dh]" : "[B, S, Hkv, Dh]";
  if (q.size() != 4 || k.size() != 4 || v.size() != 4 || !std::equal(k.begin(), k.end(), v.begin()))
    return ffi::Error::InvalidArgument(std::string(name) + ": q must be [B, T, H, Dh] and k, v " + layout);
  const int64_t hkv = head_major ? k[1] : k[2];
  if (k[0] != q[0] || k[3] != q[3] || hkv == 0 || q[2] % hkv != 0)
    return ffi::Error::InvalidArgument(std::string(name) + ": q [B, T, H, Dh] does not fit k, v " + layout);
  d.B = q[0];
  d.T = q[1];
  d.H = q[2];
  d.Dh = q[3];
  d.S = head_major ? k[2] : k[1];
  d.Hkv = hkv;
  d.G = d.H / d.Hkv;
  d.scale = scale;
  d.has_mask = has_mask;
  if (has_mask) {
    if (mask.size() != 4 || (mask[0] != 1 && mask[0] != d.B) || (mask[1] != 1 && mask[1] != d.H) || mask[2] != d.T ||
        mask[3] != d.S)
      return ffi::Error::InvalidArgument(std::string(name) + ": mask must be [1 or B, 1 or H, T, S]");
    d.mask_h_stride = mask[1] == 1 ? 0 : 1;
    d.mask_b_stride = mask[0] == 1 ? 0 : mask[1];
  }
  return ffi::Error::Success();
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> probs, float scale, bool has_mask, bool keep_probs) {
  Dims d;
  if (auto e = dims_of(d, q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), has_mask, scale);
      e.failure())
    return e;
  if (keep_probs && probs->element_count() != d.B * d.H * d.T * d.S)
    return ffi::Error::InvalidArgument("mmjax_attention_fwd: probs must be [B, H, T, S]");
  if (d.B * d.H == 0 || d.T == 0) return ffi::Error::Success();
  if (d.S == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * out->element_count());
    return ffi::Error::Success();
  }
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const uint8_t* md = reinterpret_cast<const uint8_t*>(mask.typed_data());
  float *od = out->typed_data(), *pd = keep_probs ? probs->typed_data() : nullptr;
  mmjax::parallel_for(pool, d.B * d.H, [&d, qd, kd, vd, md, od, pd](int64_t task) {
    thread_local FwdScratch w;  // kept by each pool thread across calls
    const int64_t b = task / d.H, h = task % d.H, j = h / d.G;
    const float* qb = qd + (b * d.T * d.H + h) * d.Dh;     // Q[t, :] at qb + t·q_row
    const float* kb = kd + (b * d.S * d.Hkv + j) * d.Dh;   // K[s, :] at kb + s·kv_row
    const float* vb = vd + (b * d.S * d.Hkv + j) * d.Dh;
    float* ob = od + (b * d.T * d.H + h) * d.Dh;
    float* P;
    if (pd) {
      P = pd + task * d.T * d.S;
    } else {
      if (w.logits.size() < static_cast<size_t>(d.T * d.S)) w.logits.resize(d.T * d.S);
      P = w.logits.data();
    }
    const uint8_t* m = mask_block(d, md, b, h);
    pack_cols(w.kt, kb, d.kv_row(), d.Dh, d.S);                 // B[d, s] = K[s, d]
    gemm(d.T, qb, d.q_row(), 1, w.kt, P, d.S, false);          // L = Q Kᵀ
    for (int64_t t = 0; t < d.T; ++t) softmax_row(P + t * d.S, m ? m + t * d.S : nullptr, d.S, d.scale);
    pack_rows(w.v, vb, d.kv_row(), d.S, d.Dh);                  // B[s, d] = V[s, d]
    gemm(d.T, P, d.S, 1, w.v, ob, d.q_row(), false);           // O = P V
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> probs,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale, bool has_mask) {
  Dims d;
  if (auto e = dims_of(d, q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), has_mask, scale);
      e.failure())
    return e;
  if (probs.element_count() != d.B * d.H * d.T * d.S || out.element_count() != q.element_count() ||
      dout.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("mmjax_attention_bwd: probs [B, H, T, S], out and dout [B, T, H, Dh]");
  std::memset(dq->typed_data(), 0, sizeof(float) * dq->element_count());
  std::memset(dk->typed_data(), 0, sizeof(float) * dk->element_count());
  std::memset(dv->typed_data(), 0, sizeof(float) * dv->element_count());
  if (d.B * d.H == 0 || d.T == 0 || d.S == 0) return ffi::Error::Success();
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data(), *pd = probs.typed_data();
  const float *od = out.typed_data(), *dod = dout.typed_data();
  const uint8_t* md = reinterpret_cast<const uint8_t*>(mask.typed_data());
  float *dqd = dq->typed_data(), *dkd = dk->typed_data(), *dvd = dv->typed_data();
  mmjax::parallel_for(pool, d.B * d.Hkv, [&](int64_t task) {
    thread_local BwdScratch w;
    const int64_t b = task / d.Hkv, j = task % d.Hkv;
    const float* kb = kd + (b * d.S * d.Hkv + j) * d.Dh;
    const float* vb = vd + (b * d.S * d.Hkv + j) * d.Dh;
    float* dkb = dkd + (b * d.S * d.Hkv + j) * d.Dh;
    float* dvb = dvd + (b * d.S * d.Hkv + j) * d.Dh;
    pack_cols(w.vt, vb, d.kv_row(), d.Dh, d.S);  // B[d, s] = V[s, d]
    pack_rows(w.k, kb, d.kv_row(), d.S, d.Dh);   // B[s, d] = K[s, d]
    if (w.dp.size() < static_cast<size_t>(d.T * d.S)) w.dp.resize(d.T * d.S);
    if (w.dsum.size() < static_cast<size_t>(d.T)) w.dsum.resize(d.T);
    float* dS = w.dp.data();
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t h = j * d.G + g;
      const int64_t off = (b * d.T * d.H + h) * d.Dh;  // Q[t, :], O, dO, dQ at off + t·q_row
      const float* P = pd + (b * d.H + h) * d.T * d.S;
      const uint8_t* m = mask_block(d, md, b, h);
      for (int64_t t = 0; t < d.T; ++t)
        w.dsum[t] = dot(dod + off + t * d.q_row(), od + off + t * d.q_row(), d.Dh);
      gemm(d.T, dod + off, d.q_row(), 1, w.vt, dS, d.S, false);  // dP = dO Vᵀ
      for (int64_t t = 0; t < d.T; ++t)
        dsoftmax_row(dS + t * d.S, P + t * d.S, m ? m + t * d.S : nullptr, d.S, w.dsum[t], d.scale);
      gemm(d.T, dS, d.S, 1, w.k, dqd + off, d.q_row(), false);  // dQ = dS K
      pack_rows(w.q, qd + off, d.q_row(), d.T, d.Dh);             // B[t, d] = Q[t, d]
      gemm(d.S, dS, 1, d.S, w.q, dkb, d.kv_row(), true);          // dK += dSᵀ Q
      pack_rows(w.dout, dod + off, d.q_row(), d.T, d.Dh);         // B[t, d] = dO[t, d]
      gemm(d.S, P, 1, d.S, w.dout, dvb, d.kv_row(), true);        // dV += Pᵀ dO
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------------
// mmjax_cache_attention: the same softmax attention (forward only) over a head-major KV cache,
//
//   q [B, T, H, Dh], k and v [B, Hkv, S, Dh], mask [Bm, Hm, T, S] or none → out [B, T, H, Dh],
//
// for generation: T is a decoding chunk (1 token, or a prompt at prefill) and S the cache's slots, of
// which the causal mask hides those not written yet. Each (b, kv head) is one task; it reads only the
// slots [lo, hi) between the first and the last one that any of its T·G query rows may see, so a
// decoding step reads the filled part of the cache, not all S slots. Within [lo, hi) masked slots get
// -0.7·FLT_MAX as in the forward above (their weight is exactly 0 beside any visible slot), so the result
// is the softmax over all S. A row that may see no slot gets uniform weights over all S (the mean of V),
// as jax.nn.dot_product_attention gives it. Slots are visited in blocks of 8: a block of K (8 rows of
// Dh) meets each query row in 8 accumulators summed across lanes at the end, and the block of V is
// added into each row's output, while both stay in L1. (Software prefetch of K ahead and of V during
// the logits pass measured the same, within the noise, so there is none.)
// ------------------------------------------------------------------------------------------------

struct CacheScratch {
  std::vector<float> logits;
  std::vector<char> live;
};

constexpr int kSlotBlock = 8;

// L[i] = q · k_{s+i}, i < 8, for 8 consecutive cache rows (stride Dh).
inline void logits8(const float* q, const float* k, int64_t Dh, float* L) {
  __m256 a[kSlotBlock];
  for (int i = 0; i < kSlotBlock; ++i) a[i] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= Dh; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int i = 0; i < kSlotBlock; ++i) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(k + i * Dh + e), qv, a[i]);
  }
  _mm256_storeu_ps(L, mmjax::lane_sums(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
  for (; e < Dh; ++e)
    for (int i = 0; i < kSlotBlock; ++i) L[i] += q[e] * k[i * Dh + e];
}

// o[:] += Σ_{i<n} p[i] · v_{s+i}[:] for n ≤ 8 consecutive cache rows (stride Dh).
inline void accumulate_rows(float* o, const float* p, const float* v, int n, int64_t Dh) {
  int64_t e = 0;
  for (; e + 8 <= Dh; e += 8) {
    __m256 acc = _mm256_loadu_ps(o + e);
    for (int i = 0; i < n; ++i) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i), _mm256_loadu_ps(v + i * Dh + e), acc);
    _mm256_storeu_ps(o + e, acc);
  }
  for (; e < Dh; ++e)
    for (int i = 0; i < n; ++i) o[e] += p[i] * v[i * Dh + e];
}

ffi::Error CacheAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                          float scale, bool has_mask) {
  Dims d;
  if (auto e = dims_of(d, q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), has_mask, scale,
                       /*head_major=*/true);
      e.failure())
    return e;
  float* od = out->typed_data();
  std::memset(od, 0, sizeof(float) * out->element_count());
  if (d.B * d.H == 0 || d.T == 0 || d.S == 0) return ffi::Error::Success();
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const uint8_t* md = reinterpret_cast<const uint8_t*>(mask.typed_data());
  mmjax::parallel_for(pool, d.B * d.Hkv, [&d, qd, kd, vd, md, od](int64_t task) {
    thread_local CacheScratch w;
    const int64_t b = task / d.Hkv, j = task % d.Hkv, R = d.T * d.G, Dh = d.Dh, S = d.S;
    const float* kb = kd + task * S * Dh;  // slot s of this (b, kv head) at kb + s·Dh
    const float* vb = vd + task * S * Dh;
    // Row r = t·G + g is query head h = j·G + g of token t.
    auto q_row = [&](int64_t r) { return qd + ((b * d.T + r / d.G) * d.H + j * d.G + r % d.G) * Dh; };
    auto o_row = [&](int64_t r) { return od + ((b * d.T + r / d.G) * d.H + j * d.G + r % d.G) * Dh; };
    auto m_row = [&](int64_t r) -> const uint8_t* {
      const uint8_t* m = mask_block(d, md, b, j * d.G + r % d.G);
      return m ? m + (r / d.G) * S : nullptr;
    };
    // The slots any row may see; a row that sees none gets uniform weights over all S slots.
    if (w.live.size() < static_cast<size_t>(R)) w.live.resize(R);
    int64_t lo = 0, hi = S;
    if (d.has_mask) {
      lo = S;
      hi = 0;
      for (int64_t r = 0; r < R; ++r) {
        const uint8_t* m = m_row(r);
        int64_t a = 0, z = S;
        while (a < S && !m[a]) ++a;
        while (z > a && !m[z - 1]) --z;
        w.live[r] = a < z;
        if (a < z) {
          lo = std::min(lo, a);
          hi = std::max(hi, z);
          continue;
        }
        float* o = o_row(r);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t e = 0; e < Dh; ++e) o[e] += vb[s * Dh + e];
        for (int64_t e = 0; e < Dh; ++e) o[e] /= static_cast<float>(S);
      }
      if (lo >= hi) return;
    } else {
      std::fill(w.live.begin(), w.live.begin() + R, 1);
    }
    const int64_t n = hi - lo;
    if (w.logits.size() < static_cast<size_t>(R * n)) w.logits.resize(R * n);
    float* L = w.logits.data();  // [R, n]: logits, then weights, of slots lo..hi-1
    // Logits, a block of 8 slots at a time against every row.
    int64_t s = 0;
    for (; s + kSlotBlock <= n; s += kSlotBlock)
      for (int64_t r = 0; r < R; ++r) logits8(q_row(r), kb + (lo + s) * Dh, Dh, L + r * n + s);
    for (; s < n; ++s)
      for (int64_t r = 0; r < R; ++r) L[r * n + s] = dot(q_row(r), kb + (lo + s) * Dh, Dh);
    for (int64_t r = 0; r < R; ++r)
      if (w.live[r]) softmax_row(L + r * n, d.has_mask ? m_row(r) + lo : nullptr, n, d.scale);
    // out = P V over the same blocks.
    for (s = 0; s < n; s += kSlotBlock) {
      const int nb = static_cast<int>(std::min<int64_t>(kSlotBlock, n - s));
      for (int64_t r = 0; r < R; ++r)
        if (w.live[r]) accumulate_rows(o_row(r), L + r * n + s, vb + (lo + s) * Dh, nb, Dh);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_mask")
                                  .Attr<bool>("keep_probs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_mask"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmjaxCacheAttention, CacheAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("has_mask"));
