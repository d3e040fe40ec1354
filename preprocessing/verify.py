"""`alexnet-pipe verify OUT`: every shard and stats.h5 of a prepared folder against the sha256
the manifest recorded when prepare wrote them, hashed in parallel threads (hashlib releases the
GIL), at disk or page-cache speed. Lists each damaged, missing, unreadable or unexpected file.
"""
from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alexnet_base.errors import UserError, os_error
from preprocessing import shards

CHUNK = 4 << 20  # bytes a read


def sha256_file(path: Path, progress=None) -> str:
    """The file's sha256; progress(n) after each chunk of n bytes. OSError as raised."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def expected_digests(manifest: dict) -> dict[str, str | None]:
    """{file name: sha256 from the manifest}; None where it recorded none (stats.h5 of a folder
    prepared before the statistics had one)."""
    files = {e["file"]: e["sha256"] for e in manifest["shards"]}
    if manifest.get("stats"):
        files[manifest["stats"]["file"]] = manifest["stats"].get("sha256")
    return files


def verify(out: Path, *, workers: int, progress: bool | None = None) -> dict:
    """{"files", "bytes", "seconds", "damaged", "missing", "unreadable", "unexpected",
    "unchecked"}: lists of file names; unreadable: {"file", "error"} each, the OS error's line
    (os_error: the path, the errno)."""
    from tqdm import tqdm
    out = Path(out)
    expected = expected_digests(shards.read_manifest(out))
    missing = sorted(f for f in expected if not (out / f).is_file())
    unexpected = sorted(p.name for p in out.glob("*.h5") if p.name not in expected)
    present = [f for f in expected if f not in missing]
    total = sum((out / f).stat().st_size for f in present)
    show = sys.stderr.isatty() if progress is None else progress
    damaged, unreadable, unchecked = [], [], []
    t0 = time.perf_counter()
    with (tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not show) as bar,
          ThreadPoolExecutor(max(1, workers)) as pool):
        def check(name):
            try:
                return name, sha256_file(out / name, bar.update), None
            except OSError as e:
                return name, None, str(os_error(out / name, e, "read"))
        for name, digest, error in pool.map(check, present):
            if error is not None:
                unreadable.append({"file": name, "error": error})
            elif expected[name] is None:
                unchecked.append(name)
            elif digest != expected[name]:
                damaged.append(name)
    return {"files": len(present), "bytes": total, "seconds": time.perf_counter() - t0,
            "damaged": sorted(damaged), "missing": missing, "unreadable": unreadable,
            "unexpected": unexpected, "unchecked": unchecked}


def format_report(out: Path, r: dict) -> str:
    rate = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] > 0 else float("inf")
    lines = [f"{out}: {r['files']} files, {r['bytes'] / 1e9:.2f} GB checked in "
             f"{r['seconds']:.1f} s ({rate:.2f} GB/s): {len(r['damaged'])} damaged, "
             f"{len(r['missing'])} missing, {len(r['unreadable'])} unreadable, "
             f"{len(r['unexpected'])} unexpected"]
    lines += [f"DAMAGED {out / f}: its sha256 differs from the manifest's" for f in r["damaged"]]
    lines += [f"MISSING {out / f}" for f in r["missing"]]
    lines += [f"UNREADABLE {e['error']}" for e in r["unreadable"]]
    lines += [f"unexpected {out / f}: not in the manifest (not read by any command; left as it "
              f"is)" for f in r["unexpected"]]
    lines += [f"unchecked {out / f}: the manifest has no digest for it (prepared by an older "
              f"version)" for f in r["unchecked"]]
    if r["damaged"] or r["missing"]:
        lines.append("to repair: run the same `alexnet-pipe prepare` command again (same "
                     "--imagenet-root and options, --out " + str(out) + "): it rewrites exactly "
                     "the damaged and missing shards and the statistics, nothing else")
    return "\n".join(lines)


def failed(r: dict) -> bool:
    return bool(r["damaged"] or r["missing"] or r["unreadable"])


def damaged_files(data: Path, names: list[str], *, workers: int) -> list[str]:
    """Lines naming each of `names` (files of prepared folder `data`) whose sha256 differs from
    the manifest's or that cannot be read; files the manifest has no digest for pass. What
    train and evaluate check before they read (a flipped byte in a raw shard decodes fine)."""
    data = Path(data)
    expected = expected_digests(shards.read_manifest(data))

    def check(name):
        want = expected.get(name)
        if want is None:
            return None
        try:
            if sha256_file(data / name) == want:
                return None
            return f"{data / name}: damaged (its sha256 differs from the manifest's)"
        except OSError as e:
            return str(os_error(data / name, e, "read"))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [line for line in pool.map(check, names) if line is not None]


def inputs_of(data: Path, splits) -> list[str]:
    """The files of `data` that reading `splits` touches: their shards, and stats.h5 with train
    (the normalisation and lighting come from it)."""
    m = shards.read_manifest(Path(data))
    names = [e["file"] for e in m["shards"] if e["split"] in splits]
    if "train" in splits and m.get("stats"):
        names.append(m["stats"]["file"])
    return names


def check_inputs(data: Path, splits, *, share: tuple[int, int] = (0, 1), workers: int = 1,
                 gather=lambda lines: [lines]) -> None:
    """Hash this process's share of what reading `splits` of `data` touches: share = (i, n),
    every n-th file from the i-th (the ranks of one node share the hashing of that node's copy:
    every node checks all of its own, which may be a copy of its own). `gather(lines)`: every
    rank's lines, in rank order (a collective), so that every rank stops together. A UserError
    naming each damaged file (and, with several ranks, the rank that found it)."""
    names = inputs_of(data, splits)
    index, count = share
    found = gather(damaged_files(data, names[index::count], workers=workers))
    if any(found):
        raise UserError("; ".join(lines_of(found)) + "; " + REPAIR)


def lines_of(found: list[list[str]]) -> list[str]:
    """Every rank's lines, each prefixed with the rank that found it where there are several."""
    if len(found) == 1:
        return list(found[0])
    return [f"rank {r}: {line}" for r, lines in enumerate(found) for line in lines]


REPAIR = ("`alexnet-pipe verify` lists every damaged file, and the same `alexnet-pipe prepare` "
          "command rewrites exactly those")
