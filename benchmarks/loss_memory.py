"""Memory and speed of dense (B x B) vs tiled InfoNCE, forward + backward (METHODS.md 1.3).

Methods: `dense` (plain autograd over the B x B logits), `tiled` (what `InfoNCE` runs above its threshold:
the scalar tiled loss that makes its gradients during forward) and `tiled_rows` (the per-row tiled
function whose backward recomputes each tile's logits).

Each case runs in a fresh subprocess so that its peak memory is its own:
- CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the step; a 1 ms
  RSS sampling thread where that is unavailable) minus the RSS after the inputs were made;
- CUDA: torch.cuda.max_memory_allocated minus the memory allocated after the inputs were made.

Also the other pair-sum terms of METHODS 1.3: `decomposable` and `tcm` (the tiled paths that
`DecomposableLoss` and `TCM` run above `tiled_above`) and `decomposable_dense`, `tcm_dense` (their b x B
paths). The decomposable case runs a second step on the same ids (the steady state: every id seen).

FLOP counts: "useful" = 6 B^2 D (forward logits 2 B^2 D, backward dq and dk 4 B^2 D). `dense` and `tiled`
execute exactly that, and so do the tiled `tcm` (one pass: each hinge sum keeps its own gradient, the
global counts scale them in backward) and the tiled `decomposable` in its steady state (u from the state,
one pass makes the gradient and the batch's Zhat; a batch with an id never seen before takes a first log
Zhat pass, 8 B^2 D); `tiled_rows` executes 8 B^2 D since its backward recomputes every tile's logits.
Rates are compared with plain torch.mm on the same device and dtype, measured in the same run.

    python benchmarks/loss_memory.py                      # CPU, all sizes
    python benchmarks/loss_memory.py --device cuda --sizes 4096,131072
    python benchmarks/loss_memory.py --merge --methods decomposable,tcm --sizes 131072   # add cases
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
# Dense path: a few B x B float32 and bool tensors live at once (logits, masks, exp, their gradients).
# Used to decide skips before any dense run was measured; a measured dense case replaces it.
DENSE_BYTES_PER_PAIR_GUESS = 32.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS over a block: the kernel's high-water mark if it can be reset, else a sampling thread."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "RSS sampled every 1 ms"
            self.peak, self._stop = rss_bytes(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            with open("/proc/self/status") as f:
                self.peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def mm_rate(device: str, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 FLOP rate of a plain (m x k) @ (k x n) torch.mm."""
    import torch

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    torch.mm(a, b, out=out)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def square_n(device: str) -> int:
    return 8192 if device == "cuda" else 2048


def mm_rates(device: str, dim: int, tile: int, keys: int) -> dict:
    """The reference rates: a large square product, and one (tile x D) @ (D x keys) product."""
    n = square_n(device)
    return {"square_n": n, "square_flops_per_s": mm_rate(device, n, n, n),
            "tile_shape": [tile, dim, keys], "tile_flops_per_s": mm_rate(device, tile, dim, keys)}


def _rows_loss(tile: int):
    """The InfoNCE mean through `tiled_info_nce_rows` (recomputing backward), for comparison."""
    import torch.nn.functional as F

    from dml_core.losses.tiled import tiled_info_nce_rows

    def loss(z, labels):
        q = F.normalize(z, dim=1)
        return tiled_info_nce_rows(q, q, labels, labels, 0, 0.1, tile).sum() / z.shape[0]

    loss.stats = {"tiled": 1.0}
    return loss


EXECUTED_PER_B2D = {"tiled_rows": 8}
DENSE_METHODS = ("dense", "decomposable_dense", "tcm_dense")


def _make_loss(method: str, batch: int, tile: int):
    """The loss of `method`, called as loss(z, labels) (the decomposable loss with ids = arange(B))."""
    import torch

    from dml_core.losses.decomposable import DecomposableLoss
    from dml_core.losses.info_nce import InfoNCE
    from dml_core.losses.tcm import TCM

    above = 0 if method in ("tiled", "decomposable", "tcm") else 2**62
    if method == "tiled_rows":
        return _rows_loss(tile)
    if method in ("dense", "tiled"):
        return InfoNCE(tau=0.1, tile_size=tile, tiled_above=above)
    if method.startswith("tcm"):
        return TCM(tile_size=tile, tiled_above=above)
    inner = DecomposableLoss(max(batch, 256), tau=0.1, gamma=0.5, tile_size=tile, tiled_above=above)

    def loss(z, labels):
        return inner(z, labels, torch.arange(z.shape[0], device=z.device))

    loss.inner = inner
    return loss


def run_case(method: str, batch: int, dim: int, tile: int, device: str, repeats: int) -> dict:
    """One forward + backward of the loss on a (batch, dim) leaf; the first repetition gives the memory."""
    import torch

    sys.path.insert(0, str(ROOT))

    torch.manual_seed(0)
    loss_fn = _make_loss(method, batch, tile)
    warm = torch.randn(256, dim, device=device, requires_grad=True)
    loss_fn(warm, torch.arange(256, device=device) // 2).backward()  # load kernels outside the timing
    z = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.arange(batch, device=device) // 2  # two views per item
    del warm
    if hasattr(loss_fn, "inner"):  # the decomposable steady state: every id of the batch already seen
        with torch.no_grad():
            loss_fn(z.detach(), labels)
        loss_fn.stats = loss_fn.inner.stats
    sync(device)
    n = square_n(device)
    mm_before = mm_rate(device, n, n, n)  # the machine is shared: bracket the step with the reference
    times, out = [], {}
    for i in range(repeats):
        z.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_bytes()
        with PeakRSS() as peak:
            t = time.perf_counter()
            loss = loss_fn(z, labels)
            loss.backward()
            sync(device)
            times.append(time.perf_counter() - t)
        if i == 0:
            extra = torch.cuda.max_memory_allocated() - base if device == "cuda" else peak.peak - base
            out = {"peak_extra_bytes": int(extra),
                   "memory_method": "torch.cuda.max_memory_allocated" if device == "cuda" else peak.method,
                   "loss": float(loss.detach())}
        del loss
    mm_after = mm_rate(device, n, n, n)
    stats = loss_fn.inner.stats if hasattr(loss_fn, "inner") else loss_fn.stats
    out.update(time_s=min(times), times_s=times, tiled=stats["tiled"] == 1.0,
               mm_square_flops_per_s_before=mm_before, mm_square_flops_per_s_after=mm_after)
    return out


def subprocess_json(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"status": "failed", "reason": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_worker(ns) -> None:
    import torch

    torch.set_num_threads(ns.threads) if ns.threads else None
    if ns.worker == "mm":
        result = mm_rates(ns.device, ns.dim, ns.tile_size, ns.mm_keys)
    else:
        result = run_case(ns.worker, ns.batch, ns.dim, ns.tile_size, ns.device, ns.repeats)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return f"{model or platform.processor()} ({os.cpu_count()} logical CPUs)"


def main_driver(ns) -> None:
    import torch

    sizes = [int(s) for s in ns.sizes.split(",")]
    common = ["--dim", str(ns.dim), "--tile-size", str(ns.tile_size), "--device", ns.device]
    common += ["--threads", str(ns.threads)] if ns.threads else []
    load_start = os.getloadavg()
    mm = subprocess_json(["--worker", "mm", "--mm-keys", str(max(sizes)), *common], ns.timeout)
    if "square_flops_per_s" not in mm:
        raise SystemExit(f"torch.mm rate measurement failed: {mm}")
    print(f"torch.mm: {mm['square_flops_per_s'] / 1e9:.1f} GFLOP/s square, "
          f"{mm['tile_flops_per_s'] / 1e9:.1f} GFLOP/s tile-shaped", flush=True)
    dense_bytes_per_pair, cases = {}, []  # per dense method, once measured
    for batch in sizes:
        for method in ns.methods.split(","):
            case = {"method": method, "batch": batch, "dim": ns.dim,
                    "tile_size": None if method in DENSE_METHODS else ns.tile_size,
                    "useful_flops": 6 * batch**2 * ns.dim,
                    "executed_flops": EXECUTED_PER_B2D.get(method, 6) * batch**2 * ns.dim}
            if method in DENSE_METHODS:
                per_pair = dense_bytes_per_pair.get(method, DENSE_BYTES_PER_PAIR_GUESS)
                need = per_pair * batch**2
                case["estimated_bytes"] = int(need)
                if need > ns.dense_limit_gib * GIB:
                    case.update(status="skipped", reason=f"dense path needs about {need / GIB:.1f} GiB "
                                f"({per_pair:.1f} bytes per pair x B^2) > limit {ns.dense_limit_gib} GiB")
                    cases.append(case)
                    print(f"{method:5s} B={batch:>7d}: skipped, {case['reason']}", flush=True)
                    continue
            repeats = ns.repeats if batch <= ns.repeat_below else 1
            case["loadavg_before"] = os.getloadavg()[0]
            result = subprocess_json(["--worker", method, "--batch", str(batch), "--repeats", str(repeats), *common],
                                     ns.timeout)
            case.update(result)
            if "time_s" in result:
                case["status"] = "ok"
                case["useful_flops_per_s"] = case["useful_flops"] / result["time_s"]
                case["executed_flops_per_s"] = case["executed_flops"] / result["time_s"]
                # Against the torch.mm rate measured right before and after this case in its own process
                # (the mean of the two), so that load from other users of the machine affects both alike.
                ref = (result["mm_square_flops_per_s_before"] + result["mm_square_flops_per_s_after"]) / 2
                case["mm_square_flops_per_s"] = ref
                case["useful_fraction_of_mm"] = case["useful_flops_per_s"] / ref
                case["executed_fraction_of_mm"] = case["executed_flops_per_s"] / ref
                if method in DENSE_METHODS:  # calibrate the skip estimate on what the dense path really took
                    dense_bytes_per_pair[method] = max(result["peak_extra_bytes"] / batch**2, 1.0)
                print(f"{method:5s} B={batch:>7d}: {result['peak_extra_bytes'] / GIB:7.3f} GiB extra, "
                      f"{result['time_s']:8.2f} s, {case['useful_fraction_of_mm']:.2f} of torch.mm (useful)", flush=True)
            else:
                print(f"{method:5s} B={batch:>7d}: {case.get('status')}: {case.get('reason', '')[-300:]}", flush=True)
            cases.append(case)
    out_json = Path(ns.out_json)
    command = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    for case in cases:
        case.update(command=command, device=ns.device)
    if ns.merge and out_json.exists():  # keep the earlier cases this run did not repeat
        done = {(c["method"], c["batch"], ns.device) for c in cases}
        earlier = json.loads(out_json.read_text())
        kept = [dict(c, command=c.get("command", earlier["command"]), device=c.get("device", earlier["device"]))
                for c in earlier["cases"] if (c["method"], c["batch"], c.get("device", earlier["device"])) not in done]
        cases = sorted(kept + cases, key=lambda c: (c["batch"], METHOD_ORDER.get(c["method"], 99)))
        command = "; ".join(dict.fromkeys([earlier["command"], command]))
    report = {
        "command": command,
        "device": ns.device, "device_name": describe_device(ns.device), "torch": torch.__version__,
        "python": platform.python_version(), "dtype": "float32", "tau": 0.1,
        "labels": "pair ids (two views per item)", "threads": mm.get("threads"),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "mm": mm,
        "flop_counts": "useful = 6*B^2*D (fwd 2, bwd 4); executed = useful for the dense paths, tiled, the tiled tcm and the "
                       "tiled decomposable (steady state: every id seen, one pass), 8*B^2*D for tiled_rows (backward "
                       "recomputes the logits); fractions are "
                       "against the square torch.mm "
                       "rate measured in each case's process just before and after its timed steps (mean)",
        "targets": {"tiled_extra_gib_at_131072": 2.0, "useful_fraction_of_mm": 0.5},
        "cases": cases,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    Path(ns.out_md).write_text(markdown(report))
    print(f"wrote {out_json} and {ns.out_md}")


METHOD_ORDER = {m: i for i, m in enumerate(
    ["dense", "tiled", "tiled_rows", "decomposable_dense", "decomposable", "tcm_dense", "tcm"])}


def markdown(r: dict) -> str:
    mm = r["mm"]
    lines = [
        "# Pair losses forward + backward: dense (B x B) vs tiled. InfoNCE: tiled (gradients in forward) and tiled "
        "rows (recomputing backward); the decomposable loss and TCM: dense and tiled",
        "",
        f"Command(s): `{r['command']}`",
        "",
        f"Device: {r['device_name']} ({r['device']}), torch {r['torch']}, {r['threads']} threads, "
        f"float32, D = {r['cases'][0]['dim'] if r['cases'] else '?'}, tau = {r['tau']}, labels: {r['labels']}. "
        f"Load average (1 min) at start {r['loadavg_start'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}.",
        "",
        f"torch.mm rate at the start: {mm['square_flops_per_s'] / 1e9:.1f} GFLOP/s ({mm['square_n']}^3 square), "
        f"{mm['tile_flops_per_s'] / 1e9:.1f} GFLOP/s for the tile-shaped {mm['tile_shape']} product.",
        f"FLOP counts: {r['flop_counts']}.",
        "",
        "| method | B | tile | peak extra memory | time fwd+bwd | useful GFLOP/s | executed GFLOP/s "
        "| mm GFLOP/s (case) | useful / mm | executed / mm | load avg | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in r["cases"]:
        if c.get("status") == "ok":
            lines.append(
                f"| {c['method']} | {c['batch']} | {c['tile_size'] or '-'} | {c['peak_extra_bytes'] / GIB:.3f} GiB "
                f"| {c['time_s']:.2f} s | {c['useful_flops_per_s'] / 1e9:.1f} | {c['executed_flops_per_s'] / 1e9:.1f} "
                f"| {c['mm_square_flops_per_s'] / 1e9:.1f} | {c['useful_fraction_of_mm']:.2f} "
                f"| {c['executed_fraction_of_mm']:.2f} | {c['loadavg_before']:.1f} | |")
        else:
            lines.append(f"| {c['method']} | {c['batch']} | {c['tile_size'] or '-'} | - | - | - | - | - | - | - | - "
                         f"| {c.get('status')}: {c.get('reason', '')[:160]} |")
    lines += ["", f"Targets: tiled at B = 131,072 within {r['targets']['tiled_extra_gib_at_131072']} GiB extra "
              f"and >= {r['targets']['useful_fraction_of_mm']} of the torch.mm rate (useful FLOPs).", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4096,16384,65536,131072", help="comma-separated global batch sizes")
    p.add_argument("--methods", default="dense,tiled,tiled_rows,decomposable_dense,decomposable,tcm_dense,tcm",
                   help="comma-separated: dense, tiled, tiled_rows, decomposable_dense, decomposable, tcm_dense, tcm")
    p.add_argument("--merge", action="store_true", help="keep the earlier cases of --out-json this run does not repeat")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dense-limit-gib", type=float, default=8.0, help="skip the dense path above this estimate")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best kept) for small batches")
    p.add_argument("--repeat-below", type=int, default=20000, help="batches above this are timed once")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    p.add_argument("--out-json", default=str(RESULTS / "loss_memory.json"))
    p.add_argument("--out-md", default=str(RESULTS / "loss_memory.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mm-keys", type=int, default=16384, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main_worker(args) if args.worker else main_driver(args)
