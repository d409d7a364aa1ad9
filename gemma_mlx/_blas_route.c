/* cblas_sgemm for MLX's Linux CPU backend: few-row products without OpenBLAS's packing.
 *
 * MLX sends every float32 matmul to cblas_sgemm, the one-row products of decoding and the
 * few-row products of a speculative verify included. OpenBLAS's sgemm packs the whole weight
 * matrix before multiplying, so a 1..8 x K by K x N product moves about a quarter of the bytes
 * per second that streaming the weights once would (Gemma 3 270M's 671 MB tied embedding: 86 ms
 * as sgemm for 1 to 8 rows, 23 ms as sgemv for one, on 2 cores). gemma_mlx._platform loads this
 * library with global symbol scope before MLX and binds it to an OpenBLAS; MLX's cblas_sgemm
 * calls then land here:
 *   - one row or one column: the backend's sgemv;
 *   - 2..SMALL_M rows times a row-major weight (x @ W.T, as nn.Linear multiplies): our kernel,
 *     which reads each weight row once for all the rows, on up to one thread per core; except
 *     5..SMALL_M rows of a weight under CACHED_WEIGHTS values, which stays in cache between
 *     steps and where sgemm's blocking beats streaming (31B-like 448 x 1792 at 8 rows: ~195 vs
 *     ~310 us; batch 8 of that model +15-20% tokens/s, the 270M's batch 8 unchanged);
 *   - everything else: the backend's sgemm, on one thread when the product is small (under
 *     SINGLE_THREAD_WORK multiply-adds): between two products OpenBLAS's helper thread goes to
 *     sleep, and waking it and splitting the work costs more than the half it would take
 *     (tiny E2B-like batch 16, whose products are 0.5-2 M multiply-adds: a forward pass ~10%
 *     faster); larger ones keep OpenBLAS's threads.
 * MLX's output buffers are uninitialised; neither path reads C when beta is 0 (tested with
 * NaN-filled outputs).
 *
 * Built as an optional extension module (it has no Python entry point; ctypes loads it).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { SMALL_M = 8, MAX_THREADS = 16, MIN_WEIGHTS_PER_THREAD = 1 << 16 };
enum { BLOCKED_M = 5, CACHED_WEIGHTS = 1 << 20 }; /* see the rule above */
enum { SINGLE_THREAD_WORK = 1 << 22 };              /* m * n * k */

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                         const float *x, int incx, float beta, float *y, int incy);

static sgemm_fn backend_sgemm;
static sgemv_fn backend_sgemv;
typedef void (*set_threads_fn)(int threads);
typedef int (*get_threads_fn)(void);
static set_threads_fn backend_set_threads; /* NULL: the backend cannot be held to one thread */
static get_threads_fn backend_get_threads;
static int routing;
static int64_t calls[3]; /* sgemv, few-row kernel, sgemm */

/* Bind to a backend's sgemm, sgemv and thread-count functions (`set_threads`/`get_threads`
 * may be NULL); `route` = 0 forwards every product to sgemm as it is. */
void gemma_blas_bind(void *sgemm, void *sgemv, void *set_threads, void *get_threads, int route) {
    backend_sgemm = (sgemm_fn)sgemm;
    backend_sgemv = (sgemv_fn)sgemv;
    backend_set_threads = set_threads && get_threads ? (set_threads_fn)set_threads : NULL;
    backend_get_threads = (get_threads_fn)get_threads;
    __atomic_store_n(&routing, route, __ATOMIC_SEQ_CST);
}

void gemma_blas_set_routing(int route) { __atomic_store_n(&routing, route, __ATOMIC_SEQ_CST); }

/* Products run since load: as sgemv, by the few-row kernel, as sgemm. */
void gemma_blas_counts(int64_t counts[3]) {
    for (int i = 0; i < 3; ++i) counts[i] = __atomic_load_n(&calls[i], __ATOMIC_RELAXED);
}

/* C[:, n0:n1] = alpha * A @ B[n0:n1, :]^T + beta * C: A is m x k, B is a row-major weight. */
struct rows_job {
    int m, k, n0, n1, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
};

typedef float v8 __attribute__((vector_size(32)));

/* One weight row at a time, dotted with every row of A (A stays in L1): the weights stream
 * from memory once. `m` is a constant in each inlined copy, so the sums stay in registers.
 * (Four weight rows per step, or software prefetch, measured no faster here.) */
static inline __attribute__((always_inline)) void rows_kernel(const struct rows_job *j, int m) {
    const int k8 = j->k & ~7;
    for (int n = j->n0; n < j->n1; ++n) {
        const float *w = j->b + (int64_t)n * j->ldb;
        v8 acc[SMALL_M] = {{0}};
        for (int kk = 0; kk < k8; kk += 8) {
            v8 wv, av;
            memcpy(&wv, w + kk, sizeof wv); /* unaligned loads */
            for (int r = 0; r < m; ++r) {
                memcpy(&av, j->a + (int64_t)r * j->lda + kk, sizeof av);
                acc[r] += av * wv;
            }
        }
        for (int r = 0; r < m; ++r) {
            const float *ar = j->a + (int64_t)r * j->lda;
            float sum = 0.0f;
            for (int i = 0; i < 8; ++i) sum += acc[r][i];
            for (int kk = k8; kk < j->k; ++kk) sum += ar[kk] * w[kk];
            float *out = j->c + (int64_t)r * j->ldc + n;
            *out = j->beta == 0.0f ? j->alpha * sum : j->alpha * sum + j->beta * *out;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static void run_rows(const struct rows_job *j) {
    switch (j->m) {
    case 2: rows_kernel(j, 2); break;
    case 3: rows_kernel(j, 3); break;
    case 4: rows_kernel(j, 4); break;
    case 5: rows_kernel(j, 5); break;
    case 6: rows_kernel(j, 6); break;
    case 7: rows_kernel(j, 7); break;
    default: rows_kernel(j, SMALL_M); break;
    }
}

static void *run_rows_thread(void *job) {
    run_rows(job);
    return NULL;
}

/* Split the weight rows across up to one thread per core, each with enough weights to pay
 * for starting it; a thread that cannot start leaves its share to this one. */
static void few_row_product(struct rows_job job) {
    static long cores;
    if (cores == 0) cores = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t by_work = (int64_t)job.n1 * job.k / MIN_WEIGHTS_PER_THREAD;
    int threads = (int)(by_work < cores ? by_work : cores);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) {
        run_rows(&job);
        return;
    }
    struct rows_job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; ++t) {
        jobs[t] = job;
        jobs[t].n0 = (int)((int64_t)job.n1 * t / threads);
        jobs[t].n1 = (int)((int64_t)job.n1 * (t + 1) / threads);
    }
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&ids[t], NULL, run_rows_thread, &jobs[t]) == 0;
    run_rows(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_rows(&jobs[t]);
    }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    const int route = __atomic_load_n(&routing, __ATOMIC_RELAXED);
    const int shaped = route && order == ROW_MAJOR && k >= 1 && m >= 1 && n >= 1;
    if (shaped && m == 1) {
        /* c[0, :] = alpha * op(B)^T a + beta c, with a = row 0 of op(A). */
        __atomic_fetch_add(&calls[0], 1, __ATOMIC_RELAXED);
        const int inc_a = trans_a == NO_TRANS ? 1 : lda;
        if (trans_b == NO_TRANS) /* B is K x N */
            backend_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
        else /* B is N x K */
            backend_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
        return;
    }
    if (shaped && n == 1) {
        /* c[:, 0] = alpha * op(A) b + beta c, with b = column 0 of op(B). */
        __atomic_fetch_add(&calls[0], 1, __ATOMIC_RELAXED);
        const int inc_b = trans_b == NO_TRANS ? ldb : 1;
        if (trans_a == NO_TRANS) /* A is M x K */
            backend_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
        else /* A is K x M */
            backend_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
        return;
    }
    const int cached = m >= BLOCKED_M && (int64_t)n * k < CACHED_WEIGHTS;
    if (shaped && m <= SMALL_M && !cached && trans_a == NO_TRANS && trans_b != NO_TRANS) {
        __atomic_fetch_add(&calls[1], 1, __ATOMIC_RELAXED);
        few_row_product((struct rows_job){m, k, 0, n, lda, ldb, ldc, alpha, beta, a, b, c});
        return;
    }
    __atomic_fetch_add(&calls[2], 1, __ATOMIC_RELAXED);
    const int threads = route && backend_set_threads && (int64_t)m * n * k < SINGLE_THREAD_WORK
                            ? backend_get_threads()
                            : 1;
    if (threads > 1) backend_set_threads(1);
    backend_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    if (threads > 1) backend_set_threads(threads);
}
