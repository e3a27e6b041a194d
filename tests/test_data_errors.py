"""Data reliability (issue 14, items 4, 5, 7): paths stay in their folder, nothing written is lost,
every bad input is a named exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.data.preprocess import Layout, preprocess
from mmgraph.runtime.data import check_data, make_loader
from mmgraph.data.synth import synth
from tests.conftest import TINY2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    synth(root, num_train=12, num_eval=4, seed=4)
    return root


def args(world: Path, input_json: Path, out: Path, *extra: str) -> list[str]:
    return ["preprocess", "--input_json", str(input_json), "--image_dir", str(world / "images"), "--tokenizer",
            str(world / "tokenizer"), "--output_dir", str(out), "--phase", "2", "--params", str(TINY2), *extra]


def samples(world: Path) -> list[dict]:
    return json.loads((world / "phase2_train.json").read_text())


def shards(world: Path, out: Path, n: int = 12) -> Path:
    lay = load_params(TINY2).layout()
    data = world / "subset.json"
    data.write_text(json.dumps([s for s in samples(world) if isinstance(s["image"], str)][:n]))
    preprocess(str(data), str(world / "images"), str(world / "tokenizer"), str(out), 2,
               Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img), samples_per_file=6, progress=False)
    return out


def params_for(tmp_path: Path, data_dir: Path, images: Path) -> Path:
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(data_dir), img_data_dir=str(images), shuffle=False, batch_size=2,
                              micro_batch_size=2)
    raw.pop("eval_input", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- preprocess input -------------------------------------------------------------------------------

@pytest.mark.parametrize("case,message", [
    ("not_utf8", "line 1, byte 31: not UTF-8 text (LLaVA JSON is UTF-8)"),
    ("not_object", "sample 1 (id ?): a sample must be a JSON object, not list"),
    ("image_type", "sample 0 (id x): 'image' must be a path or a list of paths, not 5"),
    ("absolute", "sample 0 (id x): image path '/etc/passwd' is absolute; paths are relative to the image folder"),
    ("escape", "sample 0 (id x): image path '../../secret.png' leaves the image folder"),
])
def test_bad_llava_json_is_named(world, tmp_path, capsys, case, message):
    good = samples(world)[0]
    data = tmp_path / "in.json"
    turns = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]
    if case == "not_utf8":
        data.write_bytes(b'[{"id": "x", "conversations": "\xff"}]')
    elif case == "not_object":
        data.write_text(json.dumps([good, ["not", "an", "object"]]))
    else:
        image = {"image_type": 5, "absolute": "/etc/passwd", "escape": "../../secret.png"}[case]
        (tmp_path / "secret.png").write_bytes((world / "images" / good["image"]).read_bytes())
        data.write_text(json.dumps([{"id": "x", "image": image, "conversations": turns}]))
    assert main(args(world, data, tmp_path / "out")) == 2
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {data}: {message}")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("limit", [1000, 3000])       # 64 x 64 = 4096 pixels: an error / a warning
def test_decompression_bomb_in_preprocess(world, tmp_path, capsys, monkeypatch, limit):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    data = tmp_path / "in.json"
    data.write_text(json.dumps(samples(world)[:1]))
    assert main(args(world, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{data}: sample 0 (id {samples(world)[0]['id']}): image " in err and "too large to decode safely" in err


def _thin_png(path: Path) -> None:
    """A 1 x 60000 PNG (a few hundred bytes): padded to a square it would be 3.6e9 pixels."""
    from PIL import Image

    Image.new("L", (1, 60000)).save(path)


def _postscript(path: Path) -> None:
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")


@pytest.mark.parametrize("make, message", [
    (_thin_png, "pads to a 60000x60000 square"),
    (_postscript, "not one of PNG, JPEG, WEBP, GIF, BMP, TIFF"),
])
def test_hostile_images_are_refused_by_preprocess_check_and_the_loader(world, tmp_path, capsys, make, message):
    """A 254-byte 1 x 60000 PNG once passed preprocess and check, then ran out of memory in
    ``expand_to_square``; PIL picked formats by content, so PostScript named .png reached
    Ghostscript."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    one = next(s for s in samples(world) if isinstance(s["image"], str))
    data = tmp_path / "in.json"
    data.write_text(json.dumps([one]))
    # preprocess decodes every image
    make(images / one["image"])
    assert main(["preprocess", "--input_json", str(data), "--image_dir", str(images), "--tokenizer",
                 str(world / "tokenizer"), "--output_dir", str(tmp_path / "out"), "--phase", "2", "--params",
                 str(TINY2)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: sample 0 (id {one['id']}): image " in err and message in err, err
    # shards made while the image was whole: check and the loader refuse it now
    shutil.copy(world / "images" / one["image"], images / one["image"])
    out = tmp_path / "shards"
    preprocess(str(data), str(images), str(world / "tokenizer"), str(out), 2,
               Layout(*[getattr(load_params(TINY2).layout(), k) for k in
                        ("max_sequence_length", "num_patches", "max_num_img")]), progress=False)
    make(images / one["image"])
    path = params_for(tmp_path, out, images)
    raw = yaml.safe_load(path.read_text())
    raw["train_input"].update(batch_size=1, micro_batch_size=1, num_workers=0,
                              transforms=[{"name": "expand_to_square"}, {"name": "resize", "size": 32},
                                          {"name": "to_tensor"}])
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sample 0: image " in err and message in err, err
    loader, _ = make_loader(load_params(path))
    with pytest.raises(UserError, match=message):
        next(iter(loader))


def test_a_padded_canvas_is_bounded_before_it_is_allocated():
    from PIL import Image

    from mmgraph.data.transforms import expand_to_square

    with pytest.raises(ValueError, match="pads to a 60000x60000 square"):
        expand_to_square(Image.new("RGB", (1, 60000)))
    assert expand_to_square(Image.new("RGB", (3, 5))).size == (5, 5)


def test_no_shard_written_leaves_the_output_as_it_was(world, tmp_path, capsys):
    out = tmp_path / "out"
    shards(world, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(s, conversations=s["conversations"][::-1]) for s in samples(world)[:3]]))
    assert main(args(world, bad, out, "--on_error", "skip")) == 2
    assert "no sample could be written (not_alternating 3)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.*"))


def test_full_disk_while_preprocessing(world, tmp_path):
    """Writes fail (RLIMIT_FSIZE; SIGXFSZ ignored so the OS returns an error): exit 2, no traceback,
    the earlier output untouched, no temporary folder left."""
    out = tmp_path / "out"
    shards(world, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
              "from mmgraph.cli import main\n"
              f"sys.exit(main({args(world, world / 'phase2_train.json', out, '--samples_per_file', '4')!r}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"mmgraph: error: {out}: cannot write the output (File too large)")
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.*"))


# -- shards at train time and in mmgraph check -----------------------------------------------------

def _damage_row(path: Path, row: int) -> None:
    """Overwrite the compressed bytes of one sample's chunk of ``data`` (the middle of the file)."""
    with h5py.File(path, "r") as f:
        info = f["data"].id.get_chunk_info(row)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + 4)
        f.write(b"\xde\xad\xbe\xef" * 8)


def test_shard_damaged_in_the_middle_is_named_at_train_time(world, tmp_path, capsys):
    out = shards(world, tmp_path / "out")
    _damage_row(out / "data-00001.h5", 3)
    params = params_for(tmp_path, out, world / "images")
    loader, _ = make_loader(load_params(params), num_workers=0)           # the metadata is intact
    with pytest.raises(UserError) as info:
        for _ in loader:
            pass
    assert str(info.value).startswith(f"{out / 'data-00001.h5'}: sample 3: cannot be read (OSError")
    md = tmp_path / "md"
    assert main(["run", "CPU", "--mode", "train", "--params", str(params), "--model_dir", str(md),
                 "--max_steps", "6"]) == 2
    assert f"mmgraph: error: {out / 'data-00001.h5'}: sample 3: cannot be read" in capsys.readouterr().err
    assert main(["check", "--params", str(params)]) == 2
    assert f"{out / 'data-00001.h5'}: sample 3: cannot be read" in capsys.readouterr().err


def test_out_of_range_values_and_escaping_paths_are_named(world, tmp_path):
    out = shards(world, tmp_path / "out")
    with h5py.File(out / "data-00000.h5", "a") as f:
        data = f["data"][:]
        data[1, 0, 5] = 10_000                                        # a token id past vocab_size
        f["data"][...] = data
        loc = f["img_data_loc"][:]
        loc[2, 0, 0] = 97                                              # past max_seq_length 96
        f["img_data_loc"][...] = loc
        paths = f["img_path"][:]
        paths[4, 0] = b"../outside.png"
        paths[5, 0] = b"None"                                           # its positions stay
        f["img_path"][...] = paths
    params = load_params(params_for(tmp_path, out, world / "images"))
    loader, _ = make_loader(params, num_workers=0, batch_size=1)
    it = iter(loader)
    next(it)
    with pytest.raises(UserError, match=r"data-00000.h5: sample 1: token id 10000 is outside the vocabulary"):
        next(it)
    count, problems = check_data(params)
    text = [str(p) for p in problems]
    name = str(out / "data-00000.h5")
    assert count == 12 and len(problems) == 4
    assert f"{name}: sample 1: token id 10000 is outside the vocabulary (vocab_size" in text[0]
    assert text[1] == f"{name}: sample 2: img_data_loc 97 is outside 0..96"
    assert text[2].startswith(f"{name}: sample 4: image path '../outside.png' leaves the image folder")
    assert text[3] == f"{name}: sample 5: image slot 0 is empty but img_data_loc places it in the sequence (padding is 96)"


def test_check_reports_every_data_problem_at_once(world, tmp_path, capsys):
    out = shards(world, tmp_path / "out")
    with h5py.File(out / "data-00000.h5", "a") as f:
        del f["img_data_loc"]
    meta = json.loads((out / "data_params.json").read_text())
    meta["dataset"]["num_patches"] = 9
    (out / "data_params.json").write_text(json.dumps(meta))
    images = tmp_path / "images"
    images.mkdir()                                                    # an image folder without the images
    assert main(["check", "--params", str(params_for(tmp_path, out, images))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"mmgraph: error: {out / 'data_params.json'}: dataset.num_patches: 9, but the params give 16" in err
    assert any("data-00000.h5: img_data_loc: dataset missing" in line for line in err)
    assert sum("data-00001.h5: sample" in line and "not found" in line for line in err) == 6


def test_worker_errors_arrive_without_the_worker_traceback(world, tmp_path):
    out = shards(world, tmp_path / "out")
    _damage_row(out / "data-00000.h5", 2)
    loader, _ = make_loader(load_params(params_for(tmp_path, out, world / "images")), num_workers=1)
    with pytest.raises(UserError) as info:
        for _ in loader:
            pass
    assert str(info.value).startswith(f"{out / 'data-00000.h5'}: sample 2: cannot be read (OSError")
    assert "Traceback" not in str(info.value)


def test_an_output_folder_with_other_files_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = tmp_path / "in.json"
    data.write_text(json.dumps(samples(world)[:2]))
    assert main(args(world, data, out)) == 2
    assert f"mmgraph: error: {out}: holds files preprocess did not write (notes.txt, ...)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_samples_cross_from_workers(world, tmp_path, capsys):
    data = tmp_path / "in.json"
    rows = samples(world)[:6]
    rows[4] = dict(rows[4], conversations=rows[4]["conversations"][::-1])
    data.write_text(json.dumps(rows))
    assert main(args(world, data, tmp_path / "out", "--num_workers", "2")) == 2
    assert f"{data}: sample 4 (id {rows[4]['id']}): conversations[0] is from 'gpt'" in capsys.readouterr().err
    assert main(args(world, data, tmp_path / "out", "--num_workers", "2", "--on_error", "skip")) == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["samples_skipped"] == {"not_alternating": 1}


def test_no_space_left_while_preprocessing(world, tmp_path, capsys, monkeypatch):
    import errno
    out = shards(world, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("mmgraph.data.shard_writer.os.fsync", full)
    assert main(args(world, world / "phase2_train.json", out)) == 2
    assert capsys.readouterr().err == (f"mmgraph: error: {out}: cannot write the output (No space left on device); "
                                       "nothing was changed\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not list(tmp_path.glob(".out.*"))
