"""Nested state (an optimiser's or a schedule's state_dict, an RNG state) saved without pickle: its tensors
in a safetensors file, everything else in a JSON file beside it, each tensor there a reference to its key.

A checkpoint folder can come from anywhere (a run dir copied from another machine), and even torch's
`weights_only` unpickler has had ways to run code (CVE-2025-32434, torch < 2.6, which tunesmith's range
allows): reading these two files builds only tensors, numbers, strings, lists, tuples and dicts.

What the JSON holds: a dict is {"__dict__": [[key, value], ...]} (optimiser state is keyed by ints),
a tuple {"__tuple__": [...]}, a tensor {"__tensor__": "tN"}, a non-finite float {"__float__": "inf"}.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith import fsio

_MARKERS = ("__dict__", "__tuple__", "__tensor__", "__float__")


def save_tree(tree: Any, stem: Path) -> None:
    """Write `tree` as STEM.safetensors and STEM.json (TypeError for a value of another kind). The tensors
    are gathered in host memory for safetensors (one write), as the trainable weights are."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, tensors, set())
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    tensors.clear()
    fsio.write_json(stem.with_suffix(".json"), encoded)


def _encode(x: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()  # a GPU tensor: a fresh host copy already
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or ptr == 0:  # safetensors refuses two entries over one storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(x, dict):
        return {"__dict__": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors, storages) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors, storages) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot save a {type(x).__name__} without pickle")


def load_tree(stem: Path, device: torch.device | str = "cpu") -> Any:
    """The tree `save_tree` wrote at `stem`, its tensors on `device` (ValueError for anything else)."""
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _decode(fsio.read_json(stem.with_suffix(".json")), tensors, set(), device)


def _decode(x: Any, tensors: dict[str, torch.Tensor], used: set[str], device) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors, used, device) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) != 1 or next(iter(x)) not in _MARKERS:
        raise ValueError(f"an object that is none of {', '.join(_MARKERS)}")
    kind, value = next(iter(x.items()))
    if kind == "__tensor__":
        if value not in tensors or value in used:
            raise ValueError(f"a tensor reference {str(value)[:40]} that is not one tensor of the file")
        used.add(value)
        return tensors[value].to(device)
    if kind == "__float__":
        if value not in ("inf", "-inf", "nan"):
            raise ValueError(f"a float {str(value)[:40]}")
        return float(value)
    if not isinstance(value, list):
        raise ValueError(f"{kind} that holds no list")
    if kind == "__tuple__":
        return tuple(_decode(v, tensors, used, device) for v in value)
    if not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ValueError("a __dict__ entry that is no [key, value] pair")
    return {_key(_decode(k, tensors, used, device)): _decode(v, tensors, used, device) for k, v in value}


def _key(k: Any) -> Any:
    if isinstance(k, (list, dict)):
        raise ValueError("a dict key that is a list or a dict")
    return k
