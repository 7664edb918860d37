// Fused CPU step of the coordinate-wise LSTM optimizer (learnedopt impl="native").
//
// One call updates a contiguous range of coordinates of one tensor *in place*: running moments,
// input features, the stacked LSTM, the linear head, the update clip, and the parameter itself.
// Coordinates are processed in tiles of TILE (16): the tile's state is transposed into vectors
// whose lanes are coordinates, so every gate row is one SIMD register and the gate matmul is a
// register-blocked FMA loop over weights that stay in L1. Nothing proportional to the tensor is
// allocated: the extra memory of a step is a few KB per thread.
//
// The math is the same as learnedopt.functional._coordinate_step (the parity reference in
// tests/test_native.py); tanh is a rational approximation accurate to a few float32 ulps, and
// sigmoid(x) = 0.5 + 0.5 tanh(x / 2) (the sigmoid gates' weights arrive pre-scaled by 0.5).
//
// Built with plain g++ (no PyTorch headers) by learnedopt/native.py and called through ctypes.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 16
#define PREFETCH_TILES 2  // how many tiles ahead the state is prefetched

typedef float vf __attribute__((vector_size(TILE * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(TILE * sizeof(int32_t))));

static inline vf splat(float x) { return vf{} + x; }


static inline vf vclamp(vf x, float lo, float hi) {
#if defined(__AVX512F__)
    return (vf)_mm512_min_ps(_mm512_max_ps((__m512)x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
#else
    x = x < lo ? splat(lo) : x;
    return x > hi ? splat(hi) : x;
#endif
}

// 1 / q for q in [0.0049, 0.74] (tanh's denominator): a hardware estimate refined by one Newton
// step where AVX-512 has one (exact to about 1 ulp, several times cheaper than a division).
static inline vf vrecip(vf q) {
#if defined(__AVX512F__)
    const vf r = (vf)_mm512_rcp14_ps((__m512)q);
    return r * (2.0f - q * r);
#else
    return 1.0f / q;
#endif
}

// Transposes a 16 x 16 block held as 16 vectors, in place: four butterfly rounds, each swapping one
// bit of the row index with the same bit of the lane index.

template <int S>
static inline void butterfly(vf* rows, vi lo, vi hi) {
    for (int i = 0; i < TILE; i++) {
        if (i & S) continue;
        const vf a = rows[i], b = rows[i | S];
        rows[i] = __builtin_shuffle(a, b, lo);
        rows[i | S] = __builtin_shuffle(a, b, hi);
    }
}

static inline void transpose16(vf* rows) {
    butterfly<1>(rows, vi{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                 vi{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
    butterfly<2>(rows, vi{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                 vi{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    butterfly<4>(rows, vi{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                 vi{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    butterfly<8>(rows, vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                 vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
}

// tanh as the ratio of a degree-13 odd and a degree-6 even polynomial on [-7.9, 7.9] (the
// coefficients of Eigen's float tanh); saturated outside, where float32 tanh is +-1.
static inline vf vtanh(vf x) {
    x = vclamp(x, -7.90531110763549805f, 7.90531110763549805f);
    const vf x2 = x * x;
    vf p = splat(-2.76076847742355e-16f);
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    vf q = splat(1.19825839466702e-06f);
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p * vrecip(q);
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// b * m + (1 - b) * g rounded after each operation, as PyTorch's separate tensor ops do: a fused
// multiply-add here would differ from the reference in the last bits, and running means of
// gradients that cancel amplify that into visibly different features. (16 lanes at a time.)
__attribute__((noinline, optimize("fp-contract=off"))) static vf vema(float b, vf m, vf g) {
    const vf kept = b * m;
    const vf added = (1.0f - b) * g;
    return kept + added;
}

static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

static inline vf vsqrt(vf x) {
#if defined(__AVX512F__)
    return (vf)_mm512_sqrt_ps((__m512)x);
#else
    for (int t = 0; t < TILE; t++) x[t] = std::sqrt(x[t]);
    return x;
#endif
}

// Natural log of positive finite x (Cephes logf: x = 2^e m with m in [sqrt(1/2), sqrt(2)), a
// degree-9 polynomial in m - 1, ln 2 split in two for accuracy); about 1 ulp.
static inline vf vlog(vf x) {
    const vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    const vi small = m < 0.70710678118654752f;
    e = small ? e - 1 : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const vf z = m * m;
    vf y = splat(7.0376836292e-2f);
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const vf ef = __builtin_convertvector(e, vf);
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + ef * 0.693359375f;
}

// gates[j] = bias[j] + sum_k W[j][k] Z[k] for the tile (lanes = coordinates). W arrives blocked as
// [G/R][K][R]: R accumulators stay in registers while Z[k] is loaded once per k and each weight
// is a broadcast operand of its FMA.
template <int R>
static inline void gate_matmul(const float* w, const float* bias, const vf* Z, int K, int G, vf* gates) {
    for (int jb = 0; jb < G; jb += R) {
        const float* wb = w + (size_t)jb * K;
        vf acc[R];
        for (int r = 0; r < R; r++) acc[r] = splat(bias[jb + r]);
        for (int k = 0; k < K; k++) {
            const vf z = Z[k];
            for (int r = 0; r < R; r++) acc[r] += wb[k * R + r] * z;
        }
        for (int r = 0; r < R; r++) gates[jb + r] = acc[r];
    }
}

enum Feature { GRAD_LOGSIGN = 0, GRAD_RMS = 1, MOMENTUM_RMS = 2, TENSOR_RMS = 3 };

struct StepArgs {
    // network: per layer, gate weights blocked as [4H/R][K][R] (K = in + H, R = row_block) and bias [4H];
    // sigmoid-gate rows pre-scaled by 0.5. Then head weight [H] and head bias [1].
    const float* weights;
    int32_t hidden, layers, inputs;
    const int32_t* features;
    int32_t num_features;
    const float* betas;   // decay rates of the running means (num_moments - 1 of them)
    int32_t num_moments;  // running means + the second moment; 0 when the update uses none
    float rms_beta, rms_eps, feature_clip, preprocess_p;
    float output_scale, update_clip;  // update_clip < 0: none
    int32_t row_block;                // R: 16 when 4H is a multiple of 16, else 8
    int32_t feature_means;            // running means read by the features (the first columns)
    int32_t nominal_index;            // column of the nominal step's running mean; < 0: none
    float nominal_lr, nominal_c1, nominal_c2;  // exp(nominal_log_lr), 1 - mu, mu
    int32_t nominal_scale;            // 0: the network's output is added; 1: it scales the step
    float nominal_log_lr;
};

// The Nesterov step c1 * g + c2 * e, corrected by the network's output: out - lr * step, or
// -exp(log_lr + out) * step; rounded like PyTorch's separate ops
__attribute__((noinline, optimize("fp-contract=off"))) static vf vnominal(const StepArgs* a, vf out, vf g, vf e) {
    const vf direction = a->nominal_c1 * g + a->nominal_c2 * e;
    if (!a->nominal_scale) return out - a->nominal_lr * direction;
    vf size = a->nominal_log_lr + out;
    for (int t = 0; t < TILE; t++) size[t] = std::exp(size[t]);
    return -size * direction;
}

// Updates coordinates [0, n) of one tensor; returns how many had a non-finite gradient.
// tensor_scale: the tensor's RMS gradient for the tensor_rms feature (ignored without it).
extern "C" int64_t learnedopt_lstm_step(
    const StepArgs* a, float* param, const float* grad, int64_t n, void* lstm, int32_t lstm_bf16,
    float* moments, float lr, float weight_decay, float tensor_scale) {
    const int H = a->hidden, L = a->layers, G = 4 * H, S = 2 * L * H;
    const int M = a->num_moments;
    const int kmax = (a->inputs > H ? a->inputs : H) + H;
    // per-call scratch: features/inputs Z, gates, old and new state (all tile-transposed)
    const size_t vecs = (size_t)kmax + G + 2 * (size_t)S;
    vf* scratch = (vf*)std::aligned_alloc(64, ((vecs * sizeof(vf) + 63) / 64) * 64);
    if (!scratch) return -1;
    vf* Z = scratch;
    vf* gates = Z + kmax;
    vf* st = gates + G;
    vf* nst = st + S;
    float* stf = (float*)st;
    float* nstf = (float*)nst;
    float* lstm32 = (float*)lstm;
    uint16_t* lstm16 = (uint16_t*)lstm;
    const float p = a->preprocess_p, thresh = std::exp(-p), expp = std::exp(p), clip = a->feature_clip;
    int64_t nonfinite = 0;
    vf mv[64];  // the tile's running moments, transposed (num_moments <= 64, checked in Python)

    for (int64_t i0 = 0; i0 < n; i0 += TILE) {
        const int cnt = (int)((n - i0) < TILE ? (n - i0) : TILE);
        uint32_t finite_mask = 0;
        // ---- moments and features, lanes = the tile's coordinates
        vf g = splat(0.0f);
        std::memcpy(&g, grad + i0, (size_t)cnt * sizeof(float));  // lanes past the end stay 0
        const vi fin = (g == g) & (vabs(g) < INFINITY);
        g = fin ? g : splat(0.0f);
        for (int t = 0; t < cnt; t++)
            if (fin[t]) finite_mask |= 1u << t;
        nonfinite += cnt - __builtin_popcount(finite_mask);
        vf rms = splat(1.0f);
        if (M) {
            for (int k = 0; k < M; k++) mv[k] = splat(0.0f);
            for (int t = 0; t < cnt; t++)
                for (int k = 0; k < M; k++) mv[k][t] = moments[(i0 + t) * M + k];
            for (int k = 0; k < M - 1; k++) mv[k] = vema(a->betas[k], mv[k], g);
            mv[M - 1] = vema(a->rms_beta, mv[M - 1], g * g);
            for (int t = 0; t < cnt; t++)
                if ((finite_mask >> t) & 1u)
                    for (int k = 0; k < M; k++) moments[(i0 + t) * M + k] = mv[k][t];
            rms = vsqrt(mv[M - 1]) + a->rms_eps;
        }
        int col = 0;
        for (int f = 0; f < a->num_features; f++) {
            switch (a->features[f]) {
                case GRAD_LOGSIGN: {
                    const vf ab = vabs(g);
                    const vi big = ab >= thresh;
                    Z[col++] = big ? vlog(ab) / p : splat(-1.0f);
                    const vf sign = (g > 0.0f ? splat(1.0f) : splat(0.0f)) - (g < 0.0f ? splat(1.0f) : splat(0.0f));
                    Z[col++] = big ? sign : g * expp;
                    break;
                }
                case GRAD_RMS:
                    Z[col++] = vclamp(g / rms, -clip, clip);
                    break;
                case MOMENTUM_RMS:
                    for (int k = 0; k < a->feature_means; k++) Z[col++] = vclamp(mv[k] / rms, -clip, clip);
                    break;
                default:  // TENSOR_RMS: the divisor is the tensor's, computed before the step
                    Z[col++] = vclamp(g / tensor_scale, -clip, clip);
                    for (int k = 0; k < a->feature_means; k++) Z[col++] = vclamp(mv[k] / tensor_scale, -clip, clip);
            }
        }
        // ---- load the tile's LSTM state, transposed (lanes = coordinates)
        if (cnt < TILE) std::memset((void*)st, 0, (size_t)S * sizeof(vf));  // lanes past the end
        if (lstm_bf16) {
            for (int t = 0; t < cnt; t++) {
                const uint16_t* row = lstm16 + (i0 + t) * S;
                for (int s = 0; s < S; s++) stf[s * TILE + t] = bf16_to_float(row[s]);
            }
        } else {
            const int full = cnt == TILE ? S - S % TILE : 0;  // 16 x 16 blocks go by transposes
            for (int s0 = 0; s0 < full; s0 += TILE) {
                for (int t = 0; t < TILE; t++) std::memcpy(&st[s0 + t], lstm32 + (i0 + t) * S + s0, sizeof(vf));
                transpose16(st + s0);
            }
            for (int t = 0; t < cnt; t++) {
                const float* row = lstm32 + (i0 + t) * S;
                for (int s = full; s < S; s++) stf[s * TILE + t] = row[s];
            }
        }
        // the state is a long stream of cache lines: ask for the tile after next while this one
        // computes (far enough ahead to hide the memory latency)
        if (i0 + PREFETCH_TILES * TILE < n) {
            const int64_t j0 = i0 + PREFETCH_TILES * TILE;
            const char* next = (const char*)lstm + j0 * S * (lstm_bf16 ? 2 : 4);
            const int bytes = (int)((n - j0) < TILE ? (n - j0) : TILE) * S * (lstm_bf16 ? 2 : 4);
            for (int off = 0; off < bytes; off += 64) __builtin_prefetch(next + off, 1);
            if (M) {
                const char* nm_next = (const char*)(moments + j0 * M);
                for (int off = 0; off < TILE * M * 4; off += 64) __builtin_prefetch(nm_next + off, 1);
            }
        }

        // ---- the stacked LSTM
        const float* w = a->weights;
        int in = a->inputs;
        for (int l = 0; l < L; l++) {
            const int K = in + H;
            vf* hprev = st + l * H;
            vf* cprev = st + (L + l) * H;
            for (int u = 0; u < H; u++) Z[in + u] = hprev[u];
            const float* bias = w + (size_t)G * K;
            if (a->row_block == 16)
                gate_matmul<16>(w, bias, Z, K, G, gates);
            else
                gate_matmul<8>(w, bias, Z, K, G, gates);
            vf* hnew = nst + l * H;
            vf* cnew = nst + (L + l) * H;
            for (int u = 0; u < H; u++) {
                const vf ig = 0.5f + 0.5f * vtanh(gates[u]);
                const vf fg = 0.5f + 0.5f * vtanh(gates[H + u]);
                const vf gg = vtanh(gates[2 * H + u]);
                const vf og = 0.5f + 0.5f * vtanh(gates[3 * H + u]);
                const vf c = fg * cprev[u] + ig * gg;
                cnew[u] = c;
                hnew[u] = og * vtanh(c);
            }
            for (int u = 0; u < H; u++) Z[u] = hnew[u];
            w = bias + G;
            in = H;
        }
        // ---- head, clip, parameter update, state write-back
        vf out = splat(w[H]);
        for (int u = 0; u < H; u++) out += w[u] * nst[(L - 1) * H + u];
        out = out * a->output_scale;
        if (a->nominal_index >= 0) out = vnominal(a, out, g, mv[a->nominal_index]);
        if (a->update_clip >= 0) out = vclamp(out, -a->update_clip, a->update_clip);
        const float* outf = (const float*)&out;
        for (int t = 0; t < cnt; t++) {
            const bool fin = (finite_mask >> t) & 1u;
            const int64_t i = i0 + t;
            float delta = (fin ? outf[t] : 0.0f) * lr;
            if (weight_decay != 0.0f) delta = delta - (lr * weight_decay) * param[i];
            param[i] = param[i] + delta;
            if (!fin) continue;
            if (lstm_bf16) {
                uint16_t* row = lstm16 + i * S;
                for (int s = 0; s < S; s++) row[s] = float_to_bf16(nstf[s * TILE + t]);
            } else {
                // full 16-row blocks were stored below; the remainder goes one float at a time
                float* row = lstm32 + i * S;
                for (int s = S - S % TILE; s < S; s++) row[s] = nstf[s * TILE + t];
            }
        }
        if (!lstm_bf16) {
            for (int s0 = 0; s0 + TILE <= S; s0 += TILE) {
                transpose16(nst + s0);  // now nst[s0 + t] holds coordinate t's state values s0..s0+15
                for (int t = 0; t < cnt; t++)
                    if ((finite_mask >> t) & 1u) std::memcpy(lstm32 + (i0 + t) * S + s0, &nst[s0 + t], sizeof(vf));
            }
        }
    }
    std::free(scratch);
    return nonfinite;
}

// ------------------------------------------------------------------------------------------------
// Pointwise part of one LSTM layer for meta-training (the gate matmuls stay in PyTorch/MKL, with
// autograd). Rows are coordinates; G holds the (unscaled) gate pre-activations [i f g o].

// Rows are processed 16 units at a time; the last partial block of a row is loaded and stored
// with a lane mask (AVX-512) or a partial copy (elsewhere), so there is no scalar tail.
#if defined(__AVX512F__)
typedef __mmask16 lane_mask;
static inline lane_mask lanes(int k) { return k >= TILE ? (lane_mask)0xffff : (lane_mask)((1u << k) - 1u); }
static inline vf load_m(const float* p, lane_mask m) { return (vf)_mm512_maskz_loadu_ps(m, p); }
static inline void store_m(float* p, lane_mask m, vf v) { _mm512_mask_storeu_ps(p, m, (__m512)v); }
#else
typedef int lane_mask;  // how many leading lanes are real
static inline lane_mask lanes(int k) { return k >= TILE ? TILE : k; }
static inline vf load_m(const float* p, lane_mask k) {
    vf v = splat(0.0f);
    std::memcpy(&v, p, (size_t)k * sizeof(float));
    return v;
}
static inline void store_m(float* p, lane_mask k, vf v) { std::memcpy(p, &v, (size_t)k * sizeof(float)); }
#endif

// Forward: c = sigma(f) c_prev + sigma(i) tanh(g), h = sigma(o) tanh(c). Saves the activations
// [sigma(i), sigma(f), tanh(g), sigma(o)] and tanh(c) for the backward pass. c_prev rows are
// ldc floats apart (a slice of the packed state); everything else is dense.
extern "C" void learnedopt_lstm_pointwise_fwd(const float* G, const float* c_prev, int64_t ldc, int64_t n,
                                              int32_t H, float* h, float* c, float* act, float* tc) {
    for (int64_t r = 0; r < n; r++) {
        const float* g = G + r * 4 * H;
        const float* cp = c_prev + r * ldc;
        float* a = act + r * 4 * H;
        for (int u = 0; u < H; u += TILE) {
            const lane_mask m = lanes(H - u);
            const vf ig = 0.5f + 0.5f * vtanh(0.5f * load_m(g + u, m));
            const vf fg = 0.5f + 0.5f * vtanh(0.5f * load_m(g + H + u, m));
            const vf gg = vtanh(load_m(g + 2 * H + u, m));
            const vf og = 0.5f + 0.5f * vtanh(0.5f * load_m(g + 3 * H + u, m));
            const vf cn = fg * load_m(cp + u, m) + ig * gg;
            const vf t = vtanh(cn);
            store_m(a + u, m, ig);
            store_m(a + H + u, m, fg);
            store_m(a + 2 * H + u, m, gg);
            store_m(a + 3 * H + u, m, og);
            store_m(c + r * H + u, m, cn);
            store_m(tc + r * H + u, m, t);
            store_m(h + r * H + u, m, og * t);
        }
    }
}

// Backward of the above: from dh, dc (either may be NULL: no gradient) to the gradients of the
// gate pre-activations dG and of c_prev.
extern "C" void learnedopt_lstm_pointwise_bwd(const float* dh, const float* dc, const float* act,
                                              const float* c_prev, int64_t ldc, const float* tc, int64_t n,
                                              int32_t H, float* dG, float* dc_prev) {
    for (int64_t r = 0; r < n; r++) {
        const float* a = act + r * 4 * H;
        const float* cp = c_prev + r * ldc;
        float* d = dG + r * 4 * H;
        for (int u = 0; u < H; u += TILE) {
            const lane_mask m = lanes(H - u);
            const vf ig = load_m(a + u, m), fg = load_m(a + H + u, m);
            const vf gg = load_m(a + 2 * H + u, m), og = load_m(a + 3 * H + u, m);
            const vf t = load_m(tc + r * H + u, m);
            const vf dhv = dh ? load_m(dh + r * H + u, m) : splat(0.0f);
            const vf dcv = (dc ? load_m(dc + r * H + u, m) : splat(0.0f)) + dhv * og * (1.0f - t * t);
            store_m(d + u, m, dcv * gg * ig * (1.0f - ig));
            store_m(d + H + u, m, dcv * load_m(cp + u, m) * fg * (1.0f - fg));
            store_m(d + 2 * H + u, m, dcv * ig * (1.0f - gg * gg));
            store_m(d + 3 * H + u, m, dhv * t * og * (1.0f - og));
            store_m(dc_prev + r * H + u, m, dcv * fg);
        }
    }
}

// Lets Python check that the library it loaded matches the source it was built from.
extern "C" int32_t learnedopt_abi_version() { return 7; }
