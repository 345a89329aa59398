// y = x @ (w * scales[:, None])^T for int8 weights w (N, K) and float32 activations
// x (M, K) with few rows (decoding): the CPU int8 kernel of llama/quant_kernels.py.
//
// Why native code: every PyTorch route for int8 weights on x86 spends more instructions
// per weight than the bytes it saves (docs/quantization.md). A plain loop that converts
// each weight as it is read, compiled for the machine's vector units, reads a quarter of
// float32's bytes at about twice float32's speed. Sixteen independent sums per output
// let the compiler keep them in vector registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

constexpr int64_t kLanes = 16;

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

}  // namespace

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_matvec", &int8_matvec, "int8-weight product for a few float32 rows");
}
