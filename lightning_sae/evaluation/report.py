"""A one-file HTML report of a training run: curves, feature density, top-activating contexts.

The file is self-contained: inline CSS and static inline SVG drawn here, no script, no font and no
link to anything, so it opens offline, in an e-mail attachment or a CI artifact viewer alike.
:func:`top_activating_contexts` finds what a sample of latents fire on in held-out text;
:func:`render_report` writes the page; :class:`~lightning_sae.evaluation.HTMLReport` does both at
the end of a fit.
"""

import html
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_sae.data.models import HookedModel

#: Curves drawn for each hook, in order: (key, title).
CURVES = (
    ("loss", "training loss"),
    ("l0", "L0 (active latents per token)"),
    ("explained_variance", "explained variance"),
    ("ce_loss_recovered", "CE loss recovered (held-out)"),
)
#: Evaluation and training figures of the summary table: (key, label).
SUMMARY = (
    ("l0", "L0"),
    ("explained_variance", "explained variance"),
    ("ce_loss_clean", "CE loss, clean"),
    ("ce_loss_with_sae", "CE loss, with SAE"),
    ("ce_loss_zero_ablated", "CE loss, zero-ablated"),
    ("delta_lm_loss", "delta LM loss"),
    ("ce_loss_recovered", "CE loss recovered"),
    ("kl_div_with_sae", "KL divergence, with SAE"),
    ("kl_score", "KL score"),
)


@dataclass
class LatentContexts:
    """A latent and the held-out contexts it fires most on.

    Attributes:
        index: The latent.
        density: Fraction of the examined tokens it fires on.
        max_activation: Its largest activation there.
        contexts: Token windows, each ``[(token text, this latent's activation)]``, around one of
            its top activations (that token is the window's last but ``after`` ones).

    """

    index: int
    density: float
    max_activation: float
    contexts: list[list[tuple[str, float]]]


@dataclass
class HookReport:
    """What the report shows for one SAE."""

    hook_name: str
    #: The name the sae-lens export records, when it differs (``blocks.6.hook_resid_post``).
    exported_hook_name: str | None = None
    #: ``{curve key: [(training tokens, value)]}`` (keys of :data:`CURVES`).
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    #: Latest figures by key of :data:`SUMMARY` (from evaluation or training).
    metrics: dict[str, float] = field(default_factory=dict)
    #: log10 feature density of every latent (sae-lens's ``sparsity.safetensors``), if known.
    log10_density: list[float] | None = None
    latents: list[LatentContexts] = field(default_factory=list)


# ---------------------------------------------------------------------------------- contexts
@torch.no_grad()
def top_activating_contexts(
    hooked: HookedModel,
    saes: Mapping[str, nn.Module],
    rows: Tensor,
    n_latents: int = 24,
    n_contexts: int = 4,
    before: int = 12,
    after: int = 3,
    batch_rows: int = 8,
) -> dict[str, list[LatentContexts]]:
    """Top-activating contexts of a sample of each SAE's latents on token ``rows``.

    The latents firing on at least one token are sorted by density and ``n_latents`` are taken
    at evenly spaced ranks, from the rarest to the most frequent. Special-token positions
    (BOS/EOS/PAD) are left out. The model runs once, up to the last hook.

    Args:
        hooked: The language model; ``saes``'s keys are among its hooks.
        saes: ``{hook_name: SAE}`` with ``encode`` on raw activations.
        rows: Held-out token ids ``[rows, context]``.
        n_latents: Latents per SAE.
        n_contexts: Contexts per latent.
        before: Tokens shown before the activating one.
        after: Tokens shown after it.
        batch_rows: Rows per model forward and per encoder pass.

    """
    special = torch.tensor(hooked.special_token_ids(), dtype=torch.long, device=hooked.device)
    keep = ~torch.isin(rows.to(hooked.device), special)
    parts = [hooked.activations(batch) for batch in rows.split(batch_rows)]
    texts: dict[int, str] = {}
    result = {}
    for hook, sae in saes.items():
        acts = torch.cat([part[hook] for part in parts])
        counts = sum(f.gt(0).sum((0, 1)).cpu() for f in _latents(sae, acts, keep, batch_rows))
        alive = torch.nonzero(counts > 0).flatten()
        alive = alive[torch.argsort(counts[alive], stable=True)]
        picks = torch.linspace(0, len(alive) - 1, min(n_latents, len(alive))).round().long()
        latents = alive[picks]
        chosen = torch.cat(
            [
                f[..., latents.to(f.device)].float().cpu()
                for f in _latents(sae, acts, keep, batch_rows)
            ]
        )
        n_tokens = max(int(keep.sum()), 1)
        found = []
        for j, latent in enumerate(latents.tolist()):
            values = chosen[..., j]  # [rows, context]
            top = torch.topk(values.flatten(), min(n_contexts, values.numel()))
            contexts = []
            for value, flat_index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if value <= 0:
                    break
                r, p = divmod(flat_index, values.shape[1])
                window = range(max(0, p - before), min(values.shape[1], p + after + 1))
                ids = [int(rows[r, q]) for q in window]
                for token in ids:
                    if token not in texts:
                        texts[token] = hooked.tokenizer.decode([token])
                contexts.append(
                    [(texts[t], float(values[r, q])) for t, q in zip(ids, window, strict=True)]
                )
            found.append(
                LatentContexts(
                    index=latent,
                    density=float(counts[latent]) / n_tokens,
                    max_activation=float(values.max()),
                    contexts=contexts,
                )
            )
        result[hook] = found
    return result


def _latents(sae: nn.Module, acts: Tensor, keep: Tensor, batch_rows: int) -> Iterator[Tensor]:
    """Yield the latents ``[rows, context, d_sae]``, ``batch_rows`` at a time, 0 where not kept.

    Only kept tokens are encoded: a BatchTopK SAE's batch top-k must not spend its budget on
    special tokens (as in training and :class:`~lightning_sae.evaluation.LMEvaluation`).
    """
    parameter = next(sae.parameters())
    for x, kept in zip(acts.split(batch_rows), keep.split(batch_rows), strict=True):
        kept = kept.to(x.device)
        latents = sae.encode(x[kept].to(parameter.device, parameter.dtype))
        out = latents.new_zeros(*x.shape[:2], latents.shape[-1])
        out[kept.to(out.device)] = latents
        yield out


# ---------------------------------------------------------------------------------- rendering
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       margin: 0 auto; padding: 24px 32px; max-width: 1180px; background: #fafbfc; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; } h2 small { font-weight: 400; color: #55607a; }
.facts { color: #55607a; margin: 0 0 12px; }
table.summary { border-collapse: collapse; margin: 8px 0 4px; }
table.summary td, table.summary th { padding: 3px 12px 3px 0; text-align: left; }
table.summary td.v { font-variant-numeric: tabular-nums; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { background: #fff; border: 1px solid #e1e5ec; border-radius: 6px; padding: 6px; }
svg text { font: 11px system-ui, sans-serif; fill: #55607a; }
svg .title { font-size: 12px; fill: #1d2330; font-weight: 600; }
.latents { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr));
           gap: 10px; }
.latent { background: #fff; border: 1px solid #e1e5ec; border-radius: 6px; padding: 8px 10px; }
.latent .head { font-weight: 600; margin-bottom: 4px; }
.latent .head span { color: #55607a; font-weight: 400; }
.ctx { font: 12.5px/1.9 ui-monospace, "SFMono-Regular", Menlo, monospace; white-space: pre-wrap;
       border-top: 1px dashed #eef0f4; padding: 2px 0; }
.ctx span { border-radius: 3px; }
.note { color: #55607a; font-style: italic; }
"""
_LINE_COLOUR = "#2f6fdf"
_BAR_COLOUR = "#7a8fb8"


def render_report(title: str, facts: Sequence[str], hooks: Sequence[HookReport]) -> str:
    """Return the report's HTML: one section per hook, nothing loaded from anywhere else.

    Args:
        title: The page's heading.
        facts: Short lines about the run under the heading (model, steps, tokens, ...).
        hooks: One :class:`HookReport` per SAE.

    """
    sections = "\n".join(_hook_section(hook) for hook in hooks)
    fact_line = " · ".join(html.escape(fact) for fact in facts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1><p class="facts">{fact_line}</p>\n{sections}\n'
        "</body></html>\n"
    )


def _hook_section(hook: HookReport) -> str:
    rows = "".join(
        f'<tr><th>{label}</th><td class="v">{_number(hook.metrics[key])}</td></tr>'
        for key, label in SUMMARY
        if key in hook.metrics
    )
    table = f'<table class="summary">{rows}</table>' if rows else ""
    charts = [
        _line_chart(hook.curves[key], title)
        for key, title in CURVES
        if len(hook.curves.get(key, [])) > 0
    ]
    if hook.log10_density is not None:
        charts.append(_histogram(hook.log10_density, "log10 feature density"))
    chart_html = "".join(f'<div class="chart">{chart}</div>' for chart in charts)
    if hook.latents:
        latents = "".join(_latent_card(latent) for latent in hook.latents)
        latent_html = (
            f"<h3>Top-activating held-out contexts of {len(hook.latents)} latents</h3>"
            '<p class="note">Latents sampled evenly from the rarest to the most frequent; '
            "shading is the latent's activation relative to its maximum (hover for values).</p>"
            f'<div class="latents">{latents}</div>'
        )
    else:
        latent_html = '<p class="note">No held-out token rows: no contexts.</p>'
    heading = html.escape(hook.hook_name)
    if hook.exported_hook_name not in (None, hook.hook_name):
        heading += f" <small>(exported as {html.escape(hook.exported_hook_name)})</small>"
    return (
        f"<section><h2>{heading}</h2>{table}"
        f'<div class="charts">{chart_html}</div>{latent_html}</section>'
    )


def _latent_card(latent: LatentContexts) -> str:
    scale = latent.max_activation or 1.0
    lines = []
    for context in latent.contexts:
        spans = []
        for text, value in context:
            shown = html.escape(text.replace("\n", "↵"))
            if value > 0:
                alpha = min(value / scale, 1.0) * 0.85 + 0.1
                spans.append(
                    f'<span style="background:rgba(255,122,0,{alpha:.2f})" '
                    f'title="{value:.3g}">{shown}</span>'
                )
            else:
                spans.append(f"<span>{shown}</span>")
        lines.append(f'<div class="ctx">{"".join(spans)}</div>')
    return (
        f'<div class="latent"><div class="head">latent {latent.index} '
        f"<span>density {latent.density:.2e} · max {latent.max_activation:.3g}</span></div>"
        f"{''.join(lines)}</div>"
    )


# --- SVG
_Scale = Callable[[float], float]
_W, _H = 340, 210
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 24, 36


def _line_chart(points: Sequence[tuple[float, float]], title: str) -> str:
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        return _svg(title, "", "")
    xs, ys = [x for x, _ in finite], [y for _, y in finite]
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    sx, sy = _scale(x_ticks, _LEFT, _W - _RIGHT), _scale(y_ticks, _H - _BOTTOM, _TOP)
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
    marks = (
        f'<polyline points="{path}" fill="none" stroke="{_LINE_COLOUR}" stroke-width="2"/>'
        if len(finite) > 1
        else f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="3" fill="{_LINE_COLOUR}"/>'
    )
    return _svg(title, _axes(x_ticks, y_ticks, sx, sy, "training tokens"), marks)


def _histogram(values: Sequence[float], title: str, low: float = -10.0, high: float = 0.0) -> str:
    n_bins = 40
    width = (high - low) / n_bins
    counts = [0] * n_bins
    for value in values:
        counts[min(max(int((value - low) / width), 0), n_bins - 1)] += 1
    x_ticks = [low + 2 * i for i in range(int((high - low) / 2) + 1)]
    y_ticks = _ticks(0, max(counts))
    sx, sy = _scale(x_ticks, _LEFT, _W - _RIGHT), _scale(y_ticks, _H - _BOTTOM, _TOP)
    bars = "".join(
        f'<rect x="{sx(low + i * width):.1f}" y="{sy(count):.1f}" '
        f'width="{max(sx(low + width) - sx(low) - 1, 1):.1f}" '
        f'height="{sy(0) - sy(count):.1f}" fill="{_BAR_COLOUR}"/>'
        for i, count in enumerate(counts)
        if count
    )
    dead = sum(1 for value in values if value <= low)
    x_label = f"log10 density ({len(values):,} latents, {dead:,} dead)"
    return _svg(title, _axes(x_ticks, y_ticks, sx, sy, x_label), bars)


def _svg(title: str, axes: str, marks: str) -> str:
    return (
        f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">'
        f'<text class="title" x="{_LEFT}" y="14">{html.escape(title)}</text>'
        f"{axes}{marks}</svg>"
    )


def _axes(x_ticks: list[float], y_ticks: list[float], sx: _Scale, sy: _Scale, x_label: str) -> str:
    parts = [
        f'<line x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}" y2="{_H - _BOTTOM}" '
        'stroke="#9aa3b5"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_H - _BOTTOM}" stroke="#9aa3b5"/>',
    ]
    for x in x_ticks:
        parts.append(
            f'<text x="{sx(x):.1f}" y="{_H - _BOTTOM + 14}" text-anchor="middle">'
            f"{_number(x)}</text>"
        )
    for y in y_ticks:
        parts.append(
            f'<line x1="{_LEFT}" y1="{sy(y):.1f}" x2="{_W - _RIGHT}" y2="{sy(y):.1f}" '
            'stroke="#eef0f4"/>'
            f'<text x="{_LEFT - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{_number(y)}</text>'
        )
    parts.append(
        f'<text x="{(_LEFT + _W - _RIGHT) / 2}" y="{_H - 4}" text-anchor="middle">{x_label}</text>'
    )
    return "".join(parts)


def _ticks(low: float, high: float, target: int = 4) -> list[float]:
    """Round tick values covering ``[low, high]`` (1, 2 or 5 times a power of ten apart)."""
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / target
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    first, last = math.floor(low / step), math.ceil(high / step)
    return [i * step for i in range(first, last + 1)]


def _scale(ticks: list[float], start: float, end: float) -> _Scale:
    low, high = ticks[0], ticks[-1]
    return lambda value: start + (value - low) / (high - low) * (end - start)


def _number(value: float) -> str:
    """Compact numbers for axes and tables: 1.2M, 35k, 0.917, 4.15."""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}" if magnitude >= 0.01 else f"{value:.2e}"
