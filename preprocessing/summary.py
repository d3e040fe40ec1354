"""`alexnet-pipe inspect`: what an output folder of `prepare` holds, checked against its manifest."""
from __future__ import annotations

from pathlib import Path

from alexnet_base.errors import UserError
from preprocessing import shards


def summarize(out: Path) -> dict:
    """The manifest, plus a quick check (no hashing: `verify` does that) that every listed shard
    is present, of its size and image count, and that stats.h5 reads."""
    out = Path(out)
    manifest = shards.read_manifest(out)
    problems = []
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
            continue
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['file']}: {path.stat().st_size} bytes, manifest says "
                            f"{entry['bytes']}")
            continue
        try:
            info = shards.shard_info(path)
        except UserError as e:
            problems.append(str(e))
            continue
        if info["images"] != entry["images"]:
            problems.append(f"{entry['file']}: {info['images']} images, manifest says {entry['images']}")
    if manifest.get("stats"):
        try:
            shards.read_stats(out / manifest["stats"]["file"])
        except UserError as e:
            problems.append(str(e))
    return {**manifest, "problems": problems}


def format_summary(s: dict, max_classes: int = 20) -> str:
    lines = [f"format v{s['format_version']}, {s['encoding']} {s['size']}x{s['size']}, "
             f"{len(s['classes'])} classes, val layout: {s.get('val_layout') or '-'}"]
    for split, n in s["counts"].items():
        n_shards = sum(1 for e in s["shards"] if e["split"] == split)
        lines.append(f"  {split:5s} {n:9d} images in {n_shards} shards")
    lines.append("classes (index wnid train/val name):")
    for c in s["classes"][:max_classes]:
        per = "/".join(str(s["counts_per_class"][sp][c["index"]]) for sp in s["counts_per_class"])
        lines.append(f"  {c['index']:4d} {c['wnid']} {per:>11s} {c['name']}")
    if len(s["classes"]) > max_classes:
        lines.append(f"  ... {len(s['classes']) - max_classes} more (--json lists all)")
    st = s.get("stats")
    if st:
        fmt = lambda v: "[" + ", ".join(f"{x:.3f}" for x in v) + "]"  # noqa: E731
        lines.append(f"statistics ({st['file']}, pixel scale 0-{st['pixel_scale']:.0f}):")
        lines.append(f"  channel mean {fmt(st['channel_mean'])}  std {fmt(st['channel_std'])}")
        lines.append(f"  eigenvalues  {fmt(st['eigval'])}")
        for k, row in enumerate(st["eigvec"]):
            lines.append(f"  eigvec row {k} {fmt(row)}")
    lines.append(f"skipped: {len(s['skipped'])}")
    lines += [f"  {e['path']}: {e['reason']}" for e in s["skipped"]]
    lines += [f"PROBLEM {p}" for p in s.get("problems", [])]
    return "\n".join(lines)
