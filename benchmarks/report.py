"""How every benchmark reports: tables of named measurements, written as JSON, markdown and PNG.

A benchmark's ``run`` returns its raw results (config, machine, every sample), written unchanged as
``<name>.json``. Its ``build_report(results)`` turns them into a :class:`Report`: tables (rows of named
measurements) and plot panels drawn from those rows, written as ``<name>.md`` and ``<name>.png``, both
describing the machine. Because a report is built from the JSON alone, a saved result can be rendered
again: ``python -m benchmarks.report benchmarks/results/forward.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.core.files import atomic_write

Row = dict[str, Any]


@dataclass
class Table:
    """Rows of named measurements, shown as one markdown table (columns in first-row order by default)."""

    rows: list[Row]
    title: str = ""
    text: str = ""  # a paragraph above the table
    note: str = ""  # a paragraph below it
    columns: Sequence[str] = ()

    def headers(self) -> list[str]:
        return list(self.columns) or (list(self.rows[0]) if self.rows else [])

    def markdown(self) -> str:
        headers = self.headers()
        lines = [f"## {self.title}", ""] if self.title else []
        if self.text:
            lines += [self.text, ""]
        lines += [markdown_header(headers)]
        lines += [markdown_row([row.get(name, "-") for name in headers]) for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


@dataclass
class Panel:
    """One plot: a line per series, column(s) ``y`` over column ``x`` of ``rows``.

    Lines are named by the values of the ``series`` columns (rows sharing them form one line) and, when
    ``y`` names several columns, by the column.
    """

    rows: list[Row]
    x: str
    y: Sequence[str]
    series: Sequence[str] = ()
    xscale: str = "linear"  # "linear", "log" or "log2"
    yscale: str = "linear"
    ylabel: str = ""
    dashed: Callable[[str], bool] | None = None  # which lines (by name) to draw dashed
    reference: float | None = None  # a horizontal line, e.g. the ratio 1.0
    ymin: float | None = None
    legend: bool = True


@dataclass
class Report:
    """What one benchmark run shows: a title, the machine, text and tables in order, plot panels."""

    name: str
    title: str
    machine: Mapping[str, Any]
    sections: list[Table | str]
    panels: list[Panel] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"# {self.title}", machine_markdown(self.machine)]
        parts += [section if isinstance(section, str) else section.markdown() for section in self.sections]
        return "\n\n".join(parts) + "\n"


def format_cell(value: object) -> str:
    """Floats to 3 significant digits (thousands grouped above 1,000); everything else as ``str``."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_header(headers: Sequence[str]) -> str:
    return "| " + " | ".join(headers) + " |\n|" + "|".join(" --- " for _ in headers) + "|"


def markdown_row(values: Sequence[object]) -> str:
    return "| " + " | ".join(format_cell(value) for value in values) + " |"


def iqr_ms(seconds: Mapping[str, float]) -> str:
    """The interquartile range of a :func:`benchmarks.common.summarize` of seconds, in milliseconds."""
    return f"{seconds['p25'] * 1e3:.3g}-{seconds['p75'] * 1e3:.3g}"


def machine_summary(info: Mapping[str, Any]) -> str:
    """The machine in one line: processor (and GPU), cores, threads, library versions."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (
        f"{info['cpu_model']}{gpu}, {info['usable_cores']} usable cores, "
        f"torch threads {info['torch_threads']}; torch {info['torch']}, onnxruntime {info.get('onnxruntime')}"
    )


def machine_markdown(info: Mapping[str, Any]) -> str:
    load = info.get("load_average_at_start")
    shown = " / ".join(f"{value:.2f}" for value in load) if load else "unknown"
    return f"Machine: {machine_summary(info)}; load average at start (1 / 5 / 15 min) {shown}."


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _lines(panel: Panel) -> dict[str, tuple[list[float], list[float]]]:
    """Each line's name and points, in row order."""
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for row in panel.rows:
        key = ", ".join(
            f"{name} {row[name]}" if len(panel.series) > 1 else str(row[name]) for name in panel.series
        )
        for column in panel.y:
            name = ", ".join(part for part in (key, column if len(panel.y) > 1 else "") if part)
            xs, ys = lines.setdefault(name or column, ([], []))
            xs.append(_number(row[panel.x]))
            ys.append(_number(row.get(column)))
    return lines


def _scale(axis: Any, which: str, scale: str) -> None:
    setter = axis.set_xscale if which == "x" else axis.set_yscale
    if scale == "log2":
        setter("log", base=2)
    elif scale != "linear":
        setter(scale)


def draw(report: Report, path: Path) -> None:
    """The report's panels side by side in one PNG, titled with the benchmark and the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(report.panels), figsize=(6.5 * len(report.panels), 5), squeeze=False)
    for axis, panel in zip(axes[0], report.panels, strict=True):
        lines = _lines(panel)
        if len(lines) > 10:  # past the default cycle's 10 colours, lines would share one
            axis.set_prop_cycle(color=[plt.get_cmap("tab20")(index % 20) for index in range(len(lines))])
        for name, (xs, ys) in lines.items():
            style = "--" if panel.dashed is not None and panel.dashed(name) else "-"
            axis.plot(xs, ys, style, marker="o", label=name)
        _scale(axis, "x", panel.xscale)
        _scale(axis, "y", panel.yscale)
        axis.set_xlabel(panel.x)
        axis.set_ylabel(panel.ylabel or ", ".join(panel.y))
        axis.grid(alpha=0.3)
        if panel.reference is not None:
            axis.axhline(panel.reference, color="black", linewidth=0.8)
        if panel.ymin is not None:
            axis.set_ylim(bottom=panel.ymin)
        if panel.legend:
            axis.legend(fontsize=7)
    figure.suptitle(f"{report.title}\n{machine_summary(report.machine)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
    plt.close(figure)


def write_report(report: Report, output_dir: Path) -> dict[str, Path]:
    """``<name>.md`` and, when there are panels and matplotlib is installed, ``<name>.png`` (atomically)."""
    written = {
        "md": atomic_write(output_dir / f"{report.name}.md", lambda: report.markdown().encode()),
    }
    if not report.panels:
        return written
    try:
        import matplotlib  # noqa: F401  (only to know whether plots can be drawn)
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot written")
        return written
    target = output_dir / f"{report.name}.png"
    temporary = output_dir / f".{report.name}.tmp.png"
    draw(report, temporary)
    os.replace(temporary, target)
    written["png"] = target
    return written


def publish(report: Report, results: Mapping[str, Any], output_dir: Path | None) -> dict[str, str]:
    """Print the report; unless ``output_dir`` is None, write ``results`` as JSON and the report beside it."""
    print(report.markdown())
    if output_dir is None:
        return {}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = (json.dumps(results, indent=2, default=str) + "\n").encode()
    written = {"json": atomic_write(output_dir / f"{report.name}.json", lambda: payload)}
    written |= write_report(report, output_dir)
    return {kind: str(path) for kind, path in written.items()}


def render_saved(path: Path) -> dict[str, Path]:
    """Rebuild the markdown and plot of a saved ``<name>.json`` next to it (the JSON is not touched)."""
    results = json.loads(Path(path).read_text())
    module = importlib.import_module(f"benchmarks.{results['benchmark']}")
    report: Report = module.build_report(results)
    return write_report(report, Path(path).parent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Render the markdown and PNG of saved benchmark results again from their JSON.",
    )
    parser.add_argument(
        "results", nargs="+", type=Path, help="benchmark JSON files, e.g. results/forward.json"
    )
    for path in parser.parse_args(argv).results:
        for written in render_saved(path).values():
            print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
