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
 * Tensors: x [tokens, in] (row stride x_stride), A_i [slots, rank, in] and B_i [slots, out_i, rank]
 * contiguous, y [tokens, ...] (row stride y_stride), buffer rows buf[i] + t * buf_stride.
 * dtypes: 0 = float32, 1 = bfloat16. Every function returns 0, or 1 for a slot out of range.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLICES 8

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

static void load_row(const void *row, int dtype, int64_t n, float *out) {
    if (dtype == 0) {
        memcpy(out, row, (size_t)n * sizeof(float));
    } else {
        const uint16_t *h = (const uint16_t *)row;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(h[j]);
    }
}

/* One slot's A_i rows (every slice's, rank each) as fp32 rows: pointers into A where it is fp32,
 * into a converted copy where it is bf16. Made again when the slot changes from one token to the
 * next (a population's tokens come in one run per member). */
typedef struct {
    int64_t slot;
    const float **rows;  /* nslices * rank */
    float *copy;         /* nslices * rank * in, for bf16 weights */
} Shrinker;

static void shrinker_load(Shrinker *s, int64_t slot, int64_t in, int64_t nslices,
                          const void *const *a, int64_t rank, int w_dtype) {
    if (s->slot == slot) return;
    s->slot = slot;
    for (int64_t i = 0; i < nslices; i++)
        for (int64_t k = 0; k < rank; k++) {
            int64_t r = i * rank + k;
            size_t at = (size_t)((slot * rank + k) * in);
            if (w_dtype == 0) {
                s->rows[r] = (const float *)a[i] + at;
            } else {
                const uint16_t *w = (const uint16_t *)a[i] + at;
                float *dst = s->copy + r * in;
                for (int64_t j = 0; j < in; j++) dst[j] = bf16_to_f32(w[j]);
                s->rows[r] = dst;
            }
        }
}

/* out[r] = scale * (xr @ row r) for the shrinker's rows, four rows per pass over xr. */
static void shrink_token(const float *xr, int64_t in, const Shrinker *s, int64_t rows, float scale,
                         float *out) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *w0 = s->rows[r], *w1 = s->rows[r + 1], *w2 = s->rows[r + 2], *w3 = s->rows[r + 3];
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
        const float *w = s->rows[r];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < in; j++) acc += xr[j] * w[j];
        out[r] = scale * acc;
    }
}

static Shrinker shrinker_new(int64_t in, int64_t rows, int w_dtype) {
    Shrinker s = {-1, malloc((size_t)rows * sizeof(float *)),
                  w_dtype == 0 ? NULL : malloc((size_t)(rows * in) * sizeof(float))};
    return s;
}

static void shrinker_free(Shrinker *s) {
    free((void *)s->rows);
    free(s->copy);
}

/* One slot's B_i transposed to [rank][out_i] in fp32 (in y's dtype's values), for every slice:
 * the expand then reads it row by row, contiguously. Made again when the slot changes from one
 * token to the next (a population's tokens come in one run per member). */
typedef struct {
    int64_t slot, total;
    float *bt;  /* rank * sum(out_i) */
} Expander;

static void expander_load(Expander *e, int64_t slot, int64_t nslices, const void *const *b,
                          const int64_t *out_sizes, int64_t rank, int w_dtype, int y_dtype) {
    if (e->slot == slot) return;
    e->slot = slot;
    float *dst = e->bt;
    for (int64_t i = 0; i < nslices; i++) {
        int64_t n = out_sizes[i];
        for (int64_t k = 0; k < rank; k++, dst += n) {
            if (w_dtype == 1) {
                const uint16_t *w = (const uint16_t *)b[i] + (size_t)(slot * n * rank) + k;
                for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(w[j * rank]);
            } else {
                const float *w = (const float *)b[i] + (size_t)(slot * n * rank) + k;
                for (int64_t j = 0; j < n; j++) dst[j] = y_dtype == 1 ? as_bf16(w[j * rank]) : w[j * rank];
            }
        }
    }
}

/* y_row[off_i + j] += buf_i @ B_i[slot][j] for every slice i, in y's dtype (the expander loaded
 * with the token's slot; acc: scratch of max(out_i) floats). */
static void expand_token(const float *const *buf, const Expander *e, int64_t nslices,
                         const int64_t *out_sizes, int64_t offset, int64_t rank, void *y_row,
                         int y_dtype, float *acc) {
    const float *bt = e->bt;
    for (int64_t i = 0; i < nslices; i++) {
        int64_t n = out_sizes[i];
        for (int64_t j = 0; j < n; j++) acc[j] = 0.0f;
        for (int64_t k = 0; k < rank; k++, bt += n) {
            float v = y_dtype == 1 ? as_bf16(buf[i][k]) : buf[i][k];
#pragma omp simd
            for (int64_t j = 0; j < n; j++) acc[j] += v * bt[j];
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

static int64_t largest(const int64_t *sizes, int64_t count, int64_t *total) {
    int64_t most = 0;
    *total = 0;
    for (int64_t i = 0; i < count; i++) {
        most = sizes[i] > most ? sizes[i] : most;
        *total += sizes[i];
    }
    return most;
}

static size_t width_of(int dtype) { return dtype == 0 ? sizeof(float) : sizeof(uint16_t); }

int es_lora_shrink(int64_t tokens, int64_t in, const void *x, int64_t x_stride, int x_dtype,
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const void *const *a,
                   int64_t rank, int w_dtype, float scale, float *const *buf, int64_t buf_stride) {
    float *xr = malloc((size_t)in * sizeof(float));
    float out[MAX_SLICES * 64];
    Shrinker s = shrinker_new(in, nslices * rank, w_dtype);
    int status = 0;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = slot_of[t];
        if (slot >= slots) { status = 1; break; }
        if (slot < 0) {
            for (int64_t i = 0; i < nslices; i++)
                memset(buf[i] + t * buf_stride, 0, (size_t)rank * sizeof(float));
            continue;
        }
        load_row((const char *)x + (size_t)(t * x_stride) * width_of(x_dtype), x_dtype, in, xr);
        shrinker_load(&s, slot, in, nslices, a, rank, w_dtype);
        shrink_token(xr, in, &s, nslices * rank, scale, out);
        for (int64_t i = 0; i < nslices; i++)
            memcpy(buf[i] + t * buf_stride, out + i * rank, (size_t)rank * sizeof(float));
    }
    shrinker_free(&s);
    free(xr);
    return status;
}

int es_lora_expand(int64_t tokens, const float *const *buf, int64_t buf_stride, int64_t nslices,
                   const void *const *b, const int64_t *out_sizes, int64_t offset, int64_t rank,
                   int w_dtype, const int64_t *slot_of, int64_t slots, void *y, int64_t y_stride,
                   int y_dtype) {
    const float *rows[MAX_SLICES];
    int64_t total, most = largest(out_sizes, nslices, &total);
    Expander e = {-1, total, malloc((size_t)(rank * total) * sizeof(float))};
    float *acc = malloc((size_t)most * sizeof(float));
    int status = 0;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = slot_of[t];
        if (slot >= slots) { status = 1; break; }
        if (slot < 0) continue;
        for (int64_t i = 0; i < nslices; i++) rows[i] = buf[i] + t * buf_stride;
        expander_load(&e, slot, nslices, b, out_sizes, rank, w_dtype, y_dtype);
        expand_token(rows, &e, nslices, out_sizes, offset, rank,
                     (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype, acc);
    }
    free(e.bt);
    free(acc);
    return status;
}

/* add_lora_linear: shrink and expand token by token, the buffer in fp32 as vLLM's. */
int es_lora_linear(int64_t tokens, int64_t in, const void *x, int64_t x_stride, int x_dtype,
                   const int64_t *slot_of, int64_t slots, int64_t nslices, const void *const *a,
                   const void *const *b, const int64_t *out_sizes, int64_t rank, int w_dtype,
                   float scale, void *y, int64_t y_stride, int y_dtype) {
    float *xr = malloc((size_t)in * sizeof(float));
    float out[MAX_SLICES * 64];
    const float *rows[MAX_SLICES];
    int64_t total, most = largest(out_sizes, nslices, &total);
    Expander e = {-1, total, malloc((size_t)(rank * total) * sizeof(float))};
    float *acc = malloc((size_t)most * sizeof(float));
    Shrinker s = shrinker_new(in, nslices * rank, w_dtype);
    int status = 0;
    for (int64_t i = 0; i < nslices; i++) rows[i] = out + i * rank;
    for (int64_t t = 0; t < tokens; t++) {
        int64_t slot = slot_of[t];
        if (slot >= slots) { status = 1; break; }
        if (slot < 0) continue;
        load_row((const char *)x + (size_t)(t * x_stride) * width_of(x_dtype), x_dtype, in, xr);
        shrinker_load(&s, slot, in, nslices, a, rank, w_dtype);
        shrink_token(xr, in, &s, nslices * rank, scale, out);
        expander_load(&e, slot, nslices, b, out_sizes, rank, w_dtype, y_dtype);
        expand_token(rows, &e, nslices, out_sizes, 0, rank,
                     (char *)y + (size_t)(t * y_stride) * width_of(y_dtype), y_dtype, acc);
    }
    shrinker_free(&s);
    free(xr);
    free(e.bt);
    free(acc);
    return status;
}
