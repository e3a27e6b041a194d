"""Data: golden token rows, the loader against the rows, the synthetic dataset, bad input."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.data.preprocess import Encoder, Layout, SampleError, preprocess
from mmgraph.runtime.data import make_loader
from mmgraph.data.synth import COLORS, synth
from tests.conftest import TINY1, TINY2

P = 3  # tokens per image in the golden tests


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth(root, num_train=64, num_eval=16, seed=1)
    return root


@pytest.fixture(scope="module")
def tok(dataset):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(dataset / "tokenizer"), local_files_only=True)


def encoder(dataset, phase, seq=64, imgs=2, **kw) -> Encoder:
    return Encoder(str(dataset / "tokenizer"), phase, Layout(seq, P, imgs), str(dataset / "images"), **kw)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def check_row(rows, S, expected_ids, supervised, image_positions):
    """The five rows, exactly, from a hand-built token list."""
    n = len(expected_ids)
    assert rows.rows[0, :n].tolist() == expected_ids
    assert (rows.rows[0, n:] == 0).all() and (rows.rows[3, n:] == 1).all() and (rows.rows[3, :n] == 0).all()
    assert rows.rows[2, : n - 1].tolist() == expected_ids[1:]
    assert rows.rows[1].tolist() == supervised[1:] + [0] * (S - n + 1)
    modality = np.zeros(S, dtype=int)
    for pos in image_positions:
        modality[pos] = 1
    assert rows.rows[4].tolist() == modality.tolist()


def test_golden_phase1_caption(dataset, tok):
    enc = encoder(dataset, 1)
    out = enc.encode({"id": "a", "image": "000000.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe the image ."},
        {"from": "gpt", "value": "a small red circle on the left ."}]})
    img, bos, eos = tok.convert_tokens_to_ids("<image>"), tok.bos_token_id, tok.eos_token_id
    caption = ids(tok, "a small red circle on the left .")
    expected = [bos] + [img] * P + caption + [eos]
    sup = [0] * (1 + P) + [1] * (len(caption) + 1)
    check_row(out, 64, expected, sup, [1, 2, 3])
    assert out.img_loc.tolist() == [[1, 2, 3], [64, 64, 64]] and out.img_paths == ["000000.png"]


def _vicuna_prefix(tok):
    from mmgraph.data.preprocess import SYSTEM
    return [tok.bos_token_id] + ids(tok, SYSTEM + " ")


def test_golden_phase2_one_image_two_turns(dataset, tok):
    enc = encoder(dataset, 2, seq=96)
    out = enc.encode({"id": "b", "image": "000000.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "where is the shape ?"}, {"from": "gpt", "value": "left"}]})
    img, eos = tok.convert_tokens_to_ids("<image>"), tok.eos_token_id
    pre = _vicuna_prefix(tok)
    user, asst = ids(tok, "USER: "), ids(tok, " ASSISTANT: ")
    q1, a1, q2, a2 = (ids(tok, t) for t in ("what color is the shape ?", "red", "where is the shape ?", "left"))
    expected = pre + user + [img] * P + q1 + asst + a1 + [eos] + user + q2 + asst + a2 + [eos]
    sup = ([0] * (len(pre) + len(user) + P + len(q1) + len(asst)) + [1] * (len(a1) + 1)
           + [0] * (len(user) + len(q2) + len(asst)) + [1] * (len(a2) + 1))
    start = len(pre) + len(user)
    check_row(out, 96, expected, sup, range(start, start + P))


def test_golden_phase2_two_images_and_text_only(dataset, tok):
    enc = encoder(dataset, 2, seq=96)
    out = enc.encode({"id": "c", "image": ["000000.png", "000001.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nare the two shapes the same color ?"},
        {"from": "gpt", "value": "no"}]})
    start = len(_vicuna_prefix(tok)) + len(ids(tok, "USER: "))
    assert out.img_loc.tolist() == [list(range(start, start + P)), list(range(start + P, start + 2 * P))]
    assert out.rows[4].sum() == 2 * P and out.img_paths == ["000000.png", "000001.png"]
    text = enc.encode({"id": "d", "conversations": [{"from": "human", "value": "what shape is it ?"},
                                                   {"from": "gpt", "value": "square"}]})
    assert text.img_paths == [] and text.rows[4].sum() == 0 and (text.img_loc == 96).all()
    assert text.rows[1].sum() == len(ids(tok, "square")) + 1


@pytest.mark.parametrize("sample,reason", [
    ({"id": "x", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]}, "not_alternating"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}]}, "not_alternating"),
    ({"id": "x", "image": ["000000.png"] * 3, "conversations": [
        {"from": "human", "value": "<image><image><image>"}, {"from": "gpt", "value": "a"}]}, "too_many_images"),
    ({"id": "x", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}, "missing_image"),
    ({"id": "x", "image": ["000000.png"], "conversations": [
        {"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}]}, "image_count"),
    ({"id": "x", "conversations": "hello"}, "malformed"),
])
def test_bad_samples(dataset, sample, reason):
    with pytest.raises(SampleError) as info:
        encoder(dataset, 2).encode(sample)
    assert info.value.reason == reason


def test_unreadable_image_and_long_samples(dataset, tmp_path):
    (dataset / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SampleError, match="cannot be read") as info:
        encoder(dataset, 1).encode({"id": "x", "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]})
    assert info.value.reason == "unreadable_image"
    long = {"id": "y", "conversations": [{"from": "human", "value": "what shape is it ? " * 10},
                                         {"from": "gpt", "value": "a small red circle on the left . " * 10}]}
    with pytest.raises(SampleError, match="max_seq_length"):
        encoder(dataset, 2, seq=64, on_long="skip").encode(long)
    with pytest.raises(SampleError, match="nothing supervised"):
        encoder(dataset, 2, seq=64).encode(long)  # the question alone fills the row
    cut = encoder(dataset, 1, seq=8).encode({"id": "z", "image": "000000.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a small red circle on the left ."}]})
    assert cut.rows[3].sum() == 0 and cut.tokens == 8  # truncated to the row


def test_shard_layout_and_loader_alignment(dataset, tmp_path):
    params = load_params(TINY2)
    lay = params.layout()
    out = tmp_path / "phase2"
    stats = preprocess(str(dataset / "phase2_train.json"), str(dataset / "images"), str(dataset / "tokenizer"),
                       str(out), 2, Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img),
                       samples_per_file=40, progress=False)
    assert stats["samples_written"] == 64 and sorted(p.name for p in out.glob("*.h5")) == ["data-00000.h5", "data-00001.h5"]
    with h5py.File(out / "data-00000.h5") as f:
        assert f["data"].shape == (40, 5, 96) and f["data"].dtype == np.int32
        assert f["img_path"].shape == (40, 2) and f["has_img"].shape == (40, 1) and f["has_img"].dtype == bool
        assert f["img_data_loc"].shape == (40, 2, 16) and f.attrs["n_examples"] == 40
        assert f["data"].compression == "gzip"
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(out), img_data_dir=str(dataset / "images"), shuffle=False)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    loader, _ = make_loader(load_params(path), num_workers=0)
    samples = json.loads((dataset / "phase2_train.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(dataset / "tokenizer"), local_files_only=True)
    img_id = tok.convert_tokens_to_ids("<image>")
    seen = 0
    for batch in loader:
        for b in range(batch["labels"].shape[0]):
            sample = samples[seen]
            ids_ = batch["text_input_ids"][b]
            # image positions line up with the placeholder tokens
            locs = batch["image_data_loc"][b]
            real = locs[locs < 96]
            assert (ids_[real] == img_id).all() and batch["token_modality_idx"][b].sum() == len(real)
            n_imgs = 1 if isinstance(sample["image"], str) else len(sample["image"])
            assert len(real) == 16 * n_imgs and batch["image_data"][b, :n_imgs].abs().sum() > 0
            # supervised tokens are exactly the answers (+ </s> after each)
            sup = batch["labels"][b][batch["loss_mask"][b] == 1].tolist()
            answers = []
            for turn in sample["conversations"][1::2]:
                answers += ids(tok, turn["value"]) + [tok.eos_token_id]
            assert sup == answers
            seen += 1
    assert seen == 64


def test_sampler_position_resumes(dataset, tmp_path):
    from mmgraph.runtime.data import ResumableSampler
    a = ResumableSampler(20, 4, True, 7, True)
    first = list(a)
    b = ResumableSampler(20, 4, True, 7, True)
    it = iter(b)
    head = [next(it) for _ in range(6)]
    state = b.state_dict()
    c = ResumableSampler(20, 4, True, 7, True)
    c.load_state_dict(state)
    assert head + list(c) == first
    assert list(a) != first  # the next epoch is shuffled differently


def test_synthetic_answers_come_from_the_images(dataset):
    samples = json.loads((dataset / "phase2_train.json").read_text())
    by_question = defaultdict(Counter)
    for s in samples:
        convs = s["conversations"]
        for q, a in zip(convs[0::2], convs[1::2]):
            by_question[q["value"].replace("<image>\n", "")][a["value"]] += 1
    for q, answers in by_question.items():  # no question gives its answer away
        if sum(answers.values()) >= 8:
            assert max(answers.values()) / sum(answers.values()) <= 0.75, (q, answers)
    # A pixel oracle reads the colour of single-shape images exactly.
    checked = 0
    for s in samples:
        q, a = s["conversations"][0]["value"], s["conversations"][1]["value"]
        if q.endswith("what color is the shape ?"):
            pixels = np.asarray(Image.open(dataset / "images" / s["image"]).convert("RGB")).reshape(-1, 3)
            shape = pixels[(np.abs(pixels.astype(int) - 242).sum(1) > 60)]
            mean = shape.mean(0)
            guess = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum())
            assert guess == a
            checked += 1
    assert checked > 0


def test_cli_synth_and_preprocess_with_params(tmp_path, capsys):
    assert main(["data", "synth", "--output_dir", str(tmp_path), "--num_train", "16", "--num_eval", "4"]) == 0
    assert main(["preprocess", "--input_json", str(tmp_path / "phase1_train.json"), "--image_dir",
                 str(tmp_path / "images"), "--tokenizer", str(tmp_path / "tokenizer"), "--output_dir",
                 str(tmp_path / "p1"), "--phase", "1", "--params", str(TINY1)]) == 0
    stats = json.loads((tmp_path / "p1" / "stats.json").read_text())
    assert stats["samples_written"] == 16 and stats["images_per_sample"] == {"1": 16}
    with h5py.File(tmp_path / "p1" / "data-00000.h5") as f:
        assert f["data"].shape[1:] == (5, 96) and f["img_data_loc"].shape[1:] == (2, 16)


def test_preprocess_errors_name_file_and_sample_and_write_nothing(dataset, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"id": "a",}]')
    args = ["--image_dir", str(dataset / "images"), "--tokenizer", str(dataset / "tokenizer"),
            "--phase", "2", "--params", str(TINY2)]
    assert main(["preprocess", "--input_json", str(bad_json), "--output_dir", str(tmp_path / "o1"), *args]) == 2
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {bad_json}: line 1, column 13: malformed JSON:")
    samples = json.loads((dataset / "phase2_train.json").read_text())[:5]
    samples[3]["conversations"] = samples[3]["conversations"][::-1]
    bad = tmp_path / "bad2.json"
    bad.write_text(json.dumps(samples))
    out = tmp_path / "o2"
    out.mkdir()
    (out / "data-00000.h5").write_bytes(b"earlier shard")  # an earlier run's output is not lost
    assert main(["preprocess", "--input_json", str(bad), "--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"mmgraph: error: {bad}: sample 3 (id {samples[3]['id']}): conversations[0] is from 'gpt'" in err
    assert sorted(p.name for p in out.iterdir()) == ["data-00000.h5"]
    assert (out / "data-00000.h5").read_bytes() == b"earlier shard"
    assert main(["preprocess", "--input_json", str(bad), "--output_dir", str(out), "--on_error", "skip", *args]) == 0
    assert json.loads((out / "stats.json").read_text())["samples_skipped"] == {"not_alternating": 1}


@pytest.mark.parametrize("damage,message", [
    ("missing", "img_data_loc: dataset missing (not an mmgraph / Model Zoo multimodal shard)"),
    ("shape", "data: shape (4, 5, 50) does not match the params (expected N x 5 x 96)"),
])
def test_loader_rejects_bad_shards(tmp_path, damage, message):
    d = tmp_path / "shards"
    d.mkdir()
    with h5py.File(d / "data-00000.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((4, 5, 50 if damage == "shape" else 96), np.int32))
        f.create_dataset("img_path", data=np.array([["", ""]] * 4, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("has_img", data=np.zeros((4, 1), bool))
        if damage != "missing":
            f.create_dataset("img_data_loc", data=np.zeros((4, 2, 16), np.int32))
        f.attrs["n_examples"] = 4
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(d), img_data_dir=str(tmp_path))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as info:
        make_loader(load_params(path))
    assert str(info.value) == f"{d / 'data-00000.h5'}: {message}"
