"""memzoo.create_optimizer: names, target matrices, decay groups, and that what it builds trains."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import memzoo
from memzoo.optim import (
    APOLLO,
    AdamMini,
    COSMOS,
    FRUGAL,
    FiraAdamW,
    QZO,
    GaLoreAdafactor,
    GaLoreAdamW,
    Lion,
    MeZO,
    NaturalGaLore,
    SparseMeZO,
    create_optimizer,
    list_optimizers,
    target_parameters,
)
from memzoo.optim.factory import FACTORY_NAMES
from memzoo.optim.registry import OPTIMIZERS, factory_names


class TinyLM(torch.nn.Module):
    """Embedding, two blocks of attention-like and MLP Linear layers with norms, a head."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q_proj": torch.nn.Linear(16, 16), "up_proj": torch.nn.Linear(16, 24),
                                 "down_proj": torch.nn.Linear(24, 16), "norm": torch.nn.LayerNorm(16)})
            for _ in range(2))
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block["q_proj"](block["norm"](x))
            x = x + block["down_proj"](torch.relu(block["up_proj"](x)))
        return self.lm_head(x)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.arange(32).remainder(50).view(4, 8)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))


# Each create_optimizer name and the class it builds, from the registry's records; the names and
# classes the issues asked for are checked against them below.
EXPECTED = {name.name: torch.optim.AdamW if info is None else info.cls for name, info in factory_names()}
ISSUE_NAMES = {"adamw": torch.optim.AdamW, "lion": Lion, "galore_adamw": GaLoreAdamW, "galore_adamw_8bit": GaLoreAdamW,
               "natural_galore": NaturalGaLore, "apollo": APOLLO, "apollo_mini": APOLLO, "frugal": FRUGAL,
               "cosmos": COSMOS, "adam_mini": AdamMini, "mezo": MeZO, "sparse_mezo": SparseMeZO, "qzo": QZO,
               "fira": FiraAdamW, "galore_adafactor": GaLoreAdafactor}
# The papers' rank (density for FRUGAL) on the target matrices when the caller gives none.
PAPER_DEFAULTS = {"galore_adamw": ("rank", 128), "galore_adamw_8bit": ("rank", 128), "natural_galore": ("rank", 128),
                  "apollo": ("rank", 256), "apollo_mini": ("rank", 1), "frugal": ("density", 0.25),
                  "cosmos": ("rank", 64), "fira": ("rank", 128), "galore_adafactor": ("rank", 128)}
# Keywords a name needs on TinyLM (it has no config): Adam-mini's hidden size and heads; a given lr
# needs Adafactor's relative step off (as galore-torch).
MODEL_KWARGS = {"adam_mini": {"dim": 16, "n_heads": 4}, "galore_adafactor": {"relative_step": False}}


def test_every_issue_name_is_listed_with_a_description() -> None:
    names = list_optimizers()
    assert set(names) == set(EXPECTED) and ISSUE_NAMES.items() <= EXPECTED.items()
    assert list(names)[0] == "adamw" and list(names)[1:] == [
        name.name for info in OPTIMIZERS.values() for name in info.factory_names()]
    assert all(isinstance(text, str) and len(text) > 20 for text in names.values())
    assert memzoo.list_optimizers() == names and memzoo.create_optimizer is create_optimizer


def test_low_rank_defaults_are_the_papers() -> None:
    """One record per optimizer holds its default rank: the factory, bench step and its
    constructor agree on it (COSMOS's constructor default is its record's)."""
    for name, (key, value) in PAPER_DEFAULTS.items():
        info = FACTORY_NAMES[name].info
        assert (info.target_key, info.default_rank) == (key, value), name
    assert inspect.signature(COSMOS).parameters["rank"].default == OPTIMIZERS["cosmos"].default_rank


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: adamw, lion, galore_adamw"):
        create_optimizer(TinyLM(), "adam")


def test_default_targets_are_the_linear_layers_but_the_head() -> None:
    model = TinyLM()
    targets = {id(p) for p in target_parameters(model)}
    expected = {id(block[key].weight) for block in model.blocks for key in ("q_proj", "up_proj", "down_proj")}
    assert targets == expected
    tied = TinyLM(tied=True)
    tied.lm_head = torch.nn.Linear(16, 50, bias=False)  # renamed head: caught by the tie rule instead
    tied.decoder = tied.lm_head
    del tied.lm_head
    tied.decoder.weight = tied.embed.weight
    assert id(tied.embed.weight) not in {id(p) for p in target_parameters(tied)}


@pytest.mark.parametrize("targets,expected", [
    (r"blocks\.\d+\.q_proj", {"q_proj"}),  # a regex matches whole names
    (["up_proj", "down_proj"], {"up_proj", "down_proj"}),  # list items match as substrings
    (["blocks.0.q_proj"], {"q_proj0"}),
])
def test_target_modules_follow_the_hugging_face_rule(targets, expected) -> None:
    model = TinyLM()
    names = {}
    for index, block in enumerate(model.blocks):
        for key in ("q_proj", "up_proj", "down_proj"):
            names[id(block[key].weight)] = key if targets != ["blocks.0.q_proj"] else f"{key}{index}"
    found = {names[id(p)] for p in target_parameters(model, targets)}
    assert found == expected


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"qzo"}))
def test_factory_builds_the_class_with_decay_and_target_groups(name: str) -> None:
    model = TinyLM()
    optimizer = create_optimizer(model, name.upper(), lr=1e-3, weight_decay=0.1, **MODEL_KWARGS.get(name, {}))
    assert type(optimizer) is EXPECTED[name]
    groups = optimizer.param_groups
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    for group in groups:
        vectors = [p.dim() <= 1 for p in group["params"]]
        assert all(vectors) or not any(vectors), "biases and norms share groups only with each other"
        assert group["weight_decay"] == (0.0 if all(vectors) else 0.1)
        assert group["lr"] == 1e-3
    info = FACTORY_NAMES[name].info
    switch = None if info is None else info.target_key
    if switch:
        projected = [g for g in groups if g[switch] is not None]
        assert len(projected) == 1 and {id(p) for p in projected[0]["params"]} == {
            id(p) for p in target_parameters(model)}
        assert projected[0][switch] == info.default_rank
    if name == "galore_adamw_8bit":
        assert optimizer.defaults["optim_bits"] == 8


@pytest.mark.parametrize("name", ["adamw", "lion", "galore_adamw", "apollo", "frugal", "cosmos"])
def test_factory_optimizers_train(name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = create_optimizer(model, name, lr=1e-2, rank=4, backend="torch") if name not in ("adamw", "lion", "frugal") \
        else create_optimizer(model, name, lr=1e-2 if name != "lion" else 3e-3)
    initial = _loss(model).item()
    for _ in range(30):
        optimizer.zero_grad()
        _loss(model).backward()
        optimizer.step()
    assert _loss(model).item() < 0.8 * initial


def test_adam_mini_gets_names_and_the_model_config() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    with pytest.raises(ValueError, match=r"one block per attention head, and TinyLM has no config giving dim and "
                                         r"n_heads: pass dim=, n_heads="):
        create_optimizer(model, "adam_mini")
    model.config = type("Config", (), {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2})()
    optimizer = create_optimizer(model, "adam_mini", lr=1e-2, weight_decay=0.1)
    assert (optimizer.defaults["dim"], optimizer.defaults["n_heads"], optimizer.defaults["n_kv_heads"]) == (16, 4, 2)
    rules = {name: (rule, blocks) for _, name, rule, blocks in optimizer.block_partitions()}
    assert rules["blocks.0.q_proj.weight"] == ("head", 4) and rules["embed.weight"] == ("row", 50)
    assert rules["blocks.1.norm.weight"] == ("tensor", 1) and rules["blocks.0.up_proj.bias"] == ("element", 24)
    assert create_optimizer(model, "adam_mini", n_heads=2).defaults["n_heads"] == 2  # given beats the config
    initial = _loss(model).item()
    for _ in range(30):
        optimizer.zero_grad()
        _loss(model).backward()
        optimizer.step()
    assert _loss(model).item() < 0.8 * initial


def test_zeroth_order_names_step_from_a_closure() -> None:
    model = TinyLM()
    optimizer = create_optimizer(model, "mezo", lr=1e-3)
    before = _loss(model).item()
    optimizer.step(lambda: _loss(model))
    assert _loss(model).item() != before


def test_overrides_of_rank_decay_and_targets() -> None:
    model = TinyLM()
    optimizer = create_optimizer(model, "galore_adamw", rank=2, update_proj_gap=10, target_modules=["up_proj"],
                                 no_decay=["norm"], weight_decay=0.05)
    projected = [g for g in optimizer.param_groups if g["rank"] is not None]
    assert projected[0]["rank"] == 2 and projected[0]["update_proj_gap"] == 10
    assert {id(p) for p in projected[0]["params"]} == {id(b["up_proj"].weight) for b in model.blocks}
    exempt = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert {id(p) for g in exempt for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if "norm" in n}  # biases are decayed now
    with pytest.raises(ValueError, match="no target matrices for apollo"):
        create_optimizer(model, "apollo", target_modules=["nothing_like_this"])


def test_qzo_takes_the_scales_and_optionally_the_rest() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, compress_statistics=False), torch.nn.LayerNorm(32)).to("cpu")
    optimizer = create_optimizer(model, "qzo", lr=1e-4)
    assert [p.dtype for p in optimizer.param_groups[0]["params"]] == [torch.float32]
    assert len(optimizer.param_groups) == 1
    with_rest = create_optimizer(model, "qzo", train_unquantized=True)
    assert [g["scales"] for g in with_rest.param_groups] == [True, False]
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layers"):
        create_optimizer(TinyLM(), "qzo")


def test_layerwise_true_wraps_the_same_groups_in_a_layerwise_optimizer() -> None:
    from memzoo.optim import LayerwiseOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    layerwise = create_optimizer(model, "galore_adamw", lr=0.01, rank=2, update_proj_gap=2, backend="torch",
                                 layerwise=True)
    ordinary = create_optimizer(twin, "galore_adamw", lr=0.01, rank=2, update_proj_gap=2, backend="torch")
    assert isinstance(layerwise, LayerwiseOptimizer)
    # One group per parameter: the Linear weights are targets (a Sequential names no head).
    assert [g["rank"] for g in layerwise.param_groups] == [2, 2, None, None, None, None]
    x = torch.randn(4, 6)
    for _ in range(3):
        model(x).square().mean().backward()
        layerwise.step()
        twin(x).square().mean().backward()
        ordinary.step()
        ordinary.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="takes no gradients"):
        create_optimizer(model, "mezo", layerwise=True)
