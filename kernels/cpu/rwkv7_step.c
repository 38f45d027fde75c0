/* RWKV-7 ("x070") single-token step on the CPU: one pass over the weights per token.
 *
 * Runs B streams through the whole network (embedding row -> ln0 -> blocks -> ln_out -> head)
 * and updates the recurrent state in place. The math is RWKV7.step in model/rwkv7.py, which
 * stays the reference; kernels/cpu_step.py builds this file and hands it the model's own
 * float32 parameters by address, or for the matrices packed bf16 / int8 copies (see
 * linear_tiles; kernels/weight_formats.py packs them). Sums are float32 throughout.
 *
 * A token is bound by reading the weights (19 MB at 6 layers x 256, 151 MB at 12 x 512), so
 * every matrix is streamed exactly once per token for all B streams (packed matrices as output
 * tiles, several tiles at once, see linear_tiles; float32 ones row by row, eight runs of rows
 * at once, see ROW_STREAMS; what a pass reads stays in L1 while the streams use it),
 * and the elementwise work rides along: layer norm with the token-shift mixes, LoRA
 * activations and biases with the LoRA matvecs, and per head the value residual, kk, the WKV
 * update, GroupNorm, bonus and gate in one pass.
 *
 * Threads. A token is a fixed sequence of phases (ln0; per layer: ln1 and token shift; r, k, v
 * and the four LoRAs; the heads; the output projection; ln2 and token shift; FFN key; FFN
 * value; then ln_out; head), each cut into small chunks (a block of about 64 KB of weight rows,
 * a whole LoRA, a head, a block of channels). The calling thread and
 * the helper threads claim chunks from one shared counter; whoever finishes the last chunk of
 * a phase opens the next (a layer norm of one chunk it runs itself first, see runs_inline).
 * The calling thread claims from the front of a phase, the first helper from its back, so each
 * reads the same rows token after token (see work). Nobody waits for a thread that has not
 * claimed anything, so on a busy machine a descheduled helper costs at most the claim it holds
 * (its share of what was left of the phase), never a whole barrier: the calling thread does the
 * rest. Helpers spin briefly between tokens, then sleep.
 *
 * Layouts (torch fp32, contiguous, unless packed):
 *   nn.Linear weight [out, in] (packed: output tiles [out / TILE][in][TILE], out padded to
 *   whole tiles, bf16 bits with paired outputs or int8 + scale[out]); LoRA w1/a1/v1/g1 [C, D]
 *   and w2/a2/v2/g2 [D, C] (packed: their transposes, as nn.Linear weights); vectors [C];
 *   r_k [H, N]; state shift [n_layer, 2, B, C]; state wkv [n_layer, B, H, N, N] (value, key).
 */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <stdatomic.h>
#include <string.h>
#ifdef RWKV7_PROFILE
#include <time.h>
#endif

#if !defined(RWKV7_NO_THREADS) && (defined(__unix__) || defined(__APPLE__))
#define RWKV7_THREADS 1
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#endif

#ifdef __SSE__ /* x86: the vector code below and relu's maxss */
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------------------- vectors */

#if !defined(RWKV7_SCALAR) && !defined(RWKV7_NO_AVX512) && defined(__AVX512F__)
#define VW 16
#define SIMD_NAME "avx512"
typedef __m512 vec;
static inline vec v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec v_set1(float x) { return _mm512_set1_ps(x); }
static inline vec v_zero(void) { return _mm512_setzero_ps(); }
static inline vec v_add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec v_fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec v_div(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec v_clamp(vec x, float lo, float hi) {
    return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
static inline vec v_round(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_pow2(vec p, vec n) { return _mm512_scalef_ps(p, n); } /* p * 2^n */
#elif !defined(RWKV7_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define SIMD_NAME "avx2"
typedef __m256 vec;
static inline vec v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec v_set1(float x) { return _mm256_set1_ps(x); }
static inline vec v_zero(void) { return _mm256_setzero_ps(); }
static inline vec v_add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec v_fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float v_sum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec v_div(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec v_clamp(vec x, float lo, float hi) {
    return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}
static inline vec v_round(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_pow2(vec p, vec n) { /* p * 2^n for integral n in [-126, 127] */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#else
/* Portable fallback: the same code with one-float "vectors"; the compiler may still vectorise. */
#define VW 1
#define SIMD_NAME "scalar"
typedef float vec;
static inline vec v_load(const float *p) { return *p; }
static inline void v_store(float *p, vec a) { *p = a; }
static inline vec v_set1(float x) { return x; }
static inline vec v_zero(void) { return 0.0f; }
static inline vec v_add(vec a, vec b) { return a + b; }
static inline vec v_sub(vec a, vec b) { return a - b; }
static inline vec v_mul(vec a, vec b) { return a * b; }
static inline vec v_fma(vec a, vec b, vec c) { return a * b + c; }
static inline float v_sum(vec a) { return a; }
#endif

/* ---------------------------------------------------------------------------- weight formats */

/* The matrices (r, k, v, output, the LoRA, FFN key and value, head) may be stored packed: bf16
 * (the top 16 bits of the float32, widened back by a shift: exact, and no F16C or AVX-512 BF16
 * needed) or int8 with one float32 scale per row. Activations, accumulators and every other
 * parameter stay float32; an int8 row's dot product is multiplied by its scale once at the end. */
enum { W_FP32, W_BF16, W_INT8 };

/* bf16 weights are stored in pairs PAIR apart: in each block of 2 * PAIR (one input's weights
 * in an output tile, see linear_tiles), 32-bit word j holds weight j in its low half and weight
 * PAIR + j in its high half. One vector load then widens to two float vectors with one shift
 * (low halves) and one mask (high halves), no shuffles: on AVX2 the shuffle of vpmovzxwd made
 * bf16 compute-bound below the memory speed. PAIR is the vector width (1 in the portable build:
 * the plain order); cpu_step.py packs to it. */
#define PAIR VW

/* Element offset of weight i of a paired bf16 block. */
static inline size_t bf16_at(size_t i) {
    const size_t r = i % (2 * PAIR);
    return i - r + 2 * (r % PAIR) + (r >= PAIR);
}

static inline float w_one(const void *w, size_t i, int kind) {
    if (kind == W_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[bf16_at(i)] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (kind == W_INT8) return (float)((const int8_t *)w)[i];
    return ((const float *)w)[i];
}

/* The VW weights at offset base + hi * VW (base a multiple of 2 * VW, hi 0 or 1). */
#if !defined(RWKV7_SCALAR) && !defined(RWKV7_NO_AVX512) && defined(__AVX512F__)
static inline vec w_load_half(const void *w, size_t base, int hi, int kind);
static inline vec w_load(const void *w, size_t i, int kind) {
    if (kind == W_BF16) return w_load_half(w, i - i % (2 * VW), i % (2 * VW) != 0, kind);
    if (kind == W_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    return _mm512_loadu_ps((const float *)w + i);
}
static inline vec w_load_half(const void *w, size_t base, int hi, int kind) {
    if (kind != W_BF16) return w_load(w, base + (size_t)hi * VW, kind);
    __m512i v = _mm512_loadu_si512((const void *)((const uint16_t *)w + base));
    return _mm512_castsi512_ps(hi ? _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)) : _mm512_slli_epi32(v, 16));
}
#elif VW == 8
static inline vec w_load_half(const void *w, size_t base, int hi, int kind);
static inline vec w_load(const void *w, size_t i, int kind) {
    if (kind == W_BF16) return w_load_half(w, i - i % (2 * VW), i % (2 * VW) != 0, kind);
    if (kind == W_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    return _mm256_loadu_ps((const float *)w + i);
}
static inline vec w_load_half(const void *w, size_t base, int hi, int kind) {
    if (kind != W_BF16) return w_load(w, base + (size_t)hi * VW, kind);
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + base));
    return _mm256_castsi256_ps(hi ? _mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)) : _mm256_slli_epi32(v, 16));
}
#else
static inline vec w_load(const void *w, size_t i, int kind) { return w_one(w, i, kind); }
static inline vec w_load_half(const void *w, size_t base, int hi, int kind) {
    return w_one(w, base + (size_t)hi * VW, kind);
}
#endif

/* The pair distance of packed bf16 weights in this build (cpu_step.py packs to it). */
int rwkv7_bf16_pair(void) { return PAIR; }

static inline size_t w_bytes(int kind) { return kind == W_BF16 ? 2 : kind == W_INT8 ? 1 : 4; }

#if VW > 1
/* e^x to about 2 ulp (libm's expf is about 1): x = n ln2 + r with |r| <= ln2 / 2, a degree-7
 * Taylor polynomial for e^r (truncation 5e-9), then the exponent. Inputs are clamped to
 * [-87, 88], where the result is a normal float; every caller saturates long before. */
static inline vec v_exp(vec x) {
    x = v_clamp(x, -87.0f, 88.0f);
    vec n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vec r = v_fma(n, v_set1(-0.693145751953125f), x); /* ln 2 split in two for an exact n ln2 */
    r = v_fma(n, v_set1(-1.42860682030941723e-6f), r);
    /* Estrin's scheme: (1 + r + r^2/2 + r^3/6) + r^4 (1/24 + r/120 + r^2/720 + r^3/5040) in
     * three levels of FMAs, not Horner's seven in a row. The activations are chains of two
     * exps and a division per vector that the core could not overlap enough: the decay of a
     * stream took 6 cycles an element. L12-D512 bf16, A/B: K = 1 2.124 -> 2.102 ms, K = 4 3.297
     * -> 3.267. Worst error over [-87, 88] (every 3e-6 relative step) 1.71 ulp, Horner's 0.89. */
    const vec r2 = v_mul(r, r), r4 = v_mul(r2, r2);
    const vec low = v_fma(v_fma(r, v_set1(1.0f / 6.0f), v_set1(0.5f)), r2, v_add(r, v_set1(1.0f)));
    const vec high = v_fma(v_fma(r, v_set1(1.0f / 5040.0f), v_set1(1.0f / 720.0f)), r2,
                           v_fma(r, v_set1(1.0f / 120.0f), v_set1(1.0f / 24.0f)));
    return v_pow2(v_fma(high, r4, low), n);
}

static inline vec v_sigmoid(vec x) {
    vec one = v_set1(1.0f);
    return v_div(one, v_add(one, v_exp(v_mul(x, v_set1(-1.0f)))));
}
#endif

/* ---------------------------------------------------------------------------- layout */

/* Parameter table: the GLOBAL entries, then PER_LAYER entries for each block. Names are the
 * model's parameter names (per-layer ones after "blocks.<i>."), with their shapes in the size
 * symbols of `dims`; a trailing '*' marks the matrices that may be stored packed (bf16, int8:
 * see linear_tiles), the ones that make up almost all the bytes of a token, nn.Linear weights
 * [out, in], and '^' the LoRA matrices, which the model keeps as [in, out] and which are then
 * packed as their transposes, so that linear_tiles reads every packed matrix alike.
 * cpu_step.py reads this string, so the order lives only here. */
enum { G_EMB, G_LN0_W, G_LN0_B, G_LNOUT_W, G_LNOUT_B, G_HEAD, N_GLOBAL };
enum {
    P_LN1_W, P_LN1_B, P_LN2_W, P_LN2_B,
    P_X_R, P_X_W, P_X_K, P_X_V, P_X_A, P_X_G,
    P_W0, P_W1, P_W2, P_A0, P_A1, P_A2, P_V0, P_V1, P_V2, P_G1, P_G2,
    P_K_K, P_K_A, P_R_K,
    P_WR, P_WK, P_WV, P_WO, P_LNX_W, P_LNX_B,
    P_FFN_X_K, P_FFN_KEY, P_FFN_VALUE,
    N_PER_LAYER
};

static const char LAYOUT[] =
    "emb.weight[V,C] blocks.0.ln0.weight[C] blocks.0.ln0.bias[C] ln_out.weight[C] ln_out.bias[C] "
    "head.weight[V,C]*"
    "|"
    "ln1.weight[C] ln1.bias[C] ln2.weight[C] ln2.bias[C] "
    "att.x_r[C] att.x_w[C] att.x_k[C] att.x_v[C] att.x_a[C] att.x_g[C] "
    "att.w0[C] att.w1[C,Dw]^ att.w2[Dw,C]^ att.a0[C] att.a1[C,Da]^ att.a2[Da,C]^ "
    "att.v0[C] att.v1[C,Dv]^ att.v2[Dv,C]^ att.g1[C,Dg]^ att.g2[Dg,C]^ "
    "att.k_k[C] att.k_a[C] att.r_k[H,N] "
    "att.receptance.weight[C,C]* att.key.weight[C,C]* att.value.weight[C,C]* att.output.weight[C,C]* "
    "att.ln_x.weight[C] att.ln_x.bias[C] "
    "ffn.x_k[C] ffn.key.weight[F,C]* ffn.value.weight[C,F]*";

/* dims[] order; also the size symbols of LAYOUT. */
enum { D_LAYER, D_C, D_H, D_N, D_V, D_F, D_DW, D_DA, D_DV, D_DG, N_DIMS };
static const char DIM_NAMES[] = "L C H N V F Dw Da Dv Dg";

/* e^-0.5: the step's decay is exp(-e^-0.5 * sigmoid(z)) (see TimeMix.step). */
#define EXP_MINUS_HALF 0.60653065971263342f

const char *rwkv7_layout(void) { return LAYOUT; }
const char *rwkv7_dim_names(void) { return DIM_NAMES; }
const char *rwkv7_simd(void) { return SIMD_NAME; }

/* Whether helper threads are compiled in (POSIX threads). */
int rwkv7_threads(void) {
#ifdef RWKV7_THREADS
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------- small pieces */

/* runs of rows a float32 matvec pass (and the read pass) reads at once; see linear_rows */
#define ROW_STREAMS 8

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* x[i] = sigmoid(bias[i] + x[i]) (bias may be NULL). */
static void sigmoid_bias(const float *bias, float *x, int n) {
    int i = 0;
#if VW > 1
    for (; i + VW <= n; i += VW) {
        vec z = bias ? v_add(v_load(bias + i), v_load(x + i)) : v_load(x + i);
        v_store(x + i, v_sigmoid(z));
    }
#endif
    for (; i < n; i++) x[i] = sigmoidf((bias ? bias[i] : 0.0f) + x[i]);
}

/* The decay: x[i] = exp(-e^-0.5 * sigmoid(w0[i] + x[i])) = exp(-exp(w)), w = logsigmoid(z) - 0.5. */
static void decay_of(const float *w0, float *x, int n) {
    int i = 0;
#if VW > 1
    for (; i + VW <= n; i += VW) {
        vec sig = v_sigmoid(v_add(v_load(w0 + i), v_load(x + i)));
        v_store(x + i, v_exp(v_mul(sig, v_set1(-EXP_MINUS_HALF))));
    }
#endif
    for (; i < n; i++) x[i] = expf(-EXP_MINUS_HALF * sigmoidf(w0[i] + x[i]));
}

static float vec_sum(const float *x, int n) {
    vec acc0 = v_zero(), acc1 = v_zero();
    int i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        acc0 = v_add(acc0, v_load(x + i));
        acc1 = v_add(acc1, v_load(x + i + VW));
    }
    for (; i + VW <= n; i += VW) acc0 = v_add(acc0, v_load(x + i));
    float s = v_sum(v_add(acc0, acc1));
    for (; i < n; i++) s += x[i];
    return s;
}

/* A plain sum of n floats read as ROW_STREAMS runs at once, as the matvec reads its rows (see
 * ROW_STREAMS): the fastest way we know to read memory, so the floor of a step. */
static float read_sum(const float *x, int n) {
    const int run = n / ROW_STREAMS / VW * VW;
    vec acc[ROW_STREAMS];
    for (int s = 0; s < ROW_STREAMS; s++) acc[s] = v_zero();
    for (int i = 0; i < run; i += VW)
        for (int s = 0; s < ROW_STREAMS; s++) acc[s] = v_add(acc[s], v_load(x + (size_t)s * run + i));
    vec total = v_zero();
    for (int s = 0; s < ROW_STREAMS; s++) total = v_add(total, acc[s]);
    float sum = v_sum(total);
    for (int i = ROW_STREAMS * run; i < n; i++) sum += x[i];
    return sum;
}

static float vec_dot(const float *x, const float *y, int n) {
    vec acc0 = v_zero(), acc1 = v_zero();
    int i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        acc0 = v_fma(v_load(x + i), v_load(y + i), acc0);
        acc1 = v_fma(v_load(x + i + VW), v_load(y + i + VW), acc1);
    }
    for (; i + VW <= n; i += VW) acc0 = v_fma(v_load(x + i), v_load(y + i), acc0);
    float s = v_sum(v_add(acc0, acc1));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

/* Centred sum of squares, two-pass like torch's layer norm (no E[x^2] - E[x]^2 cancellation). */
static float vec_centred_sq(const float *x, float mean, int n) {
    vec neg_mean = v_set1(-mean), acc = v_zero();
    int i = 0;
    for (; i + VW <= n; i += VW) {
        vec t = v_add(v_load(x + i), neg_mean);
        acc = v_fma(t, t, acc);
    }
    float s = v_sum(acc);
    for (; i < n; i++) s += (x[i] - mean) * (x[i] - mean);
    return s;
}

/* Mean and 1 / sqrt(var + eps) of n values (biased variance, as LayerNorm and GroupNorm). */
static void norm_stats(const float *x, int n, float eps, float *mean, float *inv) {
    *mean = vec_sum(x, n) / (float)n;
    float var = vec_centred_sq(x, *mean, n) / (float)n;
    *inv = 1.0f / sqrtf(var + eps);
}

/* out[i] = (x[i] - mean) * inv * w[i] + b[i] for i in [lo, hi). */
static void norm_apply(const float *x, float mean, float inv, const float *w, const float *b,
                       int lo, int hi, float *out) {
    for (int i = lo; i < hi; i++) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* ---------------------------------------------------------------------------- matvecs */

static int cdiv(int a, int b) { return (a + b - 1) / b; }

enum { OUT_STORE, OUT_ADD, OUT_RELU_SQ };

/* max(d, 0) without a branch: the sign of a row's sum is data, so a branch here is mispredicted
 * about half the time, and fmaxf is a call into libm (it keeps NaN rules). At K = 4, L12-D512
 * bf16, ffn_key took 1.11 ms a token with the branch, 1.01 with fmaxf, 0.87 with this; the
 * same pass storing its sums unchanged 0.89. NaN gives 0, as the branch did. */
static inline float relu(float d) {
#ifdef __SSE__
    return _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(d), _mm_setzero_ps()));
#else
    return d > 0.0f ? d : 0.0f;
#endif
}

static inline void emit(float *o, float d, int mode) {
    if (mode == OUT_STORE) *o = d;
    else if (mode == OUT_ADD) *o += d;
    else {
        d = relu(d);
        *o = d * d;
    }
}

/* emit for VW outputs at once; max_ps gives its second operand for NaN, as relu gives 0 */
static inline void emit_vec(float *o, vec d, int mode) {
#if VW == 16
    const vec r = _mm512_max_ps(d, _mm512_setzero_ps());
#elif VW == 8
    const vec r = _mm256_max_ps(d, _mm256_setzero_ps());
#else
    const vec r = relu(d);
#endif
    if (mode == OUT_STORE) v_store(o, d);
    else if (mode == OUT_ADD) v_store(o, v_add(v_load(o), d));
    else v_store(o, v_mul(r, r));
}

/* ROW_STREAMS (defined with read_sum) is the number of memory streams a matvec reads at once.
 * One core reading one sequential stream fetched 14 GB/s here (AMD Zen 2); the same core
 * reading four or eight streams in different pages at once fetched 21-23 GB/s, and two cores
 * 40 GB/s against 27: the hardware prefetcher keeps more lines in flight. So a chunk of rows
 * is cut into ROW_STREAMS runs of consecutive rows, and each pass of the matvec takes the next
 * row of every run: each run is read front to back, and the rows of a pass lie far apart.
 * (The tiles of 4 rows this replaced read one stream per core: 0.78x the speed.) */
/* Accumulators of a pass, rows x token streams: half the vector registers, so that the token
 * streams' inputs and a widened weight vector fit beside them (AVX2 has 16, AVX-512 32). With 8
 * on AVX-512 a pass for 4 token streams took 2 rows: 2 memory streams a core, and every input
 * vector loaded from L1 (or L2: the FFN value's 4 x 8 KB of inputs) for only 2 rows. With 16 it
 * takes 4. L12-D512 bf16, AMD EPYC family 25 (Zen 4), A/B in one process, two threads: K = 4
 * 2.06 -> 1.81x the read floor, K = 1 unchanged. */
#if VW == 16
#define MAX_ACC 16
#else
#define MAX_ACC 8
#endif
/* Bytes ahead in each row, for passes of several token streams. 1 KB was measured on AVX2 (Zen
 * 2). On AVX-512 (Zen 4), whose passes keep 16 accumulators, 4 KB: L12-D512 bf16, A/B in one
 * process, two threads: K = 4 3.55 -> 3.18 ms a token, K = 2 3.01 -> 2.61 (8 KB the same,
 * prefetcht2 the same, prefetcht0 less); 2 KB nothing. */
#if VW == 16
#define PREFETCH_AHEAD 4096
#else
#define PREFETCH_AHEAD 1024
#endif
/* With one token stream, a prefetch 256 B ahead in the first of the eight rows of a pass, and
 * in no other: L12-D512 bf16 2.10 -> 2.04 ms a token (the C call, A/B in one process, six runs:
 * -0.04 to -0.09 ms; 128 B the same, 64 B -0.03, 8 KB or a nop in its place nothing; the 4th
 * or the 8th row instead of the first the same). In two rows it gained less, in four less
 * still, in all eight it cost 0.1 ms. Measured, not understood: perhaps the hardware
 * prefetcher follows seven streams better than eight. */
#define ONE_ROW_AHEAD 256


/* acc[g * R + q] += w[q] . x_g over the pair of vectors at column i (2 * VW columns), x_g = x +
 * g * ldx. Each weight vector is loaded once for the G streams. */
static inline __attribute__((always_inline)) void dot_pair(const float *const *w, int R, int G,
                                                          const float *x, int ldx, int i, vec *acc) {
    for (int h = 0; h < 2; h++) {
        vec xv[4];
        for (int g = 0; g < G; g++) xv[g] = v_load(x + (size_t)g * ldx + i + h * VW);
        for (int q = 0; q < R; q++) {
            vec wq = v_load(w[q] + i + h * VW);
            for (int g = 0; g < G; g++) acc[g * R + q] = v_fma(wq, xv[g], acc[g * R + q]);
        }
    }
}

/* Dot products of R weight rows with G token streams' inputs: dot[g * R + q] = w[q] . x_g,
 * x_g = x + g * ldx. R and G are constants where it is inlined (R * G <= MAX_ACC): the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_rows(const float *const *w, int R, int G,
                                                          const float *x, int ldx, int in, float *dot) {
    vec acc[MAX_ACC];
    for (int k = 0; k < R * G; k++) acc[k] = v_zero();
    int i = 0;
    /* two pairs of vectors a step: 4% faster than one (measured with bf16 rows, a cache line a
     * row) */
    for (; i + 4 * VW <= in; i += 4 * VW) {
        /* With several token streams the pass is busy with FMAs and the hardware prefetcher
         * falls behind: asking for each row PREFETCH_AHEAD bytes ahead took K = 4 from 5.31 to
         * 4.99 ms a token (L12-D512, when bf16 was read as rows). As a non-temporal prefetch
         * (locality 0) the weights, read once a token, no longer pushed the recurrent state and
         * the activations out of the L3 cache: 3.87 -> 3.68 ms, the heads phase 0.42 -> 0.31
         * ms (Zen 2). With one stream the same in every row only slowed the pass down (2.09 ->
         * 2.2-2.9 ms at 256 B to 4 KB ahead). */
        if (G > 1)
            for (int q = 0; q < R; q++)
                __builtin_prefetch((const char *)(w[q] + i) + PREFETCH_AHEAD, 0, 0);
        else /* one stream: see ONE_ROW_AHEAD */
            __builtin_prefetch((const char *)(w[0] + i) + ONE_ROW_AHEAD, 0, 0);
        dot_pair(w, R, G, x, ldx, i, acc);
        dot_pair(w, R, G, x, ldx, i + 2 * VW, acc);
    }
    for (; i + 2 * VW <= in; i += 2 * VW) dot_pair(w, R, G, x, ldx, i, acc);
    for (int k = 0; k < R * G; k++) dot[k] = v_sum(acc[k]);
    for (; i < in; i++) /* a tail shorter than a pair of vectors */
        for (int g = 0; g < G; g++)
            for (int q = 0; q < R; q++) dot[g * R + q] += w[q][i] * x[(size_t)g * ldx + i];
}

/* R rows (pointers w, output positions rows[]) times every token stream: streams in fours,
 * then a pair, then one. */
static inline __attribute__((always_inline)) void rows_times_streams(
        const float *const *w, const int *rows, int R, int in, const float *X, int ldx, int B,
        float *out, int ldo, int mode) {
    for (int b = 0; b < B;) {
        const int G = B - b >= 4 && 4 * R <= MAX_ACC ? 4 : B - b >= 2 && 2 * R <= MAX_ACC ? 2 : 1;
        float dot[MAX_ACC];
        const float *xb = X + (size_t)b * ldx;
        if (G == 4) dot_rows(w, R, 4, xb, ldx, in, dot);
        else if (G == 2) dot_rows(w, R, 2, xb, ldx, in, dot);
        else dot_rows(w, R, 1, xb, ldx, in, dot);
        for (int g = 0; g < G; g++)
            for (int q = 0; q < R; q++) emit(out + (size_t)(b + g) * ldo + rows[q], dot[g * R + q], mode);
        b += G;
    }
}

/* nn.Linear on rows [r0, r1) of the model's own float32 W [rows, in]: out[b*ldo + row] (op)=
 * W[row, :] . X[b*ldx + :] for b < B. The rows of a pass stay in L1 while every token stream
 * uses them, so each weight is read from memory once per token. (Packed matrices are read as
 * output tiles instead: linear_tiles.) */
static void linear_rows(const float *W, int in, const float *X, int ldx, int B, float *out, int ldo,
                        int r0, int r1, int mode) {
    /* rows per pass: ROW_STREAMS at one token stream, fewer when the accumulators of several
     * token streams share the registers (one of ROW_STREAMS, ROW_STREAMS / 2, ROW_STREAMS / 4) */
    const int G = B >= 4 ? 4 : B >= 2 ? 2 : 1;
    const int R = MAX_ACC / G < ROW_STREAMS ? MAX_ACC / G : ROW_STREAMS;
    const int n = r1 - r0, run = cdiv(n, R); /* rows [r0 + s*run, ...) are run s */
    for (int t = 0; t < run; t++) {
        const float *w[ROW_STREAMS];
        int rows[ROW_STREAMS], m = 0;
        for (int s = 0; s < R; s++) {
            const int row = r0 + s * run + t;
            if (s * run + t >= n) break; /* the last runs may be short */
            rows[m] = row;
            w[m++] = W + (size_t)row * in;
        }
        if (m == R) {
            switch (R) { /* constant row counts, so that dot_rows keeps its sums in registers */
            case ROW_STREAMS: rows_times_streams(w, rows, ROW_STREAMS, in, X, ldx, B, out, ldo, mode); break;
            case ROW_STREAMS / 2: rows_times_streams(w, rows, ROW_STREAMS / 2, in, X, ldx, B, out, ldo, mode); break;
            case ROW_STREAMS / 4: rows_times_streams(w, rows, ROW_STREAMS / 4, in, X, ldx, B, out, ldo, mode); break;
            }
        } else {
            for (int q = 0; q < m; q++)
                rows_times_streams(w + q, rows + q, 1, in, X, ldx, B, out, ldo, mode);
        }
    }
}

/* Row vector times matrix on columns [c0, c1): out[c - c0] = sum_i x[i] * M[i*ldm + c].
 * M [in, ldm] row-major (LoRA matrices). A block of columns stays in registers while the rows
 * stream by; even and odd rows accumulate apart so the FMA chains overlap. */
static void vec_mat_cols(const float *x, const float *M, int ldm, int in, int c0, int c1,
                         float *out) {
    int c = c0;
    for (; c + 4 * VW <= c1; c += 4 * VW) {
        vec s0 = v_zero(), s1 = v_zero(), s2 = v_zero(), s3 = v_zero();
        vec t0 = v_zero(), t1 = v_zero(), t2 = v_zero(), t3 = v_zero();
        const float *m = M + c;
        int i = 0;
        for (; i + 2 <= in; i += 2, m += 2 * (size_t)ldm) {
            vec xi = v_set1(x[i]), xj = v_set1(x[i + 1]);
            const float *n = m + ldm;
            s0 = v_fma(xi, v_load(m), s0);
            s1 = v_fma(xi, v_load(m + VW), s1);
            s2 = v_fma(xi, v_load(m + 2 * VW), s2);
            s3 = v_fma(xi, v_load(m + 3 * VW), s3);
            t0 = v_fma(xj, v_load(n), t0);
            t1 = v_fma(xj, v_load(n + VW), t1);
            t2 = v_fma(xj, v_load(n + 2 * VW), t2);
            t3 = v_fma(xj, v_load(n + 3 * VW), t3);
        }
        if (i < in) {
            vec xi = v_set1(x[i]);
            s0 = v_fma(xi, v_load(m), s0);
            s1 = v_fma(xi, v_load(m + VW), s1);
            s2 = v_fma(xi, v_load(m + 2 * VW), s2);
            s3 = v_fma(xi, v_load(m + 3 * VW), s3);
        }
        v_store(out + c - c0, v_add(s0, t0));
        v_store(out + c - c0 + VW, v_add(s1, t1));
        v_store(out + c - c0 + 2 * VW, v_add(s2, t2));
        v_store(out + c - c0 + 3 * VW, v_add(s3, t3));
    }
    for (; c + VW <= c1; c += VW) {
        vec s0 = v_zero(), s1 = v_zero(), s2 = v_zero(), s3 = v_zero();
        const float *m = M + c;
        int i = 0;
        for (; i + 4 <= in; i += 4, m += 4 * (size_t)ldm) {
            s0 = v_fma(v_set1(x[i]), v_load(m), s0);
            s1 = v_fma(v_set1(x[i + 1]), v_load(m + ldm), s1);
            s2 = v_fma(v_set1(x[i + 2]), v_load(m + 2 * (size_t)ldm), s2);
            s3 = v_fma(v_set1(x[i + 3]), v_load(m + 3 * (size_t)ldm), s3);
        }
        for (; i < in; i++, m += ldm) s0 = v_fma(v_set1(x[i]), v_load(m), s0);
        v_store(out + c - c0, v_add(v_add(s0, s1), v_add(s2, s3)));
    }
    for (; c < c1; c++) {
        float s = 0.0f;
        for (int i = 0; i < in; i++) s += x[i] * M[(size_t)i * ldm + c];
        out[c - c0] = s;
    }
}

/* Output tiles. A packed matrix W [rows, in] (nn.Linear form: a row is an output) is stored as
 * [rows / TILE][in][TILE], its rows padded with zeros to whole tiles (kernels/weight_formats.py
 * packs): tile t holds outputs [t * TILE, t * TILE + TILE), and for each input their TILE
 * weights are one packed load (a cache line of bf16 on AVX-512) that widens to two float
 * vectors. A pass sums down P tiles at once for G token streams, each input broadcast once for
 * all P tiles: one load of an input feeds 2 * P FMAs, where a pass over rows loaded every input
 * vector again for each row and ended each row and stream with a horizontal sum. L12-D512 bf16,
 * AMD EPYC family 25 (Zen 4), A/B in one process, two threads (rows against tiles, 12 rounds):
 * K = 4 3.25 -> 2.41 ms a token, K = 1 2.21 -> 2.05; a timing program with the matvecs alone
 * read at 15 against 24 GB/s at K = 4. Each output is one chain of sums in input order, so
 * which thread runs which tile never changes a result. */
#define TILE (2 * PAIR)

int rwkv7_tile(void) { return TILE; }

/* acc[(g * P + p) * 2 + half] = sum_i x_g[i] * tile(t0 + p * apart)[i][half * VW ...], x_g =
 * x + g * ldx: P tiles (P memory streams, each read front to back) times G token streams,
 * 2 * P * G <= MAX_ACC sums in registers. */
static inline __attribute__((always_inline)) void tiles_pass(const void *M, int kind, int in, int t0, int apart,
                                                            int P, const float *x, int ldx, int G, vec *acc) {
    const size_t tile = (size_t)in * TILE;
    for (int k = 0; k < 2 * P * G; k++) acc[k] = v_zero();
    for (int i = 0; i < in; i++) {
        vec xi[4];
        for (int g = 0; g < G; g++) xi[g] = v_set1(x[(size_t)g * ldx + i]);
        for (int p = 0; p < P; p++) {
            const size_t at = (size_t)(t0 + p * apart) * tile + (size_t)i * TILE;
            /* Several token streams: ask for each tile PREFETCH_AHEAD bytes ahead: K = 4 2.55 ->
             * 2.43 ms a token in the A/B above. As prefetcht1 (locality 2) rather than
             * non-temporal, as the passes over rows had it (see dot_rows): K = 4 2.50 -> 2.35 and
             * 2.48 -> 2.39 ms with both threads on one chiplet, 2.64 -> 2.54 and 2.68 -> 2.65 on
             * two (two A/Bs of 30 rounds, sorted by the threads' round trip); prefetcht2 the
             * same, 8 or 16 KB ahead slower. With one stream any prefetch made it slower (see
             * the ninth run in docs/cpu-step.md). */
            if (G > 1) __builtin_prefetch((const char *)M + at * w_bytes(kind) + PREFETCH_AHEAD, 0, 2);
            const vec lo = w_load_half(M, at, 0, kind), hi = w_load_half(M, at, 1, kind);
            for (int g = 0; g < G; g++) {
                acc[(g * P + p) * 2] = v_fma(lo, xi[g], acc[(g * P + p) * 2]);
                acc[(g * P + p) * 2 + 1] = v_fma(hi, xi[g], acc[(g * P + p) * 2 + 1]);
            }
        }
    }
}

/* One pass of P tiles `apart` from tile t for G token streams: P and G constants, so that the
 * sums stay in registers. */
static inline __attribute__((always_inline)) void tiles_pass_of(const void *M, int kind, int in, int t,
                                                               int apart, int P, const float *x, int ldx,
                                                               int G, vec *acc) {
    switch (G * 16 + P) {
#if MAX_ACC >= 16
    case 4 * 16 + 2: tiles_pass(M, kind, in, t, apart, 2, x, ldx, 4, acc); break;
    case 2 * 16 + 4: tiles_pass(M, kind, in, t, apart, 4, x, ldx, 2, acc); break;
    case 1 * 16 + 8: tiles_pass(M, kind, in, t, apart, 8, x, ldx, 1, acc); break;
#endif
    case 4 * 16 + 1: tiles_pass(M, kind, in, t, apart, 1, x, ldx, 4, acc); break;
    case 2 * 16 + 2: tiles_pass(M, kind, in, t, apart, 2, x, ldx, 2, acc); break;
    case 2 * 16 + 1: tiles_pass(M, kind, in, t, apart, 1, x, ldx, 2, acc); break;
    case 1 * 16 + 4: tiles_pass(M, kind, in, t, apart, 4, x, ldx, 1, acc); break;
    case 1 * 16 + 2: tiles_pass(M, kind, in, t, apart, 2, x, ldx, 1, acc); break;
    default: tiles_pass(M, kind, in, t, apart, 1, x, ldx, 1, acc); break;
    }
}

/* Outputs [r0, r1) of a packed W (output tiles; r0 a multiple of TILE, r1 a multiple of TILE
 * or the last row) times every stream's input: out[b*ldo + row] (op)= W[row, :] . X[b*ldx + :]
 * (int8: times scale[row]). Token streams in fours, then a pair, then one; the tiles in
 * passes of as many as the sums allow (half the accumulators: 8 tiles at one stream on
 * AVX-512), each pass taking the next tile of every run of tiles. */
static inline __attribute__((always_inline)) void linear_tiles_kind(
        const void *W, const float *scale, int kind, int in, const float *X, int ldx, int B,
        float *out, int ldo, int r0, int r1, int mode) {
    vec acc[MAX_ACC];
    const int t_end = cdiv(r1, TILE);
    for (int b = 0; b < B;) {
        const int G = B - b >= 4 ? 4 : B - b >= 2 ? 2 : 1, most = MAX_ACC / 2 / G;
        const float *x = X + (size_t)b * ldx;
        for (int t = r0 / TILE; t < t_end;) {
            int P = most;
            while (P > t_end - t) P /= 2;
            const int run = (t_end - t) / P; /* tiles t + p * run + u, u < run, are run p */
            for (int u = 0; u < run; u++) {
                tiles_pass_of(W, kind, in, t + u, run, P, x, ldx, G, acc);
                for (int g = 0; g < G; g++)
                    for (int p = 0; p < P; p++) {
                        const int c0 = (t + u + p * run) * TILE;
                        float *o = out + (size_t)(b + g) * ldo + c0;
                        vec lo = acc[(g * P + p) * 2], hi = acc[(g * P + p) * 2 + 1];
                        if (c0 + TILE <= r1) { /* a whole tile */
                            if (scale) {
                                lo = v_mul(lo, v_load(scale + c0));
                                hi = v_mul(hi, v_load(scale + c0 + VW));
                            }
                            emit_vec(o, lo, mode);
                            emit_vec(o + VW, hi, mode);
                        } else { /* the last tile holds padding rows */
                            float sums[TILE];
                            v_store(sums, lo);
                            v_store(sums + VW, hi);
                            for (int q = 0; q < r1 - c0; q++) emit(o + q, scale ? sums[q] * scale[c0 + q] : sums[q], mode);
                        }
                    }
            }
            t += run * P;
        }
        b += G;
    }
}

/* linear_tiles_kind, one specialised copy per packed format. */
static void linear_tiles(const void *W, const float *scale, int kind, int in, const float *X, int ldx, int B,
                         float *out, int ldo, int r0, int r1, int mode) {
    if (kind == W_BF16) linear_tiles_kind(W, NULL, W_BF16, in, X, ldx, B, out, ldo, r0, r1, mode);
    else linear_tiles_kind(W, scale, W_INT8, in, X, ldx, B, out, ldo, r0, r1, mode);
}

/* nn.Linear outputs [r0, r1) in the job's storage: the model's float32 rows, or output tiles. */
static void matvec(int kind, const void *W, const float *scale, int in, const float *X, int ldx, int B,
                   float *out, int ldo, int r0, int r1, int mode) {
    if (kind == W_FP32) linear_rows(W, in, X, ldx, B, out, ldo, r0, r1, mode);
    else linear_tiles(W, scale, kind, in, X, ldx, B, out, ldo, r0, r1, mode);
}

/* ---------------------------------------------------------------------------- WKV, one head */

/* S [N, N] (value i, key j) <- S diag(decay) + (S a) b^T + v k^T;  y = S r.
 * One pass over the rows: S a uses the old row, then the row is updated and dotted with r.
 * Four rows at a time, one from each quarter of the state: a row alone is a chain of
 * dependent FMAs and horizontal sums that left the core waiting (1.07 us a head of 64 from L1
 * against 0.53), and four quarters are four memory streams when the state comes from DRAM. */
static void wkv_head(float *S, int N, const float *r, const float *decay, const float *k,
                     const float *v, const float *a, const float *b, float *y) {
    int i = 0;
#if VW > 1
    if (N % (4 * VW) == 0) {
        const int Q = N / 4;
        for (; i < Q; i++) {
            float *s[4];
            vec p[4], sa[4], vi[4];
            for (int u = 0; u < 4; u++) {
                s[u] = S + (size_t)(i + u * Q) * N;
                p[u] = v_zero();
            }
            for (int j = 0; j < N; j += VW) {
                const vec aj = v_load(a + j);
                for (int u = 0; u < 4; u++) p[u] = v_fma(v_load(s[u] + j), aj, p[u]);
            }
            for (int u = 0; u < 4; u++) {
                sa[u] = v_set1(v_sum(p[u]));
                vi[u] = v_set1(v[i + u * Q]);
                p[u] = v_zero();
            }
            for (int j = 0; j < N; j += VW) {
                const vec bj = v_load(b + j), kj = v_load(k + j), dj = v_load(decay + j), rj = v_load(r + j);
                for (int u = 0; u < 4; u++) {
                    const vec nu = v_fma(v_load(s[u] + j), dj, v_fma(sa[u], bj, v_mul(vi[u], kj)));
                    v_store(s[u] + j, nu);
                    p[u] = v_fma(nu, rj, p[u]);
                }
            }
            for (int u = 0; u < 4; u++) y[i + u * Q] = v_sum(p[u]);
        }
        return;
    }
#endif
    for (; i < N; i++) {
        float *s = S + (size_t)i * N;
        float sa = vec_dot(s, a, N);
        vec vsa = v_set1(sa), vvi = v_set1(v[i]), acc = v_zero();
        int j = 0;
        for (; j + VW <= N; j += VW) {
            vec upd = v_fma(vsa, v_load(b + j), v_mul(vvi, v_load(k + j)));
            vec sj = v_fma(v_load(s + j), v_load(decay + j), upd);
            v_store(s + j, sj);
            acc = v_fma(sj, v_load(r + j), acc);
        }
        float yi = v_sum(acc);
        for (; j < N; j++) {
            float sj = s[j] * decay[j] + (sa * b[j] + v[i] * k[j]);
            s[j] = sj;
            yi += sj * r[j];
        }
        y[i] = yi;
    }
}

/* ---------------------------------------------------------------------------- one token's job */

/* Work buffers in the caller's scratch memory (rwkv7_scratch_floats), shared by the threads. */
typedef struct {
    float *x;               /* [B, C] residual stream */
    float *h1, *h2, *kx;    /* [B, C] ln1 output; ln2 output; ln2 output after token shift */
    float *mix;             /* [6, B, C] ln1 output after token shift, for r, w, k, v, a, g */
    float *r, *k, *v, *v_first, *yg; /* [B, C] */
    float *lora;            /* [B, Dw + Da + Dv + Dg] LoRA hidden vectors after activation */
    float *decay, *a, *g, *vgate; /* [B, C] the LoRA outputs after their activations */
    float *hid;             /* [B, F] channel-mix hidden layer */
    float *head_tmp;        /* [B, H, 4, N] per-head temporaries */
} Buffers;

typedef struct {
    int32_t d[N_DIMS]; /* by value: a late helper may look at a finished job's sizes */
    float eps[2];
    const float *const *params;
    const float *const *scales; /* per-row scales of int8 matrices, parallel to params (else NULL) */
    int wkind;                  /* storage of the large matrices: W_FP32, W_BF16 or W_INT8 */
    int B;
    const int64_t *idx;
    float *shift, *wkv, *logits;
    Buffers buf;
    int helpers;       /* helper threads invited to this job */
    const float *read_buf; /* rwkv7_read_pass: the buffer to read (then the only phase), else NULL */
    int64_t read_floats;
    float *read_sums;      /* rwkv7_read_pass: one sum per chunk */
    int row_chunk_c;   /* rows per chunk of a matvec reading C inputs */
    int row_chunk_f;   /* rows per chunk of a matvec reading F inputs */
    int channel_chunk; /* channels per chunk of the layer-norm phases */
    int lora_order[4]; /* the LoRAs (0 w, 1 a, 2 v, 3 g) in the order proj hands them out */
} Job;

/* Phases: LN0, then PER_LAYER phases per block, then LN_OUT and HEAD. */
enum { K_LN1, K_PROJ, K_HEADS, K_OUT, K_LN2, K_FFN_KEY, K_FFN_VALUE, PER_LAYER_PHASES };
/* The proj phase begins with the four LoRAs, one chunk each (a whole LoRA on one thread, see
 * lora_chain), then the chunks of rows of r, k and v. */
#define LORA_CHAINS 4
#define ROW_CHUNK_FLOATS 16384 /* a chunk of the read pass: 64 KB */
#define CHUNK_BYTES 65536      /* about this many weight bytes a matvec chunk */


static int phase_count(const Job *j) { return j->read_buf ? 1 : 1 + PER_LAYER_PHASES * j->d[D_LAYER] + 2; }

static int phase_chunks(const Job *j, int p) {
    const int C = j->d[D_C], B = j->B;
    if (j->read_buf) return (int)((j->read_floats + ROW_CHUNK_FLOATS - 1) / ROW_CHUNK_FLOATS);
    const int ln_chunks = B * cdiv(C, j->channel_chunk);
    if (p == 0) return ln_chunks;
    if (p == phase_count(j) - 2) return ln_chunks;
    if (p == phase_count(j) - 1) return cdiv(j->d[D_V], j->row_chunk_c);
    switch ((p - 1) % PER_LAYER_PHASES) {
    case K_LN1: case K_LN2: return ln_chunks;
    case K_PROJ: return LORA_CHAINS + 3 * cdiv(C, j->row_chunk_c);
    case K_HEADS: return B * j->d[D_H];
    case K_OUT: return cdiv(C, j->row_chunk_c);
    case K_FFN_KEY: return cdiv(j->d[D_F], j->row_chunk_c);
    default: return cdiv(C, j->row_chunk_f); /* K_FFN_VALUE */
    }
}

/* Whether the job's phases and each phase's chunks fit the shared counter (see work). */
#define MAX_PHASES 0xFFF
#define MAX_CHUNKS 0xFFFF
static int fits_counters(const Job *j) {
    const int n = phase_count(j);
    if (n > MAX_PHASES) return 0;
    for (int p = 0; p < n; p++) {
        if (p == 1 + PER_LAYER_PHASES && n > p + 2) p = n - 2; /* the other layers are alike */
        if (phase_chunks(j, p) > MAX_CHUNKS) return 0;
    }
    return 1;
}

/* Layer norm of stream b's residual on the channels of chunk `blk`, which [lo, hi) receives. */
static void ln_chunk(const Job *j, const float *w, const float *b_, int b, int blk, float *out,
                     int *lo, int *hi) {
    const int C = j->d[D_C];
    const float *x = j->buf.x + (size_t)b * C;
    float mean, inv;
    norm_stats(x, C, j->eps[0], &mean, &inv);
    *lo = blk * j->channel_chunk;
    *hi = *lo + j->channel_chunk < C ? *lo + j->channel_chunk : C;
    norm_apply(x, mean, inv, w, b_, *lo, *hi, out + (size_t)b * C);
}

/* Columns [lo, hi) of X M for every stream, M [in, cols] a LoRA matrix: out[b*ldo + c] =
 * X[b*ldx + :] . M[:, c]. Packed, M is stored as its transpose in output tiles (all streams in
 * one pass); float32, it is the model's own, read by column blocks, stream by stream. */
static void lora_columns(const Job *j, const void *M, const float *scale, int in, int cols, const float *X,
                         int ldx, float *out, int ldo, int lo, int hi) {
    if (j->wkind != W_FP32) {
        linear_tiles(M, scale, j->wkind, in, X, ldx, j->B, out, ldo, lo, hi, OUT_STORE);
        return;
    }
    for (int b = 0; b < j->B; b++)
        vec_mat_cols(X + (size_t)b * ldx, M, cols, in, lo, hi, out + (size_t)b * ldo + lo);
}

/* LoRA `q` (0 decay w, 1 in-context rate a, 2 value residual v, 3 gate g) whole, on the calling
 * thread: the down-projection of its token-shift mix, the hidden activation (tanh for w, sigmoid
 * for g), the up-projection and the output activation (the decay, sigmoid(a0 + .), sigmoid(v0 +
 * .)). A LoRA is small (64-256 KB in bf16 at C = 512) and its up-projection needs all of its
 * hidden vector, so one thread doing both halves saves a phase: they were a phase each (the
 * down-projections in chunks of 32 columns inside proj, the up-projections a phase of their own
 * after it), and the whole LoRA as one chunk took L12-D512 bf16 from 2.10 to 2.08 ms a token
 * (the C call, A/B in one process; the LoRA work 0.63 -> 0.60 ms). */
static void lora_chain(const Job *j, const float *const *P, const float *const *S, int layer, int q) {
    const int32_t *d = j->d;
    const int C = d[D_C], Dsum = d[D_DW] + d[D_DA] + d[D_DV] + d[D_DG];
    const int dims[4] = {d[D_DW], d[D_DA], d[D_DV], d[D_DG]};
    const int off[4] = {0, d[D_DW], d[D_DW] + d[D_DA], d[D_DW] + d[D_DA] + d[D_DV]};
    const int down[4] = {P_W1, P_A1, P_V1, P_G1}, up[4] = {P_W2, P_A2, P_V2, P_G2};
    const int mix_of[4] = {1, 4, 3, 5}; /* xw, xa, xv, xg */
    float *outs[4] = {j->buf.decay, j->buf.a, j->buf.vgate, j->buf.g};
    if (q == 2 && layer == 0) return; /* layer 0 has no value residual */
    const size_t BC = (size_t)j->B * C;
    float *hidden = j->buf.lora + off[q];
    lora_columns(j, P[down[q]], S[down[q]], C, dims[q], j->buf.mix + mix_of[q] * BC, C, hidden, Dsum, 0, dims[q]);
    for (int b = 0; b < j->B; b++) {
        float *h = hidden + (size_t)b * Dsum;
        if (q == 0) for (int i = 0; i < dims[q]; i++) h[i] = tanhf(h[i]);
        if (q == 3) sigmoid_bias(NULL, h, dims[q]);
    }
    lora_columns(j, P[up[q]], S[up[q]], dims[q], C, hidden, Dsum, outs[q], C, 0, C);
    for (int b = 0; b < j->B; b++) {
        float *o = outs[q] + (size_t)b * C;
        if (q == 0) decay_of(P[P_W0], o, C);
        if (q == 1) sigmoid_bias(P[P_A0], o, C);
        if (q == 2) sigmoid_bias(P[P_V0], o, C);
    }
}

/* The rest of the time mix for stream b and head hd: value residual, kk, the WKV update,
 * GroupNorm, bonus, gate. */
static void time_mix_head(const Job *j, const float *const *P, int layer, int b, int hd) {
    const int32_t *d = j->d;
    const int C = d[D_C], N = d[D_N], H = d[D_H];
    const int c0 = hd * N;
    const size_t at = (size_t)b * C + c0;
    const float *r = j->buf.r + at, *k = j->buf.k + at;
    const float *decay = j->buf.decay + at, *a = j->buf.a + at, *g = j->buf.g + at;
    float *v = j->buf.v + at, *v_first = j->buf.v_first + at;
    float *tmp = j->buf.head_tmp + ((size_t)b * H + hd) * 4 * N;
    float *kk = tmp, *kb = tmp + N, *kmod = tmp + 2 * N, *y = tmp + 3 * N;
    { /* the inputs were mostly written by the other threads: ask for all their lines at once */
        const float *in[9] = {r, k, v, v_first, decay, a, g, j->buf.vgate + at, j->buf.h1 + at};
        for (int q = 0; q < 9; q++)
            for (int i = 0; i < N; i += 16) __builtin_prefetch(in[q] + i, 0, 3);
    }

    if (layer == 0) {
        memcpy(v_first, v, sizeof(float) * N);
    } else {
        const float *vgate = j->buf.vgate + at;
        for (int i = 0; i < N; i++) v[i] = v[i] + (v_first[i] - v[i]) * vgate[i];
    }
    const float *k_k = P[P_K_K] + c0, *k_a = P[P_K_A] + c0, *r_k = P[P_R_K] + (size_t)hd * N;
    for (int i = 0; i < N; i++) kk[i] = k[i] * k_k[i];
    float norm = sqrtf(vec_dot(kk, kk, N));
    float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f); /* F.normalize's eps */
    /* In vectors: as a scalar loop the sum of the bonus was one chain of dependent adds, about
     * 1,000 cycles a head (rdtsc) of which this loop now takes 500. */
    const vec vinv = v_set1(inv), one = v_set1(1.0f);
    vec bonus_acc = v_zero();
    int i = 0;
    for (; i + VW <= N; i += VW) {
        const vec kn = v_mul(v_load(kk + i), vinv), ai = v_load(a + i);
        v_store(kk + i, v_sub(v_zero(), kn)); /* a of the WKV update */
        v_store(kb + i, v_mul(kn, ai));       /* b of the WKV update */
        const vec km = v_mul(v_load(k + i), v_fma(v_sub(ai, one), v_load(k_a + i), one));
        v_store(kmod + i, km);
        bonus_acc = v_fma(v_mul(v_load(r + i), km), v_load(r_k + i), bonus_acc);
    }
    float bonus = v_sum(bonus_acc);
    for (; i < N; i++) { /* a head size that is not whole vectors */
        const float kn = kk[i] * inv;
        kk[i] = -kn;
        kb[i] = kn * a[i];
        kmod[i] = k[i] * (1.0f + (a[i] - 1.0f) * k_a[i]);
        bonus += r[i] * kmod[i] * r_k[i];
    }
    float *S = j->wkv + (((size_t)layer * j->B + b) * H + hd) * (size_t)N * N;
    wkv_head(S, N, r, decay, kmod, v, kk, kb, y);
    float mean, inv_std;
    norm_stats(y, N, j->eps[1], &mean, &inv_std);
    norm_apply(y, mean, inv_std, P[P_LNX_W] + c0, P[P_LNX_B] + c0, 0, N, y);
    float *yg = j->buf.yg + at;
    for (int i = 0; i < N; i++) yg[i] = (y[i] + bonus * v[i]) * g[i];
    /* the ln1 phase, the only reader of this layer's att shift, is over */
    float *shift0 = j->shift + (((size_t)layer * 2 + 0) * j->B + b) * C + c0;
    memcpy(shift0, j->buf.h1 + at, sizeof(float) * N);
}

/* Rows [lo, hi) of `count` chunks of per_chunk rows from chunk `chunk`, of `rows` in all. */
static void rows_of(int chunk, int count, int per_chunk, int rows, int *lo, int *hi) {
    *lo = chunk * per_chunk;
    *hi = *lo + count * per_chunk < rows ? *lo + count * per_chunk : rows;
}

/* Run chunks [c, c + k) of phase p, or the first few of them; returns how many it ran. Chunks
 * of rows of one matrix run as one range, so its runs of rows (ROW_STREAMS) are k times
 * longer: fewer streams to start and fewer claims (see work). Other chunks run one at a time. */
static int run_chunk(const Job *j, int p, int c, int k) {
    if (j->read_buf) { /* rwkv7_read_pass */
        const int64_t at = (int64_t)c * ROW_CHUNK_FLOATS, len = (int64_t)k * ROW_CHUNK_FLOATS;
        const int64_t n = j->read_floats - at < len ? j->read_floats - at : len;
        j->read_sums[c] = read_sum(j->read_buf + at, (int)n);
        for (int q = 1; q < k; q++) j->read_sums[c + q] = 0.0f;
        return k;
    }
    const int32_t *d = j->d;
    const int C = d[D_C], F = d[D_F], B = j->B;
    const int ln_blocks = cdiv(C, j->channel_chunk);
    const float *const *G = j->params;
    const Buffers *bf = &j->buf;
    const size_t BC = (size_t)B * C;
    int lo, hi;

    if (p == 0) { /* ln0 of the embedding rows, straight into the residual */
        int b = c / ln_blocks, blk = c % ln_blocks;
        const float *e = G[G_EMB] + (size_t)j->idx[b] * C;
        float mean, inv;
        norm_stats(e, C, j->eps[0], &mean, &inv);
        lo = blk * j->channel_chunk;
        hi = lo + j->channel_chunk < C ? lo + j->channel_chunk : C;
        norm_apply(e, mean, inv, G[G_LN0_W], G[G_LN0_B], lo, hi, bf->x + (size_t)b * C);
        return 1;
    }
    if (p == phase_count(j) - 2) {
        ln_chunk(j, G[G_LNOUT_W], G[G_LNOUT_B], c / ln_blocks, c % ln_blocks, bf->h1, &lo, &hi);
        return 1;
    }
    if (p == phase_count(j) - 1) {
        rows_of(c, k, j->row_chunk_c, d[D_V], &lo, &hi);
        matvec(j->wkind, G[G_HEAD], j->scales[G_HEAD], C, bf->h1, C, B, j->logits, d[D_V], lo, hi, OUT_STORE);
        return k;
    }
    const int layer = (p - 1) / PER_LAYER_PHASES;
    const float *const *P = G + N_GLOBAL + (size_t)layer * N_PER_LAYER;
    const float *const *S = j->scales + N_GLOBAL + (size_t)layer * N_PER_LAYER;
    const int wk = j->wkind;
    float *shift0 = j->shift + ((size_t)layer * 2 + 0) * BC;
    float *shift1 = j->shift + ((size_t)layer * 2 + 1) * BC;

    switch ((p - 1) % PER_LAYER_PHASES) {
    case K_LN1: {
        int b = c / ln_blocks;
        ln_chunk(j, P[P_LN1_W], P[P_LN1_B], b, c % ln_blocks, bf->h1, &lo, &hi);
        const float *h = bf->h1 + (size_t)b * C, *prev = shift0 + (size_t)b * C;
        for (int m = 0; m < 6; m++) {
            const float *mu = P[P_X_R + m];
            float *out = bf->mix + m * BC + (size_t)b * C;
            for (int i = lo; i < hi; i++) out[i] = h[i] + (prev[i] - h[i]) * mu[i];
        }
        return 1;
    }
    case K_PROJ: {
        if (c < LORA_CHAINS) {
            lora_chain(j, P, S, layer, j->lora_order[c]);
            return 1;
        }
        c -= LORA_CHAINS;
        const int per = cdiv(C, j->row_chunk_c), which = c / per; /* r, k, v */
        const int weight[3] = {P_WR, P_WK, P_WV}, mix[3] = {0, 2, 3};
        float *outs[3] = {bf->r, bf->k, bf->v};
        const int m = k < per - c % per ? k : per - c % per; /* not past this matrix */
        rows_of(c % per, m, j->row_chunk_c, C, &lo, &hi);
        matvec(wk, P[weight[which]], S[weight[which]], C, bf->mix + mix[which] * BC, C, B, outs[which], C, lo, hi, OUT_STORE);
        return m;
    }
    case K_HEADS:
        time_mix_head(j, P, layer, c / d[D_H], c % d[D_H]);
        return 1;
    case K_OUT:
        rows_of(c, k, j->row_chunk_c, C, &lo, &hi);
        matvec(wk, P[P_WO], S[P_WO], C, bf->yg, C, B, bf->x, C, lo, hi, OUT_ADD);
        return k;
    case K_LN2: {
        int b = c / ln_blocks;
        ln_chunk(j, P[P_LN2_W], P[P_LN2_B], b, c % ln_blocks, bf->h2, &lo, &hi);
        const float *h = bf->h2 + (size_t)b * C, *prev = shift1 + (size_t)b * C;
        const float *mu = P[P_FFN_X_K];
        float *out = bf->kx + (size_t)b * C;
        for (int i = lo; i < hi; i++) out[i] = h[i] + (prev[i] - h[i]) * mu[i];
        return 1;
    }
    case K_FFN_KEY:
        rows_of(c, k, j->row_chunk_c, F, &lo, &hi);
        matvec(wk, P[P_FFN_KEY], S[P_FFN_KEY], C, bf->kx, C, B, bf->hid, F, lo, hi, OUT_RELU_SQ);
        return k;
    default: /* K_FFN_VALUE; the ln2 phase, the only reader of the ffn shift, is over */
        rows_of(c, k, j->row_chunk_f, C, &lo, &hi);
        matvec(wk, P[P_FFN_VALUE], S[P_FFN_VALUE], F, bf->hid, F, B, bf->x, C, lo, hi, OUT_ADD);
        for (int b = 0; b < B; b++)
            memcpy(shift1 + (size_t)b * C + lo, bf->h2 + (size_t)b * C + lo, sizeof(float) * (hi - lo));
        return k;
    }
}

/* ---------------------------------------------------------------------------- scheduling */

/* Two shared counters. `next` packs (epoch, phase, front, back): 20, 12, 16 and 16 bits; the
 * open phase's chunks not handed out yet are [front, back). A thread holding another epoch's
 * view sees the mismatch and leaves, so a job never waits for a thread that has not claimed one
 * of its chunks. `done` counts the open phase's finished chunks; the thread that finishes its
 * last chunk opens the next phase and sets it to 0. Only threads holding a claim of the open
 * phase add to it (no phase ends while a claim of it runs), so it needs no epoch or phase. */
#define NEXT(e, p, f, b) \
    (((uint64_t)((e) & 0xFFFFFu) << 44) | ((uint64_t)(p) << 32) | ((uint64_t)(f) << 16) | (uint64_t)(b))
#define NEXT_EPOCH(v) ((uint32_t)((v) >> 44))
#define NEXT_PHASE(v) ((int)(((v) >> 32) & 0xFFFu))
#define NEXT_FRONT(v) ((int)(((v) >> 16) & 0xFFFFu))
#define NEXT_BACK(v) ((int)((v) & 0xFFFFu))

static _Alignas(64) _Atomic uint64_t g_next;
static _Alignas(64) _Atomic int32_t g_done;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Wait politely: spin a little, then give the core away (the thread we wait for may need it). */
static inline void backoff(int *spins) {
    if (++*spins < 2000) {
        cpu_relax();
    } else {
#ifdef RWKV7_THREADS
        sched_yield();
#endif
    }
}

/* ---------------------------------------------------------------------------- phase profile */

/* Built with -DRWKV7_PROFILE (`rwkv-music bench phases`), the step adds up per kind of phase
 * its wall time (from the end of the phase before, so the handover is counted) and the time
 * threads spent inside its chunks. Kinds: the per-layer phases in order, then ln0, ln_out,
 * head. Without the define none of this is compiled in. */
static const char PHASE_NAMES[] = "ln1 proj heads out ln2 ffn_key ffn_value ln0 ln_out head";
enum { N_KINDS = PER_LAYER_PHASES + 3 };
const char *rwkv7_phase_names(void) { return PHASE_NAMES; }

#ifdef RWKV7_PROFILE
static _Atomic int64_t g_prof_busy_ns[N_KINDS];
static int64_t g_prof_wall_ns[N_KINDS], g_prof_phase_start;

static int64_t prof_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* A phase of kind `kind` is over at `at`: its wall time runs from the end of the phase before.
 * Called only by the thread that ends the phase, the only writer until the next one opens. */
static void prof_phase_over(int kind, int64_t at) {
    g_prof_wall_ns[kind] += at - g_prof_phase_start;
    g_prof_phase_start = at;
}

static int prof_kind(const Job *j, int p) {
    const int n = phase_count(j);
    if (p == 0) return PER_LAYER_PHASES;
    if (p >= n - 2) return PER_LAYER_PHASES + 1 + (p - (n - 2));
    return (p - 1) % PER_LAYER_PHASES;
}
#endif

/* Seconds since the last call: out[k] wall, out[N_KINDS + k] busy (all threads) of phase kind
 * k. Returns the number of kinds, or 0 when the library was built without RWKV7_PROFILE. */
int rwkv7_profile(double *out) {
#ifdef RWKV7_PROFILE
    for (int k = 0; k < N_KINDS; k++) {
        out[k] = (double)g_prof_wall_ns[k] * 1e-9;
        out[N_KINDS + k] = (double)atomic_exchange(&g_prof_busy_ns[k], 0) * 1e-9;
        g_prof_wall_ns[k] = 0;
    }
    return N_KINDS;
#else
    (void)out;
    return 0;
#endif
}

/* Whether phase q is run whole by the thread that opens it, before opening the one after: a
 * layer norm of one chunk (one stream at C <= 512). Only one thread could run it anyway, and
 * handing it over cost a round trip between the threads and the residual's lines fetched by
 * whoever claimed it: ln1 and ln2 at 2 % of a token (L12-D512 bf16, one stream, `bench phases`).
 * A/B, 191 rounds of 60 tokens: 0.987 of the time (0.982 with both cores on one chiplet, 0.991
 * on two). */
static int runs_inline(const Job *j, int q) {
    if (j->read_buf || q == 0 || phase_chunks(j, q) != 1) return 0;
    const int n = phase_count(j);
    if (q == n - 2) return 1; /* ln_out */
    if (q == n - 1) return 0; /* the head */
    const int kind = (q - 1) % PER_LAYER_PHASES;
    return kind == K_LN1 || kind == K_LN2;
}

/* Run chunks [c, c + k) of phase p and count them done; the last one opens the next phase (after
 * running it, and so on, while it runs_inline). */
static void run_and_finish(const Job *j, uint32_t epoch, int p, int c, int k, int n) {
#ifdef RWKV7_PROFILE
    const int64_t start = prof_now();
    if (p == 0 && c == 0) g_prof_phase_start = start;
#endif
    for (int done = 0; done < k;) done += run_chunk(j, p, c + done, k - done);
#ifdef RWKV7_PROFILE
    const int64_t end = prof_now();
    atomic_fetch_add_explicit(&g_prof_busy_ns[prof_kind(j, p)], end - start, memory_order_relaxed);
#endif
    if (atomic_fetch_add_explicit(&g_done, k, memory_order_acq_rel) + k == n) {
#ifdef RWKV7_PROFILE
        prof_phase_over(prof_kind(j, p), end);
#endif
        int q = p + 1;
        for (; q < phase_count(j) && runs_inline(j, q); q++) {
            run_chunk(j, q, 0, 1);
#ifdef RWKV7_PROFILE
            const int64_t at = prof_now();
            atomic_fetch_add_explicit(&g_prof_busy_ns[prof_kind(j, q)], at - g_prof_phase_start, memory_order_relaxed);
            prof_phase_over(prof_kind(j, q), at);
#endif
        }
        const int chunks = q < phase_count(j) ? phase_chunks(j, q) : 0;
        atomic_store_explicit(&g_done, 0, memory_order_relaxed);
        atomic_store_explicit(&g_next, NEXT(epoch, q, 0, chunks), memory_order_release);
    }
}

/* Whether chunk c of phase p is claimed alone: a LoRA (a whole one is up to 4 chunks of rows'
 * bytes), so that a claim of a share is not all LoRAs and the other thread idle at the end. */
static int claimed_alone(const Job *j, int p, int c) {
    return !j->read_buf && p > 0 && p < phase_count(j) - 2 && (p - 1) % PER_LAYER_PHASES == K_PROJ &&
           c < LORA_CHAINS;
}

/* Claim and run chunks until the job is over (0) or it is not this epoch's job any more (-1).
 * A claim takes one thread's share of what is left of the phase, (back - front) / threads
 * chunks, at least one: large claims early in a phase (long runs of rows, few atomics on the
 * shared counter), single chunks at its end, so that the threads finish it together. Claiming
 * every chunk alone cost about 0.35 us a 64 KB chunk, a contended atomic and eight memory
 * streams started afresh: 2.95 against 2.45 ms a token at L12-D512 bf16 on 2 threads. Half or a
 * quarter of a share per claim measured in between.
 *
 * Thread `thread` (0 the caller) claims from the front of what is left when it is even, from
 * the back when it is odd. So with two threads each one reads about the same rows of every
 * matrix, and runs the same heads, token after token, whoever opened the phase: on a machine
 * whose two cores sit on two chiplets (two L3 caches) a thread finds part of its rows still in
 * its own L3. Handing out halves by who came first moved them between the chiplets. A/B at
 * L12-D512 bf16, one stream, 600 rounds of 60 tokens: 0.962 of the time on two chiplets (95 %
 * interval 0.947-0.974), 0.989 on one (0.984-0.996). */
static int work(const Job *j, uint32_t epoch, int thread) {
    const int n_phases = phase_count(j), threads = 1 + j->helpers;
    const int from_back = thread & 1;
    int spins = 0;
    for (;;) {
        uint64_t v = atomic_load_explicit(&g_next, memory_order_acquire);
        if (NEXT_EPOCH(v) != (epoch & 0xFFFFFu)) return -1;
        const int p = NEXT_PHASE(v), front = NEXT_FRONT(v), back = NEXT_BACK(v);
        if (p >= n_phases) return 0;
        if (front >= back) { /* all handed out: wait for the holders to finish */
            backoff(&spins);
            continue;
        }
        int k = (back - front) / threads, c;
        if (k < 1) k = 1;
        uint64_t claimed;
        if (!from_back) {
            c = front;
            if (claimed_alone(j, p, c)) k = 1;
            claimed = NEXT(epoch, p, front + k, back);
        } else {
            if (claimed_alone(j, p, back - 1)) k = 1;
            else if (claimed_alone(j, p, back - k)) k = back - LORA_CHAINS; /* not into the LoRAs */
            c = back - k;
            claimed = NEXT(epoch, p, front, c);
        }
        if (!atomic_compare_exchange_weak_explicit(&g_next, &v, claimed, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        spins = 0;
        run_and_finish(j, epoch, p, c, k, phase_chunks(j, p));
    }
}

#ifdef RWKV7_THREADS

#define MAX_HELPERS 63
#define HELPER_SPIN_NS 200000 /* a helper spins this long for the next token, then sleeps */

static Job g_jobs[2]; /* job of epoch e in g_jobs[e & 1] */
static _Alignas(64) _Atomic uint32_t g_epoch;
static _Atomic int g_sleepers;
static pthread_mutex_t g_sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_call_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_helpers_started;
static pid_t g_pool_pid;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void *helper_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&g_epoch);
    for (;;) {
        uint32_t e = atomic_load_explicit(&g_epoch, memory_order_acquire);
        if (e == seen) {
            int64_t start = now_ns();
            while ((e = atomic_load_explicit(&g_epoch, memory_order_acquire)) == seen &&
                   now_ns() - start < HELPER_SPIN_NS)
                for (int i = 0; i < 64; i++) cpu_relax();
            if (e == seen) {
                pthread_mutex_lock(&g_sleep_lock);
                atomic_fetch_add(&g_sleepers, 1);
                while ((e = atomic_load(&g_epoch)) == seen) pthread_cond_wait(&g_wake, &g_sleep_lock);
                atomic_fetch_sub(&g_sleepers, 1);
                pthread_mutex_unlock(&g_sleep_lock);
            }
        }
        seen = e;
        const Job *j = &g_jobs[e & 1];
        if (id < j->helpers) work(j, e, id + 1);
    }
    return NULL;
}

/* Start helpers up to `wanted` (never stops any: extra ones are simply not invited). */
static int ensure_helpers(int wanted) {
    if (g_pool_pid != getpid()) { /* a fork() child has none of the parent's threads */
        g_pool_pid = getpid();
        g_helpers_started = 0;
    }
    if (wanted > MAX_HELPERS) wanted = MAX_HELPERS;
    while (g_helpers_started < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, helper_main, (void *)(intptr_t)g_helpers_started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        g_helpers_started++;
    }
    return g_helpers_started < wanted ? g_helpers_started : wanted;
}

static uint32_t g_last_epoch;

static void run_job(const Job *proto, int nthreads) {
    pthread_mutex_lock(&g_call_lock);
    uint32_t e = ++g_last_epoch;
    Job *j = &g_jobs[e & 1];
    *j = *proto;
    j->helpers = nthreads > 1 ? ensure_helpers(nthreads - 1) : 0;
    atomic_store_explicit(&g_done, 0, memory_order_relaxed);
    atomic_store_explicit(&g_next, NEXT(e, 0, 0, phase_chunks(j, 0)), memory_order_release);
    atomic_store(&g_epoch, e); /* sequentially consistent against a helper going to sleep */
    if (j->helpers > 0 && atomic_load(&g_sleepers) > 0) {
        pthread_mutex_lock(&g_sleep_lock);
        pthread_cond_broadcast(&g_wake);
        pthread_mutex_unlock(&g_sleep_lock);
    }
    work(j, e, 0);
    pthread_mutex_unlock(&g_call_lock);
}

#else

static void run_job(const Job *proto, int nthreads) {
    (void)nthreads;
    static uint32_t epoch;
    epoch++;
    Job j = *proto;
    atomic_store(&g_done, 0);
    atomic_store(&g_next, NEXT(epoch, 0, 0, phase_chunks(&j, 0)));
    work(&j, epoch, 0);
}

#endif

/* ---------------------------------------------------------------------------- how many threads */

/* On a 2-core machine whose other core is busy, a helper descheduled while it holds a claim
 * makes a call slower than one thread alone; on an idle machine two threads win (one thread
 * takes 1.7x as long at L12-D512). So a call chooses between one thread and `most` from the
 * wall times seen lately. The caller keeps one ThreadTimes per kind of call (a kernel and batch
 * size, the read pass) and passes it in; only this file reads and writes it. Kept in Python,
 * choosing and recording cost 40-50 us a token at L12-D512 bf16 (2 % of the step): its
 * objects were out of the caches after every token's weights had streamed through them.
 *
 * Each option keeps its last THREAD_WINDOW wall times and their median; the option with the
 * lower median runs (all threads on a tie), and every THREAD_EXPLORE-th call runs the other one
 * so that its times stay current, every THREAD_EXPLORE_FAR-th when it was more than THREAD_FAR
 * times slower (trying a 1.7x slower option every 16th token cost 4-5 % of all the time,
 * every 64th about 1 %). Load that slows the running option shows in its own times at once,
 * so that option is left as soon as it stops being the best. */
#define THREAD_WINDOW 5
#define THREAD_WARMUP 3 /* times of each option before choosing */
#define THREAD_EXPLORE 16
#define THREAD_EXPLORE_FAR 256
#define THREAD_FAR 1.5

typedef struct {
    int32_t most;              /* the thread count of option 1 (option 0 is one thread) */
    int32_t count[2], next[2]; /* times held and the next slot of each option's ring */
    int64_t calls;
    double seconds[2][THREAD_WINDOW];
    double median[2];
} ThreadTimes;

/* out[4] = THREAD_WINDOW, THREAD_WARMUP, THREAD_EXPLORE, THREAD_EXPLORE_FAR (for tests). */
void rwkv7_thread_policy(int32_t *out) {
    out[0] = THREAD_WINDOW;
    out[1] = THREAD_WARMUP;
    out[2] = THREAD_EXPLORE;
    out[3] = THREAD_EXPLORE_FAR;
}

/* Bytes of a ThreadTimes; the caller allocates them zeroed (a zeroed one starts over). */
int64_t rwkv7_thread_times_bytes(void) { return (int64_t)sizeof(ThreadTimes); }

/* The thread count for the next call: 1 or `most`. */
int32_t rwkv7_choose_threads(ThreadTimes *t, int32_t most) {
    if (most <= 1) return 1;
    if (t->most != most) { /* torch's thread count changed: the old times say nothing */
        memset(t, 0, sizeof *t);
        t->most = most;
    }
    t->calls++;
    for (int o = 0; o < 2; o++)
        if (t->count[o] < THREAD_WARMUP) return o ? most : 1;
    const int best = t->median[1] <= t->median[0];
    const int far = t->median[!best] > THREAD_FAR * t->median[best];
    const int o = t->calls % (far ? THREAD_EXPLORE_FAR : THREAD_EXPLORE) == 0 ? !best : best;
    return o ? most : 1;
}

/* A call chosen by rwkv7_choose_threads ran on `threads` threads in `seconds`. */
void rwkv7_record_threads(ThreadTimes *t, int32_t threads, double seconds) {
    const int o = threads > 1;
    if (o && threads != t->most) return; /* not one of the two options */
    t->seconds[o][t->next[o]] = seconds;
    t->next[o] = (t->next[o] + 1) % THREAD_WINDOW;
    if (t->count[o] < THREAD_WINDOW) t->count[o]++;
    double v[THREAD_WINDOW];
    const int n = t->count[o];
    for (int a = 0; a < n; a++) { /* insertion sort of the held times */
        int at = a;
        for (; at > 0 && v[at - 1] > t->seconds[o][a]; at--) v[at] = v[at - 1];
        v[at] = t->seconds[o][a];
    }
    t->median[o] = v[n / 2];
}

/* Run a job on `nthreads` threads, or, given `times`, on 1 or `nthreads` as they choose. */
static void run_chosen(const Job *j, int32_t nthreads, ThreadTimes *times) {
#ifdef RWKV7_THREADS
    if (times) {
        const int32_t threads = rwkv7_choose_threads(times, nthreads);
        const int64_t start = now_ns();
        run_job(j, threads);
        rwkv7_record_threads(times, threads, 1e-9 * (double)(now_ns() - start));
        return;
    }
#else
    (void)times;
#endif
    run_job(j, nthreads < 1 ? 1 : nthreads);
}

/* ---------------------------------------------------------------------------- entry points */

#ifdef RWKV7_THREADS
static _Alignas(64) _Atomic int32_t g_ball;

static void *echo_ball(void *arg) {
    const int32_t trips = *(const int32_t *)arg;
    for (int32_t i = 0; i < trips; i++) {
        int32_t v;
        while ((v = atomic_load_explicit(&g_ball, memory_order_acquire)) != 2 * i + 1)
            if (v < 0) return NULL; /* the caller ran out of time */
            else cpu_relax();
        atomic_store_explicit(&g_ball, 2 * i + 2, memory_order_release);
    }
    return NULL;
}
#endif

/* Mean nanoseconds of `trips` round trips of one cache line between the calling thread and a new
 * one, both spinning: how far apart two cores of this machine are at the moment. On one chiplet
 * of a Zen 4 CPU about 60-70 ns, between two 300+ ns; bench step prints it beside its floor,
 * which two chiplets' memory links make faster (docs/cpu-step.md). It stops early after 50 ms
 * (a busy machine: the other thread descheduled), averaging the trips made. Serialised with
 * the steps (g_call_lock), so that none runs beside it. -1 without threads. */
double rwkv7_round_trip_ns(int32_t trips) {
#ifdef RWKV7_THREADS
    pthread_t echo;
    if (trips < 1) return -1.0;
    pthread_mutex_lock(&g_call_lock);
    atomic_store(&g_ball, 0);
    if (pthread_create(&echo, NULL, echo_ball, &trips) != 0) {
        pthread_mutex_unlock(&g_call_lock);
        return -1.0;
    }
    const int64_t start = now_ns();
    int64_t ns = 0;
    int32_t made = 0;
    while (made < trips) {
        atomic_store_explicit(&g_ball, 2 * made + 1, memory_order_release);
        while (atomic_load_explicit(&g_ball, memory_order_acquire) != 2 * made + 2) cpu_relax();
        made++;
        if (made % 64 == 0 || made == trips) {
            ns = now_ns() - start;
            if (ns > 50000000) break;
        }
    }
    atomic_store_explicit(&g_ball, -1, memory_order_release); /* lets the echo go if it waits */
    pthread_join(echo, NULL);
    pthread_mutex_unlock(&g_call_lock);
    return (double)ns / made;
#else
    (void)trips;
    return -1.0;
#endif
}

/* The floor of a step: read `n` floats once, cut into the same ~64 KB chunks and run by the same
 * threads and scheduler as a step (nthreads and times as in rwkv7_step), with a plain
 * vectorised sum. sums: one float per chunk, ceil(n / 16384). Returns 0, -1 for too many chunks. */
int rwkv7_read_pass(const float *buf, int64_t n, float *sums, int32_t nthreads, ThreadTimes *times) {
    if (n < 1) return 0;
    if ((n + ROW_CHUNK_FLOATS - 1) / ROW_CHUNK_FLOATS > MAX_CHUNKS) return -1;
    Job j;
    memset(&j, 0, sizeof j);
    j.read_buf = buf;
    j.read_floats = n;
    j.read_sums = sums;
    run_chosen(&j, nthreads, times);
    return 0;
}

/* Floats of scratch memory rwkv7_step needs for `batch` streams. */
int64_t rwkv7_scratch_floats(const int32_t *d, int32_t batch) {
    const int64_t B = batch, C = d[D_C];
    return B * (23 * C + d[D_DW] + d[D_DA] + d[D_DV] + d[D_DG] + d[D_F]);
}

/* Rows of a matvec chunk reading `in` inputs stored as `kind`: about CHUNK_BYTES of weights, in
 * whole runs of rows (float32) or whole tiles (packed). */
static int chunk_rows(int in, int kind) {
    const int unit = kind == W_FP32 ? ROW_STREAMS : TILE, rows = CHUNK_BYTES / (in * (int)w_bytes(kind));
    return rows < unit ? unit : rows / unit * unit;
}

/* One token for `batch` streams. dims: see D_*; eps: {layer-norm eps, GroupNorm eps};
 * params: the LAYOUT table, where the matrices marked '*' are stored as `weights` (W_FP32,
 * W_BF16 or W_INT8); scales: a table parallel to params with each int8 matrix's per-row
 * float32 scales (entries of other parameters are ignored and may be NULL); idx [batch] token ids; shift, wkv: the State tensors (updated in
 * place); logits [batch, V] written; scratch: rwkv7_scratch_floats(dims, batch) floats;
 * nthreads: the calling thread plus nthreads - 1 helpers; times: NULL, or the ThreadTimes of
 * this kind of call, and the call runs on 1 or nthreads threads as they choose.
 * Returns 0; 1 + the position of the first token id out of range; -1 for more than 9000
 * layers; -2 for an unknown `weights` (nothing is touched on an error). */
int rwkv7_step(const int32_t *dims, const float *eps, const float *const *params,
               const float *const *scales, int32_t weights, int32_t batch, const int64_t *idx, float *shift, float *wkv, float *logits, float *scratch,
               int32_t nthreads, ThreadTimes *times) {
    for (int b = 0; b < batch; b++)
        if (idx[b] < 0 || idx[b] >= dims[D_V]) return 1 + b;
    if (batch < 1) return 0;
    if (weights < W_FP32 || weights > W_INT8) return -2;
    Job j;
    memset(&j, 0, sizeof j);
    memcpy(j.d, dims, sizeof j.d);
    j.eps[0] = eps[0];
    j.eps[1] = eps[1];
    j.params = params;
    j.scales = scales;
    j.wkind = weights;
    j.B = batch;
    j.idx = idx;
    j.shift = shift;
    j.wkv = wkv;
    j.logits = logits;
    const int C = dims[D_C], F = dims[D_F];
    j.row_chunk_c = chunk_rows(C, weights);
    j.row_chunk_f = chunk_rows(F, weights);
    /* Each chunk of a layer-norm phase computes the norm's statistics over all C channels, so
     * blocks of 128 channels computed them C / 128 times a stream: whole rows up to 512
     * channels took K = 4 from 3.49 to 3.45 ms a token (L12-D512 bf16, A/B). */
    j.channel_chunk = 512;
    /* The largest LoRA first: the last claims of the proj phase are then chunks of rows. */
    const int lora_size[4] = {dims[D_DW], dims[D_DA], dims[D_DV], dims[D_DG]};
    for (int q = 0; q < 4; q++) {
        int at = q;
        while (at > 0 && lora_size[j.lora_order[at - 1]] < lora_size[q]) {
            j.lora_order[at] = j.lora_order[at - 1];
            at--;
        }
        j.lora_order[at] = q;
    }
    const size_t BC = (size_t)batch * C;
    float *p = scratch;
    j.buf.x = p; p += BC;
    j.buf.h1 = p; p += BC;
    j.buf.h2 = p; p += BC;
    j.buf.kx = p; p += BC;
    j.buf.mix = p; p += 6 * BC;
    j.buf.r = p; p += BC;
    j.buf.k = p; p += BC;
    j.buf.v = p; p += BC;
    j.buf.v_first = p; p += BC;
    j.buf.yg = p; p += BC;
    j.buf.decay = p; p += BC;
    j.buf.a = p; p += BC;
    j.buf.g = p; p += BC;
    j.buf.vgate = p; p += BC;
    j.buf.head_tmp = p; p += 4 * BC;
    j.buf.lora = p; p += (size_t)batch * (dims[D_DW] + dims[D_DA] + dims[D_DV] + dims[D_DG]);
    j.buf.hid = p; p += (size_t)batch * F;
    if (!fits_counters(&j)) return -1; /* more layers or chunks than the shared counter holds */
    run_chosen(&j, nthreads, times);
    return 0;
}
