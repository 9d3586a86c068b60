"""FlexiNPU machine parameters and program assembly (the byte images ``flexinpu.c`` runs).

Layouts and opcodes mirror ``flexinpu.h``; :func:`layer_program` turns one quantized layer
(a :class:`~flexiq_tvm.plan.LayerPlan` plus its epilogue of per-channel float ops) into a
program, :func:`add_program` a residual add.  Every program starts with one ``SETB`` whose
immediate is the layer's low-channel boundary; the header carries the boundary of every
compiled ratio, so a ratio switch rewrites that one word (``fnpu_patch_boundaries``).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

import numpy as np

from ... import reference as ref

MAGIC, VERSION, WORDS = 0x55504E46, 1, 32
HEADER_BYTES = 128
SETB, QUANT, CONV, GEMM, REQ, VEC, LOADF, STORE, END = range(1, 10)
V_ADD, V_SUB, V_MUL, V_DIV, V_RELU, V_CLIP, V_ADDT = range(1, 8)
VEC_OPS = {"add": V_ADD, "subtract": V_SUB, "multiply": V_MUL, "divide": V_DIV}
LAYOUT_NCHW, LAYOUT_ROWS = 0, 1


@dataclass(frozen=True)
class NPUConfig:
    """The simulated accelerator (see target/npu/README.md).

    rows x cols PEs, each one 8-bit MAC or two 4-bit MACs per cycle (a 4-bit PE row holds two
    reduction channels); on-chip buffers in bytes; DMA bandwidth in bytes per cycle; a vector
    unit of ``vector_lanes`` float32 lanes; ``clock_mhz`` turns cycles into modeled time.

    The default 16 x 16 array is the faster of the two 256-PE shapes measured in
    docs/results.md; an 8 x 32 array rounds the zoo's small 4-bit K tiles less (a larger share
    of the 4-bit gain) but pays twice the tile fills.
    """

    rows: int = 16
    cols: int = 16
    dma_bytes_per_cycle: int = 16
    vector_lanes: int = 16
    abuf_bytes: int = 256 * 1024
    wbuf_bytes: int = 64 * 1024
    obuf_bytes: int = 64 * 1024
    clock_mhz: float = 1000.0

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if v <= 0:
                raise ValueError(f"NPUConfig.{k}={v}; must be positive")
        if self.wbuf_bytes < 2 * self.rows * self.cols:
            raise ValueError(f"wbuf_bytes={self.wbuf_bytes} cannot double-buffer one "
                             f"{self.rows}x{self.cols} weight tile")
        if self.obuf_bytes < 4 * self.cols:
            raise ValueError(f"obuf_bytes={self.obuf_bytes} holds no row of accumulators")


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(v)))[0]


class Program:
    """An instruction list plus a data segment, assembled into one byte image."""

    def __init__(self, config: NPUConfig, n_ratios: int) -> None:
        self.config = config
        self.n_ratios = n_ratios
        self.instrs: list[list[int]] = []
        self.data = bytearray()
        self.setb: list[tuple[int, list[int]]] = []  # (instruction index, boundary per ratio)

    def const(self, arr: np.ndarray) -> int:
        """Append an array to the data segment (16-byte aligned); its byte offset."""
        while len(self.data) % 16:
            self.data.append(0)
        off = len(self.data)
        self.data += np.ascontiguousarray(arr).tobytes()
        return off

    def emit(self, op: int, *words: int) -> int:
        if len(words) >= WORDS:
            raise ValueError("too many operands")
        self.instrs.append([op, *(int(w) for w in words)])
        return len(self.instrs) - 1

    def set_boundary(self, per_ratio: list[int]) -> int:
        if len(per_ratio) != self.n_ratios:
            raise ValueError(f"{len(per_ratio)} boundaries for {self.n_ratios} ratios")
        idx = self.emit(SETB, per_ratio[0])
        self.setb.append((idx, [int(b) for b in per_ratio]))
        return idx

    def assemble(self) -> bytes:
        table = np.array([[b[r] for _, b in self.setb] for r in range(self.n_ratios)], np.int32)
        table_off = self.const(table)
        where_off = self.const(np.array([i for i, _ in self.setb], np.int32))
        code = np.zeros((len(self.instrs), WORDS), np.int32)
        for i, ins in enumerate(self.instrs):
            code[i, : len(ins)] = ins
        c = self.config
        instr_off = HEADER_BYTES
        data_off = instr_off + code.nbytes
        head = struct.pack("<20I", MAGIC, VERSION, len(self.instrs), instr_off, data_off,
                           len(self.data), c.rows, c.cols, c.dma_bytes_per_cycle,
                           c.vector_lanes, c.abuf_bytes, c.wbuf_bytes, c.obuf_bytes,
                           self.n_ratios, len(self.setb), table_off, where_off, 0, 0, 0)
        head += b"\0" * (HEADER_BYTES - len(head))
        return head + code.tobytes() + bytes(self.data)


def _channel_table(values, n_out: int) -> tuple[np.ndarray, int]:
    """Per-channel (1) or scalar (0) float32 table of an epilogue constant."""
    v = np.asarray(values, np.float32).reshape(-1)
    if v.size == 1:
        return v, 0
    if v.size != n_out:
        raise ValueError(f"epilogue constant of {v.size} values for {n_out} channels")
    return v, 1


def layer_program(lp, in_shape, out_shape, epilogue, ratios, config: NPUConfig) -> bytes:
    """Program of one covered conv2d / linear layer.

    ``epilogue``: ``[(op, values)]`` after requantization, ``op`` in add / subtract /
    multiply / divide (``values``: per output channel or a scalar), ``relu``, or ``clip``
    (``values = (lo, hi)``), applied in order in float32 as the host graph would.
    """
    prog = Program(config, len(ratios))
    prog.set_boundary([lp.n_low[f"{float(r):g}"] for r in ratios])
    c = lp.in_channels
    w_shift = np.asarray(lp.w_shift, np.int8)
    order_off = prog.const(np.asarray(lp.order, np.int32))
    ash_off = prog.const(np.asarray(lp.act_shift, np.int8))
    wsh_off = prog.const(w_shift)
    w8 = np.asarray(lp.w_codes, np.int8)
    w4 = ref.extract_bits(w8, ref.per_weight(w_shift, lp.weight_shape, lp.groups), True)
    w8_off, w4_off = prog.const(w8), prog.const(w4.astype(np.int8))
    inv = _f32_bits(np.float32(lp.act_inv_scale))
    o = lp.weight_shape[0]
    if lp.kind == "conv2d":
        n, _, h, w = in_shape
        _, _, oh, ow = out_shape
        kh, kw = lp.weight_shape[2:]
        prog.emit(QUANT, 0, n, c, h * w, LAYOUT_NCHW, inv, int(lp.act_signed), order_off, ash_off)
        t, b, left, right = lp.padding
        prog.emit(CONV, n, c, h, w, o, kh, kw, *lp.stride, t, b, left, right, *lp.dilation,
                  lp.groups, oh, ow, w8_off, w4_off, wsh_off)
        lay, geo = LAYOUT_NCHW, (n, o, oh * ow)
    else:
        m = int(np.prod(in_shape[:-1]))
        prog.emit(QUANT, 0, m, c, 1, LAYOUT_ROWS, inv, int(lp.act_signed), order_off, ash_off)
        prog.emit(GEMM, m, c, o, w8_off, w4_off, wsh_off)
        lay, geo = LAYOUT_ROWS, (m, o, 1)
    mult = np.float32(lp.act_scale) * np.asarray(lp.w_scale, np.float32)
    prog.emit(REQ, prog.const(mult.astype(np.float32)), lay, *geo)
    _emit_epilogue(prog, epilogue, o)
    prog.emit(STORE)
    prog.emit(END)
    return prog.assemble()


def _emit_epilogue(prog: Program, epilogue, n_out: int) -> None:
    for op, values in epilogue:
        if op in VEC_OPS:
            tab, per_channel = _channel_table(values, n_out)
            prog.emit(VEC, VEC_OPS[op], prog.const(tab), 0, 0, per_channel)
        elif op == "relu":
            prog.emit(VEC, V_RELU, 0, 0, 0, 0)
        elif op == "clip":
            lo, hi = values
            prog.emit(VEC, V_CLIP, 0, _f32_bits(lo), _f32_bits(hi), 0)
        else:
            raise ValueError(f"epilogue op {op!r} is not a FlexiNPU vector op")


def add_program(shape, channel_axis_last: bool, relu: bool, ratios, config: NPUConfig) -> bytes:
    """Program of an elementwise ``a + b`` (both DRAM tensors of ``shape``), optionally ReLU."""
    prog = Program(config, len(ratios))
    prog.set_boundary([0] * len(ratios))
    shape = tuple(int(d) for d in shape)
    if channel_axis_last or len(shape) < 2:
        geo = (int(np.prod(shape[:-1])) if len(shape) > 1 else 1, shape[-1], 1, LAYOUT_ROWS)
    else:
        geo = (shape[0], shape[1], int(np.prod(shape[2:])), LAYOUT_NCHW)
    prog.emit(LOADF, 0, *geo)
    prog.emit(VEC, V_ADDT, 1, 0, 0, 0)
    if relu:
        prog.emit(VEC, V_RELU, 0, 0, 0, 0)
    prog.emit(STORE)
    prog.emit(END)
    return prog.assemble()
