// Compiled CPU kernel of the causal HSTU jagged attention (models/hstu/compiled.py).
//
// out_i = Σ_{j ≤ i} SiLU(q_i·k_j + rab_pos[min(i − j, n − 1)] + rab_time[bucket(tq_i − ts_j)]) / n · v_j
// over jagged q, k [ΣL, H, d], v [ΣL, H, d_v] with offsets [B + 1].
//
// Layout. The inputs are packed once per call into head-major buffers whose feature width is
// padded to the SIMD width: rows [H, ΣL + pad, d'] (Q, K, V, dOut) and, for the operands a
// matmul reads as "keys along the vector", transposed [H, d', ΣL + pad] (Kᵀ, Vᵀ). Every tile
// product is then one register-blocked micro-kernel (mk below): C[R × NV·VL] += A · B with A
// broadcast one scalar at a time (any strides, so Aᵀ costs nothing) and B read as
// contiguous vector rows, accumulators in registers for the whole reduction.
//
// Forward: one work item is one query tile (T rows of one sequence, all heads). For each
// causal key block (T keys) it computes the bias tile once (relative position + time bucket,
// shared by the heads; the mask as a per-row count of valid keys), then per head the score
// tile S = Q Kᵀ (micro-kernel), one vectorised pass A = SiLU(S + bias) / n with the mask,
// and O += A V (micro-kernel) into a per-item accumulator.
//
// Backward: one work item is one key block (T keys of one sequence): it owns those keys' dK
// and dV (accumulated in registers/L1 over every query tile at or after it, no atomics); per
// query tile it recomputes S, forms dA = dOut Vᵀ, then A and dZ = dA · SiLU'(·) / n in one
// pass, and dV += Aᵀ dOut, dK += dZᵀ Q, and dQ += dZ K — the last into the shared dQ under
// a per-query-tile spin lock (held for one 2·T·d' add). Bias gradients: per tile the
// heads' dZ summed per (i, j), folded along the diagonals (position) and into 4 interleaved
// histograms (time bucket), then added per worker in double.
//
// Time buckets are exact integer comparisons against thresholds computed in Python from
// models.hstu.jagged.time_buckets itself: a 64 × 64 table indexed by the gap's exponent and
// its next 6 bits gives the bucket at the cell's start, and one comparison with the next
// threshold finishes it (no cell holds two thresholds: they are ≥ 35% apart above 64).
//
// Items are scheduled dynamically (a shared atomic counter) over at::parallel_for's
// workers, the largest first, so one long user does not serialise a long-tailed batch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kRows = 4;  // micro-kernel rows: 4 × 4 accumulators of 32 registers
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kRows = 2;  // 2 × 4 accumulators of 16 registers
#else
constexpr int kVecBytes = 16;
constexpr int kRows = 2;
#endif
constexpr int kMaxNV = 4;  // micro-kernel width in vectors

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
  static inline vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  static inline vec splat(T x) { return vec{} + x; }
};

// C[R × NV·L] (=|+=) Σ_k A[r·ars + k·acs] · B[k·ldb + 0 .. NV·L).
template <typename T, int R, int NV, bool ACC>
inline void mk(T* __restrict__ C, int64_t ldc, const T* __restrict__ A, int64_t ars,
               int64_t acs, const T* __restrict__ B, int64_t ldb, int64_t K) {
  using S = Simd<T>;
  using V = typename S::vec;
  V c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? S::load(C + r * ldc + v * S::L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = S::load(B + k * ldb + v * S::L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a = S::splat(A[r * ars + k * acs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) S::store(C + r * ldc + v * S::L, c[r][v]);
}

// C[M × N] (=|+=) A[M × K] · B[K × N]; M a multiple of kRows, N of the vector length.
template <typename T, bool ACC>
void gemm(T* C, int64_t ldc, int64_t M, int64_t N, const T* A, int64_t ars, int64_t acs,
          const T* B, int64_t ldb, int64_t K) {
  constexpr int L = Simd<T>::L;
  const int64_t nv = N / L;
  for (int64_t v0 = 0; v0 < nv; v0 += kMaxNV) {
    const int64_t w = std::min<int64_t>(kMaxNV, nv - v0);
    for (int64_t r = 0; r < M; r += kRows) {
      T* c = C + r * ldc + v0 * L;
      const T* a = A + r * ars;
      const T* b = B + v0 * L;
      switch (w) {
        case 4: mk<T, kRows, 4, ACC>(c, ldc, a, ars, acs, b, ldb, K); break;
        case 3: mk<T, kRows, 3, ACC>(c, ldc, a, ars, acs, b, ldb, K); break;
        case 2: mk<T, kRows, 2, ACC>(c, ldc, a, ars, acs, b, ldb, K); break;
        default: mk<T, kRows, 1, ACC>(c, ldc, a, ars, acs, b, ldb, K); break;
      }
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp for SiLU: float uses a vectorisable Cephes-style polynomial (≈1 ulp on the clamped
// range), double the library's exp (the fp64 path is for tests).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}
inline double fast_exp(double x) { return std::exp(x); }

// The exact time bucket (see the header): key = exponent · 64 + next 6 bits of the gap.
struct Buckets {
  std::vector<uint8_t> lut;    // [64 · 64] bucket at the start of each cell
  std::vector<int64_t> next;   // [num_buckets + 1]: next[b] = smallest gap of bucket > b
  Buckets(const int64_t* thr, int64_t nb) : lut(64 * 64, 0), next(nb + 1) {
    for (int64_t b = 0; b < nb; ++b) next[b] = thr[b];
    next[nb] = std::numeric_limits<int64_t>::max();
    for (int e = 0; e < 63; ++e) {
      for (int m = 0; m < 64; ++m) {
        // The cell's smallest gap (below 64 a cell holds at most one integer).
        const int64_t g0 = e >= 6 ? (static_cast<int64_t>(64 + m) << (e - 6))
                                  : ((static_cast<int64_t>(m) >> (6 - e)) | (int64_t(1) << e));
        lut[e * 64 + m] = static_cast<uint8_t>(
            std::upper_bound(thr, thr + nb, g0) - thr);
      }
    }
  }
  inline int64_t operator()(int64_t dt) const {
    int64_t g = dt < 0 ? -dt : dt;
    g = g < 1 ? 1 : g;
    const int e = 63 - __builtin_clzll(static_cast<uint64_t>(g));
    const int64_t m = e >= 6 ? (g >> (e - 6)) & 63 : (g << (6 - e)) & 63;
    int64_t b = lut[e * 64 + m];
    return b + (g >= next[b]);
  }
};

template <typename T>
struct Ctx {
  int64_t H, d, dv, DP, DVP, TP, n, blk;  // blk: the largest tile
  const int64_t* off;   // [B + 1] the inputs' offsets
  const int64_t* poff;  // [B + 1] the packed buffers' offsets (each sequence padded to its tile)
  const int64_t* sblk;  // [B] each sequence's tile size
  const T* qr;  // [H, TP, DP]
  const T* kr;  // [H, TP, DP]
  const T* kt;  // [H, DP, TP]
  const T* vr;  // [H, TP, DVP]
  const T* vt;  // [H, DVP, TP]
  const T* gr;  // [H, TP, DVP]
  const T* pos_ext;  // pos_ext[m] = rab_pos[clamp(M + blk − m, 0, n − 1)], m = M + blk − (i − j)
  int64_t M;
  const T* tim;  // rab_time or null
  const int64_t* ts;  // [TP] (zero padded)
  const int64_t* tq;  // [TP]
  const Buckets* buckets;
  T inv_n;
};

// The bias tile [blk × blk] of query rows r0.. against keys j0.. of the sequence at
// `start` (len rows), its row limits lim[i] (valid keys of row i: the causal mask and the
// sequence's end) and, when wanted, the time buckets.
template <typename T>
void bias_tile(const Ctx<T>& c, int64_t start, int64_t len, int64_t blk, int64_t r0, int64_t j0,
               T* bias, int32_t* lim, uint8_t* bucket) {
  const int64_t nk = std::min(blk, len - j0);
  for (int64_t i = 0; i < blk; ++i) {
    const int64_t gi = r0 + i;
    lim[i] = gi < len ? static_cast<int32_t>(std::max<int64_t>(0, std::min(nk, gi - j0 + 1)))
                      : 0;
    T* row = bias + i * blk;
    const T* p = c.pos_ext + (c.M + c.blk - gi + j0);
    for (int64_t j = 0; j < blk; ++j) row[j] = p[j];
    if (c.tim != nullptr && lim[i] > 0) {
      const int64_t t = c.tq[start + gi];
      const int64_t* tk = c.ts + start + j0;
      const int32_t on = lim[i];
      for (int32_t j = 0; j < on; ++j) {
        const int64_t b = (*c.buckets)(t - tk[j]);
        row[j] += c.tim[b];
        if (bucket != nullptr) bucket[i * blk + j] = static_cast<uint8_t>(b);
      }
    }
  }
}

// A = SiLU(S + bias) / n, 0 past each row's limit.
template <typename T>
void silu_tile(T* __restrict__ s, const T* __restrict__ bias, const int32_t* lim, int64_t blk,
               T inv_n) {
  for (int64_t i = 0; i < blk; ++i) {
    T* row = s + i * blk;
    const T* br = bias + i * blk;
    const int32_t on = lim[i];
    for (int64_t j = 0; j < blk; ++j) {
      const T x = row[j] + br[j];
      const T a = x / (T(1) + fast_exp(-x)) * inv_n;
      row[j] = j < on ? a : T(0);
    }
  }
}

// A into s, dZ = dA · SiLU'(S + bias) / n into ds (0 past the limits), dsum += dZ.
template <typename T>
void silu_grad_tile(T* __restrict__ s, T* __restrict__ ds, T* __restrict__ dsum,
                    const T* __restrict__ bias, const int32_t* lim, int64_t blk, T inv_n) {
  for (int64_t i = 0; i < blk; ++i) {
    T* row = s + i * blk;
    T* drow = ds + i * blk;
    T* srow = dsum + i * blk;
    const T* br = bias + i * blk;
    const int32_t on = lim[i];
    for (int64_t j = 0; j < blk; ++j) {
      const T x = row[j] + br[j];
      const T sig = T(1) / (T(1) + fast_exp(-x));
      const bool ok = j < on;
      const T dz = drow[j] * inv_n * sig * (T(1) + x * (T(1) - sig));
      row[j] = ok ? x * sig * inv_n : T(0);
      drow[j] = ok ? dz : T(0);
      srow[j] += ok ? dz : T(0);
    }
  }
}

struct Item {
  int64_t seq, tile, cost;
};

std::vector<Item> make_items(const int64_t* off, const int64_t* sblk, int64_t batch,
                             bool backward) {
  std::vector<Item> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = off[b + 1] - off[b], blk = sblk[b];
    const int64_t tiles = (len + blk - 1) / blk;
    for (int64_t t = 0; t < tiles; ++t) {
      // forward: query tile t sees t + 1 key blocks; backward: key block t is seen by
      // tiles − t query tiles.
      items.push_back({b, t, backward ? tiles - t : t + 1});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// Runs fn(item, worker) for items [0, n) on at::parallel_for's workers, each pulling the
// next item from a shared counter.
template <typename Fn>
void dynamic_for(int64_t n, int64_t workers, Fn fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      for (int64_t i = next++; i < n; i = next++) fn(i, w);
    }
  });
}

template <typename T>
void forward_impl(const Ctx<T>& c, const std::vector<Item>& items, int64_t workers,
                  T* out /* [ΣL, H, dv] */) {
  const int64_t H = c.H;
  dynamic_for(static_cast<int64_t>(items.size()), workers, [&](int64_t it, int64_t) {
    const Item& item = items[it];
    const int64_t start = c.off[item.seq], len = c.off[item.seq + 1] - start;
    const int64_t ps = c.poff[item.seq], blk = c.sblk[item.seq], r0 = item.tile * blk;
    std::vector<T> bias(blk * blk), s(blk * blk), o(H * blk * c.DVP, T(0));
    std::vector<int32_t> lim(blk);
    for (int64_t j0 = 0; j0 <= r0; j0 += blk) {
      bias_tile<T>(c, start, len, blk, r0, j0, bias.data(), lim.data(), nullptr);
      const int64_t nk = std::min(blk, len - j0);
      for (int64_t h = 0; h < H; ++h) {
        gemm<T, false>(s.data(), blk, blk, blk, c.qr + (h * c.TP + ps + r0) * c.DP, c.DP, 1,
                       c.kt + h * c.DP * c.TP + ps + j0, c.TP, c.d);
        silu_tile<T>(s.data(), bias.data(), lim.data(), blk, c.inv_n);
        gemm<T, true>(o.data() + h * blk * c.DVP, c.DVP, blk, c.DVP, s.data(), blk, 1,
                      c.vr + (h * c.TP + ps + j0) * c.DVP, c.DVP, nk);
      }
    }
    const int64_t rows = std::min(blk, len - r0);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(out + ((start + r0 + i) * H + h) * c.dv, o.data() + (h * blk + i) * c.DVP,
                    c.dv * sizeof(T));
  });
}

class SpinLock {
 public:
  void lock() {
    // Yield rather than spin: on an oversubscribed machine the holder may be descheduled.
    while (flag_.test_and_set(std::memory_order_acquire)) std::this_thread::yield();
  }
  void unlock() { flag_.clear(std::memory_order_release); }

 private:
  std::atomic_flag flag_ = ATOMIC_FLAG_INIT;
};

template <typename T>
void backward_impl(const Ctx<T>& c, const std::vector<Item>& items, int64_t workers,
                   T* dq_acc /* [H, TP, DP] */, T* dk /* [ΣL, H, d] */, T* dv /* [ΣL, H, dv] */,
                   std::vector<std::vector<double>>& d_pos,
                   std::vector<std::vector<double>>& d_time) {
  const int64_t H = c.H, DP = c.DP, DVP = c.DVP;
  std::vector<SpinLock> locks(static_cast<size_t>(c.TP / 16 + 1));
  const int64_t nt = c.tim != nullptr ? static_cast<int64_t>(d_time[0].size()) : 0;
  dynamic_for(static_cast<int64_t>(items.size()), workers, [&](int64_t it, int64_t worker) {
    const Item& item = items[it];
    const int64_t start = c.off[item.seq], len = c.off[item.seq + 1] - start;
    const int64_t ps = c.poff[item.seq], blk = c.sblk[item.seq];
    const int64_t j0 = item.tile * blk, nk = std::min(blk, len - j0);
    std::vector<T> bias(blk * blk), s(blk * blk), ds(blk * blk), dsum(blk * blk);
    std::vector<T> dka(H * blk * DP, T(0)), dva(H * blk * DVP, T(0)), dql(H * blk * DP);
    std::vector<T> diag(2 * blk), hist(4 * std::max<int64_t>(nt, 1));
    std::vector<int32_t> lim(blk);
    std::vector<uint8_t> bucket(c.tim != nullptr ? blk * blk : 0);
    double* dpos = d_pos[worker].data();
    double* dtim = nt > 0 ? d_time[worker].data() : nullptr;
    for (int64_t r0 = j0; r0 < len; r0 += blk) {
      const int64_t nr = std::min(blk, len - r0);
      bias_tile<T>(c, start, len, blk, r0, j0, bias.data(), lim.data(),
                   c.tim != nullptr ? bucket.data() : nullptr);
      std::fill(dsum.begin(), dsum.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        const T* qh = c.qr + (h * c.TP + ps + r0) * DP;
        const T* gh = c.gr + (h * c.TP + ps + r0) * DVP;
        gemm<T, false>(s.data(), blk, blk, blk, qh, DP, 1, c.kt + h * DP * c.TP + ps + j0,
                       c.TP, c.d);
        gemm<T, false>(ds.data(), blk, blk, blk, gh, DVP, 1,
                       c.vt + h * DVP * c.TP + ps + j0, c.TP, c.dv);
        silu_grad_tile<T>(s.data(), ds.data(), dsum.data(), bias.data(), lim.data(), blk,
                          c.inv_n);
        // dV[j] += Σ_i A[i, j] g_i and dK[j] += Σ_i dZ[i, j] q_i: Aᵀ by strides.
        gemm<T, true>(dva.data() + h * blk * DVP, DVP, blk, DVP, s.data(), 1, blk, gh, DVP, nr);
        gemm<T, true>(dka.data() + h * blk * DP, DP, blk, DP, ds.data(), 1, blk, qh, DP, nr);
        // dQ[i] += Σ_j dZ[i, j] k_j, locally, then into the shared rows under the tile lock.
        gemm<T, false>(dql.data() + h * blk * DP, DP, blk, DP, ds.data(), blk, 1,
                       c.kr + (h * c.TP + ps + j0) * DP, DP, nk);
      }
      {
        // Any row → lock map is correct (the same tile always takes the same lock).
        SpinLock& lock = locks[static_cast<size_t>((ps + r0) / 16)];
        lock.lock();
        for (int64_t h = 0; h < H; ++h) {
          T* dst = dq_acc + (h * c.TP + ps + r0) * DP;
          const T* src = dql.data() + h * blk * DP;
          for (int64_t x = 0; x < nr * DP; ++x) dst[x] += src[x];
        }
        lock.unlock();
      }
      // Position bias: fold dsum along its diagonals u = j − i + blk − 1 (rel = r0 − j0 −
      // (u − blk + 1)).
      std::fill(diag.begin(), diag.end(), T(0));
      for (int64_t i = 0; i < blk; ++i) {
        T* dg = diag.data() + (blk - 1 - i);
        const T* sr = dsum.data() + i * blk;
        for (int64_t j = 0; j < blk; ++j) dg[j] += sr[j];
      }
      for (int64_t u = 0; u < 2 * blk - 1; ++u) {
        const int64_t rel = r0 - j0 - (u - blk + 1);
        if (rel >= 0 && diag[u] != T(0)) dpos[std::min(rel, c.n - 1)] += diag[u];
      }
      if (dtim != nullptr) {
        std::fill(hist.begin(), hist.end(), T(0));
        for (int64_t i = 0; i < blk; ++i) {
          const int32_t on = lim[i];
          const uint8_t* br = bucket.data() + i * blk;
          const T* sr = dsum.data() + i * blk;
          for (int32_t j = 0; j < on; ++j) hist[(j & 3) * nt + br[j]] += sr[j];
        }
        for (int64_t b = 0; b < nt; ++b)
          dtim[b] += static_cast<double>(hist[b]) + hist[nt + b] + hist[2 * nt + b] +
                     hist[3 * nt + b];
      }
    }
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(dk + ((start + j0 + j) * H + h) * c.d, dka.data() + (h * blk + j) * DP,
                    c.d * sizeof(T));
        std::memcpy(dv + ((start + j0 + j) * H + h) * c.dv, dva.data() + (h * blk + j) * DVP,
                    c.dv * sizeof(T));
      }
  });
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& offsets, int64_t block) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "compiled_jagged is a CPU kernel");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 &&
                  v.size(0) == q.size(0) && v.size(1) == q.size(1),
              "q, k must be [ΣL, H, d] and v [ΣL, H, d_v]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1, "offsets: int64 [B+1]");
  TORCH_CHECK(block >= 16 && block % 16 == 0 && block <= 256,
              "compiled_jagged: block must be a multiple of 16 in [16, 256]");
}

// Packed operands and the per-call tables; the tensors keep the buffers alive.
struct Packed {
  at::Tensor qr, kr, kt, vr, vt, gr, pos_ext, ts, tq;
  std::vector<int64_t> poff, sblk;
  int64_t DP, DVP, TP, M;
};

// x [ΣL, H, w] (any strides) → rows [H, TP, W] in the padded layout (pad rows and columns
// zero), or, transposed, → cols [H, W, TP]; one sequence per work item.
template <typename T>
void pack_one(const at::Tensor& x, T* dst, int64_t W, int64_t TP, const int64_t* off,
              const Packed& p, bool transposed) {
  const int64_t H = x.size(1), w = x.size(2), batch = static_cast<int64_t>(p.sblk.size());
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t start = off[b], len = off[b + 1] - start, ps = p.poff[b];
      const int64_t rows = p.poff[b + 1] - ps;
      for (int64_t h = 0; h < H; ++h) {
        if (!transposed) {
          for (int64_t t = 0; t < rows; ++t) {
            T* d = dst + (h * TP + ps + t) * W;
            const T* sp = src + (start + t) * s0 + h * s1;
            int64_t c = 0;
            if (t < len)
              for (; c < w; ++c) d[c] = sp[c * s2];
            for (; c < W; ++c) d[c] = T(0);
          }
        } else {
          for (int64_t c = 0; c < W; ++c) {
            T* d = dst + (h * W + c) * TP + ps;
            const T* sp = src + start * s0 + h * s1 + c * s2;
            int64_t t = 0;
            if (c < w)
              for (; t < len; ++t) d[t] = sp[t * s0];
            for (; t < rows; ++t) d[t] = T(0);
          }
        }
      }
    }
  });
}

Packed pack(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* g,
            const at::Tensor& offsets, const at::Tensor& rab_pos, const at::Tensor& ts,
            const at::Tensor& ts_next, int64_t n, int64_t blk) {
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), dv = v.size(2);
  const int64_t L = kVecBytes / q.element_size();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t batch = offsets.size(0) - 1;
  Packed p;
  p.DP = round_up(d, L);
  p.DVP = round_up(dv, L);
  // A sequence shorter than the tile gets a tile of its length rounded up to 16 rows, so
  // short sequences do not pay for a full tile of masked pairs.
  p.poff.assign(batch + 1, 0);
  p.sblk.assign(batch, blk);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = off[b + 1] - off[b];
    longest = std::max(longest, len);
    p.sblk[b] = std::min(blk, std::max<int64_t>(16, round_up(len, 16)));
    p.poff[b + 1] = p.poff[b] + round_up(len, p.sblk[b]);
  }
  p.TP = p.poff[batch] + blk;
  auto opt = q.options();
  auto rows = [&](const at::Tensor& x, int64_t W) {
    at::Tensor r = at::empty({H, p.TP, W}, opt);
    r.narrow(1, p.poff[batch], blk).zero_();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hstu_pack", [&] {
      pack_one<scalar_t>(x, r.data_ptr<scalar_t>(), W, p.TP, off, p, false);
    });
    return r;
  };
  auto cols = [&](const at::Tensor& x, int64_t W) {
    at::Tensor r = at::empty({H, W, p.TP}, opt);
    r.narrow(2, p.poff[batch], blk).zero_();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hstu_pack", [&] {
      pack_one<scalar_t>(x, r.data_ptr<scalar_t>(), W, p.TP, off, p, true);
    });
    return r;
  };
  p.qr = rows(q, p.DP);
  p.kt = cols(k, p.DP);
  p.vr = rows(v, p.DVP);
  if (g != nullptr) {
    p.kr = rows(k, p.DP);
    p.vt = cols(v, p.DVP);
    p.gr = rows(*g, p.DVP);
  }
  // pos_ext[m] = rab_pos[clamp(M + blk − m, 0, n − 1)] for m ∈ [0, M + 3·blk): row gi
  // (< longest + blk) against key block j0 (≤ gi) reads pos_ext[M + blk − gi + j0 + j].
  p.M = std::max<int64_t>(longest, 1) - 1;
  at::Tensor m = at::arange(p.M + 3 * blk, offsets.options());
  p.pos_ext = rab_pos.index({(p.M + blk - m).clamp(0, n - 1)}).contiguous();
  if (ts.numel() > 0) {
    p.ts = at::zeros({T + blk}, ts.options());
    p.ts.narrow(0, 0, T).copy_(ts);
    p.tq = at::zeros({T + blk}, ts.options());
    p.tq.narrow(0, 0, T).copy_(ts_next);
  }
  return p;
}

template <typename T>
Ctx<T> make_ctx(const Packed& p, const at::Tensor& q, const at::Tensor& v,
                const at::Tensor& offsets, const at::Tensor& rab_time, const Buckets* bk,
                int64_t n, int64_t blk) {
  Ctx<T> c;
  c.H = q.size(1);
  c.d = q.size(2);
  c.dv = v.size(2);
  c.DP = p.DP;
  c.DVP = p.DVP;
  c.TP = p.TP;
  c.n = n;
  c.blk = blk;
  c.off = offsets.data_ptr<int64_t>();
  c.poff = p.poff.data();
  c.sblk = p.sblk.data();
  c.qr = p.qr.data_ptr<T>();
  c.kt = p.kt.data_ptr<T>();
  c.vr = p.vr.data_ptr<T>();
  c.kr = p.kr.defined() ? p.kr.data_ptr<T>() : nullptr;
  c.vt = p.vt.defined() ? p.vt.data_ptr<T>() : nullptr;
  c.gr = p.gr.defined() ? p.gr.data_ptr<T>() : nullptr;
  c.pos_ext = p.pos_ext.data_ptr<T>();
  c.M = p.M;
  const bool has_time = rab_time.numel() > 0;
  c.tim = has_time ? rab_time.data_ptr<T>() : nullptr;
  c.ts = has_time ? p.ts.data_ptr<int64_t>() : nullptr;
  c.tq = has_time ? p.tq.data_ptr<int64_t>() : nullptr;
  c.buckets = bk;
  c.inv_n = T(1) / static_cast<T>(n);
  return c;
}

int64_t num_workers(size_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                static_cast<int64_t>(items)));
}

}  // namespace

at::Tensor hstu_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor offsets,
                        at::Tensor rab_pos, at::Tensor rab_time, at::Tensor ts,
                        at::Tensor ts_next, at::Tensor thresholds, int64_t n, int64_t block) {
  check(q, k, v, offsets, block);
  offsets = offsets.contiguous();
  rab_time = rab_time.contiguous();
  thresholds = thresholds.contiguous();
  // Every row is written by its query tile.
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, v.options());
  if (q.size(0) == 0) return out;
  const int64_t nb = rab_time.numel() > 0 ? rab_time.numel() - 1 : 0;
  TORCH_CHECK(nb <= 255, "compiled_jagged: at most 255 time buckets");
  Buckets bk(rab_time.numel() > 0 ? thresholds.data_ptr<int64_t>() : nullptr, nb);
  Packed p = pack(q, k, v, nullptr, offsets, rab_pos.contiguous(), ts, ts_next, n, block);
  auto items = make_items(offsets.data_ptr<int64_t>(), p.sblk.data(), offsets.size(0) - 1,
                          false);
  const int64_t workers = num_workers(items.size());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hstu_forward", [&] {
    Ctx<scalar_t> c = make_ctx<scalar_t>(p, q, v, offsets, rab_time, &bk, n, block);
    forward_impl<scalar_t>(c, items, workers, out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<at::Tensor> hstu_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g,
                                      at::Tensor offsets, at::Tensor rab_pos,
                                      at::Tensor rab_time, at::Tensor ts, at::Tensor ts_next,
                                      at::Tensor thresholds, int64_t n, int64_t block) {
  check(q, k, v, offsets, block);
  offsets = offsets.contiguous();
  rab_time = rab_time.contiguous();
  thresholds = thresholds.contiguous();
  const int64_t T = q.size(0), H = q.size(1);
  // Every row is written by its key block.
  at::Tensor dk = at::empty({T, H, q.size(2)}, q.options());
  at::Tensor dv = at::empty({T, H, v.size(2)}, v.options());
  const int64_t nt = rab_time.numel();
  auto opts = at::TensorOptions().dtype(at::kDouble);
  if (T == 0) {
    return {at::zeros_like(q), dk, dv, at::zeros_like(rab_pos), at::zeros_like(rab_time)};
  }
  const int64_t nb = nt > 0 ? nt - 1 : 0;
  TORCH_CHECK(nb <= 255, "compiled_jagged: at most 255 time buckets");
  Buckets bk(nt > 0 ? thresholds.data_ptr<int64_t>() : nullptr, nb);
  Packed p = pack(q, k, v, &g, offsets, rab_pos.contiguous(), ts, ts_next, n, block);
  at::Tensor dq_acc = at::zeros({H, p.TP, p.DP}, q.options());  // every row is added to
  auto items = make_items(offsets.data_ptr<int64_t>(), p.sblk.data(), offsets.size(0) - 1,
                          true);
  const int64_t workers = num_workers(items.size());
  std::vector<std::vector<double>> d_pos(workers, std::vector<double>(n, 0.0));
  std::vector<std::vector<double>> d_time(workers, std::vector<double>(std::max<int64_t>(nt, 1), 0.0));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hstu_backward", [&] {
    Ctx<scalar_t> c = make_ctx<scalar_t>(p, q, v, offsets, rab_time, &bk, n, block);
    backward_impl<scalar_t>(c, items, workers, dq_acc.data_ptr<scalar_t>(),
                            dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), d_pos, d_time);
  });
  // dQ from the padded head-major layout back to [ΣL, H, d].
  at::Tensor dq = at::empty({T, H, q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hstu_unpack", [&] {
    const scalar_t* src = dq_acc.data_ptr<scalar_t>();
    scalar_t* dst = dq.data_ptr<scalar_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t d = q.size(2);
    at::parallel_for(0, offsets.size(0) - 1, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b)
        for (int64_t t = 0; t < off[b + 1] - off[b]; ++t)
          for (int64_t h = 0; h < H; ++h)
            std::memcpy(dst + ((off[b] + t) * H + h) * d,
                        src + (h * p.TP + p.poff[b] + t) * p.DP, d * sizeof(scalar_t));
    });
  });
  at::Tensor gp = at::zeros({n}, opts), gt = at::zeros({nt}, opts);
  for (int64_t w = 0; w < workers; ++w) {
    gp.add_(at::from_blob(d_pos[w].data(), {n}, opts));
    if (nt > 0) gt.add_(at::from_blob(d_time[w].data(), {nt}, opts));
  }
  return {dq, dk, dv, gp.to(rab_pos.scalar_type()), gt.to(rab_pos.scalar_type())};
}

// The kernel's time bucket of each gap (for the exactness test against time_buckets).
at::Tensor hstu_time_buckets(at::Tensor dt, at::Tensor thresholds) {
  dt = dt.contiguous();
  thresholds = thresholds.contiguous();
  const int64_t nb = thresholds.numel();
  TORCH_CHECK(nb <= 255, "compiled_jagged: at most 255 time buckets");
  Buckets bk(thresholds.data_ptr<int64_t>(), nb);
  at::Tensor out = at::empty_like(dt);
  const int64_t* src = dt.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < dt.numel(); ++i) dst[i] = bk(src[i]);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("time_buckets", &hstu_time_buckets, "the kernel's time buckets of int64 gaps");
  m.def("forward", &hstu_forward, "HSTU jagged attention forward (CPU)");
  m.def("backward", &hstu_backward, "HSTU jagged attention backward (CPU)");
}
