"""The GPU fast-path helpers (probe.runtime) are no-ops on the CPU, and autocast is never enabled there."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from probe.runtime import autocast, fast_model, pin_memory, to_device_batch

CPU = torch.device("cpu")


def test_fast_model_is_a_no_op_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    before = {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    out = fast_model(model, CPU)
    assert out is model
    assert {k: (v.data_ptr(), v.stride()) for k, v in out.state_dict().items()} == before
    assert all(p.is_contiguous() for p in out.parameters())  # not channels_last


def test_to_device_batch_is_a_no_op_on_cpu():
    x = torch.randn(2, 3, 5, 5)
    y = torch.tensor([0, 1])
    assert to_device_batch(x, CPU) is x and to_device_batch(y, CPU) is y
    assert to_device_batch(x, CPU).is_contiguous()


def test_autocast_is_not_enabled_on_cpu():
    a = torch.randn(4, 4)
    for enabled in (True, False):
        with autocast(CPU, enabled):
            assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
            assert (a @ a).dtype == torch.float32
    assert pin_memory(CPU) is False


def test_statistics_pass_with_amp_requested_is_identical_on_cpu():
    from probe.activations import LogGrid, collect

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x, y = torch.randn(20, 2, 8, 8), torch.randint(0, 3, (20,))
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 20, 7)]
    runs = [collect(model, batches, ["0", "3"], CPU, 3, LogGrid(), 3, amp=amp) for amp in (False, True)]
    (s0, t0), (s1, t1) = [(r, r.exemplars) for r in runs]
    for name in ("0", "3"):
        for k, v in s0[name].state().items():
            np.testing.assert_array_equal(v, s1[name].state()[k], err_msg=f"{name}/{k}")
        for k, v in t0[name].state().items():
            np.testing.assert_array_equal(v, t1[name].state()[k])
