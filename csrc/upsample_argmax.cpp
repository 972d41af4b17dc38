// Fused bilinear upsample + argmax over classes, on the CPU, without materialising K x H x W.
//
// For every output pixel the K class scores are interpolated exactly as
// F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0] does on the CPU
// (same float32 source-index and lambda arithmetic as ATen's UpSample.h helpers, same combination
// order: horizontal within each of the two source rows, then vertical), and only three (H, W) planes
// are written: the argmax label (first maximum on ties, NaN wins like torch.argmax), the top score and
// the sum over classes (accumulated in double).
//
// Work per thread: output rows are split into contiguous ranges with at::parallel_for; each range
// keeps the horizontally interpolated versions of (at most) two source rows for all K classes,
// (2, K, W) floats, and reuses them while consecutive output rows read the same source rows (16
// output rows per source row pair at 64 -> 1024), so the inner loop is contiguous and vectorisable.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

struct Lerp {
  int64_t i0;
  int64_t i1;
  float l0;
  float l1;
};

// ATen: area_pixel_compute_scale (no explicit scale factor, align_corners=False).
inline float compute_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

// ATen: compute_source_index_and_lambda with area_pixel_compute_source_index (non-cubic) and
// guard_index_and_lambda, all in float (opmath of float).
inline Lerp source_index_and_lambda(float scale, int64_t dst, int64_t in_size, int64_t out_size) {
  Lerp r;
  if (in_size == out_size) {
    r.i0 = dst;
    r.i1 = dst;
    r.l0 = 1.0f;
    r.l1 = 0.0f;
    return r;
  }
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  src = src < 0.0f ? 0.0f : src;
  r.i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
  r.l1 = std::min(std::max(src - static_cast<float>(r.i0), 0.0f), 1.0f);
  r.i1 = r.i0 + ((r.i0 < in_size - 1) ? 1 : 0);
  r.l0 = 1.0f - r.l1;
  return r;
}

std::vector<Lerp> lerps(int64_t in_size, int64_t out_size) {
  std::vector<Lerp> v(static_cast<size_t>(out_size));
  const float scale = compute_scale(in_size, out_size);
  for (int64_t o = 0; o < out_size; ++o) v[o] = source_index_and_lambda(scale, o, in_size, out_size);
  return v;
}

// One source row ih of every class, interpolated horizontally to out_w columns: dst is (K, out_w).
void horizontal_rows(const float* scores, int64_t K, int64_t in_h, int64_t in_w, int64_t ih,
                     const std::vector<Lerp>& cols, float* dst) {
  const int64_t out_w = static_cast<int64_t>(cols.size());
  for (int64_t k = 0; k < K; ++k) {
    const float* row = scores + (k * in_h + ih) * in_w;
    float* d = dst + k * out_w;
    for (int64_t ow = 0; ow < out_w; ++ow) {
      const Lerp& c = cols[ow];
      float v = row[c.i0] * c.l0;
      v += row[c.i1] * c.l1;
      d[ow] = v;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_argmax(const at::Tensor& scores, int64_t out_h,
                                                               int64_t out_w) {
  TORCH_CHECK(scores.device().is_cpu(), "upsample_argmax: scores must be a CPU tensor, got ", scores.device());
  TORCH_CHECK(scores.dim() == 3, "upsample_argmax: scores must be 3-D (K, h, w), got ", scores.dim(), "-D");
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "upsample_argmax: scores must be float32, got ",
              scores.scalar_type());
  TORCH_CHECK(scores.is_contiguous(), "upsample_argmax: scores must be contiguous");
  const int64_t K = scores.size(0), in_h = scores.size(1), in_w = scores.size(2);
  TORCH_CHECK(K > 0 && in_h > 0 && in_w > 0, "upsample_argmax: scores must be non-empty, got shape ",
              scores.sizes());
  TORCH_CHECK(out_h > 0 && out_w > 0, "upsample_argmax: output size must be positive, got (", out_h, ", ",
              out_w, ")");

  auto labels = at::empty({out_h, out_w}, scores.options().dtype(at::kLong));
  auto top = at::empty({out_h, out_w}, scores.options());
  auto total = at::empty({out_h, out_w}, scores.options());

  const float* src = scores.data_ptr<float>();
  int64_t* lab_p = labels.data_ptr<int64_t>();
  float* top_p = top.data_ptr<float>();
  float* tot_p = total.data_ptr<float>();

  const std::vector<Lerp> cols = lerps(in_w, out_w);
  const std::vector<Lerp> rows = lerps(in_h, out_h);

  // Enough rows per task that the per-task buffers are refilled rarely, few enough to balance.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, out_h / 64));
  at::parallel_for(0, out_h, grain, [&](int64_t begin, int64_t end) {
    // Two cached horizontally-interpolated source rows (all classes), tagged by source row index.
    std::vector<float> buf[2] = {std::vector<float>(static_cast<size_t>(K * out_w)),
                                 std::vector<float>(static_cast<size_t>(K * out_w))};
    int64_t tag[2] = {-1, -1};
    std::vector<double> acc(static_cast<size_t>(out_w));

    auto fetch = [&](int64_t ih, int64_t keep) -> const float* {
      for (int s = 0; s < 2; ++s)
        if (tag[s] == ih) return buf[s].data();
      // Fill the slot that does not hold the other row this output row needs.
      const int s = (tag[0] == keep) ? 1 : 0;
      horizontal_rows(src, K, in_h, in_w, ih, cols, buf[s].data());
      tag[s] = ih;
      return buf[s].data();
    };

    for (int64_t oh = begin; oh < end; ++oh) {
      const Lerp& r = rows[oh];
      const float* a = fetch(r.i0, r.i1);
      const float* b = fetch(r.i1, r.i0);
      const float h0 = r.l0, h1 = r.l1;
      int64_t* lab = lab_p + oh * out_w;
      float* best = top_p + oh * out_w;
      double* sum = acc.data();

      for (int64_t ow = 0; ow < out_w; ++ow) {
        float v = a[ow] * h0;
        v += b[ow] * h1;
        best[ow] = v;
        lab[ow] = 0;
        sum[ow] = static_cast<double>(v);
      }
      for (int64_t k = 1; k < K; ++k) {
        const float* ak = a + k * out_w;
        const float* bk = b + k * out_w;
        for (int64_t ow = 0; ow < out_w; ++ow) {
          float v = ak[ow] * h0;
          v += bk[ow] * h1;
          const float cur = best[ow];
          // Strictly greater keeps the first maximum; a NaN beats any number, the first NaN stays.
          const bool take = (v > cur) || (std::isnan(v) && !std::isnan(cur));
          best[ow] = take ? v : cur;
          lab[ow] = take ? k : lab[ow];
          sum[ow] += static_cast<double>(v);
        }
      }
      float* tot = tot_p + oh * out_w;
      for (int64_t ow = 0; ow < out_w; ++ow) tot[ow] = static_cast<float>(sum[ow]);
    }
  });
  return std::make_tuple(labels, top, total);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "seg4diff_fast C++ CPU kernels";
  m.def("upsample_argmax", &upsample_argmax, py::arg("scores"), py::arg("out_h"), py::arg("out_w"),
        py::call_guard<py::gil_scoped_release>(),
        "Fused bilinear upsample (align_corners=False) + argmax/max/sum over classes: "
        "scores float32 (K, h, w) contiguous -> (labels int64 (H, W), top float32 (H, W), total float32 (H, W)).");
}
