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

/* Columns per piece of the fused addition: u (CHUNK entries) stays in L1 while the partition rows
 * are summed into it, and the sample is taken from the added piece while it is there. */
#define CHUNK 1024

#define REAL float
#define ABS fabsf
#define NAME(f) f##_f32
#include "topk_rows.c"
#undef REAL
#undef ABS
#undef NAME

#define REAL double
#define ABS fabs
#define NAME(f) f##_f64
#include "topk_rows.c"
#undef REAL
#undef ABS
#undef NAME

#else

/* The k-th largest of a[0..n) (no NaN; 1 <= k <= n) by quickselect (median-of-three pivot, Hoare
 * partition, descending); a is reordered. */
static REAL NAME(kth_largest)(REAL *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        REAL x = a[lo], y = a[(lo + hi) >> 1], z = a[hi], s;
        if (x < y) {
            s = x;
            x = y;
            y = s;
        }
        if (y < z) y = x < z ? x : z;
        int64_t i = lo, j = hi;
        while (i <= j) { /* a[lo..i) >= pivot >= a(j..hi] */
            while (a[i] > y) i++;
            while (a[j] < y) j--;
            if (i <= j) {
                s = a[i];
                a[i] = a[j];
                a[j] = s;
                i++;
                j--;
            }
        }
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            return a[target];
    }
    return a[target];
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

/* Enter |a| (NaN as +inf) into the ascending buffer top[0..r) of the r largest seen so far: one
 * compare, an insertion for the few that enter. */
static inline void NAME(push)(REAL *top, int64_t r, REAL a) {
    a = ABS(a);
    if (a != a) a = INFINITY;
    if (a > top[0]) {
        int64_t q = 1;
        while (q < r && top[q] < a) {
            top[q - 1] = top[q];
            q++;
        }
        top[q - 1] = a;
    }
}

/* The r-th largest of |row[0]|, |row[h]|, |row[2h]|, ... (NaN as +inf; -1 when fewer than r are
 * sampled), kept in the ascending buffer top[0..r). Only a threshold: the selection using it is
 * exact. */
REAL NAME(rth_largest_strided)(const REAL *row, int64_t D, int64_t h, int64_t r, REAL *top) {
    for (int64_t q = 0; q < r; q++) top[q] = -1;
    for (int64_t j = 0; j < D; j += h) NAME(push)(top, r, row[j]);
    return top[0];
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

/* Rows i0..i1 of x (n, D), C-contiguous (see NAME(topk_rows) below). First, a row with adds[i] gets x_i += u_i,
 * u_i = sum_{e = crow[i]}^{crow[i+1]-1} val[e] * G[col[e]] (summed in entry order, then added), G
 * stored as nblocks column blocks: block b is the C-contiguous (rows, gwidth[b]) array at
 * g + gstart[b]. Then out[i, 0..k) = the positions of the k largest |x_ij| (NaN largest, ties to
 * the lower position) and picked[i, .] = x_i there; a row with active[i] == 0 gets 0..k-1.
 * The threshold t of a row is the r-th largest of its sample |x_i[::h]|; the candidates
 * |x_ij| >= t (or NaN) are selected exactly; a row with t <= 0, fewer than k or more than cap
 * candidates is selected over the full row. Returns 0, or -1 when scratch memory is short. */
static int NAME(rows)(REAL *x, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap, const uint8_t *active,
                      const uint8_t *adds, const int64_t *crow, const int64_t *col, const REAL *val, const REAL *g,
                      const int64_t *gstart, const int64_t *gwidth, int64_t nblocks, int64_t i0, int64_t i1,
                      int64_t *out, REAL *picked) {
    int64_t nw = (D + 7) / 8;
    REAL *u = malloc(sizeof(REAL) * (size_t)(CHUNK + 1));
    uint64_t *words = calloc((size_t)nw, sizeof(uint64_t)); /* the candidate mask, one byte per entry */
    int64_t *cand_idx = malloc(sizeof(int64_t) * (size_t)(cap + 8));
    REAL *cand_val = malloc(sizeof(REAL) * (size_t)(cap + 1)), *scratch = malloc(sizeof(REAL) * (size_t)(cap + 1));
    REAL *top = malloc(sizeof(REAL) * (size_t)(r + 1)), *full = NULL, *full_scratch = NULL;
    int status = 0;
    if (!u || !words || !cand_idx || !cand_val || !scratch || !top) {
        status = -1;
        goto done;
    }
    uint8_t *mask = (uint8_t *)words;
    for (int64_t i = i0; i < i1; i++) {
        REAL *row = x + i * D;
        int64_t *o_i = out + i * k, lo = crow[i], hi = crow[i + 1];
        int sampled = 0; /* whether top holds the row's sample (taken while the added chunks are in L1) */
        if (adds[i] && hi > lo) { /* x_i += u_i, block by block of columns, CHUNK columns at a time */
            int64_t off = 0, next = 0; /* next: the next sampled position */
            sampled = active[i];
            for (int64_t q = 0; q < r; q++) top[q] = -1;
            for (int64_t b = 0; b < nblocks; b++) {
                int64_t w = gwidth[b];
                for (int64_t c = 0; c < w; c += CHUNK) {
                    int64_t n = w - c < CHUNK ? w - c : CHUNK;
                    NAME(scaled)(u, g + gstart[b] + col[lo] * w + c, val[lo], n);
                    for (int64_t nz = lo + 1; nz < hi; nz++)
                        NAME(add_scaled)(u, g + gstart[b] + col[nz] * w + c, val[nz], n);
                    NAME(add)(row + off + c, u, n);
                    if (sampled)
                        for (; next < off + c + n; next += h) NAME(push)(top, r, row[next]);
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
        REAL t = sampled ? top[0] : NAME(rth_largest_strided)(row, D, h, r, top);
        int selected = 0;
        if (t > 0) { /* candidates |x_j| >= t (or NaN), in order: a byte mask, then its nonzero words */
            for (int64_t j = 0; j < D; j++) mask[j] = !(ABS(row[j]) < t);
            int64_t count = 0;
            for (int64_t w = 0; w < nw; w++) {
                if (words[w]) {
                    int64_t base = count < cap ? count : cap, p = base;
                    for (int q = 0; q < 8; q++) {
                        cand_idx[p] = w * 8 + q;
                        p += mask[w * 8 + q];
                    }
                    count += p - base;
                }
            }
            if (k <= count && count <= cap) {
                int nan = 0;
                for (int64_t c = 0; c < count; c++) {
                    REAL a = ABS(row[cand_idx[c]]);
                    cand_val[c] = a;
                    scratch[c] = a;
                    nan |= a != a;
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
    }
done:
    free(u);
    free(words);
    free(cand_idx);
    free(cand_val);
    free(scratch);
    free(top);
    free(full);
    free(full_scratch);
    return status;
}

/* All n rows (see NAME(rows) above), split into `threads` ranges run in parallel (OpenMP; one
 * range, on the calling thread, without it). Returns 0, or -1 when scratch memory is short. */
int NAME(topk_rows)(REAL *x, int64_t n, int64_t D, int64_t k, int64_t h, int64_t r, int64_t cap,
                    const uint8_t *active, const uint8_t *adds, const int64_t *crow, const int64_t *col,
                    const REAL *val, const REAL *g, const int64_t *gstart, const int64_t *gwidth, int64_t nblocks,
                    int64_t threads, int64_t *out, REAL *picked) {
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
        status |= NAME(rows)(x, D, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, nblocks, i0, i1,
                             out, picked);
    }
    free(work);
#else
    (void)threads;
    status = NAME(rows)(x, D, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, nblocks, 0, n, out,
                        picked);
#endif
    return status;
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
