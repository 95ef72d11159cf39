/* vLLM's multi-LoRA products on CPU, fused: one call per LoRA layer instead of a handful of torch
 * ops per slice (accelerated/vllm_lora_ops.py builds this file with the C compiler on first use and
 * calls it through ctypes; nothing here needs torch's headers, so the build takes about a second).
 *
 * The products and their roundings are those of vLLM's CPU punica wrapper with our per-slot ops:
 *   shrink: buffer[i][t] = scale * (x[t] @ A_i[slot(t)]^T), in fp32 (x and A read as fp32);
 *   expand: y[t, off_i : off_i + out_i] += (buffer[i][t] in y's dtype) @ B_i[slot(t)]^T, the
 *           product in y's dtype (in bf16: accumulated in fp32 and rounded once), then added to y
 *           in y's dtype (in bf16: rounded once more), as torch adds two bf16 tensors.
 * A token whose slot is -1 has no adapter: its buffer rows are zeros and y is left as it is.
 *
 * The weights come prepared by the caller (kept while unchanged): A_i as [slots, rank, in] in
 * a_dtype, B_i transposed as [slots, rank, out_i] in b_dtype, holding values of y's dtype. bf16
 * weights are read as fp32 exactly (a shift), so keeping them in bf16 halves the bytes an engine
 * step reads and changes no result. x is [tokens, in] (row stride x_stride), y [tokens, ...] (row
 * stride y_stride), buffer rows buf[i] + t * buf_stride. dtypes: 0 = float32, 1 = bfloat16. Every
 * function returns 0, or 1 for a slot out of range (checked first: nothing is written then).
 *
 * Every dot product is summed in LANES partial sums, a number fixed here rather than by the
 * compiler's vector width, then the lanes pairwise; every output of the expand over the rank in
 * order; with no fused multiply-adds (-ffp-contract=off). So a token's results are the same bits
 * on every machine, AVX2 or AVX-512, and in fp32 they are exactly the sums that
 * tests/test_vllm_lora_ops.py computes with torch.
 *
 * Built with -fopenmp, the tokens are split among the threads in contiguous ranges (a token's rows
 * are its own, so every thread count gives the same results bit for bit) when a call's products are
 * large enough to pay for waking them. The kernel then uses the OpenMP runtime already loaded in the
 * process (torch's libgomp.so.1, found by its name), so its threads are torch's. Without OpenMP the
 * pragmas are ignored and one thread computes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLICES 8
#define MAX_RANK 64
#define PARALLEL_MIN_MACS 65536  /* below this, one thread: waking the others costs more */
#define COMBINE_BLOCK 64  /* the expand's outputs in registers while the rank's rows are read */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's c10::BFloat16 does (NaN becomes 0x7FC0). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  /* a select: vectorizes */
}

static inline float as_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static size_t width_of(int dtype) { return dtype == 0 ? sizeof(float) : sizeof(uint16_t); }

static void load_row(const void *row, int dtype, int64_t n, float *out) {
    if (dtype == 0) {
        memcpy(out, row, (size_t)n * sizeof(float));
    } else {
        const uint16_t *h = (const uint16_t *)row;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(h[j]);
    }
}

/* A dot product is summed in LANES partial sums (lane l takes the terms j = l mod LANES, in order),
 * held in vector registers, then the lanes pairwise (l + half into l). Summing the lanes one after
 * the other, as a compiler does for a reduction it may not reorder, costs a chain of LANES
 * dependent adds after every dot product, and its bits would depend on the vector width. */
#define LANES 16

static inline float sum_lanes(float *lane) {
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int l = 0; l < half; l++) lane[l] += lane[l + half];
    return lane[0];
}

/* y[j] += sum[j] for j < n, in y's dtype (bf16: the sum rounded to bf16 first, as the product in
 * bf16 is, then the sum of the two rounded once more). */
static inline void add_to_row(void *y_row, int y_dtype, const float *sum, int64_t n) {
    if (y_dtype == 1) {
        uint16_t *y = (uint16_t *)y_row;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) y[j] = f32_to_bf16(bf16_to_f32(y[j]) + as_bf16(sum[j]));
    } else {
        float *y = (float *)y_row;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) y[j] += sum[j];
    }
}

/* The inner loops over weight rows, for fp32 and for bf16 weights (the same fp32 arithmetic in the
 * same order): four dot products with xr at once, one, and the expand's y[j] += sum over k of
 * v[k] * rows[k][j] (rows k of n values, one after the other), summed in k's order, a block of
 * sums held in registers while the rank's rows are read and then added into y (add_to_row). */
#define WEIGHT_LOOPS(NAME, T, LOAD)                                                              \
    static void dot4_##NAME(const float *xr, const T *w0, const T *w1, const T *w2, const T *w3, \
                            int64_t in, float *out) {                                            \
        float l0[LANES] = {0.0f}, l1[LANES] = {0.0f}, l2[LANES] = {0.0f}, l3[LANES] = {0.0f};    \
        int64_t j0 = 0;                                                                          \
        for (; j0 + LANES <= in; j0 += LANES) {                                                  \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < LANES; l++) {                                                    \
                float x = xr[j0 + l];                                                            \
                l0[l] += x * LOAD(w0[j0 + l]);                                                   \
                l1[l] += x * LOAD(w1[j0 + l]);                                                   \
                l2[l] += x * LOAD(w2[j0 + l]);                                                   \
                l3[l] += x * LOAD(w3[j0 + l]);                                                   \
            }                                                                                    \
        }                                                                                        \
        for (int64_t j = j0; j < in; j++) {                                                      \
            float x = xr[j];                                                                     \
            l0[j - j0] += x * LOAD(w0[j]);                                                       \
            l1[j - j0] += x * LOAD(w1[j]);                                                       \
            l2[j - j0] += x * LOAD(w2[j]);                                                       \
            l3[j - j0] += x * LOAD(w3[j]);                                                       \
        }                                                                                        \
        out[0] = sum_lanes(l0), out[1] = sum_lanes(l1);                                          \
        out[2] = sum_lanes(l2), out[3] = sum_lanes(l3);                                          \
    }                                                                                            \
    static float dot1_##NAME(const float *xr, const T *w, int64_t in) {                          \
        float lane[LANES] = {0.0f};                                                              \
        int64_t j0 = 0;                                                                          \
        for (; j0 + LANES <= in; j0 += LANES) {                                                  \
            _Pragma("omp simd")                                                                  \
            for (int l = 0; l < LANES; l++) lane[l] += xr[j0 + l] * LOAD(w[j0 + l]);             \
        }                                                                                        \
        for (int64_t j = j0; j < in; j++) lane[j - j0] += xr[j] * LOAD(w[j]);                   \
        return sum_lanes(lane);                                                                  \
    }                                                                                            \
    static void combine_##NAME(const float *v, const T *rows, int64_t rank, int64_t n,           \
                               void *y_row, int y_dtype) {                                       \
        size_t width = width_of(y_dtype);                                                        \
        int64_t j0 = 0;                                                                          \
        for (; j0 + COMBINE_BLOCK <= n; j0 += COMBINE_BLOCK) {                                   \
            float sum[COMBINE_BLOCK] = {0.0f};                                                   \
            for (int64_t k = 0; k < rank; k++) {                                                 \
                const T *row = rows + k * n + j0;                                                \
                float vk = v[k];                                                                 \
                _Pragma("omp simd")                                                              \
                for (int64_t j = 0; j < COMBINE_BLOCK; j++) sum[j] += vk * LOAD(row[j]);         \
            }                                                                                    \
            add_to_row((char *)y_row + (size_t)j0 * width, y_dtype, sum, COMBINE_BLOCK);         \
        }                                                                                        \
        if (j0 == n) return;                                                                     \
        float sum[COMBINE_BLOCK] = {0.0f};                                                       \
        for (int64_t k = 0; k < rank; k++) {                                                     \
            const T *row = rows + k * n + j0;                                                    \
            float vk = v[k];                                                                     \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < n - j0; j++) sum[j] += vk * LOAD(row[j]);                    \
        }                                                                                        \
        add_to_row((char *)y_row + (size_t)j0 * width, y_dtype, sum, n - j0);                    \
    }

#define AS_IS(v) (v)
WEIGHT_LOOPS(f32, float, AS_IS)
WEIGHT_LOOPS(bf16, uint16_t, bf16_to_f32)

/* Row k of slice i's weights for `slot`: [slots, rank, n] in dtype w_dtype. */
static const void *weight_row(const void *w, int w_dtype, int64_t slot, int64_t rank, int64_t k,
                              int64_t n) {
    return (const char *)w + (size_t)((slot * rank + k) * n) * width_of(w_dtype);
}

/* out[i * rank + k] = scale * (xr @ A_i[slot][k]) for every slice i, four rows per pass over xr. */
static void shrink_token(const float *xr, int64_t in, int64_t slot, int64_t nslices,
                         const void *const *a, int a_dtype, int64_t rank, float scale, float *out) {
    const void *w[MAX_SLICES * MAX_RANK];
    int64_t rows = nslices * rank, r = 0;
    for (int64_t i = 0; i < nslices; i++)
        for (int64_t k = 0; k < rank; k++)
            w[i * rank + k] = weight_row(a[i], a_dtype, slot, rank, k, in);
    for (; r + 4 <= rows; r += 4) {
        if (a_dtype == 1)
            dot4_bf16(xr, w[r], w[r + 1], w[r + 2], w[r + 3], in, out + r);
        else
            dot4_f32(xr, w[r], w[r + 1], w[r + 2], w[r + 3], in, out + r);
    }
    for (; r < rows; r++) out[r] = a_dtype == 1 ? dot1_bf16(xr, w[r], in) : dot1_f32(xr, w[r], in);
    for (r = 0; r < rows; r++) out[r] *= scale;
}

/* y_row[off_i + j] += buf_i @ B_i[slot][j] for every slice i, in y's dtype. */
static void expand_token(const float *const *buf, int64_t slot, int64_t nslices,
                         const void *const *bt, int b_dtype, const int64_t *out_sizes,
                         int64_t offset, int64_t rank, void *y_row, int y_dtype) {
    float v[MAX_RANK];
    for (int64_t i = 0; i < nslices; i++) {
        int64_t n = out_sizes[i];
        for (int64_t k = 0; k < rank; k++) v[k] = y_dtype == 1 ? as_bf16(buf[i][k]) : buf[i][k];
        const void *rows = weight_row(bt[i], b_dtype, slot, rank, 0, n);
        void *y = (char *)y_row + (size_t)offset * width_of(y_dtype);
        if (b_dtype == 1)
            combine_bf16(v, rows, rank, n, y, y_dtype);
        else
            combine_f32(v, rows, rank, n, y, y_dtype);
        offset += n;
    }
}

static int64_t total(const int64_t *sizes, int64_t count) {
    int64_t sum = 0;
    for (int64_t i = 0; i < count; i++) sum += sizes[i];
    return sum;
}

static int out_of_range(int64_t tokens, const int64_t *slot_of, int64_t slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slot_of[t] >= slots) return 1;
    return 0;
}

/* Whether a call's products (multiply-adds) are worth more than one thread. */
static int parallel(int64_t tokens, int64_t macs) { return tokens > 1 && macs >= PARALLEL_MIN_MACS; }

int es_lora_shrink(int64_t tokens, int64_t in, const void *x, int64_t x_stride, int x_dtype,
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const void *const *a,
                   int a_dtype, int64_t rank, float scale, float *const *buf, int64_t buf_stride) {
    if (out_of_range(tokens, slot_of, slots)) return 1;
#pragma omp parallel if (parallel(tokens, tokens * nslices * rank * in))
    {
        float *xr = malloc((size_t)in * sizeof(float));
        float out[MAX_SLICES * MAX_RANK];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t slot = slot_of[t];
            if (slot < 0) {
                for (int64_t i = 0; i < nslices; i++)
                    memset(buf[i] + t * buf_stride, 0, (size_t)rank * sizeof(float));
                continue;
            }
            load_row((const char *)x + (size_t)(t * x_stride) * width_of(x_dtype), x_dtype, in, xr);
            shrink_token(xr, in, slot, nslices, a, a_dtype, rank, scale, out);
            for (int64_t i = 0; i < nslices; i++)
                memcpy(buf[i] + t * buf_stride, out + i * rank, (size_t)rank * sizeof(float));
        }
        free(xr);
    }
    return 0;
}

int es_lora_expand(int64_t tokens, const float *const *buf, int64_t buf_stride, int64_t nslices,
                   const void *const *bt, int b_dtype, const int64_t *out_sizes, int64_t offset,
                   int64_t rank, const int64_t *slot_of, int64_t slots, void *y, int64_t y_stride,
                   int y_dtype) {
    if (out_of_range(tokens, slot_of, slots)) return 1;
#pragma omp parallel if (parallel(tokens, tokens * rank * total(out_sizes, nslices)))
    {
        const float *rows[MAX_SLICES];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t slot = slot_of[t];
            if (slot < 0) continue;
            for (int64_t i = 0; i < nslices; i++) rows[i] = buf[i] + t * buf_stride;
            expand_token(rows, slot, nslices, bt, b_dtype, out_sizes, offset, rank,
                         (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype);
        }
    }
    return 0;
}

/* add_lora_linear: shrink and expand token by token, the buffer in fp32 as vLLM's. */
int es_lora_linear(int64_t tokens, int64_t in, const void *x, int64_t x_stride, int x_dtype,
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const void *const *a,
                   int a_dtype, const void *const *bt, int b_dtype, const int64_t *out_sizes,
                   int64_t rank, float scale, void *y, int64_t y_stride, int y_dtype) {
    if (out_of_range(tokens, slot_of, slots)) return 1;
#pragma omp parallel if (parallel(tokens, tokens * rank * (nslices * in + total(out_sizes, nslices))))
    {
        float *xr = malloc((size_t)in * sizeof(float));
        float out[MAX_SLICES * MAX_RANK];
        const float *rows[MAX_SLICES];
        for (int64_t i = 0; i < nslices; i++) rows[i] = out + i * rank;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t slot = slot_of[t];
            if (slot < 0) continue;
            load_row((const char *)x + (size_t)(t * x_stride) * width_of(x_dtype), x_dtype, in, xr);
            shrink_token(xr, in, slot, nslices, a, a_dtype, rank, scale, out);
            expand_token(rows, slot, nslices, bt, b_dtype, out_sizes, 0, rank,
                         (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype);
        }
        free(xr);
    }
    return 0;
}
