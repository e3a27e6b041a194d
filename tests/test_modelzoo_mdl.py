"""The Model Zoo's own checkpoints and training, against fixtures its real trainer made
(``tests/fixtures/modelzoo``: Model Zoo 2.10.0, cerebras-pytorch 2.10.0, CPU; ``make_fixtures.py``
made them): mmgraph trains from its initial .mdl with its 2.10 params file and meets its losses;
real .mdl -> HF -> .mdl and HF -> .mdl -> HF are bit for bit; .mdl written and read back equal;
its optimizer state maps onto mmgraph's; broken files are errors naming the file and key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import h5py
import pytest
import torch
from safetensors import safe_open

from mmgraph.cli import main
from mmgraph.core import mdl
from mmgraph.core.config import load_params

FIX = Path(__file__).resolve().parent / "fixtures" / "modelzoo"
PARAMS = {"mm_simple": FIX / "params_mm_simple_tiny_phase2.yaml", "llava": FIX / "params_llava_tiny_phase2.yaml"}


def mz_losses(model: str) -> list[float]:
    return json.loads((FIX / model / "losses.json").read_text())["losses"]


def model_state(path: Path) -> "OrderedDict[str, bytes]":
    """The .mdl's model state dict: key -> dtype and raw bytes (bit-for-bit comparisons)."""
    out = OrderedDict()
    for k, e in mdl.read(path).subtree("model").items():
        t = e.load()
        out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def hf_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[f"{f.parent.relative_to(folder)}:{k}"] = (str(t.dtype), t.view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mmgraph's 10 steps from each model's initial .mdl (the fixture's own params and data)."""
    root = tmp_path_factory.mktemp("mz_runs")
    cwd = os.getcwd()
    os.chdir(FIX)                       # the params' data paths are relative to their folder
    try:
        for model in ("mm_simple", "llava"):
            rc = main(["run", "CPU", "--mode", "train", "--params", str(PARAMS[model]), "--model_dir",
                       str(root / model), "--checkpoint_path", f"{model}/initial.mdl"])
            assert rc == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.parametrize("model", ["mm_simple", "llava"])
def test_ten_steps_from_the_model_zoos_initial_mdl_meet_its_losses(trained, model):
    ours = [json.loads(line)["loss"] for line in (trained / model / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    theirs = mz_losses(model)
    assert len(ours) == len(theirs) == 10
    worst = max(abs(a - b) / b for a, b in zip(ours, theirs))
    assert worst < 1e-5, (worst, ours, theirs)


def test_optimizer_state_of_the_model_zoos_step_10_is_mmgraphs(trained):
    """The .mdl's AdamW state (indexed by its param groups) lands on the weights mmgraph's own 10
    steps gave the same state to: a wrong index map or layout would be off by O(1)."""
    from safetensors.torch import load_file

    from mmgraph.convert.modelzoo import training_start
    from mmgraph.models import build_model
    from mmgraph.models.anatomy import no_weight_decay

    params = load_params(PARAMS["llava"])
    ours = load_file(str(trained / "llava" / "checkpoints" / "ckpt-000010" / "optimizer.safetensors"))
    weights = load_file(str(trained / "llava" / "checkpoints" / "ckpt-000010" / "model.safetensors"))
    trainable = sorted(k.rpartition("::")[0] for k in ours if k.endswith("::exp_avg"))
    start = training_start(FIX / "llava" / "step10.mdl", params.model, None, trainable,
                           no_weight_decay(build_model(params, device="meta")[0]), "AdamW")
    assert start.step == 10 and int(start.optimizer["step_count"]) == 10
    assert sorted(start.optimizer) == sorted(ours)
    for k, v in ours.items():
        if k != "step_count":
            assert (start.optimizer[k] - v).abs().max() <= 1e-3 * v.abs().max(), k
    for k, v in weights.items():                       # and the weights after 10 steps
        assert (start.weights[k] - v).abs().max() <= 1e-4 * v.abs().max(), k
    # model only: no step, no optimizer state
    only = training_start(FIX / "llava" / "step10.mdl", params.model, "model", trainable, frozenset(), "AdamW")
    assert only.step is None and only.optimizer is None


def test_run_continues_at_the_mdls_step_with_its_optimizer_state(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(FIX)
    raw = (PARAMS["llava"]).read_text().replace("    - LoadCheckpointStates:\n        load_checkpoint_states: model\n",
                                                "").replace("max_steps: 10", "max_steps: 11")
    (tmp_path / "p.yaml").write_text(raw)
    shutil.copytree(FIX / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "CPU", "--mode", "train", "--params", "p.yaml", "--model_dir", str(tmp_path / "m"),
                 "--checkpoint_path", str(FIX / "llava" / "step10.mdl")]) == 0
    out = capsys.readouterr().out
    assert "step 10, optimizer state" in out and "step 11/11" in out
    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [11]


@pytest.mark.parametrize("model,fmt_model", [("llava", "llava"), ("mm_simple", "mm_simple")])
def test_real_mdl_to_hf_and_back_is_bit_for_bit(tmp_path, model, fmt_model):
    src = FIX / model / ("step10.mdl" if model == "llava" else "initial.mdl")
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf", "--output-dir", str(tmp_path / "hf"),
                 str(src)]) == 0
    assert main(["convert", "--model", fmt_model, "--src-fmt", "hf", "--tgt-fmt", "cs-2.10", "--output-dir",
                 str(tmp_path / "mdl"), str(tmp_path / "hf")]) == 0
    written = tmp_path / "mdl" / "model_to_cs-2.10.mdl"
    assert list(model_state(written).items()) == list(model_state(src).items())   # keys, order, bytes
    # and HF -> .mdl -> HF
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf", "--output-dir", str(tmp_path / "hf2"),
                 str(tmp_path / "mdl")]) == 0
    assert hf_tensors(tmp_path / "hf2") == hf_tensors(tmp_path / "hf")
    # what the Model Zoo trainer needs (docs/convert.md): the model state dict with ln_f, step 0, and
    # the params in the 2.10 layout it validates
    f = mdl.read(written)
    assert list(f.tree()) == ["model", "global_step", "__metadata__"] and f.subtree("global_step") == 0
    meta = f.metadata
    assert meta["version"] == "2.10.0" and meta["model_name"] == ("LlavaModel" if model == "llava" else "MMSimpleModel")
    m = meta["params"]["trainer"]["init"]["model"]
    assert m["name"] == ("llava" if model == "llava" else "multimodal_simple")
    if model == "mm_simple":
        assert "image_encoder" in m["image_model_list"]["image_models"][0]
    for loader in meta["params"]["trainer"]["fit"].values():
        assert "bos_token_id" not in loader and "pad_token_id" not in loader


def test_mdl_written_reads_back_equal(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "model": OrderedDict([("model.a.weight", torch.randn(5, 3, generator=g)),
                              ("model.b", torch.randn(4, generator=g).to(torch.bfloat16)),
                              ("model.c", torch.randn(2, 2, generator=g).half()),
                              ("model.d", torch.arange(6).reshape(2, 3)),
                              ("model.e", torch.tensor([True, False])),
                              ("model.f", torch.tensor(3.5))]),
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999),
                                                                                 "params": [0]}]},
        "global_step": 7, "name": "x", "none": None, "flag": True, "empty": {},
    }
    path = mdl.write(tmp_path / "a.mdl", state, "2.10.0")
    assert [p.name for p in tmp_path.iterdir()] == ["a.mdl"]                  # no temporary left
    back = mdl.read(path)
    assert back.cstorch_version == "2.10.0" and back.version == 0.5
    tree = back.tree()
    assert list(tree) == list(state) and isinstance(tree["model"], OrderedDict)
    for k, v in state["model"].items():
        got = tree["model"][k].load()
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert tree["optimizer"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]
    assert torch.equal(tree["optimizer"]["state"][0]["exp_avg"].load(), torch.ones(3))
    assert tree["global_step"] == 7 and tree["name"] == "x" and tree["none"] is None and tree["flag"] is True
    assert tree["empty"] == {}


@pytest.mark.parametrize("rotary,heads,kv", [(16, 4, 4), (8, 4, 2), (4, 2, 1)])
def test_q_k_interleave_turns_rotate_half_into_rotate_every_two(rotary, heads, kv):
    """The layouts compute the same attention scores: mmgraph's rotary (halves, HF) on mmgraph's
    q/k rows equals the Model Zoo's (adjacent pairs, ``rotate_every_two``) on the converted rows,
    with partial rotary and grouped keys; and the conversion inverts exactly."""
    from mmgraph.core.mdl_layout import transform
    from mmgraph.core.config import ModelConfig
    from mmgraph.models.attention import apply_rotary, rotary_cos_sin

    hidden, head = heads * 8, 8
    cfg = ModelConfig.model_validate({
        "image_model_list": {"image_models": [{"image_model": [{"name": "ViTModel", "hidden_size": 8, "num_heads": 2,
                                                                "filter_size": 8, "num_hidden_layers": 1,
                                                                "image_size": [8, 8], "patch_size": [4, 4]}]}],
                             "global_image_projection": {"name": "FeedForwardNetwork", "input_unit": 8,
                                                         "layers_units": [hidden], "layers_activation": [None]}},
        "text_model": {"hidden_size": hidden, "num_heads": heads, "rotary_dim": min(rotary, head), "vocab_size": 16,
                       "filter_size": 16, "num_hidden_layers": 1, "attention_module": "multiquery_attention",
                       "extra_attention_params": {"num_kv_groups": kv}}})
    rd = min(rotary, head)
    key = "text_model.transformer_decoder.layers.0.self_attn.proj_{}_dense_layer.weight"
    g = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(hidden, hidden, generator=g), torch.randn(kv * head, hidden, generator=g)
    to_mz_q, to_mz_k = transform(key.format("q"), cfg, True), transform(key.format("k"), cfg, True)
    back_q = transform(key.format("q"), cfg, False)
    assert torch.equal(back_q(to_mz_q(wq)), wq)
    x = torch.randn(1, 5, hidden, generator=g)
    pos = torch.arange(5)[None]
    cos, sin = rotary_cos_sin(pos, rd, 10000.0, torch.float32)

    def ours(w, n):
        return apply_rotary((x @ w.T).view(1, 5, n, head).transpose(1, 2), cos, sin)

    def modelzoo(w, n):           # RotaryPositionEmbeddingHelper: adjacent pairs, inv_freq repeat-interleaved
        t = (x @ w.T).view(1, 5, n, head).transpose(1, 2)
        rot, rest = t[..., :rd], t[..., rd:]
        inv = 1.0 / (10000.0 ** (torch.arange(0, rd, 2).float() / rd))
        ang = (pos[0, :, None].float() * inv).repeat_interleave(2, dim=-1)
        pair = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
        return torch.cat((rot * ang.cos() + pair * ang.sin(), rest), dim=-1)

    q_ours, k_ours = ours(wq, heads), ours(wk, kv)
    q_mz, k_mz = modelzoo(to_mz_q(wq), heads), modelzoo(to_mz_k(wk), kv)
    rep = heads // kv
    s_ours = q_ours @ k_ours.repeat_interleave(rep, dim=1).transpose(-1, -2)
    s_mz = q_mz @ k_mz.repeat_interleave(rep, dim=1).transpose(-1, -2)
    assert torch.allclose(s_ours, s_mz, atol=1e-4), (s_ours - s_mz).abs().max()


def test_weight_decay_skips_biases_and_norms_as_the_model_zoo():
    from mmgraph.core.config import OptimizerConfig
    from mmgraph.models import build_model
    from mmgraph.models.anatomy import no_weight_decay
    from mmgraph.runtime.optim import Optimizer

    params = load_params(PARAMS["mm_simple"])
    model, _ = build_model(params, device="meta")
    skip = no_weight_decay(model)
    # the fixture's own record of the Model Zoo's group 1 (no decay), in mmgraph's names
    index = json.loads((FIX / "mm_simple" / "losses.json").read_text())["optimizer_state_index"]
    theirs = {e["name"].removeprefix("model.").replace("text_model.ln_f.", "text_model.transformer_decoder.norm.")
              for e in index if e["group"] == 1}
    trainable = {e["name"].removeprefix("model.").replace("text_model.ln_f.", "text_model.transformer_decoder.norm.")
                 for e in index}
    assert skip & trainable == theirs
    assert any("post_embed_ln" in n for n in skip) and any(n.endswith("norm1.bias") for n in skip)
    cfg = OptimizerConfig(optimizer_type="AdamW", learning_rate=0.1, weight_decay=0.5)
    weights = {"w": torch.ones(3), "b": torch.ones(3)}
    opt = Optimizer(cfg, weights, {"b": False})
    opt.step({"w": torch.zeros(3), "b": torch.zeros(3)})
    assert torch.allclose(weights["w"], torch.full((3,), 0.95)) and torch.equal(weights["b"], torch.ones(3))


def test_convert_reads_a_2_10_params_file(trained, tmp_path, capsys):
    """`mmgraph convert --config` with the trainer layout (before: "image_models.0.image_model
    Field required")."""
    ckpt = trained / "mm_simple" / "checkpoints" / "ckpt-000010"
    assert main(["convert", "--src-fmt", "native", "--tgt-fmt", "cs-2.10", "--config", str(PARAMS["mm_simple"]),
                 "--output-dir", str(tmp_path / "o"), str(ckpt / "model.safetensors")]) == 0, capsys.readouterr().err
    written = mdl.read(tmp_path / "o" / "model_to_cs-2.10.mdl")
    params = written.metadata["params"]
    assert params["trainer"]["init"]["model"]["text_model"]["rotary_dim"] == 16
    # the user's file kept as written (its callbacks, its schedulers), bos/pad ids never there
    assert params["trainer"]["init"]["callbacks"][1] == {"LoadCheckpointStates": {"load_checkpoint_states": "model"}}
    # the 2.3 layout for cs-2.3
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "cs-2.3", "--output-dir", str(tmp_path / "o23"),
                 str(tmp_path / "o")]) == 0
    old = mdl.read(tmp_path / "o23" / "model_to_cs-2.3.mdl").metadata
    assert old["version"] == "2.3.0" and set(old["params"]) >= {"model", "train_input", "optimizer", "runconfig"}
    assert old["params"]["optimizer"]["optimizer_type"] == "AdamW"


def test_generate_takes_an_mdl(monkeypatch, capsys):
    monkeypatch.chdir(FIX)
    image = sorted((FIX / "data" / "images").iterdir())[0]
    assert main(["generate", "--params", str(PARAMS["mm_simple"]), "--checkpoint_path", "mm_simple/initial.mdl",
                 "--image", str(image), "--prompt", "how many shapes are there ?", "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()


def _bad_copy(tmp_path: Path, edit) -> Path:
    path = tmp_path / "bad.mdl"
    shutil.copy(FIX / "mm_simple" / "initial.mdl", path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _meta(f, leaf, **change):
    name = f"{leaf}.__metadata__"
    record = json.loads(f.attrs[name])
    record[name].update(change)
    f.attrs[name] = json.dumps(record)


@pytest.mark.parametrize("edit,where,what", [
    (lambda f: f.attrs.__delitem__("__SUCCESS__"), "__SUCCESS__", "not written completely"),
    (lambda f: f.attrs.__delitem__("__version__"), "__version__", "not a cstorch.save checkpoint"),
    (lambda f: _meta(f, "global_step", __TYPE__="ObjectSerializer"), "global_step", "pickled Python object"),
    (lambda f: _meta(f, "global_step", __TYPE__="LinkedObject", key="global_step"), "global_step", "cycle"),
    (lambda f: f.__delitem__("model.model.text_model.lm_head.weight"), "model.model.text_model.lm_head.weight",
     "without a dataset"),
    (lambda f: f.attrs.__setitem__("__spec__", "[1, 2"), "__spec__", "not valid JSON"),
])
def test_broken_mdl_is_an_error_naming_file_and_key(tmp_path, capsys, edit, where, what):
    path = _bad_copy(tmp_path, edit)
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf", "--output-dir", str(tmp_path / "out"),
                 str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {path}: {where}: ") and what in err, err
    assert not (tmp_path / "out").exists()


def test_corrupt_lz4_chunk_and_foreign_files_are_errors(tmp_path, capsys):
    key = "model.model.text_model.lm_head.weight"
    path = tmp_path / "bad.mdl"
    shutil.copy(FIX / "mm_simple" / "initial.mdl", path)
    with h5py.File(path, "r+") as f:                       # overwrite one chunk's compressed bytes
        d = f[key]
        info = d.id.get_chunk_info(0)
        _, raw = d.id.read_direct_chunk(info.chunk_offset)
        d.id.write_direct_chunk(info.chunk_offset, raw[:12] + b"\xff" * (len(raw) - 12))
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf", "--output-dir", str(tmp_path / "o"),
                 str(path)]) == 2
    assert f"{path}: {key}: corrupt LZ4 chunk" in capsys.readouterr().err
    (tmp_path / "x.mdl").write_bytes(b"not hdf5")
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf", "--output-dir", str(tmp_path / "o"),
                 str(tmp_path / "x.mdl")]) == 2
    assert f"{tmp_path / 'x.mdl'}: not a Cerebras .mdl checkpoint (not an HDF5 file)" in capsys.readouterr().err
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "cs-2.11", "--output-dir", str(tmp_path / "o"),
                 str(FIX / "mm_simple" / "initial.mdl")]) == 2
    assert "--tgt-fmt: 'cs-2.11': the Model Zoo's .mdl is read and written for releases cs-2.3 to cs-2.10" \
        in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


MODELZOO_PYTHON = os.environ.get("MMGRAPH_MODELZOO_PYTHON")


@pytest.mark.skipif(not MODELZOO_PYTHON, reason="MMGRAPH_MODELZOO_PYTHON (a Model Zoo venv's python) not set")
def test_cstorch_load_reads_what_mmgraph_writes(tmp_path):
    assert main(["convert", "--src-fmt", "cs-2.10", "--tgt-fmt", "cs-2.10", "--output-dir", str(tmp_path / "o"),
                 str(FIX / "mm_simple" / "initial.mdl")]) == 0
    script = ("import sys, cerebras.pytorch as cstorch; s = cstorch.load(sys.argv[1]); "
              "print(len(s['model']), s['global_step'], s['__metadata__'][0]['version'])")
    out = subprocess.run([MODELZOO_PYTHON, "-c", script, str(tmp_path / "o" / "model_to_cs-2.10.mdl")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["81", "0", "2.10.0"]


def test_run_refuses_an_mdl_of_another_shape_before_reading_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(FIX)
    raw = PARAMS["mm_simple"].read_text().replace("vocab_size: 128", "vocab_size: 96")
    (tmp_path / "p.yaml").write_text(raw)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIX / "data", tmp_path / "data")
    assert main(["run", "CPU", "--mode", "train", "--params", "p.yaml", "--model_dir", str(tmp_path / "m"),
                 "--checkpoint_path", str(FIX / "mm_simple" / "initial.mdl"), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert (f"{FIX / 'mm_simple' / 'initial.mdl'}: model.model.text_model.embedding_layer.word_embeddings.weight: "
            "shape [128, 64] does not match the params' [96, 64]") in err, err
