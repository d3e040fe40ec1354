#!/usr/bin/env python3
"""Generate a small ImageNet-layout tree (preprocessing/sample.py): `make demo`'s data.

    make_sample_imagenet.py --out DIR --classes 4 --per-class 20 --val-per-class 5 --seed 0
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.sample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
