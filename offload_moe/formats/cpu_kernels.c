/* One expert's forward for one token on the CPU, y = w2 . act(w13 . x + b13) + b2, read straight from the
 * packed expert buffers of formats.py (DenseFormat fp32) and quant.py (Int8Format, Int4Format "cpu" layout).
 * Compiled on first use by cpu_kernels.py with the system's gcc (-march=native, OpenMP: torch's own libgomp,
 * already loaded, so the threads are torch's). Two builds of one source (cpu_kernels.py picks by the CPU, or
 * OFFLOAD_MOE_ISA): with AVX-512 F/BW/VL, VNNI and VBMI the matrix-vector products below are intrinsics; without
 * them (the x86-64-v3 build: AVX2 and FMA) they are the #else branch, the same arithmetic (the same quantized
 * activations, exact integer dot products): plain C that gcc vectorizes, and AVX2 intrinsics for int4 (gcc's
 * vectorization of its nibbles was 2-4x slower); okm_vectorized() says which build. The
 * GGUF kernels at the end are portable C in both.
 *
 * int8 and int4: the activations are quantized per weight group, to int16 for int8 weights (VNNI's int16 pair
 * dot products; the weights' own error dominates) and to int8 for int4 weights (symmetric, step max|x| / 127,
 * as llama.cpp's q8_0 activations), and each group's dot product is an exact integer sum:
 *   y[n] = sum_g scale[g,n] * step[g] * sum_j q[n,g,j] xq[g,j] + zero'[g,n] * sum_j x[g,j]
 * with the group sums of the unquantized x, so a weight's zero is applied exactly.
 *
 * Legend: D dim, I ffn, N output rows, K inputs, G groups per row (K / gs), gs group size.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* the threads of every kernel's team (threads.set_threads: torch's count too); 0: OpenMP's default */
static int okm_threads = 0;
void okm_set_threads(int n) { okm_threads = n; }
#define TEAM num_threads(okm_threads > 0 ? okm_threads : omp_get_max_threads())

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__)
#define OKM_VECTORIZED 1
#include <immintrin.h>
#else
#define OKM_VECTORIZED 0
#endif

int okm_vectorized(void) { return OKM_VECTORIZED; }

static inline float bf16f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* silu(g) * u, or gpt-oss's clamped SwiGLU when limit >= 0 (formats.clamped_swiglu), over n values */
static void activate(const float *gate, const float *up, float *out, int n, float limit) {
    if (limit < 0) {
#pragma omp simd
        for (int i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    } else {
#pragma omp simd
        for (int i = 0; i < n; i++) {
            float g = fminf(gate[i], limit), u = fmaxf(fminf(up[i], limit), -limit);
            out[i] = (u + 1.0f) * (g / (1.0f + expf(-1.702f * g)));
        }
    }
}

/* x [K] quantized per group of gs to `top` (127: int8, 32767: int16) steps of max|x| / top, into xq8 or xq16
 * (whichever is not NULL), with each group's step and sum of x */
static void quantize_groups(const float *x, int K, int gs, float top, int8_t *xq8, int16_t *xq16, float *step,
                            float *xsum) {
    for (int g = 0; g < K / gs; g++) {
        const float *xg = x + g * gs;
        float amax = 0.0f, s = 0.0f;
        for (int j = 0; j < gs; j++) {
            amax = fmaxf(amax, fabsf(xg[j]));
            s += xg[j];
        }
        float inv = amax > 0 ? top / amax : 0.0f;
        for (int j = 0; j < gs; j++) {
            long q = lrintf(xg[j] * inv);
            if (xq8) xq8[g * gs + j] = (int8_t)q;
            else xq16[g * gs + j] = (int16_t)q;
        }
        step[g] = amax / top, xsum[g] = s;
    }
}

#if OKM_VECTORIZED

/* rows [n0, n1) of w [N, K] fp32 times x [K] (+ b) into y */
static void mv_f32(const float *w, const float *x, const float *b, float *y, int K, int n0, int n1) {
    __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
    for (int n = n0; n < n1; n++) {
        const float *r = w + (size_t)n * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k + 48), _mm512_loadu_ps(x + k + 48), a3);
        }
        for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(r + k), _mm512_loadu_ps(x + k), a0);
        if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + k), _mm512_maskz_loadu_ps(tail, x + k), a1);
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + (b ? b[n] : 0.0f);
    }
}

/* elem i = the sum of v[i]'s 16 lanes: a transposing add tree, ~3 ops a row against ~8 for one reduction each */
static inline __m512i sum16(const __m512i *v) {
    __m512i p[8], q[4];
    for (int i = 0; i < 8; i++)
        p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; j++) /* 128-bit lane L of q[j]: lane L's sums of v[4j .. 4j+3] */
        q[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * j], p[2 * j + 1]), _mm512_unpackhi_epi64(p[2 * j], p[2 * j + 1]));
    __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[0], q[1], 0x88), _mm512_shuffle_i32x4(q[0], q[1], 0xDD));
    __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2], q[3], 0x88), _mm512_shuffle_i32x4(q[2], q[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_shuffle_i32x4(s01, s23, 0xDD));
}

/* 16 bf16 values -> fp32 */
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* rows [n0, n1) (multiples of 16) of an int8 matrix (quant.int8_store: codes [G, N, gs] = q - 128 as signed
 * bytes, scales and zeros bf16 [G, N]) times x quantized to int16 (xq, step per group; xsum: the groups' sums
 * of x): per group, this thread's rows are one contiguous stretch of codes, streamed in order */
static void mv_int8(const int8_t *codes, const uint16_t *s, const uint16_t *z, int N, int K, int gs,
                    const int16_t *xq, const float *step, const float *xsum, const float *b, float *y, int n0, int n1) {
    const int G = K / gs, chunks = gs / 32;
    for (int n = n0; n < n1; n += 16) _mm512_storeu_ps(y + n, b ? _mm512_loadu_ps(b + n) : _mm512_setzero_ps());
    for (int g = 0; g < G; g++) {
        const int8_t *cg = codes + (size_t)g * N * gs;
        __m512i xv[4];
        for (int c = 0; c < chunks; c++) xv[c] = _mm512_loadu_si512(xq + g * gs + 32 * c);
        const __m512 d = _mm512_set1_ps(step[g]), xs = _mm512_set1_ps(xsum[g]);
        for (int n = n0; n < n1; n += 16) {
            __m512i dots[16];
            for (int r = 0; r < 16; r++) {
                const int8_t *c = cg + (size_t)(n + r) * gs;
                __m512i acc = _mm512_setzero_si512();
                for (int ch = 0; ch < chunks; ch++) /* codes widened to int16, pairs multiplied and added (VNNI) */
                    acc = _mm512_dpwssd_epi32(acc, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + 32 * ch))),
                                              xv[ch]);
                dots[r] = acc;
            }
            const size_t at = (size_t)g * N + n;
            __m512 acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum16(dots)), _mm512_mul_ps(bf16x16(s + at), d),
                                         _mm512_loadu_ps(y + n));
            _mm512_storeu_ps(y + n, _mm512_fmadd_ps(bf16x16(z + at), xs, acc));
        }
    }
}

/* rows [n0, n1) (whole blocks of 64) of an int4 matrix in the "cpu" layout (int4_layouts.pack_nibbles, blocks
 * of 64: per block [K, 32] bytes, byte j = row j low nibble | row j + 32 high), scale and zero bf16
 * interleaved [G, N, 2]; w = (q - 8) * scale + zero */
static void mv_int4(const uint8_t *codes, const uint32_t *sz, int N, int K, int gs, const int8_t *xq,
                    const float *step, const float *xsum, const float *b, float *y, int n0, int n1) {
    const int G = K / gs;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    /* from two 64-byte vectors [k: 32 rows][k+1: 32 rows] and [k+2: ..][k+3: ..], the dwords of rows r: q[r, k..k+3] */
    __m512i pick[2];
    uint8_t idx[2][64];
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < 16; r++) {
            int row = 16 * h + r;
            idx[h][4 * r] = (uint8_t)row, idx[h][4 * r + 1] = (uint8_t)(32 + row);
            idx[h][4 * r + 2] = (uint8_t)(64 + row), idx[h][4 * r + 3] = (uint8_t)(96 + row);
        }
    pick[0] = _mm512_loadu_si512(idx[0]), pick[1] = _mm512_loadu_si512(idx[1]);
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int nb = n0; nb < n1; nb += 64) {
        const uint8_t *blk = codes + (size_t)nb * (K / 2);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int g = 0; g < G; g++) {
            __m512i dot[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                              _mm512_setzero_si512()};
            for (int k = g * gs; k < (g + 1) * gs; k += 4) {
                __m512i v0 = _mm512_loadu_si512(blk + (size_t)k * 32), v1 = _mm512_loadu_si512(blk + (size_t)k * 32 + 64);
                __m512i lo0 = _mm512_and_si512(v0, low4), lo1 = _mm512_and_si512(v1, low4);
                __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
                __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
                int32_t xw;
                memcpy(&xw, xq + k, 4);
                __m512i xb = _mm512_set1_epi32(xw);
                dot[0] = _mm512_dpbusd_epi32(dot[0], _mm512_permutex2var_epi8(lo0, pick[0], lo1), xb);
                dot[1] = _mm512_dpbusd_epi32(dot[1], _mm512_permutex2var_epi8(lo0, pick[1], lo1), xb);
                dot[2] = _mm512_dpbusd_epi32(dot[2], _mm512_permutex2var_epi8(hi0, pick[0], hi1), xb);
                dot[3] = _mm512_dpbusd_epi32(dot[3], _mm512_permutex2var_epi8(hi0, pick[1], hi1), xb);
            }
            const __m512 d = _mm512_set1_ps(step[g]), xs = _mm512_set1_ps(xsum[g]);
            for (int i = 0; i < 4; i++) {
                __m512i w = _mm512_loadu_si512(sz + (size_t)g * N + nb + 16 * i); /* 16 rows' (scale | zero << 16) */
                __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(w, hi16));
                __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, ze); /* zero - 8 scale */
                acc[i] = _mm512_fmadd_ps(shift, xs, acc[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_mul_ps(sc, d), acc[i]);
            }
        }
        for (int i = 0; i < 4; i++) {
            __m512 out = b ? _mm512_add_ps(acc[i], _mm512_loadu_ps(b + nb + 16 * i)) : acc[i];
            _mm512_storeu_ps(y + nb + 16 * i, out);
        }
    }
}

#else /* the x86-64-v3 (AVX2, FMA) build: the same products in plain C that gcc vectorizes, int4's in AVX2 */
#include <immintrin.h>

static void mv_f32(const float *w, const float *x, const float *b, float *y, int K, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        const float *r = w + (size_t)n * K;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += r[k] * x[k];
        y[n] = acc + (b ? b[n] : 0.0f);
    }
}

static void mv_int8(const int8_t *codes, const uint16_t *s, const uint16_t *z, int N, int K, int gs,
                    const int16_t *xq, const float *step, const float *xsum, const float *b, float *y, int n0, int n1) {
    for (int n = n0; n < n1; n++) y[n] = b ? b[n] : 0.0f;
    for (int g = 0; g < K / gs; g++) {
        const int8_t *cg = codes + (size_t)g * N * gs;
        const int16_t *xg = xq + g * gs;
        for (int n = n0; n < n1; n++) {
            const int8_t *c = cg + (size_t)n * gs;
            int32_t dot = 0;
            for (int j = 0; j < gs; j++) dot += (int32_t)c[j] * xg[j];
            const size_t at = (size_t)g * N + n;
            y[n] += (float)dot * (bf16f(s[at]) * step[g]) + bf16f(z[at]) * xsum[g];
        }
    }
}

/* AVX2: pairs of inputs k, k + 1 interleaved per row (unpack of the two [32]-byte rows of codes), so that one
 * maddubs multiplies each row's two codes (u8) by x[k], x[k + 1] (s8) and adds them into an int16 lane; the int16
 * sums (each at most 2 * 15 * 127) are widened to int32 every 8 pairs, before they could overflow. The unpacks
 * work within 128-bit lanes: lo holds rows 0-7 and 16-23, hi rows 8-15 and 24-31 (`ROW` below). */
static inline void widen_add(__m256i v, int32_t *dot) {
    __m256i a = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
    __m256i b = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1));
    _mm256_storeu_si256((__m256i *)dot, _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)dot), a));
    _mm256_storeu_si256((__m256i *)(dot + 8), _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(dot + 8)), b));
}

static void mv_int4(const uint8_t *codes, const uint32_t *sz, int N, int K, int gs, const int8_t *xq,
                    const float *step, const float *xsum, const float *b, float *y, int n0, int n1) {
    /* dot[] order after widen_add of (lo, hi) vectors: lo: rows 0-7, 16-23; hi: rows 8-15, 24-31 (+ 32: high) */
    static const int ROW[32] = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                                8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int nb = n0; nb < n1; nb += 64) {
        const uint8_t *blk = codes + (size_t)nb * (K / 2);
        float acc[64] = {0};
        for (int g = 0; g < K / gs; g++) {
            int32_t dot[64] = {0}; /* in ROW's order: [0, 32) low nibbles' rows, [32, 64) high nibbles' */
            for (int k0 = g * gs; k0 < (g + 1) * gs; k0 += 16) {
                __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                _mm256_setzero_si256()};
                for (int k = k0; k < k0 + 16; k += 2) {
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)(blk + (size_t)k * 32));
                    __m256i v1 = _mm256_loadu_si256((const __m256i *)(blk + (size_t)(k + 1) * 32));
                    __m256i lo0 = _mm256_and_si256(v0, low4), lo1 = _mm256_and_si256(v1, low4);
                    __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
                    __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
                    int16_t pair;
                    memcpy(&pair, xq + k, 2);
                    __m256i xx = _mm256_set1_epi16(pair); /* x[k], x[k + 1] in every pair of bytes */
                    s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo0, lo1), xx));
                    s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo0, lo1), xx));
                    s[2] = _mm256_add_epi16(s[2], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(hi0, hi1), xx));
                    s[3] = _mm256_add_epi16(s[3], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(hi0, hi1), xx));
                }
                for (int i = 0; i < 4; i++) widen_add(s[i], dot + 16 * i);
            }
            for (int i = 0; i < 64; i++) {
                const int r = ROW[i % 32] + 32 * (i / 32);
                uint32_t w = sz[(size_t)g * N + nb + r]; /* scale | zero << 16 */
                float sc = bf16f((uint16_t)(w & 0xFFFF)), ze = bf16f((uint16_t)(w >> 16));
                acc[r] += (ze - 8.0f * sc) * xsum[g] + (float)dot[i] * (sc * step[g]);
            }
        }
        for (int r = 0; r < 64; r++) y[nb + r] = acc[r] + (b ? b[nb + r] : 0.0f);
    }
}

#endif

/* the row range [n0, n1) of this thread, in whole blocks of `block` rows */
static void my_rows(int N, int block, int *n0, int *n1) {
    int blocks = (N + block - 1) / block, t = omp_get_thread_num(), nt = omp_get_num_threads();
    int per = (blocks + nt - 1) / nt;
    *n0 = t * per * block < N ? t * per * block : N;
    *n1 = (t + 1) * per * block < N ? (t + 1) * per * block : N;
}

/* work: 2I floats (w13's output; its first I then hold the activation) */
void okm_dense(const float *x, const float *w13, const float *w2, const float *b13, const float *b2, float *y,
               float *work, int D, int I, float limit) {
#pragma omp parallel TEAM
    {
        int n0, n1;
        my_rows(2 * I, 16, &n0, &n1);
        mv_f32(w13, x, b13, work, D, n0, n1);
#pragma omp barrier
        my_rows(I, 16, &n0, &n1);
        activate(work + n0, work + I + n0, work + n0, n1 - n0, limit);
#pragma omp barrier
        my_rows(D, 16, &n0, &n1);
        mv_f32(w2, work, b2, y, I, n0, n1);
    }
}

/* the scratch after the 2I floats of w13's output: xq (max(D, I) int16, or int8 for int4), then step and xsum
 * (G each) */
typedef struct {
    int8_t *xq;
    float *step, *xsum;
} Quantized;

static Quantized scratch(float *work, int D, int I, int gs) {
    int K = D > I ? D : I;
    Quantized q;
    q.xq = (int8_t *)(work + 2 * I);
    q.step = work + 2 * I + (K + 1) / 2;
    q.xsum = q.step + K / gs;
    return q;
}

/* work: okm_work_floats(D, I, gs) floats */
void okm_int8(const float *x, const int8_t *c13, const uint16_t *s13, const uint16_t *z13, const int8_t *c2,
              const uint16_t *s2, const uint16_t *z2, const float *b13, const float *b2, float *y, float *work, int D,
              int I, int gs, float limit) {
    Quantized q = scratch(work, D, I, gs);
#pragma omp parallel TEAM
    {
        int n0, n1;
#pragma omp single
        quantize_groups(x, D, gs, 32767.0f, NULL, (int16_t *)q.xq, q.step, q.xsum);
        my_rows(2 * I, 16, &n0, &n1);
        mv_int8(c13, s13, z13, 2 * I, D, gs, (int16_t *)q.xq, q.step, q.xsum, b13, work, n0, n1);
#pragma omp barrier
        my_rows(I, 16, &n0, &n1);
        activate(work + n0, work + I + n0, work + n0, n1 - n0, limit);
#pragma omp barrier
#pragma omp single
        quantize_groups(work, I, gs, 32767.0f, NULL, (int16_t *)q.xq, q.step, q.xsum);
        my_rows(D, 16, &n0, &n1);
        mv_int8(c2, s2, z2, D, I, gs, (int16_t *)q.xq, q.step, q.xsum, b2, y, n0, n1);
    }
}

/* N = 2I and D: multiples of 64 (Python checks); work: okm_work_floats(D, I, gs) floats */
void okm_int4(const float *x, const uint8_t *c13, const uint32_t *sz13, const uint8_t *c2, const uint32_t *sz2,
              const float *b13, const float *b2, float *y, float *work, int D, int I, int gs, float limit) {
    Quantized q = scratch(work, D, I, gs);
#pragma omp parallel TEAM
    {
        int n0, n1;
#pragma omp single
        quantize_groups(x, D, gs, 127.0f, q.xq, NULL, q.step, q.xsum);
        my_rows(2 * I, 64, &n0, &n1);
        mv_int4(c13, sz13, 2 * I, D, gs, q.xq, q.step, q.xsum, b13, work, n0, n1);
#pragma omp barrier
        my_rows(I, 16, &n0, &n1);
        activate(work + n0, work + I + n0, work + n0, n1 - n0, limit);
#pragma omp barrier
#pragma omp single
        quantize_groups(work, I, gs, 127.0f, q.xq, NULL, q.step, q.xsum);
        my_rows(D, 64, &n0, &n1);
        mv_int4(c2, sz2, D, I, gs, q.xq, q.step, q.xsum, b2, y, n0, n1);
    }
}

/* one int8 matrix (quant.int8_store's layout; N a multiple of 16) times one token x [K], int16 activations:
 * an int8 resident linear (attention_quant.Int8Linear); work: okm_work_floats(0, K, gs) floats */
void okm_int8_linear(const float *x, const int8_t *codes, const uint16_t *s, const uint16_t *z, float *y,
                     float *work, int N, int K, int gs) {
    Quantized q = scratch(work, 0, K, gs);
    quantize_groups(x, K, gs, 32767.0f, NULL, (int16_t *)q.xq, q.step, q.xsum);
#pragma omp parallel TEAM
    {
        int n0, n1;
        my_rows(N, 16, &n0, &n1);
        mv_int8(codes, s, z, N, K, gs, (int16_t *)q.xq, q.step, q.xsum, NULL, y, n0, n1);
    }
}

/* ---- GGUF's own block types (formats/ggml.py), one token: y [N] = W x, the weights decoded inside the dot
 * products. Plain C that gcc vectorizes: each block's codes times x in float32, then its scale and, for the
 * affine types, its offset times the sum of x over the block (xsum: one float per 16 inputs, made once per
 * call). Block layouts as gguf-py's decoders read them (llama.cpp's ggml-common.h). */

static inline float h2f(const uint8_t *p) {  /* IEEE half, little-endian -> float */
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    float f;
    if (e == 0) {
        f = ldexpf((float)m, -24);
        return sign ? -f : f;
    }
    uint32_t bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &bits, 4);
    return f;
}

static inline float dot_u8(const uint8_t *q, int shift, int mask, const float *x, int n) {
    float s = 0;
    for (int j = 0; j < n; j++) s += (float)((q[j] >> shift) & mask) * x[j];
    return s;
}

/* Q4_K's and Q5_K's 6-bit scale and min of sub-block j from their 12 bytes */
static inline void scale_min(const uint8_t *sc, int j, int *d, int *m) {
    if (j < 4) {
        *d = sc[j] & 63;
        *m = sc[j + 4] & 63;
    } else {
        *d = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
        *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

static float row_q8_0(const uint8_t *w, const float *x, const float *xsum, int K) {
    float acc = 0;
    for (int b = 0; b < K / 32; b++, w += 34, x += 32) {
        const int8_t *q = (const int8_t *)(w + 2);
        float s = 0;
        for (int j = 0; j < 32; j++) s += (float)q[j] * x[j];
        acc += h2f(w) * s;
    }
    return acc;
}

/* Q4_0 (affine 0: d (q - 8)), Q4_1 (d q + m) */
static float row_q4(const uint8_t *w, const float *x, const float *xsum, int K, int affine) {
    float acc = 0;
    int ts = affine ? 20 : 18;
    for (int b = 0; b < K / 32; b++, w += ts, x += 32, xsum += 2) {
        const uint8_t *q = w + (affine ? 4 : 2);
        float s = dot_u8(q, 0, 15, x, 16) + dot_u8(q, 4, 15, x + 16, 16);
        acc += affine ? h2f(w) * s + h2f(w + 2) * (xsum[0] + xsum[1]) : h2f(w) * (s - 8 * (xsum[0] + xsum[1]));
    }
    return acc;
}

/* Q5_0 (d (q - 16)), Q5_1 (d q + m): the fifth bit of weight i is bit i of the 32-bit qh */
static float row_q5(const uint8_t *w, const float *x, const float *xsum, int K, int affine) {
    float acc = 0;
    int ts = affine ? 24 : 22;
    for (int b = 0; b < K / 32; b++, w += ts, x += 32, xsum += 2) {
        const uint8_t *h = w + (affine ? 4 : 2), *q = h + 4;
        uint32_t qh = (uint32_t)h[0] | ((uint32_t)h[1] << 8) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 24);
        float s = 0;
        for (int j = 0; j < 16; j++) {
            s += (float)((q[j] & 15) | (((qh >> j) & 1) << 4)) * x[j];
            s += (float)((q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * x[j + 16];
        }
        acc += affine ? h2f(w) * s + h2f(w + 2) * (xsum[0] + xsum[1]) : h2f(w) * (s - 16 * (xsum[0] + xsum[1]));
    }
    return acc;
}

/* Q4_K (qh NULL) and Q5_K: 8 sub-blocks of 32, d sc_j q - dmin m_j; sub-block 2c's low nibbles and 2c+1's high
 * ones share bytes 32c..32c+31; Q5_K's fifth bit of sub-block j's weight l is bit j of qh[l] */
static float row_q45_k(const uint8_t *w, const float *x, const float *xsum, int K, int five) {
    float acc = 0;
    int ts = five ? 176 : 144;
    for (int b = 0; b < K / 256; b++, w += ts, x += 256, xsum += 16) {
        float d = h2f(w), dmin = h2f(w + 2);
        const uint8_t *sc = w + 4, *qh = five ? w + 16 : NULL, *qs = w + (five ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int scale, min;
            scale_min(sc, j, &scale, &min);
            const uint8_t *q = qs + 32 * (j / 2);
            const float *xj = x + 32 * j;
            float s;
            if (qh) {
                s = 0;
                for (int l = 0; l < 32; l++)
                    s += (float)(((q[l] >> (4 * (j & 1))) & 15) | (((qh[l] >> j) & 1) << 4)) * xj[l];
            } else {
                s = dot_u8(q, 4 * (j & 1), 15, xj, 32);
            }
            acc += d * scale * s - dmin * min * (xsum[2 * j] + xsum[2 * j + 1]);
        }
    }
    return acc;
}

/* Q6_K: 16 sub-blocks of 16, d sc_s (q - 32); weight i = 128h + r: low nibble of ql[64h + r % 64] at 4 (r / 64),
 * high two bits of qh[32h + r % 32] at 2 (r / 32) */
static float row_q6_k(const uint8_t *w, const float *x, const float *xsum, int K) {
    float acc = 0;
    for (int b = 0; b < K / 256; b++, w += 210, x += 256, xsum += 16) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = h2f(w + 208);
        for (int s = 0; s < 16; s++) {
            int h = s / 8, r0 = (s % 8) * 16;
            const uint8_t *lo = ql + 64 * h + r0 % 64, *hi = qh + 32 * h + r0 % 32;
            int sl = 4 * (r0 / 64), sh = 2 * (r0 / 32);
            const float *xs = x + 16 * s;
            float dot = 0;
            for (int l = 0; l < 16; l++) dot += (float)(((lo[l] >> sl) & 15) | (((hi[l] >> sh) & 3) << 4)) * xs[l];
            acc += d * sc[s] * (dot - 32 * xsum[s]);
        }
    }
    return acc;
}

/* GGUF type ids (gguf.GGMLQuantizationType): Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14 */
int okm_ggml_reads(int type) {
    return type == 2 || type == 3 || type == 6 || type == 7 || type == 8 || type == 12 || type == 13 || type == 14;
}

/* y [N] = W x for W [N, K] of `type` (rows of K / bs blocks), x [K]; work: K / 16 floats */
void okm_ggml_linear(int type, const uint8_t *w, const float *x, float *y, float *work, int N, int K, int row_bytes) {
    for (int g = 0; g < K / 16; g++) {
        float s = 0;
        for (int j = 0; j < 16; j++) s += x[16 * g + j];
        work[g] = s;
    }
#pragma omp parallel for schedule(static) TEAM
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (size_t)n * row_bytes;
        switch (type) {
            case 2: y[n] = row_q4(row, x, work, K, 0); break;
            case 3: y[n] = row_q4(row, x, work, K, 1); break;
            case 6: y[n] = row_q5(row, x, work, K, 0); break;
            case 7: y[n] = row_q5(row, x, work, K, 1); break;
            case 8: y[n] = row_q8_0(row, x, work, K); break;
            case 12: y[n] = row_q45_k(row, x, work, K, 0); break;
            case 13: y[n] = row_q45_k(row, x, work, K, 1); break;
            case 14: y[n] = row_q6_k(row, x, work, K); break;
            default: y[n] = NAN;
        }
    }
}

/* one row of `type` decoded to float32 out [K]: the values the row products above multiply by x */
static void dq_row(int type, const uint8_t *w, float *out, int K) {
    if (type == 8) { /* Q8_0: d q */
        for (int b = 0; b < K / 32; b++, w += 34, out += 32)
            for (int j = 0; j < 32; j++) out[j] = h2f(w) * (float)((const int8_t *)(w + 2))[j];
    } else if (type == 2 || type == 3) { /* Q4_0: d (q - 8); Q4_1: d q + m */
        const int affine = type == 3, ts = affine ? 20 : 18;
        for (int b = 0; b < K / 32; b++, w += ts, out += 32) {
            const uint8_t *q = w + (affine ? 4 : 2);
            const float d = h2f(w), m = affine ? h2f(w + 2) : -8.0f * d;
            for (int j = 0; j < 16; j++) out[j] = d * (float)(q[j] & 15) + m, out[j + 16] = d * (float)(q[j] >> 4) + m;
        }
    } else if (type == 6 || type == 7) { /* Q5_0: d (q - 16); Q5_1: d q + m */
        const int affine = type == 7, ts = affine ? 24 : 22;
        for (int b = 0; b < K / 32; b++, w += ts, out += 32) {
            const uint8_t *h = w + (affine ? 4 : 2), *q = h + 4;
            const uint32_t qh = (uint32_t)h[0] | ((uint32_t)h[1] << 8) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 24);
            const float d = h2f(w), m = affine ? h2f(w + 2) : -16.0f * d;
            for (int j = 0; j < 16; j++) {
                out[j] = d * (float)((q[j] & 15) | (((qh >> j) & 1) << 4)) + m;
                out[j + 16] = d * (float)((q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
            }
        }
    } else if (type == 12 || type == 13) { /* Q4_K, Q5_K: d sc_j q - dmin m_j */
        const int five = type == 13, ts = five ? 176 : 144;
        for (int b = 0; b < K / 256; b++, w += ts, out += 256) {
            const float d = h2f(w), dmin = h2f(w + 2);
            const uint8_t *sc = w + 4, *qh = w + 16, *qs = w + (five ? 48 : 16);
            for (int j = 0; j < 8; j++) {
                int scale, min;
                scale_min(sc, j, &scale, &min);
                const uint8_t *q = qs + 32 * (j / 2);
                const float a = d * (float)scale, c = dmin * (float)min;
                for (int l = 0; l < 32; l++) {
                    int v = (q[l] >> (4 * (j & 1))) & 15;
                    if (five) v |= ((qh[l] >> j) & 1) << 4;
                    out[32 * j + l] = a * (float)v - c;
                }
            }
        }
    } else if (type == 14) { /* Q6_K: d sc_s (q - 32) */
        for (int b = 0; b < K / 256; b++, w += 210, out += 256) {
            const uint8_t *ql = w, *qh = w + 128;
            const int8_t *sc = (const int8_t *)(w + 192);
            const float d = h2f(w + 208);
            for (int s = 0; s < 16; s++) {
                const int h = s / 8, r0 = (s % 8) * 16, sl = 4 * (r0 / 64), sh = 2 * (r0 / 32);
                const uint8_t *lo = ql + 64 * h + r0 % 64, *hi = qh + 32 * h + r0 % 32;
                const float a = d * (float)sc[s];
                for (int l = 0; l < 16; l++)
                    out[16 * s + l] = a * (float)((((lo[l] >> sl) & 15) | (((hi[l] >> sh) & 3) << 4)) - 32);
            }
        }
    }
}

/* W [N, K] of `type` (okm_ggml_reads) decoded to float32 w [N, K], rows split across the team */
void okm_ggml_dequant(int type, const uint8_t *raw, float *w, int N, int K, int row_bytes) {
#pragma omp parallel for schedule(static) TEAM
    for (int n = 0; n < N; n++) dq_row(type, raw + (size_t)n * row_bytes, w + (size_t)n * K, K);
}

/* ---- a prompt's matrices: the weights decoded to fp32 w [N, K] in one pass (read 1 or 1/2 byte, write 4 a
 * weight) for torch's GEMM, rows split across the team. The decodes of int8.int8_dequant and
 * int4._int4_scale_shift: w = c * scale + zero (int8: c = q - 128), w = (q - 8) * scale + zero (int4). */

/* int8.int8_store's layout: codes [G, N, gs], scales and zeros bf16 [G, N] */
void okm_int8_dequant(const int8_t *codes, const uint16_t *s, const uint16_t *z, float *w, int N, int K, int gs) {
    const int G = K / gs;
#pragma omp parallel for TEAM schedule(static)
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const float sc = bf16f(s[(size_t)g * N + n]), ze = bf16f(z[(size_t)g * N + n]);
            const int8_t *c = codes + ((size_t)g * N + n) * gs;
            float *out = w + (size_t)n * K + (size_t)g * gs;
#pragma omp simd
            for (int j = 0; j < gs; j++) out[j] = (float)c[j] * sc + ze;
        }
}

/* the "cpu" int4 layout in row blocks of `block` (int4_layouts.pack_nibbles: per block [K, block/2] bytes, byte j
 * = row j low nibble | row j + block/2 high), scale and zero bf16 interleaved [G, N, 2] */
void okm_int4_dequant(const uint8_t *codes, const uint32_t *sz, float *w, int N, int K, int gs, int block) {
    const int half = block / 2;
#pragma omp parallel for TEAM schedule(static)
    for (int n = 0; n < N; n++) {
        const int nb = n - n % block, j = n % half, shift = n % block < half ? 0 : 4;
        const uint8_t *blk = codes + (size_t)nb * (K / 2);
        float *out = w + (size_t)n * K;
        for (int g = 0; g < K / gs; g++) {
            const uint32_t v = sz[(size_t)g * N + n]; /* scale | zero << 16 */
            const float sc = bf16f((uint16_t)(v & 0xFFFF)), shifted = bf16f((uint16_t)(v >> 16)) - 8.0f * sc;
            for (int k = g * gs; k < (g + 1) * gs; k++)
                out[k] = (float)((blk[(size_t)k * half + j] >> shift) & 15) * sc + shifted;
        }
    }
}

/* floats of scratch that okm_int8 and okm_int4 need (okm_dense: 2I) */
int okm_work_floats(int D, int I, int gs) {
    int K = D > I ? D : I;
    return 2 * I + (K + 1) / 2 + 2 * (K / gs) + 16;
}

#include "decode_step.c" /* the attention half of a decode step's layer, over the products above */
