"""The kernel modules' host arithmetic (`ops_host`) against Python's own integer arithmetic."""

import math

import pytest
import torch

from linear_decay.ops_host import cdiv, next_power_of_2, sm_count


@pytest.mark.parametrize("divisor", [1, 2, 3, 16, 64, 1000])
def test_cdiv_is_the_ceiling(divisor):
    for value in range(0, 5000, 7):
        assert cdiv(value, divisor) == math.ceil(value / divisor)


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 63, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 64, 128]
    for n in range(1, 5000):
        power = next_power_of_2(n)
        assert power >= n and power & (power - 1) == 0 and power // 2 < n


def test_sm_count_on_cpu_is_the_callers_value():
    assert sm_count(torch.device("cpu"), cpu_value=8) == 8
    assert sm_count(torch.device("cpu"), cpu_value=None) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sm_count_matches_the_device_properties():
    device = torch.device("cuda", torch.cuda.current_device())
    assert sm_count(device, cpu_value=None) == torch.cuda.get_device_properties(device).multi_processor_count
    assert sm_count(torch.device("cuda"), cpu_value=None) == sm_count(device, cpu_value=None)


def test_per_tensor_keeps_a_value_while_the_tensor_lives_unchanged():
    import gc

    from linear_decay.ops_host import _PER_TENSOR, per_tensor

    calls = []

    def total(t):
        calls.append(1)
        return float(t.sum())

    mask = torch.ones(4)
    assert per_tensor(mask, total) == per_tensor(mask, total) == 4.0 and len(calls) == 1
    assert per_tensor(mask.clone(), total) == 4.0 and len(calls) == 2  # another tensor, the same values
    mask[0] = 0.0  # in place: recomputed
    assert per_tensor(mask, total) == 3.0 and len(calls) == 3
    with torch.inference_mode():  # values made there are not kept for use outside
        assert per_tensor(mask, total) == 3.0 and len(calls) == 4
        made_there = torch.ones(2)
        assert per_tensor(made_there, total) == per_tensor(made_there, total) == 2.0 and len(calls) == 6  # not kept
    assert per_tensor(mask, total) == 3.0 and len(calls) == 7
    key = id(mask)
    assert key in _PER_TENSOR
    del mask
    gc.collect()
    assert key not in _PER_TENSOR
