/* Fused streaming-spectrogram EMA for namm_transfer.features (CPU, float32, AVX2 + FMA).
 *
 * out[b][h][k][s] = sum_f weights[f] * |STFT frame f of key s's attention series|[k]
 *
 * Frame f reads rows first_start + f * hop + t (t = 0 .. n_fft - 1) of the chunk; a negative row r reads
 * row n_window + r of the window (the rows before the chunk). The periodic Hann window is zero at t = 0
 * and symmetric (w(t) = w(n_fft - t)), and cos / sin are even / odd about n_fft / 2, so with
 * u_t = x_t + x_{n-t} and v_t = x_t - x_{n-t} (t = 1 .. n/2 - 1):
 *     Re X_k = cosw[k][n/2] * x_{n/2} + sum_t cosw[k][t] * u_t,   Im X_k = sum_t sinw[k][t] * v_t,
 * about half the multiply-adds of the windowed DFT basis product. The magnitude
 * sqrt(power + floor) - sqrt(floor) (features.POWER_FLOOR) and the weighted sum over frames are taken
 * while a block of 16 keys is in registers / L1, so no frame is written to memory.
 * With arrival >= 0, slot arrival + r arrives with chunk row r: a frame ending before a key arrived
 * is zero for it (causal attention) and is skipped. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define KB 16        /* keys per block: two AVX registers */
#define MAX_HALF 32  /* n_fft <= 64 */
#define MAX_BINS (MAX_HALF + 1)

typedef struct {
    __m256 lo, hi;
} v16;

static inline v16 load16(const float *p, int full, __m256i mlo, __m256i mhi) {
    v16 r;
    if (full) {
        r.lo = _mm256_loadu_ps(p);
        r.hi = _mm256_loadu_ps(p + 8);
    } else {
        r.lo = _mm256_maskload_ps(p, mlo);
        r.hi = _mm256_maskload_ps(p + 8, mhi);
    }
    return r;
}

/* acc[j] = c0[j] * head + sum_{t=1}^{half-1} coef[j][t] * rows[t], for G bins starting at bin k0 */
static inline __attribute__((always_inline)) void bins_group(
    const int G, int k0, int half, int stride, const float *coef, const float *head_coef,
    const float (*rows)[KB], const float *head, float (*dst)[KB]) {
    __m256 lo[6], hi[6];
    for (int j = 0; j < G; j++) {
        if (head) {
            __m256 c = _mm256_set1_ps(head_coef[(k0 + j) * stride]);
            lo[j] = _mm256_mul_ps(c, _mm256_loadu_ps(head));
            hi[j] = _mm256_mul_ps(c, _mm256_loadu_ps(head + 8));
        } else {
            lo[j] = _mm256_setzero_ps();
            hi[j] = _mm256_setzero_ps();
        }
    }
    for (int t = 1; t < half; t++) {
        __m256 xl = _mm256_loadu_ps(rows[t]), xh = _mm256_loadu_ps(rows[t] + 8);
        for (int j = 0; j < G; j++) {
            __m256 c = _mm256_set1_ps(coef[(k0 + j) * stride + t]);
            lo[j] = _mm256_fmadd_ps(c, xl, lo[j]);
            hi[j] = _mm256_fmadd_ps(c, xh, hi[j]);
        }
    }
    for (int j = 0; j < G; j++) {
        _mm256_storeu_ps(dst[k0 + j], lo[j]);
        _mm256_storeu_ps(dst[k0 + j] + 8, hi[j]);
    }
}

/* bins k_begin .. k_end - 1 in groups of 6, 4, 2, 1 (fixed sizes keep the accumulators in registers) */
static void bins_all(int k_begin, int k_end, int half, int stride, const float *coef, const float *head_coef,
                     const float (*rows)[KB], const float *head, float (*dst)[KB]) {
    int k = k_begin;
    for (; k + 6 <= k_end; k += 6) bins_group(6, k, half, stride, coef, head_coef, rows, head, dst);
    for (; k + 4 <= k_end; k += 4) bins_group(4, k, half, stride, coef, head_coef, rows, head, dst);
    for (; k + 2 <= k_end; k += 2) bins_group(2, k, half, stride, coef, head_coef, rows, head, dst);
    for (; k < k_end; k++) bins_group(1, k, half, stride, coef, head_coef, rows, head, dst);
}

int namm_spectrogram_ema(
    const float *chunk, int64_t c_bs, int64_t c_hs, int64_t c_rs, int64_t n_chunk,
    const float *window, int64_t w_bs, int64_t w_hs, int64_t w_rs, int64_t n_window,
    int64_t batch, int64_t heads, int64_t n_keys,
    int64_t first_start, int64_t hop, int64_t n_fft, int64_t n_frames, const float *weights,
    int64_t arrival, const float *cosw, const float *sinw, float power_floor, float root_floor,
    float *out, int64_t o_bs, int64_t o_hs, int64_t o_ks, int64_t n_threads) {
    const int half = (int)(n_fft / 2), n_bins = half + 1;
    if (n_fft % 2 || half > MAX_HALF || half < 2) return 1;
    if (n_frames > 0 && first_start < -n_window) return 2;
    if (n_frames > 0 && first_start + (n_frames - 1) * hop + n_fft > n_chunk) return 3;
    const int64_t n_blocks = (n_keys + KB - 1) / KB, total = batch * heads * n_blocks;
    (void)n_threads;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)(n_threads > 0 ? n_threads : 1))
#endif
    for (int64_t job = 0; job < total; job++) {
        /* flush subnormals (tiny attention weights): their power is far below POWER_FLOOR, so the
         * features do not change, and subnormal operands cost the vector units a slow path */
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON);
        const int64_t b = job / (heads * n_blocks), h = (job / n_blocks) % heads, s0 = (job % n_blocks) * KB;
        const int width = (int)(n_keys - s0 < KB ? n_keys - s0 : KB), full = width == KB;
        int32_t m[KB];
        for (int i = 0; i < KB; i++) m[i] = i < width ? -1 : 0;
        const __m256i mlo = _mm256_loadu_si256((const __m256i *)m);
        const __m256i mhi = _mm256_loadu_si256((const __m256i *)(m + 8));
        float ema[MAX_BINS][KB], re[MAX_BINS][KB], im[MAX_BINS][KB];
        float u[MAX_HALF][KB], v[MAX_HALF][KB], mid[KB];
        memset(ema, 0, sizeof(float) * n_bins * KB);
        memset(im[0], 0, sizeof(float) * KB);
        memset(im[half], 0, sizeof(float) * KB);
        const float *cbase = chunk + b * c_bs + h * c_hs + s0;
        const float *wbase = window ? window + b * w_bs + h * w_hs + s0 : 0;
        int64_t f0 = 0;
        if (arrival >= 0) { /* first frame whose last row comes after key s0 arrived */
            int64_t need = s0 - arrival - first_start - n_fft + 1; /* hop * f >= need */
            if (need > 0) f0 = (need + hop - 1) / hop;
        }
        for (int64_t f = f0; f < n_frames; f++) {
            const int64_t r0 = first_start + f * hop;
#define ROW(t) ((r0 + (t)) < 0 ? wbase + (n_window + r0 + (t)) * w_rs : cbase + (r0 + (t)) * c_rs)
            for (int t = 1; t < half; t++) {
                v16 a = load16(ROW(t), full, mlo, mhi), c = load16(ROW(n_fft - t), full, mlo, mhi);
                _mm256_storeu_ps(u[t], _mm256_add_ps(a.lo, c.lo));
                _mm256_storeu_ps(u[t] + 8, _mm256_add_ps(a.hi, c.hi));
                _mm256_storeu_ps(v[t], _mm256_sub_ps(a.lo, c.lo));
                _mm256_storeu_ps(v[t] + 8, _mm256_sub_ps(a.hi, c.hi));
            }
            v16 xm = load16(ROW(half), full, mlo, mhi);
#undef ROW
            _mm256_storeu_ps(mid, xm.lo);
            _mm256_storeu_ps(mid + 8, xm.hi);
            bins_all(0, n_bins, half, half + 1, cosw, cosw + half, (const float(*)[KB])u, mid, re);
            bins_all(1, half, half, half, sinw, 0, (const float(*)[KB])v, 0, im);
            const __m256 wf = _mm256_set1_ps(weights[f]), pf = _mm256_set1_ps(power_floor),
                         rf = _mm256_set1_ps(root_floor);
            for (int k = 0; k < n_bins; k++) {
                for (int q = 0; q < KB; q += 8) {
                    __m256 r = _mm256_loadu_ps(re[k] + q), i = _mm256_loadu_ps(im[k] + q);
                    __m256 p = _mm256_fmadd_ps(i, i, _mm256_fmadd_ps(r, r, pf));
                    __m256 mag = _mm256_sub_ps(_mm256_sqrt_ps(p), rf);
                    _mm256_storeu_ps(ema[k] + q, _mm256_fmadd_ps(wf, mag, _mm256_loadu_ps(ema[k] + q)));
                }
            }
        }
        float *obase = out + b * o_bs + h * o_hs + s0;
        for (int k = 0; k < n_bins; k++) {
            memcpy(obase + k * o_ks, ema[k], sizeof(float) * width);
        }
        _mm_setcsr(csr);
    }
    return 0;
}
