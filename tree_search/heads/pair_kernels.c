/* CPU kernels of the packed nodes' (node, row) pairs of TreeSoftmaxHead (tree_search/heads/native.py builds and
 * loads them; tree_search/heads/gathered.py calls them). W holds one node per row, its F children's weight rows of
 * d numbers each, so node n's child f is W + (n * F + f) * d. Each pair reads its node's rows once and keeps its row
 * of H in L1; four children (or four pairs) share each load. No output element is written by two threads, and each
 * is summed in a fixed order, so the results do not depend on the number of threads. */
#include <stdint.h>
#include <string.h>

/* out[p, f] = W[nodes[p], f, :] . H[rows[p], :] */
void pair_scores(const float* W, const float* H, const int64_t* nodes, const int64_t* rows, float* out,
                 int64_t P, int64_t F, int64_t d, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t p = 0; p < P; p++) {
    const float* restrict h = H + rows[p] * d;
    const float* w = W + nodes[p] * F * d;
    float* o = out + p * F;
    int64_t f = 0;
    for (; f + 4 <= F; f += 4) {
      const float* restrict w0 = w + f * d;
      const float* restrict w1 = w0 + d;
      const float* restrict w2 = w1 + d;
      const float* restrict w3 = w2 + d;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      #pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < d; k++) {
        const float x = h[k];
        a0 += w0[k] * x;
        a1 += w1[k] * x;
        a2 += w2[k] * x;
        a3 += w3[k] * x;
      }
      o[f] = a0;
      o[f + 1] = a1;
      o[f + 2] = a2;
      o[f + 3] = a3;
    }
    for (; f < F; f++) {
      const float* restrict wf = w + f * d;
      float a = 0.f;
      #pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < d; k++) a += wf[k] * h[k];
      o[f] = a;
    }
  }
}

/* out[r, :] = sum over the pairs p of row r of sum_f G[p, f] * W[nodes[p], f, :]; the pairs are sorted by row,
 * row r's are start[r] .. start[r + 1] - 1 (B + 1 offsets). */
void pair_grad_rows(const float* W, const float* G, const int64_t* nodes, const int64_t* start, float* out,
                    int64_t B, int64_t F, int64_t d, int threads) {
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < B; r++) {
    float* restrict o = out + r * d;
    memset(o, 0, sizeof(float) * (size_t)d);
    for (int64_t p = start[r]; p < start[r + 1]; p++) {
      const float* w = W + nodes[p] * F * d;
      const float* g = G + p * F;
      int64_t f = 0;
      for (; f + 4 <= F; f += 4) {
        const float* restrict w0 = w + f * d;
        const float* restrict w1 = w0 + d;
        const float* restrict w2 = w1 + d;
        const float* restrict w3 = w2 + d;
        const float g0 = g[f], g1 = g[f + 1], g2 = g[f + 2], g3 = g[f + 3];
        #pragma omp simd
        for (int64_t k = 0; k < d; k++) o[k] += g0 * w0[k] + g1 * w1[k] + g2 * w2[k] + g3 * w3[k];
      }
      for (; f < F; f++) {
        const float* restrict wf = w + f * d;
        const float gf = g[f];
        #pragma omp simd
        for (int64_t k = 0; k < d; k++) o[k] += gf * wf[k];
      }
    }
  }
}

/* out[u, f, :] = sum over the pairs p of node u of G[p, f] * H[rows[p], :], for the U nodes with pairs: slot[n] is
 * node n's u (or -1), start[u] .. start[u + 1] - 1 its pairs' places once grouped; order (P) is scratch. */
void pair_grad_nodes(const float* H, const float* G, const int64_t* rows, const int64_t* nodes, const int64_t* slot,
                     const int64_t* start, int64_t* order, float* out, int64_t P, int64_t U, int64_t F, int64_t d,
                     int threads) {
  int64_t* cursor = order + P; /* U more entries after the P of order */
  for (int64_t u = 0; u < U; u++) cursor[u] = start[u];
  for (int64_t p = 0; p < P; p++) order[cursor[slot[nodes[p]]]++] = p; /* a stable counting sort by node */
  #pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
  for (int64_t u = 0; u < U; u++) {
    float* o = out + u * F * d;
    memset(o, 0, sizeof(float) * (size_t)(F * d));
    int64_t i = start[u];
    for (; i + 4 <= start[u + 1]; i += 4) {
      const int64_t p0 = order[i], p1 = order[i + 1], p2 = order[i + 2], p3 = order[i + 3];
      const float* restrict h0 = H + rows[p0] * d;
      const float* restrict h1 = H + rows[p1] * d;
      const float* restrict h2 = H + rows[p2] * d;
      const float* restrict h3 = H + rows[p3] * d;
      for (int64_t f = 0; f < F; f++) {
        const float g0 = G[p0 * F + f], g1 = G[p1 * F + f], g2 = G[p2 * F + f], g3 = G[p3 * F + f];
        float* restrict of = o + f * d;
        #pragma omp simd
        for (int64_t k = 0; k < d; k++) of[k] += g0 * h0[k] + g1 * h1[k] + g2 * h2[k] + g3 * h3[k];
      }
    }
    for (; i < start[u + 1]; i++) {
      const int64_t p = order[i];
      const float* restrict h = H + rows[p] * d;
      for (int64_t f = 0; f < F; f++) {
        const float g = G[p * F + f];
        float* restrict of = o + f * d;
        #pragma omp simd
        for (int64_t k = 0; k < d; k++) of[k] += g * h[k];
      }
    }
  }
}
