"""``preprocess --pack`` over the demo's synthetic data: every token of every sample exactly once,
deterministic, image budget respected; the loader reads packed shards; mismatches are named."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.core.packing import assign, unpack_row
from mmgraph.data.preprocess import Layout, PackOptions, preprocess
from mmgraph.runtime.data import make_loader
from mmgraph.data.synth import synth

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LAYOUT = Layout(max_seq_length=96, num_patches=16, max_num_img=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth(root, num_train=60, num_eval=8, seed=3)
    return root


def run(dataset, out, phase, pack=None, layout=LAYOUT):
    return preprocess(str(dataset / f"phase{phase}_train.json"), str(dataset / "images"),
                      str(dataset / "tokenizer"), str(out), phase, layout, samples_per_file=7,
                      progress=False, pack=pack)


def read(folder: Path):
    rows, paths, locs = [], [], []
    for f in sorted(folder.glob("*.h5")):
        with h5py.File(f, "r") as h:
            rows.append(h["data"][:])
            paths += [[p.decode() if isinstance(p, bytes) else p for p in r] for r in h["img_path"][:]]
            locs.append(h["img_data_loc"][:])
    return np.concatenate(rows), paths, np.concatenate(locs)


def samples_of_unpacked(rows, paths, locs, S):
    out = []
    for r, p, l in zip(rows, paths, locs):
        n = int((r[3] == 0).sum())
        imgs = [(name, tuple(l[j])) for j, name in enumerate(p) if name != "None"]
        out.append((tuple(map(tuple, r[:5, :n])), tuple(imgs)))
    return out


def samples_of_packed(rows, paths, locs, S):
    out = []
    for r, p, l in zip(rows, paths, locs):
        imgs = [(name, l[j]) for j, name in enumerate(p) if name != "None"]
        assert len(imgs) <= LAYOUT.max_num_img
        for start, n in unpack_row(r):
            assert (r[6, start:start + n] == np.arange(n)).all()            # positions restart
            mine = [(name, tuple(loc - start)) for name, loc in imgs if start <= loc[0] < start + n]
            out.append((tuple(map(tuple, r[:5, start:start + n])), tuple(mine)))
        real = int((r[5] > 0).sum())
        assert (r[3] == (r[5] == 0)).all() and (r[5, real:] == 0).all()     # padding at the end only
    return out


@pytest.mark.parametrize("phase", [1, 2])
def test_every_token_of_every_sample_appears_exactly_once(dataset, tmp_path, phase):
    layout = LAYOUT if phase == 1 else Layout(max_seq_length=320, num_patches=16, max_num_img=2)
    plain = run(dataset, tmp_path / "plain", phase, layout=layout)
    packed = run(dataset, tmp_path / "packed", phase, PackOptions(window=25, seed=1), layout=layout)
    a = samples_of_unpacked(*read(tmp_path / "plain"), layout.max_seq_length)
    b = samples_of_packed(*read(tmp_path / "packed"), layout.max_seq_length)
    assert sorted(a) == sorted(b) and len(a) == 60                        # a multiset: each once
    p = packed["packing"]
    assert p["rows_before"] == 60 and p["rows_after"] == read(tmp_path / "packed")[0].shape[0] < 60
    assert p["real_token_share_after"] > p["real_token_share_before"]
    assert plain["tokens"] == packed["tokens"] and "packing" not in plain
    params = json.loads((tmp_path / "packed" / "data_params.json").read_text())
    assert params["features"][-2:] == ["segment_ids", "position_ids"]


def test_packing_is_deterministic_and_seeded(dataset, tmp_path):
    run(dataset, tmp_path / "a", 1, PackOptions(window=25, seed=1))
    run(dataset, tmp_path / "b", 1, PackOptions(window=25, seed=1))
    run(dataset, tmp_path / "c", 1, PackOptions(window=25, seed=2))
    a, b, c = (read(tmp_path / d)[0] for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_first_fit_decreasing_respects_tokens_and_images():
    rows = assign([50, 40, 30, 20, 10, 60], [1, 1, 0, 1, 0, 2], seq_len=100, max_images=2, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(6))
    lengths, images = [50, 40, 30, 20, 10, 60], [1, 1, 0, 1, 0, 2]
    for r in rows:
        assert sum(lengths[i] for i in r) <= 100 and sum(images[i] for i in r) <= 2
    assert len(rows) == 3
    with pytest.raises(ValueError, match="sample 1"):
        assign([10, 200], [0, 0], seq_len=100, max_images=1, seed=0)




def test_loader_reads_packed_shards_and_names_mismatches(dataset, tmp_path):
    run(dataset, tmp_path / "packed", 1, PackOptions(window=25, seed=1))
    params = yaml.safe_load((CONFIGS / "params_mm_llava_demo_phase2.yaml").read_text())
    for key in ("train_input", "eval_input"):
        params[key] = dict(params[key], data_dir=str(tmp_path / "packed"), img_data_dir=str(dataset / "images"),
                           packed=True, batch_size=2, micro_batch_size=2)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    loader, _ = make_loader(load_params(path))
    batch = next(iter(loader))
    assert batch["segment_ids"].shape == batch["position_ids"].shape == batch["text_input_ids"].shape
    assert int(batch["segment_ids"].max()) >= 2
    for key in ("train_input", "eval_input"):
        params[key]["packed"] = False
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="set packed: true"):
        make_loader(load_params(path))


def _damage(kind: str, row: np.ndarray) -> None:
    """One way to break a packed row's segment_ids (row 5) or position_ids (row 6) in place."""
    seg, pos = row[5], row[6]
    n = int((seg > 0).sum())
    if kind == "all ones":                    # every sample one segment: they attend to each other
        seg[:n] = 1
    elif kind == "interleaved":
        seg[:n] = np.arange(n) % 2 + 1
    elif kind == "zero":                      # real tokens marked as padding
        seg[1] = 0
    elif kind == "negative":
        seg[0] = -3
    elif kind == "huge id":
        seg[:n][seg[:n] == seg[n - 1]] = 10 ** 6
    elif kind == "huge position":
        pos[2] = 10 ** 6
    elif kind == "negative position":
        pos[1] = -1


DAMAGE = ["all ones", "interleaved", "zero", "negative", "huge id", "huge position", "negative position"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_packed_fields_are_refused_by_check_and_the_loader(dataset, tmp_path, capsys, kind):
    """All seven once passed `check` and `run`: samples then attended to each other or got wrong
    positions."""
    run(dataset, tmp_path / "packed", 1, PackOptions(window=25, seed=1))
    params = yaml.safe_load((CONFIGS / "params_mm_llava_demo_phase2.yaml").read_text())
    for key in ("train_input", "eval_input"):
        params[key] = dict(params[key], data_dir=str(tmp_path / "packed"), img_data_dir=str(dataset / "images"),
                           packed=True, batch_size=2, micro_batch_size=2, shuffle=False, num_workers=0)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["check", "--params", str(path)]) == 0, capsys.readouterr().err      # whole: it passes
    shard = sorted((tmp_path / "packed").glob("*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        rows = f["data"][:]
        victim = next(i for i, r in enumerate(rows) if int(r[5].max()) >= 2)
        _damage(kind, rows[victim])
        f["data"][victim] = rows[victim]
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: sample {victim}:" in err and ("segment_ids" in err or "position_ids" in err), err
    loader, _ = make_loader(load_params(path))
    with pytest.raises(UserError, match=f"sample {victim}: (segment|position)_ids"):
        for _ in loader:
            pass


def test_cli_pack_prints_rows(dataset, tmp_path, capsys):
    code = main(["preprocess", "--input_json", str(dataset / "phase1_train.json"), "--image_dir",
                 str(dataset / "images"), "--tokenizer", str(dataset / "tokenizer"), "--output_dir",
                 str(tmp_path / "o"), "--phase", "1", "--max_seq_length", "96", "--num_patches", "16",
                 "--max_num_img", "2", "--pack", "--pack_window", "30"])
    assert code == 0
    out = capsys.readouterr().out
    assert "packed: 60 rows -> " in out
    with h5py.File(sorted((tmp_path / "o").glob("*.h5"))[0], "r") as f:
        assert f["data"].shape[1:] == (7, 96) and f.attrs["packed"]


def test_real_token_share_from_stats_reaches_the_cost_pass(dataset, tmp_path):
    from mmgraph.core.packing import real_token_share
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.target import load_target

    plain = run(dataset, tmp_path / "plain", 1)
    packed = run(dataset, tmp_path / "packed", 1, PackOptions(window=60, seed=0))
    a, b = real_token_share(tmp_path / "plain", 96), real_token_share(tmp_path / "packed", 96)
    assert a == pytest.approx(plain["tokens"] / (60 * 96))
    assert b == pytest.approx(packed["packing"]["real_token_share_after"], abs=1e-4) and b > a
    assert real_token_share(tmp_path / "nothing", 96) is None
    raw = yaml.safe_load((CONFIGS / "params_mm_llava_tiny_phase1.yaml").read_text())
    raw["train_input"] = dict(raw["train_input"], data_dir=str(tmp_path / "packed"), packed=True)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    final = compile_step(load_params(path), target=load_target("cs2"))[-1].program
    sched = final.schedule
    assert sched.real_token_share == pytest.approx(b)
    assert sched.real_tokens_per_s == pytest.approx(sched.tokens_per_s * b)
    notes = final.history[-1].notes
    assert notes["real_tokens_per_step"] == round(sched.batch_size * 96 * b)
