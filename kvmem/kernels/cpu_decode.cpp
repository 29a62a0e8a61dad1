// kvmem's CPU decode attention: one query per head (a decode step) over [kv_heads, n, dim] float32 keys and
// values, grouped heads packed, keys read once and values read once, from the cache's own storage (any head and
// position strides, the last axis contiguous). Built on first use by kvmem/kernels/cpu_decode.py
// (torch.utils.cpp_extension, -march of the machine that builds it); the oracle is torch's sdpa.
//
// Each (kv head, run of keys) is one task on torch's intra-op threads; a task walks its keys in blocks of BLK:
// the block's scores q.k for every query of the group, the running max and sum of exp (online softmax), then
// the block's values weighted into the group's accumulators, which stay in registers over the block. The runs
// of a head are merged by their maxima and sums at the end (flash-decoding). Same products and sums as any
// sdpa kernel, in another order; exp is a degree-6 polynomial (a few ulp), as vectorised exps are.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t BLK = 128;

#ifdef __AVX512F__
// exp(x) for x <= 0 (a score minus its row's max): 2^n * p(r), Cephes' expf polynomial; x < -87.3 gives 0
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(lo, x);  // a NaN score stays NaN (max returns its second operand when one is NaN), as in sdpa
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  y = _mm512_scalef_ps(y, fx);
  return _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
}

// One task: queries q [g, D] (scaled) over keys/values [a, b) of one head; acc [g, D] (unnormalised), m, l [g].
template <int D>
void run_keys(const float* q, const float* K, const float* V, int64_t ksn, int64_t vsn, int64_t a, int64_t b,
              int64_t g, float* acc, float* m, float* l, float* s) {
  constexpr int W = D / 16;
  for (int64_t r = 0; r < g; ++r) { m[r] = -INFINITY; l[r] = 0.f; }
  std::fill(acc, acc + g * D, 0.f);
  for (int64_t j0 = a; j0 < b; j0 += BLK) {
    const int64_t nb = std::min(BLK, b - j0);
    for (int64_t j = 0; j < nb; ++j) {  // scores: the key row read once, dotted with each query of the group
      const float* kr = K + (j0 + j) * ksn;
      __m512 kw[W];
      for (int w = 0; w < W; ++w) kw[w] = _mm512_loadu_ps(kr + 16 * w);
      for (int64_t r = 0; r < g; ++r) {
        const float* qr = q + r * D;
        __m512 t = _mm512_mul_ps(_mm512_loadu_ps(qr), kw[0]);
        for (int w = 1; w < W; ++w) t = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * w), kw[w], t);
        s[r * BLK + j] = _mm512_reduce_add_ps(t);
      }
    }
    for (int64_t r = 0; r < g; ++r) {  // online softmax: the block's exps against the running max
      float* sr = s + r * BLK;
      float bm = -INFINITY;
      for (int64_t j = 0; j < nb; ++j) bm = std::max(bm, sr[j]);
      const float mn = std::max(m[r], bm);
      const float alpha = std::exp(m[r] - mn);  // 0 for the first block (m = -inf)
      __m512 vs = _mm512_setzero_ps();
      const __m512 vm = _mm512_set1_ps(mn);
      int64_t j = 0;
      for (; j + 16 <= nb; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm));
        _mm512_storeu_ps(sr + j, e);
        vs = _mm512_add_ps(vs, e);
      }
      if (j < nb) {
        const __mmask16 k = static_cast<__mmask16>((1u << (nb - j)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sr + j), vm));
        _mm512_mask_storeu_ps(sr + j, k, e);
        vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(k, e));
      }
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(vs);
      m[r] = mn;
      if (alpha != 1.f) for (int64_t c = 0; c < D; ++c) acc[r * D + c] *= alpha;
    }
    for (int64_t r = 0; r < g; ++r) {  // values: the block's rows (in L1 after the first query) weighted in
      float* o = acc + r * D;
      const float* pr = s + r * BLK;
      __m512 ow[W];
      for (int w = 0; w < W; ++w) ow[w] = _mm512_loadu_ps(o + 16 * w);
      for (int64_t j = 0; j < nb; ++j) {
        const float* vr = V + (j0 + j) * vsn;
        const __m512 p = _mm512_set1_ps(pr[j]);
        for (int w = 0; w < W; ++w) ow[w] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * w), ow[w]);
      }
      for (int w = 0; w < W; ++w) _mm512_storeu_ps(o + 16 * w, ow[w]);
    }
  }
}
#endif

}  // namespace

bool vectorized() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// q [kv_heads, g, D] float32 contiguous (unscaled); k, v [kv_heads, n, D] float32, last axis contiguous; parts:
// runs of keys per head (>= 1). Returns [kv_heads, g, D] float32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t parts) {
  TORCH_CHECK(vectorized(), "kvmem cpu_decode: built without AVX-512");
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "kvmem cpu_decode: float32 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "kvmem cpu_decode: q [h, g, d], k/v [h, n, d]");
  TORCH_CHECK(!q.is_cuda() && !k.is_cuda() && !v.is_cuda(), "kvmem cpu_decode: CPU tensors only");
  const int64_t H = k.size(0), n = k.size(1), D = k.size(2), g = q.size(1);
  TORCH_CHECK(v.size(0) == H && v.size(1) == n && v.size(2) == D && q.size(0) == H && q.size(2) == D,
              "kvmem cpu_decode: shapes do not match");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "kvmem cpu_decode: the last axis must be contiguous");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "kvmem cpu_decode: head dim 64, 128 or 256");
  TORCH_CHECK(n >= 1 && parts >= 1 && parts <= n, "kvmem cpu_decode: need 1 <= parts <= keys");
  auto qs = (q.contiguous() * scale).contiguous();
  auto out = torch::empty({H, g, D}, q.options());
#ifdef __AVX512F__
  const float* Q = qs.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const int64_t ksh = k.stride(0), ksn = k.stride(1), vsh = v.stride(0), vsn = v.stride(1);
  const int64_t units = H * parts;
  std::vector<float> acc(units * g * D), mx(units * g), sm(units * g);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(g * BLK);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t h = u / parts, p = u % parts;
      const int64_t a = n * p / parts, b = n * (p + 1) / parts;
      float* ac = acc.data() + u * g * D;
      float* m = mx.data() + u * g;
      float* l = sm.data() + u * g;
      const float* qh = Q + h * g * D;
      if (D == 64) run_keys<64>(qh, K + h * ksh, V + h * vsh, ksn, vsn, a, b, g, ac, m, l, s.data());
      else if (D == 128) run_keys<128>(qh, K + h * ksh, V + h * vsh, ksn, vsn, a, b, g, ac, m, l, s.data());
      else run_keys<256>(qh, K + h * ksh, V + h * vsh, ksn, vsn, a, b, g, ac, m, l, s.data());
    }
  });
  float* O = out.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t r = 0; r < g; ++r) {  // merge the runs of a head by their maxima and sums
      float M = -INFINITY;
      for (int64_t p = 0; p < parts; ++p) M = std::max(M, mx[(h * parts + p) * g + r]);
      float S = 0.f;
      float* o = O + (h * g + r) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t u = h * parts + p;
        const float w = std::exp(mx[u * g + r] - M);
        S += w * sm[u * g + r];
        const float* a = acc.data() + (u * g + r) * D;
        for (int64_t c = 0; c < D; ++c) o[c] += w * a[c];
      }
      for (int64_t c = 0; c < D; ++c) o[c] /= S;
    }
  }
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "kvmem CPU decode attention (float32, grouped heads packed)");
  m.def("vectorized", &vectorized, "whether this build has the AVX-512 path");
}
