/* A plain fp32 matrix-vector chain, the measuring stick for onnxruntime's MatMuls at batch 1
   (`python -m benchmarks generate`: `plain_c` inside `onnxruntime_matmuls_alone`).

   chain(): from the vector `in`, for each matrix j in turn, y = W_j x, then x = the first K_{j+1} values
   of y (every step starts again from `in`, so no value shrinks towards denormals); the last y ends in
   `a` when count is odd, else in `b`. Each W_j is [N_j, K_j] row-major (llama.cpp's layout: every
   output is one dot product over a contiguous row). The threads of one OpenMP team split each
   matrix's rows and meet at a barrier between matrices, as a decoding step's threads do. Plain C: the
   compiler vectorizes the dot product (-O3 -march=native). */
#include <omp.h>

double chain(int count, const float *const *w, const int *k, const int *n, const float *in, float *a, float *b, int steps,
             int threads) {
    double start = omp_get_wtime();
    for (int step = 0; step < steps; step++) {
#pragma omp parallel num_threads(threads)
        for (int j = 0; j < count; j++) {
            const float *x = j == 0 ? in : (j & 1) ? a : b;
            float *y = (j & 1) ? b : a;
#pragma omp for schedule(static)
            for (int row = 0; row < n[j]; row++) {
                const float *r = w[j] + (long)row * k[j];
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int i = 0; i < k[j]; i++) sum += r[i] * x[i];
                y[row] = sum;
            }
        }
    }
    return (omp_get_wtime() - start) / steps;
}
