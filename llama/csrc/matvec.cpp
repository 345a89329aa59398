// Products of quantized weights (llama/quantize.py's formats) with a few float32 rows
// (decoding): the CPU kernels of llama/quant_kernels.py.
//
// Why native code: every PyTorch route for quantized weights on x86 spends more
// instructions per weight than the bytes it saves (docs/quantization.md). Loops that
// convert each weight as it is read and multiply it at once beat float32's matrix-vector
// product: written with intrinsics on AVX2, elsewhere plain loops with sixteen
// independent sums per output that the compiler keeps in vector registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;

#if defined(__AVX2__) && defined(__FMA__)
// Written out for AVX2, where the compiler's own vectorisation of the portable loops widens
// each byte in two steps: eight bytes straight to eight floats, four sums in flight
// (25-33% faster per product on this project's AVX2 test machine).
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

inline __m256 widen(__m128i bytes) {  // eight int8 values (a nibble is one too)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}

float dot(const float* x, const int8_t* w, int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), widen(_mm_loadl_epi64((const __m128i*)(w + i))), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), widen(_mm_loadl_epi64((const __m128i*)(w + i + 8))), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), widen(_mm_loadl_epi64((const __m128i*)(w + i + 16))), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), widen(_mm_loadl_epi64((const __m128i*)(w + i + 24))), a3);
  }
  float total = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < k; ++i) total += x[i] * static_cast<float>(w[i]);
  return total;
}
#else
float dot(const float* x, const int8_t* w, int64_t k) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * static_cast<float>(w[i + j]);
  }
  float total = 0;
  for (; i < k; ++i) total += x[i] * static_cast<float>(w[i]);
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}
#endif

// sum over groups of scale_g * (x . codes_g) for one int4 row: bytes hold inputs 2j (high
// nibble) and 2j + 1; x arrives split into its even and odd inputs, so both reads are
// contiguous. The sums stay in vector lanes across groups (scaled per group) and are
// added up once per row.
float nibble_dot(const float* even, const float* odd, const uint8_t* w,
                 const float* scales, int64_t groups, int64_t bytes) {
  float total = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low = _mm_set1_epi8(15);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const float* e = even + g * bytes;
    const float* o = odd + g * bytes;
    const uint8_t* q = w + g * bytes;
    __m256 p0 = _mm256_setzero_ps(), p1 = p0;
    int64_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
      const __m128i b = _mm_loadl_epi64((const __m128i*)(q + i));
      p0 = _mm256_fmadd_ps(_mm256_loadu_ps(e + i), widen(_mm_and_si128(_mm_srli_epi16(b, 4), low)), p0);
      p1 = _mm256_fmadd_ps(_mm256_loadu_ps(o + i), widen(_mm_and_si128(b, low)), p1);
    }
    float rest = 0;
    for (; i < bytes; ++i) rest += e[i] * (q[i] >> 4) + o[i] * (q[i] & 15);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), _mm256_add_ps(p0, p1), acc);
    total += scales[g] * rest;
  }
  return total + sum8(acc);
#else
  float acc[kLanes] = {0};
  for (int64_t g = 0; g < groups; ++g) {
    const float* e = even + g * bytes;
    const float* o = odd + g * bytes;
    const uint8_t* q = w + g * bytes;
    float part[kLanes] = {0};
    int64_t i = 0;
    for (; i + kLanes <= bytes; i += kLanes) {
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) {
        part[j] += e[i + j] * static_cast<float>(q[i + j] >> 4) +
                   o[i + j] * static_cast<float>(q[i + j] & 15);
      }
    }
    float rest = 0;
    for (; i < bytes; ++i) rest += e[i] * (q[i] >> 4) + o[i] * (q[i] & 15);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) acc[j] += scales[g] * part[j];
    total += scales[g] * rest;
  }
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
#endif
}

}  // namespace

// y = x @ (w * scales[:, None])^T for int8 weights w (N, K).
torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8 &&
              scales.dtype() == torch::kFloat32, "int8_matvec: float32 x, int8 w, float32 scales");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scales.is_contiguous(),
              "int8_matvec: contiguous tensors");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && scales.size(0) == n, "int8_matvec: shapes do not match");
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads share out the output rows; each reads its weight rows once per input row.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t o = begin; o < end; ++o) {
        yp[r * n + o] = dot(xp + r * k, wp + o * k, k) * sp[o];
      }
    }
  });
  return y;
}

// y = x @ dequantized^T for int4 weights: packed (N, K / 2), scales and zeros (N, K /
// group), weight = (code - 8) * scale + zero. Per group, scale * (x . codes) +
// (zero - 8 scale) * sum(x): the sums of x are shared by all rows.
torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                          torch::Tensor zeros, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && packed.dtype() == torch::kUInt8 &&
              scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32,
              "int4_matvec: float32 x, uint8 packed, float32 scales and zeros");
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && scales.is_contiguous() &&
              zeros.is_contiguous(), "int4_matvec: contiguous tensors");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0), groups = k / group;
  TORCH_CHECK(group % 2 == 0 && k % group == 0 && packed.size(1) * 2 == k &&
              scales.size(0) == n && scales.size(1) == groups && zeros.sizes() == scales.sizes(),
              "int4_matvec: shapes do not match");
  auto y = torch::empty({m, n}, x.options());
  auto even = x.index({torch::indexing::Slice(), torch::indexing::Slice(0, k, 2)}).contiguous();
  auto odd = x.index({torch::indexing::Slice(), torch::indexing::Slice(1, k, 2)}).contiguous();
  auto sums = x.view({m, groups, group}).sum(-1).contiguous();
  const float* ep = even.data_ptr<float>();
  const float* op = odd.data_ptr<float>();
  const float* xs = sums.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t half = k / 2, bytes = group / 2;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t o = begin; o < end; ++o) {
        const float* scale = sp + o * groups;
        const float* zero = zp + o * groups;
        float total = nibble_dot(ep + r * half, op + r * half, wp + o * half, scale, groups,
                                 bytes);
        for (int64_t g = 0; g < groups; ++g) {
          total += (zero[g] - 8 * scale[g]) * xs[r * groups + g];
        }
        yp[r * n + o] = total;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_matvec", &int8_matvec, "int8-weight product for a few float32 rows");
  m.def("int4_matvec", &int4_matvec, "int4-weight product for a few float32 rows");
}
