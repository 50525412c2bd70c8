/* GLM's decode steps on the CPU: `glm_decode_attention`, one query per request over vLLM's
 * paged KV cache, and `glm_decode_linear`, a few rows times a packed copy of a weight (at the
 * end of this file). Both are bound by what they read; pipeline/engines/vllm/cpu_decode.py
 * has the figures.
 *
 * Attention, and why not vLLM's CPU kernel: on a decode step it reads each request's cache one head at a
 * time, and one head of one block is a 4-16 KiB island (the layout below), so the reads are
 * many short streams that wait on memory; in bfloat16 it reaches about half the machine's
 * bandwidth (pipeline/engines/vllm/cpu_decode.py has the figures). Here each work item takes
 * a request (or a group of its heads) and walks its blocks in order, every head of a block
 * while that head's K and V, which lie side by side, are read once, with an online softmax,
 * and the next chunk prefetched: one stream per item.
 *
 * The cache is vLLM's "vec" layout (vllm/v1/attention/backends/cpu_attn.py, written by
 * `cpu_attn_reshape_and_cache`): [blocks][heads][2 * block_size][head_dim] where, per block
 * and head, the first block_size * head_dim elements are K transposed ([head_dim][block_size])
 * and the next are V ([block_size][head_dim]). K is already divided by sqrt(head_dim) (GLM's
 * order, pipeline/engines/vllm/model.py), so scores are plain dot products.
 *
 * Compiled once per element type: float32, or bfloat16 with -DGLM_BF16 (products and sums in
 * float32, the output rounded to nearest even). Needs AVX-512F/BW/VL/DQ (and AVX512-BF16 for
 * bfloat16); the caller checks the CPU. head_dim (<= 256) and block_size (<= 256) are
 * multiples of 16.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_HEADS_PER_ITEM 16
#define MAX_BLOCK_SIZE 256

#ifdef GLM_BF16
typedef uint16_t element;
typedef uint32_t unit; /* glm_decode_linear's transposed x: a pair of elements a unit */
#define PAIR 2

static inline __m512 load16(const element *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline float to_float(element x) {
    union { uint32_t bits; float value; } v = { (uint32_t)x << 16 };
    return v.value;
}

static inline void store16(element *p, __m512 x) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(x));
}
#else
typedef float element;
typedef float unit;
#define PAIR 1

static inline __m512 load16(const element *p) { return _mm512_loadu_ps(p); }
static inline float to_float(element x) { return x; }
static inline void store16(element *p, __m512 x) { _mm512_storeu_ps(p, x); }
#endif

/* e^x for x <= 0 (scores minus their running maximum): Cephes' expf, 2^n * p(r), ~1 ulp. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 first_lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xFFFF : (count > 0 ? (__mmask16)((1u << count) - 1) : 0);
}

/* Scores of one block's keys for one head (K transposed), masked past `valid` keys. */
static inline void block_scores(const float *q, const element *keys, int64_t head_dim,
                                int64_t block_size, int64_t valid, float *scores) {
    for (int64_t g = 0; g < block_size; g += 16) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 4) {  /* four chains: FMA latency, not width */
            const element *k = keys + d * block_size + g;
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), load16(k), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), load16(k + block_size), a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 2]), load16(k + 2 * block_size), a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 3]), load16(k + 3 * block_size), a3);
        }
        __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        _mm512_storeu_ps(scores + g,
                         _mm512_mask_blend_ps(first_lanes(valid - g), _mm512_set1_ps(-INFINITY), s));
    }
}

void glm_decode_attention(const element *query, int64_t query_row_stride,
                          const element *kv_cache, const int32_t *block_table,
                          int64_t block_table_stride, const int32_t *seq_lens, element *out,
                          int64_t out_row_stride, int64_t requests, int64_t heads,
                          int64_t head_dim, int64_t block_size, int32_t threads) {
    const int64_t vectors = head_dim / 16;
    const int64_t chunk = 2 * block_size * head_dim; /* one head of one block: K^T, then V */
    /* enough items for every thread (4 each), at most MAX_HEADS_PER_ITEM heads an item */
    int64_t groups = (4 * (int64_t)threads + requests - 1) / requests;
    const int64_t least = (heads + MAX_HEADS_PER_ITEM - 1) / MAX_HEADS_PER_ITEM;
    groups = groups < least ? least : (groups > heads ? heads : groups);
    const int64_t per_item = (heads + groups - 1) / groups;

#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < requests * groups; ++item) {
        const int64_t r = item / groups, first = (item % groups) * per_item;
        const int64_t last = first + per_item < heads ? first + per_item : heads;
        const int64_t length = seq_lens[r];
        const int64_t blocks = (length + block_size - 1) / block_size;
        const int32_t *table = block_table + r * block_table_stride;
        float q[MAX_HEADS_PER_ITEM][MAX_HEAD_DIM], acc[MAX_HEADS_PER_ITEM][MAX_HEAD_DIM];
        float running_max[MAX_HEADS_PER_ITEM], total[MAX_HEADS_PER_ITEM];
        float p[MAX_BLOCK_SIZE];
        for (int64_t h = first; h < last; ++h) {
            const element *row = query + r * query_row_stride + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
                q[h - first][d] = to_float(row[d]);
                acc[h - first][d] = 0.f;
            }
            running_max[h - first] = -INFINITY;
            total[h - first] = 0.f;
        }
        for (int64_t j = 0; j < blocks; ++j) {
            const int64_t valid = length - j * block_size < block_size ? length - j * block_size
                                                                      : block_size;
            for (int64_t h = first; h < last; ++h) {
                const int64_t i = h - first;
                const element *keys = kv_cache + ((int64_t)table[j] * heads + h) * chunk;
                const element *values = keys + block_size * head_dim;
                const element *next = h + 1 < last ? keys + chunk
                    : (j + 1 < blocks ? kv_cache + ((int64_t)table[j + 1] * heads + first) * chunk
                                      : 0);
                if (next)
                    for (int64_t byte = 0; byte < chunk * (int64_t)sizeof(element); byte += 64)
                        _mm_prefetch((const char *)next + byte, _MM_HINT_T0);

                block_scores(q[i], keys, head_dim, block_size, valid, p);
                __m512 block_max = _mm512_set1_ps(-INFINITY);
                for (int64_t g = 0; g < block_size; g += 16)
                    block_max = _mm512_max_ps(block_max, _mm512_loadu_ps(p + g));
                const float top = _mm512_reduce_max_ps(block_max);
                const float new_max = top > running_max[i] ? top : running_max[i];
                const float rescale = expf(running_max[i] - new_max);
                running_max[i] = new_max;
                __m512 sum = _mm512_setzero_ps();
                for (int64_t g = 0; g < block_size; g += 16) {
                    __m512 e = _mm512_maskz_mov_ps(
                        first_lanes(valid - g),
                        exp16(_mm512_sub_ps(_mm512_loadu_ps(p + g), _mm512_set1_ps(new_max))));
                    _mm512_storeu_ps(p + g, e);
                    sum = _mm512_add_ps(sum, e);
                }
                total[i] = total[i] * rescale + _mm512_reduce_add_ps(sum);
                __m512 o[MAX_HEAD_DIM / 16];
                for (int64_t c = 0; c < vectors; ++c)
                    o[c] = _mm512_mul_ps(_mm512_loadu_ps(acc[i] + 16 * c), _mm512_set1_ps(rescale));
                for (int64_t t = 0; t < valid; ++t) {
                    const __m512 weight = _mm512_set1_ps(p[t]);
                    for (int64_t c = 0; c < vectors; ++c)
                        o[c] = _mm512_fmadd_ps(weight, load16(values + t * head_dim + 16 * c), o[c]);
                }
                for (int64_t c = 0; c < vectors; ++c) _mm512_storeu_ps(acc[i] + 16 * c, o[c]);
            }
        }
        for (int64_t h = first; h < last; ++h) {
            const __m512 scale = _mm512_set1_ps(1.f / total[h - first]);
            element *row = out + r * out_row_stride + h * head_dim;
            for (int64_t c = 0; c < vectors; ++c)
                store16(row + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(acc[h - first] + 16 * c), scale));
        }
    }
}

#define LINEAR_ROWS 16 /* rows a panel's pass keeps in registers */
#define MAX_ROWS 64     /* rows of a call: up to four passes over each panel */
#define PREFETCH_BYTES 8192 /* how far ahead of use the weight stream is fetched */

/* out[m][n] = bias[n] + sum over k of x[m][k] w[n][k], for a decode step's rows (<= 64).
 * `packed` holds w panel by panel, 16 outputs a panel (`pack_linear`): float32 [n / 16][k][16],
 * bfloat16 [n / 16][k / 2][16][2] (pairs of k, as AVX512-BF16's dot product takes them). Each
 * thread streams its panels from end to end, software-prefetched PREFETCH_BYTES ahead, and
 * every weight vector it loads feeds 16 FMAs (dot products), one per row of a group of 16;
 * a second group (rows 16-31, ...) passes over the same panel again while it is in cache.
 * Rows past `rows` are zeros. `scratch` holds x transposed so that one cache line serves a
 * group's 16 rows: [group][k][16] floats, or [group][k / 2][16] pairs. oneDNN's GEMM at 16
 * rows reaches about 60% of the memory bandwidth this gets. Sums in float32, bfloat16 output
 * rounded to nearest even. */
void glm_decode_linear(const element *x, int64_t x_stride, const element *packed,
                       const element *bias, element *out, int64_t out_stride, int64_t rows,
                       int64_t n, int64_t k, element *scratch, int32_t threads) {
    const int64_t groups = (rows + LINEAR_ROWS - 1) / LINEAR_ROWS;
    const int64_t steps = k / PAIR, step_elements = 16 * PAIR;
    unit *columns = (unit *)scratch;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < steps; ++i)
            for (int64_t j = 0; j < LINEAR_ROWS; ++j) {
                const int64_t m = g * LINEAR_ROWS + j;
                unit value = 0;
                if (m < rows) memcpy(&value, x + m * x_stride + PAIR * i, sizeof value);
                columns[(g * steps + i) * LINEAR_ROWS + j] = value;
            }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t panel = 0; panel < n / 16; ++panel) {
        const element *w = packed + panel * k * 16;
        const __m512 b = bias ? load16(bias + 16 * panel) : _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
            __m512 acc[LINEAR_ROWS];
            for (int j = 0; j < LINEAR_ROWS; ++j) acc[j] = b;
            for (int64_t i = 0; i < steps; ++i) {
                const element *weights = w + i * step_elements;
                if (g == 0) _mm_prefetch((const char *)weights + PREFETCH_BYTES, _MM_HINT_T0);
                const unit *column = columns + (g * steps + i) * LINEAR_ROWS;
#ifdef GLM_BF16
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)weights);
                for (int j = 0; j < LINEAR_ROWS; ++j)
                    acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi32((int)column[j]),
                                              wv);
#else
                const __m512 wv = _mm512_loadu_ps(weights);
                for (int j = 0; j < LINEAR_ROWS; ++j)
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(column[j]), wv, acc[j]);
#endif
            }
            for (int64_t j = 0; j < LINEAR_ROWS && g * LINEAR_ROWS + j < rows; ++j)
                store16(out + (g * LINEAR_ROWS + j) * out_stride + 16 * panel, acc[j]);
        }
    }
}

/* erf GELU of n values in place, x * 0.5 * (1 + erf(x / sqrt 2)), with erf as torch's and
 * oneDNN's CPU kernels compute it (Abramowitz & Stegun 7.1.26: |error| < 1.5e-7). */
static void gelu(element *x, int64_t n, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = load16(x + i);
        const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
        const __m512 az = _mm512_abs_ps(z);
        const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                       _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az,
                                                       _mm512_set1_ps(1.f)));
        __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
        r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
        const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(e, t), r, _mm512_set1_ps(1.f));
        const __m512 erf = _mm512_or_ps(erf_abs, _mm512_and_ps(z, _mm512_set1_ps(-0.f)));
        store16(x + i, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)),
                                     _mm512_add_ps(_mm512_set1_ps(1.f), erf)));
    }
}

/* LayerNorm of each row as torch computes it: mean and variance in float32, then
 * (x * rstd + (-rstd * mean)) * weight + bias (the file is built without FMA contraction). */
static void layer_norm(const element *x, const element *weight, const element *bias,
                       element *out, int64_t rows, int64_t width, float eps, int32_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < rows; ++m) {
        const element *row = x + m * width;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < width; i += 16) sum = _mm512_add_ps(sum, load16(row + i));
        const float mean = _mm512_reduce_add_ps(sum) / (float)width;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < width; i += 16) {
            const __m512 d = _mm512_sub_ps(load16(row + i), _mm512_set1_ps(mean));
            squares = _mm512_add_ps(squares, _mm512_mul_ps(d, d));
        }
        const float variance = _mm512_reduce_add_ps(squares) / (float)width;
        const float rstd = 1.f / sqrtf(variance + eps);
        const __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-rstd * mean);
        for (int64_t i = 0; i < width; i += 16) {
            const __m512 normed = _mm512_add_ps(_mm512_mul_ps(load16(row + i), scale), shift);
            store16(out + m * width + i,
                    _mm512_add_ps(_mm512_mul_ps(normed, load16(weight + i)), load16(bias + i)));
        }
    }
}

/* x += y over n elements (rounded to the element type, as torch's add). */
static void add_rows(element *x, const element *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) store16(x + i, _mm512_add_ps(load16(x + i), load16(y + i)));
}

/* Store each row's K and V (every head) in its cache slot, vLLM's "vec" layout (the top of
 * this file): K transposed, V as is. Rows whose slot is negative (padding) are skipped. */
static void cache_keys_values(const element *keys, const element *values, int64_t row_stride,
                              element *kv_cache, const int64_t *slots, int64_t rows,
                              int64_t heads, int64_t head_dim, int64_t block_size) {
    const int64_t chunk = 2 * block_size * head_dim;
    for (int64_t m = 0; m < rows; ++m) {
        if (slots[m] < 0) continue;
        const int64_t block = slots[m] / block_size, offset = slots[m] % block_size;
        for (int64_t h = 0; h < heads; ++h) {
            element *k = kv_cache + (block * heads + h) * chunk + offset;
            element *v = kv_cache + (block * heads + h) * chunk + block_size * head_dim
                         + offset * head_dim;
            const element *key = keys + m * row_stride + h * head_dim;
            const element *value = values + m * row_stride + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
                k[d * block_size] = key[d];
                v[d] = value[d];
            }
        }
    }
}

/* The parameters of one GLM block (pipeline/engines/vllm/model.py, GLMBlock): LayerNorms as
 * they are, linear weights packed for glm_decode_linear, K's rows of the QKV weight already
 * divided by sqrt(head_dim). One tensor-parallel rank holds the whole block. */
struct glm_block {
    const element *input_norm_weight, *input_norm_bias;
    const element *qkv_weight, *qkv_bias;
    const element *dense_weight, *dense_bias;
    const element *post_norm_weight, *post_norm_bias;
    const element *h_to_4h_weight, *h_to_4h_bias;
    const element *four_h_to_h_weight, *four_h_to_h_bias;
    int64_t hidden, heads, head_dim;
    float eps;
};

/* One GLM block for a decode step's rows (one per request, <= MAX_ROWS), x [rows][hidden]
 * updated in place: the same operations in the same order as GLMBlock.forward does them on
 * these kernels, rounded where it rounds, in one call instead of about twenty torch ops.
 * `work` holds rows * 10 * hidden elements and 4 * hidden * MAX_ROWS more. */
void glm_decode_block(const struct glm_block *b, element *x, int64_t rows, element *kv_cache,
                      const int32_t *block_table, int64_t block_table_stride,
                      const int32_t *seq_lens, const int64_t *slots, int64_t block_size,
                      element *work, int32_t threads) {
    const int64_t h = b->hidden, local = b->heads * b->head_dim;
    element *normed = work, *qkv = normed + rows * h, *attended = qkv + rows * 3 * local;
    element *out = attended + rows * local, *wide = out + rows * h, *scratch = wide + rows * 4 * h;

    layer_norm(x, b->input_norm_weight, b->input_norm_bias, normed, rows, h, b->eps, threads);
    glm_decode_linear(normed, h, b->qkv_weight, b->qkv_bias, qkv, 3 * local, rows, 3 * local,
                      h, scratch, threads);
    cache_keys_values(qkv + local, qkv + 2 * local, 3 * local, kv_cache, slots, rows, b->heads,
                      b->head_dim, block_size);
    glm_decode_attention(qkv, 3 * local, kv_cache, block_table, block_table_stride, seq_lens,
                         attended, local, rows, b->heads, b->head_dim, block_size, threads);
    glm_decode_linear(attended, local, b->dense_weight, b->dense_bias, out, h, rows, h, local,
                      scratch, threads);
    add_rows(x, out, rows * h);
    layer_norm(x, b->post_norm_weight, b->post_norm_bias, normed, rows, h, b->eps, threads);
    glm_decode_linear(normed, h, b->h_to_4h_weight, b->h_to_4h_bias, wide, 4 * h, rows, 4 * h,
                      h, scratch, threads);
    gelu(wide, rows * 4 * h, threads);
    glm_decode_linear(wide, 4 * h, b->four_h_to_h_weight, b->four_h_to_h_bias, out, h, rows, h,
                      4 * h, scratch, threads);
    add_rows(x, out, rows * h);
}
