/* FlexiNPU simulator: functional (bit-exact with flexiq_tvm.reference) and cycle-counting.
 * Build: cc -O2 -ffp-contract=off -fPIC -shared flexinpu.c -o libflexinpu.so -lm
 * (-ffp-contract=off: quantize / requantize must round after every float operation, as the
 * reference does.)  The same file is compiled into every flexiq_npu runtime module. */
#include "flexinpu.h"

/* every float operation rounds on its own, as in the reference (no fused multiply-add); and
 * optimized even where the embedding build passes no -O flag (TVM compiles the runtime
 * module's C source with plain g++ -shared) */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("O2", "fp-contract=off")
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FNPU_E_MAGIC (-1)
#define FNPU_E_OP (-2)
#define FNPU_E_ABUF (-3)
#define FNPU_E_OBUF (-4)
#define FNPU_E_STATE (-5)
#define FNPU_E_INPUT (-6)
#define FNPU_E_RATIO (-7)
#define FNPU_E_MEM (-8)

const char* fnpu_error_string(int code) {
  switch (code) {
    case 0: return "ok";
    case FNPU_E_MAGIC: return "not a FlexiNPU program (bad magic or version)";
    case FNPU_E_OP: return "unknown opcode";
    case FNPU_E_ABUF: return "activation codes exceed the activation buffer";
    case FNPU_E_OBUF: return "accumulators exceed the output buffer";
    case FNPU_E_STATE: return "instruction used before its operands were produced";
    case FNPU_E_INPUT: return "missing input tensor";
    case FNPU_E_RATIO: return "ratio index out of range";
    case FNPU_E_MEM: return "out of memory";
    default: return "unknown error";
  }
}

static float f_of(int32_t w) {
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

typedef struct {
  const fnpu_header* h;
  const uint8_t* data;
  int32_t boundary;
  /* ABUF: int16 codes, layout of the quantized tensor */
  int16_t* abuf;
  int64_t a_n, a_c, a_s, a_layout;
  const int32_t* a_order; /* priority order of the quantized tensor's channels */
  uint8_t* low;           /* per channel: 1 if 4-bit at the current boundary   */
  const int8_t* a_shift;
  /* OBUF / VBUF */
  int32_t* obuf;
  float* vbuf;
  int64_t v_n, v_c, v_s, v_layout; /* VBUF geometry (elements n, c, s) */
  fnpu_stats st;
} fnpu_state;

static int64_t elem_index(int64_t n, int64_t c, int64_t s, int64_t C, int64_t S, int64_t lay) {
  return lay == 0 ? (n * C + c) * S + s : (n * S + s) * C + c;
}

static int extract4(int32_t q, int shift, int is_signed) {
  int32_t half = shift > 0 ? (1 << (shift - 1)) : 0;
  int32_t v = (q + half) >> shift; /* arithmetic shift: floor, as numpy right_shift */
  int lo = is_signed ? -8 : 0, hi = is_signed ? 7 : 15;
  return v < lo ? lo : (v > hi ? hi : v);
}

/* Cycle model of one (grouped) GEMM on the array.  M rows stream through a weight-stationary
 * array of R x C PEs.  Each PE row runs in 8-bit mode (one reduction row) or in 4-bit mode
 * (two reduction rows), so a group needs khigh + ceil(klow / 2) row slots.  A tile holds
 * ceil(slots / R) x ceil(Og / C) pieces of one group, or, when a group fits in one tile,
 * several whole groups packed block-diagonally (min(R / slots, C / Og) of them; the compiler
 * may order independent groups freely, so groups of equal slot count are packed together).
 * Weight tiles stream through a double-buffered WBUF (DMA of tile i+1 overlaps compute of
 * tile i); the accumulators (OBUF) hold Mb x C int32, so M is blocked and the weights
 * re-streamed per block.  A tile costs Mb + R + C cycles (stream, fill, drain). */
typedef struct { int64_t slots, bytes; } fnpu_group;

static int cmp_group(const void* a, const void* b) {
  const fnpu_group* x = (const fnpu_group*)a;
  const fnpu_group* y = (const fnpu_group*)b;
  return x->slots < y->slots ? -1 : (x->slots > y->slots ? 1 : 0);
}

static void gemm_cycles(fnpu_state* S, int64_t M, int64_t G, const int64_t* klow,
                        const int64_t* khigh, int64_t Og) {
  const fnpu_header* h = S->h;
  int64_t R = h->rows, Cc = h->cols, bw = h->dma_bytes_per_cycle;
  int64_t mb = (int64_t)h->obuf_bytes / (4 * (Og < Cc ? Og : Cc));
  if (mb < 1) mb = 1;
  if (mb > M) mb = M;
  /* tiles as (weight bytes) in issue order */
  fnpu_group* grp = (fnpu_group*)malloc(sizeof(fnpu_group) * (size_t)G);
  int64_t* tiles = (int64_t*)malloc(sizeof(int64_t) * (size_t)(G * 4 + 64));
  int64_t cap_tiles = G * 4 + 64, n_tiles = 0;
  if (!grp || !tiles) { free(grp); free(tiles); return; }
  for (int64_t g = 0; g < G; ++g) {
    grp[g].slots = khigh[g] + cdiv(klow[g], 2);
    grp[g].bytes = khigh[g] * Og + cdiv(klow[g] * Og, 2);
  }
  qsort(grp, (size_t)G, sizeof(fnpu_group), cmp_group);
  for (int64_t g = 0; g < G;) {
    int64_t s = grp[g].slots;
    if (s == 0) { ++g; continue; }
    if (s > R || Og > Cc) { /* one group over several tiles */
      int64_t nk = cdiv(s, R), nn = cdiv(Og, Cc);
      for (int64_t t = 0; t < nk * nn; ++t) {
        if (n_tiles == cap_tiles) {
          cap_tiles *= 2;
          tiles = (int64_t*)realloc(tiles, sizeof(int64_t) * (size_t)cap_tiles);
          if (!tiles) { free(grp); return; }
        }
        tiles[n_tiles++] = cdiv(grp[g].bytes, nk * nn);
      }
      ++g;
      continue;
    }
    int64_t per = R / s < Cc / Og ? R / s : Cc / Og, bytes = 0, k = 0;
    for (; g < G && grp[g].slots == s && k < per; ++g, ++k) bytes += grp[g].bytes;
    if (n_tiles == cap_tiles) {
      cap_tiles *= 2;
      tiles = (int64_t*)realloc(tiles, sizeof(int64_t) * (size_t)cap_tiles);
      if (!tiles) { free(grp); return; }
    }
    tiles[n_tiles++] = bytes;
  }
  int64_t compute = 0, dma = 0, total = 0, pending = -1;
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    int64_t mrows = (M - m0) < mb ? (M - m0) : mb;
    for (int64_t t = 0; t < n_tiles; ++t) {
      int64_t t_dma = cdiv(tiles[t], bw);
      int64_t t_cmp = mrows + R + Cc;
      total += pending < 0 ? t_dma : (pending > t_dma ? pending : t_dma);
      pending = t_cmp;
      compute += t_cmp;
      dma += t_dma;
    }
  }
  if (pending > 0) total += pending;
  free(grp);
  free(tiles);
  S->st.compute_cycles += compute;
  S->st.dma_cycles += dma;
  S->st.total_cycles += total;
}

static void count_vector(fnpu_state* S, int64_t elems, int64_t dma_bytes) {
  int64_t v = cdiv(elems, S->h->vector_lanes);
  int64_t d = cdiv(dma_bytes, S->h->dma_bytes_per_cycle);
  S->st.vector_cycles += v;
  S->st.dma_cycles += d;
  S->st.total_cycles += v > d ? v : d; /* streaming: DMA and vector unit overlap */
}

static int op_quant(fnpu_state* S, const int32_t* w, const float* const* ins) {
  const float* x = ins[w[1]];
  if (!x) return FNPU_E_INPUT;
  int64_t N = w[2], C = w[3], Sp = w[4], lay = w[5];
  float inv = f_of(w[6]);
  int sgn = w[7];
  const int32_t* order = (const int32_t*)(S->data + w[8]);
  const int8_t* ash = (const int8_t*)(S->data + w[9]);
  int64_t n_el = N * C * Sp;
  int64_t B = S->boundary < 0 ? 0 : (S->boundary > C ? C : S->boundary);
  int64_t bytes = N * Sp * ((C - B) + cdiv(B, 2));
  if (bytes > (int64_t)S->h->abuf_bytes) return FNPU_E_ABUF;
  free(S->abuf);
  free(S->low);
  S->abuf = (int16_t*)malloc(sizeof(int16_t) * (size_t)n_el);
  S->low = (uint8_t*)calloc((size_t)C, 1);
  if (!S->abuf || !S->low) return FNPU_E_MEM;
  for (int64_t j = 0; j < B; ++j) S->low[order[j]] = 1;
  int lo = sgn ? -127 : 0, hi = sgn ? 127 : 255;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < Sp; ++s) {
        int64_t i = elem_index(n, c, s, C, Sp, lay);
        float v = floorf(x[i] * inv + 0.5f);
        int32_t q = v < (float)lo ? lo : (v > (float)hi ? hi : (int32_t)v);
        S->abuf[i] = (int16_t)(S->low[c] ? extract4(q, ash[c], sgn) : q);
      }
  S->a_n = N, S->a_c = C, S->a_s = Sp, S->a_layout = lay;
  S->a_order = order, S->a_shift = ash;
  count_vector(S, n_el, bytes);
  return 0;
}

static int op_conv(fnpu_state* S, const int32_t* w) {
  int64_t N = w[1], C = w[2], H = w[3], W = w[4], O = w[5], KH = w[6], KW = w[7];
  int64_t SH = w[8], SW = w[9], PT = w[10], PL = w[12], DH = w[14], DW = w[15];
  int64_t G = w[16], OH = w[17], OW = w[18];
  const int8_t* w8 = (const int8_t*)(S->data + w[19]);
  const int8_t* w4 = (const int8_t*)(S->data + w[20]);
  const int8_t* wsh = (const int8_t*)(S->data + w[21]);
  if (!S->abuf || S->a_c != C || S->a_layout != 0 || S->a_s != H * W) return FNPU_E_STATE;
  int64_t cg = C / G, og = O / G, M = N * OH * OW;
  if ((int64_t)S->h->obuf_bytes < 4 * (int64_t)S->h->cols) return FNPU_E_OBUF;
  free(S->obuf);
  S->obuf = (int32_t*)malloc(sizeof(int32_t) * (size_t)(N * O * OH * OW));
  if (!S->obuf) return FNPU_E_MEM;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o) {
      int64_t g = o / og;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          int32_t acc = 0;
          for (int64_t cl = 0; cl < cg; ++cl) {
            int64_t c = g * cg + cl;
            int lowc = S->low[c];
            int32_t mul = lowc ? (1 << (S->a_shift[c] + wsh[c])) : 1;
            const int8_t* wr = (lowc ? w4 : w8) + ((o * cg + cl) * KH) * KW;
            const int16_t* ar = S->abuf + (n * C + c) * H * W;
            int32_t part = 0;
            for (int64_t kh = 0; kh < KH; ++kh) {
              int64_t ih = oh * SH - PT + kh * DH;
              if (ih < 0 || ih >= H) continue;
              for (int64_t kw = 0; kw < KW; ++kw) {
                int64_t iw = ow * SW - PL + kw * DW;
                if (iw < 0 || iw >= W) continue;
                part += (int32_t)ar[ih * W + iw] * (int32_t)wr[kh * KW + kw];
              }
            }
            acc += part * mul;
          }
          S->obuf[(n * O + o) * OH * OW + oh * OW + ow] = acc;
        }
    }
  int64_t* klow = (int64_t*)calloc((size_t)G, sizeof(int64_t));
  int64_t* khigh = (int64_t*)calloc((size_t)G, sizeof(int64_t));
  if (!klow || !khigh) return FNPU_E_MEM;
  int64_t lowc = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (S->low[c]) klow[c / cg] += KH * KW, ++lowc;
    else khigh[c / cg] += KH * KW;
  }
  gemm_cycles(S, M, G, klow, khigh, og);
  free(klow);
  free(khigh);
  S->st.macs += M * og * cg * KH * KW * G;
  S->st.low_macs += M * og * lowc * KH * KW;
  return 0;
}

static int op_gemm(fnpu_state* S, const int32_t* w) {
  int64_t M = w[1], K = w[2], O = w[3];
  const int8_t* w8 = (const int8_t*)(S->data + w[4]);
  const int8_t* w4 = (const int8_t*)(S->data + w[5]);
  const int8_t* wsh = (const int8_t*)(S->data + w[6]);
  if (!S->abuf || S->a_c != K || S->a_layout != 1 || S->a_n * S->a_s != M) return FNPU_E_STATE;
  free(S->obuf);
  S->obuf = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * O));
  if (!S->obuf) return FNPU_E_MEM;
  int32_t* mul = (int32_t*)malloc(sizeof(int32_t) * (size_t)K);
  if (!mul) return FNPU_E_MEM;
  int64_t lowk = 0;
  for (int64_t k = 0; k < K; ++k) {
    mul[k] = S->low[k] ? (1 << (S->a_shift[k] + wsh[k])) : 1;
    lowk += S->low[k];
  }
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* a = S->abuf + m * K;
    for (int64_t o = 0; o < O; ++o) {
      const int8_t* r8 = w8 + o * K;
      const int8_t* r4 = w4 + o * K;
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += (int32_t)a[k] * (int32_t)(S->low[k] ? r4[k] : r8[k]) * mul[k];
      S->obuf[m * O + o] = acc;
    }
  }
  free(mul);
  int64_t kl = lowk, kh = K - lowk;
  gemm_cycles(S, M, 1, &kl, &kh, O);
  S->st.macs += M * K * O;
  S->st.low_macs += M * lowk * O;
  return 0;
}

static int op_req(fnpu_state* S, const int32_t* w) {
  const float* mult = (const float*)(S->data + w[1]);
  int64_t lay = w[2], N = w[3], O = w[4], Sp = w[5];
  if (!S->obuf) return FNPU_E_STATE;
  int64_t n_el = N * O * Sp;
  free(S->vbuf);
  S->vbuf = (float*)malloc(sizeof(float) * (size_t)n_el);
  if (!S->vbuf) return FNPU_E_MEM;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t s = 0; s < Sp; ++s) {
        int64_t i = elem_index(n, o, s, O, Sp, lay);
        S->vbuf[i] = (float)S->obuf[i] * mult[o];
      }
  S->v_n = N, S->v_c = O, S->v_s = Sp, S->v_layout = lay;
  count_vector(S, n_el, 0);
  return 0;
}

static int op_vec(fnpu_state* S, const int32_t* w, const float* const* ins) {
  int op = w[1];
  if (!S->vbuf) return FNPU_E_STATE;
  int64_t N = S->v_n, C = S->v_c, Sp = S->v_s, lay = S->v_layout, n_el = N * C * Sp;
  float lo = f_of(w[3]), hi = f_of(w[4]);
  int per_channel = w[5];
  const float* tab = (const float*)(S->data + w[2]);
  const float* t = NULL;
  if (op == FNPU_V_ADDT) {
    t = ins[w[2]];
    if (!t) return FNPU_E_INPUT;
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < Sp; ++s) {
        int64_t i = elem_index(n, c, s, C, Sp, lay);
        float v = S->vbuf[i], k = 0.0f;
        if (op <= FNPU_V_DIV) k = per_channel ? tab[c] : tab[0];
        switch (op) {
          case FNPU_V_ADD: v = v + k; break;
          case FNPU_V_SUB: v = v - k; break;
          case FNPU_V_MUL: v = v * k; break;
          case FNPU_V_DIV: v = v / k; break;
          case FNPU_V_RELU: v = v > 0.0f ? v : 0.0f; break;
          case FNPU_V_CLIP: v = v < lo ? lo : (v > hi ? hi : v); break;
          case FNPU_V_ADDT: v = v + t[i]; break;
          default: return FNPU_E_OP;
        }
        S->vbuf[i] = v;
      }
  /* constant ops run as stages of the requantize pipeline (no extra pass); a tensor
   * operand streams in by DMA */
  if (op == FNPU_V_ADDT) count_vector(S, 0, n_el);
  return 0;
}

static int op_loadf(fnpu_state* S, const int32_t* w, const float* const* ins) {
  const float* x = ins[w[1]];
  if (!x) return FNPU_E_INPUT;
  int64_t n_el = (int64_t)w[2] * w[3] * w[4];
  free(S->vbuf);
  S->vbuf = (float*)malloc(sizeof(float) * (size_t)n_el);
  if (!S->vbuf) return FNPU_E_MEM;
  memcpy(S->vbuf, x, sizeof(float) * (size_t)n_el);
  S->v_n = w[2], S->v_c = w[3], S->v_s = w[4], S->v_layout = w[5];
  count_vector(S, 0, n_el);
  return 0;
}

static int op_store(fnpu_state* S, float* out) {
  if (!S->vbuf) return FNPU_E_STATE;
  int64_t n_el = S->v_n * S->v_c * S->v_s;
  memcpy(out, S->vbuf, sizeof(float) * (size_t)n_el);
  count_vector(S, 0, n_el);
  return 0;
}

int fnpu_run(const uint8_t* prog, const float* in0, const float* in1, float* out,
             fnpu_stats* st, int32_t* acc_dump) {
  const fnpu_header* h = (const fnpu_header*)prog;
  if (h->magic != FNPU_MAGIC || h->version != FNPU_VERSION) return FNPU_E_MAGIC;
  fnpu_state S;
  memset(&S, 0, sizeof S);
  S.h = h;
  S.data = prog + h->data_offset;
  const float* ins[2] = {in0, in1};
  const int32_t* code = (const int32_t*)(prog + h->instr_offset);
  int rc = 0;
  for (uint32_t pc = 0; pc < h->n_instr && rc == 0; ++pc) {
    const int32_t* w = code + (size_t)pc * FNPU_WORDS;
    switch (w[0]) {
      case FNPU_SETB: S.boundary = w[1]; break;
      case FNPU_QUANT: rc = op_quant(&S, w, ins); break;
      case FNPU_CONV: rc = op_conv(&S, w); break;
      case FNPU_GEMM: rc = op_gemm(&S, w); break;
      case FNPU_REQ: rc = op_req(&S, w); break;
      case FNPU_VEC: rc = op_vec(&S, w, ins); break;
      case FNPU_LOADF: rc = op_loadf(&S, w, ins); break;
      case FNPU_STORE: rc = op_store(&S, out); break;
      case FNPU_END: pc = h->n_instr; break;
      default: rc = FNPU_E_OP;
    }
    if (rc == 0 && acc_dump && (w[0] == FNPU_CONV || w[0] == FNPU_GEMM)) {
      int64_t n = w[0] == FNPU_CONV ? (int64_t)w[1] * w[5] * w[17] * w[18]
                                    : (int64_t)w[1] * w[3];
      memcpy(acc_dump, S.obuf, sizeof(int32_t) * (size_t)n);
    }
  }
  if (st) {
    st->compute_cycles += S.st.compute_cycles;
    st->dma_cycles += S.st.dma_cycles;
    st->vector_cycles += S.st.vector_cycles;
    st->total_cycles += S.st.total_cycles;
    st->macs += S.st.macs;
    st->low_macs += S.st.low_macs;
  }
  free(S.abuf);
  free(S.low);
  free(S.obuf);
  free(S.vbuf);
  return rc;
}

int fnpu_patch_boundaries(uint8_t* prog, int ratio) {
  fnpu_header* h = (fnpu_header*)prog;
  if (h->magic != FNPU_MAGIC || h->version != FNPU_VERSION) return FNPU_E_MAGIC;
  if (ratio < 0 || (uint32_t)ratio >= h->n_ratios) return FNPU_E_RATIO;
  const int32_t* table = (const int32_t*)(prog + h->data_offset + h->ratio_table_offset);
  const int32_t* where = (const int32_t*)(prog + h->data_offset + h->setb_index_offset);
  int32_t* code = (int32_t*)(prog + h->instr_offset);
  for (uint32_t i = 0; i < h->n_setb; ++i)
    code[(size_t)where[i] * FNPU_WORDS + 1] = table[(size_t)ratio * h->n_setb + i];
  return 0;
}
