"""State-dict conversion between a Hugging Face ``CLIPModel`` and an open_clip CLIP (OpenAI layout).

The two implementations compute the same function with different parameter names and two layout
differences: open_clip keeps an attention's q, k and v projections packed in ``in_proj_weight``
(``[3 E, E]``, rows q; k; v) and its output projections as matrices used as ``x @ P`` (``visual.proj``,
``text_projection``), the transposes of Hugging Face's ``visual_projection`` / ``text_projection`` linear
weights. Use :func:`hf_clip_to_open_clip` to write a Hugging Face checkpoint as a file that
``open_clip.create_model(name, pretrained=file)`` (and so
:class:`~pefttune.towers.OpenCLIPImageTower` / :class:`~pefttune.towers.OpenCLIPTextTower` with
``pretrained: file``) loads, and :func:`open_clip_to_hf_clip` for the way back. OpenAI's CLIP weights use
QuickGELU: build the open_clip side as ``*-quickgelu`` (or with the ``openai`` tag).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Tensors renamed only (outside the blocks): Hugging Face name -> open_clip name.
_RENAMES: dict[str, str] = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
    **{
        f"{hf}.{kind}": f"{oc}.{kind}"
        for hf, oc in (
            ("vision_model.pre_layrnorm", "visual.ln_pre"),
            ("vision_model.post_layernorm", "visual.ln_post"),
            ("text_model.final_layer_norm", "ln_final"),
        )
        for kind in ("weight", "bias")
    },
}
_BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)
_HF_BLOCK = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_BLOCK = re.compile(r"(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)")
_TOWERS = {"vision_model": "visual.transformer", "text_model": "transformer"}
_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_IGNORED = re.compile(r".*position_ids$")


def hf_clip_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``CLIPModel`` state dict in open_clip's OpenAI layout.

    Raises:
        KeyError: naming a tensor that has no counterpart (the model is not a ``CLIPModel``), or a block
            whose q, k or v projection is missing.
    """
    result: dict[str, torch.Tensor] = {}
    packed: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if _IGNORED.match(key):
            continue
        if key in _PROJECTIONS:
            result[_PROJECTIONS[key]] = tensor.T.contiguous()
            continue
        block = _HF_BLOCK.fullmatch(key)
        if block:
            tower, index, name, kind = block.groups()
            prefix = f"{_TOWERS[tower]}.resblocks.{index}"
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                packed.setdefault((prefix, kind, "in_proj"), {})[name[-6]] = tensor
                continue
            renamed = dict(_BLOCK_RENAMES).get(name)
            if renamed is None:
                raise KeyError(f"no open_clip counterpart for Hugging Face tensor {key!r}")
            result[f"{prefix}.{renamed}.{kind}"] = tensor
            continue
        if key not in _RENAMES:
            raise KeyError(f"no open_clip counterpart for Hugging Face tensor {key!r}")
        result[_RENAMES[key]] = tensor
    for (prefix, kind, _), parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{prefix}: q, k and v projection {kind}s are needed, got {sorted(parts)}")
        result[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return result


def open_clip_to_hf_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (OpenAI layout) in Hugging Face ``CLIPModel``'s names.

    Raises:
        KeyError: naming a tensor that has no counterpart.
    """
    inverse_towers = {v: k for k, v in _TOWERS.items()}
    inverse_blocks = {v: k for k, v in _BLOCK_RENAMES}
    inverse_projections = {v: k for k, v in _PROJECTIONS.items()}
    result: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in inverse_projections:
            result[inverse_projections[key]] = tensor.T.contiguous()
            continue
        block = _OC_BLOCK.fullmatch(key)
        if block:
            tower, index, rest = block.groups()
            prefix = f"{inverse_towers[tower]}.encoder.layers.{index}"
            name, _, kind = rest.rpartition(".")
            if name == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    result[f"{prefix}.self_attn.{part}_proj.{kind.removeprefix('in_proj_')}"] = chunk
                continue
            if name not in inverse_blocks:
                raise KeyError(f"no Hugging Face counterpart for open_clip tensor {key!r}")
            result[f"{prefix}.{inverse_blocks[name]}.{kind}"] = tensor
            continue
        inverse = {v: k for k, v in _RENAMES.items()}
        if key not in inverse:
            raise KeyError(f"no Hugging Face counterpart for open_clip tensor {key!r}")
        result[inverse[key]] = tensor
    return result
