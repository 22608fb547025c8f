"""Presenting a run: a progress bar on stderr, a markdown table, the JSON file.

JSON schema (one file per run, ``DATE-DEVICE.json``)::

    {"device", "driver", "date", "versions": {...}, "copy_bandwidth_gbs",
     "rows": [{"op", "direction", "suite", "shape", "dtype", "layout", "backend", "ms", "bytes",
               "roofline_fraction", "baselines": {"torch": ms, ...}, "speedup_vs_torch",
               "max_rel_err"}]}

``shape`` is ``{"N", "C", "H", "W", "KH", "KW", "stride", "padding", "C_out"}``; ``ms`` the median
time; ``bytes`` what must move (inputs read once, outputs written once); ``roofline_fraction`` =
(bytes / copy bandwidth) / ms; ``speedup_vs_torch`` = torch ms / ms (null without PyTorch).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time

ROW_KEYS = ("op", "direction", "suite", "shape", "dtype", "layout", "backend", "ms", "bytes",
            "roofline_fraction", "baselines", "speedup_vs_torch", "max_rel_err", "model_ms")
# rows written by `python -m dwops model` (dwops.model): nothing measured (ms, roofline_fraction,
# speedup_vs_torch, max_rel_err empty, no baselines), the prediction in model_ms and these columns
MODEL_KEYS = ("model_floor_fraction", "model_bound", "coalescing", "smem_conflict_ways",
              "model_note")
LEGACY_ROW_KEYS = ROW_KEYS[:-1]  # results written before rows carried model_ms
TOP_KEYS = ("device", "driver", "date", "versions", "copy_bandwidth_gbs", "rows")
SHAPE_KEYS = ("N", "C", "H", "W", "KH", "KW", "stride", "padding", "C_out")
SHAPE_KEYS_1D = ("N", "C", "L", "K", "stride", "padding", "C_out")  # op "conv1d"


class Progress:
    """``[#####.....] 12/40 label`` on stderr: redrawn in place on a terminal, one line per step
    otherwise (logs)."""

    WIDTH = 24

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:6.1f}s {label}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def shape_label(shape: dict, op: str) -> str:
    if op == "conv1d":
        return f"{shape['N']}x{shape['C']}x{shape['L']} k{shape['K']} {shape['padding']}"
    s = f"{shape['N']}x{shape['C']}x{shape['H']}x{shape['W']}"
    if shape["KH"] is None:  # a whole network (suite "models"): its input
        return s
    if op == "pointwise":
        return s + f"->{shape['C_out']}"
    s += f" k{shape['KH']}"
    return s + (f" s{shape['stride']}" if shape["stride"] != 1 else "")


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(result: dict) -> str:
    """The run as a markdown table, one line per row, baselines as columns."""
    rows = result["rows"]
    names = []
    for r in rows:
        for b in r["baselines"]:
            if b not in names:
                names.append(b)
    bw = result["copy_bandwidth_gbs"]
    head = (f"dwops bench on **{result['device']}**"
            + (f" (driver {result['driver']})" if result.get("driver") else "")
            + f", {result['date']}; copy bandwidth {bw:.1f} GB/s (bytes read + written)\n")
    cols = ["suite", "op", "direction", "shape", "dtype", "layout", "backend", "ms", "GB/s",
            "floor"]
    for n in names:
        cols.append(f"{n} ms")
    if "torch" in names:
        cols.append("x torch")
    if "dense3x3" in names:
        cols.append("x dense3x3")
    cols.append("max_rel_err")
    with_model = any(r.get("model_ms") for r in rows)
    if with_model:
        cols.append("model ms")
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        gbs = r["bytes"] / (r["ms"] * 1e6) if r["ms"] else None
        cells = [r["suite"], r["op"], r["direction"], shape_label(r["shape"], r["op"]), r["dtype"],
                 r["layout"], r["backend"], f"{r['ms']:.3f}", _fmt(gbs, ".1f"),
                 _fmt(r["roofline_fraction"], ".0%")]
        for n in names:
            cells.append(_fmt(r["baselines"].get(n), ".3f"))
        if "torch" in names:
            cells.append(_fmt(r["speedup_vs_torch"], ".2f"))
        if "dense3x3" in names:
            d = r["baselines"].get("dense3x3")
            cells.append(_fmt(None if d is None else d / r["ms"], ".2f"))
        cells.append(_fmt(r["max_rel_err"], ".1e"))
        if with_model:
            cells.append(_fmt(r.get("model_ms"), ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("floor: the fraction of the memory floor reached (bytes that must move / copy "
                 "bandwidth / ms); max_rel_err: against dwops.reference (float64).")
    if any(r["suite"] == "models" for r in rows):
        lines.append("models rows: max_rel_err is the converted network against the original in "
                     "float32.")
    if "torch" in names:
        lines.append("x torch: PyTorch eager ms / dwops ms.")
    if with_model:
        lines.append("model ms: the kernel model's prediction for the row (python -m dwops model), "
                     "not a measurement.")
    if "dense3x3" in names:
        lines.append("x dense3x3: one dense 3x3 64->64 convolution of the same input, ms / dwops ms "
                     "(it does 7.9x the multiply-adds of the block and 64x those of the depthwise "
                     "layer).")
    return "\n".join(lines) + "\n"


def _row_key(r: dict) -> tuple:
    return (r["op"], r["direction"], r["suite"], tuple(sorted(r["shape"].items())), r["dtype"],
            r["layout"], r["backend"])


def attach_model(result: dict, model: dict) -> int:
    """Fill ``model_ms`` of ``result``'s rows from a ``python -m dwops model`` result (same
    suite, op, direction, shape, dtype, layout and backend); returns how many rows got one."""
    predicted = {_row_key(r): r["model_ms"] for r in model["rows"]}
    n = 0
    for r in result["rows"]:
        ms = predicted.get(_row_key(r))
        if ms is not None:
            r["model_ms"] = float(ms)
            n += 1
    return n


def model_markdown(result: dict) -> str:
    """A ``python -m dwops model`` result as a markdown table (every number a prediction)."""
    bw = result["copy_bandwidth_gbs"]
    lines = [f"dwops kernel model for **{result['device']}**, {result['date']}; copy bandwidth "
             f"{bw:.0f} GB/s. Every number is a prediction, not a measurement.\n",
             "| suite | op | direction | shape | dtype | layout | model ms | model GB/s | "
             "model floor | bound | coalescing | smem ways |", "|" + "---|" * 12]
    for r in result["rows"]:
        gbs = r["bytes"] / (r["model_ms"] * 1e6)
        lines.append("| " + " | ".join([
            r["suite"], r["op"], r["direction"], shape_label(r["shape"], r["op"]), r["dtype"],
            r["layout"], f"{r['model_ms']:.3f}", f"{gbs:.0f}", _fmt(r["model_floor_fraction"], ".0%"),
            r["model_bound"], _fmt(r["coalescing"], ".0%"), _fmt(r["smem_conflict_ways"], ".2f")])
            + " |")
    lines += ["", "model floor: the op's bytes at copy bandwidth / model ms; bound: the largest "
              "term (dram, latency, l2, smem, issue, fma); coalescing: ideal / touched 32-byte "
              "sectors of global accesses; smem ways: shared-load wavefronts / ideal (1 = "
              "conflict-free)."]
    return "\n".join(lines) + "\n"


def model_summary_markdown(result: dict) -> str:
    """A ``python -m dwops model`` result summarised per (suite, op, direction, layout): rows,
    the median and range of the fraction of the memory floor, and how often each bound wins
    (every number a prediction)."""
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["suite"], r["op"], r["direction"], r["layout"]), []).append(r)
    lines = [f"dwops kernel model for **{result['device']}**, {result['date']}: "
             f"{len(result['rows'])} rows. Every number is a prediction, not a measurement.\n",
             "| suite | op | direction | layout | rows | model floor, median (range) | bounds |",
             "|" + "---|" * 7]
    for (suite, op, direction, layout), rows in groups.items():
        ff = sorted(r["model_floor_fraction"] for r in rows)
        bounds: dict = {}
        for r in rows:
            bounds[r["model_bound"]] = bounds.get(r["model_bound"], 0) + 1
        won = ", ".join(f"{b} {n}" for b, n in sorted(bounds.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {suite} | {op} | {direction} | {layout} | {len(rows)} | "
                     f"{statistics.median(ff):.0%} ({ff[0]:.0%}-{ff[-1]:.0%}) | {won} |")
    lines += ["", "model floor: the op's bytes at copy bandwidth / model ms; bounds: how many "
              "rows each term (dram, latency, l2, smem, issue, fma) decides."]
    return "\n".join(lines) + "\n"


def file_stem(result: dict) -> str:
    """``DATE-DEVICE``: e.g. ``2026-11-28T2031Z-NVIDIA-H200``."""
    date = re.sub(r"[^0-9T]", "", result["date"][:16].replace(":", ""))
    date = f"{date[:4]}-{date[4:6]}-{date[6:]}Z" if len(date) == 13 else date
    dev = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-") or "device"
    return f"{date}-{dev}"


def write_json(result: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def validate(result: dict) -> list[str]:
    """Ways ``result`` departs from the schema above (empty if it matches)."""
    problems = []
    if tuple(result) != TOP_KEYS:
        problems.append(f"top-level keys {tuple(result)} != {TOP_KEYS}")
    if not isinstance(result.get("versions"), dict):
        problems.append("versions is not an object")
    if not isinstance(result.get("copy_bandwidth_gbs"), (int, float)):
        problems.append("copy_bandwidth_gbs is not a number")
    for i, r in enumerate(result.get("rows", [])):
        modelled = tuple(r) == ROW_KEYS + MODEL_KEYS
        if tuple(r) not in (ROW_KEYS, LEGACY_ROW_KEYS) and not modelled:
            problems.append(f"row {i}: keys {tuple(r)} != {ROW_KEYS}")
            continue
        if tuple(r["shape"]) != (SHAPE_KEYS_1D if r["op"] == "conv1d" else SHAPE_KEYS):
            problems.append(f"row {i}: shape keys {tuple(r['shape'])}")
        if modelled:
            if r["ms"] is not None or r["baselines"]:
                problems.append(f"row {i}: a model row carries measurements")
            if not (isinstance(r["model_ms"], float) and r["model_ms"] > 0):
                problems.append(f"row {i}: model_ms {r['model_ms']!r}")
            continue
        if r.get("model_ms") is not None and not (isinstance(r["model_ms"], float)
                                                  and r["model_ms"] > 0):
            problems.append(f"row {i}: model_ms {r['model_ms']!r}")
        if not (isinstance(r["ms"], float) and r["ms"] > 0):
            problems.append(f"row {i}: ms {r['ms']!r}")
        if not (isinstance(r["bytes"], int) and r["bytes"] > 0):
            problems.append(f"row {i}: bytes {r['bytes']!r}")
        if not isinstance(r["baselines"], dict) or not all(
                isinstance(v, float) and v > 0 for v in r["baselines"].values()):
            problems.append(f"row {i}: baselines {r['baselines']!r}")
        for key in ("roofline_fraction", "speedup_vs_torch", "max_rel_err"):
            if r[key] is not None and not isinstance(r[key], float):
                problems.append(f"row {i}: {key} {r[key]!r}")
    return problems
