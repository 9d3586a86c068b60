"""``relax.ext.flexiq_npu``: FlexiNPU programs from partitioned functions, as one C module.

RunCodegen hands every ``Codegen="flexiq_npu"`` function to :func:`codegen` at once.  Each
becomes one FlexiNPU program (see :mod:`.isa`); the returned runtime module is C source that
embeds the simulator (``flexinpu.c``) and the program images, and exports

* one TVM-FFI function per partitioned function (its ``global_symbol``): DPS, float32
  tensors in, float32 tensor out, runs the program on the simulated NPU;
* ``flexiq_npu_set_ratio_<tag>(i)``: writes ratio ``i``'s boundary into every program's SETB
  instruction (the ratio switch: instruction-memory patching, no recompilation);
* ``flexiq_npu_stats_<tag>(out, reset)``: per-program cycle counters into an int64 tensor
  ``[n_programs, 6]`` (the fields of ``fnpu_stats``).

TVM compiles the source with the host C compiler when the executable is built or exported,
so an exported artifact carries the NPU programs and the simulator with it.  The plan and the
machine model come from :func:`codegen_context` (``flexiq_tvm.compile`` sets it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field

import tvm
from tvm import relax

from ...transform import _graph as g
from . import isa
from .sim import HERE

EW = {"relax.add": "add", "relax.subtract": "subtract", "relax.multiply": "multiply",
      "relax.divide": "divide"}


@dataclass
class CodegenState:
    plan: object
    ratios: tuple[float, ...]
    config: isa.NPUConfig
    # filled by codegen: one entry per program, in program order
    programs: list[dict] = field(default_factory=list)
    tag: str = ""


_ACTIVE: list[CodegenState] = []


@contextlib.contextmanager
def codegen_context(plan, ratios, config: isa.NPUConfig):
    """Make ``plan`` / ``ratios`` / ``config`` the ones ``relax.ext.flexiq_npu`` compiles for;
    yields the :class:`CodegenState` that receives the program list."""
    state = CodegenState(plan, tuple(float(r) for r in ratios), config)
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()


def _composite(func: relax.Function) -> relax.Function:
    for b in g.bindings(func):
        if isinstance(b.value, relax.Function):
            return b.value
    return func


def _layer_from_function(func, state: CodegenState) -> tuple[str, bytes, dict]:
    comp = _composite(func)
    name = str(comp.attrs["Composite"])
    binds = g.bindings(comp)
    first = binds[0].value
    if name.startswith("flexiq_npu.add"):
        shape = g.shape_of(first)
        prog = isa.add_program(shape, len(shape) != 4, name.endswith("_relu"), state.ratios,
                               state.config)
        return name, prog, {"kind": "add", "layer": None, "out_shape": shape}
    layer = str(comp.attrs["flexiq_npu.layer"])
    lp = state.plan.layer(layer)
    if first.op.name == "relax.nn.conv2d":
        pad = [int(v) for v in first.attrs.padding]  # top, left, bottom, right
        lp = _with_padding(lp, (pad[0], pad[2], pad[1], pad[3]))
    epilogue = []
    for b in binds[1:]:
        v = b.value
        op = g.op_name(v)
        if op in EW:
            c = g.const_np(v.args[1])
            epilogue.append((EW[op], c if c is not None else g.const_np(v.args[0])))
        elif op == "relax.nn.relu":
            epilogue.append(("relu", None))
        elif op == "relax.clip":
            epilogue.append(("clip", (float(v.args[1].value), float(v.args[2].value))))
        else:
            raise ValueError(f"flexiq_npu codegen: unexpected {op} in {name}")
    in_shape, out_shape = g.shape_of(first.args[0]), g.shape_of(binds[-1].value)
    prog = isa.layer_program(lp, in_shape, g.shape_of(first), epilogue, state.ratios,
                             state.config)
    return name, prog, {"kind": lp.kind, "layer": layer, "out_shape": out_shape,
                        "in_shape": in_shape, "n_low": dict(lp.n_low)}


def _with_padding(lp, padding):
    return lp if tuple(lp.padding) == padding else dataclasses.replace(lp, padding=padding)


def _c_bytes(data: bytes) -> str:
    """A C string literal of ``data`` (octal escapes: never merge with a following digit)."""
    out, line = [], []
    for i, b in enumerate(data):
        line.append(f"\\{b:03o}")
        if (i + 1) % 40 == 0:
            out.append('"' + "".join(line) + '"')
            line = []
    if line:
        out.append('"' + "".join(line) + '"')
    return "\n".join(out) or '""'


_FFI_DECLS = r"""
typedef struct { int32_t device_type, device_id; } fnpu_dldevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } fnpu_dldtype;
typedef struct {
  void* data; fnpu_dldevice device; int32_t ndim; fnpu_dldtype dtype;
  int64_t* shape; int64_t* strides; uint64_t byte_offset;
} fnpu_dltensor;
typedef struct { uint64_t ref; int32_t type_index; uint32_t pad; void* deleter; } fnpu_object;
typedef struct {
  int32_t type_index; uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void* v_ptr; fnpu_object* v_obj; };
} fnpu_any;
#ifdef __cplusplus
extern "C" {
#endif
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message)
    __attribute__((weak));
static int fnpu_fail(const char* msg) {
  if (TVMFFIErrorSetRaisedFromCStr) TVMFFIErrorSetRaisedFromCStr("RuntimeError", msg);
  return -1;
}
static void* fnpu_data(const fnpu_any* a) {
  fnpu_dltensor* t = 0;
  if (a->type_index == 7) t = (fnpu_dltensor*)a->v_ptr;              /* DLTensor* */
  else if (a->type_index == 70) t = (fnpu_dltensor*)(a->v_obj + 1);  /* ffi.Tensor */
  return t ? (char*)t->data + t->byte_offset : 0;
}
"""


def _c_source(state: CodegenState, entries: list[tuple[str, bytes, int]]) -> str:
    header = (HERE / "flexinpu.h").read_text()
    sim = (HERE / "flexinpu.c").read_text().replace('#include "flexinpu.h"', "")
    parts = ["/* generated by flexiq_tvm.target.npu.codegen */",
             "#include <stdint.h>\n#include <string.h>", header, sim, _FFI_DECLS]
    for i, (_, prog, _) in enumerate(entries):
        parts.append(f"static unsigned char fnpu_prog_{i}[{len(prog) + 1}] "
                     f"__attribute__((aligned(16))) =\n{_c_bytes(prog)};")
    n = len(entries)
    parts.append(f"static fnpu_stats fnpu_st[{max(n, 1)}];")
    parts.append("static unsigned char* const fnpu_progs[] = {"
                 + ", ".join(f"fnpu_prog_{i}" for i in range(n)) + "};")
    for i, (sym, _, n_in) in enumerate(entries):
        in1 = "fnpu_data(&args[1])" if n_in == 2 else "0"
        parts.append(f"""
int __tvm_ffi_{sym}(void* self, const fnpu_any* args, int32_t n, fnpu_any* ret) {{
  (void)self; (void)ret;
  if (n != {n_in + 1}) return fnpu_fail("{sym}: expected {n_in} inputs and one output");
  int rc = fnpu_run(fnpu_prog_{i}, (const float*)fnpu_data(&args[0]), (const float*){in1},
                    (float*)fnpu_data(&args[{n_in}]), &fnpu_st[{i}], 0);
  return rc ? fnpu_fail(fnpu_error_string(rc)) : 0;
}}""")
    parts.append(f"""
int __tvm_ffi_flexiq_npu_set_ratio_{state.tag}(void* self, const fnpu_any* args, int32_t n,
                                               fnpu_any* ret) {{
  (void)self; (void)ret;
  if (n != 1 || args[0].type_index != 1) return fnpu_fail("set_ratio takes one int");
  for (int i = 0; i < {n}; ++i) {{
    int rc = fnpu_patch_boundaries(fnpu_progs[i], (int)args[0].v_int64);
    if (rc) return fnpu_fail(fnpu_error_string(rc));
  }}
  return 0;
}}
int __tvm_ffi_flexiq_npu_stats_{state.tag}(void* self, const fnpu_any* args, int32_t n,
                                           fnpu_any* ret) {{
  (void)self; (void)ret;
  if (n != 2) return fnpu_fail("stats takes (int64 tensor [n_programs, 6], reset)");
  int64_t* out = (int64_t*)fnpu_data(&args[0]);
  if (!out) return fnpu_fail("stats: first argument must be a tensor");
  for (int i = 0; i < {n}; ++i) {{
    memcpy(out + 6 * i, &fnpu_st[i], sizeof(fnpu_stats));
    if (args[1].v_int64) memset(&fnpu_st[i], 0, sizeof(fnpu_stats));
  }}
  return 0;
}}""")
    parts.append("#ifdef __cplusplus\n}\n#endif")
    return "\n".join(parts) + "\n"


@tvm.register_global_func("relax.ext.flexiq_npu")
def codegen(funcs, options, constant_names):
    """BYOC entry: every partitioned function -> one C source module (see module doc)."""
    if not _ACTIVE:
        raise RuntimeError("relax.ext.flexiq_npu needs the plan: run RunCodegen inside "
                           "flexiq_tvm.target.npu.codegen_context(plan, ratios, config) "
                           "(flexiq_tvm.compile(..., target='flexiq_npu') does)")
    state = _ACTIVE[-1]
    entries = []
    for func in funcs:
        sym = str(func.attrs["global_symbol"])
        name, prog, info = _layer_from_function(func, state)
        n_in = len(func.params)
        entries.append((sym, prog, n_in))
        state.programs.append({"symbol": sym, "pattern": name, "bytes": len(prog), **info})
    digest = hashlib.sha256(b"".join(p for _, p, _ in entries)).hexdigest()[:12]
    state.tag = digest
    src = _c_source(state, entries)
    syms = [e[0] for e in entries] + [f"flexiq_npu_set_ratio_{digest}",
                                      f"flexiq_npu_stats_{digest}"]
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(src, "c", syms, [])]
