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
    palette = ["#9e9e9e", "#b39ddb", "#7a4b94", "#e0a040", "#4c9a8a", "#2e6b5e", "#c0c0c0", "#a8a8a8", "#909090"]
    colors = [palette[i % len(palette)] for i in range(len(arms))]
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


def ladder_chart(summary: dict, path: Path, title: str) -> Path:
    """The real-label ladder: test accuracy against labels (log x) with 95% CIs, every other arm as a
    horizontal line with its CI band, marked on the ladder at its label-equivalent."""
    ladder = summary["ladder"]
    xs = [v["labels"] for v in ladder.values()]
    acc = [v["accuracy"] for v in ladder.values()]
    ys = [a["mean"] * 100 for a in acc]
    lo = [(a["mean"] - (a["ci_low"] if a["ci_low"] is not None else a["mean"])) * 100 for a in acc]
    hi = [((a["ci_high"] if a["ci_high"] is not None else a["mean"]) - a["mean"]) * 100 for a in acc]
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color="#333", capsize=4, lw=1.6, label="real only (ladder)", zorder=3)
    for x, y, name in zip(xs, ys, ladder, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7, color="#333")
    colors = ["#7a4b94", "#e0a040", "#4c9a8a", "#c0504d", "#4f81bd", "#9bbb59"]
    others = [a for a in summary["arms"] if a not in ladder]
    for i, arm in enumerate(others):
        s = summary["arms"][arm]["accuracy"]
        c = colors[i % len(colors)]
        ax.axhline(s["mean"] * 100, color=c, lw=1.2, ls="--", label=arm)
        if s["ci_low"] is not None:
            ax.axhspan(s["ci_low"] * 100, s["ci_high"] * 100, color=c, alpha=0.12, lw=0)
        le = summary.get("label_equivalent", {}).get(arm)
        if le and le["censored"] == 0:
            ax.plot([le["mean"] * xs[0]], [s["mean"] * 100], marker="D", color=c, ms=7, zorder=4)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    means = ys + [summary["arms"][a]["accuracy"]["mean"] * 100 for a in others]
    ax.set_ylim(max(0.0, min(means) - 8), min(100.0, max(means) + 8))
    ax.set_xlabel("real labeled tiles (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
