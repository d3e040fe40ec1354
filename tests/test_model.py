"""The model: the paper's layer shapes and parameter count; towers equal to the grouped net."""
from __future__ import annotations

import torch

from alexnet_pipe.model import AlexNet, TowerAlexNet, build_model, count_parameters


def test_parameter_count_and_layer_shapes():
    model = build_model("alexnet", num_classes=1000)
    assert count_parameters(model) == 60_965_224
    x = torch.zeros(1, 3, 224, 224)
    shapes = []
    for layer in model.features:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert (96, 55, 55) in shapes and (256, 27, 27) in shapes and (384, 13, 13) in shapes
    assert shapes[-1] == (256, 6, 6)
    assert build_model("alexnet", 10, crop=227)(torch.zeros(2, 3, 227, 227)).shape == (2, 10)
    assert build_model("alexnet-owt", 10)(torch.zeros(2, 3, 224, 224)).shape == (2, 10)


def test_paper_initialisation():
    model = build_model("alexnet", 10, bias_init="paper")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [float(m.bias.mean()) for m in layers] == [0, 1, 0, 1, 1, 1, 1, 0]
    assert abs(float(layers[6].weight.std()) - 0.01) < 1e-3
    caffe = build_model("alexnet", 10, bias_init="caffe")
    assert abs(float(list(caffe.features.children())[5].bias.mean()) - 0.1) < 1e-6


def test_towers_equal_grouped_outputs_and_gradients():
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=7)
    for p in grouped.parameters():  # weights large enough that every layer matters
        torch.nn.init.normal_(p, 0, 0.05)
    towers = TowerAlexNet(num_classes=7, devices=("cpu", "cpu"))
    grouped.double()
    towers.double()  # float64: the comparison sees the wiring, not float32 summation order
    towers.load_grouped_state_dict(grouped.state_dict())
    grouped.eval(), towers.eval()
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64) * 50
    y = torch.tensor([0, 3, 6])
    out_g, out_t = grouped(x), towers(x)
    torch.testing.assert_close(out_t, out_g, rtol=1e-9, atol=1e-9)
    torch.nn.functional.cross_entropy(out_g, y).backward()
    torch.nn.functional.cross_entropy(out_t, y).backward()
    grads_t = {}
    for g, t, kind in TowerAlexNet._MAP:
        for name in ("weight", "bias"):
            grads_t[f"{g}.{name}"] = torch.cat(
                [tw.get_parameter(f"{t}.{name}").grad for tw in towers.towers], 0)
    for name, p in grouped.named_parameters():
        torch.testing.assert_close(grads_t[name], p.grad, rtol=1e-7, atol=1e-9)
    # and the state dict round trip
    for k, v in towers.grouped_state_dict().items():
        torch.testing.assert_close(v, grouped.state_dict()[k])
