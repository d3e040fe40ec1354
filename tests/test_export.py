"""`export`: the model outside the project, run by onnxruntime and by torchvision's layout."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import SMALL_CROP, SMALL_SIZE, cli, readme_snippet, train_args, weights

# predict computes the preprocessing in float64 and rounds it to float32 once; the graph computes
# it in float32 (a relative error of 6e-8 a rounding) and onnxruntime sums in its own order.
# Measured: 3e-8 at most on these probabilities, 9e-8 for ten crops against DALI's. A crop one
# pixel off moves them by 6e-5 to 2e-4 on the same checkpoint, the mean image taken as its RGB
# mean by 7e-4, a flip along the wrong axis by 9e-3: 1e-6 tells each such mistake from rounding.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def owt_pixel(tmp_path_factory, shards_small):
    """A checkpoint of the one-tower arch with the paper's mean image (straight_run's is the
    paper's arch with the RGB mean)."""
    run = tmp_path_factory.mktemp("owt") / "run"
    cli(*train_args(shards_small, run, "--epochs", "1", "--arch", "alexnet-owt", "--mean",
                    "pixel", "--no-tensorboard"))
    return run / "checkpoints/epoch-0001.pt"


def val_images(data):
    """The val split's stored images (N, size, size, 3) uint8 and labels, in the manifest's
    order (the split's sample indices), read with h5py."""
    manifest = json.loads((data / "manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["shards"]:
        if shard["split"] == "val":
            with h5py.File(data / shard["file"], "r") as f:
                images.append(f["images"][:])
                labels.append(f["labels"][:])
    return np.concatenate(images), np.concatenate(labels), manifest


def session(path):
    import onnxruntime
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_onnx_gives_predicts_probabilities_with_either_mean(tmp_path, shards_small, sample_tree,
                                                            straight_run, owt_pixel):
    """Five val images (the shards' pixels, written as PNG files of the shard size, which
    predict reads as they are) through predict --json and through the exported graph in
    onnxruntime, as one batch of 5 and as a batch of 1: the same probabilities of every class.
    The metadata names the classes as the manifest does, in the output's order."""
    import onnx
    images, _, manifest = val_images(shards_small)
    files = []
    for i in range(5):
        files.append(tmp_path / f"val{i}.png")
        Image.fromarray(images[i]).save(files[-1])
    for ckpt, mean in ((straight_run / "checkpoints/epoch-0002.pt", "channel"),
                       (owt_pixel, "pixel")):
        out = tmp_path / f"{mean}.onnx"
        cli("export", "--checkpoint", ckpt, "--out", out)
        top = json.loads(cli("predict", *files, "--checkpoint", ckpt, "--json", "--top",
                             "4").stdout)
        want = np.zeros((5, 4))
        for i, r in enumerate(top):
            for t in r["top"]:
                want[i, t["class"]] = t["p"]
        model = session(out)
        got = model.run(None, {"images": images[:5]})[0]
        assert got.shape == (5, 4) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE, err_msg=mean)
        one = model.run(None, {"images": images[3:4]})[0]
        np.testing.assert_allclose(one[0], want[3], rtol=0, atol=TOLERANCE, err_msg=mean)

        graph = onnx.load(str(out))
        (inp,) = graph.graph.input
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert isinstance(dims[0], str) and dims[1:] == [SMALL_SIZE, SMALL_SIZE, 3]
        meta = {p.key: p.value for p in graph.metadata_props}
        assert json.loads(meta["class_names"]) == [c["name"] for c in manifest["classes"]]
        assert json.loads(meta["wnids"]) == [c["wnid"] for c in manifest["classes"]]
        assert (meta["size"], meta["crop"], meta["ten_crop"]) == (
            str(SMALL_SIZE), str(SMALL_CROP), "false")

    # README, "The model elsewhere": its snippet as written, on a val JPEG of another size
    # (PIL's ImageOps.fit for prepare's resize: the class predict names, p near predict's)
    photo = sorted((sample_tree / "val").glob("*.JPEG"))[0]
    shutil.copy(photo, tmp_path / "photo.jpg")
    shutil.copy(tmp_path / "channel.onnx", tmp_path / "alexnet.onnx")
    proc = subprocess.run([sys.executable, "-c", readme_snippet("## The model elsewhere")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, p = proc.stdout.strip().rsplit(" ", 1)
    best = json.loads(cli("predict", photo, "--checkpoint", straight_run /
                          "checkpoints/epoch-0002.pt", "--json", "--top", "1").stdout)[0]["top"][0]
    print("README snippet:", name, p, "predict:", best)
    assert name == best["name"] and abs(float(p) - best["p"]) < 1e-2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_onnx_ten_crops_give_evaluates_probabilities(tmp_path, shards_small, straight_run):
    """The ten-crop export on the 12 val images of the shards against evaluate --ten-crop's
    per-image probabilities (DALI's crops, flips and normalisation on the same pixels): the
    same, image by image; the centre-crop export differs from both."""
    ckpt = straight_run / "checkpoints/epoch-0002.pt"
    cli("export", "--checkpoint", ckpt, "--out", tmp_path / "ten.onnx", "--ten-crop")
    cli("export", "--checkpoint", ckpt, "--out", tmp_path / "centre.onnx")
    cli("evaluate", "--checkpoint", ckpt, "--data", shards_small, "--device", "cpu",
        "--batch-size", "5", "--ten-crop", "--probabilities", tmp_path / "ten.npz")
    images, labels, _ = val_images(shards_small)
    with np.load(tmp_path / "ten.npz") as f:
        index, want = f["index"], f["probs"]
    assert index.tolist() == list(range(len(images))) and want.shape == (len(images), 4)
    got = session(tmp_path / "ten.onnx").run(None, {"images": images})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    centre = session(tmp_path / "centre.onnx").run(None, {"images": images})[0]
    assert np.abs(centre - want).max() > 100 * TOLERANCE


def torchvision_alexnet(num_classes: int) -> nn.Module:
    """torchvision.models.alexnet as torchvision 0.20 defines it (its nn.Sequential indices are
    the state dict's keys), written out here: torchvision is not a dependency."""
    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
    return AlexNet()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_torchvision_format_loads_into_torchvisions_alexnet(tmp_path, owt_pixel):
    """--format torchvision: torchvision's keys and shapes (written out), the checkpoint's
    values, and torchvision's AlexNet loading it strictly computes our model's logits."""
    out = tmp_path / "alexnet.pth"
    cli("export", "--checkpoint", owt_pixel, "--out", out, "--format", "torchvision")
    state = torch.load(out, weights_only=True)
    shapes = {"features.0": (64, 3, 11, 11), "features.3": (192, 64, 5, 5),
              "features.6": (384, 192, 3, 3), "features.8": (256, 384, 3, 3),
              "features.10": (256, 256, 3, 3), "classifier.1": (4096, 9216),
              "classifier.4": (4096, 4096), "classifier.6": (4, 4096)}
    want = {f"{k}.weight": s for k, s in shapes.items()} | {
        f"{k}.bias": s[:1] for k, s in shapes.items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    ours = weights(owt_pixel)
    names = dict(zip(shapes, ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7",
                              "fc8")))
    for key, value in state.items():
        layer, kind = key.rsplit(".", 1)
        group = "features" if names[layer].startswith("conv") else "classifier"
        assert torch.equal(value, ours[f"{group}.{names[layer]}.{kind}"]), key
    theirs = torchvision_alexnet(4).eval()
    theirs.load_state_dict(state, strict=True)
    from alexnet_pipe.checkpoint import load_model
    model, _ = load_model(owt_pixel, torch.device("cpu"))
    x = torch.randn(3, 3, SMALL_CROP, SMALL_CROP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=0)
