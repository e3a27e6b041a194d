"""``mmgraph preprocess``: LLaVA-format conversations to H5 shards (Model Zoo 2.3 layout).

Per sample, one row of ``max_seq_length`` tokens; every ``<image>`` mark becomes
``num_patches`` placeholder tokens where it stands. Templates:

- phase 1, ``plain``: ``<s> [image tokens] caption </s>``; the human prompt is dropped, the
  caption and ``</s>`` are supervised;
- phase 2, ``vicuna_v1``: ``<s> SYSTEM USER: question ASSISTANT: answer </s> USER: ...``; only the
  assistant replies and their ``</s>`` are supervised.

H5 datasets per shard: ``data`` (N x 5 x S int32: input_ids, loss_mask, labels,
key_padding_mask, token_modality_idx), ``img_path`` (N x max_num_img utf-8, relative to the
image folder, empty for padding), ``has_img`` (N x 1 bool), ``img_data_loc`` (N x max_num_img x
num_patches int32, padding = S); attribute ``n_examples``. Labels are input ids shifted by one;
``loss_mask[t]`` says whether ``labels[t]`` is supervised.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mmgraph.errors import Problem, UserError

ROWS = ("input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
IMAGE = "<image>"


class SampleError(Exception):
    """A sample that cannot become a row; ``reason`` is a short key for the statistics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Layout:
    max_seq_length: int
    num_patches: int
    max_num_img: int


@dataclass
class Encoded:
    rows: np.ndarray            # (5, S) int32
    img_paths: list[str]
    img_loc: np.ndarray         # (max_num_img, num_patches) int32
    tokens: int
    supervised: int


class Encoder:
    """Turns one conversation into one row (tokenizer loaded once per process)."""

    def __init__(self, tokenizer_dir: str, phase: int, layout: Layout, image_dir: Optional[str],
                 on_long: str = "truncate", check_images: bool = True):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.phase, self.layout, self.on_long = phase, layout, on_long
        self.image_dir = Path(image_dir) if image_dir else None
        self.check_images = check_images
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        image_id = self.tok.convert_tokens_to_ids(IMAGE)
        self.image_id = image_id if image_id is not None and image_id != self.tok.unk_token_id else self.pad
        self._system = self.ids(SYSTEM + " ") if phase == 2 else []

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def encode(self, sample: dict) -> Encoded:
        convs = sample.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise SampleError("malformed", "no 'conversations' list")
        for i, turn in enumerate(convs):
            if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
                raise SampleError("malformed", f"conversations[{i}] needs 'from' and a string 'value'")
            expected = "human" if i % 2 == 0 else "gpt"
            if turn["from"] != expected:
                raise SampleError("not_alternating", f"conversations[{i}] is from {turn['from']!r}, "
                                  f"expected {expected!r} (turns must alternate human, gpt)")
        if len(convs) % 2:
            raise SampleError("not_alternating", "the conversation ends with a human turn")
        images = sample.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        marks = sum(t["value"].count(IMAGE) for t in convs)
        if marks == 0 and images:           # LLaVA puts the image first when no mark is given
            convs = [dict(convs[0], value=IMAGE + "\n" + convs[0]["value"])] + convs[1:]
            marks = 1
        if marks != len(images):
            raise SampleError("image_count", f"{marks} <image> marks but {len(images)} images")
        if marks > self.layout.max_num_img:
            raise SampleError("too_many_images", f"{marks} images > max_num_img {self.layout.max_num_img}")
        if self.check_images:
            for name in images:
                self._check_image(name)
        ids, sup, locs = self._tokens(convs)
        return self._row(ids, sup, locs, images)

    def _check_image(self, name: str) -> None:
        from PIL import Image, UnidentifiedImageError

        path = self.image_dir / name if self.image_dir else Path(name)
        if not path.is_file():
            raise SampleError("missing_image", f"image {name} not found in {self.image_dir}")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise SampleError("unreadable_image", f"image {name} cannot be read: {err}") from None

    def _segments(self, text: str, ids: list[int], sup: list[int], locs: list[list[int]], supervised: int) -> None:
        parts = text.split(IMAGE)
        for k, part in enumerate(parts):
            if k > 0:
                locs.append(list(range(len(ids), len(ids) + self.layout.num_patches)))
                ids += [self.image_id] * self.layout.num_patches
                sup += [0] * self.layout.num_patches
            piece = self.ids(part.strip("\n") if self.phase == 2 else "")
            ids += piece
            sup += [supervised] * len(piece)

    def _tokens(self, convs: list[dict]) -> tuple[list[int], list[int], list[list[int]]]:
        ids, sup, locs = [self.bos], [0], []
        if self.phase == 2:
            ids += self._system
            sup += [0] * len(self._system)
        for i in range(0, len(convs), 2):
            human, answer = convs[i]["value"], convs[i + 1]["value"]
            if self.phase == 2:
                head = self.ids("USER: ")
                ids += head
                sup += [0] * len(head)
            self._segments(human, ids, sup, locs, 0)          # plain: only the image marks stay
            if self.phase == 2:
                mid = self.ids(" ASSISTANT: ")
                ids += mid
                sup += [0] * len(mid)
            reply = self.ids(answer) + [self.eos]
            ids += reply
            sup += [1] * len(reply)
        return ids, sup, locs

    def _row(self, ids, sup, locs, images) -> Encoded:
        S, P, I = self.layout.max_seq_length, self.layout.num_patches, self.layout.max_num_img
        if len(ids) > S:
            if self.on_long == "skip":
                raise SampleError("too_long", f"{len(ids)} tokens > max_seq_length {S}")
            if any(loc[-1] >= S for loc in locs):
                raise SampleError("too_long", f"{len(ids)} tokens > max_seq_length {S} and an image "
                                  "would be cut")
            ids, sup = ids[:S], sup[:S]
            if sum(sup[1:]) == 0:
                raise SampleError("too_long", f"nothing supervised is left within max_seq_length {S}")
        n = len(ids)
        rows = np.zeros((5, S), dtype=np.int32)
        rows[0, :n] = ids
        rows[0, n:] = self.pad
        rows[2, : n - 1] = ids[1:]                      # labels: next token
        rows[2, n - 1:] = self.pad
        rows[1, : n - 1] = sup[1:]                      # loss_mask: is labels[t] supervised
        rows[3, n:] = 1                                 # key_padding_mask: 1 = pad
        loc = np.full((I, P), S, dtype=np.int32)
        for k, positions in enumerate(locs):
            loc[k] = positions
            rows[4, positions] = 1                      # token_modality_idx: 1 = image
        return Encoded(rows, list(images), loc, n, int(rows[1].sum()))


@dataclass
class Stats:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: int = 0
    supervised: int = 0
    images: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"samples_written": self.written, "samples_skipped": dict(self.skipped),
                "tokens": self.tokens, "supervised_tokens": self.supervised,
                "supervised_share": round(self.supervised / self.tokens, 4) if self.tokens else 0.0,
                "images_per_sample": {str(k): v for k, v in sorted(self.images.items())}}


_WORKER: Optional[Encoder] = None


def _init_worker(args) -> None:
    global _WORKER
    _WORKER = Encoder(*args)


def _encode(item):
    index, sample = item
    try:
        return index, _WORKER.encode(sample), None
    except SampleError as err:
        return index, None, err


def read_samples(path: str) -> list[dict]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(Problem(path, None, f"cannot read: {err.strerror}")) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(Problem(path, f"line {err.lineno}, column {err.colno}", f"malformed JSON: {err.msg}")) from None
    if not isinstance(data, list):
        raise UserError(Problem(path, None, "expected a JSON list of samples"))
    return data


def preprocess(input_json: str, image_dir: str, tokenizer: str, output_dir: str, phase: int,
               layout: Layout, samples_per_file: int = 1000, num_workers: int = 1,
               on_error: str = "fail", on_long: str = "truncate", progress: bool = True) -> dict:
    """Write the shards and ``stats.json``; returns the statistics. Shards are written to a
    temporary folder and moved into ``output_dir`` only when every sample has been handled."""
    import h5py

    samples = read_samples(input_json)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".preprocess.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stats = Stats()
    args = (tokenizer, phase, layout, image_dir, on_long)
    items = list(enumerate(samples))
    buffer: list[Encoded] = []
    shard = 0

    def flush():
        nonlocal shard, buffer
        if not buffer:
            return
        n, S, I, P = len(buffer), layout.max_seq_length, layout.max_num_img, layout.num_patches
        with h5py.File(tmp / f"data-{shard:05d}.h5", "w") as f:
            f.create_dataset("data", data=np.stack([e.rows for e in buffer]), chunks=(min(n, 64), 5, S),
                             compression="gzip", compression_opts=1)
            paths = np.array([e.img_paths + [""] * (I - len(e.img_paths)) for e in buffer], dtype=object)
            f.create_dataset("img_path", data=paths, dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("has_img", data=np.array([[bool(e.img_paths)] for e in buffer]))
            f.create_dataset("img_data_loc", data=np.stack([e.img_loc for e in buffer]),
                             chunks=(min(n, 64), I, P), compression="gzip", compression_opts=1)
            f.attrs.update({"n_examples": n, "max_seq_length": S, "num_patches": P, "max_num_img": I,
                            "phase": phase, "template": "plain" if phase == 1 else "vicuna_v1"})
        shard += 1
        buffer = []

    try:
        if num_workers > 1:
            pool = multiprocessing.get_context("fork").Pool(num_workers, _init_worker, (args,))
            results = pool.imap(_encode, items, chunksize=64)
        else:
            _init_worker(args)
            pool, results = None, map(_encode, items)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(items), desc="preprocess", unit="samples", leave=False)
        for index, encoded, err in results:
            if err is not None:
                if on_error == "fail":
                    sid = samples[index].get("id", "?") if isinstance(samples[index], dict) else "?"
                    raise UserError(Problem(input_json, f"sample {index} (id {sid})", str(err)))
                stats.skipped[err.reason] += 1
                continue
            stats.written += 1
            stats.tokens += encoded.tokens
            stats.supervised += encoded.supervised
            stats.images[len(encoded.img_paths)] += 1
            buffer.append(encoded)
            if len(buffer) >= samples_per_file:
                flush()
        flush()
        if pool is not None:
            pool.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in out.glob("data-*.h5"):
        old.unlink()
    for f in sorted(tmp.iterdir()):
        f.replace(out / f.name)
    result = stats.as_dict()
    (tmp / "stats.json").write_text(json.dumps(result, indent=2) + "\n")
    (tmp / "stats.json").replace(out / "stats.json")
    tmp.rmdir()
    return result
