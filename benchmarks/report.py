"""What every benchmark report starts and ends with: the command and the machine's load, then the JSON and the
markdown table written to benchmarks/results/."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def report_header(script: str, argv: list[str], note: str, args: dict) -> dict:
    return {"command": " ".join(["python", f"benchmarks/{script}", *argv]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_before": [round(x, 2) for x in os.getloadavg()], "note": note, "args": args}


def save_report(out: str, name: str, report: dict, markdown) -> None:
    """Add the load after, write `<name>.json` and `<name>.md` (`markdown(report)`) under `out`, print the table."""
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2))
    (folder / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
