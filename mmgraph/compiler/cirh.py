"""The vendor's check: Cerebras's ``torch-cirh-opt`` lowers the program's MLIR to CIRH.

cstorch runs this tool on every graph it traces, before anything goes to a cluster
(``torch-cirh-opt -refine-types -torch-to-cirh-pipeline``: canonicalize,
replace-parameters-with-constants, convert-torch-to-cirh, cse, reject-unsupported-cirh). It ships
in the ``cerebras-pytorch`` wheel (``cerebras/pytorch/lib/torch-cirh-opt``, statically linked
against LLVM 14: it needs only the C and C++ runtimes); ``make cirh-tool`` unpacks it into
``.tools/cirh/``. mmgraph looks for it in ``$MMGRAPH_CIRH_OPT``, then on ``PATH``, then in
``.tools/cirh/`` of the source tree; ``MMGRAPH_CIRH_OPT=off`` skips the check.

Its MLIR is older than torch-mlir's: a function is ``func``, not ``func.func``
(``legacy_mlir``). Mixed-precision programs are lowered in ``strict-soundness-mode`` (which also
refuses float32 matmuls, so float32 programs are not).
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.fx as fx

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import Program
from mmgraph.core.ops import mlir_name

TOOL = "torch-cirh-opt"
ENV = "MMGRAPH_CIRH_OPT"
REPO_TOOL = Path(__file__).resolve().parents[2] / ".tools" / "cirh" / TOOL     # mmgraph/compiler/ -> the source tree
PIPELINE = "-torch-to-cirh-pipeline"
STRICT = "-torch-to-cirh-pipeline=strict-soundness-mode"
TIMEOUT_S = 900


@dataclass(frozen=True)
class Found:
    path: Optional[Path]      # None: not found or switched off
    how: str                  # where it was found, or why there is none


def find_tool() -> Found:
    """``$MMGRAPH_CIRH_OPT`` (a path, or ``off``), else ``torch-cirh-opt`` on PATH, else the
    source tree's ``.tools/cirh/`` (``make cirh-tool``)."""
    env = os.environ.get(ENV)
    if env is not None and env.strip().lower() in ("off", "0", "no", "none", ""):
        return Found(None, f"{ENV}={env}: the CIRH check is switched off")
    if env:
        path = Path(env)
        if path.is_file() and os.access(path, os.X_OK):
            return Found(path, f"{ENV}={env}")
        return Found(None, f"{ENV}={env} is not an executable file")
    on_path = shutil.which(TOOL)
    if on_path:
        return Found(Path(on_path), f"PATH: {on_path}")
    if REPO_TOOL.is_file() and os.access(REPO_TOOL, os.X_OK):
        return Found(REPO_TOOL, str(REPO_TOOL))
    return Found(None, f"{TOOL} not found ({ENV}, PATH, {REPO_TOOL.parent}; `make cirh-tool` unpacks it "
                       f"from cerebras-pytorch 2.10.0)")


def wants_check(op_set_name: Optional[str]) -> bool:
    """Whether a target with this op set is lowered by the CIRH tool (the wafer targets)."""
    return bool(op_set_name) and op_set_name.startswith("cirh")


def legacy_mlir(text: str) -> str:
    """torch-mlir's text in the tool's older MLIR: ``func.func`` was ``func``."""
    return re.sub(r"\bfunc\.func\b", "func", text)


@dataclass(frozen=True)
class Lowering:
    ok: bool
    command: tuple[str, ...]      # as run, with the input named program.mlir
    strict: bool
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)   # CIRH ops (the tool's -print-op-stats)
    text: str = ""                # the CIRH module
    error: str = ""               # the tool's first error (message only)
    op: str = ""                  # the op it names
    line: int = 0                 # its line in program.mlir
    stderr: str = ""

    @property
    def total_ops(self) -> int:
        return sum(self.op_counts.values())


def lower(tool: Path, mlir_text: str, strict: bool = False, timeout_s: float = TIMEOUT_S) -> Lowering:
    """Run the tool's Torch -> CIRH pipeline on ``mlir_text`` (torch-mlir's output)."""
    pipeline = STRICT if strict else PIPELINE
    with tempfile.TemporaryDirectory(prefix="mmgraph-cirh-") as tmp:
        src, out = Path(tmp) / "program.mlir", Path(tmp) / "program.cirh.mlir"
        src.write_text(legacy_mlir(mlir_text))
        command = [str(tool), str(src), "-refine-types", pipeline, "-print-op-stats", "-o", str(out)]
        shown = (TOOL, "program.mlir", "-refine-types", pipeline, "-print-op-stats", "-o", "program.cirh.mlir")
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Lowering(False, shown, strict, time.perf_counter() - start,
                            error=f"no answer in {timeout_s:.0f} s")
        seconds = time.perf_counter() - start
        stderr = done.stderr.replace(str(src), "program.mlir")
        if done.returncode != 0 or not out.is_file():
            error, op, line = first_error(stderr, done.returncode)
            return Lowering(False, shown, strict, seconds, error=error, op=op, line=line, stderr=stderr)
        return Lowering(True, shown, strict, seconds, op_stats(stderr), out.read_text(), stderr=stderr)


_STAT = re.compile(r"^\s*(cirh\.[\w.]+)\s*,\s*(\d+)\s*$")
_ERROR = re.compile(r"^(?:[^\s:]*:(\d+)(?::\d+)?: )?error: (.*)$")
_OP = re.compile(r"(torch\.(?:aten|prim|operator)\.?[\w.]*|cirh\.\w+)")


def op_stats(stderr: str) -> dict[str, int]:
    """CIRH op counts from ``-print-op-stats`` ("  cirh.MatMul , 62")."""
    out = {}
    for line in stderr.splitlines():
        m = _STAT.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return dict(sorted(out.items()))


def first_error(stderr: str, returncode: int) -> tuple[str, str, int]:
    """(message, op it names, line in the input) of the tool's first error."""
    lines = stderr.splitlines()
    for i, text in enumerate(lines):
        m = _ERROR.match(text.strip())
        if not m:
            continue
        message = m.group(2).strip()
        line = int(m.group(1)) if m.group(1) else 0
        quoted = re.search(r"'(torch\.[\w.]+)'", message) or re.search(r"compiles to (torch\.[\w.]+)", message)
        op = quoted.group(1) if quoted else ""
        if not op and i + 1 < len(lines):                  # the source line under the message
            found = re.search(r"= (torch\.[\w.]+)", lines[i + 1])
            op = found.group(1) if found else ""
        if returncode < 0:
            message += f" (the tool aborted: signal {-returncode})"
        return message, op, line
    tail = next((t for t in reversed(lines) if t.strip()), "")
    return (tail or f"exit status {returncode}, no message"), "", 0


def node_at_line(program: Program, mlir_text: str, line: int) -> Optional[fx.Node]:
    """The program's op that became the Torch op on ``line`` of ``mlir_text``: torch-mlir writes
    one Torch op per call, in graph order (constants and lists aside); checked by name."""
    lines = mlir_text.splitlines()
    if not 0 < line <= len(lines):
        return None
    ops = [n for n in program.ops() if n.target is not operator.getitem]
    k = -1
    for text in lines[:line]:
        if re.search(r"= torch\.(aten\.|operator )", text):
            k += 1
    if not 0 <= k < len(ops):
        return None
    node = ops[k]
    found = re.search(r"= torch\.operator \"([\w.]+)\"|= (torch\.aten\.[\w.]+)", lines[line - 1])
    name = (found.group(1) or found.group(2)) if found else ""
    return node if name and name == mlir_name(node.target) else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Check:
    """What ``mmgraph compile`` learnt from the tool about one program."""

    found: Found
    checked: str                  # which program was lowered: program.mlir, or the one before data_parallel
    lowering: Optional[Lowering] = None

    def summary(self) -> str:
        """One line for ``mmgraph compile``'s output."""
        if self.lowering is None:
            return f"CIRH check skipped: {self.found.how}"
        low = self.lowering
        top = ", ".join(f"{k.removeprefix('cirh.')} {v:,}" for k, v in
                        sorted(low.op_counts.items(), key=lambda kv: -kv[1])[:6])
        mode = ", strict-soundness-mode" if low.strict else ""
        return (f"CIRH ({TOOL}{mode}): {self.checked} lowers to {low.total_ops:,} CIRH ops "
                f"({top}, ...) in {low.seconds:.2f} s; program.cirh.mlir")

    def report(self) -> dict:
        """``report.json`` → ``cirh``."""
        return cirh_report(self.found, self.lowering, self.checked)


def check_program(program: Program, checked: str, mlir_text: str, where: str, target_name: str) -> Check:
    """Lower ``program`` (its MLIR ``mlir_text``) with the tool when there is one; a refusal is
    a UserError quoting the tool's first error and naming the op (node, layer, module)."""

    found = find_tool()
    if found.path is None:
        return Check(found, checked)
    low = lower(found.path, mlir_text, strict=program.precision != "fp32")
    if low.ok:
        return Check(found, checked, low)
    node = node_at_line(program, legacy_mlir(mlir_text), low.line) if low.line else None
    at = f" at program.mlir:{low.line}" if low.line else ""
    what = f"op {low.op}" if low.op else "the program"
    if node is not None:
        info = program.info[node.name]
        what += f" (node %{node.name}, layer {info.layer}, module {info.module or 'the model forward'})"
    mode = " in strict-soundness mode (mixed precision)" if low.strict else ""
    raise UserError(Problem(where, None, f"{TOOL} refuses {checked} for {target_name}{mode}: "
                            f"{what}{at}: {low.error} (with {ENV}=off, compile writes program.mlir unchecked; the "
                            f"tool's command: {' '.join(low.command)}, on it with func.func written func)"))


def cirh_report(found: Found, lowering: Optional[Lowering], checked: str) -> dict:
    """``report.json`` → ``cirh``."""
    out = {"tool": str(found.path) if found.path else None, "found": found.how, "checked": checked}
    if found.path is not None:
        out["tool_sha256"] = sha256(found.path)
    if lowering is not None:
        out.update({"ok": lowering.ok, "command": " ".join(lowering.command), "strict_soundness_mode": lowering.strict,
                    "seconds": round(lowering.seconds, 3), "ops": lowering.op_counts, "total_ops": lowering.total_ops,
                    **({"error": lowering.error, "op": lowering.op} if not lowering.ok else {})})
    return out
