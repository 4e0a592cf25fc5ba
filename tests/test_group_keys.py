"""Param-group keys: a key no rule reads is refused (with the closest valid name) by every
optimizer; the keys torch and trainers add are accepted."""

from __future__ import annotations

import pytest
import torch

from memzoo.optim.base import FOREIGN_GROUP_KEYS
from memzoo.optim.registry import OPTIMIZERS


def _group(info, **keys):
    weight = torch.nn.Parameter(torch.randn(8, 6))
    group = {"params": [weight], **keys}
    if info.name == "qzo":  # a plain tensor is a QZO group only as "scales": False (MeZO on it)
        group["scales"] = False
    return weight, group


@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda info: info.name)
def test_misspelled_group_key_is_refused_with_the_closest_name(info) -> None:
    weight, group = _group(info, weight_dacay=0.1)
    with pytest.raises(ValueError, match=r"param group 0: unknown key 'weight_dacay' \(did you mean 'weight_decay'\?\)"):
        info.cls([group])
    # Added later: refused before the optimizer changes.
    other, _ = _group(info)
    optimizer = info.cls([{"params": [other], **({"scales": False} if info.name == "qzo" else {})}])
    with pytest.raises(ValueError, match="param group 1: unknown key 'weight_dacay'"):
        optimizer.add_param_group(group)
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("cls_name,key,meant", [("galore_adamw", "rnak", "rank"), ("frugal", "desnity", "density"),
                                                ("natural_galore", "natural_histroy", "natural_history")])
def test_the_issue_examples(cls_name, key, meant) -> None:
    info = OPTIMIZERS[cls_name]
    _, group = _group(info, **{key: 1})
    with pytest.raises(ValueError, match=f"unknown key '{key}' \\(did you mean '{meant}'\\?\\)"):
        info.cls([group])


@pytest.mark.parametrize("info", OPTIMIZERS.values(), ids=lambda info: info.name)
def test_keys_torch_and_trainers_add_are_accepted(info) -> None:
    foreign = {key: 1e-3 for key in FOREIGN_GROUP_KEYS - {"param_names", "name"}}
    _, group = _group(info, name="blocks", **foreign)
    optimizer = info.cls([group])
    assert optimizer.param_groups[0]["name"] == "blocks"
    # A scheduler that adds its own keys, and a rebuild from the groups it left (as trainers do).
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10, cycle_momentum=False)
    info.cls([dict(optimizer.param_groups[0])])


def test_a_checkpoint_from_before_a_group_key_existed_takes_its_default() -> None:
    """Natural GaLore's group key ``natural`` is new: a state_dict saved without it loads, and the
    group gets the default (the behaviour it was saved with) instead of a KeyError at the next step."""
    from memzoo.optim import NaturalGaLore

    weight = torch.nn.Parameter(torch.randn(6, 5))
    optimizer = NaturalGaLore([weight], rank=2, update_proj_gap=2)
    weight.grad = torch.randn(6, 5)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["memzoo"]["format"] = 2  # as written before the key existed (format 3 saves every key)
    for group in saved["param_groups"]:
        del group["natural"]
    restored = NaturalGaLore([weight], rank=2, update_proj_gap=2)
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["natural"] is True
    restored.step()
    assert int(restored.state[weight]["nat_count"]) == 2
