/* One decode step's attention half of a layer in one call (modeling/decode_step.py): for one token,
 *   xn = norm1(h); q, k, v = Wq xn, Wk xn, Wv xn (+ biases); per-head RMSNorm of q and k (Qwen3); RoPE;
 *   k, v into the ring cache at pos % C; attention over the n = min(pos + 1, C) cached positions;
 *   h' = h + Wo att (+ bo); x = norm2(h'); logits = Wr x (+ br) (the router's, when the layer has one)
 * the same arithmetic as the torch ops of modeling/layers.py (Attention, RMSNorm) and transformer.py (route's
 * logits), in float32, in another summation order. Why: at one token those are ~40 small torch calls a layer
 * whose dispatch costs more than their arithmetic (issue 25); here one OpenMP team runs them with a barrier
 * between the phases. Included at the end of cpu_kernels.c: one library, the same matrix-vector products.
 *
 * A matrix is fp32 [N, K] (w) or int8 in quant.int8_store's layout (codes, scales, zeros; N a multiple of 16).
 * Legend: D dim, H query heads, G kv heads, hd head dim, r rotary dims (<= hd), C ring length, E experts. */

typedef struct {
    const float *w;  /* fp32 [N, K], or NULL: int8 */
    const int8_t *codes;
    const uint16_t *s, *z;
    const float *b; /* [N] or NULL */
    int N, K, gs;
} OkmMat;

typedef struct {
    const float *norm1, *norm2; /* [D]; norm2 NULL: a layer of attention alone (Nemotron-H) */
    const float *q_norm, *k_norm; /* [hd] per-head RMSNorm weights, or NULL */
    OkmMat wq, wk, wv, wo, router; /* router.N = 0: no router (a dense MLP layer) */
    int D, H, G, hd, r, plus_one;
    float eps;
} OkmLayer;

/* RMSNorm of x [n] into out: x / sqrt(mean(x^2) + eps) times w (plus_one: times 1 + w) */
static void rms(const float *x, const float *w, float *out, int n, float eps, int plus_one) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * (plus_one ? 1.0f + w[i] : w[i]);
}

/* rotate-halves RoPE of the first r dims of one head x [hd] (cos, sin [r]) */
static void rope(float *x, const float *cos, const float *sin, int r) {
    int half = r / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* the int16 activations of an int8 matrix's input (NULL work when every matrix is fp32) */
static void quantize_for(const OkmMat *m, const float *x, Quantized q) {
    if (!m->w) quantize_groups(x, m->K, m->gs, 32767.0f, NULL, (int16_t *)q.xq, q.step, q.xsum);
}

/* this thread's rows of m x into y; x's int16 codes in q when m is int8 */
static void mv(const OkmMat *m, const float *x, Quantized q, float *y) {
    int n0, n1;
    my_rows(m->N, 16, &n0, &n1);
    if (m->w) mv_f32(m->w, x, m->b, y, m->K, n0, n1);
    else mv_int8(m->codes, m->s, m->z, m->N, m->K, m->gs, (const int16_t *)q.xq, q.step, q.xsum, m->b, y, n0, n1);
}

/* floats of scratch okm_attention_step needs for a layer of these sizes and a ring of C positions */
int okm_step_floats(int D, int H, int G, int hd, int C) {
    int K = D > H * hd ? D : H * hd;
    return D + 2 * H * hd + 2 * G * hd + H * C + K + 2 * K + 64;
}

/* h [D] -> h_out [D] (the residual after attention), x [D] (norm2 of it), logits [E] (when the layer has a
 * router); kc, vc [G, C, hd] the layer's ring cache; cos, sin [r] at position pos. work: okm_step_floats. */
void okm_attention_step(const OkmLayer *L, const float *h, float *h_out, float *x, float *logits, float *kc,
                        float *vc, int C, int pos, const float *cos, const float *sin, float *work) {
    const int D = L->D, H = L->H, G = L->G, hd = L->hd, n = pos + 1 < C ? pos + 1 : C, at = pos % C;
    float *xn = work, *q = xn + D, *att = q + H * hd, *k = att + H * hd, *v = k + G * hd, *scores = v + G * hd;
    int K = D > H * hd ? D : H * hd;
    Quantized qz = {(int8_t *)(scores + H * C), scores + H * C + (K + 1) / 2, scores + H * C + (K + 1) / 2 + K};
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel TEAM
    {
#pragma omp single
        {
            rms(h, L->norm1, xn, D, L->eps, L->plus_one);
            quantize_for(&L->wq, xn, qz); /* wq, wk, wv share the input and its group size (int8_attention) */
        }
        mv(&L->wq, xn, qz, q);
        mv(&L->wk, xn, qz, k);
        mv(&L->wv, xn, qz, v);
#pragma omp barrier
#pragma omp for
        for (int i = 0; i < H + G; i++) { /* per head: its norm, its rotation; the kv heads into the ring */
            float *t = i < H ? q + i * hd : k + (i - H) * hd;
            const float *w = i < H ? L->q_norm : L->k_norm;
            if (w) rms(t, w, t, hd, L->eps, L->plus_one);
            rope(t, cos, sin, L->r);
            if (i >= H) {
                memcpy(kc + ((size_t)(i - H) * C + at) * hd, t, hd * sizeof(float));
                memcpy(vc + ((size_t)(i - H) * C + at) * hd, v + (i - H) * hd, hd * sizeof(float));
            }
        }
#pragma omp for
        for (int i = 0; i < H; i++) { /* softmax(q k^T / sqrt(hd)) v over the ring's n positions */
            const int g = i / (H / G);
            const float *qi = q + i * hd, *kg = kc + (size_t)g * C * hd, *vg = vc + (size_t)g * C * hd;
            float *s = scores + (size_t)i * C, *o = att + i * hd, top = -INFINITY, sum = 0.0f;
            for (int j = 0; j < n; j++) {
                float d = 0.0f;
                for (int c = 0; c < hd; c++) d += qi[c] * kg[(size_t)j * hd + c];
                s[j] = d * scale;
                top = fmaxf(top, s[j]);
            }
            for (int j = 0; j < n; j++) sum += (s[j] = expf(s[j] - top));
            for (int c = 0; c < hd; c++) o[c] = 0.0f;
            for (int j = 0; j < n; j++) {
                const float p = s[j] / sum, *vj = vg + (size_t)j * hd;
                for (int c = 0; c < hd; c++) o[c] += p * vj[c];
            }
        }
#pragma omp single
        quantize_for(&L->wo, att, qz);
        mv(&L->wo, att, qz, h_out); /* Wo att, the residual added below */
#pragma omp barrier
#pragma omp single
        {
            for (int i = 0; i < D; i++) h_out[i] += h[i];
            if (L->norm2) rms(h_out, L->norm2, x, D, L->eps, L->plus_one);
        }
        if (L->router.N) mv(&L->router, x, qz, logits); /* fp32: no activations to quantize */
    }
}

/* the LM head at one token: logits [N] = W norm(h) (+ b), W fp32 or int8; work: okm_step_floats(K, 0, 0, 0, 0) */
void okm_head_step(const OkmMat *W, const float *norm, float eps, int plus_one, const float *h, float *logits,
                   float *work) {
    const int K = W->K;
    float *xn = work;
    Quantized qz = {(int8_t *)(xn + K), xn + K + (K + 1) / 2, xn + K + (K + 1) / 2 + K};
    rms(h, norm, xn, K, eps, plus_one);
    quantize_for(W, xn, qz);
#pragma omp parallel TEAM
    mv(W, xn, qz, logits);
}
