"""``mmgraph generate``: answer questions about images with a trained model.

The prompt is built exactly as training saw it (the preprocessing Encoder: ``vicuna_v1`` or
``plain``), images go where the prompt's ``<image>`` marks stand (one mark is put first when the
prompt has none, as LLaVA does) and pass through the params' eval transforms. Decoding keeps a
key-value cache allocated once for the whole sequence: the prompt is run once (prefill), then
one token at a time. Greedy by default; ``--temperature`` and ``--top_p`` sample (nucleus).

Batch mode (``--question_file``) reads LLaVA's question JSONL (``question_id``, ``image``,
``text``) and writes LLaVA's answer JSONL (``question_id``, ``prompt``, ``text``, ``answer_id``,
``model_id``, ``metadata``), the form its evaluation scripts read.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml

from mmgraph.convert.modelzoo import is_modelzoo_checkpoint, model_weights
from mmgraph.core.config import Params, load_params
from mmgraph.core.errors import Problem, UserError
from mmgraph.data import chat_format as cf
from mmgraph.data.images import BadImage, UnsafePath, confined, open_image
from mmgraph.data.preprocess import IMAGE, Encoder, Layout, Style
from mmgraph.data.transforms import build_transforms
from mmgraph.models import build_model
from mmgraph.models.llama import KVCache
from mmgraph.runtime import checkpoint
from mmgraph.runtime.checkpoint import load_weights


class Generator:
    def __init__(self, params: Params, weights: Optional[str], tokenizer: str, template: str = "vicuna_v1",
                 device: str = "cpu", seed: int = 0, chat_template: Optional[str] = None):
        self.params = params
        layout = params.layout("eval" if params.eval_input else "train")
        self.layout = layout
        self.encoder = Encoder(tokenizer, 1 if template == "plain" else 2,
                               Layout(layout.max_sequence_length, layout.num_patches, layout.max_num_img),
                               None, check_images=False, style=Style(template=template, chat_template=chat_template))
        self.model, _ = build_model(params, device=device, seed=seed)
        if weights:

            shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
            self._load(weights, model_weights(Path(weights), params.model, shapes) if is_modelzoo_checkpoint(weights)
                       else load_weights(weights))
        self.model.eval()
        self.data = params.eval_input or params.train_input
        self.transform = build_transforms(self.data.transforms)
        self.device = torch.device(device)
        self.context = min(layout.max_sequence_length, params.model.text_model.max_position_embeddings or 1 << 30)

    def _load(self, weights: str, state: dict) -> None:
        """Every key and shape checked before anything is copied."""
        own = self.model.state_dict()
        problems = [Problem(weights, k, "missing from the checkpoint") for k in own if k not in state]
        problems += [Problem(weights, k, f"shape {tuple(state[k].shape)} in the checkpoint, but the params build "
                             f"{tuple(v.shape)}") for k, v in own.items() if k in state and state[k].shape != v.shape]
        if problems:
            raise UserError(problems)
        self.model.load_state_dict({k: state[k] for k in own}, strict=True)

    # -- inputs ----------------------------------------------------------------------------
    def prompt_inputs(self, prompt: str, images: list[str]) -> tuple[list[int], list[list[int]], torch.Tensor]:
        prompt = self.encoder._placed(prompt, True)      # the images of a turn first, as preprocess does
        marks = prompt.count(IMAGE)
        if marks == 0 and images:          # LLaVA's convention: the images first
            prompt = (IMAGE + "\n") * len(images) + prompt
            marks = len(images)
        if marks != len(images):
            raise UserError(Problem(None, "--prompt", f"{marks} <image> marks but {len(images)} images"))
        if marks > self.layout.max_num_img:
            raise UserError(Problem(None, "--image", f"{marks} images > max_num_img {self.layout.max_num_img} "
                                    "of the params"))
        ids, locs = self._prompt_tokens(prompt)
        return ids, locs, self.load_images(images)

    def _prompt_tokens(self, prompt: str) -> tuple[list[int], list[list[int]]]:
        """The prompt as training saw it, up to where the reply starts."""
        enc = self.encoder
        if enc.template in ("plain", "vicuna_v1"):
            ids, _, locs = enc._tokens([{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}])
            return ids[:-1], locs                        # the reply's end-of-turn token: generated, not given

        turn = cf.Turn("user", prompt.replace(IMAGE, "").strip(), prompt.count(IMAGE))
        try:
            text = cf.chat_prompt(enc.tok, turn, enc.style.image_token, enc.style.chat_template)
        except Exception as err:   # a template is user code in Jinja: any failure is the template's
            raise UserError(Problem(None, "--chat_template", f"the chat template failed: {err}")) from None
        ids, _, locs = cf.tokens_from_text(enc.tok, text, [], False, enc.image_token_id, enc.placeholder,
                                           self.layout.num_patches)
        return ids, locs

    def load_images(self, images: list[str]) -> torch.Tensor:
        n = max(self.layout.max_num_img, 1)
        c, h, w = self.data.image_data_size
        out = torch.zeros(1, n, c, h, w)
        for i, name in enumerate(images):
            try:
                x = self.transform(open_image(Path(name)))
            except BadImage as err:
                raise UserError(Problem(name, None, str(err))) from None
            if tuple(x.shape) != (c, h, w):
                raise UserError(Problem(name, None, f"the params' transforms make this image {tuple(x.shape)}, the "
                                        f"model takes image_data_size {(c, h, w)} (add resize / center_crop)"))
            out[0, i] = x
        return out

    def embeddings(self, ids: list[int], locs: list[list[int]], image_data: torch.Tensor) -> torch.Tensor:
        n = image_data.shape[1]
        s = len(ids)
        loc = torch.full((1, n, self.layout.num_patches), s, dtype=torch.long)
        for i, positions in enumerate(locs):
            loc[0, i] = torch.tensor(positions)
        text = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            return self.model.compute_embeddings(image_data.to(self.device), text.to(self.device), loc.to(self.device))

    # -- decoding --------------------------------------------------------------------------
    def generate(self, prompt: str, images: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, use_cache: bool = True, seed: int = 0,
                 on_token: Optional[Callable[[int], None]] = None) -> list[int]:
        _check_decoding(max_new_tokens, temperature, top_p)
        ids, locs, image_data = self.prompt_inputs(prompt, images)
        if len(ids) >= self.context:
            raise UserError(Problem(None, "--prompt", f"the prompt is {len(ids)} tokens (images included); the "
                                    f"context is {self.context}"))
        budget = min(max_new_tokens, self.context - len(ids))
        gen = torch.Generator().manual_seed(seed)
        out: list[int] = []
        for token in (self._cached if use_cache else self._uncached)(ids, locs, image_data, budget, temperature,
                                                                      top_p, gen):
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token == self.encoder.eos:
                break
        return out

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        logits = logits.float().reshape(-1)
        if temperature <= 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p            # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    @torch.no_grad()
    def _cached(self, ids, locs, image_data, budget, temperature, top_p, gen) -> Iterator[int]:
        text = self.model.text_model
        emb = self.embeddings(ids, locs, image_data)
        cache = KVCache(text.config, 1, len(ids) + budget, emb.dtype, self.device)
        logits = text.forward_cached(emb, cache, token_modality_idx=self._modality(len(ids), locs))
        for _ in range(budget):
            token = self._pick(logits, temperature, top_p, gen)
            yield token
            if token == self.encoder.eos or cache.length >= cache.max_len:
                return
            x = text.compute_input_embeddings(torch.tensor([[token]], device=self.device))
            logits = text.forward_cached(x, cache)

    @torch.no_grad()
    def _uncached(self, ids, locs, image_data, budget, temperature, top_p, gen) -> Iterator[int]:
        """The reference: the whole sequence recomputed by the training forward at every step."""
        seq = list(ids)
        for _ in range(budget):
            emb = self.embeddings(seq, locs, image_data)
            logits = self.model.text_model(emb, token_modality_idx=self._modality(len(seq), locs))[:, -1]
            token = self._pick(logits, temperature, top_p, gen)
            yield token
            if token == self.encoder.eos:
                return
            seq.append(token)

    def _modality(self, length: int, locs: list[list[int]]) -> torch.Tensor:
        """token_modality_idx (1, length): 1 at image positions."""
        m = torch.zeros(1, length, dtype=torch.long, device=self.device)
        for positions in locs:
            m[0, positions] = 1
        return m

    def decode(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] == self.encoder.eos:
            tokens = tokens[:-1]
        return self.encoder.tok.decode(tokens, skip_special_tokens=True).strip()


def _check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    problems = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(Problem(None, "--max_new_tokens", f"must be at least 1, not {max_new_tokens}"))
    if not temperature >= 0.0:
        problems.append(Problem(None, "--temperature", f"must be 0 (greedy) or positive, not {temperature}"))
    if not 0.0 < top_p <= 1.0:
        problems.append(Problem(None, "--top_p", f"must be in (0, 1], not {top_p}"))
    if problems:
        raise UserError(problems)


def _tokenizer_for(tokenizer: Optional[str], checkpoint: Optional[str], params: Params) -> str:
    if tokenizer:
        return tokenizer
    candidates = []
    if checkpoint:
        p = Path(checkpoint)
        candidates += [p / "tokenizer", p.parent / "tokenizer", p.parent.parent / "tokenizer"]
    data = params.train_input or params.eval_input
    if data is not None and data.data_dir:
        candidates.append(Path(data.data_dir).parent / "tokenizer")
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return str(c)
    raise UserError(Problem(None, "--tokenizer", "no tokenizer found beside the checkpoint or the data; pass "
                            "--tokenizer DIR"))


def _latest_weights(model_dir_or_ckpt: Optional[str]) -> Optional[str]:
    """A model_dir means its latest checkpoint."""
    if model_dir_or_ckpt is None:
        return None

    p = Path(model_dir_or_ckpt)
    if p.is_dir() and (p / "checkpoints").is_dir():
        last = checkpoint.latest(p)
        if last is None:
            raise UserError(Problem(str(p), None, "no checkpoint in this model_dir"))
        return str(last)
    if not p.exists():
        raise UserError(Problem(str(p), None, "does not exist"))
    return str(p)


def run_generate(params_path: str, checkpoint_path: Optional[str], images: list[str], prompt: Optional[str],
                 max_new_tokens: int, temperature: float, top_p: float, tokenizer: Optional[str],
                 template: str, question_file: Optional[str], image_folder: Optional[str],
                 answers_file: Optional[str], seed: int, chat_template: Optional[str] = None) -> int:
    _check_decoding(max_new_tokens, temperature, top_p)
    params = load_params(params_path, "eval") if _has_eval(params_path) else load_params(params_path)
    weights = _latest_weights(checkpoint_path)
    if chat_template:
        try:
            chat_template, template = Path(chat_template).read_text(encoding="utf-8"), "chat"
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(Problem(chat_template, None, f"cannot read the chat template: {err}")) from None
    gen = Generator(params, weights, _tokenizer_for(tokenizer, weights, params), template, seed=seed,
                    chat_template=chat_template)
    if question_file:
        return _batch(gen, question_file, image_folder, answers_file, max_new_tokens, temperature, top_p,
                      seed, weights)
    if prompt is None:
        raise UserError(Problem(None, "--prompt", "required (or --question_file)"))
    shown = ""
    out: list[int] = []

    def stream(token: int) -> None:
        nonlocal shown
        out.append(token)
        text = gen.decode(out)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    gen.generate(prompt, images, max_new_tokens, temperature, top_p, seed=seed, on_token=stream)
    sys.stdout.write("\n")
    return 0


def _has_eval(path: str) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    trainer = raw.get("trainer") if isinstance(raw, dict) else None
    if isinstance(trainer, dict):              # the 2.4+ layout: a validation loader
        return any(isinstance(trainer.get(k), dict) and trainer[k].get("val_dataloader")
                   for k in ("fit", "validate"))
    return isinstance(raw, dict) and "eval_input" in raw


def _batch(gen: Generator, question_file: str, image_folder: Optional[str], answers_file: Optional[str],
           max_new_tokens: int, temperature: float, top_p: float, seed: int, weights: Optional[str]) -> int:
    questions = _read_questions(question_file)
    folder = image_folder or "."                    # images never leave their folder
    if answers_file is None:
        raise UserError(Problem(None, "--answers_file", "required with --question_file"))
    out_path = Path(answers_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    model_id = Path(weights).name if weights else "initialized"
    try:
        with open(tmp, "w") as f:
            for i, q in enumerate(questions):
                images = q.get("image") or []
                images = [images] if isinstance(images, str) else list(images)
                images = [_confined_image(question_file, i, folder, im) for im in images]
                tokens = gen.generate(q["text"], images, max_new_tokens, temperature, top_p, seed=seed + i)
                f.write(json.dumps({"question_id": q.get("question_id", i), "prompt": q["text"],
                                    "text": gen.decode(tokens), "answer_id": uuid.uuid4().hex[:22],
                                    "model_id": model_id, "metadata": {}}) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    print(f"wrote {len(questions)} answers to {out_path}")
    return 0


def _read_questions(question_file: str) -> list[dict]:
    path = Path(question_file)
    if not path.is_file():
        raise UserError(Problem(question_file, None, "does not exist"))
    try:
        text = path.read_bytes().decode("utf-8-sig")
        rows = (json.loads(text) if text.lstrip().startswith("[")
                else [json.loads(line) for line in text.splitlines() if line.strip()])
    except UnicodeDecodeError as err:
        raise UserError(Problem(question_file, f"byte {err.start}", "not UTF-8 text")) from None
    except json.JSONDecodeError as err:
        raise UserError(Problem(question_file, f"line {err.lineno}", f"malformed JSON: {err.msg}")) from None
    for i, q in enumerate(rows):
        if not isinstance(q, dict) or not isinstance(q.get("text"), str):
            raise UserError(Problem(question_file, f"question {i}", "needs a string 'text' (and 'question_id', "
                                    "'image')"))
        image = q.get("image")
        if image is not None and not isinstance(image, str) and not (
                isinstance(image, list) and all(isinstance(x, str) for x in image)):
            raise UserError(Problem(question_file, f"question {i}", "'image' must be a path or a list of paths"))
    return rows


def _confined_image(question_file: str, i: int, folder: str, name: str) -> str:
    try:
        return str(confined(folder, name))
    except UnsafePath as err:
        raise UserError(Problem(question_file, f"question {i}", str(err))) from None
