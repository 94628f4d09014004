"""What a training run prints: a progress bar of optimisation steps and a closing summary."""

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

#: Progress-bar names of the figures the SAE modules and LMEvaluation log, shown in this order.
_SHOWN = {"l0": "l0", "ev": "ev", "tok/s": "tok/s", "eval/ce_loss_recovered": "ce_rec"}


class StepProgressBar(TQDMProgressBar):
    """One bar counting optimisation steps of ``max_steps``, with L0, EV, tokens/s, CE recovered.

    Lightning's default bar counts the batches of an epoch, which an endless activation stream
    never finishes (``Epoch 0: 120it``), and shows the logger's version (``v_num``). This bar
    shows ``train 120/300`` and the figures the SAE modules put on the progress bar (``l0``,
    ``ev``, ``tok/s``; ``<hook>/...`` for several SAEs) plus the latest CE loss recovered of
    :class:`~lightning_sae.evaluation.LMEvaluation` (``ce_rec``).
    """

    @property
    def train_description(self) -> str:
        """The bar's label."""
        return "train"

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """Count steps of ``max_steps`` (no total when it is unset), from the restored step."""
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step
        bar.refresh()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Advance to the current optimisation step."""
        bar = self.train_progress_bar
        if self.is_enabled and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Return the SAE figures (no ``v_num``)."""
        figures = {**trainer.progress_bar_metrics, **_evaluation_figures(trainer)}
        shown = {}
        for suffix, label in _SHOWN.items():  # in this order (tqdm keeps it)
            for name, value in figures.items():
                if name == suffix or name.endswith(f"/{suffix}"):
                    shown[name[: len(name) - len(suffix)] + label] = _figure(float(value))
        return shown


def _evaluation_figures(trainer: Trainer) -> dict[str, Any]:
    return {
        name: value
        for name, value in trainer.callback_metrics.items()
        if name.endswith("eval/ce_loss_recovered")
    }


def _figure(value: float) -> str:
    """Three significant digits, without an exponent for large values (``2521``, ``0.823``)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
