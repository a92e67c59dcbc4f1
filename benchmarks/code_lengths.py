#!/usr/bin/env python
"""Write a real length distribution: the byte lengths of the source and text files of installed packages.

Why: the planner's figures at scale need a *real* long-tailed length distribution next to the
synthetic one, and this machine cannot download a corpus. Source files are a real code corpus
(like GitHub-code pre-training data): with the byte-level tokenizer a file of n bytes is a
document of n tokens. The packages this project installs (torch, numpy, scipy, megatron-core,
...) give about 18,600 files, median about 2.1K tokens, about 540 over 64K and 90 over 192K.

    python benchmarks/code_lengths.py                      # writes benchmarks/data/code_lengths.txt
    flexsp-plan benchmarks/data/code_lengths.txt --cost-model gpt-7b --world-size 64 --max-seq-len 196608

The committed file was made from the packages of ``bash scripts/setup.sh`` (Python 3.11, torch 2.13
CPU, megatron-core 0.16.1); another environment gives a similar but not identical list.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

SUFFIXES = (".py", ".pyi", ".h", ".hpp", ".c", ".cpp", ".cu", ".cuh", ".rst", ".md", ".txt")
OUT = Path(__file__).resolve().parent / "data" / "code_lengths.txt"


def file_lengths(root: str) -> list[int]:
    """Byte lengths of the source/text files under ``root``, in sorted path order (non-empty files only)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(SUFFIXES):
                size = os.path.getsize(os.path.join(dirpath, name))
                if size > 0:
                    out.append(size)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=sysconfig.get_paths()["purelib"], help="folder to scan (default: site-packages)")
    p.add_argument("--output", type=Path, default=OUT)
    a = p.parse_args()
    lengths = file_lengths(a.root)
    if not lengths:
        p.error(f"no source files under {a.root}")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text("".join(f"{n}\n" for n in lengths))
    print(f"wrote {len(lengths)} lengths (median {sorted(lengths)[len(lengths) // 2]}) to {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
