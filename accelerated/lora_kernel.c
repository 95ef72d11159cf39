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
 * The weights come prepared by the caller (kept while unchanged): A_i as fp32 [slots, rank, in],
 * B_i transposed as fp32 [slots, rank, out_i] holding values of y's dtype. x is [tokens, in] (row
 * stride x_stride), y [tokens, ...] (row stride y_stride), buffer rows buf[i] + t * buf_stride.
 * dtypes of x and y: 0 = float32, 1 = bfloat16. Every function returns 0, or 1 for a slot out of
 * range (checked first: nothing is written then).
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

/* out[i * rank + k] = scale * (xr @ A_i[slot][k]) for every slice i, four rows per pass over xr. */
static void shrink_token(const float *xr, int64_t in, int64_t slot, int64_t nslices,
                         const float *const *a, int64_t rank, float scale, float *out) {
    const float *w[MAX_SLICES * MAX_RANK];
    int64_t rows = nslices * rank, r = 0;
    for (int64_t i = 0; i < nslices; i++)
        for (int64_t k = 0; k < rank; k++) w[i * rank + k] = a[i] + (slot * rank + k) * in;
    for (; r + 4 <= rows; r += 4) {
        const float *w0 = w[r], *w1 = w[r + 1], *w2 = w[r + 2], *w3 = w[r + 3];
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t j = 0; j < in; j++) {
            float x = xr[j];
            a0 += x * w0[j];
            a1 += x * w1[j];
            a2 += x * w2[j];
            a3 += x * w3[j];
        }
        out[r] = scale * a0;
        out[r + 1] = scale * a1;
        out[r + 2] = scale * a2;
        out[r + 3] = scale * a3;
    }
    for (; r < rows; r++) {
        const float *v = w[r];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < in; j++) acc += xr[j] * v[j];
        out[r] = scale * acc;
    }
}

/* y_row[off_i + j] += buf_i @ B_i[slot][j] for every slice i, in y's dtype (acc: scratch of
 * max(out_i) floats). */
static void expand_token(const float *const *buf, int64_t slot, int64_t nslices,
                         const float *const *bt, const int64_t *out_sizes, int64_t offset,
                         int64_t rank, void *y_row, int y_dtype, float *acc) {
    for (int64_t i = 0; i < nslices; i++) {
        int64_t n = out_sizes[i];
        const float *rows = bt[i] + slot * rank * n;
        for (int64_t j = 0; j < n; j++) acc[j] = 0.0f;
        for (int64_t k = 0; k < rank; k++) {
            float v = y_dtype == 1 ? as_bf16(buf[i][k]) : buf[i][k];
            const float *row = rows + k * n;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) acc[j] += v * row[j];
        }
        if (y_dtype == 1) {
            uint16_t *y = (uint16_t *)y_row + offset;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) y[j] = f32_to_bf16(bf16_to_f32(y[j]) + as_bf16(acc[j]));
        } else {
            float *y = (float *)y_row + offset;
#pragma omp simd
            for (int64_t j = 0; j < n; j++) y[j] += acc[j];
        }
        offset += n;
    }
}

static int64_t largest(const int64_t *sizes, int64_t count) {
    int64_t most = 0;
    for (int64_t i = 0; i < count; i++) most = sizes[i] > most ? sizes[i] : most;
    return most;
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
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const float *const *a,
                   int64_t rank, float scale, float *const *buf, int64_t buf_stride) {
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
            shrink_token(xr, in, slot, nslices, a, rank, scale, out);
            for (int64_t i = 0; i < nslices; i++)
                memcpy(buf[i] + t * buf_stride, out + i * rank, (size_t)rank * sizeof(float));
        }
        free(xr);
    }
    return 0;
}

int es_lora_expand(int64_t tokens, const float *const *buf, int64_t buf_stride, int64_t nslices,
                   const float *const *bt, const int64_t *out_sizes, int64_t offset, int64_t rank,
                   const int64_t *slot_of, int64_t slots, void *y, int64_t y_stride, int y_dtype) {
    if (out_of_range(tokens, slot_of, slots)) return 1;
#pragma omp parallel if (parallel(tokens, tokens * rank * total(out_sizes, nslices)))
    {
        const float *rows[MAX_SLICES];
        float *acc = malloc((size_t)largest(out_sizes, nslices) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t slot = slot_of[t];
            if (slot < 0) continue;
            for (int64_t i = 0; i < nslices; i++) rows[i] = buf[i] + t * buf_stride;
            expand_token(rows, slot, nslices, bt, out_sizes, offset, rank,
                         (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype, acc);
        }
        free(acc);
    }
    return 0;
}

/* add_lora_linear: shrink and expand token by token, the buffer in fp32 as vLLM's. */
int es_lora_linear(int64_t tokens, int64_t in, const void *x, int64_t x_stride, int x_dtype,
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const float *const *a,
                   const float *const *bt, const int64_t *out_sizes, int64_t rank, float scale,
                   void *y, int64_t y_stride, int y_dtype) {
    if (out_of_range(tokens, slot_of, slots)) return 1;
#pragma omp parallel if (parallel(tokens, tokens * rank * (nslices * in + total(out_sizes, nslices))))
    {
        float *xr = malloc((size_t)in * sizeof(float));
        float *acc = malloc((size_t)largest(out_sizes, nslices) * sizeof(float));
        float out[MAX_SLICES * MAX_RANK];
        const float *rows[MAX_SLICES];
        for (int64_t i = 0; i < nslices; i++) rows[i] = out + i * rank;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t slot = slot_of[t];
            if (slot < 0) continue;
            load_row((const char *)x + (size_t)(t * x_stride) * width_of(x_dtype), x_dtype, in, xr);
            shrink_token(xr, in, slot, nslices, a, rank, scale, out);
            expand_token(rows, slot, nslices, bt, out_sizes, 0, rank,
                         (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype, acc);
        }
        free(xr);
        free(acc);
    }
    return 0;
}
