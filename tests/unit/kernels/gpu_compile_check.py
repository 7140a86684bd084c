"""Compile every Triton kernel in `kernels/` for an sm_90 GPU target without needing a GPU.

Run by the `gpu_compile_report` fixture in a fresh process with TRITON_INTERPRET=0:
`python gpu_compile_check.py OUT.json` writes a JSON object mapping "<kernel>[<variant>]" to "ok" or
the compiler's error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import kmeans, normalize, preprocess, topk

TARGET = GPUTarget("cuda", 90, 32)

_I32 = "i32"


def _compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int = 4) -> str:
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    except Exception as exc:  # report every failure, keep compiling the rest
        return f"{type(exc).__name__}: {exc}"[:2000]
    return "ok"


def main(path: Path) -> None:
    report: dict[str, str] = {}
    for out, pad in (("*fp16", 2), ("*fp32", 0), ("*bf16", 1)):
        sig = {"src_ptr": "*u8", "table_ptr": "*i64", "out_ptr": out}
        sig |= dict.fromkeys(["out_h", "out_w", "stride_on", "stride_oc", "stride_oh", "stride_ow"], _I32)
        sig |= dict.fromkeys(["mean0", "mean1", "mean2", "std0", "std1", "std2"], "fp32")
        consts = {"PAD_MODE": pad, "TABLE_COLS": 13, "BLOCK_H": 16, "BLOCK_W": 32}
        report[f"_preprocess_kernel[{out},pad={pad}]"] = _compile(preprocess._preprocess_kernel, sig, consts)
    for single in (True, False):
        sig = {"x_ptr": "*fp16", "out_ptr": "*fp32"}
        sig |= dict.fromkeys(["n_rows", "n_cols", "stride_xr", "stride_xc", "stride_or"], _I32) | {"eps": "fp32"}
        consts = {"BLOCK_M": 4, "BLOCK_D": 1024, "SINGLE_PASS": single}
        report[f"_l2_normalize_kernel[single={single}]"] = _compile(normalize._l2_normalize_kernel, sig, consts)
    variants = (("*fp32", True, "ieee"), ("*fp32", True, "tf32"), ("*fp16", False, "ieee"), ("*bf16", False, "ieee"))
    for dt, fp32, precision in variants:
        sig = {"x_ptr": dt, "c_ptr": dt, "labels_ptr": "*i64", "dists_ptr": "*fp32"}
        sig |= dict.fromkeys(["n", "k", "d", "stride_xn", "stride_xd", "stride_ck", "stride_cd"], _I32)
        consts = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32, "DOT_FP32": fp32, "PRECISION": precision}
        report[f"_kmeans_assign_kernel[{dt},{precision}]"] = _compile(kmeans._kmeans_assign_kernel, sig, consts, 8)

        sig = {"q_ptr": dt, "db_ptr": dt, "keys_ptr": "*i64"}
        sig |= dict.fromkeys(["n_q", "n_db", "d", "per_split", "stride_qn", "stride_qd", "stride_dbn"], _I32)
        sig |= {"stride_dbd": _I32}
        consts = {"L2": dt != "*fp16", "BLOCK_Q": 64, "BLOCK_N": 64, "BLOCK_D": 32, "K_PAD": 16}
        consts |= {"DOT_FP32": fp32, "PRECISION": precision}
        report[f"_topk_kernel[{dt},{precision}]"] = _compile(topk._topk_kernel, sig, consts, 8)
    sig = {"x_ptr": "*bf16", "order_ptr": "*i64", "starts_ptr": "*i64", "partial_ptr": "*fp32"}
    sig |= dict.fromkeys(["k", "d", "stride_xn", "stride_xd"], _I32)
    consts = {"SPLIT": 4, "BLOCK_N": 32, "BLOCK_D": 128}
    report["_segment_sum_kernel[*bf16]"] = _compile(kmeans._segment_sum_kernel, sig, consts)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
