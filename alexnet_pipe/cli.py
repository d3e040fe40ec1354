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


if __name__ == "__main__":
    main()
