/* FlexiNPU: a simulated systolic-array accelerator whose 8-bit MACs split into two 4-bit MACs.
 * Functional (bit-exact with flexiq_tvm.reference) and cycle-counting.  See README.md.
 *
 * A program is one little-endian byte image:
 *   header (struct fnpu_header) | instructions (n_instr x FNPU_WORDS int32) | data segment
 * Instruction word 0 is the opcode; operands are int32 words (floats as their bit pattern)
 * and byte offsets into the data segment.  Programs are position independent, so a ratio
 * switch is a write of one immediate per SETB instruction (fnpu_patch_boundaries).
 */
#ifndef FLEXINPU_H_
#define FLEXINPU_H_

#include <stddef.h>
#include <stdint.h>

#define FNPU_MAGIC 0x55504e46u /* "FNPU" */
#define FNPU_VERSION 1
#define FNPU_WORDS 32
#define FNPU_MAX_RATIOS 16

enum fnpu_op {
  FNPU_SETB = 1,  /* w1 = boundary: the first B channels of the priority order run 4-bit */
  FNPU_QUANT = 2, /* DRAM float32 -> ABUF codes (8-bit; 4-bit for low channels)          */
  FNPU_CONV = 3,  /* implicit-GEMM conv on the array: ABUF x weights -> OBUF int32       */
  FNPU_GEMM = 4,  /* GEMM on the array: ABUF [M, K] x weights [O, K] -> OBUF int32        */
  FNPU_REQ = 5,   /* OBUF int32 -> VBUF float32: acc * mult[o]                             */
  FNPU_VEC = 6,   /* VBUF elementwise: w1 = vec op, constants per channel or a tensor     */
  FNPU_LOADF = 7, /* DRAM float32 tensor -> VBUF                                           */
  FNPU_STORE = 8, /* VBUF -> DRAM float32 output                                           */
  FNPU_END = 9
};

enum fnpu_vec_op {
  FNPU_V_ADD = 1, FNPU_V_SUB = 2, FNPU_V_MUL = 3, FNPU_V_DIV = 4, /* with a constant table */
  FNPU_V_RELU = 5, FNPU_V_CLIP = 6,                                /* w3, w4: lo, hi (float) */
  FNPU_V_ADDT = 7                                                  /* + DRAM input w2        */
};

typedef struct {
  uint32_t magic, version;
  uint32_t n_instr, instr_offset, data_offset, data_len;
  /* machine model (set by the compiler from NPUConfig; the simulator checks buffers) */
  uint32_t rows, cols;          /* systolic array: rows (reduction) x cols (outputs)      */
  uint32_t dma_bytes_per_cycle; /* DRAM <-> buffers bandwidth                            */
  uint32_t vector_lanes;        /* vector unit: elements per cycle                         */
  uint32_t abuf_bytes, wbuf_bytes, obuf_bytes;
  /* ratio table: n_ratios x n_setb boundaries, and the instruction index of each SETB */
  uint32_t n_ratios, n_setb, ratio_table_offset, setb_index_offset;
  uint32_t reserved[13];
} fnpu_header; /* 128 bytes */

typedef struct {
  int64_t compute_cycles; /* array busy (tile fill + stream + drain)                  */
  int64_t dma_cycles;     /* DRAM traffic / bandwidth                                  */
  int64_t vector_cycles;  /* quantize, requantize, elementwise                         */
  int64_t total_cycles;   /* with weight-DMA / compute overlap (double-buffered WBUF)  */
  int64_t macs;           /* 8-bit-equivalent MAC operations issued                      */
  int64_t low_macs;       /* of which 4-bit                                               */
} fnpu_stats;

#ifdef __cplusplus
extern "C" {
#endif

/* Run a program.  in0/in1: the DRAM input tensors (float32; in1 may be NULL), out: the
 * output tensor.  Returns 0, or a negative error code (see fnpu_error_string).  Stats are
 * accumulated into *st when non-NULL; acc_dump (optional) receives the last CONV/GEMM's
 * int32 accumulators ([N, O, OH*OW] for CONV, [M, O] for GEMM). */
int fnpu_run(const uint8_t* prog, const float* in0, const float* in1, float* out,
             fnpu_stats* st, int32_t* acc_dump);
/* Write ratio index `ratio`'s boundaries into the SETB instructions of a program image. */
int fnpu_patch_boundaries(uint8_t* prog, int ratio);
const char* fnpu_error_string(int code);

#ifdef __cplusplus
}
#endif
#endif /* FLEXINPU_H_ */
