"""Checkpoint conversion: round trips are bit-exact, converted weights give transformers'
logits, bad input fails cleanly with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.models import build_model
from mmgraph.runtime.checkpoint import load_weights
from tests.hf_tiny import make_hf_llava, make_llava_two_folder
from tests.test_hf_parity import hf_batch, our_batch


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor under ``folder`` (recursively), keyed by relative folder + key."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[f"{f.parent.relative_to(folder)}:{k}"] = h.get_tensor(k)
    return out


def same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bool else a[k],
                                                        b[k]), k


def convert(*args) -> int:
    return main(["convert", "--model", "mm_simple", *map(str, args)])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    llava, vision, text, projector = make_hf_llava(root / "parts")
    llava.save_pretrained(root / "tf")
    make_llava_two_folder(root / "two", llava, projector)
    return root, llava, projector


def test_list_names_the_formats(capsys):
    assert main(["convert", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("native", "hf", "llava"))


def test_transformers_folder_round_trip_is_bit_exact(hf, tmp_path):
    root, llava, _ = hf
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "tf") == 0
    assert convert("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    same_tensors(tensors(root / "tf"), tensors(tmp_path / "h"))
    # transformers loads it and computes the same logits.
    from transformers import LlavaForConditionalGeneration
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "h").eval()
    ids, attn, _, pixels = hf_batch(llava)
    with torch.no_grad():
        a = llava(input_ids=ids, pixel_values=pixels, attention_mask=attn).logits
        b = back(input_ids=ids, pixel_values=pixels, attention_mask=attn).logits
    assert torch.equal(a, b)


def test_two_folder_round_trip_is_bit_exact(hf, tmp_path):
    root, _, _ = hf
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "two") == 0
    assert convert("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    same_tensors(tensors(root / "two"), tensors(tmp_path / "h"))
    cfg = json.loads((tmp_path / "h" / "text_model" / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert (tmp_path / "h" / "text_model" / "config_lmsys.json").is_file()


def test_llava_layout_and_back(hf, tmp_path):
    root, _, _ = hf
    assert convert("--src-fmt", "hf", "--tgt-fmt", "llava", "--output-dir", tmp_path / "l", root / "tf") == 0
    text = tmp_path / "l" / "text_model_llava"
    cfg = json.loads((text / "config.json").read_text())
    # The written vision tower (the Model Zoo writes the output's image_model path).
    assert cfg["mm_vision_tower"] == str((tmp_path / "l" / "image_model").resolve())
    assert cfg["mm_projector_type"] == "mlp2x_gelu"
    with safe_open(str(text / "model.safetensors"), "pt") as h:
        assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= set(h.keys())
    assert convert("--src-fmt", "llava", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", tmp_path / "l") == 0
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n2", root / "tf") == 0
    same_tensors(tensors(tmp_path / "n"), tensors(tmp_path / "n2"))


def test_converted_weights_give_transformers_logits_and_run_eval(hf, tmp_path):
    root, llava, _ = hf
    out = tmp_path / "n"
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", out, root / "two") == 0
    params = load_params(out / "params.yaml")
    assert params.model.image_model_list.image_models[0].encoder.image_layer_idx == -2
    model, _ = build_model(params)
    model.load_state_dict(load_weights(out), strict=True)
    model.eval()
    ids, attn, loc, pixels = hf_batch(llava)
    labels = ids.masked_fill((ids == llava.config.image_token_id) | (attn == 0), -100)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pixels, attention_mask=attn, labels=labels)
        batch = our_batch(ids, attn, loc, pixels, llava.config.image_token_id)
        logits = model.compute_logits(batch["image_data"], batch["text_input_ids"], batch["image_data_loc"],
                                      batch["key_padding_mask"])
        loss = model(**batch)
    keep = attn.bool()
    torch.testing.assert_close(logits[keep], ref.logits[keep], rtol=0, atol=1e-5)
    assert abs(float(loss) - float(ref.loss)) <= 1e-5

    # mmgraph run --mode eval on the converted weights, on locally made data.
    from mmgraph.data.preprocess import Layout, preprocess
    from mmgraph.data.synth import synth
    synth(tmp_path / "data", num_train=8, num_eval=10, seed=2)
    lay = params.layout()
    preprocess(str(tmp_path / "data" / "phase1_eval.json"), str(tmp_path / "data" / "images"),
               str(tmp_path / "data" / "tokenizer"), str(tmp_path / "eval"), 1,
               Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img), progress=False)
    raw = yaml.safe_load((out / "params.yaml").read_text())
    raw["eval_input"].update(data_dir=str(tmp_path / "eval"), img_data_dir=str(tmp_path / "data" / "images"))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", "--mode", "eval", "--params", str(tmp_path / "eval.yaml"), "--model_dir",
                 str(tmp_path / "md"), "--checkpoint_path", str(out)]) == 0


def test_bin_shards_in_and_safetensors_shards_out(hf, tmp_path):
    root, llava, _ = hf
    state = {k: v for k, v in tensors(root / "tf").items()}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    (tmp_path / "bin").mkdir()
    for name, ks in shards.items():
        torch.save({k.split(":", 1)[1]: state[k] for k in ks}, tmp_path / "bin" / name)
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k.split(":", 1)[1]: name for name, ks in shards.items() for k in ks}}))
    (tmp_path / "bin" / "config.json").write_text((root / "tf" / "config.json").read_text())
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--shard-size", "100KB", "--output-dir",
                   tmp_path / "n", tmp_path / "bin") == 0
    index = json.loads((tmp_path / "n" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert convert("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    same_tensors(tensors(root / "tf"), tensors(tmp_path / "h"))


def test_phase1_projector_bin_and_initialized_projector(hf, tmp_path):
    root, llava, projector = hf
    make_llava_two_folder(tmp_path / "p1", llava, projector, bin_projector=True)
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", tmp_path / "p1") == 0
    w = load_weights(tmp_path / "n")
    assert torch.equal(w["image_model.projection.ffn.0.linear_layer.weight"], projector["linear_1.weight"])
    (tmp_path / "p1" / "text_model" / "mm_projector.bin").unlink()          # no projector: initialized
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n2", tmp_path / "p1") == 0
    w2 = load_weights(tmp_path / "n2")
    assert w2["image_model.projection.ffn.0.linear_layer.weight"].shape == projector["linear_1.weight"].shape
    assert not torch.equal(w2["image_model.projection.ffn.0.linear_layer.weight"], projector["linear_1.weight"])


def _broken(hf, tmp_path, how):
    import shutil
    root, _, _ = hf
    src = tmp_path / "src"
    shutil.copytree(root / "two", src)
    text = src / "text_model"
    if how == "missing":
        (src / "image_model" / "config.json").unlink()
        return src, f"{src / 'image_model' / 'config.json'}: does not exist"
    if how == "shape":
        cfg = json.loads((text / "config_lmsys.json").read_text())
        cfg["intermediate_size"] = 80
        (text / "config_lmsys.json").write_text(json.dumps(cfg))
        return src, (f"{text / 'model.safetensors'}: model.layers.0.mlp.up_proj.weight: shape (96, 64) does not "
                     f"match the config's (80, 64)")
    if how == "projector":
        cfg = json.loads((text / "config.json").read_text())
        cfg["mm_projector_type"] = "resampler"
        (text / "config.json").write_text(json.dumps(cfg))
        return src, f"{text / 'config.json'}: mm_projector_type: mm_projector_type 'resampler' is not supported"
    data = (text / "model.safetensors").read_bytes()
    (text / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src, f"{text / 'model.safetensors'}: model.layers.0.self_attn.q_proj.weight: cannot read safetensors file"


@pytest.mark.parametrize("how", ["missing", "shape", "projector", "truncated"])
def test_bad_input_is_named_and_leaves_nothing(hf, tmp_path, capsys, how):
    src, message = _broken(hf, tmp_path, how)
    out = tmp_path / "out"
    assert convert("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", out, src) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgraph: error: " + message), err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("name, key", [
    ("params_two_encoders_tiny.yaml", "model.image_model_list.image_models: 2 image encoders"),
    ("params_mm1_tiny.yaml", "model.image_model_list.connector: an MM1 connector"),
    ("params_cogvlm_tiny.yaml", "model.text_model.extra_ffn_params.static_dual_expert"),
])
def test_features_without_an_hf_equivalent_block_conversion(tmp_path, capsys, name, key):
    # Several images per sample (max_num_img 2 in all of these) are no longer refused
    # (tests/test_export_hf.py converts them); what transformers cannot express is.
    from tests.conftest import CONFIGS
    from mmgraph.runtime import checkpoint
    config = CONFIGS / name
    params = load_params(config)
    model, _ = build_model(params)
    src = tmp_path / "native"
    checkpoint.save(src, 1, model.state_dict(), {"step_count": torch.tensor(0)}, {"step": 0}, 1)
    ck = checkpoint.latest(src)
    assert convert("--src-fmt", "native", "--tgt-fmt", "hf", "--config", config, "--output-dir", tmp_path / "h",
                   ck / "model.safetensors") == 2
    # Named after the --config file given (it was always "params.yaml").
    assert f"mmgraph: error: {config}: {key}" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
