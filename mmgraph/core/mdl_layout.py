"""The Model Zoo's weight layout in its .mdl checkpoints, against mmgraph's (which is Hugging
Face's, tensor for tensor). Four differences, each undone exactly (permutations and copies, so
conversions are bit for bit both ways):

1. Names: the trainer saves ``trainer.model.state_dict()`` of its wrapper (``LlavaModel.model``,
   ``MMSimpleModel.model``), so every key starts with ``model.`` (the converters' rule
   ``EquivalentSubkey("", "model.")``, ``tools/checkpoint_converters/helper.py``). The ``llava``
   model also names its parts ``image_model.*`` (the ViT), ``projector_image_model.*``, where
   mmgraph has ``image_model.image_model_list.0.0.*`` and ``image_model.projection.*``.
2. ``text_model.ln_f`` is a second name of the final norm (``gpt2_model.py``: ``self.ln_f`` is
   passed as the decoder's ``norm``): the state dict holds both, with equal values, and the
   trainer's strict loading needs both (``llama.py`` converter, ``replace_final_norm``).
3. LLaMA q/k rows interleaved per head over the first ``rotary_dim`` rows: the Model Zoo's
   rotary embedding rotates adjacent pairs where Hugging Face rotates halves
   (``RotaryPositionEmbeddingHelper.py`` ``rotate_every_two``; the converter's
   ``interleave_helper`` / ``reverse_interleave_helper``, ``llama.py``). In one head, Model Zoo
   row 2j is row j here and row 2j+1 is row j + rotary_dim/2. Keys use the key/value head count.
4. The ViT position embedding keeps the CLS row last (``ViTEmbeddingLayer.py``: "cls pe is the
   last"; ``clip_vit.py`` ``position_embeddings_convert`` rolls it), where mmgraph and Hugging
   Face keep it first.

Tensors pass through as ``Entry``s whose ``load`` applies the change, so a conversion streams one
tensor at a time.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Optional

import torch

from mmgraph.core.config import ModelConfig
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.tensorio import Entry

PREFIX = "model."
VIT0 = "image_model.image_model_list.0.0."
PROJ = "image_model.projection."
TEXT = "text_model."
FINAL_NORM = "text_model.transformer_decoder.norm."
LN_F = "text_model.ln_f."
_QK = re.compile(r"text_model\.transformer_decoder\.layers\.\d+\..*proj_([qk])_dense_layer\.(weight|bias)$")
_POS = re.compile(r"image_model\.image_model_list\.(\d+)\.0\.embedding_layer\.position_embeddings\.weight$")
# The llava model's own module names (mmgraph prefix, Model Zoo prefix after "model.").
_LLAVA = ((VIT0, "image_model."), (PROJ, "projector_image_model."), (TEXT, "text_model."))


# -- names -------------------------------------------------------------------------------------

def modelzoo_name(native: str, cfg: ModelConfig) -> str:
    """mmgraph's parameter name -> the key in the .mdl's ``model`` state dict."""
    if cfg.name == "llava":
        for ours, theirs in _LLAVA:
            if native.startswith(ours):
                return PREFIX + theirs + native[len(ours):]
        raise UserError(Problem(None, native, "no llava-model parameter corresponds to this name"))
    return PREFIX + native


def native_name(key: str, cfg: ModelConfig) -> Optional[str]:
    """A key of the .mdl's ``model`` state dict -> mmgraph's name (None: no such parameter)."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    if cfg.name == "llava":
        for ours, theirs in _LLAVA:
            if rest.startswith(theirs):
                return ours + rest[len(theirs):]
        return None
    return rest


# -- tensors -----------------------------------------------------------------------------------

def _heads(native: str, cfg: ModelConfig) -> Optional[tuple[int, int, int]]:
    """(heads, head_dim, rotary_dim) for a q/k projection of the LLM, else None."""
    m = _QK.match(native)
    if m is None:
        return None
    t = cfg.text_model
    heads = t.num_heads if m.group(1) == "q" else t.num_kv_heads
    return heads, t.head_dim, t.rotary_dim or t.head_dim


def _interleave(t: torch.Tensor, heads: int, head_dim: int, rotary: int, to_modelzoo: bool) -> torch.Tensor:
    """Rows of each head's first ``rotary`` features: halves (mmgraph, HF) <-> pairs (Model Zoo)."""
    rest = t.shape[1:]
    x = t.reshape(heads, head_dim, -1)                                   # (heads, head_dim, in)
    rot, keep = x[:, :rotary], x[:, rotary:]
    if to_modelzoo:      # [a0..a_{r/2-1}, b0..] -> [a0, b0, a1, b1, ...]
        rot = rot.reshape(heads, 2, rotary // 2, -1).permute(0, 2, 1, 3)
    else:                # [a0, b0, a1, b1, ...] -> [a0..., b0...]
        rot = rot.reshape(heads, rotary // 2, 2, -1).permute(0, 2, 1, 3)
    rot = rot.reshape(heads, rotary, -1)
    return torch.cat((rot, keep), dim=1).reshape(t.shape[0], *rest).contiguous()


def _roll_cls(t: torch.Tensor, to_modelzoo: bool) -> torch.Tensor:
    """The CLS row: first (mmgraph, HF) <-> last (Model Zoo)."""
    return torch.cat((t[1:], t[:1]) if to_modelzoo else (t[-1:], t[:-1]), dim=0).contiguous()


def transform(native: str, cfg: ModelConfig, to_modelzoo: bool) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The change one tensor needs between the layouts (None: the same values)."""
    heads = _heads(native, cfg)
    if heads is not None:
        n, hd, rd = heads
        if rd % 2 or rd > hd:
            raise UserError(Problem(None, "model.text_model.rotary_dim", f"{rd}: must be even and at most the "
                                    f"head size {hd} to convert q/k rows"))
        return lambda t: _interleave(t, n, hd, rd, to_modelzoo)
    m = _POS.match(native)
    if m is not None:
        models = cfg.image_model_list.image_models
        i = int(m.group(1))
        if i < len(models) and models[i].encoder.prepend_cls_token:
            return lambda t: _roll_cls(t, to_modelzoo)
    return None


def _mapped(e: Entry, key: str, fn: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> Entry:
    if fn is None:
        return Entry(key, e.file, e.shape, e.dtype, e.load)
    return Entry(key, e.file, e.shape, e.dtype, lambda: fn(e.load()))


# -- whole state dicts -------------------------------------------------------------------------

def to_modelzoo(entries: dict[str, Entry], cfg: ModelConfig) -> "OrderedDict[str, Entry]":
    """mmgraph's weights (native names) -> the .mdl's ``model`` state dict, in the Model Zoo's
    order (the llava model: encoder, LLM, projector), ``ln_f`` beside the embeddings."""
    out: OrderedDict[str, Entry] = OrderedDict()
    # The Model Zoo's module order: llava: encoder, LLM, projector; multimodal_simple: encoders,
    # projection, LLM.
    groups = (VIT0, TEXT, PROJ) if cfg.name == "llava" else ("image_model.image_model_list.", PROJ, TEXT)
    order = sorted(entries, key=lambda k: next((i for i, p in enumerate(groups) if k.startswith(p)), len(groups)))
    norms = [k for k in order if k.startswith(FINAL_NORM)]
    for k in order:
        e = entries[k]
        out[modelzoo_name(k, cfg)] = _mapped(e, modelzoo_name(k, cfg), transform(k, cfg, True))
        if k == "text_model.embedding_layer.word_embeddings.weight":
            for n in norms:
                alias = modelzoo_name(LN_F + n[len(FINAL_NORM):], cfg)
                out[alias] = _mapped(entries[n], alias, None)
    for n in norms:                          # no embeddings: the aliases still go in
        alias = modelzoo_name(LN_F + n[len(FINAL_NORM):], cfg)
        out.setdefault(alias, _mapped(entries[n], alias, None))
    return out


def from_modelzoo(model: dict[str, Entry], cfg: ModelConfig, where: str) -> "OrderedDict[str, Entry]":
    """The .mdl's ``model`` state dict -> mmgraph's weights (native names). ``ln_f`` must equal
    the final norm (it is the same parameter there) and is dropped; a key with no mmgraph
    parameter is an error naming it (``FILE: model.<key>: ...``)."""
    out: OrderedDict[str, Entry] = OrderedDict()
    aliases: dict[str, Entry] = {}
    for key, e in model.items():
        if not isinstance(e, Entry):
            raise UserError(Problem(where, f"model.{key}", "not a tensor"))
        native = native_name(key, cfg)
        if native is None:
            raise UserError(Problem(where, f"model.{key}", f"not a parameter of the {cfg.name} model (its keys "
                                    f"start with {_expected_prefixes(cfg)})"))
        if native.startswith(LN_F):
            aliases[native] = (key, e)
            continue
        out[native] = _mapped(e, native, transform(native, cfg, False))
    for alias, (key, e) in aliases.items():
        norm = FINAL_NORM + alias[len(LN_F):]
        if norm not in out:           # only the alias: it is the final norm
            out[norm] = _mapped(e, norm, None)
        elif out[norm].shape != e.shape or not torch.equal(out[norm].load(), e.load()):
            raise UserError(Problem(where, f"model.{key}", f"differs from model.{modelzoo_name(norm, cfg)} (the "
                                    "same parameter in the Model Zoo: the final norm)"))
    return out


def _expected_prefixes(cfg: ModelConfig) -> str:
    if cfg.name == "llava":
        return ", ".join(PREFIX + theirs for _, theirs in _LLAVA)
    return f"{PREFIX}image_model., {PREFIX}text_model."
