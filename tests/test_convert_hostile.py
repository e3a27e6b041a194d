"""Hostile checkpoints and configs for ``mmgraph convert`` (issue 25, items 8 and 10): every
malformed safetensors header, index or config is exit 2 naming the file (and key), with no
traceback and nothing written; paths and links never leave the source folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mmgraph.cli import main
from tests.hf_tiny import make_hf_llava


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    llava, _, _, _ = make_hf_llava(root / "parts")
    llava.save_pretrained(root / "tf", max_shard_size="200KB")        # sharded: an index too
    return root / "tf"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed header of a safetensors file and write it back (data kept)."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header = edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def _edit_entry(change):
    def edit(header):
        key = _first_tensor(header)
        header[key] = change(header[key], header)
        return header
    return edit


def _overlap(entry, header):
    keys = [k for k in header if k != "__metadata__"]
    other = header[keys[1]]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    lo = other["data_offsets"][0]
    return {**entry, "data_offsets": [lo, lo + size]} if other["data_offsets"][1] - lo >= size else entry


HEADERS = {
    "negative offsets": (_edit_entry(lambda e, h: {**e, "data_offsets": [-64, -64 + e["data_offsets"][1]
                                                                          - e["data_offsets"][0]]}),
                         "data_offsets"),
    "overlapping offsets": (_edit_entry(_overlap), "overlaps"),
    "a list header": (lambda h: [1, 2, 3], "the header is a list"),
    "a non-object entry": (_edit_entry(lambda e, h: 5), "not an object"),
    "three offsets": (_edit_entry(lambda e, h: {**e, "data_offsets": [0, 4, 8]}), "is not two integers"),
    "a dtype list": (_edit_entry(lambda e, h: {**e, "dtype": ["F32"]}), "is not a name"),
    "a missing shape": (_edit_entry(lambda e, h: {k: v for k, v in e.items() if k != "shape"}),
                        "is not a list of non-negative integers"),
    "F32 declared I32": (_edit_entry(lambda e, h: {**e, "dtype": "I32"} if e["dtype"] == "F32" else e),
                         "a weight must be floating point"),
}


def _run(src: Path, out: Path) -> int:
    return main(["convert", "--src-fmt", "hf", "--tgt-fmt", "native", "--output-dir", str(out), str(src)])


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_safetensors_headers_are_named(hf, tmp_path, capsys, case):
    edit, message = HEADERS[case]
    src = _copy(hf, tmp_path / "src")
    shard = _shard(src)
    _rewrite_header(shard, edit)
    assert _run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {shard}") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _edit_json(name: str, change):
    def edit(src: Path) -> Path:
        path = src / name
        doc = json.loads(path.read_text())
        path.write_text(json.dumps(change(doc)))
        return path
    return edit


def _first_weight(doc: dict) -> str:
    return next(iter(doc["weight_map"]))


CONFIGS = {
    "a weight_map list": (_edit_json("model.safetensors.index.json", lambda d: {**d, "weight_map": [1, 2]}),
                          "weight_map"),
    "a non-string weight_map value": (_edit_json("model.safetensors.index.json",
                                                 lambda d: {**d, "weight_map": {**d["weight_map"],
                                                                                _first_weight(d): 7}}),
                                      "weight_map"),
    "an index path out of the folder": (_edit_json("model.safetensors.index.json",
                                                   lambda d: {**d, "weight_map": {**d["weight_map"],
                                                                                  _first_weight(d): "../x.safetensors"}}),
                                        "leaves the folder"),
    "a text_config list": (_edit_json("config.json", lambda d: {**d, "text_config": [1]}), "text_config"),
    "a vision_config string": (_edit_json("config.json", lambda d: {**d, "vision_config": "clip"}), "vision_config"),
    "a non-number hidden_size": (_edit_json("config.json", lambda d: {**d, "text_config": {
        **d["text_config"], "hidden_size": "wide"}}), "config.json"),
    "1e8 layers": (_edit_json("config.json", lambda d: {**d, "text_config": {**d["text_config"],
                                                                             "num_hidden_layers": 10 ** 8}}),
                   "layers is beyond the supported"),
    "a config list": (_edit_json("config.json", lambda d: [d]), "config.json"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_malformed_indexes_and_configs_are_named(hf, tmp_path, capsys, case):
    edit, message = CONFIGS[case]
    src = _copy(hf, tmp_path / "src")
    path = edit(src)
    assert _run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmgraph: error: {path}") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_tokenizer_file_linked_out_of_the_source_is_refused(hf, tmp_path, capsys):
    src = _copy(hf, tmp_path / "src")
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "do not copy"}')
    (src / "tokenizer_config.json").unlink(missing_ok=True)
    (src / "tokenizer_config.json").symlink_to(secret)
    assert _run(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{src / 'tokenizer_config.json'}" in err and "leaves the folder" in err, err
    assert not (tmp_path / "out").exists()
