"""probe.trace and probe.models.head: the forward-pass facts, on hand-built nets where they are known."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe.models import build
from probe.models.head import logits_model, softmax_head
from probe.trace import key, trace_forward


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x  # in place: the value going into the ReLU is no longer bn's output
        return self.relu(out)


def test_an_in_place_add_makes_a_new_value():
    b = Block().eval()
    tr = trace_forward(b, torch.randn(1, 2, 6, 6))
    bn = next(c for c in tr.module_calls() if c.name == "bn")
    relu = next(c for c in tr.calls if c.kind == "rectifier")
    assert relu.inputs[0] != bn.output  # same object, other version
    assert [c.name for c in tr.producers(relu.output)] == ["relu", ""]  # the module and the block itself


def test_functional_and_reused_rectifiers_are_seen():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            x = self.act(self.conv1(x))
            return F.relu(self.act(self.conv2(x)).clone())

    tr = trace_forward(Net(), torch.randn(1, 1, 8, 8))
    assert [c.name for c in tr.calls if c.kind == "rectifier"] == ["relu", "relu", "relu"]
    assert tr.times_called()["act"] == 2
    conv1 = next(c for c in tr.module_calls() if c.name == "conv1")
    assert [c.kind for c in tr.consumers(conv1.output)] == ["rectifier", "module"]  # F.relu inside act, and act


def test_logits_model_returns_the_input_of_the_final_softmax():
    torch.manual_seed(0)
    m = build("lenet5")
    x = torch.randn(4, 1, 32, 32)
    assert softmax_head(trace_forward(m, x)) == "log_softmax"
    lm = logits_model(m, x)
    h = m.relu3(m.conv3(m.pool2(m.relu2(m.conv2(m.pool1(m.relu1(m.conv1(x))))))))
    z = m.fc2(m.relu4(m.fc1(h.flatten(1))))
    assert torch.allclose(lm(x), z, atol=1e-6)
    assert dict(lm.named_modules()).keys() == dict(m.named_modules()).keys()
    assert torch.allclose(copy.deepcopy(lm)(x), z, atol=1e-6)  # the bypass survives a deep copy (cascading randomisation)
    assert torch.allclose(m(x), torch.log_softmax(z, 1), atol=1e-6)  # the original is untouched


def test_logits_model_functional_head_and_plain_logits():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return F.softmax(self.fc(x), dim=1)

    f, x = Functional(), torch.randn(2, 4)
    assert torch.allclose(logits_model(f, x)(x), f.fc(x))
    r = build("resnet_small")
    xr = torch.randn(2, 1, 32, 32)
    assert softmax_head(trace_forward(r, xr)) is None
    assert torch.equal(logits_model(r, xr)(xr), r(xr))


def test_gradient_of_the_logit_survives_a_saturated_softmax():
    """Why the head matters: with p ~ 1 in float32, d log p / dx loses the target's own term; the logit's does not."""
    torch.manual_seed(0)
    m = build("lenet5").eval()
    with torch.no_grad():
        m.fc2.weight.mul_(400.0)
    x = torch.randn(1, 1, 32, 32)
    t = int(m(x).argmax())
    lm = logits_model(m, x)
    x32 = x.clone().requires_grad_(True)
    lm(x32)[0, t].backward()
    x64 = x.double().requires_grad_(True)
    copy.deepcopy(lm).double()(x64)[0, t].backward()
    assert torch.allclose(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())
    xl = x.clone().requires_grad_(True)
    m(xl)[0, t].backward()  # log p in float32: p rounds to 1
    assert torch.exp(m(x)[0, t]).item() == pytest.approx(1.0)
    rel = (xl.grad.double() - x64.grad).norm() / x64.grad.norm()
    assert rel > 0.5
