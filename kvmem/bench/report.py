"""Machine description, the printed table, the JSON file and the PNG plot of a harness run."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Dict, List, Optional

import torch

import kvmem
from kvmem import verified


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on: CPU/GPU names, driver, torch/triton/kvmem versions."""
    info = {
        "device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": _version("triton"), "cuda_runtime": torch.version.cuda,
        "kvmem": kvmem.__version__, "kvmem_build": kvmem.build_info(),
        "gpu": None, "gpu_capability": None, "gpu_memory_gib": None, "driver": None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = verified.gpu_driver_version()
        info.update(gpu=props.name, gpu_capability=f"sm_{props.major}{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), driver=None if driver == "unknown" else driver)
    return info


def describe_machine(m: Dict[str, object]) -> str:
    """A two-line human summary of :func:`machine_info`."""
    gpu = (f"GPU {m['gpu']} ({m['gpu_capability']}, {m['gpu_memory_gib']} GiB), driver {m['driver'] or '?'}, "
           f"CUDA {m['cuda_runtime']}") if m["gpu"] else "GPU none (driver n/a)"
    build = m["kvmem_build"]
    ext = "extension built" if build.get("built") else "extension not built"
    return (f"{gpu}\nCPU {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads, "
            f"{m['cpu_capability']}) | torch {m['torch']} | triton {m['triton'] or 'not installed'} | "
            f"kvmem {m['kvmem']} ({ext}) | load {_fmt(m['load_avg_1m'], '.1f')}")


def _fmt(x, spec: str, missing: str = "-") -> str:
    width = spec.split(".")[0]
    return missing.rjust(int(width) if width.isdigit() else 0) if x is None else format(x, spec)


def format_table(rows: List[dict], mode: str, limit_label: str) -> str:
    """The result table: one line per (case, implementation)."""
    rate = "GB/s" if mode == "decode" else "TFLOP/s"
    head = (f"{'case':22} {'impl':16} {'ms':>10} {rate:>8} {'% ' + limit_label:>16} "
            f"{'x best peer':>11} {'max|diff|':>9}  {'check':5} note")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r["case"] != last:
            lines.append("")
        last = r["case"]
        value = r["gbps"] if mode == "decode" else r["tflops"]
        lines.append(f"{r['case']:22} {r['impl']:16} {r['ms']:10.3f} {value:8.{1 if mode == 'decode' else 3}f} "
                     f"{_fmt(r['pct'], '15.1f')}% {_fmt(r['ratio'], '10.2f')}x {r['max_diff']:9.1e}  "
                     f"{r['status']:5} {r['note']}")
    return "\n".join(lines)


def format_skipped(skipped: List[dict]) -> str:
    """One line per skipped implementation and reason, with the cases it applies to."""
    groups: Dict[tuple, List[str]] = {}
    for s in skipped:
        groups.setdefault((s["impl"], s["reason"]), []).append(s["case"])
    lines = []
    for (impl, reason), cases in groups.items():
        where = "" if len(cases) == len({s["case"] for s in skipped}) else f" [{', '.join(cases)}]"
        lines.append(f"skipped {impl}: {reason}{where}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON (creating the directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def plot(path: str, payload: dict) -> Optional[str]:
    """Grouped bars (rate per case and implementation) with the measured limit as a line.

    Returns
    -------
    str or None
        None when written, else why not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e}); pip install matplotlib"
    mode, rows, limits = payload["mode"], payload["rows"], payload["limits"]
    key, unit = ("gbps", "GB/s of K/V read") if mode == "decode" else ("tflops", "TFLOP/s")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases) * max(1, len(impls)) / 3), 4.8))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, case in enumerate(cases):
            for r in rows:
                if r["case"] == case and r["impl"] == impl:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    ys.append(r[key])
        bars = ax.bar(xs, ys, width, label=impl)
        for bar, r in zip(bars, [r for c in cases for r in rows if r["case"] == c and r["impl"] == impl]):
            if r["status"] == "WRONG":
                bar.set_hatch("xx")
    limit = limits[limits["decode_limit" if mode == "decode" else "prefill_limit"]]
    ax.axhline(limit, color="k", linestyle="--", linewidth=1,
               label=f"measured limit ({limits['decode_limit' if mode == 'decode' else 'prefill_limit']})")
    values = [r[key] for r in rows if r[key] > 0] + [limit]
    if max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel(unit)
    m = payload["machine"]
    ax.set_title(f"kvmem {mode}, {payload['config']['dtype']}, {m['gpu'] or m['cpu']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
