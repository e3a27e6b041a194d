"""The program artifact: compile once, run the saved program (issue 16 item 1, item 4's
micro-batch agreement): round trips of every stage, a run that traces nothing and trains like
one that compiled, recompiles that name the changed key, ``--program``, refused tampering."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from mmgraph.compiler import artifact
from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.ir import InputKind
from mmgraph.core.target import load_target
from mmgraph.models import initial_weights, random_batch
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import ROOT
from tests.test_runtime import shards  # noqa: F401 - the module's data fixture

FIELDS = ("inputs", "outputs", "info", "mode", "precision", "history", "kernels", "refusals", "segments",
          "schedule", "remat", "world_size", "collectives")


@pytest.mark.parametrize("config, mode, world", [("params_mm_llava_tiny_phase2.yaml", "train", 2),
                                                 ("params_mm1_tiny.yaml", "eval", 1),
                                                 ("params_cogvlm_tiny.yaml", "train", 1)])
def test_every_stage_round_trips(config, mode, world, tmp_path):
    params = load_params(ROOT / "configs" / config)
    stages = compile_step(params, mode, target=load_target("cs2"), world_size=world, remat="selective")
    weights = initial_weights(params)
    for stage in stages:
        saved = artifact.save(tmp_path / stage.name, stage.program, {"mode": mode})
        back = artifact.load(saved)
        assert back.gm.code == stage.program.gm.code, stage.name
        for f in FIELDS:
            assert getattr(back, f) == getattr(stage.program, f), (stage.name, f)
        assert [type(s.kind) for s in back.inputs] == [type(s.kind) for s in stage.program.inputs]
        assert {type(i.phase) for i in back.info.values()} <= {type(i.phase) for i in stage.program.info.values()}
    if world == 1:                                   # the last one runs alike, bit for bit
        program = stages[-1].program
        size = next(s.shape[0] for s in program.inputs if s.kind == InputKind.BATCH)
        batch = random_batch(params.layout(mode), size, seed=1)
        args = [weights[s.name] if s.kind == InputKind.PARAM else batch[s.name] for s in program.inputs]
        assert all(torch.equal(a, b) for a, b in zip(program.gm(*args), back.gm(*args)))


def _params(tmp_path, shards_path, **model):  # noqa: F811
    raw = yaml.safe_load(shards_path.read_text())
    raw["model"]["text_model"].update(model)
    raw["runconfig"].update(checkpoint_steps=3)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(md):
    from safetensors.torch import load_file

    return load_file(str(md / "checkpoints" / "ckpt-000003" / "model.safetensors"))


def test_run_loads_the_compiled_program_traces_nothing_and_trains_alike(shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    import mmgraph.compiler.pipeline
    import mmgraph.compiler.trace

    params = _params(tmp_path, shards)
    plain = tmp_path / "plain"
    assert main(["run", "--params", str(params), "--model_dir", str(plain), "--max_steps", "3"]) == 0
    assert "compiling train: no saved train program" in capsys.readouterr().out
    md = tmp_path / "md"
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    report = json.loads((md / "compile" / "report.json").read_text())
    fingerprint = artifact.read_fingerprint(md / "programs" / "train")
    assert report["program_sha256"] == fingerprint["program_sha256"]

    def no_tracing(*_a, **_k):
        raise AssertionError("the run traced")
    monkeypatch.setattr(mmgraph.compiler.trace, "trace_step", no_tracing)
    monkeypatch.setattr(mmgraph.compiler.pipeline, "trace_step", no_tracing)
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"loaded program {md / 'programs' / 'train'}" in out and "nothing traced" in out
    loaded = artifact.load(md / "programs" / "train")
    assert artifact.program_sha256(loaded) == report["program_sha256"]
    from mmgraph.report.dump import program_source                 # program.py prints exactly the graph that runs
    assert program_source(loaded) == (md / "compile" / "program.py").read_text()
    a, b = _weights(plain), _weights(md)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_key_recompiles_and_says_which(shards, tmp_path, capsys):  # noqa: F811
    md = tmp_path / "md"
    assert main(["compile", "--params", str(_params(tmp_path, shards)), "--model_dir", str(md)]) == 0
    changed = _params(tmp_path, shards, max_position_embeddings=256)
    assert main(["run", "--params", str(changed), "--model_dir", str(md), "--max_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "compiling train: params key model.text_model.max_position_embeddings changed (128 -> 256)" in out
    # the run saved what it compiled: the next one loads it
    assert main(["run", "--params", str(changed), "--model_dir", str(md), "--max_steps", "2"]) == 0
    assert "loaded program" in capsys.readouterr().out


def test_program_dir_runs_a_given_artifact_and_refuses_another(shards, tmp_path, capsys):  # noqa: F811
    built = tmp_path / "built"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(built)]) == 0
    assert main(["run", "--params", str(params), "--model_dir", str(tmp_path / "a"), "--max_steps", "1",
                 "--program", str(built / "programs")]) == 0
    assert "loaded program" in capsys.readouterr().out
    assert main(["run", "--params", str(params), "--model_dir", str(tmp_path / "b"), "--max_steps", "1",
                 "--program", str(built / "programs"), "--target", "cs3"]) == 2
    err = capsys.readouterr().err
    assert "--program: does not match this run: target 'cs2' -> 'cs3'" in err


# Python a crafted artifact would run if names reached the generated code unchecked: it creates
# the file PWNED (the tests look for it after the run).
_PAYLOAD = "__import__('pathlib').Path('PWNED').touch()"


def _placeholder(doc):
    return next(n for n in doc["graph"] if n["op"] == "placeholder")


def _rename_input(doc, name):
    old = _placeholder(doc)["name"]
    text = json.dumps(doc).replace(f'"{old}"', json.dumps(name))
    doc.clear()
    doc.update(json.loads(text))


def _call(doc, target):
    return next(n for n in doc["graph"] if n.get("target") == target)


@pytest.mark.parametrize("tamper, message", [
    (lambda doc: doc["graph"][-2].update(target="builtins.eval"), "is not an allowed op"),
    (lambda doc: doc["graph"][-2].update(target="aten.no_such_op.default"), "unknown op"),
    (lambda doc: doc["fields"].update(mode={"dataclass": "Popen", "fields": {}}), "unknown type"),
    # a placeholder's target is written raw into `def forward(...)`
    (lambda doc: _placeholder(doc).update(target=f"x=({_PAYLOAD}), y"), "a placeholder is its name"),
    (lambda doc: _rename_input(doc, f"x=({_PAYLOAD}), y"), "is not a plain identifier"),
    # a keyword argument's name is written raw into the call
    (lambda doc: _call(doc, "aten.mul.Tensor")["kwargs"].update(
        {"dict": [[f"alpha=({_PAYLOAD}), beta", 1]]}), "is not a plain identifier"),
    (lambda doc: _call(doc, "aten.mul.Tensor")["kwargs"].update({"dict": [["beta", 1]]}),
     "takes no keyword argument 'beta'"),
    # a stack trace becomes a comment: a carriage return would end it
    (lambda doc: _call(doc, "aten.mul.Tensor").update(
        stack_trace=f'File "m.py", line 1, in f\n  y = 1\r{_PAYLOAD}\n'), "a source comment cannot hold"),
    (lambda doc: doc["graph"].__setitem__(0, {**doc["graph"][0], "name": "def"}), "is not a plain identifier"),
    (lambda doc: doc["graph"].append(["not", "a", "node"]), "a node is not an object"),
])
def test_a_tampered_artifact_is_refused_never_executed(shards, tmp_path, capsys, monkeypatch, tamper,  # noqa: F811
                                                        message):
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    path = md / "programs" / "train" / "program.json"
    doc = json.loads(path.read_text())
    tamper(doc)
    path.write_text(json.dumps(doc))
    # the attacker re-hashes too: the checks must hold without the hash
    monkeypatch.setattr(artifact, "_sha256", lambda *_a: "forged")
    stamp = artifact.read_fingerprint(path.parent)
    stamp["program_sha256"] = "forged"
    (path.parent / "fingerprint.json").write_text(json.dumps(stamp))
    for args in (["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1"],
                 ["run", "--params", str(params), "--model_dir", str(tmp_path / "other"), "--max_steps", "1",
                  "--program", str(md / "programs")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{path}: not a usable program artifact" in err and message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()


def test_without_its_hash_an_artifact_is_refused(shards, tmp_path, capsys):  # noqa: F811
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    where = md / "programs" / "train"
    stamp = artifact.read_fingerprint(where)
    del stamp["program_sha256"]
    (where / "fingerprint.json").write_text(json.dumps(stamp))
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1",
                 "--program", str(md / "programs")]) == 2
    assert "has no program_sha256" in capsys.readouterr().err


def test_swapped_specs_fail_the_hash(shards, tmp_path, capsys):  # noqa: F811
    """Two same-shaped gradient outputs swapped in the specs (the code unchanged) would train the
    wrong weights with exit 0: the hash covers the specs."""
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    path = md / "programs" / "train" / "program.json"
    doc = json.loads(path.read_text())
    shape_of = {i["fields"]["name"]: json.dumps(i["fields"]["shape"]) for i in doc["fields"]["inputs"]["tuple"]}
    grads = [o for o in doc["fields"]["outputs"]["tuple"] if o["fields"]["kind"] == "grad"]
    shapes: dict = {}
    pair = None
    for o in grads:
        key = shape_of[o["fields"]["target"]]
        if key in shapes:
            pair = (shapes[key], o)
            break
        shapes[key] = o
    assert pair is not None
    a, b = pair
    a["fields"]["target"], b["fields"]["target"] = b["fields"]["target"], a["fields"]["target"]
    path.write_text(json.dumps(doc))
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1",
                 "--program", str(md / "programs")]) == 2
    assert "does not hash to its fingerprint's program_sha256" in capsys.readouterr().err


@pytest.mark.parametrize("module,says", [
    ("mmgraph.models.loss", "compiling train: the compiler's source changed"),
    ("mmgraph.passes.remat", "passes changed: remat")])
def test_a_changed_compiler_recompiles_and_says_so(shards, tmp_path, capsys, monkeypatch, module, says):  # noqa: F811
    """A stale program once ran after models/loss.py changed ("nothing traced", loss 6.20
    against 3.10 fresh): the fingerprint holds the compiler's source hash, and each pass's
    version (its source hash), so a changed pass is named."""
    import importlib
    from pathlib import Path

    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    real = Path.read_bytes
    source = Path(importlib.import_module(module).__file__)
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (b"# edited" if self == source else b""))
    artifact.compiler_sha256.cache_clear()
    artifact.pass_versions.cache_clear()
    try:
        assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1"]) == 0
        assert says in capsys.readouterr().out
    finally:
        artifact.compiler_sha256.cache_clear()
        artifact.pass_versions.cache_clear()


def test_a_changed_graph_fails_its_code_hash(shards, tmp_path, capsys):  # noqa: F811
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    path = md / "programs" / "train" / "program.json"
    doc = json.loads(path.read_text())
    node = next(n for n in doc["graph"] if n.get("target") == "aten.mul.Tensor")
    node["target"] = "aten.add.Tensor"                     # still an allowed op: only the hash tells
    path.write_text(json.dumps(doc))
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1"]) == 2
    assert "does not hash to its fingerprint's program_sha256" in capsys.readouterr().err


def test_run_and_compile_resolve_auto_micro_batch_alike(shards, tmp_path, capsys):  # noqa: F811
    raw = yaml.safe_load(shards.read_text())
    raw["train_input"]["micro_batch_size"] = "auto"
    params = tmp_path / "auto.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["run", "--params", str(params), "--model_dir", str(tmp_path / "a"), "--max_steps", "1"]) == 0
    ran = re.search(r"micro_batch_size auto: (\d+) with remat (\w+)", capsys.readouterr().out).groups()
    md = tmp_path / "md"
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    compiled = re.search(r"micro_batch_size auto: (\d+) with remat (\w+)", capsys.readouterr().out).groups()
    assert ran == compiled
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"micro_batch_size auto: {compiled[0]} with remat {compiled[1]} (as compiled" in out and "loaded program" in out


def _no_space(monkeypatch, where) -> None:
    """Writes whose path ``where`` accepts fail as on a full disk (ENOSPC)."""
    import builtins
    import errno
    import io
    from pathlib import Path

    real_write, real_open = Path.write_text, builtins.open

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def write_text(self, *a, **k):
        if where(str(self)):
            full(self)
        return real_write(self, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax") and where(str(file)):
            full(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def test_a_full_disk_for_the_dumps_program_and_log_is_a_warning_in_run(shards, tmp_path, capsys,  # noqa: F811
                                                                       monkeypatch):
    """The artifact, the dumps and metrics.jsonl once ended `run` with an OSError traceback and
    left .tmp folders that broke the next run: they are a cache and a log; checkpoints still
    stop the run (tests/test_checkpoint_safety.py)."""
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    _no_space(monkeypatch, lambda p: ".tmp-" in p or p.endswith("metrics.jsonl"))
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: could not save the dumps or the compiled program (No space left on device)" in err
    assert f"warning: cannot write {md / 'metrics.jsonl'}" in err and err.count("cannot write") == 1
    assert (md / "checkpoints" / "ckpt-000003").is_dir()
    assert not list(md.rglob("*.tmp*")) and not (md / "compile").exists()
    monkeypatch.undo()
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "4"]) == 0
    assert "compiling train: no saved train program" in capsys.readouterr().out
    assert (md / "compile" / "program.py").is_file() and not list(md.rglob("*.tmp*"))


def test_a_full_disk_in_compile_is_exit_2_and_keeps_the_previous_dumps(shards, tmp_path, capsys,  # noqa: F811
                                                                       monkeypatch):
    md = tmp_path / "md"
    params = _params(tmp_path, shards)
    assert main(["compile", "--params", str(params), "--model_dir", str(md)]) == 0
    before = (md / "compile" / "report.json").read_text()
    (md / ".compile.tmp").mkdir()                     # a leftover of an older release's failed compile
    _no_space(monkeypatch, lambda p: ".tmp-" in p)
    assert main(["compile", "--params", str(params), "--model_dir", str(md), "--target", "cs3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {md}: cannot write the dumps and the program (No space left on "
                          "device)") and "Traceback" not in err
    assert (md / "compile" / "report.json").read_text() == before
    assert not list(md.rglob("*.tmp*"))
