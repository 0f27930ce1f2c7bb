// Fused sparse optimizer step on the touched slices of one core (see tt_kernels.cuh).
//
// The launch covers every listed slice whatever p_k is: a flat grid-stride loop over
// n_ids x R_k x (q_k R_{k+1}) entries, so no slice is skipped when p_k (or the number of touched
// slices) exceeds any block or grid limit.
#include "tt_common.cuh"
#include "tt_kernels.cuh"

TT_KERNEL void tt_sparse_update(const int64_t* desc, int32_t k, float* core, float* grad, float* state,
                                const int64_t* ids, int64_t n_ids, int32_t adagrad, float lr, float eps) {
  tt_shape_t s;
  ttk_load_shape(desc, &s);
  const int64_t W = (int64_t)s.q[k] * s.r[k + 1];
  const int64_t per = (int64_t)s.r[k] * W;
  const int64_t total = n_ids * per;
  for (int64_t e = ttk_first(); e < total; e += ttk_stride()) {
    const int64_t t = e / per, rc = e - t * per;
    const int64_t r = rc / W, c = rc - r * W;
    const int64_t off = (r * s.p[k] + ids[t]) * W + c;
    const float g = grad[off];
    if (adagrad) {
      const float h = state[off] + g * g;
      state[off] = h;
      core[off] -= lr * (g / (sqrtf(h) + eps));
    } else {
      core[off] -= lr * g;
    }
    grad[off] = 0.f;
  }
}
