"""The `alexnet-pipe` command line: each command parses its options and calls one `run` function.

Heavy imports (DALI, torch) happen inside the commands, so `--help` is instant.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from preprocessing.errors import UserError


def user_errors(fn):
    """Turn the errors that users cause into a one-line message and exit status 1 or 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _csv(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="alexnet-pipe")
def main():
    """AlexNet (2012) on a GPU data pipeline: prepare shards, bench the loader, train."""


@main.command()
@click.option("--imagenet-root", required=True, type=click.Path(path_type=Path),
              help="ImageNet tree: train/<wnid>/*.JPEG and val/ (class folders or flat).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--size", default=256, show_default=True, help="Shorter side and crop, px.")
@click.option("--encoding", type=click.Choice(["jpeg", "raw"]), default="jpeg", show_default=True,
              help="Shard images as re-encoded JPEG bytes or raw uint8 pixels.")
@click.option("--quality", default=95, show_default=True, help="JPEG quality (jpeg encoding).")
@click.option("--shard-size", default=1024, show_default=True, help="Images per shard.")
@click.option("--workers", default=os.cpu_count() or 1, show_default=True,
              help="Worker processes (default: all cores).")
@click.option("--splits", default="train,val", show_default=True, callback=_csv,
              help="Comma-separated splits to prepare.")
@click.option("--val-labels", type=click.Path(path_type=Path),
              help="Flat val/: file of 'filename wnid' lines.")
@click.option("--limit-per-class", type=int, help="Keep at most N images per class (subsets).")
@click.option("--seed", default=0, show_default=True, help="Seed of the train shuffle.")
@click.option("--overwrite", is_flag=True, help="Replace the shards of another run in --out.")
@user_errors
def prepare(**options):
    """Resize an ImageNet tree to 256x256 HDF5 shards and compute the augmentation statistics."""
    from preprocessing.prepare import PrepareConfig, run
    run(PrepareConfig(**options))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole summary as JSON.")
@user_errors
def inspect(out, as_json):
    """Summarise an output folder of `prepare`: counts, classes, statistics, skipped inputs."""
    from preprocessing.summary import format_summary, summarize
    s = summarize(out)
    click.echo(json.dumps(s, indent=2) if as_json else format_summary(s))
    if s["problems"]:
        raise click.ClickException(f"{out}: {len(s['problems'])} problem(s) found; run prepare again")


def loader_options(batch_size: int):
    """The pipeline's options, shared by bench-loader, preview, train and evaluate."""
    opts = [
        click.option("--batch-size", default=batch_size, show_default=True,
                     help="Images per batch and process."),
        click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
                     show_default=True, help="Where the pipeline (and model) run."),
        click.option("--threads", default=2, show_default=True, help="DALI CPU threads."),
        click.option("--workers", default=2, show_default=True,
                     help="Processes reading the HDF5 shards."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     default="float32", show_default=True, help="Output image dtype."),
        click.option("--seed", default=0, show_default=True, help="Data order and augmentation."),
        click.option("--crop", default=224, show_default=True, help="Crop size, px (224 or 227)."),
        click.option("--mean", type=click.Choice(["pixel", "channel"]), default="pixel",
                     show_default=True, help="Subtract the mean image (paper) or the RGB mean."),
        click.option("--std", is_flag=True, help="With --mean channel: divide by the RGB std."),
        click.option("--lighting-std", default=0.1, show_default=True,
                     help="Sigma of the PCA lighting alphas; 0 turns it off."),
        click.option("--lighting-scale", type=click.Choice(["stdev", "eigval"]), default="stdev",
                     show_default=True,
                     help="stdev: sqrt(eigenvalue) on 0-255 (the author's code); eigval: "
                          "eigenvalue of [0,1] pixels (the widely copied convention)."),
        click.option("--no-flip", is_flag=True, help="No random horizontal flips."),
    ]

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def loader_config(data, o: dict):
    """Pop the loader options out of `o` and build the LoaderConfig."""
    from alexnet_pipe.augment import AugmentConfig
    from alexnet_pipe.pipeline import LoaderConfig
    aug = AugmentConfig(crop=o.pop("crop"), mean=o.pop("mean"), std=o.pop("std"),
                        lighting_std=o.pop("lighting_std"), lighting_scale=o.pop("lighting_scale"),
                        flip=not o.pop("no_flip"))
    return LoaderConfig(data=data, batch_size=o.pop("batch_size"), device=o.pop("device"),
                        threads=o.pop("threads"), workers=o.pop("workers"), dtype=o.pop("dtype"),
                        seed=o.pop("seed"), augment=aug)


@main.command("bench-loader")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Shard folder (or a folder with jpeg/ and raw/ shard folders).")
@click.option("--split", default="train", show_default=True,
              help="Shards to read (with the train augmentation).")
@click.option("--encoding", type=click.Choice(["jpeg", "raw"]), help="Which shards, if both.")
@click.option("--batches", default=20, show_default=True, help="Timed batches per repeat.")
@click.option("--seconds", type=float, help="Time each repeat for S seconds instead.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--warmup", default=5, show_default=True, help="Untimed batches first.")
@click.option("--compare-model", is_flag=True, help="Also time AlexNet train steps.")
@click.option("--baseline", is_flag=True, help="Also time a torch DataLoader doing the same.")
@click.option("--json", "as_json", is_flag=True)
@loader_options(batch_size=64)
@user_errors
def bench_loader(data, encoding, as_json, **o):
    """Images/s of the training pipeline (median over repeats, warm-up excluded)."""
    from alexnet_pipe.bench import BenchConfig, bench_loader as run, format_result, resolve_data
    loader = loader_config(resolve_data(data, encoding), o)
    result = run(BenchConfig(loader=loader, **o))
    click.echo(json.dumps(result) if as_json else format_result(result))


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Shard folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--images", default=8, show_default=True)
@loader_options(batch_size=8)
@user_errors
def preview(data, out, images, **o):
    """A PNG grid: train images as the model sees them, beside the 256x256 originals."""
    from alexnet_pipe.viz import preview_grid
    o["batch_size"] = images
    click.echo(f"wrote {preview_grid(loader_config(data, o), out, images)}")


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Shard folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--epochs", default=90, show_default=True)
@click.option("--lr", default=0.01, show_default=True, help="Initial learning rate.")
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--lr-patience", default=1, show_default=True,
              help="Epochs without a better val top-1 error before lr /= 10.")
@click.option("--max-lr-drops", default=3, show_default=True)
@click.option("--arch", type=click.Choice(["alexnet", "alexnet-owt"]), default="alexnet",
              show_default=True, help="The paper's two towers, or torchvision's one tower.")
@click.option("--bias-init", type=click.Choice(["paper", "caffe"]), default="paper",
              show_default=True, help="Biases of conv2/4/5, fc6/7: 1 (paper) or 0.1 (Caffe).")
@click.option("--dropout", default=0.5, show_default=True, help="Dropout of fc6 and fc7.")
@click.option("--parallel", type=click.Choice(["auto", "none", "ddp", "towers"]), default="auto",
              show_default=True, help="ddp under torchrun; towers: the paper's model parallelism.")
@click.option("--tower-devices", default="cuda:0,cuda:1", show_default=True, callback=_csv,
              help="Devices of tower A and tower B with --parallel towers.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on GPUs.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--keep", default=3, show_default=True, help="Epoch checkpoints kept.")
@click.option("--log-every", default=10, show_default=True, help="Steps between log records.")
@click.option("--flat-check-steps", default=300, show_default=True,
              help="Warn if the loss is still ln(classes) after this many steps.")
@click.option("--ten-crop", is_flag=True, help="Ten-crop evaluation after the last epoch.")
@loader_options(batch_size=128)
@user_errors
def train(data, out, tower_devices, compile_, **o):
    """Train AlexNet on prepared shards (the paper's recipe by default)."""
    from alexnet_pipe.train import TrainConfig, run
    if len(tower_devices) != 2:
        raise UserError(f"--tower-devices {','.join(tower_devices)}: give two devices")
    loader = loader_config(data, o)
    run(TrainConfig(loader=loader, out=out, tower_devices=tuple(tower_devices), compile=compile_,
                    **o))


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Shard folder.")
@click.option("--ten-crop", is_flag=True, help="The paper's ten-crop test-time augmentation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def evaluate(checkpoint, data, ten_crop, device, batch_size, as_json):
    """Top-1 and top-5 validation error of a checkpoint."""
    from alexnet_pipe.infer import evaluate_checkpoint
    r = evaluate_checkpoint(checkpoint, data, ten_crop=ten_crop, device=device,
                            batch_size=batch_size)
    click.echo(json.dumps(r) if as_json else
               f"{r['images']} images: top-1 error {r['top1_err']:.4f}, top-5 error "
               f"{r['top5_err']:.4f}{' (ten crops)' if ten_crop else ''}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--top", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@user_errors
def predict(images, checkpoint, top, as_json):
    """The top classes, with their names, for image files."""
    from alexnet_pipe.infer import predict as run
    results = run(list(images), checkpoint, top)
    if as_json:
        click.echo(json.dumps(results))
        return
    for r in results:
        click.echo(r["image"])
        for t in r["top"]:
            click.echo(f"  {t['p']:6.1%}  {t['class']:4d}  {t['name']}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="PNG (default RUN_DIR/curves.png).")
@user_errors
def plot(run_dir, out):
    """Draw a run's loss and error curves to a PNG."""
    from alexnet_pipe.viz import plot_run
    click.echo(f"wrote {plot_run(run_dir, out)}")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@user_errors
def filters(checkpoint, out):
    """Draw conv1's kernels as the paper's Figure 3 (one row block per tower)."""
    from alexnet_pipe import checkpoint as ckpt
    from alexnet_pipe.viz import conv1_filters
    state = ckpt.load(checkpoint)
    weight = state["model"]["features.1.weight" if state["arch"] == "alexnet"
                            else "features.0.weight"].float().numpy()
    click.echo(f"wrote {conv1_filters(weight, out)}")


if __name__ == "__main__":
    main()
