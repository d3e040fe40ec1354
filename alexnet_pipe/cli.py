"""The `alexnet-pipe` command line: each command parses its options and calls one `run` function.

Options come from the config dataclasses (alexnet_base/config.py): names, defaults, choices and
help are declared there once. Heavy imports (DALI, torch) happen inside the commands, so `--help`
is instant.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import types
import typing
from pathlib import Path

import click

from alexnet_base import config as C
from alexnet_base.errors import UserError


def user_errors(fn):
    """Turn the errors that users cause into a one-line message and exit status 1 or 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(" ".join(str(e).split())) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _click_options(f: dataclasses.Field, hint) -> list[click.Option]:
    """The field's option; a `flag` field (opt(flag=(bare, off))) also gets --no-NAME."""
    option = _click_option(f, hint)
    flag = f.metadata.get("flag")
    if not flag:
        return [option]
    name = f.name

    def off(ctx, param, value):
        if value:
            ctx.params[name] = flag[1]
    return [option, click.Option([f"--no-{name.replace('_', '-')}"], is_flag=True,
                                 expose_value=False, callback=off,
                                 help=f"--{name.replace('_', '-')} {flag[1]} (the default)")]


def _click_option(f: dataclasses.Field, hint) -> click.Option:
    meta, name = f.metadata, "--" + f.name.replace("_", "-")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else (f.default if f.default is not dataclasses.MISSING
                                     else f.default_factory())
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)  # X | None
    base = typing.get_args(hint)[0] if optional else hint
    kw = {"help": meta["help"], "required": required, "show_default": default not in (None, ())}
    if base is bool:
        return click.Option([f"{name}/--no-{name[2:]}"], default=default, **kw)
    if meta["csv"]:
        return click.Option([name], default=",".join(default), callback=_csv, **kw)
    if meta.get("flag"):  # bare: flag[0]; or one of the choices
        return click.Option([name], type=click.Choice(meta["choices"]), default=default,
                            is_flag=False, flag_value=meta["flag"][0], metavar=meta["metavar"],
                            **kw)
    if meta["choices"]:
        return click.Option([name], type=click.Choice(meta["choices"]), default=default, **kw)
    typ = click.Path(path_type=Path) if base is Path else base
    return click.Option([name], type=typ, default=default, **kw)


def _csv(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def options(*classes, skip=()):
    """Click options for every command-line field of `classes` (nested configs included)."""
    def decorate(fn):
        for cls in reversed(classes):
            hints = typing.get_type_hints(cls)
            for f in reversed(dataclasses.fields(cls)):
                if (dataclasses.is_dataclass(hints[f.name]) or f.name in skip
                        or not f.metadata.get("cli", True)):
                    continue
                fn.__click_params__ = getattr(fn, "__click_params__", [])
                fn.__click_params__.extend(reversed(_click_options(f, hints[f.name])))
        return fn
    return decorate


def build(cls, values: dict, **given):
    """A `cls` from the parsed options in `values` (consumed), nested configs built likewise."""
    hints, kwargs = typing.get_type_hints(cls), dict(given)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values.pop(f.name)
    return cls(**kwargs)


class _Commands(click.Group):
    """click's group, a usage error (an unknown option, a value outside an option's choices)
    said in one line like every other error: what was wrong and where the help is."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # the help: more than one line
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"Error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)


@click.group(cls=_Commands,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="alexnet-pipe")
def main():
    """AlexNet (2012) on a GPU data pipeline: prepare shards, bench the loader, train."""
    from alexnet_base.resources import raise_open_file_limit
    raise_open_file_limit()


@main.command()
@options(C.PrepareConfig)
@user_errors
def prepare(**o):
    """Resize an ImageNet tree to 256x256 HDF5 shards and compute the augmentation statistics."""
    from preprocessing.prepare import run
    run(build(C.PrepareConfig, o))


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
        first, more = s["problems"][0], "; ..." if len(s["problems"]) > 1 else ""
        raise click.ClickException(f"{out}: {len(s['problems'])} problem(s) found ({first}"
                                   f"{more}); `alexnet-pipe "
                                   f"verify {out}` checks every byte, and the same prepare "
                                   f"command rewrites what is damaged")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--workers", type=int, default=None,
              help="Threads hashing files at once (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def verify(out, workers, as_json):
    """Check every shard and stats.h5 of a prepared folder against the manifest's sha256."""
    import os
    from preprocessing.verify import failed, format_report, verify as run
    r = run(out, workers=workers or os.cpu_count() or 1)
    click.echo(json.dumps(r) if as_json else format_report(out, r))
    if failed(r):
        named = r["damaged"] + r["missing"] + [e["file"] for e in r["unreadable"]]
        raise click.ClickException(
            f"{out}: {len(r['damaged'])} damaged, {len(r['missing'])} missing, "
            f"{len(r['unreadable'])} unreadable ({', '.join(map(str, named[:5]))}"
            f"{', ...' if len(named) > 5 else ''}); run the same `alexnet-pipe prepare` "
            f"command again to repair")


@main.command("bench-loader")
@options(C.BenchConfig, C.LoaderConfig, C.AugmentConfig)
@click.option("--encoding", type=click.Choice(C.ENCODINGS),
              help="With --data holding jpeg/ and raw/ shard folders: which one.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def bench_loader(encoding, as_json, **o):
    """Images/s of the training pipeline (median over repeats, warm-up excluded)."""
    from alexnet_pipe.bench import bench_loader as run, format_result, resolve_data
    o["data"] = resolve_data(o["data"], encoding)
    result = run(build(C.BenchConfig, o))
    click.echo(json.dumps(result) if as_json else format_result(result))


@main.command()
@options(C.LoaderConfig, C.AugmentConfig, skip=("batch_size", "dtype", "prefetch"))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
@click.option("--images", default=8, show_default=True, help="Train images shown.")
@user_errors
def preview(out, images, **o):
    """A PNG grid: train images as the model sees them, beside the 256x256 originals."""
    from alexnet_pipe.viz import preview_grid
    click.echo(f"wrote {preview_grid(build(C.LoaderConfig, o, batch_size=images), out)}")


@main.command()
@options(C.TrainConfig, C.LoaderConfig, C.AugmentConfig)
@user_errors
def train(**o):
    """Train AlexNet on prepared shards (the paper's recipe by default)."""
    from alexnet_pipe.train import run
    run(build(C.TrainConfig, o))


@main.command()
@options(C.EvalConfig, C.LoaderConfig, skip=("seed", "dtype"))
@click.option("--json", "as_json", is_flag=True)
@user_errors
def evaluate(as_json, **o):
    """Top-1 and top-5 validation error of a checkpoint (its own crop and mean)."""
    from alexnet_pipe.infer import evaluate_checkpoint
    config = build(C.EvalConfig, o)
    r = evaluate_checkpoint(config)
    click.echo(json.dumps(r) if as_json else
               f"{r['images']} images: top-1 error {r['top1_err']:.4f}, top-5 error "
               f"{r['top5_err']:.4f} ({'ten crops' if config.ten_crop else 'centre crop'})")


@main.command()
@options(C.ExportConfig)
@user_errors
def export(**o):
    """A checkpoint as a file for other tools: ONNX (preprocessing inside) or torchvision's."""
    from alexnet_pipe.export import export as run
    click.echo(f"wrote {run(build(C.ExportConfig, o))}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path))
@click.option("--top", default=5, show_default=True, help="Classes listed per image.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def predict(images, checkpoint, top, as_json):
    """The top classes, with their names, for image files (preprocessed as the checkpoint's run)."""
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
    from alexnet_pipe.viz import draw_checkpoint_filters
    click.echo(f"wrote {draw_checkpoint_filters(checkpoint, out)}")


if __name__ == "__main__":
    main()
