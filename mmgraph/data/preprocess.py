"""``mmgraph preprocess``: LLaVA-format conversations to H5 shards (the Model Zoo's layout).

Per sample, one row of ``max_seq_length`` tokens; every ``<image>`` mark becomes
``num_patches`` placeholder tokens. Placement: ``turn_start`` (the Model Zoo's, default) moves a
turn's images before its text; ``inline`` keeps them where they stand. Templates:

- ``plain`` (phase 1): ``<s> [image tokens] caption </s>``; the human prompt is dropped, the
  caption and ``</s>`` are supervised;
- ``vicuna_v1`` (phase 2): ``<s> SYSTEM USER: question ASSISTANT: answer </s> USER: ...``; only
  the assistant replies and their ``</s>`` are supervised;
- ``chat`` / ``prompt_completion``: the tokenizer's chat template, or the Model Zoo's phase-1
  prompt + sep_token + completion (``mmgraph.data.chat_format``).

Shards (``mmgraph.data.shard_writer``): ``data`` (N x 5 x S int32: input_ids, loss_mask, labels,
key_padding_mask, token_modality_idx), ``img_path`` (N x max_num_img utf-8, relative to the
image folder, ``"None"`` for an empty slot), ``has_img`` (N x 1 bool), ``img_data_loc``
(N x max_num_img x num_patches int32, padding = S); attribute ``n_examples``; ``stats.json`` and
``data_params.json`` beside them. Labels are input ids shifted by one; ``loss_mask[t]`` says
whether ``labels[t]`` is supervised.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.h5schema import PACKED_FIELDS, ROW_FIELDS
from mmgraph.core.packing import PackStats, pack
from mmgraph.data import chat_format as cf
from mmgraph.data.images import BadImage, UnsafePath, confined, open_image
from mmgraph.data.shard_writer import OutputFolder

ROWS = ("input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
IMAGE = "<image>"


class SampleError(Exception):
    """A sample that cannot become a row; ``reason`` is a short key for the statistics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self):                     # crosses from a worker process intact
        return SampleError, (self.reason, str(self))


@dataclass(frozen=True)
class Layout:
    max_seq_length: int
    num_patches: int
    max_num_img: int


@dataclass(frozen=True)
class Style:
    """How conversations become text. The defaults are mmgraph's ``--phase`` behaviour; a Model
    Zoo preprocessing YAML sets the rest (``mmgraph.data.modelzoo_preproc``)."""

    template: Optional[str] = None       # plain | vicuna_v1 | chat | prompt_completion (None: by phase)
    placement: str = "turn_start"        # turn_start: a turn's images before its text; inline: where marked
    chat_template: Optional[str] = None  # Jinja text overriding the tokenizer's
    image_token: str = IMAGE             # the token standing for an image in formatted text
    mark: str = IMAGE                    # the mark in the LLaVA JSON
    sep_token: Optional[str] = None      # prompt_completion: after the prompt (None: tokenizer's, else <|sep|>)
    end_of_turn: Optional[str] = None    # chat: the token closing a supervised reply (default eos)
    pad_placeholders: bool = False       # image positions hold pad_id (the Model Zoo) or the image token
    one_image_per_turn: bool = False     # the Model Zoo's hooks refuse two marks in one turn
    conversations_key: str = "conversations"
    image_key: str = "image"
    content_key: str = "value"
    role_key: str = "from"

    def resolved(self, phase: int) -> str:
        return self.template or ("plain" if phase == 1 else "vicuna_v1")


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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
                 on_long: str = "truncate", check_images: bool = True, style: Optional[Style] = None):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(Problem(str(tokenizer_dir), None, f"not a tokenizer folder ({str(err).splitlines()[0]})")) from None
        self.phase, self.layout, self.on_long = phase, layout, on_long
        self.style = style or Style()
        self.template = self.style.resolved(phase)
        self.image_dir = Path(image_dir) if image_dir else None
        self.check_images = check_images
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        if self.template in ("chat", "prompt_completion") and self.style.image_token not in self.tok.get_vocab():
            self.tok.add_special_tokens({"additional_special_tokens": [self.style.image_token]})
        image_id = self.tok.convert_tokens_to_ids(self.style.image_token)
        self.image_token_id = image_id
        self.image_id = image_id if image_id is not None and image_id != self.tok.unk_token_id else self.pad
        self.placeholder = self.pad if self.style.pad_placeholders else self.image_id
        self._system = self.ids(SYSTEM + " ") if self.template == "vicuna_v1" else []

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def encode(self, sample) -> Encoded:
        st = self.style
        if not isinstance(sample, dict):
            raise SampleError("malformed", f"a sample must be a JSON object, not {type(sample).__name__}")
        convs = sample.get(st.conversations_key)
        if not isinstance(convs, list) or not convs:
            raise SampleError("malformed", f"no {st.conversations_key!r} list")
        for i, turn in enumerate(convs):
            if (not isinstance(turn, dict) or st.role_key not in turn
                    or not isinstance(turn.get(st.content_key), str)):
                raise SampleError("malformed", f"{st.conversations_key}[{i}] needs {st.role_key!r} and a string "
                                  f"{st.content_key!r}")
            expected = "user" if i % 2 == 0 else "assistant"
            if ROLES.get(turn[st.role_key]) != expected:
                raise SampleError("not_alternating", f"{st.conversations_key}[{i}] is from {turn[st.role_key]!r}, "
                                  f"expected {'human' if expected == 'user' else 'gpt'!r} (turns must alternate "
                                  "human, gpt)")
        if len(convs) % 2:
            raise SampleError("not_alternating", "the conversation ends with a human turn")
        images = self._images(sample)
        values = [t[st.content_key] for t in convs]
        marks = sum(v.count(st.mark) for v in values)
        if marks == 0 and images:           # LLaVA puts the image first when no mark is given
            values[0] = st.mark + "\n" + values[0]
            marks = 1
        if marks != len(images):
            raise SampleError("image_count", f"{marks} <image> marks but {len(images)} images")
        if marks > self.layout.max_num_img:
            raise SampleError("too_many_images", f"{marks} images > max_num_img {self.layout.max_num_img}")
        for i, v in enumerate(values):
            if i % 2 and st.mark in v:
                raise SampleError("image_in_reply", f"{st.conversations_key}[{i}]: an <image> mark in a reply")
            if st.one_image_per_turn and v.count(st.mark) > 1:
                raise SampleError("too_many_images", f"{st.conversations_key}[{i}]: {v.count(st.mark)} <image> "
                                  "marks in one turn (the Model Zoo allows one)")
        for name in images:
            self._check_image(name)
        ids, sup, locs = self._tokens_for(values)
        return self._row(ids, sup, locs, images)

    def _images(self, sample: dict) -> list[str]:
        images = sample.get(self.style.image_key) or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(n, str) and n for n in images):
            raise SampleError("malformed", f"{self.style.image_key!r} must be a path or a list of paths, not "
                              f"{json.dumps(sample.get(self.style.image_key))[:60]}")
        return list(images)

    def _check_image(self, name: str) -> None:
        try:
            path = confined(self.image_dir, name)
        except UnsafePath as err:
            raise SampleError("unsafe_path", str(err)) from None
        if not self.check_images:
            return
        if not path.is_file():
            raise SampleError("missing_image", f"image {name} not found in {self.image_dir}")
        try:
            open_image(path)                    # decoded: what the loader will do with it
        except BadImage as err:
            raise SampleError("unreadable_image", str(err)) from None

    def _placed(self, value: str, human: bool) -> str:
        """turn_start: the turn's marks moved before its text (the Model Zoo's placement)."""
        mark = self.style.mark
        if not human or self.style.placement == "inline" or mark not in value:
            return value
        pieces = [p.strip() for p in value.split(mark)]
        text = " ".join(p for p in pieces if p)
        return mark * value.count(mark) + ("\n" + text if text else "")

    def _tokens_for(self, values: list[str]) -> tuple[list[int], list[int], list[list[int]]]:
        values = [self._placed(v, i % 2 == 0) for i, v in enumerate(values)]
        if self.template in ("plain", "vicuna_v1"):
            return self._tokens([{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                                 for i, v in enumerate(values)])

        st, turns = self.style, []
        for i, v in enumerate(values):
            role = "user" if i % 2 == 0 else "assistant"
            if st.placement == "inline":
                turns.append(cf.Turn(role, v.strip(), v.count(st.mark), v.replace(st.mark, st.image_token)))
            else:
                turns.append(cf.Turn(role, v.replace(st.mark, "").strip(), v.count(st.mark)))
        try:
            if self.template == "chat":
                text, spans = cf.chat_text(self.tok, turns, st.image_token, st.chat_template, st.end_of_turn)
                add_special = False
            else:
                sep = st.sep_token if st.sep_token is not None else (self.tok.sep_token or "<|sep|>")
                text, spans = cf.prompt_completion_text(turns, st.image_token, sep, self.tok.eos_token,
                                                        keep_prompt_text=self.phase != 1)
                add_special = True
        except Exception as err:    # a template is user code in Jinja: any failure is the template's
            raise SampleError("template", f"the chat template failed: {err.__class__.__name__}: {err}") from None
        return cf.tokens_from_text(self.tok, text, spans, add_special, self.image_token_id, self.placeholder,
                                   self.layout.num_patches)

    def _segments(self, text: str, ids: list[int], sup: list[int], locs: list[list[int]], supervised: int) -> None:
        parts = text.split(self.style.mark)
        for k, part in enumerate(parts):
            if k > 0:
                locs.append(list(range(len(ids), len(ids) + self.layout.num_patches)))
                ids += [self.placeholder] * self.layout.num_patches
                sup += [0] * self.layout.num_patches
            piece = self.ids(part.strip("\n") if self.template == "vicuna_v1" else "")
            ids += piece
            sup += [supervised] * len(piece)

    def _tokens(self, convs: list[dict]) -> tuple[list[int], list[int], list[list[int]]]:
        """plain / vicuna_v1 (mmgraph's templates; generate builds its prompts with them)."""
        vicuna = self.template == "vicuna_v1"
        ids, sup, locs = [self.bos], [0], []
        if vicuna:
            ids += self._system
            sup += [0] * len(self._system)
        for i in range(0, len(convs), 2):
            human, answer = convs[i]["value"], convs[i + 1]["value"]
            if vicuna:
                head = self.ids("USER: ")
                ids += head
                sup += [0] * len(head)
            self._segments(human, ids, sup, locs, 0)          # plain: only the image marks stay
            if vicuna:
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

    def add(self, e: Encoded) -> None:
        self.written += 1
        self.tokens += e.tokens
        self.supervised += e.supervised
        self.images[len(e.img_paths)] += 1

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


def read_samples(path: str) -> list:
    """The LLaVA JSON list (or JSON lines) of one file; encoding and syntax errors named."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise UserError(Problem(path, None, f"cannot read: {err.strerror}")) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(Problem(path, f"line {line}, byte {err.start}", "not UTF-8 text (LLaVA JSON is UTF-8)")) from None
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(Problem(path, f"line {err.lineno}, column {err.colno}", f"malformed JSON: {err.msg}")) from None
    if not isinstance(data, list):
        raise UserError(Problem(path, None, "expected a JSON list of samples"))
    return data


def preprocess(input_json: str, image_dir: str, tokenizer: str, output_dir: str, phase: int,
               layout: Layout, samples_per_file: int = 1000, num_workers: int = 1,
               on_error: str = "fail", on_long: str = "truncate", progress: bool = True,
               style: Optional[Style] = None, shuffle_seed: Optional[int] = None,
               config: Optional[dict] = None, pack: Optional["PackOptions"] = None) -> dict:
    """Write the shards, ``stats.json`` and ``data_params.json``; returns the statistics. The
    output folder changes only when the run completes with at least one shard. With ``pack``,
    rows hold several samples (``mmgraph.core.packing``) and the statistics say how many rows
    packing saved."""

    inputs = input_json if isinstance(input_json, list) else [input_json]
    samples, origin = [], []
    for path in inputs:
        got = read_samples(path)
        samples += got
        origin += [(path, i) for i in range(len(got))]
    order = list(range(len(samples)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    style = style or Style()
    stats = Stats()
    args = (tokenizer, phase, layout, image_dir, on_long, True, style)
    buffer: list[Encoded] = []
    window: list[Encoded] = []                  # samples waiting to be packed
    packing = PackStats()
    _init_worker(args)                          # the tokenizer is checked before anything is written
    with OutputFolder(output_dir) as out:
        def flush(final: bool = False):
            if pack is not None and window and (final or len(window) >= pack.window):
                buffer.extend(pack.rows(window, layout, _WORKER.pad, packing))
                window.clear()
            while buffer and (final or len(buffer) >= samples_per_file):
                chunk = buffer[:samples_per_file]
                del buffer[:samples_per_file]
                I = layout.max_num_img
                out.write_shard(np.stack([e.rows for e in chunk]),
                                [e.img_paths + ["None"] * (I - len(e.img_paths)) for e in chunk],
                                np.stack([e.img_loc for e in chunk]),
                                {"max_seq_length": layout.max_seq_length, "num_patches": layout.num_patches,
                                 "max_num_img": I, "phase": phase, "template": style.resolved(phase)}
                                | ({"packed": True} if pack is not None else {}))

        for index, encoded, err in _results(args, [(i, samples[i]) for i in order], num_workers, progress):
            if err is not None:
                if on_error == "fail":
                    sid = samples[index].get("id", "?") if isinstance(samples[index], dict) else "?"
                    path, k = origin[index]
                    raise UserError(Problem(path, f"sample {k} (id {sid})", str(err)))
                stats.skipped[err.reason] += 1
                continue
            stats.add(encoded)
            (window if pack is not None else buffer).append(encoded)
            flush()
        flush(final=True)
        if out.shards == 0:
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items())) or "the input is empty"
            raise UserError(Problem(", ".join(inputs), None, f"no sample could be written ({skipped}); "
                                    f"{output_dir} was left as it was"))
        result = stats.as_dict()
        if pack is not None:
            result["packing"] = packing.as_dict(layout.max_seq_length, pack.window, pack.seed)
        out.write_json("stats.json", result)
        params = _data_params(config, tokenizer, output_dir, image_dir, phase, layout, style, stats, _WORKER)
        if pack is not None:
            params["features"] += list(PACKED_FIELDS)
            params["dataset"]["packed"] = True
            params["post-process"]["n_rows"] = packing.rows_after
        out.write_json("data_params.json", params)
        out.commit()
    return result


@dataclass(frozen=True)
class PackOptions:
    """``--pack``: first-fit decreasing within windows of ``window`` samples, seeded."""

    window: int = 1000
    seed: int = 0

    def rows(self, window: list, layout: Layout, pad_id: int, stats) -> list:
        seed = self.seed + stats.rows_before           # each window its own (deterministic) seed
        return pack(window, layout.max_seq_length, layout.max_num_img, layout.num_patches, pad_id, seed, stats)


def _results(args, items, num_workers: int, progress: bool):
    if num_workers > 1:
        pool = multiprocessing.get_context("fork").Pool(num_workers, _init_worker, (args,))
        results = pool.imap(_encode, items, chunksize=64)
    else:
        pool, results = None, map(_encode, items)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(items), desc="preprocess", unit="samples", leave=False)
    try:
        yield from results
    finally:
        if pool is not None:
            pool.terminate()


def _data_params(config, tokenizer, output_dir, image_dir, phase, layout, style, stats, encoder) -> dict:
    """The Model Zoo's ``data_params.json``: its setup / processing / dataset sections and counts."""
    tok = encoder
    base = json.loads(json.dumps(config, default=str)) if config else {}
    base.setdefault("setup", {}).update(output_dir=output_dir, image_dir=image_dir, mode="finetuning")
    base.setdefault("processing", {}).update(
        max_seq_length=layout.max_seq_length, huggingface_tokenizer=tokenizer,
        pad_id=getattr(tok, "pad", None), eos_id=getattr(tok, "eos", None),
        vocab_size=len(tok.tok) if hasattr(tok, "tok") else None)
    base.setdefault("dataset", {}).update(num_patches=layout.num_patches, max_num_img=layout.max_num_img,
                                          is_multimodal=True, template=style.resolved(phase), phase=phase)
    base["features"] = list(ROW_FIELDS)
    base["post-process"] = {"n_examples": stats.written, "discarded": sum(stats.skipped.values()),
                            "successful": stats.written, "processed": stats.written + sum(stats.skipped.values()),
                            "num_tokens": stats.tokens, "loss_valid_tokens": stats.supervised}
    return base
