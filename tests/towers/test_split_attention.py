"""SplitMultiheadAttention computes what nn.MultiheadAttention computes, and exports back after LoRA merges."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from pefttune.layers.split_qkv import SplitMultiheadAttention


def _attention(batch_first: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    with torch.no_grad():
        attention.in_proj_bias.normal_()
        attention.out_proj.bias.normal_()
    return attention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal-float", "causal-bool", "per-head", "padding"])
def test_same_function_as_multihead_attention(batch_first, mask):
    attention = _attention(batch_first).eval()
    split = SplitMultiheadAttention.from_multihead_attention(attention).eval()
    x = torch.randn(3, 7, 32)
    if not batch_first:
        x = x.transpose(0, 1)
    kwargs: dict = {}
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    if mask == "causal-float":
        kwargs["attn_mask"] = torch.zeros(7, 7).masked_fill(causal, float("-inf"))
    elif mask == "causal-bool":
        kwargs["attn_mask"] = causal
    elif mask == "per-head":
        kwargs["attn_mask"] = torch.randn(3 * 4, 7, 7)
    elif mask == "padding":
        padding = torch.zeros(3, 7, dtype=torch.bool)
        padding[0, 5:] = True
        kwargs["key_padding_mask"] = padding
    want = attention(x, x, x, need_weights=False, **kwargs)[0]
    got, weights = split(x, x, x, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_copies_follow_the_original_and_refuse_other_layouts():
    attention = _attention(True)
    attention.requires_grad_(False)
    split = SplitMultiheadAttention.from_multihead_attention(attention)
    assert not any(p.requires_grad for p in split.parameters())
    with pytest.raises(ValueError, match="kdim"):
        SplitMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    with pytest.raises(ValueError, match="add_bias_kv"):
        SplitMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(32, 4, add_bias_kv=True))


def test_merged_lora_exports_to_a_plain_multihead_attention():
    holder = nn.Module()
    holder.attn = SplitMultiheadAttention.from_multihead_attention(_attention(True)).eval()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(config, holder)
    with torch.no_grad():
        for name, parameter in holder.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    x = torch.randn(2, 5, 32)
    adapted = holder.attn(x, x, x)[0]
    for module in holder.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    exported = holder.attn.to_multihead_attention().eval()
    torch.testing.assert_close(exported(x, x, x, need_weights=False)[0], adapted, rtol=1e-5, atol=1e-5)
