"""`mmgraph convert` as the Model Zoo's users have it: the seed README's two commands as printed,
the Model Zoo converter's names (`cs-2.3`, `mmsimple-llava`), defaults and checks on LLaVA
configs, LLaVA-NeXT configs, explicit params keys, and outputs never written through a symlink."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmgraph.cli import main
from tests.hf_tiny import make_hf_llava, make_llava_two_folder, make_model_zoo_layout, next_llava_config
from tests.test_convert import same_tensors, tensors


def run(*args) -> int:
    return main(["convert", *map(str, args)])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    llava, _, _, projector = make_hf_llava(root / "parts")
    make_model_zoo_layout(root / "pretrained", llava)
    make_llava_two_folder(root / "two", llava, projector)
    llava.save_pretrained(root / "tf")
    return root, llava


def _two_folder_copy(zoo, dst: Path, **llava_cfg) -> Path:
    """A copy of the two-folder checkpoint with keys of text_model/config.json set (None: removed)."""
    shutil.copytree(zoo[0] / "two", dst)
    path = dst / "text_model" / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in llava_cfg.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return dst


def test_seed_commands_as_printed(zoo, tmp_path, capsys):
    root, llava = zoo
    pre = root / "pretrained"
    # Step 4 of the seed: HF (image_model/ + text_model/ with LLaVA-NeXT's config.json) to cs-2.3.
    assert run("--model", "mm_simple", "--src-fmt", "hf", "--tgt-fmt", "cs-2.3", "--output-dir", tmp_path / "cs",
               "--config", pre, pre) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "not carried over" in line]
    assert len(notes) == 1, err
    assert "'anyres' tiles" in notes[0] and "image_newline" in notes[0] and "single-tile LLaVA-1.5" in notes[0]
    # cs-2.3 is the Model Zoo's .mdl, with its params in the 2.3 layout beside it
    assert sorted(p.name for p in (tmp_path / "cs").iterdir()) == ["convert.json", "model_to_cs-2.3.mdl",
                                                                   "params_to_cs-2.3.yaml"]
    params = yaml.safe_load((tmp_path / "cs" / "params_to_cs-2.3.yaml").read_text())
    assert params["model"]["image_model_list"]["global_image_projection"]["layers_units"] == [64, 64]

    # After training: a params file and a checkpoint file elsewhere, back to HF as the seed prints it.
    shutil.copy(tmp_path / "cs" / "params_to_cs-2.3.yaml", tmp_path / "cs_config.yaml")
    (tmp_path / "run").mkdir()
    shutil.copy(tmp_path / "cs" / "model_to_cs-2.3.mdl", tmp_path / "run" / "checkpoint_10.mdl")
    assert run("--model", "mm_simple", "--src-fmt", "cs-2.3", "--tgt-fmt", "hf", "--output-dir", tmp_path / "hf",
               "--config", tmp_path / "cs_config.yaml", tmp_path / "run" / "checkpoint_10.mdl") == 0
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["image_model", "text_model"]
    got = tensors(hf)
    vision = torch.load(pre / "image_model" / "pytorch_model.bin", weights_only=True)
    text = {}
    for shard in sorted((pre / "text_model").glob("*.bin")):
        text.update(torch.load(shard, weights_only=True))
    for k, v in vision.items():
        if k.startswith("vision_model.") and not k.endswith("position_ids"):
            assert torch.equal(got.pop(f"image_model:{k}"), v), k
    for k, v in text.items():
        assert torch.equal(got.pop(f"text_model:{k}"), v), k
    assert sorted(got) == [f"text_model:model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]

    cfg = json.loads((hf / "text_model" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_hidden_size"] == 32
    assert cfg["mm_use_im_start_end"] is False and cfg["mm_use_im_patch_token"] is False
    assert cfg["tune_mm_mlp_adapter"] is False and "image_grid_pinpoints" not in cfg
    assert cfg["mm_vision_tower"] == str((hf / "image_model").resolve())   # the seed: "automatically added"
    from transformers import CLIPImageProcessor, CLIPVisionModel
    processor = json.loads((hf / "image_model" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["size"] == 32
    CLIPImageProcessor.from_pretrained(hf / "image_model")
    _, info = CLIPVisionModel.from_pretrained(hf / "image_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_list_names_the_model_zoo_names_and_they_convert(zoo, tmp_path, capsys):
    assert main(["convert", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mm_simple", "mmsimple-llava", "cs-X.Y", "native", "hf", "llava"))
    assert main(["convert", "--model", "mmsimple-llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.10",
                 "--output-dir", str(tmp_path / "n"), str(zoo[0] / "two")]) == 0
    assert main(["convert", "--model", "mmsimple-llava", "--src-fmt", "cs-2.10", "--tgt-fmt", "hf",
                 "--output-dir", str(tmp_path / "h"), str(tmp_path / "n")]) == 0
    same_tensors(tensors(zoo[0] / "two"), tensors(tmp_path / "h"))
    assert run("--src-fmt", "cs2.3", "--tgt-fmt", "hf", "--output-dir", tmp_path / "x", tmp_path / "n") == 2
    assert "--src-fmt: unknown format 'cs2.3'" in capsys.readouterr().err
    assert run("--model", "llava-next", "--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "x",
               zoo[0] / "two") == 2
    assert "mm_simple, mmsimple-llava or llava" in capsys.readouterr().err


def test_missing_projector_type_means_mlp2x_gelu(zoo, tmp_path):
    src = _two_folder_copy(zoo, tmp_path / "src", mm_projector_type=None, mm_vision_select_layer=None,
                           mm_vision_select_feature=None)
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", src) == 0
    model = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())["model"]
    proj = model["image_model_list"]["global_image_projection"]
    assert proj["layers_units"] == [64, 64] and proj["layers_activation"] == ["gelu", None]
    assert model["image_model_list"]["image_models"][0]["image_model"][0]["image_layer_idx"] == -2


@pytest.mark.parametrize("key,value,message", [
    ("mm_hidden_size", 48, "48 is not the vision tower's hidden_size (32)"),
    ("mm_use_im_start_end", True, "True: image start/end and patch tokens are not supported"),
    ("mm_use_im_patch_token", True, "True: image start/end and patch tokens are not supported"),
])
def test_model_zoo_checks_on_the_llava_config(zoo, tmp_path, capsys, key, value, message):
    src = _two_folder_copy(zoo, tmp_path / "src", **{key: value})
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", src) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {src / 'text_model' / 'config.json'}: {key}: {message}"), err
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("tune", [True, False])
def test_tune_mm_mlp_adapter_is_freeze_both_ways(zoo, tmp_path, tune):
    src = _two_folder_copy(zoo, tmp_path / "src", tune_mm_mlp_adapter=tune)
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", src) == 0
    freeze = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())["model"]["freeze"]
    assert freeze == (["^image_model.image_model_list", "^text_model"] if tune else ["^image_model.image_model_list"])
    assert run("--src-fmt", "native", "--tgt-fmt", "llava", "--output-dir", tmp_path / "l", tmp_path / "n") == 0
    assert json.loads((tmp_path / "l" / "text_model_llava" / "config.json").read_text())["tune_mm_mlp_adapter"] is tune


def test_transformers_output_gets_a_preprocessor_config(zoo, tmp_path):
    root, _ = zoo
    assert not (root / "tf" / "preprocessor_config.json").exists()
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "tf") == 0
    assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "h")
    assert processor.crop_size == {"height": 32, "width": 32}


def test_llava_next_two_folder_with_image_newline_says_what_is_dropped(zoo, tmp_path, capsys):
    root, llava = zoo
    lmsys = json.loads((root / "two" / "text_model" / "config_lmsys.json").read_text())
    src = _two_folder_copy(zoo, tmp_path / "src", **next_llava_config(lmsys, 32))
    weights = src / "text_model" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "model.image_newline": torch.randn(64)}, str(weights), {"format": "pt"})
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", src) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmgraph: note:")]
    assert len(notes) == 1 and "the image_newline weight" in notes[0] and "'spatial_unpad'" in notes[0]
    assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    cfg = json.loads((tmp_path / "h" / "text_model" / "config.json").read_text())
    assert cfg["image_aspect_ratio"] == "pad" and "image_grid_pinpoints" not in cfg and "mm_patch_merge_type" not in cfg
    same_tensors(tensors(root / "two"), tensors(tmp_path / "h"))


def test_llava_next_transformers_folder_converts_to_a_single_tile_model(zoo, tmp_path, capsys):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    _, llava = zoo
    cfg = LlavaNextConfig(vision_config=llava.config.vision_config, text_config=llava.config.text_config,
                          image_token_index=127, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    LlavaNextForConditionalGeneration(cfg).save_pretrained(tmp_path / "next")
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", tmp_path / "next") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmgraph: note:")]
    assert len(notes) == 1 and "LLaVA-NeXT: not carried over" in notes[0] and "image_newline weight" in notes[0]
    assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    written = json.loads((tmp_path / "h" / "config.json").read_text())
    assert written["architectures"] == ["LlavaForConditionalGeneration"]
    expected = {k: v for k, v in tensors(tmp_path / "next").items() if not k.endswith("image_newline")}
    same_tensors(expected, tensors(tmp_path / "h"))


EXPLICIT = {  # key path in the model section -> the value the Hugging Face model requires
    ("image_model_list", "image_models", 0, "image_model", 0, "use_conv_patchified_embedding"): True,
    ("image_model_list", "image_models", 0, "image_model", 0, "image_layer_idx"): -2,
    ("image_model_list", "image_models", 0, "image_model", 0, "use_ffn_bias"): True,
    ("image_model_list", "image_models", 0, "image_model", 0, "use_post_embed_layer_norm"): True,
    ("image_model_list", "image_models", 0, "image_model", 0, "use_final_layer_norm"): True,
    ("image_model_list", "global_image_projection", "use_bias"): True,
    ("text_model", "use_ffn_bias"): False,
    ("text_model", "share_embedding_weights"): False,
    ("mixed_precision",): False,
    ("loss_weight",): 1.0,
    ("loss_scaling",): "num_tokens",
}


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_converted_params_set_the_keys_whose_defaults_differ(zoo, tmp_path):
    root, llava = zoo
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "two") == 0
    params = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())
    for path, value in EXPLICIT.items():
        assert _at(params["model"], path) == value, path
    assert params["train_input"]["shuffle_seed"] == 1 and params["eval_input"]["shuffle_seed"] == 1
    # 16-bit weights: mixed precision in the saved dtype.
    copy.deepcopy(llava).half().save_pretrained(tmp_path / "fp16")
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n16", tmp_path / "fp16") == 0
    model = yaml.safe_load((tmp_path / "n16" / "params.yaml").read_text())["model"]
    assert model["mixed_precision"] is True and model["fp16_type"] == "float16"


def test_params_without_the_weight_decided_keys_still_convert(zoo, tmp_path, capsys):
    root, _ = zoo
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "two") == 0
    params = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())
    del params["model"]["image_model_list"]["image_models"][0]["image_model"][0]["use_conv_patchified_embedding"]
    del params["model"]["image_model_list"]["global_image_projection"]["use_bias"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(params))
    assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--config", tmp_path / "old.yaml", "--output-dir",
               tmp_path / "h", tmp_path / "n") == 0
    err = capsys.readouterr().err
    assert f"mmgraph: note: {tmp_path / 'old.yaml'}: model.image_model_list.image_models[0].image_model[0]." \
           "use_conv_patchified_embedding: not set; True from the weights" in err
    assert "global_image_projection.use_bias: not set; True from the weights" in err
    same_tensors(tensors(root / "two"), tensors(tmp_path / "h"))


def test_errors_name_the_config_file_given(zoo, tmp_path, capsys):
    root, _ = zoo
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "two") == 0
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert run("--src-fmt", "cs-2.3", "--tgt-fmt", "hf", "--config", tmp_path / "bad.yaml", "--output-dir",
               tmp_path / "h", tmp_path / "n" / "model.safetensors") == 2
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {tmp_path / 'bad.yaml'}: not a valid YAML file")
    params = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())
    params["model"]["text_model"]["num_heads"] = 0
    (tmp_path / "cs_config.yaml").write_text(yaml.safe_dump(params))
    assert run("--src-fmt", "cs-2.3", "--tgt-fmt", "hf", "--config", tmp_path / "cs_config.yaml", "--output-dir",
               tmp_path / "h", tmp_path / "n" / "model.safetensors") == 2
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {tmp_path / 'cs_config.yaml'}: model:")
    assert run("--src-fmt", "hf", "--tgt-fmt", "cs-2.3", "--config", tmp_path / "cs_config.yaml", "--output-dir",
               tmp_path / "h", root / "two") == 2
    assert "cs_config.yaml: --config for an image_model/ + text_model/ source is the folder" in capsys.readouterr().err
    (tmp_path / "checkpoint_1.mdl").write_bytes(b"\x89HDF")
    assert run("--src-fmt", "cs-2.3", "--tgt-fmt", "hf", "--config", tmp_path / "n" / "params.yaml", "--output-dir",
               tmp_path / "h", tmp_path / "checkpoint_1.mdl") == 2
    assert "checkpoint_1.mdl: not a Cerebras .mdl checkpoint (not an HDF5 file)" in capsys.readouterr().err
    assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--config", tmp_path / "n" / "params.yaml", "--output-dir",
               tmp_path / "h", tmp_path / "checkpoint_1.mdl") == 2
    assert "checkpoint_1.mdl: a Cerebras .mdl checkpoint: convert it with --src-fmt cs-X.Y" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("how", ["link_to_empty_dir", "dangling_link", "link_inside"])
def test_output_through_a_symlink_is_refused(zoo, tmp_path, capsys, how):
    target = tmp_path / "elsewhere"
    out = tmp_path / "out"
    if how == "link_to_empty_dir":
        target.mkdir()
        out.symlink_to(target)
    elif how == "dangling_link":
        out.symlink_to(target)
    else:
        target.mkdir()
        out.mkdir()
        (out / "model.safetensors").symlink_to(target / "model.safetensors")
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", out, zoo[0] / "two") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {out}: "), err
    assert ("is a symlink" in err) if how != "link_inside" else ("exists and is not empty" in err)
    assert not target.exists() or not any(target.iterdir())
    assert not list(tmp_path.glob(".out.*"))


@contextlib.contextmanager
def model_zoo_defaults():
    """mmgraph's config classes with the Model Zoo's defaults for the keys another change moves
    to them (Linear patch embedding, FFN without bias, mixed precision, loss_weight 0.0)."""
    from mmgraph.core.config import model as m

    flips = [(m.ViTModelConfig, "use_conv_patchified_embedding", False),
             (m.FeedForwardNetworkConfig, "use_bias", False),
             (m.ModelConfig, "mixed_precision", True), (m.ModelConfig, "loss_weight", 0.0)]
    chain = (m.ViTModelConfig, m.FeedForwardNetworkConfig, m.ImageModelEntry, m.ImageModelListConfig, m.ModelConfig)
    saved = [(cls.model_fields[key], cls.model_fields[key].default) for cls, key, _ in flips]
    try:
        for cls, key, value in flips:
            cls.model_fields[key].default = value
        for cls in chain:
            cls.model_rebuild(force=True)
        yield
    finally:
        for field, default in saved:
            field.default = default
        for cls in chain:
            cls.model_rebuild(force=True)


def test_converted_params_mean_the_same_model_under_either_defaults(zoo, tmp_path):
    from mmgraph.core.config import ModelConfig

    root, _ = zoo
    assert run("--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", tmp_path / "n", root / "two") == 0
    model = yaml.safe_load((tmp_path / "n" / "params.yaml").read_text())["model"]
    ours = ModelConfig.model_validate(model).model_dump()
    with model_zoo_defaults():
        theirs = ModelConfig.model_validate(model).model_dump()
        # ... and the flip is real: without the explicit keys the model would differ.
        bare = copy.deepcopy(model)
        del bare["image_model_list"]["global_image_projection"]["use_bias"], bare["mixed_precision"]
        assert ModelConfig.model_validate(bare).model_dump() != ours
        # Reading those params back for conversion still works (and round-trips bit for bit).
        assert run("--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "h", tmp_path / "n") == 0
    assert ours == theirs
    same_tensors(tensors(root / "two"), tensors(tmp_path / "h"))
