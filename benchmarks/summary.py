"""Rebuild BENCHMARKS.md from the latest tables in benchmarks/results/*.md.

    python benchmarks/summary.py
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["glyph_dataset", "loss_memory", "decomposable_bias", "eval_scale", "data_throughput", "train_throughput", "pc_throughput",
         "index_build_search", "backfill_throughput", "backfill_paths", "serve_load", "shard_preflight", "demo_story"]
HEADER = """# Benchmarks

Speed and memory targets are checked by these scripts, not by timed tests. Each script measures ratios
in one run (ours vs the naive or plain-PyTorch way on the same machine), writes JSON to
`benchmarks/results/` and a table to `benchmarks/results/<name>.md`; this page is rebuilt from those tables
with `python benchmarks/summary.py`. Every table states the command that produced it and how loaded the
machine was (the development machine has 2 cores; figures taken while other jobs ran are marked so).
"""


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    parts = [HEADER]
    for name in names:
        text = (results / f"{name}.md").read_text().strip()
        # Headings move one level down; image links are relative to the results folder.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        parts.append(text.replace("](", "](benchmarks/results/").replace("](benchmarks/results/http", "](http"))
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
