"""``report.html`` of an evaluation: the summary table, a score histogram per scorer (inline SVG, drawn here), and
every image pair with its scores. Image paths are relative, so the output folder can be moved or served as is."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np

COLORS = {"model": "#1f77b4", "reference": "#ff7f0e"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _interval(stats: Mapping) -> str:
    if stats["low"] is None:  # one prompt: no spread to build an interval from
        return f"{_fmt(stats['mean'])} (one prompt: no interval)"
    return f"{_fmt(stats['mean'])} [{_fmt(stats['low'])}, {_fmt(stats['high'])}]"


def _counts(stats: Mapping) -> str:
    return f"{stats['n_prompts']} prompt{'s' * (stats['n_prompts'] != 1)}, {stats['n_images']} images"


def histogram_svg(series: Mapping[str, Sequence[float]], *, bins: int = 20, width: int = 480,
                  height: int = 200) -> str:
    """Side-by-side bars of each named series over shared bins, with axis labels and a legend."""
    pad_left, pad_bottom, pad_top = 40, 30, 20
    values = np.concatenate([np.asarray(v, np.float64) for v in series.values()])
    low, high = float(values.min()), float(values.max())
    if high == low:  # all scores equal: one visible bin around the value
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    counts = {name: np.histogram(v, edges)[0] for name, v in series.items()}
    top = max(int(c.max()) for c in counts.values())
    plot_w, plot_h = width - pad_left - 10, height - pad_bottom - pad_top
    bar_w = plot_w / bins / len(series)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<line x1="{pad_left}" y1="{pad_top + plot_h}" x2="{pad_left + plot_w}" y2="{pad_top + plot_h}" '
             f'stroke="#333"/>',
             f'<line x1="{pad_left}" y1="{pad_top}" x2="{pad_left}" y2="{pad_top + plot_h}" stroke="#333"/>',
             f'<text x="{pad_left - 4}" y="{pad_top + 4}" text-anchor="end" font-size="11">{top}</text>',
             f'<text x="{pad_left - 4}" y="{pad_top + plot_h}" text-anchor="end" font-size="11">0</text>',
             f'<text x="{pad_left}" y="{height - 8}" font-size="11">{low:.4g}</text>',
             f'<text x="{pad_left + plot_w}" y="{height - 8}" text-anchor="end" font-size="11">{high:.4g}</text>']
    for s, (name, count) in enumerate(counts.items()):
        color = COLORS.get(name, "#2ca02c")
        for b, c in enumerate(count):
            h = plot_h * c / top
            x = pad_left + (b * len(series) + s) * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{pad_top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{color}"><title>{html.escape(name)}: {c}</title></rect>')
        parts.append(f'<rect x="{pad_left + 10 + 110 * s}" y="4" width="10" height="10" fill="{color}"/>'
                     f'<text x="{pad_left + 24 + 110 * s}" y="13" font-size="11">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def render_report(results: Mapping) -> str:
    """The HTML page of ``results`` (the dictionary written to ``results.json``)."""
    roles = list(results["models"])
    esc = html.escape
    head = ["<th>scorer</th>", *(f"<th>{role} mean [95% CI]</th>" for role in roles)]
    if "reference" in roles:
        head += ["<th>win rate of model [95% CI]</th>", "<th>wins / losses / ties</th>"]
    head.append("<th>interval methods</th>")
    table, sections = [], []
    for scorer, summary in results["scorers"].items():
        cells = [f"<td>{esc(scorer)}</td>", *(f"<td>{_interval(summary[role])}</td>" for role in roles)]
        how = f"means: {esc(summary[roles[0]]['method'])} ({_counts(summary[roles[0]])})"
        if "win_rate" in summary:
            w = summary["win_rate"]
            cells += [f"<td>{_fmt(w['rate'])} [{_fmt(w['low'])}, {_fmt(w['high'])}]</td>",
                      f"<td>{w['wins']} / {w['losses']} / {w['ties']}</td>"]
            how += f"<br>win rate: {esc(w['method'])} ({_counts(w)})"
        cells.append(f"<td>{how}</td>")
        table.append(f"<tr>{''.join(cells)}</tr>")
        scores = {role: [row["scores"][scorer][role] for row in results["rows"]] for role in roles}
        sections.append(f"<h3>{esc(scorer)}</h3>{histogram_svg(scores)}")
    pairs = []
    for row in results["rows"]:
        images = "".join(f'<figure><img src="{esc(row["images"][role])}" alt="{role}"><figcaption>{role}'
                         f"</figcaption></figure>" for role in roles)
        lines = "<br>".join(f"{esc(name)}: " + ", ".join(f"{role} {s[role]:.4g}" for role in roles)
                            + (f" ({s['winner']})" if "winner" in s else "") for name, s in row["scores"].items())
        pairs.append(f'<div class="pair"><p><b>{esc(row["prompt"])}</b> (seed {row["seed"]})</p>{images}'
                     f"<p>{lines}</p></div>")
    methods, sampling = results["methods"], results["sampling"]
    size = f'{sampling["resolution"]} px' if sampling["resolution"] else "the model's image size"
    win_note = (f" Win rate of the model over the reference on paired images (same prompt and seed), a tie counting "
                f"as half a win, with its 95% interval: {esc(methods['win_rate'])}." if "reference" in roles else "")
    models = "".join(f"<li>{role}: <code>{esc(path)}</code></li>" for role, path in results["models"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dpojax eval</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: 4px 8px; text-align: left; }}
.pairs {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.pair {{ border: 1px solid #ddd; padding: 6px; width: 300px; }}
figure {{ display: inline-block; margin: 2px; }}
img {{ width: 136px; height: 136px; image-rendering: pixelated; background: #eee; }}
</style></head><body>
<h1>dpojax eval</h1>
<ul>{models}</ul>
<p>{len(results["rows"])} images per model ({results["n_prompts"]} prompts, {results["seeds"]} seeds per prompt): DDIM,
eta 0, {sampling["num_steps"]} steps, guidance {sampling["guidance"]}, {size}, batches of {sampling["batch_size"]}.
The unit of every interval is {esc(methods["unit"])}. Means with 95% intervals: {esc(methods["mean"])}.{win_note}</p>
<h2>Summary</h2>
<table><tr>{''.join(head)}</tr>{''.join(table)}</table>
<h2>Score histograms</h2>
{''.join(sections)}
<h2>Images</h2>
<div class="pairs">{''.join(pairs)}</div>
</body></html>
"""
