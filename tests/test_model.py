"""The model: the paper's layer shapes and parameter count; towers equal to the grouped net."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from alexnet_pipe.model import AlexNet, TowerAlexNet, build_model, count_parameters, param_name
from conftest import ROOT, run_group, tool


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


@pytest.mark.parametrize("crop, side", [(112, 2), (67, 1), (160, 3), (288, 7)])
def test_other_crops_size_fc6_to_their_pool5_map(crop, side):
    """Sides by hand: conv1 (crop - 11) // 4 + 1, then three pools (n - 3) // 2 + 1; e.g. 112 ->
    26 -> 12 -> 5 -> 2 and 67 -> 15 -> 7 -> 3 -> 1. The towers take the same fc6."""
    model = build_model("alexnet", 10, crop=crop)
    x = torch.zeros(2, 3, crop, crop)
    assert model.features(x).shape == (2, 256, side, side)
    assert model(x).shape == TowerAlexNet(10, crop)(x).shape == (2, 10)
    fc6 = 256 * side * side * 4096 + 4096
    assert count_parameters(model) == 60_965_224 - (9216 * 4096 + 4096) + fc6 - 990 * 4097
    assert count_parameters(TowerAlexNet(10, crop)) == count_parameters(model)


@pytest.mark.slow
def test_train_refuses_a_crop_below_the_smallest_pool5(tmp_path):
    from alexnet_base.config import AugmentConfig, LoaderConfig, TrainConfig
    from alexnet_base.errors import UserError

    def config(crop):
        return TrainConfig(loader=LoaderConfig(data=tmp_path, augment=AugmentConfig(crop=crop)),
                           out=tmp_path / "run")
    config(67).validate()
    with pytest.raises(UserError, match="--crop 66: the model needs at least 67 px"):
        config(66).validate()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def test_paper_initialisation():
    torch.manual_seed(0)
    model = build_model("alexnet", 10, bias_init="paper")
    layers = _layers(model)
    # The paper, section 5: weights N(0, 0.01) in every layer; biases 1 in conv2, conv4, conv5
    # and the hidden fully connected layers, 0 in the others.
    assert len(layers) == 8
    for layer, bias in zip(layers, [0, 1, 0, 1, 1, 1, 1, 0]):
        w = layer.weight.detach().double()
        assert abs(float(w.std()) - 0.01) < 0.0003, layer  # >= 34848 weights: std error < 0.4%
        assert abs(float(w.mean())) < 0.0003, layer
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, bias)), layer
    caffe = _layers(build_model("alexnet", 10, bias_init="caffe"))
    assert [float(m.bias[0].detach()) for m in caffe] == pytest.approx([0, 0.1, 0, 0.1, 0.1, 0.1, 0.1, 0])


def _lrn_reference(a: np.ndarray, groups: int) -> np.ndarray:
    """cuda-convnet2's response normalisation, within each group of channels:
    b_c = a_c / (k + alpha/n * sum over c' in [c-2, c+2] of a_c'^2) ** beta, k=2 n=5 alpha=1e-4
    beta=0.75 (the paper's constants; alpha divided by n as cuda-convnet2 does)."""
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    out = np.empty_like(a)
    per = a.shape[0] // groups
    for c in range(a.shape[0]):
        g0 = c // per * per
        lo, hi = max(g0, c - n // 2), min(g0 + per, c + n // 2 + 1)
        out[c] = a[c] / (k + alpha / n * (a[lo:hi] ** 2).sum(0)) ** beta
    return out


def test_lrn_against_the_formula():
    model = build_model("alexnet", 10)
    lrns = [m for m in model.features if type(m).__name__ == "GroupLRN"]
    assert len(lrns) == 2 and lrns == [model.features.lrn1, model.features.lrn2]  # after conv1
    # and conv2 (the paper's section 3.3)
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 120, (8, 2, 3))  # large enough that alpha matters (sum a^2 ~ 3e4)
    want = _lrn_reference(a, groups=2)
    got = lrns[0](torch.from_numpy(a)[None])[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.abs(want - a / 2.0 ** 0.75).max() > 0.5  # the test would see a wrong alpha or n


@pytest.mark.parametrize("fused", [False, True], ids=["module", "fused"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_in_both_memory_layouts_matches_the_formula_and_torchs_gradients(groups, channels_last,
                                                                            fused):
    """GroupLRN pools a view of the squares that differs by layout (channels_last on GPUs): each
    gives the formula's values, torch's LocalResponseNorm's gradients (per group), and keeps
    the input's layout for the next convolution. So does LRNFunction, the GPU's LRN with its
    gradient written out (each pass one compiled kernel there), run eager here in float64."""
    from alexnet_pipe.model import LRN, GroupLRN, LRNFunction
    rng = np.random.default_rng(2)
    a = rng.uniform(-60, 120, (2, 12, 3, 4))
    x = torch.from_numpy(a).requires_grad_()
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = LRNFunction.apply(xin, groups, False) if fused else GroupLRN(groups)(xin)
    want = np.stack([_lrn_reference(img, groups) for img in a])
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12)
    if not fused:
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    weights = torch.from_numpy(rng.normal(size=a.shape))
    (got,) = torch.autograd.grad((out * weights).sum(), x)
    torch_lrn = torch.nn.LocalResponseNorm(**LRN)
    ref = torch.cat([torch_lrn(part) for part in x.chunk(groups, 1)], 1)
    (expected,) = torch.autograd.grad((ref * weights).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_lrn_under_autocast_hands_on_bfloat16():
    """Under autocast the LRN computes in float32 but hands on bf16 (what conv1 gave it), not a
    float32 copy; its values are the formula's to bf16's precision (8 bits: rtol 2^-8)."""
    lrn = build_model("alexnet", 10).features.lrn1
    a = np.random.default_rng(1).uniform(0, 120, (1, 96, 5, 5)).astype(np.float32)
    x = torch.from_numpy(a).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lrn(x)
    assert got.dtype == torch.bfloat16
    want = _lrn_reference(x.double().numpy()[0], groups=2)
    np.testing.assert_allclose(got.double().numpy()[0], want, rtol=2 ** -8)


def test_conv1_pads_right_and_bottom_only():
    """With 224 crops conv1 pads 3 px on the right and bottom (cuda-convnet2), so output pixel
    (i, j) sees input rows 4i..4i+10 and columns 4j..4j+10, and the 55th row and column reach
    into the padding."""
    model = build_model("alexnet", 10).double().eval()
    conv1 = _layers(model)[0]
    captured = []
    conv1.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.zeros(1, 3, 224, 224, dtype=torch.float64)
    x[0, 0] = torch.arange(224 * 224, dtype=torch.float64).view(224, 224) + 1  # distinct, > 0
    with torch.no_grad():
        conv1.bias.zero_()
        for ky, kx in [(0, 0), (10, 10), (3, 7)]:
            conv1.weight.zero_()
            conv1.weight[0, 0, ky, kx] = 1  # output channel 0 copies one tap of the window
            captured.clear()
            model(x)
            out = captured[0][0, 0]
            assert out.shape == (55, 55)
            want = torch.zeros(55, 55, dtype=torch.float64)
            for i in range(55):
                for j in range(55):
                    r, c = 4 * i + ky, 4 * j + kx
                    if r < 224 and c < 224:
                        want[i, j] = x[0, 0, r, c]
            torch.testing.assert_close(out, want, rtol=0, atol=0)


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
            grads_t[param_name(g, name)] = torch.cat(
                [tw.get_parameter(f"{t}.{name}").grad for tw in towers.towers], 0)
    for name, p in grouped.named_parameters():
        torch.testing.assert_close(grads_t[name], p.grad, rtol=1e-7, atol=1e-9)
    # and the state dict round trip
    for k, v in towers.grouped_state_dict().items():
        torch.testing.assert_close(v, grouped.state_dict()[k])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["author", "uniform"])
def test_bias_rule_learning_rates_and_decay(rule):
    from pathlib import Path

    from alexnet_base.config import LoaderConfig, TrainConfig
    from alexnet_pipe.optim import param_groups
    torch.manual_seed(0)
    model = build_model("alexnet", 4, dropout=0.0).double()
    config = TrainConfig(loader=LoaderConfig(data=Path(".")), out=Path("."), bias_rule=rule)
    lr, wd = config.lr, config.weight_decay
    optimizer = torch.optim.SGD(param_groups(model, config), lr=lr, momentum=0)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64) * 50
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    optimizer.step()
    # AlexNet has no 1-D parameter but its biases; the author's rule (cuda-convnet2 epsB = 2 epsW,
    # wcB = 0): b -= 2 lr g. Weights, and every parameter under "uniform": w -= lr (g + wd w).
    for n, p in model.named_parameters():
        w, g = before[n]
        bias = w.ndim == 1
        want = w - 2 * lr * g if (bias and rule == "author") else w - lr * (g + wd * w)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15, msg=n)
    assert sum(1 for _, p in model.named_parameters() if p.ndim == 1) == 8


def test_tower_b_takes_its_input_in_the_autocast_dtype():
    """Under autocast the input crosses to tower B's device in bfloat16, half the bytes of the
    float32 the loader hands over (conv1 would cast it there anyway): same outputs."""
    torch.manual_seed(0)
    towers = TowerAlexNet(num_classes=6, devices=("cpu", "cpu")).eval()
    seen = []
    towers.towers[1].lower.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 3, 224, 224) * 50
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = towers(x)
        want = torch.cat([towers.towers[0].lower(x), towers.towers[1].lower(x)], 1)
    assert seen[0] == torch.bfloat16 and out.shape == (2, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.cat([t.lower(x.to(torch.bfloat16)) for t in towers.towers], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # conv1 cast it the same way
    seen.clear()
    with torch.no_grad():  # no autocast: float32 goes on as float32
        towers(x)
    assert seen[0] == torch.float32


@pytest.mark.gpu
def test_fused_lrn_on_the_gpu_within_bf16_of_the_reference():
    """On a GPU GroupLRN runs the compiled LRNFunction: bf16 in and out, within bf16's precision
    of the float64 formula, and its input gradient within bf16's of the reference's."""
    from alexnet_pipe.model import GroupLRN
    rng = np.random.default_rng(4)
    a = torch.from_numpy(rng.uniform(0, 120, (4, 96, 13, 13)))
    x = a.cuda().bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = GroupLRN(2)(x)
    assert out.dtype == torch.bfloat16
    want = np.stack([_lrn_reference(img, 2) for img in x.detach().double().cpu().numpy()])
    np.testing.assert_allclose(out.detach().double().cpu().numpy(), want, rtol=2 ** -7)
    g = torch.from_numpy(rng.normal(size=a.shape)).cuda()
    (got,) = torch.autograd.grad((out.double() * g).sum(), x)
    xr = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad((GroupLRN(2, fused=False)(xr) * g).sum(), xr)
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -6, atol=1e-3 * ref.abs().max().item())


@pytest.mark.slow
def test_an_lrn_that_cannot_compile_runs_eager_and_says_so(monkeypatch, capsys):
    """Where torch.compile fails (no Triton, no compiler), the fused LRN keeps the run going
    with the same math eager, and says so once."""
    from alexnet_pipe import model as M
    monkeypatch.setattr(M, "_COMPILED", {})

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("Cannot find a working triton installation")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.from_numpy(np.random.default_rng(5).uniform(0, 120, (1, 8, 3, 3)))
    out = M.LRNFunction.apply(x.clone().requires_grad_(), 2, True)
    out.sum().backward()
    again = M.LRNFunction.apply(x, 2, True)
    np.testing.assert_allclose(out.detach().numpy(), _lrn_reference(x.numpy()[0], 2)[None],
                               rtol=1e-12)
    torch.testing.assert_close(again, out.detach())
    err = capsys.readouterr().err
    assert err.count("warning: the fused LRN could not be compiled") == 2  # forward, backward
    assert "triton" in err


@pytest.mark.slow
def test_step_profile_counts_the_lrn_modules_work_and_nothing_else(tmp_path):
    """tools/profile_step.py's split of a CPU step. The paper model's only average pooling is
    its LRN's window sum (forward and backward), so both must count as LRN; dropout multiplies
    too, and its work (forward, and the backward of the nodes it made) must not. The one-tower
    model has neither LRN nor grouped convolutions: none of its time may land there, nor may
    the categories add up to more than the step (each operator's own time counted once)."""
    from torch.profiler import ProfilerActivity, profile

    from alexnet_pipe.runtime import Runtime, train_step
    ps = tool("profile_step")
    torch.manual_seed(0)
    model = build_model("alexnet", 10)
    ps.mark_lrn(model)
    ranges = {}  # dropout's forward inside a profiler range of the test's own

    def enter(module, args):
        ranges[module] = torch.autograd.profiler.record_function("test::dropout")
        ranges[module].__enter__()
    for m in (model.classifier.drop6, model.classifier.drop7):
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(lambda module, args, out: ranges[module].__exit__(None, None, None))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(2, 3, 224, 224) * 50, torch.tensor([3, 7])
    cpu = Runtime.for_device(torch.device("cpu"))
    train_step(model, opt, x, y, runtime=cpu)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, x, y, runtime=cpu)
    events = prof.events()
    lrn = ps.lrn_nodes(events)
    pools = [e for e in events if "avg_pool2d" in e.name]
    assert {e.name for e in pools} >= {"aten::avg_pool2d", "aten::avg_pool2d_backward"}
    assert all(ps.category(e, lrn) == "lrn" for e in pools)
    dropout = [e for e in events if any(c.name == "test::dropout" for c in ps._chain(e))
               and e.name != "test::dropout"]
    made = {e.sequence_nr for e in dropout} - {-1}
    backward = [e for e in events if any(c.name.startswith(ps._BACKWARD)
                                         and c.sequence_nr in made for c in ps._chain(e))]
    assert dropout and backward
    assert not any(ps.category(e, lrn) == "lrn" for e in dropout + backward)
    out = tmp_path / "profile.jsonl"
    proc = run_group([sys.executable, str(ROOT / "tools/profile_step.py"), "--arch",
                      "alexnet-owt", "--batch-size", "2", "--classes", "10", "--steps", "1",
                      "--warmup", "1", "--json", str(out)], cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    owt, = map(json.loads, out.read_text().splitlines())
    assert owt["lrn"] == owt["conv_grouped"] == 0 and owt["conv_dense"] > 0 and owt["fc"] > 0
    assert sum(owt[k] for k in ps.CATEGORIES) <= owt["step_ms"]


@pytest.mark.slow
def test_step_profile_on_a_gpu_counts_each_kernel_once_and_adds_up_to_the_step():
    """tools/profile_step.py's GPU split, from profiler events written out here as torch's
    profiler gives them (the CPU operators listing the kernels they launched, and the device's
    own events for the same kernels): 2 steps in 3.0 ms of wall time. Each kernel counts once
    (its operator's, not again as a device event), cuDNN's implicit-GEMM convolution kernels
    as convolutions (not "gemm": fc), a kernel no operator claims by its name, and the idle
    time is the wall time less the device's busy time, so that the parts add up to the step."""
    from types import SimpleNamespace as Ns

    from torch.autograd import DeviceType
    ps = tool("profile_step")
    events = []

    def op(name, kernels=(), parent=None, shapes=None):
        e = Ns(name=name, device_type=DeviceType.CPU, is_async=False, cpu_parent=parent,
               sequence_nr=-1, input_shapes=shapes or [], self_cpu_time_total=1,
               kernels=[Ns(name=k, device=0, duration=us) for k, us in kernels])
        events.append(e)
        for k, us in kernels:  # the device's timeline holds the same kernel
            events.append(Ns(name=k, device_type=DeviceType.CUDA, is_async=False,
                             cpu_parent=None, sequence_nr=-1, input_shapes=[], kernels=[],
                             time_range=Ns(elapsed_us=lambda us=us: us), self_cpu_time_total=0))
        return e

    dense = op("aten::convolution", shapes=[[2, 3, 8, 8], [4, 3, 3, 3]])
    op("aten::cudnn_convolution", [("sm90_xmma_fprop_implicit_gemm_bf16_nhwc", 500)], dense)
    grouped = op("aten::convolution", shapes=[[2, 96, 27, 27], [256, 48, 5, 5]])  # groups 2
    op("aten::cudnn_convolution", [("sm90_xmma_fprop_implicit_gemm_bf16_nhwc", 200)], grouped)
    op("aten::addmm", [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn", 300)])
    step = op("Optimizer.step#SGD.step")
    op("aten::_foreach_add_", [("multi_tensor_apply_kernel", 100)], step)
    for name, us in (("triton_poi_fused_avg_pool2d_pow_0", 40), ("Memset (Device)", 10)):
        events.append(Ns(name=name, device_type=DeviceType.CUDA, is_async=False, kernels=[],
                         cpu_parent=None, sequence_nr=-1, input_shapes=[],
                         time_range=Ns(elapsed_us=lambda us=us: us), self_cpu_time_total=0))
    r = ps.summarise(events, wall_ms=3.0, steps=2, gpu=True)
    assert r == {"step_ms": 1.5, "lrn": 0.02, "conv_grouped": 0.1, "conv_dense": 0.25,
                 "fc": 0.15, "optimizer": 0.05, "cast_pad": 0.0, "other": 0.005,
                 "gpu_idle": 0.925}  # busy: 1,150 us in 2 steps = 0.575 ms a step
    assert sum(r[k] for k in ps.CATEGORIES) + r["gpu_idle"] == pytest.approx(r["step_ms"])


@pytest.mark.slow
def test_the_save_benchmark_writes_the_whole_state_beside_the_steps(tmp_path):
    """tools/bench_save.py times what train --save-every costs: its file holds the paper
    model's 60,965,224 parameters at 1,000 classes and their momentum, float32 (2 x 4 bytes
    each: 487.7 MB, written out here from the README's count, plus the pickle's few KB), and at
    least one step ran while it was written."""
    r = tool("bench_save").save_cost("cpu", classes=1000, crop=224, batch=2, steps=1,
                                     out=tmp_path)
    assert r["file_mb"] == pytest.approx(2 * 4 * 60_965_224 / 1e6, abs=0.1), r  # not half
    assert r["steps_while_writing"] >= 1 and r["copy_ms"] > 0 and r["write_s"] > 0
    assert not list(tmp_path.iterdir())  # its folder removed, nothing left half-written
