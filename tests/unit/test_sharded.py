"""Optimizer state keyed by index (``Optimizer``'s, in ``checkpoint.pt``) and by parameter name (DCP's)."""

from __future__ import annotations

import pytest
import torch

from tracking.parallel import sharded


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    # Two groups, the second listed first: names follow the optimizer's order, not the model's.
    optimizer = torch.optim.Adam(
        [{"params": model[2].parameters(), "lr": 0.1}, {"params": model[0].parameters()}], lr=0.01
    )
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_name_keyed_names_each_parameter_as_the_optimizer_pairs_them() -> None:
    model, optimizer = _trained()
    by_index = optimizer.state_dict()

    by_name = sharded.name_keyed(by_index, model, optimizer)

    assert [group["params"] for group in by_name["param_groups"]] == [["2.weight", "2.bias"], ["0.weight", "0.bias"]]
    assert torch.equal(by_name["state"]["2.weight"]["exp_avg"], by_index["state"][0]["exp_avg"])
    assert torch.equal(by_name["state"]["0.bias"]["exp_avg_sq"], by_index["state"][3]["exp_avg_sq"])
    back = sharded.index_keyed(by_name)
    assert back["param_groups"] == by_index["param_groups"]
    assert back["state"].keys() == by_index["state"].keys()


def test_name_keyed_refuses_an_optimizer_of_another_size() -> None:
    model, optimizer = _trained()
    smaller = torch.optim.Adam(model[0].parameters())

    with pytest.raises(ValueError, match="holds 4 parameters, the optimizer given 2"):
        sharded.name_keyed(optimizer.state_dict(), model, smaller)
