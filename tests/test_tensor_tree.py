"""train/tensor_tree.py: optimiser and schedule state saved without pickle, read back equal."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train.tensor_tree import load_tree, save_tree


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def test_an_adamw_and_schedule_state_round_trip_and_keep_training_alike(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step(), schedule.step(), opt.zero_grad()
    tree = {"optimizer": opt.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
            "odd": {1: (float("inf"), None, True, "x"), "nan": float("nan")}}
    save_tree(tree, tmp_path / "state")
    back = load_tree(tmp_path / "state")
    assert _equal(tree, back)
    assert list(back["optimizer"]["state"]) == [0, 1] and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95))
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(2, 4)
    for m, o in ((model, opt), (twin, opt2)):
        m(x).sum().backward()
        o.step()
    torch.testing.assert_close(model.weight, twin.weight, rtol=0, atol=0)


def test_tensors_over_one_storage_and_empty_ones_round_trip(tmp_path):
    """safetensors refuses two entries over one storage: such tensors are copied, the rest saved as they are."""
    flat = torch.arange(12, dtype=torch.bfloat16)
    tree = {"a": flat[:6], "b": flat[6:], "same": [flat, flat], "empty": [torch.zeros(0), torch.zeros(0, 3)],
            "scalar": torch.tensor(3), "mask": torch.tensor([True, False])}
    save_tree(tree, tmp_path / "state")
    assert _equal(tree, load_tree(tmp_path / "state"))


def test_an_8bit_optimizer_state_round_trips(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Linear(64, 64)
    try:
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=16)
        model(torch.randn(2, 64)).sum().backward()
        opt.step()
    except (RuntimeError, NotImplementedError, AttributeError) as e:  # a bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes' 8-bit AdamW does not run here: {e}")
    state = opt.state_dict()
    save_tree(state, tmp_path / "state")
    assert _equal(state, load_tree(tmp_path / "state"))


@pytest.mark.parametrize("json_text,says", [
    ('{"__pickle__": "x"}', "none of"),
    ('{"__tensor__": "t9"}', "not one tensor of the file"),
    ('[{"__tensor__": "t0"}, {"__tensor__": "t0"}]', "not one tensor of the file"),
    ('{"__float__": "1e400"}', "a float"),
    ('{"__dict__": [[[1], 2]]}', "a dict key that is a list"),
    ('{"__dict__": [[1]]}', "no [key, value] pair"),
    ('{"__tuple__": 5}', "holds no list"),
])
def test_an_edited_tree_is_a_value_error_never_an_object(tmp_path, json_text, says):
    save_tree({"w": torch.zeros(2)}, tmp_path / "state")
    (tmp_path / "state.json").write_text(json_text)
    with pytest.raises(ValueError, match=says.replace("[", r"\[")):
        load_tree(tmp_path / "state")


def test_a_value_json_cannot_hold_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="cannot save a set without pickle"):
        save_tree({"s": {1, 2}}, tmp_path / "state")
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "state.safetensors").exists()
