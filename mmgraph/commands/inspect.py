"""``mmgraph inspect MODEL_DIR``: read the compile dumps back for a person.

- no option: a summary (passes, parameters, kernels per layer, what was written);
- ``--pass NAME``: that stage's dump;
- ``--kernel ID``: one kernel of the fused program, with its ops and shapes;
- ``--diff A B``: a unified diff of two stages' dumps.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from mmgraph.core.errors import Problem, UserError, did_you_mean


def _compile_dir(model_dir: str) -> Path:
    where = Path(model_dir) / "compile"
    if not (where / "report.json").is_file():
        raise UserError(Problem(str(model_dir), None, "no compile dumps here (run mmgraph compile first)"))
    return where


def _stage_files(where: Path) -> dict[str, Path]:
    return {re.sub(r"^\d+-", "", p.stem): p for p in sorted(where.glob("[0-9][0-9]-*.txt"))}


def _stage(where: Path, name: str) -> Path:
    files = _stage_files(where)
    if name not in files:
        raise UserError(Problem(str(where), None, f"no pass named {name!r}{did_you_mean(name, files)}; "
                                f"passes: {', '.join(files)}"))
    return files[name]


def summary(where: Path) -> str:
    rep = json.loads((where / "report.json").read_text())
    p = rep["parameters"]
    lines = [f"{where}: {rep['mode']} step of {rep['params']}",
             f"parameters {p['total']:,} (trainable {p['trainable']:,}, frozen {p['frozen']:,})", "",
             f"{'pass':<14} {'ops':>7} {'kernels':>8} {'fwd FLOPs':>18} {'bwd FLOPs':>18} {'grads':>6}"]
    for s in rep["passes"]:
        kernels = s.get("kernels") if s.get("kernels") is not None else "-"
        lines.append(f"{s['name']:<14} {s['nodes']:>7} {kernels:>8} {s['flops_forward']:>18,} "
                     f"{s['flops_backward']:>18,} {s['gradients']:>6}")
    per_layer = rep.get("kernels_per_layer") or {}
    if per_layer:
        lines += ["", "kernels per layer (forward / backward):"]
        groups: dict[str, list[str]] = {}
        for layer, counts in per_layer.items():
            key = f"{counts.get('forward', 0)} / {counts.get('backward', 0)}"
            groups.setdefault(re.sub(r"layers\.\d+", "layers.*", layer) + "  " + key, []).append(layer)
        for key, layers in groups.items():
            name, counts = key.rsplit("  ", 1)
            lines.append(f"  {name:<40} {counts:>9}" + (f"  (x{len(layers)})" if len(layers) > 1 else ""))
    lines += ["", "files:"] + [f"  {k}: {v}" for k, v in rep.get("artifacts", {}).items()]
    return "\n".join(lines)


def kernel(where: Path, kid: int) -> str:
    text = _stage(where, "fusion").read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith(f"kernel k{kid} ")), None)
    if start is None:
        count = sum(1 for line in text if line.startswith("kernel k"))
        raise UserError(Problem(str(where), None, f"no kernel {kid} (kernels are 0 .. {count - 1})"))
    end = next((i for i in range(start + 1, len(text)) if not text[i].startswith("    ")), len(text))
    return "\n".join(text[start:end])


def diff(where: Path, a: str, b: str) -> str:
    pa, pb = _stage(where, a), _stage(where, b)
    lines = difflib.unified_diff(pa.read_text().splitlines(), pb.read_text().splitlines(),
                                 fromfile=pa.name, tofile=pb.name, lineterm="")
    return "\n".join(lines)


def run_inspect(model_dir: str, pass_name: str | None, kernel_id: int | None, diff_pair) -> int:
    where = _compile_dir(model_dir)
    if pass_name:
        print(_stage(where, pass_name).read_text(), end="")
    elif kernel_id is not None:
        print(kernel(where, kernel_id))
    elif diff_pair:
        print(diff(where, *diff_pair))
    else:
        print(summary(where))
    return 0
