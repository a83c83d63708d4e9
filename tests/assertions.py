"""Assertions shared by the test packages."""

import math

import torch


def assert_same_state(a, b, where: str = "") -> None:
    """`a` and `b` are the same nested state: same types, same keys in the same order, same lengths,
    tensors of the same dtype and shape with the same bits (so NaN payloads and -0.0 count), and
    equal plain values (a float NaN matches a NaN). `where` names the path in failure messages."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{where} differs"  # bits, not values
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
