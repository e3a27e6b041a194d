"""H5 data both ways with the Model Zoo, and preprocessing like the Model Zoo's (issue 15, 3 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.data.preprocess import Encoder, Layout, Style, preprocess
from mmgraph.runtime.data import make_loader
from mmgraph.data.transforms import build_transforms
from mmgraph.data.synth import synth
from tests.conftest import TINY1, TINY2
from tests.modelzoo_h5 import ModelZooReader, write_modelzoo_shard

ZOO = Path(__file__).parent / "data" / "modelzoo"
VICUNA_JINJA = ("{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. The "
                "assistant gives helpful, detailed, and polite answers to the user's questions. "
                "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    synth(root, num_train=24, num_eval=4, seed=2)
    return root


def params_for(tmp_path: Path, data_dir: Path, images: Path, base: Path = TINY2, **train) -> Path:
    raw = yaml.safe_load(base.read_text())
    raw["train_input"].update(data_dir=str(data_dir), img_data_dir=str(images), shuffle=False, **train)
    raw.pop("eval_input", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tiny_layout() -> Layout:
    lay = load_params(TINY2).layout()
    return Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img)


# -- the Model Zoo's files into mmgraph ------------------------------------------------------------

def _zoo_fixture(world: Path, folder: Path) -> int:
    """Rows made by mmgraph's encoder, written as the Model Zoo's writer lays them out."""
    lay = tiny_layout()
    enc = Encoder(str(world / "tokenizer"), 2, lay, str(world / "images"))
    samples = []
    for s in json.loads((world / "phase2_train.json").read_text())[:10]:
        e = enc.encode(s)
        positions = [(int(loc[0]), int(loc[-1]) + 1) for loc in e.img_loc if loc[0] < lay.max_seq_length]
        samples.append((e.rows[:4], e.img_paths, positions))
    samples.append((samples[0][0], [], []))                      # a text-only sample: every slot "None"
    data_params = {"setup": {"output_dir": str(folder), "mode": "finetuning"},
                   "processing": {"max_seq_length": lay.max_seq_length, "pad_id": 0, "eos_id": 2},
                   "dataset": {"num_patches": lay.num_patches, "max_num_img": lay.max_num_img, "is_multimodal": True},
                   "post-process": {"n_examples": len(samples)}}
    write_modelzoo_shard(folder, samples, lay.max_seq_length, lay.max_num_img, lay.num_patches, data_params)
    return len(samples)


def test_modelzoo_shards_load_check_and_train(world, tmp_path, capsys):
    folder = tmp_path / "zoo_out"
    n = _zoo_fixture(world, folder)
    with h5py.File(folder / "output_chunk_0_0_0_0.h5") as f:          # the fixture is the Model Zoo's layout
        assert f["img_path"][n - 1].tolist() == [b"None", b"None"] and f["data"].chunks == (1, 5, 96)
        assert f["data"].compression == "gzip" and f["has_img"].shape == (n, 1)
    params = params_for(tmp_path, folder, world / "images", batch_size=4, micro_batch_size=4)
    loader, _ = make_loader(load_params(params), num_workers=0)
    batches = list(loader)
    assert sum(b["labels"].shape[0] for b in batches) == 8            # drop_last: 2 of 4
    assert main(["check", "--params", str(params)]) == 0
    assert f"data (train): {n} samples in {folder}" in capsys.readouterr().out
    md = tmp_path / "md"
    assert main(["run", "CPU", "--mode", "train", "--params", str(params), "--model_dir", str(md),
                 "--max_steps", "2"]) == 0
    losses = [json.loads(line)["loss"] for line in (md / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(np.isfinite(losses))


def test_modelzoo_shards_without_has_img_and_mmgraphs_older_shards_load(world, tmp_path):
    zoo = tmp_path / "zoo"
    _zoo_fixture(world, zoo)
    with h5py.File(zoo / "output_chunk_0_0_0_0.h5", "a") as f:
        del f["has_img"]                                             # its loader never reads it
    old = tmp_path / "old"                                           # mmgraph's earlier layout: "" slots
    old.mkdir()
    with h5py.File(zoo / "output_chunk_0_0_0_0.h5") as src, h5py.File(old / "data-00000.h5", "w") as f:
        f["data"] = src["data"][:]
        f.create_dataset("img_path", data=np.array([[("" if p == b"None" else p.decode()) for p in row]
                                                    for row in src["img_path"][:]], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f["has_img"] = np.array([[row[0] != b"None"] for row in src["img_path"][:]])
        f["img_data_loc"] = src["img_data_loc"][:]
        f.attrs["n_examples"] = src["data"].shape[0]
    batches = {}
    for name, folder in (("zoo", zoo), ("old", old)):
        loader, _ = make_loader(load_params(params_for(tmp_path, folder, world / "images")), num_workers=0)
        batches[name] = next(iter(loader))
    for key in batches["zoo"]:
        assert torch.equal(batches["zoo"][key], batches["old"][key]), key


# -- mmgraph's files into the Model Zoo's reader ----------------------------------------------------

def test_mmgraph_shards_read_by_the_modelzoo_loader(world, tmp_path):
    out = tmp_path / "ours"
    preprocess(str(world / "phase2_train.json"), str(world / "images"), str(world / "tokenizer"), str(out), 2,
               tiny_layout(), samples_per_file=10, progress=False)
    params = load_params(params_for(tmp_path, out, world / "images"))
    data = params.train_input
    transform = build_transforms(data.transforms)
    zoo = ModelZooReader(str(out), str(world / "images"), list(data.image_data_size), data.max_num_img, transform)
    loader, _ = make_loader(params, num_workers=0, batch_size=1)
    ours = list(loader)
    assert len(zoo) == len(ours) == 24
    two_images = 0
    for i, mine in enumerate(ours):
        theirs = zoo[i]
        for key in ("text_input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx"):
            assert np.array_equal(theirs[key], mine[key][0].numpy()), (i, key)
        assert np.array_equal(theirs["image_data_loc"], mine["image_data_loc"][0].numpy())
        real = int((theirs["image_data_loc"][:, 0] < 96).sum())
        two_images += real == 2
        assert torch.allclose(theirs["image_data"][:real], mine["image_data"][0, :real])   # the real images
    assert two_images > 0
    meta = json.loads((out / "data_params.json").read_text())
    assert meta["processing"]["max_seq_length"] == 96 and meta["dataset"]["max_num_img"] == 2
    assert meta["post-process"]["n_examples"] == 24


# -- preprocessing like the Model Zoo's -----------------------------------------------------------

def test_chat_template_gives_the_vicuna_rows(world):
    """A Jinja template spelling vicuna_v1 gives exactly the rows of mmgraph's vicuna_v1 template:
    the same tokens, the replies and their </s> supervised (via character spans)."""
    lay = tiny_layout()
    vicuna = Encoder(str(world / "tokenizer"), 2, lay, str(world / "images"))
    chat = Encoder(str(world / "tokenizer"), 2, lay, str(world / "images"),
                   style=Style(template="chat", chat_template=VICUNA_JINJA))
    checked = 0
    for s in json.loads((world / "phase2_train.json").read_text()):
        a, b = vicuna.encode(s), chat.encode(s)
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.img_loc, b.img_loc), s["id"]
        checked += len(s["conversations"]) > 2
    assert checked > 0                                                     # multi-turn samples too


def test_image_placement_turn_start_and_inline(world, tok_ids=None):
    lay = tiny_layout()
    sample = {"id": "p", "image": "000000.png", "conversations": [
        {"from": "human", "value": "what color is <image> the shape ?"}, {"from": "gpt", "value": "red"}]}
    first = Encoder(str(world / "tokenizer"), 2, lay, str(world / "images")).encode(sample)
    inline = Encoder(str(world / "tokenizer"), 2, lay, str(world / "images"),
                     style=Style(placement="inline")).encode(sample)
    start = int(first.img_loc[0, 0])
    assert int(inline.img_loc[0, 0]) > start                               # after "what color is"
    assert sorted(first.rows[0, :first.tokens].tolist()) == sorted(inline.rows[0, :inline.tokens].tolist())


@pytest.mark.parametrize("tag", ["Release_2.3.1", "Release_2.10.0"])
def test_modelzoo_phase2_config(world, tmp_path, tag, capsys):
    """llava_phase_2_preproc.yaml as shipped: the chat template (here given by --chat_template), the
    image first in its turn, the human text of a turn starting with <image> kept (2.3.1 dropped it)."""
    template = tmp_path / "vicuna.jinja"
    template.write_text(VICUNA_JINJA)
    out = tmp_path / "out"
    assert main(["preprocess", "--config", str(ZOO / tag / "llava_phase_2_preproc.yaml"), "--input_json",
                 str(world / "phase2_train.json"), "--image_dir", str(world / "images"), "--tokenizer",
                 str(world / "tokenizer"), "--output_dir", str(out), "--params", str(TINY2), "--chat_template",
                 str(template), "--on_error", "skip"]) == 0
    captured = capsys.readouterr()
    assert "accepted, not used" in captured.err
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["samples_skipped"]) <= {"too_many_images"}            # the Model Zoo: one image per turn
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    question = tok("what color is the shape ?", add_special_tokens=False).input_ids
    with h5py.File(out / "data-00000.h5") as f:
        rows = [r[0].tolist() for r in f["data"][:]]
        assert all(p[1] == b"None" for p in f["img_path"][:])
        assert (f["data"][:, 0][f["data"][:, 4] == 1] == 0).all()          # image positions hold pad_id
    assert any(any(r[i:i + len(question)] == question for i in range(len(r))) for r in rows)
    loader, _ = make_loader(load_params(params_for(tmp_path, out, world / "images")), num_workers=0)
    assert next(iter(loader))["labels"].shape == (8, 96)


@pytest.mark.parametrize("tag", ["Release_2.3.1", "Release_2.10.0"])
def test_modelzoo_phase1_config_keeps_the_image(world, tmp_path, tag):
    """llava_phase_1_llama3.yaml: prompt_completion with sep_token "" (2.3.1 lost the prompt and its
    image with it); the caption and </s> are supervised, the prompt text dropped in phase 1."""
    out = tmp_path / "out"
    assert main(["preprocess", "--config", str(ZOO / tag / "llava_phase_1_llama3.yaml"), "--input_json",
                 str(world / "phase1_train.json"), "--image_dir", str(world / "images"), "--tokenizer",
                 str(world / "tokenizer"), "--output_dir", str(out), "--params", str(TINY1)]) == 0
    with h5py.File(out / "data-00000.h5") as f:
        assert f["data"].shape[0] == 24
        assert (f["data"][:, 4].sum(1) == 16).all()                         # one image each
        assert (f["img_data_loc"][:, 0, 0] == 0).all()                      # first: no bos with this tokenizer
    samples = json.loads((world / "phase1_train.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    loader, _ = make_loader(load_params(params_for(tmp_path, out, world / "images", base=TINY1)),
                            num_workers=0, batch_size=1)
    for sample, batch in zip(samples, loader):
        sup = batch["labels"][0][batch["loss_mask"][0] == 1].tolist()
        assert sup == tok(sample["conversations"][1]["value"], add_special_tokens=False).input_ids + [2]


def test_config_errors_are_named(world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load((ZOO / "Release_2.10.0" / "llava_phase_2_preproc.yaml").read_text())
    raw["processing"]["read_hook"] = "my.module:my_hook"
    raw["processing"]["max_seq_lenght"] = 4
    bad.write_text(yaml.safe_dump(raw))
    assert main(["preprocess", "--config", str(bad), "--input_json", str(world / "phase2_train.json")]) == 2
    err = capsys.readouterr().err
    assert "processing.max_seq_lenght: unknown, not used (did you mean 'max_seq_length'?)" in err
    assert f"mmgraph: error: {bad}: processing.read_hook: 'my.module:my_hook': mmgraph reads the LLaVA hooks" in err


def test_chatml_fallback_and_workers_give_the_same_shards(world, tmp_path):
    """Without a chat template the tokenizer falls back to ChatML (the Model Zoo's default): the
    replies are supervised (no eos follows them there); two workers write the same shards as one."""
    style = Style(template="chat")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        preprocess(str(world / "phase2_train.json"), str(world / "images"), str(world / "tokenizer"), str(out), 2,
                   tiny_layout(), samples_per_file=7, num_workers=workers, progress=False, style=style)
        with h5py.File(out / "data-00000.h5") as f:
            outs.append((f["data"][:], f["img_path"][:], f["img_data_loc"][:]))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    sample = json.loads((world / "phase2_train.json").read_text())[0]
    rows = outs[0][0][0]
    replies = [i for t in sample["conversations"][1::2] for i in tok(t["value"], add_special_tokens=False).input_ids]
    assert rows[2][rows[1] == 1].tolist() == replies


def test_check_train_and_eval_checks_both_data_sections(world, tmp_path, capsys):
    train, evl = tmp_path / "train", tmp_path / "eval"
    for split, out in (("train", train), ("eval", evl)):
        preprocess(str(world / f"phase2_{split}.json"), str(world / "images"), str(world / "tokenizer"), str(out),
                   2, tiny_layout(), progress=False)
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(train), img_data_dir=str(world / "images"))
    raw["eval_input"].update(data_dir=str(evl), img_data_dir=str(world / "images"))
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(params), "--mode", "train_and_eval"]) == 0
    out = capsys.readouterr().out
    assert f"data (train): 24 samples in {train}" in out and f"data (eval): 4 samples in {evl}" in out


def test_older_llava_model_shards_load(world, tmp_path):
    """``LlavaHDF5MapDataProcessor``'s files, laid out as 2.3's nlp/hdf5_preprocessing writes them
    (``hdf5_base_preprocessor``: ``data`` N x 4 x S, ``img_path`` N x 1 fixed-length bytes with
    ``"None"`` for a text-only sample, no ``img_data_loc``): the image stands at the model's
    ``image_start_idx``. They load as the same batches as mmgraph's shards of the same rows."""
    lay = Layout(96, 16, 1)
    enc = Encoder(str(world / "tokenizer"), 1, lay, str(world / "images"))
    encoded = [enc.encode(s) for s in json.loads((world / "phase1_train.json").read_text())[:6]]
    text_only = Encoder(str(world / "tokenizer"), 1, lay, None).encode(
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a red circle ."}]})
    encoded.append(text_only)
    old = tmp_path / "llava"
    old.mkdir()
    with h5py.File(old / "examples_0.h5", "w") as f:
        f.attrs["n_examples"] = len(encoded)
        f.create_dataset("data", data=np.stack([e.rows[:4] for e in encoded]), dtype="i4", chunks=(1, 4, 96),
                         compression="gzip")
        paths = np.array([[e.img_paths[0].encode("utf-8")] if e.img_paths else [None] for e in encoded], dtype="S")
        f.create_dataset("img_path", data=paths, compression="gzip")
    ours = tmp_path / "ours"
    ours.mkdir()
    with h5py.File(ours / "data-00000.h5", "w") as f:
        f["data"] = np.stack([e.rows for e in encoded])
        f.create_dataset("img_path", data=np.array([e.img_paths or ["None"] for e in encoded], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f["img_data_loc"] = np.stack([e.img_loc for e in encoded])
    batches = []
    for folder in (old, ours):
        params = params_for(tmp_path, folder, world / "images", base=TINY1, max_num_img=1, batch_size=7,
                            micro_batch_size=7)
        loader, _ = make_loader(load_params(params), num_workers=0)
        batches.append(next(iter(loader)))
    for key in batches[1]:
        assert torch.equal(batches[0][key], batches[1][key]), key
    assert batches[0]["token_modality_idx"][-1].sum() == 0 and batches[0]["token_modality_idx"][0, 1:17].all()
