"""The HTML report: written at the end of fit, self-contained, and drawn by a real browser.

The browser is Debian's ``chromium`` in headless mode (``.ci/run`` installs it). Outside CI the
browser test is skipped when chromium is absent; in CI (``CI`` set) it must run.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_sae import ActivationDataModule, MultiSAEModule, TopKSAE
from lightning_sae.evaluation import HTMLReport, LMEvaluation
from lightning_sae.evaluation.report import _ticks

HOOK = "blocks.1.hook_resid_post"
#: Colours the page must show: the curves' blue and the activation highlight's orange.
LINE_RGB, HIGHLIGHT_RGB = (0x2F, 0x6F, 0xDF), (255, 122, 0)


def fit_with_report(model, documents, tmp_path: Path, module=None, hooks=HOOK) -> Path:
    dm = ActivationDataModule(
        model=model, hook_names=hooks, dataset=documents, context_size=32, batch_size=128,
        holdout_documents=6, exclude_special_tokens=True,
    )  # fmt: skip
    module = module or TopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    trainer = L.Trainer(
        max_steps=8, log_every_n_steps=2, logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu",
        callbacks=[LMEvaluation(every_n_steps=4, n_rows=4, batch_rows=2),
                   HTMLReport(n_latents=6, n_contexts=3, n_rows=8)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return tmp_path / "report.html"


@pytest.fixture
def report(model, documents, tmp_path) -> Path:
    return fit_with_report(model, documents, tmp_path)


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    # Nothing is fetched: no scripts, links, imports or URLs of any kind.
    for pattern in (r"<script", r"<link", r"@import", r"url\(", r"https?:", r"src="):
        assert not re.search(pattern, page, re.IGNORECASE), pattern
    for title in ("training loss", "L0", "explained variance", "CE loss recovered"):
        assert title in page
    assert "log10 feature density" in page and "64 latents" in page
    assert page.count('class="latent"') == 6
    assert page.count('class="ctx"') >= 6
    assert "rgba(255,122,0," in page  # activating tokens are shaded
    assert page.count("<polyline") >= 4  # loss, L0, EV every 2 steps; CE recovered at 4 and 8
    assert "CE loss recovered</th>" in page and "KL score" in page


def test_multi_hook_report_has_a_section_per_hook(model, documents, tmp_path):
    hooks = ["blocks.0.hook_resid_post", HOOK]
    module = MultiSAEModule("topk", hooks, d_in=32, d_sae=64, k=4, seed=0)
    page = fit_with_report(model, documents, tmp_path, module, hooks).read_text()
    for hook in hooks:
        assert f"<h2>{hook}</h2>" in page
    assert page.count('class="latent"') == 12 and page.count("<polyline") >= 8


def test_ticks_are_round_and_cover_the_range():
    assert _ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = _ticks(3.2, 97.0)
    assert ticks[0] <= 3.2 and ticks[-1] >= 97.0 and ticks == [0, 20, 40, 60, 80, 100]
    assert _ticks(5.0, 5.0)[0] < 5.0 < _ticks(5.0, 5.0)[-1]  # a flat curve still gets an axis


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="Debian chromium is not installed (apt-get install -y chromium); CI installs it",
)
def test_report_renders_in_a_headless_browser(report, tmp_path):
    assert chromium() is not None, "CI must install chromium (.ci/run) for this test"
    screenshot = tmp_path / "report.png"
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1400",
        f"--screenshot={screenshot}", report.resolve().as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert screenshot.is_file(), result.stderr[-2000:]
    pixels = torch.tensor(list(Image.open(screenshot).convert("RGB").getdata()))
    assert pixels.shape[0] == 1200 * 1400
    not_background = (pixels < 235).any(-1).float().mean()
    assert not_background > 0.03, f"only {not_background:.1%} of the page is drawn"
    for rgb in (LINE_RGB, HIGHLIGHT_RGB):
        close = ((pixels - torch.tensor(rgb)).abs() <= 40).all(-1).sum()
        assert close > 50, f"colour {rgb} is missing from the screenshot"


def test_batch_topk_contexts_spend_no_budget_on_special_tokens(model, documents):
    """The batch top-k runs over the kept tokens only: exactly ``k`` latents per kept token."""
    from lightning_sae import BatchTopKSAE
    from lightning_sae.evaluation import top_activating_contexts

    dm = ActivationDataModule(
        model=model, hook_names=HOOK, dataset=documents, context_size=32, batch_size=128,
        holdout_documents=6, exclude_special_tokens=True,
    )  # fmt: skip
    rows = dm.holdout_token_rows(4)
    n_kept = int((~torch.isin(rows, torch.tensor(dm.hooked_model.special_token_ids()))).sum())
    assert n_kept < rows.numel()  # the rows hold special tokens
    sae = BatchTopKSAE(d_in=32, d_sae=64, k=4, seed=0)
    latents = top_activating_contexts(dm.hooked_model, {HOOK: sae}, rows, n_latents=64)[HOOK]
    fired = sum(latent.density for latent in latents) * n_kept
    assert fired == pytest.approx(4 * n_kept)
