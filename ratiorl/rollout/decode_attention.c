/* Decode-step attention over a KV cache in one pass: ratiorl.rollout.native compiles this file on
 * first use (cc -O3 -march=native -fopenmp -shared) and calls it through ctypes.
 *
 * For every row r and query head h (kv head h / G, G = query heads per kv head), with the cache's
 * columns in two parts (part 1 first; either part may have 0 columns):
 *
 *     s_j = scale * <q_rh, K_j> + mask_rj        j < n1 + n2
 *     p   = softmax(s)                           (max subtracted first)
 *     o_rh = sum_j p_j V_j
 *
 * Why: torch runs this as batched matmuls of one query row per head (two per cache part), a
 * concatenation and a softmax, each a separate pass with its own fixed cost; this loop reads each
 * head's keys and values once, in the order they lie in memory, and runs the heads in parallel on
 * torch's own OpenMP threads (the same libgomp, loaded once). Kept simple on purpose: a version
 * scoring four key rows at a time ran faster with the cache in L3 but slower in the decoder, where
 * the cache streams from memory.
 *
 * Layout: q and out (R, KV, G, D) contiguous float32. Part p's keys and values: element (r, h, j, d)
 * at r * row_stride + h * head_stride + j * D + d (the columns of one head are contiguous rows of
 * D floats). mask: element (r, j) at r * mask_row + j. Returns 0, or 2 when a buffer could not be
 * allocated.
 */
#include <math.h>
#include <stdlib.h>

#define LANES 16 /* independent partial sums of a dot product: one AVX-512 register with -march=native */

static inline float dot(const float *a, const float *b, int D) {
    float acc[LANES] = {0};
    int d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * b[d + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int D) {
    for (int d = 0; d < D; d++) y[d] += a * x[d];
}

int ratiorl_decode_attention(const float *q, const float *k1, const float *v1, long row1, long head1, int n1,
                             const float *k2, const float *v2, long row2, long head2, int n2,
                             const float *mask, long mask_row, float *out, int R, int KV, int G, int D,
                             float scale) {
    const int n = n1 + n2;
    int failed = 0;
#pragma omp parallel
    {
        /* p[g * n + j]: the scores, then the weights, of query head g of the current key/value head */
        float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * (size_t)G);
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long rh = 0; rh < (long)R * KV; rh++) {
            if (!p) continue;
            const long r = rh / KV, h = rh % KV;
            const float *qq = q + rh * G * D, *m = mask + r * mask_row;
            const float *K1 = k1 + r * row1 + h * head1, *V1 = v1 + r * row1 + h * head1;
            const float *K2 = k2 + r * row2 + h * head2, *V2 = v2 + r * row2 + h * head2;
            /* s_j = scale <q, K_j> + mask_j, each key row read once for the G query heads */
            for (int j = 0; j < n1; j++)
                for (int g = 0; g < G; g++) p[g * n + j] = dot(qq + g * D, K1 + (long)j * D, D) * scale + m[j];
            for (int j = 0; j < n2; j++)
                for (int g = 0; g < G; g++)
                    p[g * n + n1 + j] = dot(qq + g * D, K2 + (long)j * D, D) * scale + m[n1 + j];
            /* p = softmax(s): exp(s_j - max s) / sum */
            float *o = out + rh * G * D;
            for (int g = 0; g < G; g++) {
                float *pg = p + g * n, mx = -INFINITY, sum = 0.f;
                for (int j = 0; j < n; j++) mx = pg[j] > mx ? pg[j] : mx;
                for (int j = 0; j < n; j++) {
                    pg[j] = expf(pg[j] - mx);
                    sum += pg[j];
                }
                const float inv = 1.f / sum;
                for (int j = 0; j < n; j++) pg[j] *= inv;
                for (int d = 0; d < D; d++) o[g * D + d] = 0.f;
            }
            /* o = sum_j p_j V_j, each value row read once for the G query heads */
            for (int j = 0; j < n1; j++)
                for (int g = 0; g < G; g++) axpy(o + g * D, p[g * n + j], V1 + (long)j * D, D);
            for (int j = 0; j < n2; j++)
                for (int g = 0; g < G; g++) axpy(o + g * D, p[g * n + n1 + j], V2 + (long)j * D, D);
        }
        free(p);
    }
    return failed ? 2 : 0;
}
