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
 * allocated. ratiorl_decode_attention reads float32 keys and values; ratiorl_decode_attention_bf16
 * bfloat16 ones (half the bytes: a bf16 sampler's keys and values are bf16 matmul outputs), each
 * widened to float32 exactly as it is read; the arithmetic is float32 in both.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16 /* independent partial sums of a dot product: one AVX-512 register with -march=native */

static inline float from_f32(float x) { return x; }

static inline float from_bf16(uint16_t x) { /* bfloat16 is the top half of a float32 */
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One entry point per cache dtype T (float, or uint16_t holding bfloat16), widened by LOAD. */
#define DEFINE_ATTENTION(NAME, T, LOAD)                                                                      \
    static inline float NAME##_dot(const float *a, const T *b, int D) {                                      \
        float acc[LANES] = {0};                                                                              \
        int d = 0;                                                                                           \
        for (; d + LANES <= D; d += LANES)                                                                   \
            for (int l = 0; l < LANES; l++) acc[l] += a[d + l] * LOAD(b[d + l]);                             \
        float s = 0.f;                                                                                       \
        for (int l = 0; l < LANES; l++) s += acc[l];                                                         \
        for (; d < D; d++) s += a[d] * LOAD(b[d]);                                                           \
        return s;                                                                                            \
    }                                                                                                        \
                                                                                                             \
    static inline void NAME##_axpy(float *y, float a, const T *x, int D) {                                   \
        for (int d = 0; d < D; d++) y[d] += a * LOAD(x[d]);                                                  \
    }                                                                                                        \
                                                                                                             \
    int NAME(const float *q, const T *k1, const T *v1, long row1, long head1, int n1, const T *k2,           \
             const T *v2, long row2, long head2, int n2, const float *mask, long mask_row, float *out, int R,  \
             int KV, int G, int D, float scale) {                                                            \
        const int n = n1 + n2;                                                                               \
        int failed = 0;                                                                                      \
        _Pragma("omp parallel") {                                                                            \
            /* p[g * n + j]: the scores, then the weights, of query head g of this key/value head */         \
            float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * (size_t)G);                          \
            if (!p) {                                                                                        \
                _Pragma("omp atomic write") failed = 1;                                                      \
            }                                                                                                \
            _Pragma("omp for schedule(static)") for (long rh = 0; rh < (long)R * KV; rh++) {                 \
                if (!p) continue;                                                                            \
                const long r = rh / KV, h = rh % KV;                                                         \
                const float *qq = q + rh * G * D, *m = mask + r * mask_row;                                  \
                const T *K1 = k1 + r * row1 + h * head1, *V1 = v1 + r * row1 + h * head1;                    \
                const T *K2 = k2 + r * row2 + h * head2, *V2 = v2 + r * row2 + h * head2;                    \
                /* s_j = scale <q, K_j> + mask_j, each key row read once for the G query heads */           \
                for (int j = 0; j < n1; j++)                                                                 \
                    for (int g = 0; g < G; g++)                                                              \
                        p[g * n + j] = NAME##_dot(qq + g * D, K1 + (long)j * D, D) * scale + m[j];           \
                for (int j = 0; j < n2; j++)                                                                 \
                    for (int g = 0; g < G; g++)                                                              \
                        p[g * n + n1 + j] = NAME##_dot(qq + g * D, K2 + (long)j * D, D) * scale + m[n1 + j]; \
                /* p = softmax(s): exp(s_j - max s) / sum */                                                 \
                float *o = out + rh * G * D;                                                                 \
                for (int g = 0; g < G; g++) {                                                                \
                    float *pg = p + g * n, mx = -INFINITY, sum = 0.f;                                        \
                    for (int j = 0; j < n; j++) mx = pg[j] > mx ? pg[j] : mx;                                \
                    for (int j = 0; j < n; j++) {                                                            \
                        pg[j] = expf(pg[j] - mx);                                                            \
                        sum += pg[j];                                                                        \
                    }                                                                                        \
                    const float inv = 1.f / sum;                                                             \
                    for (int j = 0; j < n; j++) pg[j] *= inv;                                                \
                    for (int d = 0; d < D; d++) o[g * D + d] = 0.f;                                          \
                }                                                                                            \
                /* o = sum_j p_j V_j, each value row read once for the G query heads */                     \
                for (int j = 0; j < n1; j++)                                                                 \
                    for (int g = 0; g < G; g++) NAME##_axpy(o + g * D, p[g * n + j], V1 + (long)j * D, D);   \
                for (int j = 0; j < n2; j++)                                                                 \
                    for (int g = 0; g < G; g++)                                                              \
                        NAME##_axpy(o + g * D, p[g * n + n1 + j], V2 + (long)j * D, D);                      \
            }                                                                                                \
            free(p);                                                                                         \
        }                                                                                                    \
        return failed ? 2 : 0;                                                                               \
    }

DEFINE_ATTENTION(ratiorl_decode_attention, float, from_f32)
DEFINE_ATTENTION(ratiorl_decode_attention_bf16, uint16_t, from_bf16)
