/* The exact Top-k selection of many rows, one pass per row (cocoef_cli/sim/kernels.py builds and
 * calls it). Plain C99, no Python API: kernels.py compiles it once per machine with the C compiler
 * (-O3 -ffp-contract=off: no fused multiply-add, so every sum is the same IEEE operations in the
 * same order on every CPU; -fopenmp where the compiler has it) and calls it through ctypes, which
 * releases the GIL. With OpenMP, ranges of rows run in parallel on the OpenMP threads torch
 * already runs (the kernel's libgomp.so.1 is the one torch loaded), so the cores torch just used
 * pick the rows up without a second pool of threads competing for them.
 *
 * The file is read twice by the preprocessor: once for float (suffix _f32), once for double
 * (_f64); REAL and NAME() are the element type and the suffixed name of the current pass. */
#ifndef REAL

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The candidate masks of 64 entries, !(|p_q| < t) as bit q (true for NaN): one vector compare per
 * 16 (AVX-512) or 8 (AVX) floats where -march=native has them, else bytes packed 8 at a time. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define MASK64_SIMD 1
static inline uint64_t mask64_simd_f32(const float *p, float t) {
    __m512 tt = _mm512_set1_ps(t);
    uint64_t bits = 0;
    for (int q = 0; q < 4; q++)
        bits |= (uint64_t)_mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(p + 16 * q)), tt, _CMP_NLT_UQ) << (16 * q);
    return bits;
}
static inline uint64_t mask64_simd_f64(const double *p, double t) {
    __m512d tt = _mm512_set1_pd(t);
    uint64_t bits = 0;
    for (int q = 0; q < 8; q++)
        bits |= (uint64_t)_mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_loadu_pd(p + 8 * q)), tt, _CMP_NLT_UQ) << (8 * q);
    return bits;
}
#elif defined(__AVX__)
#include <immintrin.h>
#define MASK64_SIMD 1
static inline uint64_t mask64_simd_f32(const float *p, float t) {
    __m256 tt = _mm256_set1_ps(t), sign = _mm256_set1_ps(-0.0f);
    uint64_t bits = 0;
    for (int q = 0; q < 8; q++) {
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p + 8 * q));
        bits |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, tt, _CMP_NLT_UQ)) << (8 * q);
    }
    return bits;
}
static inline uint64_t mask64_simd_f64(const double *p, double t) {
    __m256d tt = _mm256_set1_pd(t), sign = _mm256_set1_pd(-0.0);
    uint64_t bits = 0;
    for (int q = 0; q < 16; q++) {
        __m256d a = _mm256_andnot_pd(sign, _mm256_loadu_pd(p + 4 * q));
        bits |= (uint64_t)(uint32_t)_mm256_movemask_pd(_mm256_cmp_pd(a, tt, _CMP_NLT_UQ)) << (4 * q);
    }
    return bits;
}
#endif

/* The products of NAME(product) hold two rows of 32 floats (64 with AVX-512) in registers where
 * the build has AVX2 and FMA; elsewhere they run one entry at a time (the same operations). */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PRODUCT_SIMD 1
#endif

/* Columns [f0, f0 + 4 W) of two rows o1, o2 of NAME(product), while they fit, in 8 registers
 * of W floats (V the vector type, P the intrinsics' prefix): FMA(l_0, x_0, +0), then
 * FMA(l_k, x_k, .) for k = 1 .. B - 1, the same operations at every width. */
#define PRODUCT_TWO_ROWS(V, P, W)                                                                   \
    for (; f0 + 4 * (W) <= F; f0 += 4 * (W)) {                                                      \
        V p = P##_set1_ps(e1[0]), q = P##_set1_ps(e2[0]), zero = P##_setzero_ps(), a[4], b[4];      \
        for (int v = 0; v < 4; v++) {                                                               \
            V xv = P##_loadu_ps((const float *)x + f0 + (W) * v);                                   \
            a[v] = P##_fmadd_ps(p, xv, zero);                                                       \
            b[v] = P##_fmadd_ps(q, xv, zero);                                                       \
        }                                                                                           \
        for (int64_t k = 1; k < B; k++) {                                                           \
            p = P##_set1_ps(e1[k]);                                                                 \
            q = P##_set1_ps(e2[k]);                                                                 \
            for (int v = 0; v < 4; v++) {                                                           \
                V xv = P##_loadu_ps((const float *)x + k * F + f0 + (W) * v);                       \
                a[v] = P##_fmadd_ps(p, xv, a[v]);                                                   \
                b[v] = P##_fmadd_ps(q, xv, b[v]);                                                   \
            }                                                                                       \
        }                                                                                           \
        for (int v = 0; v < 4; v++) {                                                               \
            P##_storeu_ps(o1 + f0 + (W) * v, a[v]);                                                 \
            P##_storeu_ps(o2 + f0 + (W) * v, b[v]);                                                 \
        }                                                                                           \
    }

/* A hint to fetch the 64 entries at p into the caches (L2) for reading; nothing where the compiler
 * has no prefetch builtin. The candidates pass of a row (in cache, compute-bound) fetches the next
 * row meanwhile, so that reading it from memory overlaps this row's selection. */
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH_64(p)                                                                              \
    do {                                                                                            \
        for (size_t l_ = 0; l_ < 64 * sizeof(*(p)); l_ += 64) __builtin_prefetch((const char *)(p) + l_, 0, 2); \
    } while (0)
#else
#define PREFETCH_64(p) ((void)0)
#endif

/* Bins of one round of the radix selection (NAME(kth_largest)). */
#define BINS 2048

/* Columns per piece of the fused addition: u (CHUNK entries) stays in L1 while the partition rows
 * are summed into it, and the sample is taken from the added piece while it is there. */
#define CHUNK 1024

#define REAL float
#define KEY uint32_t
#define ABS fabsf
#define FMA fmaf
#define IS_F32 1
#define NAME(f) f##_f32
#include "topk_rows.c"
#undef REAL
#undef KEY
#undef ABS
#undef FMA
#undef IS_F32
#undef NAME

#define REAL double
#define KEY uint64_t
#define ABS fabs
#define FMA fma
#define IS_F32 0
#define NAME(f) f##_f64
#include "topk_rows.c"
#undef REAL
#undef KEY
#undef ABS
#undef FMA
#undef IS_F32
#undef NAME

#else

/* The k-th largest of a[0..n) (non-negative, no NaN; 1 <= k <= n) by radix selection on the bits
 * (for such values their order as unsigned integers is the order of the values): a histogram of
 * up to BINS bins (about one per value) over the span of the bits, the bin holding the k-th
 * largest kept (in place, a is overwritten), repeated on that bin; no branch per element (the
 * number of rounds and the bin scan depend on the data). */
static REAL NAME(kth_largest)(REAL *a, int64_t n, int64_t k) {
    uint32_t hist[BINS];
    KEY lo = (KEY)-1, hi = 0, key;
    for (int64_t c = 0; c < n; c++) {
        memcpy(&key, a + c, sizeof key);
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
    }
    while (lo != hi) {
        int shift = 0;
        KEY most = n < 64 ? 64 : n < BINS ? (KEY)n : BINS; /* about one bin per value, 64 to BINS */
        while (((hi - lo) >> shift) >= most) shift++;
        int64_t bins = (int64_t)((hi - lo) >> shift) + 1, b, above = 0, m = 0;
        memset(hist, 0, sizeof(uint32_t) * (size_t)bins);
        for (int64_t c = 0; c < n; c++) {
            memcpy(&key, a + c, sizeof key);
            hist[(key - lo) >> shift]++;
        }
        for (b = bins - 1; above + hist[b] < k; b--) above += hist[b];
        KEY bin_lo = lo + ((KEY)b << shift); /* keep the bin [bin_lo, bin_lo + 2^shift) */
        lo = (KEY)-1;
        hi = 0;
        /* the keys of non-negative floats are below 2^(bits - 1), and 2^shift <= hi - lo (most >=
         * 64), so bin_lo + 2^shift < 2^bits: below the bin, key - bin_lo wraps to at least 2^shift,
         * and one shift tells whether key is in */
        for (int64_t c = 0; c < n; c++) {
            memcpy(&key, a + c, sizeof key);
            KEY in = ((key - bin_lo) >> shift) == 0, mask = (KEY)0 - in;
            a[m] = a[c];
            m += (int64_t)in;
            lo = (key | ~mask) < lo ? key | ~mask : lo;
            hi = (key & mask) > hi ? key & mask : hi;
        }
        n = m;
        k -= above;
    }
    REAL kth;
    memcpy(&kth, &lo, sizeof kth);
    return kth;
}

/* out[0..k) = the positions (idx[j], or j when idx is NULL) of every vals[j] > kth or NaN (at most
 * k - 1 of them: kth is the k-th largest, NaN largest), in order, then of the vals[j] == kth of
 * lowest position. The first loop has no branch: a position that does not pass is overwritten. */
static void NAME(take_from)(const REAL *vals, const int64_t *idx, int64_t m, REAL kth, int64_t k, int64_t *out) {
    int64_t o = 0;
    for (int64_t j = 0; j < m; j++) {
        out[o < k - 1 ? o : k - 1] = idx ? idx[j] : j;
        o += (vals[j] > kth) | (vals[j] != vals[j]);
    }
    for (int64_t j = 0; j < m && o < k; j++)
        if (vals[j] == kth) out[o++] = idx ? idx[j] : j;
}

/* out[0..k) = the positions of the k largest vals[0..m) (NaN largest), ties to the lowest
 * position; scratch: m entries. */
static void NAME(select_into)(const REAL *vals, const int64_t *idx, int64_t m, int64_t k, int64_t *out, REAL *scratch) {
    int64_t nan = 0, c = 0;
    for (int64_t j = 0; j < m; j++) {
        if (vals[j] != vals[j])
            nan++;
        else
            scratch[c++] = vals[j];
    }
    if (nan >= k) { /* the k-th largest is NaN: the first k NaN */
        int64_t o = 0;
        for (int64_t j = 0; j < m && o < k; j++)
            if (vals[j] != vals[j]) out[o++] = idx ? idx[j] : j;
        return;
    }
    NAME(take_from)(vals, idx, m, NAME(kth_largest)(scratch, c, k - nan), k, out);
}

/* |a|, NaN as +inf: a sampled magnitude. On the bits, without a branch: the sign cleared, then
 * the lesser of that and +inf's bits (every NaN's bits, sign cleared, are above +inf's). */
static inline REAL NAME(sampled)(REAL a) {
    KEY key, inf;
    REAL infinity = (REAL)INFINITY;
    memcpy(&key, &a, sizeof key);
    memcpy(&inf, &infinity, sizeof inf);
    key &= ~((KEY)1 << (8 * sizeof(KEY) - 1));
    key = key < inf ? key : inf;
    memcpy(&a, &key, sizeof a);
    return a;
}

/* The r-th largest of the m non-zero sampled magnitudes in sample[0..m) (reordered), -1 when m < r
 * (the r-th largest of the whole sample, zeros included, is then 0: t <= 0 either way). */
static REAL NAME(threshold)(REAL *sample, int64_t m, int64_t r) {
    return m < r ? (REAL)-1 : NAME(kth_largest)(sample, m, r);
}

/* The r-th largest of |row[0]|, |row[h]|, |row[2h]|, ... (NaN as +inf; -1 when fewer than r are
 * non-zero), by radix selection over a copy of the non-zero ones in sample[0..ceil(D/h)). The
 * zeros (often half of an error-feedback row: pixels no image lights give zero gradients) are
 * left out of the copy: when r are non-zero the r-th largest is the same, and a radix round
 * over them would count one bin again and again. Only a threshold: the selection using it is
 * exact. */
REAL NAME(rth_largest_strided)(const REAL *row, int64_t D, int64_t h, int64_t r, REAL *sample) {
    int64_t m = 0;
    for (int64_t j = 0; j < D; j += h) {
        REAL s = NAME(sampled)(row[j]);
        sample[m] = s;
        m += s != 0;
    }
    return NAME(threshold)(sample, m, r);
}

/* acc = c * src, acc += c * src and dst += acc over w entries (vectorised: the arrays do not overlap). */
static void NAME(scaled)(REAL *restrict acc, const REAL *restrict src, REAL c, int64_t w) {
    for (int64_t q = 0; q < w; q++) acc[q] = c * src[q];
}

static void NAME(add_scaled)(REAL *restrict acc, const REAL *restrict src, REAL c, int64_t w) {
    for (int64_t q = 0; q < w; q++) acc[q] += c * src[q];
}

static void NAME(add)(REAL *restrict dst, const REAL *restrict acc, int64_t w) {
    for (int64_t q = 0; q < w; q++) dst[q] += acc[q];
}

/* dst += c0 s0 + ... (two to four terms) over w entries in one loop: the same roundings in the
 * same order as acc = c0 s0, acc += c1 s1, ..., dst += acc, without storing acc. */
static void NAME(add_combination)(REAL *restrict dst, const REAL *const *s, const REAL *c, int64_t terms, int64_t w) {
    const REAL *restrict s0 = s[0], *restrict s1 = s[1];
    REAL c0 = c[0], c1 = c[1];
    if (terms == 2) {
        for (int64_t q = 0; q < w; q++) dst[q] += c0 * s0[q] + c1 * s1[q];
        return;
    }
    const REAL *restrict s2 = s[2];
    REAL c2 = c[2];
    if (terms == 3) {
        for (int64_t q = 0; q < w; q++) dst[q] += c0 * s0[q] + c1 * s1[q] + c2 * s2[q];
        return;
    }
    const REAL *restrict s3 = s[3];
    REAL c3 = c[3];
    for (int64_t q = 0; q < w; q++) dst[q] += c0 * s0[q] + c1 * s1[q] + c2 * s2[q] + c3 * s3[q];
}

/* The bits !(|p_q| < t) of p[0..64) (see mask64_simd above). */
static inline uint64_t NAME(mask64)(const REAL *p, REAL t) {
#ifdef MASK64_SIMD
    return NAME(mask64_simd)(p, t);
#elif defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    uint64_t bits = 0; /* the byte packing below reads bytes little-endian */
    for (int q = 0; q < 64; q++) bits |= (uint64_t)!(ABS(p[q]) < t) << q;
    return bits;
#else
    uint8_t m[64];
    uint64_t w[8], bits = 0;
    for (int q = 0; q < 64; q++) m[q] = !(ABS(p[q]) < t);
    memcpy(w, m, sizeof m);
    for (int q = 0; q < 8; q++) /* byte b of w[q] (0 or 1) to bit b: the multiply gathers them in the top byte */
        bits |= (((w[q] & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56) << (8 * q);
    return bits;
#endif
}

/* The candidates of a row: the positions j with !(|row_j| < t) (|row_j| >= t, or NaN), ascending,
 * into idx and their |row_j| into val (both with room for cap + 4). Returns their count, or cap + 1
 * as soon as there are more than cap. Blocks of 64 entries: a bit mask, then its set bits by
 * count-trailing-zeros, the first four written whether set or not (no branch on how many). */
static int64_t NAME(candidates)(const REAL *row, int64_t D, REAL t, int64_t cap, int64_t *idx, REAL *val,
                                const REAL *next) {
    int64_t count = 0, j0 = 0;
    for (; j0 + 64 <= D; j0 += 64) {
        uint64_t bits = NAME(mask64)(row + j0, t);
        if (next) PREFETCH_64(next + j0);
        int64_t set = __builtin_popcountll(bits);
        if (count + set > cap) return cap + 1;
        for (int s = 0; s < 4; s++) { /* an unset slot writes position 63, overwritten later */
            int q = __builtin_ctzll(bits | 1ull << 63);
            idx[count + s] = j0 + q;
            val[count + s] = ABS(row[j0 + q]);
            bits &= bits - 1;
        }
        for (int64_t s = 4; bits; s++) {
            int q = __builtin_ctzll(bits);
            idx[count + s] = j0 + q;
            val[count + s] = ABS(row[j0 + q]);
            bits &= bits - 1;
        }
        count += set;
    }
    for (; j0 < D; j0++) {
        if (!(ABS(row[j0]) < t)) {
            if (count == cap) return cap + 1;
            idx[count] = j0;
            val[count++] = ABS(row[j0]);
        }
    }
    return count;
}

/* G's rows as the products that form them (NAME(topk_rows_fused)): block b of partition j's row
 * (width w_b) is, for kinds[b] == 0, the product L_b[j] (C_b, B) @ X_b[j] (B, F_b) flattened
 * (w_b = C_b F_b), each entry FMA(l_0, x_0, +0) and then FMA(l_k, x_k, .) for k = 1 .. B - 1; for
 * kinds[b] == 1, the sum over k of the rows L_b[j] (B, F_b), (((+0 + l_0) + l_1) + l_2) + ...
 * (w_b = F_b). The +0 start is the accumulator torch's products and sums start from: a product
 * that is exactly zero is then +0 (l_0 x_0 alone would keep -0 for l_0 < 0, x_0 = 0), and a sum of
 * -0 terms is +0.
 * L_b and X_b are C-contiguous (rows, ., .) arrays at the addresses lptr[b] and xptr[b]. The same
 * operations, in the same order, as torch's batched product and sum of a few terms on the CPUs
 * measured; kernels.py checks it on the run's own rows before it uses them. */
typedef struct {
    int64_t nblocks, B;
    const int64_t *kinds, *cs, *fs, *lptr, *xptr;
} NAME(terms_t);

/* o (C, F) = e (C, B) @ x (B, F) as above. */
static void NAME(product)(const REAL *restrict e, const REAL *restrict x, REAL *restrict o, int64_t C, int64_t B,
                          int64_t F) {
    int64_t c = 0;
#if defined(PRODUCT_SIMD) && IS_F32
    for (; c + 2 <= C; c += 2) { /* two rows at a time */
        const float *e1 = (const float *)e + c * B, *e2 = e1 + B;
        float *o1 = (float *)o + c * F, *o2 = o1 + F;
        int64_t f0 = 0;
#ifdef __AVX512F__
        PRODUCT_TWO_ROWS(__m512, _mm512, 16) /* 64 columns at a time */
#endif
        PRODUCT_TWO_ROWS(__m256, _mm256, 8) /* then 32 */
        for (int r = 0; r < 2; r++) { /* the last columns, one at a time */
            const float *er = r ? e2 : e1;
            float *orow = r ? o2 : o1;
            for (int64_t f = f0; f < F; f++) {
                float acc = fmaf(er[0], x[f], 0.0f);
                for (int64_t k = 1; k < B; k++) acc = fmaf(er[k], x[k * F + f], acc);
                orow[f] = acc;
            }
        }
    }
#endif
    for (; c < C; c++) { /* row by row: o_c = FMA(l_0, x_0, +0), then o_c = FMA(l_k, x_k, o_c) */
        const REAL *ec = e + c * B;
        REAL *restrict oc = o + c * F;
        for (int64_t f = 0; f < F; f++) oc[f] = FMA(ec[0], x[f], (REAL)0);
        for (int64_t k = 1; k < B; k++) {
            const REAL *restrict xk = x + k * F;
            REAL ek = ec[k];
            for (int64_t f = 0; f < F; f++) oc[f] = FMA(ek, xk[f], oc[f]);
        }
    }
}

/* dst[0..D) = partition j's row of G (all blocks, one after the other). */
static void NAME(partition_row)(const NAME(terms_t) *tm, int64_t j, REAL *dst) {
    int64_t off = 0, B = tm->B;
    for (int64_t b = 0; b < tm->nblocks; b++) {
        const REAL *L = (const REAL *)(intptr_t)tm->lptr[b];
        int64_t C = tm->cs[b], F = tm->fs[b];
        if (tm->kinds[b] == 0) {
            NAME(product)(L + j * C * B, (const REAL *)(intptr_t)tm->xptr[b] + j * B * F, dst + off, C, B, F);
            off += C * F;
        } else {
            const REAL *l = L + j * B * F;
            REAL *restrict d = dst + off;
            for (int64_t q = 0; q < F; q++) d[q] = (REAL)0 + l[q];
            for (int64_t k = 1; k < B; k++)
                for (int64_t q = 0; q < F; q++) d[q] += l[k * F + q];
            off += F;
        }
    }
}

/* Rows [first, stop) of G from its terms into out (stop - first, D): what NAME(topk_rows_fused)
 * adds, for kernels.py to check against torch's. */
void NAME(partition_rows)(int64_t first, int64_t stop, int64_t D, int64_t nblocks, const int64_t *kinds,
                          const int64_t *cs, const int64_t *fs, const int64_t *lptr, const int64_t *xptr, int64_t B,
                          REAL *out) {
    NAME(terms_t) tm = {nblocks, B, kinds, cs, fs, lptr, xptr};
    for (int64_t j = first; j < stop; j++) NAME(partition_row)(&tm, j, out + (j - first) * D);
}

/* Whether this build has the products at the speed that makes them worth fusing: a hardware FMA
 * (else fmaf is a library call per entry). */
int NAME(fused_form)(void) {
#if defined(__FMA__) || defined(FP_FAST_FMA)
    return 1;
#else
    return 0;
#endif
}

/* Rows i0..i1 of x (n, D), C-contiguous (see NAME(topk_rows) below). First, a row with adds[i] gets x_i += u_i,
 * u_i = sum_{e = crow[i]}^{crow[i+1]-1} val[e] * G[col[e]] (summed in entry order, then added), G
 * stored as nblocks column blocks: block b is the C-contiguous (rows, gwidth[b]) array at
 * g + gstart[b]. Then out[i, 0..k) = the positions of the k largest |x_ij| (NaN largest, ties to
 * the lower position) and picked[i, .] = x_i there; a row with active[i] == 0 gets 0..k-1.
 * With subtract, an active row then gets x_ij += -picked there (error feedback's e = v - m, as
 * that sum: +0 for a finite entry), while it is in cache. The threshold t of a row is the r-th largest of its sample |x_i[::h]|; the candidates
 * |x_ij| >= t (or NaN) are selected exactly; a row with t <= 0, fewer than k or more than cap
 * candidates is selected over the full row. Returns 0, or -1 when scratch memory is short. */
static int NAME(rows)(REAL *x, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap, const uint8_t *active,
                      const uint8_t *adds, const int64_t *crow, const int64_t *col, const REAL *val, const REAL *g,
                      const int64_t *gstart, const int64_t *gwidth, int64_t nblocks, const NAME(terms_t) *tm,
                      int64_t subtract, int64_t i0, int64_t i1, int64_t *out, REAL *picked) {
    REAL *u = malloc(sizeof(REAL) * (size_t)(CHUNK + 1));
    int64_t *cand_idx = malloc(sizeof(int64_t) * (size_t)(cap + 4));
    REAL *cand_val = malloc(sizeof(REAL) * (size_t)(cap + 4)), *scratch = malloc(sizeof(REAL) * (size_t)(cap + 1));
    REAL *sample = malloc(sizeof(REAL) * (size_t)(D / h + 1)), *full = NULL, *full_scratch = NULL;
    /* with tm: G's rows formed here from their terms, into a ring of `slots` rows (tag: the
     * partition a slot holds, or -1; user: the last row that read it, so that a row's own
     * partitions are never overwritten while it adds them); rows of sgc, frc and uncoded share
     * their partitions with their neighbours, so each is formed about once per range of rows */
    int64_t terms = 1, slots = 0, turn = 0;
    for (int64_t i = i0; i < i1; i++) terms = crow[i + 1] - crow[i] > terms ? crow[i + 1] - crow[i] : terms;
    if (tm) slots = 2 * terms > 8 ? 2 * terms : 8;
    REAL *ring = tm ? malloc(sizeof(REAL) * (size_t)(slots * D)) : NULL;
    int64_t *tag = tm ? malloc(sizeof(int64_t) * (size_t)(2 * slots)) : NULL, *user = tag ? tag + slots : NULL;
    const REAL **grow = malloc(sizeof(REAL *) * (size_t)terms); /* the rows of G row i adds, by term */
    int status = 0;
    if (!u || !cand_idx || !cand_val || !scratch || !sample || !grow || (tm && (!ring || !tag))) {
        status = -1;
        goto done;
    }
    for (int64_t s = 0; s < slots; s++) tag[s] = user[s] = -1;
    for (int64_t i = i0; i < i1; i++) {
        REAL *row = x + i * D;
        int64_t *o_i = out + i * k, lo = crow[i], hi = crow[i + 1];
        int sampled = 0; /* whether sample holds the row's sample (taken while the added chunks are in L1) */
        int64_t taken = 0;
        if (adds[i] && hi > lo) { /* x_i += u_i, block by block of columns, CHUNK columns at a time */
            int64_t off = 0, next = 0; /* next: the next sampled position */
            sampled = active[i];
            for (int64_t nz = lo; nz < hi; nz++) {
                if (!tm) {
                    grow[nz - lo] = NULL;
                    continue;
                }
                int64_t s = 0;
                while (s < slots && tag[s] != col[nz]) s++;
                if (s == slots) { /* not formed: into the next slot that this row does not read */
                    while (user[turn] == i) turn = (turn + 1) % slots;
                    s = turn;
                    turn = (turn + 1) % slots;
                    tag[s] = col[nz];
                    NAME(partition_row)(tm, col[nz], ring + s * D);
                }
                user[s] = i;
                grow[nz - lo] = ring + s * D;
            }
            for (int64_t b = 0; b < nblocks; b++) {
                int64_t w = gwidth[b];
                for (int64_t c = 0; c < w; c += CHUNK) {
                    int64_t n = w - c < CHUNK ? w - c : CHUNK;
#define G_AT(nz) (tm ? grow[(nz) - lo] + off + c : g + gstart[b] + col[nz] * w + c)
                    if (hi - lo >= 2 && hi - lo <= 4) { /* the usual d: one loop, no accumulator */
                        const REAL *src[4];
                        for (int64_t nz = lo; nz < hi; nz++) src[nz - lo] = G_AT(nz);
                        NAME(add_combination)(row + off + c, src, val + lo, hi - lo, n);
                    } else {
                        NAME(scaled)(u, G_AT(lo), val[lo], n);
                        for (int64_t nz = lo + 1; nz < hi; nz++) NAME(add_scaled)(u, G_AT(nz), val[nz], n);
                        NAME(add)(row + off + c, u, n);
                    }
#undef G_AT
                    if (sampled) /* the non-zero ones (see NAME(rth_largest_strided)) */
                        for (; next < off + c + n; next += h) {
                            REAL s = NAME(sampled)(row[next]);
                            sample[taken] = s;
                            taken += s != 0;
                        }
                }
                off += w;
            }
        }
        if (!active[i]) { /* a row whose selection is not used: any valid positions */
            for (int64_t o = 0; o < k; o++) {
                o_i[o] = o;
                picked[i * k + o] = row[o];
            }
            continue;
        }
        REAL t = sampled ? NAME(threshold)(sample, taken, r) : NAME(rth_largest_strided)(row, D, h, r, sample);
        int selected = 0;
        if (t > 0) {
            /* the next row, fetched here, meanwhile, where it is first read by its sample (it
             * does not add), or where it adds G's rows formed here (tm): then its addition's loop
             * reads it alone from memory, which did not stream it in at speed (the softmax and
             * MLP updates at M = 1,000 took 12-18 % longer on the Zen 5 without this). A row that
             * adds rows of a stored G streams both in (prefetching it measured 1.00-1.20x) */
            const REAL *next = i + 1 < i1 && (tm || !(adds[i + 1] && crow[i + 2] > crow[i + 1])) ? row + D : NULL;
            int64_t count = NAME(candidates)(row, D, t, cap, cand_idx, cand_val, next);
            if (k <= count && count <= cap) {
                int nan = 0;
                for (int64_t c = 0; c < count; c++) {
                    scratch[c] = cand_val[c];
                    nan |= cand_val[c] != cand_val[c];
                }
                if (nan)
                    NAME(select_into)(cand_val, cand_idx, count, k, o_i, scratch);
                else
                    NAME(take_from)(cand_val, cand_idx, count, NAME(kth_largest)(scratch, count, k), k, o_i);
                selected = 1;
            }
        }
        if (!selected) { /* over the full row */
            if (!full) {
                full = malloc(sizeof(REAL) * (size_t)D);
                full_scratch = malloc(sizeof(REAL) * (size_t)D);
                if (!full || !full_scratch) {
                    status = -1;
                    goto done;
                }
            }
            for (int64_t j = 0; j < D; j++) full[j] = ABS(row[j]);
            NAME(select_into)(full, NULL, D, k, o_i, full_scratch);
        }
        for (int64_t o = 0; o < k; o++) picked[i * k + o] = row[o_i[o]];
        if (subtract)
            for (int64_t o = 0; o < k; o++) row[o_i[o]] += -picked[i * k + o];
    }
done:
    free(ring);
    free(tag);
    free(grow);
    free(u);
    free(cand_idx);
    free(cand_val);
    free(scratch);
    free(sample);
    free(full);
    free(full_scratch);
    return status;
}

/* All n rows (see NAME(rows) above), split into `threads` ranges run in parallel (OpenMP; one
 * range, on the calling thread, without it). Returns 0, or -1 when scratch memory is short. */
static int NAME(run)(REAL *x, int64_t n, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap, const uint8_t *active,
                     const uint8_t *adds, const int64_t *crow, const int64_t *col, const REAL *val, const REAL *g,
                     const int64_t *gstart, const int64_t *gwidth, int64_t nblocks, const NAME(terms_t) *tm,
                     int64_t subtract, int64_t threads, int64_t *out, REAL *picked) {
    int status = 0;
#ifdef _OPENMP
    /* ranges of equal work: a row costs 1, plus 1 for its selection (active), plus 1 for its
     * addition (adds), so that stragglers' rows, which neither add nor select, do not leave a
     * thread idle at the end */
    int64_t *work = malloc(sizeof(int64_t) * (size_t)(n + 1));
    if (!work) return -1;
    work[0] = 0;
    for (int64_t i = 0; i < n; i++) work[i + 1] = work[i] + 1 + (active[i] != 0) + (adds[i] && crow[i + 1] > crow[i]);
#pragma omp parallel num_threads((int)threads) reduction(| : status)
    {
        int64_t t = omp_get_thread_num(), parts = omp_get_num_threads(), i0 = 0, i1 = 0;
        while (i0 < n && work[i0] * parts < work[n] * t) i0++; /* the first row at or after t/parts of the work */
        i1 = i0;
        while (i1 < n && work[i1] * parts < work[n] * (t + 1)) i1++;
        if (t == parts - 1) i1 = n;
        status |= NAME(rows)(x, D, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, nblocks, tm,
                             subtract, i0, i1, out, picked);
    }
    free(work);
#else
    (void)threads;
    status = NAME(rows)(x, D, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, nblocks, tm, subtract, 0,
                        n, out, picked);
#endif
    return status;
}

/* NAME(rows) over all n rows, G given as its column blocks (g, gstart, gwidth). */
int NAME(topk_rows)(REAL *x, int64_t n, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap,
                    const uint8_t *active, const uint8_t *adds, const int64_t *crow, const int64_t *col,
                    const REAL *val, const REAL *g, const int64_t *gstart, const int64_t *gwidth, int64_t nblocks,
                    int64_t subtract, int64_t threads, int64_t *out, REAL *picked) {
    return NAME(run)(x, n, D, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, nblocks, NULL, subtract,
                     threads, out, picked);
}

/* NAME(rows) over all n rows, G's rows formed from their terms where they are added
 * (NAME(terms_t)), never stored whole: blocks of widths gwidth[0..nblocks). */
int NAME(topk_rows_fused)(REAL *x, int64_t n, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap,
                          const uint8_t *active, const uint8_t *adds, const int64_t *crow, const int64_t *col,
                          const REAL *val, const int64_t *gwidth, int64_t nblocks, const int64_t *kinds,
                          const int64_t *cs, const int64_t *fs, const int64_t *lptr, const int64_t *xptr, int64_t B,
                          int64_t subtract, int64_t threads, int64_t *out, REAL *picked) {
    NAME(terms_t) tm = {nblocks, B, kinds, cs, fs, lptr, xptr};
    return NAME(run)(x, n, D, k, h, r, cap, active, adds, crow, col, val, NULL, NULL, gwidth, nblocks, &tm, subtract,
                     threads, out, picked);
}

/* The candidate mask this build compiled (NAME(mask64)): 512 (AVX-512), 256 (AVX), 0 (portable). */
int NAME(vector_form)(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX__)
    return 256;
#else
    return 0;
#endif
}

/* Whether this build runs rows in parallel (OpenMP). */
int NAME(parallel)(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif
