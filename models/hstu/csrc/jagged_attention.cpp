// Compiled CPU kernel of the causal HSTU jagged attention (models/hstu/compiled.py).
//
// out_i = Σ_{j ≤ i} SiLU(q_i·k_j + rab_pos[min(i − j, n − 1)] + rab_time[bucket(tq_i − ts_j)]) / n · v_j
// over jagged q, k [ΣL, H, d], v [ΣL, H, d_v] with offsets [B + 1]. One work item is one
// query tile of T rows of one sequence against its causal keys [0, (t + 1)·T): the scores
// come from one batched matmul over the heads, then ONE pass over them in cache adds the
// bias (relative position + time bucket, computed once per (i, j) and shared by the heads),
// applies SiLU, the 1/n scaling and the causal mask; a second matmul with V gives the
// tile's output rows. The backward pass recomputes each tile's scores (flash-attention
// style) and fuses bias, SiLU' and the mask into one pass likewise; bias gradients are
// accumulated per worker in double and summed at the end.
//
// Work is scheduled dynamically (an atomic counter shared by at::parallel_for's workers),
// longest items first, so one long user does not serialise a long-tailed batch. Forward
// items are (sequence, query tile): they write disjoint output rows. Backward items are
// whole sequences (their key gradients accumulate across query tiles).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

// The time bucket of a gap by integer comparisons: thresholds[b - 1] is the smallest gap
// whose bucket is >= b, computed in Python by models.hstu.jagged.time_buckets itself, so
// the buckets match it exactly whatever this file's floating-point flags (it is built with
// -ffast-math so that the SiLU loops vectorise).
inline int64_t bucket_of(int64_t dt, const int64_t* thresholds, int64_t num_buckets) {
  const int64_t gap = dt < 0 ? -dt : dt;
  return std::upper_bound(thresholds, thresholds + num_buckets, gap) - thresholds;
}

struct Tile {
  int64_t seq, start, len, row0, rows;
};

struct Plan {
  std::vector<Tile> tiles;  // forward items, longest key range first
  std::vector<int64_t> seqs;  // backward items, longest sequence first
};

Plan make_plan(const at::Tensor& offsets, int64_t block) {
  auto off = offsets.accessor<int64_t, 1>();
  Plan plan;
  int64_t batch = offsets.size(0) - 1;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t len = off[b + 1] - off[b];
    if (len <= 0) continue;
    plan.seqs.push_back(b);
    for (int64_t r0 = 0; r0 < len; r0 += block) {
      plan.tiles.push_back({b, off[b], len, r0, std::min(block, len - r0)});
    }
  }
  std::stable_sort(plan.tiles.begin(), plan.tiles.end(), [](const Tile& a, const Tile& b) {
    return a.row0 + a.rows > b.row0 + b.rows;
  });
  std::stable_sort(plan.seqs.begin(), plan.seqs.end(), [&](int64_t a, int64_t b) {
    return off[a + 1] - off[a] > off[b + 1] - off[b];
  });
  return plan;
}

// Runs fn(item, worker) for items [0, n) on at::parallel_for's workers, each pulling the
// next item from a shared counter.
template <typename Fn>
void dynamic_for(int64_t n, Fn fn) {
  std::atomic<int64_t> next{0};
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      for (int64_t i = next++; i < n; i = next++) fn(i, w);
    }
  });
}

// The bias of query row gi (position in its sequence) against keys [0, keys), with the
// causal mask as `keys_on = gi + 1`. Fills bias[0, keys_on) and, when has_time, the
// buckets (for the backward pass).
template <typename scalar_t>
inline void bias_row(int64_t gi, int64_t keys_on, int64_t n, const scalar_t* rab_pos,
                     const scalar_t* rab_time, const int64_t* thresholds, int64_t num_buckets,
                     const int64_t* ts_seq, int64_t tq, scalar_t* bias, int64_t* bucket) {
  for (int64_t j = 0; j < keys_on; ++j) {
    int64_t rel = std::min(gi - j, n - 1);
    scalar_t bj = rab_pos[rel];
    if (rab_time != nullptr) {
      int64_t bk = bucket_of(tq - ts_seq[j], thresholds, num_buckets);
      bj += rab_time[bk];
      if (bucket != nullptr) bucket[j] = bk;
    }
    bias[j] = bj;
  }
}

// A = SiLU(z + bias) / n over one score row (vectorised: no branches, no gathers).
template <typename scalar_t>
inline void silu_row(scalar_t* __restrict__ row, const scalar_t* __restrict__ bias, int64_t on,
                     scalar_t inv_n) {
  for (int64_t j = 0; j < on; ++j) {
    const scalar_t z = row[j] + bias[j];
    row[j] = z / (scalar_t(1) + std::exp(-z)) * inv_n;
  }
}

// A into zr and dZ = dA · SiLU'(z) / n into dr over one row (vectorised likewise).
template <typename scalar_t>
inline void silu_grad_row(scalar_t* __restrict__ zr, scalar_t* __restrict__ dr,
                          const scalar_t* __restrict__ bias, int64_t on, scalar_t inv_n) {
  for (int64_t j = 0; j < on; ++j) {
    const scalar_t x = zr[j] + bias[j];
    const scalar_t sig = scalar_t(1) / (scalar_t(1) + std::exp(-x));
    zr[j] = x * sig * inv_n;
    dr[j] = dr[j] * inv_n * sig * (scalar_t(1) + x * (scalar_t(1) - sig));
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& rab_pos, const at::Tensor& rab_time, const at::Tensor& ts,
                  const at::Tensor& ts_next, const at::Tensor& thresholds, int64_t n,
                  const Plan& plan, at::Tensor& out) {
  const int64_t heads = q.size(1);
  const bool has_time = rab_time.numel() > 0;
  const scalar_t* pos = rab_pos.data_ptr<scalar_t>();
  const scalar_t* tim = has_time ? rab_time.data_ptr<scalar_t>() : nullptr;
  const int64_t nb = has_time ? rab_time.numel() - 1 : 0;
  const int64_t* tsp = has_time ? ts.data_ptr<int64_t>() : nullptr;
  const int64_t* tnp = has_time ? ts_next.data_ptr<int64_t>() : nullptr;
  const int64_t* thr = has_time ? thresholds.data_ptr<int64_t>() : nullptr;
  const scalar_t inv_n = scalar_t(1) / static_cast<scalar_t>(n);
  dynamic_for(static_cast<int64_t>(plan.tiles.size()), [&](int64_t item, int64_t) {
    at::NoGradGuard no_grad;
    const Tile& t = plan.tiles[item];
    const int64_t keys = t.row0 + t.rows;
    auto qt = q.narrow(0, t.start + t.row0, t.rows).transpose(0, 1);  // [H, T, d]
    auto kt = k.narrow(0, t.start, keys).transpose(0, 1);             // [H, J, d]
    auto vt = v.narrow(0, t.start, keys).transpose(0, 1);             // [H, J, dv]
    at::Tensor s = at::bmm(qt, kt.transpose(1, 2)).contiguous();      // [H, T, J]
    scalar_t* sp = s.data_ptr<scalar_t>();
    std::vector<scalar_t> bias(keys);
    for (int64_t i = 0; i < t.rows; ++i) {
      const int64_t gi = t.row0 + i, on = gi + 1;
      bias_row<scalar_t>(gi, on, n, pos, tim, thr, nb, has_time ? tsp + t.start : nullptr,
                         has_time ? tnp[t.start + gi] : 0, bias.data(), nullptr);
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* row = sp + (h * t.rows + i) * keys;
        silu_row<scalar_t>(row, bias.data(), on, inv_n);
        std::fill(row + on, row + keys, scalar_t(0));
      }
    }
    out.narrow(0, t.start + t.row0, t.rows).transpose(0, 1).copy_(at::bmm(s, vt));
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& g, const at::Tensor& rab_pos, const at::Tensor& rab_time,
                   const at::Tensor& ts, const at::Tensor& ts_next,
                   const at::Tensor& thresholds, int64_t n, int64_t block,
                   const Plan& plan, const at::Tensor& offsets, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, std::vector<std::vector<double>>& d_pos,
                   std::vector<std::vector<double>>& d_time) {
  const int64_t heads = q.size(1);
  const bool has_time = rab_time.numel() > 0;
  const scalar_t* pos = rab_pos.data_ptr<scalar_t>();
  const scalar_t* tim = has_time ? rab_time.data_ptr<scalar_t>() : nullptr;
  const int64_t nb = has_time ? rab_time.numel() - 1 : 0;
  const int64_t* tsp = has_time ? ts.data_ptr<int64_t>() : nullptr;
  const int64_t* tnp = has_time ? ts_next.data_ptr<int64_t>() : nullptr;
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* thr = has_time ? thresholds.data_ptr<int64_t>() : nullptr;
  const scalar_t inv_n = scalar_t(1) / static_cast<scalar_t>(n);
  dynamic_for(static_cast<int64_t>(plan.seqs.size()), [&](int64_t item, int64_t worker) {
    at::NoGradGuard no_grad;
    const int64_t b = plan.seqs[item], start = off[b], len = off[b + 1] - off[b];
    double* dpos = d_pos[worker].data();
    double* dtim = has_time ? d_time[worker].data() : nullptr;
    std::vector<scalar_t> bias(len);
    std::vector<int64_t> bucket(has_time ? len : 0);
    std::vector<scalar_t> dsum(len);
    for (int64_t row0 = 0; row0 < len; row0 += block) {
      const int64_t rows = std::min(block, len - row0), keys = row0 + rows;
      auto qt = q.narrow(0, start + row0, rows).transpose(0, 1);
      auto kt = k.narrow(0, start, keys).transpose(0, 1);
      auto vt = v.narrow(0, start, keys).transpose(0, 1);
      auto gt = g.narrow(0, start + row0, rows).transpose(0, 1);     // [H, T, dv]
      at::Tensor z = at::bmm(qt, kt.transpose(1, 2)).contiguous();    // [H, T, J]
      at::Tensor dz = at::bmm(gt, vt.transpose(1, 2)).contiguous();   // dA, then dZ
      scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* dzp = dz.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t gi = row0 + i, on = gi + 1;
        bias_row<scalar_t>(gi, on, n, pos, tim, thr, nb, has_time ? tsp + start : nullptr,
                           has_time ? tnp[start + gi] : 0, bias.data(),
                           has_time ? bucket.data() : nullptr);
        std::fill(dsum.begin(), dsum.begin() + on, scalar_t(0));
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* zr = zp + (h * rows + i) * keys;
          scalar_t* dr = dzp + (h * rows + i) * keys;
          silu_grad_row<scalar_t>(zr, dr, bias.data(), on, inv_n);
          for (int64_t j = 0; j < on; ++j) dsum[j] += dr[j];
          std::fill(zr + on, zr + keys, scalar_t(0));
          std::fill(dr + on, dr + keys, scalar_t(0));
        }
        // The bias is shared by the heads: its gradient is the heads' dZ summed, per (i, j).
        for (int64_t j = 0; j < on; ++j) {
          dpos[std::min(gi - j, n - 1)] += static_cast<double>(dsum[j]);
          if (has_time) dtim[bucket[j]] += static_cast<double>(dsum[j]);
        }
      }
      dv.narrow(0, start, keys).transpose(0, 1).add_(at::bmm(z.transpose(1, 2), gt));
      dq.narrow(0, start + row0, rows).transpose(0, 1).copy_(at::bmm(dz, kt));
      dk.narrow(0, start, keys).transpose(0, 1).add_(at::bmm(dz.transpose(1, 2), qt));
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& offsets) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "compiled_jagged is a CPU kernel");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 &&
                  v.size(0) == q.size(0) && v.size(1) == q.size(1),
              "q, k must be [ΣL, H, d] and v [ΣL, H, d_v]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1, "offsets: int64 [B+1]");
}

}  // namespace

at::Tensor hstu_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor offsets,
                        at::Tensor rab_pos, at::Tensor rab_time, at::Tensor ts,
                        at::Tensor ts_next, at::Tensor thresholds, int64_t n, int64_t block) {
  check(q, k, v, offsets);
  offsets = offsets.contiguous();
  Plan plan = make_plan(offsets, block);
  at::Tensor out = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hstu_forward", [&] {
    forward_impl<scalar_t>(q, k, v, rab_pos.contiguous(), rab_time.contiguous(),
                           ts.contiguous(), ts_next.contiguous(), thresholds.contiguous(), n,
                           plan, out);
  });
  return out;
}

std::vector<at::Tensor> hstu_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g,
                                      at::Tensor offsets, at::Tensor rab_pos,
                                      at::Tensor rab_time, at::Tensor ts, at::Tensor ts_next,
                                      at::Tensor thresholds, int64_t n, int64_t block) {
  check(q, k, v, offsets);
  offsets = offsets.contiguous();
  Plan plan = make_plan(offsets, block);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t workers = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<double>> d_pos(workers, std::vector<double>(n, 0.0));
  const int64_t nt = rab_time.numel();
  std::vector<std::vector<double>> d_time(workers, std::vector<double>(nt, 0.0));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hstu_backward", [&] {
    backward_impl<scalar_t>(q, k, v, g.contiguous(), rab_pos.contiguous(),
                            rab_time.contiguous(), ts.contiguous(), ts_next.contiguous(),
                            thresholds.contiguous(), n, block, plan, offsets, dq, dk, dv, d_pos,
                            d_time);
  });
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor gp = at::zeros({n}, opts), gt = at::zeros({nt}, opts);
  for (int64_t w = 0; w < workers; ++w) {
    gp.add_(at::from_blob(d_pos[w].data(), {n}, opts));
    if (nt > 0) gt.add_(at::from_blob(d_time[w].data(), {nt}, opts));
  }
  return {dq, dk, dv, gp.to(rab_pos.scalar_type()), gt.to(rab_pos.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &hstu_forward, "HSTU jagged attention forward (CPU)");
  m.def("backward", &hstu_backward, "HSTU jagged attention backward (CPU)");
}
