/* Counter-causal softmax attention of the BAM scorer (namm_transfer.scorers), CPU float32, AVX2 + FMA.
 *
 * For each sequence: z_i = sum_{j >= i} softmax_j(q_i . x_j) x_j, where the logits are given in base 2
 * (the caller scales q by log2(e)). Keys and values are the same features x (the BAM's key and value
 * projections are folded into q and into the caller's product after this one; see scorers.py).
 * Queries go in blocks of 48, keys in blocks of 128 (a key block's slices of x stay in L1 while the
 * query block uses it), three queries at a time: logits vectorised over keys (read from a transposed
 * copy of x), an online base-2 softmax (running max and sum), then the weighted sum of x, dims 0..23
 * vectorised over dims (three registers) and any further dims over keys. */
#include <immintrin.h>
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DPAD 32 /* widest feature vector: d <= 32 */
#define R 3     /* queries per block */

/* 2^x for x <= 0 (clamped at -126): Cephes exp2f polynomial on the fraction, relative error ~2e-7 */
static inline __m256 exp2_ps(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#define KBLK 128 /* keys per block: its slices of x (transposed and padded) stay in L1 */
#define QBLK 48  /* queries per block (a multiple of R): they all use one key block before the next */
#define DV 24    /* value dims summed with the dims in registers (3 vectors); the rest key-vectorised */

typedef struct {
    float top[R], total[R]; /* running max (base 2) and sum of weights */
    __m256 acc[R][3];       /* running weighted sum of x, dims 0 .. 23 */
    float extra[R][DPAD - DV]; /* the same for dims 24 .. d - 1 */
} state_t;

/* One key block [kb, ke) (a multiple of 16 wide, keys past n padded) for queries i0 .. i0 + nr - 1:
 * logits, online base-2 softmax (running max and sum, the sums so far rescaled), weighted sum of x.
 * Keys before i0 are not computed at all (from the 16-key group holding i0). */
static inline __attribute__((always_inline)) void key_block(
    const int nr, const float *q, const float *xt, const float *xp, int64_t n, int64_t ld, int64_t d,
    int64_t i0, int64_t kb, int64_t ke, state_t *st) {
    float rows[R][KBLK];
    const int64_t t0 = i0 > kb ? (i0 - kb) & ~(int64_t)15 : 0, width = ke - kb;
    const int64_t real = (n < ke ? n : ke) - kb; /* keys >= n are padding */
    for (int64_t j = kb + t0; j < ke; j += 16) {
        /* two key vectors, and even / odd dims in separate sums: 12 independent FMA chains */
        __m256 lo[2][R], hi[2][R];
        for (int r = 0; r < nr; r++) lo[0][r] = hi[0][r] = lo[1][r] = hi[1][r] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 1 < d; k += 2) {
            for (int e = 0; e < 2; e++) {
                const __m256 kl = _mm256_loadu_ps(xt + (k + e) * ld + j);
                const __m256 kh = _mm256_loadu_ps(xt + (k + e) * ld + j + 8);
                for (int r = 0; r < nr; r++) {
                    const __m256 qv = _mm256_broadcast_ss(q + (i0 + r) * d + k + e);
                    lo[e][r] = _mm256_fmadd_ps(qv, kl, lo[e][r]);
                    hi[e][r] = _mm256_fmadd_ps(qv, kh, hi[e][r]);
                }
            }
        }
        if (k < d) {
            const __m256 kl = _mm256_loadu_ps(xt + k * ld + j), kh = _mm256_loadu_ps(xt + k * ld + j + 8);
            for (int r = 0; r < nr; r++) {
                const __m256 qv = _mm256_broadcast_ss(q + (i0 + r) * d + k);
                lo[0][r] = _mm256_fmadd_ps(qv, kl, lo[0][r]);
                hi[0][r] = _mm256_fmadd_ps(qv, kh, hi[0][r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            _mm256_storeu_ps(rows[r] + (j - kb), _mm256_add_ps(lo[0][r], lo[1][r]));
            _mm256_storeu_ps(rows[r] + (j - kb) + 8, _mm256_add_ps(hi[0][r], hi[1][r]));
        }
    }
    for (int r = 0; r < nr; r++) {
        float *row = rows[r];
        int64_t first = i0 + r > kb ? i0 + r - kb : 0; /* keys before the query are not seen */
        first = first < width ? first : width;
        for (int64_t t = t0; t < first; t++) row[t] = -FLT_MAX;
        for (int64_t t = real; t < width; t++) row[t] = -FLT_MAX;
        __m256 mv = _mm256_set1_ps(-FLT_MAX);
        for (int64_t t = t0; t < width; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + t));
        const float block_top = hmax(mv), top = block_top > st->top[r] ? block_top : st->top[r];
        const __m256 topv = _mm256_set1_ps(top);
        __m256 sv = _mm256_setzero_ps();
        for (int64_t t = t0; t < width; t += 8) {
            __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(row + t), topv));
            _mm256_storeu_ps(row + t, e);
            sv = _mm256_add_ps(sv, e);
        }
        float total = hsum(sv);
        for (int64_t t = t0; t < first; t++) total -= row[t], row[t] = 0.0f; /* exactly zero weight */
        for (int64_t t = real; t < width; t++) total -= row[t], row[t] = 0.0f;
        const __m256 scale = exp2_ps(_mm256_set1_ps(st->top[r] - top)); /* the earlier blocks' share */
        const float alpha = _mm256_cvtss_f32(scale);
        st->total[r] = st->total[r] * alpha + total;
        st->top[r] = top;
        for (int c = 0; c < 3; c++) st->acc[r][c] = _mm256_mul_ps(st->acc[r][c], scale);
        for (int64_t k = DV; k < d; k++) { /* dims past 24: over the keys, as the logits */
            __m256 dot = _mm256_setzero_ps();
            for (int64_t t = t0; t < width; t += 8)
                dot = _mm256_fmadd_ps(_mm256_loadu_ps(row + t), _mm256_loadu_ps(xt + k * ld + kb + t), dot);
            st->extra[r][k - DV] = st->extra[r][k - DV] * alpha + hsum(dot);
        }
    }
    __m256 acc[R][3];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 3; c++) acc[r][c] = st->acc[r][c];
    for (int64_t j = kb + (i0 > kb ? i0 - kb : 0); j < kb + real; j++) {
        const float *xj = xp + j * DV;
        const __m256 x0 = _mm256_loadu_ps(xj), x1 = _mm256_loadu_ps(xj + 8), x2 = _mm256_loadu_ps(xj + 16);
        for (int r = 0; r < nr; r++) {
            const __m256 p = _mm256_broadcast_ss(rows[r] + (j - kb));
            acc[r][0] = _mm256_fmadd_ps(p, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(p, x1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(p, x2, acc[r][2]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < 3; c++) st->acc[r][c] = acc[r][c];
}

/* queries [q0, q1) of one sequence (at most QBLK): key blocks outermost, so each serves every query */
static void query_block(const float *q, const float *xt, const float *xp, float *z, int64_t n, int64_t npad,
                        int64_t ld, int64_t d, int64_t q0, int64_t q1) {
    state_t st[QBLK / R];
    const int64_t n_sub = (q1 - q0 + R - 1) / R;
    for (int64_t b = 0; b < n_sub; b++)
        for (int r = 0; r < R; r++) {
            st[b].top[r] = -FLT_MAX;
            st[b].total[r] = 0.0f;
            for (int c = 0; c < 3; c++) st[b].acc[r][c] = _mm256_setzero_ps();
            for (int c = 0; c < DPAD - DV; c++) st[b].extra[r][c] = 0.0f;
        }
    for (int64_t kb = q0 & ~(int64_t)15; kb < n; kb += KBLK) {
        const int64_t ke = kb + KBLK < npad ? kb + KBLK : npad;
        for (int64_t b = 0; b < n_sub; b++) {
            const int64_t i0 = q0 + b * R, nr = q1 - i0 < R ? q1 - i0 : R;
            if (i0 >= ke) break; /* keys before a query are not seen: this block serves no later query */
            if (nr == 3)
                key_block(3, q, xt, xp, n, ld, d, i0, kb, ke, &st[b]);
            else if (nr == 2)
                key_block(2, q, xt, xp, n, ld, d, i0, kb, ke, &st[b]);
            else
                key_block(1, q, xt, xp, n, ld, d, i0, kb, ke, &st[b]);
        }
    }
    for (int64_t b = 0; b < n_sub; b++) {
        const int64_t i0 = q0 + b * R, nr = q1 - i0 < R ? q1 - i0 : R;
        for (int r = 0; r < nr; r++) {
            float out[DPAD];
            const float inv = 1.0f / st[b].total[r];
            const __m256 s = _mm256_set1_ps(inv);
            for (int c = 0; c < 3; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(st[b].acc[r][c], s));
            for (int c = 0; c < DPAD - DV; c++) out[DV + c] = st[b].extra[r][c] * inv;
            memcpy(z + (i0 + r) * d, out, sizeof(float) * d);
        }
    }
}

int namm_bam_attention(const float *q, const float *x, float *z, int64_t n_seq, int64_t n, int64_t d,
                       int64_t n_threads) {
    if (d < 1 || d > DPAD) return 1;
    if (n < 1) return 0;
    /* rows of the transposed copy 16 floats longer than the keys: a power-of-two stride would put
     * every dimension's row of a key block in the same L1 set */
    const int64_t npad = (n + 15) & ~(int64_t)15, ld = npad + 16;
    int failed = 0;
    (void)n_threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic) num_threads((int)(n_threads > 0 ? n_threads : 1))
#endif
    for (int64_t s = 0; s < n_seq; s++) {
        const unsigned int csr = _mm_getcsr();
        /* flush subnormals: attention weights below 2^-126 are zero anyway */
        _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);
        float *xt = aligned_alloc(32, sizeof(float) * (d * ld + npad * DV));
        if (!xt) {
            failed = 1;
            _mm_setcsr(csr);
            continue;
        }
        float *xp = xt + d * ld;
        const float *qs = q + s * n * d, *xs = x + s * n * d;
        memset(xt, 0, sizeof(float) * (d * ld + npad * DV));
        for (int64_t j = 0; j < n; j++)
            for (int64_t k = 0; k < d; k++) {
                xt[k * ld + j] = xs[j * d + k];
                if (k < DV) xp[j * DV + k] = xs[j * d + k];
            }
        float *zs = z + s * n * d;
        for (int64_t q0 = 0; q0 < n; q0 += QBLK)
            query_block(qs, xt, xp, zs, n, npad, ld, d, q0, q0 + QBLK < n ? q0 + QBLK : n);
        free(xt);
        _mm_setcsr(csr);
    }
    return failed ? 2 : 0;
}
