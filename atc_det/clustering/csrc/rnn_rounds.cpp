// Native CPU kernel of atc_det.clustering: the same nearest-neighbour rounds as the torch path
// (`_dendrogram`), per sample, with the same tie rules, then the cut and first-member labels.
// C ABI (loaded with ctypes by atc_det/clustering/native.py), no torch headers; OpenMP over samples (or over
// rows for one large sample), sharing torch's libgomp thread pool once torch is loaded.
//
// Per sample (N tokens):
//   1. distances [N, N]: given (symmetric), or cosine distances max(1 - <u_i, u_j>, 0) of the
//      features, normalised here, computed once per pair (tiles on and above the diagonal, also
//      stored transposed) into rows padded to whole cache lines; +inf on the diagonal and between
//      tokens of different groups.
//   2. rounds: every cluster finds its nearest neighbour (ties: smallest rank XOR rank, clusters
//      ranked by first member).
//      - complete/average: the mutual pairs merge (RNN), Lance-Williams updates in place; the
//        cached nearest neighbour of a row is reused unless the row merged, its neighbour merged,
//        its minimum was tied, or a new entry ties or beats it.
//      - single: every cluster joins its nearest neighbour (Borůvka: spanning-tree edges, the
//        token pair realising each edge is tracked) on the token matrix, each token's row minimum
//        taken over the other clusters.
//   3. cut: static: the N - K lowest merges, stable by (height, round, rank); dynamic: every merge
//      with height <= threshold. Union-find; clusters numbered by their first member.
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// Constants shared with the other backends: atc_det/clustering/native.py passes them from
// atc_det/clustering/contract.py as -D definitions.
#if !defined(ATC_LINKAGE_SINGLE) || !defined(ATC_LINKAGE_COMPLETE) || !defined(ATC_LINKAGE_AVERAGE) || \
    !defined(ATC_MAX_TOKENS) || !defined(ATC_STATUS_NON_FINITE)
#error "build this file through atc_det/clustering/native.py, which defines the shared constants"
#endif
enum Linkage { kSingle = ATC_LINKAGE_SINGLE, kComplete = ATC_LINKAGE_COMPLETE, kAverage = ATC_LINKAGE_AVERAGE };

struct Edge {
  int64_t child, parent;  // first member (complete/average) or token (single) of each side
  double height;
};

template <typename T>
struct Workspace {
  std::vector<T> matrix;       // [N, ld] distances of a sample given as features (+ alignment)
  std::vector<T> transposed;   // [C, N rounded up to 16] its unit features, transposed
  std::vector<T> inverse_norm;  // [N]
  std::vector<T> row_min;      // single: [N] each token's row minimum over the other clusters,
  std::vector<int64_t> row_column;  // a column attaining it (-1: none),
  std::vector<char> row_unique;     // and whether only that column does
  std::vector<int32_t> cluster;     // single: cluster of each token
  std::vector<T> nearest_dist, size, own_height, weight_b;
  std::vector<int32_t> rank;
  std::vector<int64_t> nearest, slots, new_index, root, keeper;
  std::vector<int64_t> edge_pair;  // single: token pair i * N + j of each cluster's nearest edge
  std::vector<int32_t> merge_a, merge_b, absorbed;  // complete/average: the pairs merging in a round
  std::vector<int64_t> member_start, member_fill, members;  // single: tokens of each cluster (CSR)
  std::vector<char> edge, stale, merged;
  std::vector<uint16_t> active;  // complete/average: active columns, 16 per word
  std::vector<Edge> edges;
  std::vector<int64_t> order, parent_of, label;
  int threads = 1;  // OpenMP threads inside one sample (large N, few samples)
};

// body(i) for i in [0, n): over `threads` OpenMP threads (dynamic chunks of `chunk`), or as a plain
// loop for one thread. (An OpenMP region has a fixed cost even when inactive, and a sample runs
// several per round.)
template <typename Body>
inline void parallel_for(int threads, int64_t n, int64_t chunk, const Body& body) {
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) body(i);
}

constexpr int64_t kMaxTokens = ATC_MAX_TOKENS;
constexpr int64_t kTile = 16;  // distance tiles are kTile x kTile; matrix rows are padded to kTile

inline int64_t round_up_to_tile(int64_t n) { return (n + kTile - 1) / kTile * kTile; }

#if defined(__AVX512F__)
// The first min(count, 16) of 16 lanes.
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1);
}
#endif

// Distances to cluster: +inf on the diagonal and between tokens of different groups.
template <typename T>
void mask_distances(T* d, int64_t N, int64_t ld, const int64_t* groups) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < N; ++i) {
    T* row = d + i * ld;
    if (groups != nullptr) {
      const int64_t group_i = groups[i];
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] = groups[j] != group_i ? inf : row[j];
    }
    row[i] = inf;
  }
}

// Unit features u = features / max(|features|, 1e-12) (as torch's normalize, up to rounding: the
// kernel multiplies by the reciprocal) of features [N, C], transposed into u^T [C, padded] (zero
// columns past N), with inverse_norm [N] as workspace. False if a value is NaN or Inf.
template <typename T>
bool unit_columns(const T* features, int64_t N, int64_t C, int64_t padded, T* transposed,
                  T* inverse_norm) {
  for (int64_t i = 0; i < N; ++i) {
    const T* x = features + i * C;
    T squares = 0;
    int bad = 0;
#pragma omp simd reduction(+ : squares) reduction(| : bad)
    for (int64_t k = 0; k < C; ++k) {
      squares += x[k] * x[k];
      bad |= !(x[k] * T(0) == T(0));  // NaN or Inf
    }
    if (bad) return false;
    inverse_norm[i] = T(1) / std::max(std::sqrt(squares), T(1e-12));
  }
  for (int64_t k = 0; k < C; ++k) {
    T* column = transposed + k * padded;
    for (int64_t i = 0; i < N; ++i) column[i] = features[i * C + k] * inverse_norm[i];
    std::fill(column + N, column + padded, T(0));
  }
  return true;
}

#if defined(__AVX512F__)
// Transpose of 16 x 16 floats (r[i] holds row i) in registers.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved by element
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], 128-bit lane l: rows 4i .. 4i + 3 of column 4l + c
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d e = _mm512_castps_pd(t[4 * i + 2]), f = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, e));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, e));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, f));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, f));
  }
  for (int c = 0; c < 4; ++c) {  // gather lane l of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512 even_low = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 odd_low = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 even_high = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 odd_high = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(even_low, even_high, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(even_low, even_high, 0xDD);
    t[4 + c] = _mm512_shuffle_f32x4(odd_low, odd_high, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(odd_low, odd_high, 0xDD);
  }
  std::copy(t, t + 16, r);
}

// float32 with AVX-512: blocks of 16 tokens x 16 features transposed in registers; the squared
// norms and the NaN/Inf check then run 16 tokens per vector, and the block of u^T is scaled.
template <>
bool unit_columns<float>(const float* features, int64_t N, int64_t C, int64_t padded, float* transposed,
                         float*) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < padded; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, N - i0);
    __m512 squares = zero;
    __mmask16 finite = 0xFFFF;
    for (int64_t k0 = 0; k0 < C; k0 += 16) {
      const __mmask16 columns = first_lanes(C - k0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = i < rows ? _mm512_maskz_loadu_ps(columns, features + (i0 + i) * C + k0) : zero;
      }
      transpose16(r);  // r[c]: feature k0 + c of tokens i0 .. i0 + 15 (zero past N)
      for (int64_t c = 0; c < std::min<int64_t>(16, C - k0); ++c) {
        squares = _mm512_fmadd_ps(r[c], r[c], squares);
        finite &= _mm512_cmp_ps_mask(_mm512_mul_ps(r[c], zero), zero, _CMP_EQ_OQ);  // not NaN / Inf
        _mm512_storeu_ps(transposed + (k0 + c) * padded + i0, r[c]);
      }
    }
    if (finite != 0xFFFF) return false;
    const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                         _mm512_max_ps(_mm512_sqrt_ps(squares), _mm512_set1_ps(1e-12f)));
    for (int64_t k = 0; k < C; ++k) {
      float* column = transposed + k * padded + i0;
      _mm512_storeu_ps(column, _mm512_mul_ps(_mm512_loadu_ps(column), inverse));
    }
  }
  return true;
}
#endif

// Cosine distances max(1 - <u_i, u_j>, 0) of tokens i0 .. i0 + 15 and j0 .. j0 + 15 (j0 >= i0)
// from u^T [C, padded], stored at d[i, j] and, off the diagonal tile, at d[j, i] (row stride ld;
// entries < N only). A pair's FMA chain is the same whichever token is the row, so a tile on the
// diagonal is symmetric too.
template <typename T>
inline void distance_tile(const T* ut, int64_t padded, int64_t C, int64_t N, int64_t i0, int64_t j0,
                          T* d, int64_t ld) {
  typedef T Vec __attribute__((vector_size(kTile * sizeof(T))));
  Vec acc[kTile] = {};
  for (int64_t k = 0; k < C; ++k) {
    Vec t;
    std::copy(ut + k * padded + j0, ut + k * padded + j0 + kTile, reinterpret_cast<T*>(&t));
    for (int64_t r = 0; r < kTile; ++r) acc[r] += ut[k * padded + i0 + r] * t;  // zero past N
  }
  const Vec zero = {};
  for (Vec& v : acc) {
    v = 1 - v;
    v = v < zero ? zero : v;
  }
  const T(*tile)[kTile] = reinterpret_cast<const T(*)[kTile]>(acc);
  const int64_t rows = std::min(kTile, N - i0), columns = std::min(kTile, N - j0);
  for (int64_t r = 0; r < rows; ++r) std::copy(tile[r], tile[r] + columns, d + (i0 + r) * ld + j0);
  if (j0 == i0) return;
  for (int64_t c = 0; c < columns; ++c) {
    for (int64_t r = 0; r < rows; ++r) d[(j0 + c) * ld + i0 + r] = tile[r][c];
  }
}

#if defined(__AVX512F__)
// float32 with AVX-512: the tile in 16 registers, transposed in registers for the store below
// the diagonal.
template <>
inline void distance_tile<float>(const float* ut, int64_t padded, int64_t C, int64_t N, int64_t i0,
                                 int64_t j0, float* d, int64_t ld) {
  const __mmask16 rows = first_lanes(N - i0), columns = first_lanes(N - j0);
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < C; ++k) {
    const __m512 t = _mm512_loadu_ps(ut + k * padded + j0);
    const float* x = ut + k * padded + i0;  // zero past N
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r]), t, acc[r]);
  }
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int r = 0; r < 16; ++r) {
    acc[r] = _mm512_max_ps(_mm512_sub_ps(one, acc[r]), zero);
    if (rows >> r & 1) _mm512_mask_storeu_ps(d + (i0 + r) * ld + j0, columns, acc[r]);
  }
  if (j0 == i0) return;
  transpose16(acc);
  for (int c = 0; c < 16; ++c) {
    if (columns >> c & 1) _mm512_mask_storeu_ps(d + (j0 + c) * ld + i0, rows, acc[c]);
  }
}
#endif

// Cosine distances from u^T [C, padded] into d [N, N] (row stride ld): each pair once, in tiles
// on and above the diagonal, each stored on both sides, so exactly symmetric.
template <typename T>
void distances_from_columns(const T* ut, int64_t padded, int64_t C, int64_t N, T* d, int64_t ld,
                            int threads) {
  parallel_for(threads, padded / kTile, 1, [&](int64_t tile_row) {
    const int64_t i0 = tile_row * kTile;
    for (int64_t j0 = i0; j0 < N; j0 += kTile) distance_tile(ut, padded, C, N, i0, j0, d, ld);
  });
}

// Cosine distances max(1 - <u_i, u_j>, 0) of the rows of features [N, C] into d [N, N] (row
// stride ld), exactly symmetric. False (d undefined) if a feature is NaN or Inf.
template <typename T>
bool cosine_distances(const T* features, int64_t N, int64_t C, T* d, int64_t ld, Workspace<T>& w) {
  const int64_t padded = round_up_to_tile(N);
  w.transposed.resize(C * padded);
  w.inverse_norm.resize(N);
  if (!unit_columns(features, N, C, padded, w.transposed.data(), w.inverse_norm.data())) return false;
  distances_from_columns(w.transposed.data(), padded, C, N, d, ld, w.threads);
  return true;
}

// The columns a scan considers.
struct ActiveColumns {  // complete/average: the active clusters, bit c % 16 of bits[c / 16]
  const uint16_t* bits;    // (bits past the row width are 0)
  bool operator()(int64_t c) const { return bits[c >> 4] >> (c & 15) & 1; }
#if defined(__AVX512F__)
  __mmask16 lanes(int64_t c, int64_t) const { return bits[c >> 4]; }
#endif
};

struct OtherClusters {  // single: the tokens of clusters other than `own`
  const int32_t* cluster;
  int32_t own;
  bool operator()(int64_t c) const { return cluster[c] != own; }
#if defined(__AVX512F__)
  __mmask16 lanes(int64_t c, int64_t width) const {
    const __mmask16 inside = first_lanes(width - c);
    return _mm512_mask_cmpneq_epi32_mask(inside, _mm512_maskz_loadu_epi32(inside, cluster + c),
                                         _mm512_set1_epi32(own));
  }
#endif
};

// Minimum of row [width] over the considered columns (lanes(c, width): the 16 from c on, as a
// mask, none past width), a column attaining it (-1 if none: the
// minimum is +inf) and whether only that column does.
template <typename T, typename Columns>
inline T masked_minimum(const T* row, int64_t width, const Columns& columns, int64_t& column,
                        bool& unique) {
  T best = std::numeric_limits<T>::infinity();
  int64_t count = 0;
  column = -1;
  for (int64_t c = 0; c < width; ++c) {
    if (!columns(c)) continue;
    if (row[c] < best) {
      best = row[c];
      column = c;
      count = 1;
    } else {
      count += row[c] == best;
    }
  }
  unique = count == 1;
  return best;
}

// visit(c) for every considered column c of row [width] with row[c] == value, ascending.
template <typename T, typename Columns, typename Visit>
inline void for_each_equal(const T* row, int64_t width, T value, const Columns& columns, Visit visit) {
  for (int64_t c = 0; c < width; ++c) {
    if (columns(c) && row[c] == value) visit(c);
  }
}

#if defined(__AVX512F__)
// float32 with AVX-512: one pass keeping, per lane, the minimum, its first column and whether it
// repeats.
template <typename Columns>
inline float masked_minimum(const float* row, int64_t width, const Columns& columns, int64_t& column,
                            bool& unique) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512i step = _mm512_set1_epi32(16);
  __m512 lane_min = inf;
  __m512i lane_column = _mm512_setzero_si512();
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 repeated = 0;
  for (int64_t c = 0; c < width; c += 16) {
    const __m512 v = _mm512_mask_loadu_ps(inf, columns.lanes(c, width), row + c);
    const __mmask16 below = _mm512_cmp_ps_mask(v, lane_min, _CMP_LT_OQ);
    repeated = (repeated & ~below) | _mm512_cmp_ps_mask(v, lane_min, _CMP_EQ_OQ);
    lane_min = _mm512_min_ps(v, lane_min);
    lane_column = _mm512_mask_mov_epi32(lane_column, below, lane);
    lane = _mm512_add_epi32(lane, step);
  }
  const float best = _mm512_reduce_min_ps(lane_min);
  if (std::isinf(best)) {
    column = -1;
    unique = false;
    return best;
  }
  const __mmask16 at = _mm512_cmp_ps_mask(lane_min, _mm512_set1_ps(best), _CMP_EQ_OQ);
  alignas(64) int32_t columns_at[16];
  _mm512_store_si512(columns_at, lane_column);
  column = columns_at[__builtin_ctz(at)];
  unique = (at & (at - 1)) == 0 && (at & repeated) == 0;
  return best;
}

// float32 with AVX-512: equal lanes found by mask.
template <typename Columns, typename Visit>
inline void for_each_equal(const float* row, int64_t width, float value, const Columns& columns,
                           Visit visit) {
  const __m512 target = _mm512_set1_ps(value);
  for (int64_t c = 0; c < width; c += 16) {
    const __mmask16 considered = columns.lanes(c, width);
    for (__mmask16 equal = _mm512_mask_cmpeq_ps_mask(considered, _mm512_maskz_loadu_ps(considered, row + c), target);
         equal != 0; equal &= equal - 1) {
      visit(c + __builtin_ctz(equal));
    }
  }
}
#endif

// Nearest neighbour of the cluster of rank `rank_r` from its row [width], over the active columns:
// the minimum, ties to the smallest rank XOR rank. Returns the rank of the neighbour (rank_r for
// an isolated cluster) and whether the minimum is unique (then ranks did not matter).
template <typename T>
inline bool nearest_neighbour(const T* row, const ActiveColumns& active, int64_t width, int32_t rank_r,
                              const int32_t* rank, T& best, int32_t& nearest_rank) {
  int64_t column;
  bool unique;
  best = masked_minimum(row, width, active, column, unique);
  if (column < 0) {  // isolated
    nearest_rank = rank_r;
    return true;
  }
  if (unique) {
    nearest_rank = rank[column];
    return true;
  }
  int32_t best_xor = std::numeric_limits<int32_t>::max();
  for_each_equal(row, width, best, active, [&](int64_t c) { best_xor = std::min(best_xor, rank_r ^ rank[c]); });
  nearest_rank = rank_r ^ best_xor;
  return false;
}

// Whether the rounds can stop: no later merge can be among the kept ones.
template <typename T>
bool finished(const std::vector<Edge>& edges, T lowest_open, int64_t num_merges, bool use_threshold,
              T threshold) {
  if (std::isinf(lowest_open)) return true;
  if (use_threshold) return lowest_open > threshold;
  int64_t below = 0;
  for (const Edge& e : edges) below += e.height <= lowest_open;
  return below >= num_merges;
}

// One row x of the Lance-Williams column update: row[a_q] = max(row[a_q], row[b_q]) (complete) or
// row[a_q] * (1 - w_q) + row[b_q] * w_q (average) for the merging pairs q < p (distinct entries).
// Returns whether a new entry is <= nearest (x's cached nearest-neighbour distance).
template <typename T>
inline bool update_pair_columns(T* row, const int32_t* pair_a, const int32_t* pair_b, const T* weight_b,
                                int64_t p, bool complete, T nearest) {
  bool beaten = false;
  for (int64_t q = 0; q < p; ++q) {
    const T v = complete ? std::max(row[pair_a[q]], row[pair_b[q]])
                         : row[pair_a[q]] * (T(1) - weight_b[q]) + row[pair_b[q]] * weight_b[q];
    row[pair_a[q]] = v;
    beaten |= v <= nearest;
  }
  return beaten;
}

#if defined(__AVX512F__)
// float32 with AVX-512: 16 pairs at a time, gather / scatter.
template <>
inline bool update_pair_columns<float>(float* row, const int32_t* pair_a, const int32_t* pair_b,
                                       const float* weight_b, int64_t p, bool complete, float nearest) {
  __mmask16 beaten = 0;
  for (int64_t q = 0; q < p; q += 16) {
    const __mmask16 lanes = first_lanes(p - q);
    const __m512i column_a = _mm512_maskz_loadu_epi32(lanes, pair_a + q);
    const __m512 entry_a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, column_a, row, 4);
    const __m512 entry_b = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes,
                                                    _mm512_maskz_loadu_epi32(lanes, pair_b + q), row, 4);
    __m512 v;
    if (complete) {
      v = _mm512_max_ps(entry_a, entry_b);
    } else {
      const __m512 w = _mm512_maskz_loadu_ps(lanes, weight_b + q);
      v = _mm512_add_ps(_mm512_mul_ps(entry_a, _mm512_sub_ps(_mm512_set1_ps(1.0f), w)),
                        _mm512_mul_ps(entry_b, w));
    }
    _mm512_mask_i32scatter_ps(row, lanes, column_a, v, 4);
    beaten |= _mm512_mask_cmp_ps_mask(lanes, v, _mm512_set1_ps(nearest), _CMP_LE_OQ);
  }
  return beaten != 0;
}
#endif

// Complete / average linkage: RNN rounds on the uncompacted [N, N] matrix (row stride ld; slot =
// first member).
template <typename T>
void rnn_pair_rounds(T* d, int64_t N, int64_t ld, int linkage, int64_t num_merges, bool use_threshold,
                     T threshold, Workspace<T>& w) {
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<int64_t>& slots = w.slots;  // active slots, ascending (= rank order)
  slots.resize(N);
  std::iota(slots.begin(), slots.end(), 0);
  int32_t* rank = w.rank.data();
  // Active columns, 16 per word: merged-away clusters are masked out of the scans instead of
  // being set to +inf in every row.
  w.active.assign((N + 15) / 16, 0);
  for (int64_t c = 0; c < N; ++c) w.active[c >> 4] |= static_cast<uint16_t>(1u << (c & 15));
  uint16_t* active_bits = w.active.data();
  const ActiveColumns active{active_bits};
  while (slots.size() > 1) {
    const int64_t n = static_cast<int64_t>(slots.size());
    for (int64_t i = 0; i < n; ++i) rank[slots[i]] = static_cast<int32_t>(i);
    parallel_for(w.threads, n, 16, [&](int64_t i) {
      const int64_t r = slots[i];
      if (w.stale[r]) {
        int32_t nearest_rank;
        w.stale[r] = !nearest_neighbour(d + r * ld, active, N, rank[r], rank, w.nearest_dist[r], nearest_rank);
        w.nearest[r] = slots[nearest_rank];
      }
    });
    T lowest_open = inf;
    for (const int64_t r : slots) lowest_open = std::min(lowest_open, w.nearest_dist[r]);
    if (finished(w.edges, lowest_open, num_merges, use_threshold, threshold)) break;
    // Mutual pairs (a < b), in rank order of a; b's edge is recorded (in rank order of b, as
    // the torch path orders them), a keeps the union. (Branch-free: mutual pairs are sparse and
    // irregular.)
    int64_t p = 0, num_b = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = slots[i], j = w.nearest[r];
      const bool mutual = j != r && w.nearest[j] == r;
      w.merge_a[p] = static_cast<int32_t>(r);
      w.merge_b[p] = static_cast<int32_t>(j);
      p += mutual && r < j;
      w.absorbed[num_b] = static_cast<int32_t>(r);
      num_b += mutual && j < r;
    }
    for (int64_t q = 0; q < num_b; ++q) {
      const int64_t r = w.absorbed[q], j = w.nearest[r];
      // Heights made monotone: never below the merges that formed the two clusters.
      const T height = std::max(w.nearest_dist[r], std::max(w.own_height[r], w.own_height[j]));
      w.edges.push_back({r, j, static_cast<double>(height)});  // slots are first members
    }
    // Rows: row a = Lance-Williams(row a, row b) for every pair.
    parallel_for(w.threads, p, 1, [&](int64_t q) {
      const int64_t a = w.merge_a[q], b = w.merge_b[q];
      const T size_a = w.size[a], size_b = w.size[b];
      const T wb = T(1) - size_a / (size_a + size_b), wa = T(1) - wb;
      w.weight_b[q] = wb;
      w.own_height[a] = std::max(w.nearest_dist[a], std::max(w.own_height[a], w.own_height[b]));
      w.size[a] = size_a + size_b;
      T* ra = d + a * ld;
      const T* rb = d + b * ld;
      if (linkage == kComplete) {
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) ra[c] = std::max(ra[c], rb[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) ra[c] = ra[c] * wa + rb[c] * wb;
      }
      w.merged[a] = w.merged[b] = 1;
      w.stale[a] = 1;
    });
    int64_t kept = 0;  // drop the absorbed b of every pair
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = slots[i];
      slots[kept] = r;
      kept += !(w.merged[r] && w.nearest[r] < r);
    }
    slots.resize(kept);
    for (int64_t q = 0; q < p; ++q) {
      const int64_t b = w.merge_b[q];
      active_bits[b >> 4] = static_cast<uint16_t>(active_bits[b >> 4] & ~(1u << (b & 15)));
    }
    // Columns, row by row: D[x, a] = Lance-Williams(D[x, a], D[x, b]) (b is masked out). The
    // pairs are combined in rank order, so an entry between two pairs is combined over the
    // lower pair first (as in the torch path); the lower triangle copies it below.
    const int64_t num_active = static_cast<int64_t>(slots.size());
    parallel_for(w.threads, num_active, 64, [&](int64_t i) {
      const int64_t x = slots[i];
      T* row = d + x * ld;
      const bool beaten = update_pair_columns(row, w.merge_a.data(), w.merge_b.data(), w.weight_b.data(),
                                              p, linkage == kComplete, w.nearest_dist[x]);
      w.stale[x] = w.stale[x] || beaten || w.merged[w.nearest[x]];
    });
    if (linkage == kAverage) {
      for (int64_t q = 0; q < p; ++q) {
        for (int64_t s = 0; s < q; ++s) d[w.merge_a[q] * ld + w.merge_a[s]] = d[w.merge_a[s] * ld + w.merge_a[q]];
      }
    }
    for (int64_t q = 0; q < p; ++q) w.merged[w.merge_a[q]] = w.merged[w.merge_b[q]] = 0;
  }
}

// Single linkage: Borůvka rounds on the token matrix. The distance between two clusters is their
// closest token pair, and the pair realising an edge is the smallest i * N + j (i in the row's
// cluster) at that distance: the same edges, in the same order, as the torch path's compacted
// matrix. A token's row minimum over the other clusters is rescanned only when the column that
// attained it joined the token's cluster (or it was attained more than once).
template <typename T>
void boruvka_rounds(const T* d, int64_t N, int64_t ld, int64_t num_merges, bool use_threshold, T threshold,
                    Workspace<T>& w) {
  const T inf = std::numeric_limits<T>::infinity();
  int32_t* cluster = w.cluster.data();
  std::iota(w.cluster.begin(), w.cluster.end(), 0);  // cluster rank = order by first member
  std::iota(w.members.begin(), w.members.end(), 0);  // CSR: tokens of each cluster, ascending
  std::iota(w.member_start.begin(), w.member_start.end(), 0);
  std::fill(w.row_column.begin(), w.row_column.end(), 0);
  std::fill(w.row_unique.begin(), w.row_unique.end(), 0);
  int64_t n = N;
  while (n > 1) {
    parallel_for(w.threads, N, 64, [&](int64_t i) {
      const int64_t j = w.row_column[i];
      if (j >= 0 && (!w.row_unique[i] || cluster[j] == cluster[i])) {
        bool unique;
        w.row_min[i] = masked_minimum(d + i * ld, N, OtherClusters{cluster, cluster[i]}, w.row_column[i], unique);
        w.row_unique[i] = unique;
      }
    });
    // Nearest cluster of every cluster: closest token pair, ties to the smallest rank XOR rank,
    // then to the smallest pair index.
    parallel_for(w.threads, n, 16, [&](int64_t c) {
      T best = inf;
      int64_t rows_at_best = 0, row = -1;
      for (int64_t e = w.member_start[c]; e < w.member_start[c + 1]; ++e) {
        const int64_t i = w.members[e];
        if (w.row_min[i] < best) {
          best = w.row_min[i];
          rows_at_best = 1;
          row = i;
        } else {
          rows_at_best += w.row_min[i] == best;
        }
      }
      w.nearest_dist[c] = best;
      w.nearest[c] = c;
      if (std::isinf(best)) return;
      if (rows_at_best == 1 && w.row_unique[row]) {  // one token pair at that distance
        w.nearest[c] = cluster[w.row_column[row]];
        w.edge_pair[c] = row * N + w.row_column[row];
        return;
      }
      int64_t best_xor = std::numeric_limits<int64_t>::max(), best_pair = 0;
      for (int64_t e = w.member_start[c]; e < w.member_start[c + 1]; ++e) {
        const int64_t i = w.members[e];
        if (w.row_min[i] != best) continue;
        for_each_equal(d + i * ld, N, best, OtherClusters{cluster, static_cast<int32_t>(c)}, [&](int64_t j) {
          const int64_t x = c ^ cluster[j], pair = i * N + j;
          if (x < best_xor || (x == best_xor && pair < best_pair)) {
            best_xor = x;
            best_pair = pair;
          }
        });
      }
      w.nearest[c] = c ^ best_xor;
      w.edge_pair[c] = best_pair;
    });
    T lowest_open = inf;
    for (int64_t c = 0; c < n; ++c) lowest_open = std::min(lowest_open, w.nearest_dist[c]);
    if (finished(w.edges, lowest_open, num_merges, use_threshold, threshold)) break;
    // Every cluster joins its nearest neighbour; a mutual pair records one edge (the lower rank's).
    for (int64_t c = 0; c < n; ++c) {
      const int64_t j = w.nearest[c];
      const bool mutual = j != c && w.nearest[j] == c;
      w.edge[c] = !std::isinf(w.nearest_dist[c]) && !(mutual && j > c);
      if (w.edge[c]) {
        w.edges.push_back({w.edge_pair[c] / N, w.edge_pair[c] % N, static_cast<double>(w.nearest_dist[c])});
      }
    }
    // Trees of the edges (a forest under the tie rule), numbered by their lowest rank.
    for (int64_t c = 0; c < n; ++c) {
      int64_t x = c;
      while (w.edge[x]) x = w.nearest[x];
      w.root[c] = x;
      w.keeper[c] = -1;
    }
    int64_t m = 0;
    for (int64_t c = 0; c < n; ++c) {
      int64_t& k = w.keeper[w.root[c]];
      if (k < 0) k = m++;
      w.new_index[c] = k;
    }
    for (int64_t i = 0; i < N; ++i) cluster[i] = static_cast<int32_t>(w.new_index[cluster[i]]);
    std::fill(w.member_start.begin(), w.member_start.begin() + m + 1, 0);
    for (int64_t i = 0; i < N; ++i) ++w.member_start[cluster[i] + 1];
    for (int64_t a = 0; a < m; ++a) w.member_start[a + 1] += w.member_start[a];
    std::copy(w.member_start.begin(), w.member_start.begin() + m, w.member_fill.begin());
    for (int64_t i = 0; i < N; ++i) w.members[w.member_fill[cluster[i]]++] = i;
    n = m;
  }
}

template <typename T>
void cluster_sample(T* d, int64_t N, int64_t ld, const int64_t* groups, int linkage, int64_t num_merges,
                    bool use_threshold, T threshold, int64_t* labels, Workspace<T>& w) {
  mask_distances(d, N, ld, groups);
  w.nearest_dist.resize(N);
  w.size.assign(N, T(1));
  w.own_height.assign(N, -std::numeric_limits<T>::infinity());
  w.weight_b.resize(N);
  w.rank.resize(N);
  w.nearest.resize(N);
  w.row_min.resize(N);
  w.row_column.resize(N);
  w.row_unique.resize(N);
  w.cluster.resize(N);
  for (std::vector<int64_t>* v : {&w.new_index, &w.root, &w.keeper, &w.edge_pair,
                                   &w.member_fill, &w.members}) {
    v->resize(N);
  }
  w.merge_a.resize(N);
  w.merge_b.resize(N);
  w.absorbed.resize(N);
  w.member_start.resize(N + 1);
  w.stale.assign(N, 1);
  w.merged.assign(N, 0);
  w.edge.resize(N);
  w.edges.clear();
  if (linkage == kSingle) {
    boruvka_rounds(d, N, ld, num_merges, use_threshold, threshold, w);
  } else {
    rnn_pair_rounds(d, N, ld, linkage, num_merges, use_threshold, threshold, w);
  }

  // The cut: the lowest edges by (height, position) (edges are in (round, rank) order), in any
  // order, then union-find.
  const int64_t E = static_cast<int64_t>(w.edges.size());
  w.order.resize(E);
  std::iota(w.order.begin(), w.order.end(), 0);
  int64_t taken = 0;
  if (use_threshold) {
    for (int64_t e = 0; e < E; ++e) {
      if (static_cast<T>(w.edges[e].height) <= threshold) w.order[taken++] = e;
    }
  } else {
    taken = std::min(num_merges, E);
    std::nth_element(w.order.begin(), w.order.begin() + taken, w.order.end(), [&](int64_t a, int64_t b) {
      return w.edges[a].height < w.edges[b].height || (w.edges[a].height == w.edges[b].height && a < b);
    });
  }
  w.parent_of.resize(N);
  std::iota(w.parent_of.begin(), w.parent_of.end(), 0);
  auto find = [&](int64_t x) {
    while (w.parent_of[x] != x) {
      w.parent_of[x] = w.parent_of[w.parent_of[x]];
      x = w.parent_of[x];
    }
    return x;
  };
  for (int64_t t = 0; t < taken; ++t) {
    const Edge& e = w.edges[w.order[t]];
    const int64_t a = find(e.child), b = find(e.parent);
    if (a != b) w.parent_of[std::max(a, b)] = std::min(a, b);
  }
  w.label.assign(N, -1);
  int64_t next = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = find(i);
    if (w.label[r] < 0) w.label[r] = next++;
    labels[i] = w.label[r];
  }
}

// Either `distances` [B, N, N] (symmetric; overwritten) or `features` [B, N, C] (cosine distances
// are computed per sample into the workspace) is given, the other is null. `num_merges` [B]: the
// N - K merges of each sample (static stopping; null with use_threshold). Returns 0, 1 for bad
// arguments, or ATC_STATUS_NON_FINITE if a feature is NaN or Inf.
template <typename T>
int cluster_batch(T* distances, const T* features, int64_t B, int64_t N, int64_t C, const int64_t* groups,
                  int linkage, const int64_t* num_merges, int use_threshold, double threshold,
                  int64_t* labels, int num_threads) {
  if (N < 1 || N > kMaxTokens ||
      (linkage != kSingle && linkage != kComplete && linkage != kAverage) ||
      (distances == nullptr) == (features == nullptr) || (use_threshold == 0 && num_merges == nullptr)) {
    return 1;
  }
  int status = 0;
  // Samples in parallel; a large sample alone (a global block) is split over rows instead.
  const int threads = std::max(1, num_threads);
  const bool split_rows = N >= 512 && B < threads;
  const int outer = split_rows ? 1 : static_cast<int>(std::min<int64_t>(threads, B));
#pragma omp parallel num_threads(outer) if (outer > 1)
  {
    Workspace<T> w;
    w.threads = split_rows ? threads : 1;
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < B; ++b) {
      T* d;
      int64_t ld = N;
      if (distances != nullptr) {
        d = distances + b * N * N;
      } else {
        // Rows padded to whole 64-byte lines and aligned to one: no scan load or row store
        // straddles two cache lines.
        ld = round_up_to_tile(N);
        constexpr int64_t kAlign = 64 / sizeof(T);
        w.matrix.resize(N * ld + kAlign);
        d = w.matrix.data();
        d += (kAlign - reinterpret_cast<uintptr_t>(d) / sizeof(T) % kAlign) % kAlign;
        if (!cosine_distances(features + b * N * C, N, C, d, ld, w)) {
#pragma omp atomic write
          status = ATC_STATUS_NON_FINITE;
          continue;
        }
      }
      cluster_sample<T>(d, N, ld, groups == nullptr ? nullptr : groups + b * N, linkage,
                        use_threshold != 0 ? -1 : num_merges[b],
                        use_threshold != 0, static_cast<T>(threshold), labels + b * N, w);
    }
  }
  return status;
}

}  // namespace

extern "C" {

int atc_cluster_f32(float* distances, const float* features, int64_t B, int64_t N, int64_t C,
                    const int64_t* groups, int linkage, const int64_t* num_merges, int use_threshold,
                    double threshold, int64_t* labels, int num_threads) {
  return cluster_batch<float>(distances, features, B, N, C, groups, linkage, num_merges, use_threshold,
                              threshold, labels, num_threads);
}

int atc_cluster_f64(double* distances, const double* features, int64_t B, int64_t N, int64_t C,
                    const int64_t* groups, int linkage, const int64_t* num_merges, int use_threshold,
                    double threshold, int64_t* labels, int num_threads) {
  return cluster_batch<double>(distances, features, B, N, C, groups, linkage, num_merges, use_threshold,
                               threshold, labels, num_threads);
}

}  // extern "C"
