"""The resident model: built on the meta device, then each dense tensor read once and placed on the compute
device in the format the load plan chose. Experts are not here: they live in the store and the cache.

accelerate's `init_empty_weights` builds the module tree without allocating, and `set_module_tensor_to_device`
puts each tensor in place (the dtype given explicitly: it would otherwise cast to the meta parameter's
float32). Every parameter and buffer must be set: one left on the meta device is a bug, reported as such.
"""

from __future__ import annotations

from itertools import chain

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from ..formats.int8_linear import ATTENTION_SUFFIXES, Int8Linear, int8_attention, int8_attention_state, int8_head
from ..modeling.decode_step import DecodeStep
from ..modeling.layers import rope_tables
from ..modeling.transformer import ROUTER_BIAS, Transformer
from .checkpoint import Checkpoint, check_finite


def dense_state(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, attention_group: int | None,
                head_group: int | None) -> dict[str, torch.Tensor]:
    """Every resident tensor by our name, on `device`, as the model holds it: in `dtype`, int8 parts where the
    attention or head is quantized (here, on the device, or as a packed folder stored them), the router's
    correction bias in float32 (transformers keeps it so: it decides close choices)."""
    c = ckpt.config
    state = {}
    for name in ckpt.expected_dense():
        t = ckpt.dense(name)
        check_finite((t,), f"{ckpt.path}: tensor {name}")  # on the host, before the copy
        t = t.to(device)
        if name.endswith(Int8Linear.PARTS):  # a packed folder's int8 attention: stored as the model holds it
            state[name] = t
        elif attention_group is not None and name.endswith(ATTENTION_SUFFIXES):
            state |= int8_attention_state(name, t, attention_group)
        elif name.endswith(ROUTER_BIAS):
            state[name] = t.float()
        else:
            state[name] = t.to(dtype)
    if head_group is not None:  # a tied embedding stays dense beside its int8 copy
        w = state["tok_embeddings.weight"] if c.tie_word_embeddings else state.pop("output.weight")
        state |= int8_attention_state("output.weight", w, head_group)
    elif c.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def load_resident(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, context: int,
                  attention_group: int | None, head_group: int | None) -> Transformer:
    """The model with its dense weights on `device` and RoPE tables for `context` positions, in eval mode; its
    MoE layers still need a cache (`model.cache`)."""
    c = ckpt.config
    with init_empty_weights(include_buffers=True):
        model = Transformer(c)
        if attention_group is not None:
            int8_attention(model, attention_group)
        if head_group is not None:
            int8_head(model, head_group)
    state = dense_state(ckpt, device, dtype, attention_group, head_group)
    expected = dict(chain(model.named_parameters(), model.named_buffers()))
    extra, missing = state.keys() - expected.keys(), expected.keys() - state.keys()
    if extra or missing:  # the name tables and the model disagree: ours to fix, not the user's
        raise RuntimeError(f"resident tensors do not match the model: missing {sorted(missing)[:4]}, "
                           f"unexpected {sorted(extra)[:4]}")
    for name, t in state.items():
        set_module_tensor_to_device(model, name, device, value=t, dtype=t.dtype, clear_cache=False)
    model.rope = rope_tables(c.rotary_dim, c.rope_theta, context, device, c.rope_scaling)
    model.decode_step = DecodeStep.build(model)  # holds the weights' addresses: built once they are final
    return model.eval()
