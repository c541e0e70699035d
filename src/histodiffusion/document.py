"""Report documents: headings, paragraphs, tables and images, rendered to Markdown and to a
self-contained HTML page (images embedded), plus the plots that go in them."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from histodiffusion.io import atomic_path, write_text  # noqa: E402


@dataclass
class Document:
    """An ordered list of blocks, rendered by :meth:`markdown` and :meth:`html`."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, headers: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", headers, [[_cell(c) for c in r] for r in rows]))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("image", Path(path), caption))

    def markdown(self, base: Path) -> str:
        """Markdown with images linked relative to ``base``."""
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += [f"{'#' * block[1]} {block[2]}", ""]
            elif kind == "paragraph":
                out += [block[1], ""]
            elif kind == "table":
                out += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
                out += ["| " + " | ".join(r) + " |" for r in block[2]] + [""]
            else:
                out += [f"![{block[2]}]({_relative(block[1], base)})", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        """A single HTML file: images are embedded as base64 PNGs."""
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif block[1].is_file():
                data = base64.b64encode(block[1].read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block[2])}'>"
                             f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, folder: Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``stem.md`` and ``stem.html`` into ``folder``."""
        md, page = folder / f"{stem}.md", folder / f"{stem}.html"
        write_text(md, self.markdown(folder))
        write_text(page, self.html())
        return md, page


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f4f0f7}img{max-width:100%;image-rendering:pixelated}"
        "figcaption{color:#555;font-size:90%}h2{border-bottom:2px solid #7a4b94}")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


def fmt_ci(stat: dict | None, scale: float = 100.0, signed: bool = False) -> str:
    """'83.1 [81.0, 85.2]' from a mean/ci dict (percent by default); ``signed``: '+1.2 [-0.3, +2.7]'."""
    if not stat or stat.get("mean") is None:
        return "-"
    f = "+.1f" if signed else ".1f"
    if stat.get("ci_low") is None:
        return f"{stat['mean'] * scale:{f}}"
    return f"{stat['mean'] * scale:{f}} [{stat['ci_low'] * scale:{f}}, {stat['ci_high'] * scale:{f}}]"


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def arms_bar_chart(summary: dict, metric: str, path: Path, title: str) -> Path:
    """Bars of each arm's mean with 95% CI error bars."""
    arms = list(summary["arms"])
    means = [summary["arms"][a][metric]["mean"] * 100 for a in arms]
    err_low = [m - (summary["arms"][a][metric]["ci_low"] or summary["arms"][a][metric]["mean"]) * 100
               for a, m in zip(arms, means, strict=True)]
    err_high = [(summary["arms"][a][metric]["ci_high"] or summary["arms"][a][metric]["mean"]) * 100 - m
                for a, m in zip(arms, means, strict=True)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(arms), 3.6))
    colors = ["#9e9e9e", "#b39ddb", "#7a4b94", "#e0a040"][: len(arms)]
    ax.bar(arms, means, yerr=[err_low, err_high], capsize=6, color=colors, edgecolor="#333")
    for i, m in enumerate(means):
        ax.text(i, m + err_high[i] + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=9)
    lo = min(m - e for m, e in zip(means, err_low, strict=True))
    ax.set_ylim(max(0, lo - 5), min(100, max(m + e for m, e in zip(means, err_high, strict=True)) + 4))
    ax.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str,
           log_y: bool = False) -> Path:
    """Line plot of named (x, y) series (training curves)."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, lw=1.4)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
