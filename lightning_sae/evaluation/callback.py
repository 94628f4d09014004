"""Lightning callbacks that judge SAEs by what they do to the language model, and report on a run.

>>> from lightning import Trainer
>>> from lightning_sae.evaluation import HTMLReport, LMEvaluation
>>> trainer = Trainer(callbacks=[LMEvaluation(every_n_steps=100), HTMLReport()], logger=False)

In a ``lightning-sae`` YAML config, under ``trainer.callbacks``::

    - class_path: lightning_sae.evaluation.LMEvaluation
      init_args: {every_n_steps: 100, n_rows: 16}
    - class_path: lightning_sae.evaluation.HTMLReport
"""

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sae.callbacks import PeriodicCallback
from lightning_sae.data.models import HookedModel
from lightning_sae.data.protocol import EvaluationData, ExportData
from lightning_sae.errors import ConfigurationError
from lightning_sae.evaluation.lm import EvaluationSums, evaluation_sums
from lightning_sae.evaluation.report import (
    HookReport,
    LatentContexts,
    render_report,
    top_activating_contexts,
)
from lightning_sae.io import atomic_write_text
from lightning_sae.metrics import log10_feature_density
from lightning_sae.modules import MultiSAEModule, SAEModule, SAEUnit
from lightning_sae.modules.validation import check_positive_ints
from lightning_sae.parallel import is_sharded


class LMEvaluation(PeriodicCallback):
    """Splice each SAE into the language model on held-out tokens; log CE loss recovered and more.

    Every ``every_n_steps`` optimisation steps and at the end of training, each SAE replaces its
    hook's activation (non-special positions) in the DataModule's language model, on the first
    ``n_rows`` held-out token rows, and the callback logs to every Lightning logger, under
    ``eval/`` (``<hook>/eval/`` for a :class:`~lightning_sae.MultiSAEModule`):
    ``ce_loss_clean``, ``ce_loss_with_sae``, ``ce_loss_zero_ablated``, ``delta_lm_loss``,
    ``ce_loss_recovered``, ``kl_div_with_sae``, ``kl_div_zero_ablated``, ``kl_score``, ``l0`` and
    ``explained_variance`` (definitions: :mod:`lightning_sae.evaluation.lm`; they equal sae-lens's
    ``run_evals`` on the exported SAE). The values also go to ``trainer.callback_metrics``.

    Under DDP every rank evaluates its share of the rows and one all-reduce sums the results, so
    every rank must run this callback (it does: callbacks run everywhere). The zero-ablated
    forward does not depend on the SAE, so it runs at the first evaluation only.

    BatchTopK and Matryoshka SAEs are evaluated as trained (top ``B·k`` over the evaluated
    tokens); their export uses a calibrated threshold whose L0 is within a few % of ``k``.

    Args:
        every_n_steps: Evaluate every this many optimisation steps (``None``: only at the end).
        n_rows: Held-out token rows (of ``context_size`` tokens) to evaluate on.
        batch_rows: Rows per forward pass (memory: ``batch_rows × context × vocab`` logits).

    Raises:
        ValueError: At setup, if the DataModule has no language model or held-out tokens (an
            activation cache), or the module's SAEs do not match its hooks.

    """

    def __init__(self, every_n_steps: int | None = 100, n_rows: int = 16, batch_rows: int = 4):
        super().__init__(every_n_steps)
        check_positive_ints({"n_rows": n_rows, "batch_rows": batch_rows})
        self.n_rows, self.batch_rows = n_rows, batch_rows
        #: One entry per evaluation: ``{"step", "tokens", "metrics": {hook: {name: value}}}``.
        self.history: list[dict[str, Any]] = []
        self._tokens = 0
        self._zero_ablation: EvaluationSums | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the data and the module, and take this rank's share of the held-out rows."""
        if stage != "fit":
            return
        data = _evaluation_data(trainer, type(self).__name__)
        self._saes = sae_modules(pl_module, data.hook_names)
        self._hooked, rows = _model_and_rows(data, self.n_rows, type(self).__name__)
        self._rows = rows[trainer.global_rank :: trainer.world_size]
        self._single = isinstance(pl_module, SAEModule)
        self._zero_ablation = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the tokens trained on; evaluate on every ``every_n_steps``-th step."""
        self._tokens += batch_tokens(batch) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate (every ``every_n_steps`` steps)."""
        self.evaluate(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse SAEs sharded over ranks (known only once the strategy has set the model up)."""
        refuse_sharded(self._saes, type(self).__name__)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the final SAEs (unless the last step was just evaluated)."""
        if not self.ran_at(trainer.global_step):
            self.evaluate(trainer)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, dict[str, float]]:
        """Evaluate every SAE now (a collective under DDP), log and return ``{hook: metrics}``."""
        self.mark_ran(trainer.global_step)
        modes = {hook: sae.training for hook, sae in self._saes.items()}
        for sae in self._saes.values():
            sae.eval()
        try:
            sums = evaluation_sums(
                self._hooked,
                self._saes,
                self._rows,
                batch_rows=self.batch_rows,
                zero_ablation=self._zero_ablation is None,
            ).all_reduce()
        finally:
            for hook, sae in self._saes.items():
                sae.train(modes[hook])
        if self._zero_ablation is None:
            self._zero_ablation = sums
        results = sums.with_zero_ablation_of(self._zero_ablation).metrics()
        logged = {
            f"{prefix}{name}": value
            for hook, metrics in results.items()
            for prefix in [log_prefix(hook, self._single)]
            for name, value in metrics.items()
        }
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        self.history.append(
            {"step": trainer.global_step, "tokens": self._tokens, "metrics": results}
        )
        return results

    def state_dict(self) -> dict[str, Any]:
        """Return the evaluations so far and the tokens counted (a resumed run keeps its curve)."""
        return {"history": self.history, "tokens": self._tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the evaluations and the token count."""
        self.history = list(state_dict["history"])
        self._tokens = int(state_dict["tokens"])


class HTMLReport(Callback):
    """Write a self-contained HTML report of the run at the end of fit (global rank 0).

    The page holds, per SAE: the final evaluation figures, the curves of training loss, L0,
    explained variance and (with :class:`LMEvaluation` among the callbacks) CE loss recovered
    against training tokens, the histogram of log10 feature density (the module's last density
    window, as in ``sparsity.safetensors``), and for ``n_latents`` latents sampled from rare to
    frequent their top-activating contexts in ``n_rows`` held-out token rows, with the activating
    tokens shaded. It loads nothing from anywhere (no script, inline CSS and SVG).

    Args:
        path: The HTML file; ``None`` writes ``<trainer.default_root_dir>/report.html``.
        n_latents: Latents shown per SAE.
        n_contexts: Contexts shown per latent.
        n_rows: Held-out token rows searched for contexts (one model forward, to the last hook).

    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        n_latents: int = 24,
        n_contexts: int = 4,
        n_rows: int = 32,
    ) -> None:
        check_positive_ints({"n_latents": n_latents, "n_contexts": n_contexts, "n_rows": n_rows})
        self.path = None if path is None else Path(path)
        self.n_latents, self.n_contexts, self.n_rows = n_latents, n_contexts, n_rows
        #: ``{log key: [(training tokens, value)]}`` recorded on logging steps.
        self.curves: dict[str, list[tuple[float, float]]] = {}
        self._tokens = 0
        self._last_step: int | None = None
        self._latents: dict[str, list[LatentContexts]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the report's path and check the module."""
        if stage != "fit":
            return
        hook_names = getattr(trainer.datamodule, "hook_names", None)
        self._saes = sae_modules(pl_module, hook_names)
        self._single = isinstance(pl_module, SAEModule)
        if self.path is None:
            self.path = Path(trainer.default_root_dir) / "report.html"

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the logged training figures against tokens on every logging step."""
        self._tokens += batch_tokens(batch) * trainer.world_size
        step = trainer.global_step
        if step % trainer.log_every_n_steps or step == self._last_step:
            return
        self._last_step = step
        metrics = trainer.callback_metrics
        for hook in self._saes:
            for name in ("loss", "l0", "explained_variance"):
                key = f"{log_prefix(hook, self._single, 'train')}{name}"
                if key in metrics:
                    self.curves.setdefault(key, []).append((self._tokens, float(metrics[key])))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse SAEs sharded over ranks (known only once the strategy has set the model up)."""
        refuse_sharded(self._saes, type(self).__name__)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find top-activating contexts while the SAEs are still on the model's device."""
        data = trainer.datamodule
        if not trainer.is_global_zero or not _has_evaluation_data(data):
            return
        try:
            hooked, rows = _model_and_rows(data, self.n_rows, type(self).__name__)
        except ValueError as error:  # an activation cache: the report has no contexts
            rank_zero_warn(f"{error} The report shows no contexts.")
            return
        self._latents = top_activating_contexts(
            hooked, self._saes, rows, n_latents=self.n_latents, n_contexts=self.n_contexts
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the report (after the module published its final feature density)."""
        if trainer.is_global_zero:
            self.write(trainer)

    def write(self, trainer: Trainer) -> Path:
        """Render the report from what was recorded and write it atomically; return its path."""
        assert self.path is not None  # set in setup()
        evaluation = next((c for c in trainer.callbacks if isinstance(c, LMEvaluation)), None)
        history = evaluation.history if evaluation is not None else []
        hooks = []
        for hook, sae in self._saes.items():
            report = HookReport(hook_name=hook, latents=self._latents.get(hook, []))
            report.exported_hook_name = _exported_hook_name(trainer.datamodule, hook)
            for name in ("loss", "l0", "explained_variance"):
                key = f"{log_prefix(hook, self._single, 'train')}{name}"
                report.curves[name] = self.curves.get(key, [])
                if report.curves[name]:
                    report.metrics[name] = report.curves[name][-1][1]
            report.curves["ce_loss_recovered"] = [
                (entry["tokens"], entry["metrics"][hook]["ce_loss_recovered"]) for entry in history
            ]
            if history:
                report.metrics.update(history[-1]["metrics"][hook])
            density = getattr(sae, "feature_density", None)
            if isinstance(density, Tensor) and density.any():
                report.log10_density = log10_feature_density(density.detach().cpu()).tolist()
            hooks.append(report)
        html = render_report("lightning-sae report", _facts(trainer, self._tokens), hooks)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, html)
        return self.path

    def state_dict(self) -> dict[str, Any]:
        """Return the curves so far and the tokens counted (a resumed run keeps its history)."""
        return {"curves": self.curves, "tokens": self._tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the curves and the token count."""
        self.curves = {k: [tuple(p) for p in v] for k, v in state_dict["curves"].items()}
        self._tokens = int(state_dict["tokens"])


def refuse_sharded(saes: Mapping[str, SAEModule | SAEUnit], who: str) -> None:
    """Raise ``ConfigurationError`` if an SAE is sharded over ranks (latent-parallel or FSDP2).

    Encoding on held-out rows needs the whole SAE on every rank, and the ranks hold different
    numbers of rows, so a gather there would hang.
    """
    sharded = [hook for hook, sae in saes.items() if is_sharded(sae.sae)]
    if sharded:
        raise ConfigurationError(
            f"{who} cannot encode with SAEs sharded over ranks (latent-parallel or FSDP2 on "
            f"ModelParallelStrategy): {sharded}. Drop the callback from this run and evaluate the "
            "SAELensExport export in one process (sae_lens.evals.run_evals), or train with DDP."
        )


def sae_modules(
    pl_module: LightningModule, hook_names: list[str] | None
) -> dict[str, SAEModule | SAEUnit]:
    """Return ``{hook: SAE}`` (raw-unit ``encode``/``decode``) of an SAE or multi-SAE module.

    Raises:
        TypeError: ``pl_module`` is neither.
        ValueError: Its hooks are not the DataModule's ``hook_names``.

    """
    if isinstance(pl_module, MultiSAEModule):
        missing = [h for h in pl_module.hook_names if h not in (hook_names or pl_module.hook_names)]
        if missing:
            raise ValueError(
                f"The module trains SAEs at hooks {missing} that the DataModule does not read "
                f"({hook_names})."
            )
        return {hook: pl_module.sae_unit(hook) for hook in pl_module.hook_names}
    if isinstance(pl_module, SAEModule):
        if hook_names is not None and len(hook_names) != 1:
            raise ValueError(
                f"A single SAE module trains on one hook, but the DataModule reads {hook_names}: "
                "use MultiSAEModule for several hooks."
            )
        return {hook_names[0] if hook_names else "sae": pl_module}
    raise TypeError(
        f"Expected a lightning_sae SAE module or MultiSAEModule, got {type(pl_module).__name__}."
    )


def log_prefix(hook: str, single: bool, stage: str = "eval") -> str:
    """``eval/`` for a one-SAE module, ``<hook>/eval/`` for a multi-SAE module (as it logs)."""
    return f"{stage}/" if single else f"{hook}/{stage}/"


def batch_tokens(batch: Any) -> int:
    """Activations (tokens) in a training batch: a tensor, a ``(tensor,)`` or ``{hook: tensor}``."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    if isinstance(batch, list | tuple):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, Tensor) else 0


def _evaluation_data(trainer: Trainer, who: str) -> EvaluationData:
    data = trainer.datamodule
    if not _has_evaluation_data(data):
        raise ValueError(
            f"{who} needs a DataModule with a language model and held-out token rows "
            "(lightning_sae.data.protocol.EvaluationData: hooked_model, holdout_token_rows), got "
            f"{type(data).__name__ if data is not None else 'none'}. Train with "
            "ActivationDataModule(model=..., dataset=...), or drop the callback."
        )
    return data


def _has_evaluation_data(data: Any) -> bool:
    try:
        return isinstance(data, EvaluationData)
    except RuntimeError:  # Python 3.11 reads the hooked_model property, which may refuse
        return True


def _model_and_rows(data: EvaluationData, n_rows: int, who: str) -> tuple[HookedModel, Tensor]:
    """Return the DataModule's language model and held-out rows, or raise naming the fix."""
    try:
        rows = data.holdout_token_rows(n_rows)
        hooked = data.hooked_model
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{who} cannot evaluate on this DataModule: {error}") from error
    if rows.shape[0] < n_rows:
        rank_zero_warn(
            f"{who}: the held-out documents give {rows.shape[0]} token rows, fewer than the "
            f"{n_rows} asked for; raise the DataModule's holdout_documents for more."
        )
    return hooked, rows


def _exported_hook_name(data: Any, hook: str) -> str | None:
    """Return the hook name an export records (``DataModule.sae_metadata(hook)``), if known."""
    sae_metadata = getattr(data, "sae_metadata", None)
    if not callable(sae_metadata) or "hook_name" not in inspect.signature(sae_metadata).parameters:
        return None
    return sae_metadata(hook)["hook_name"]


def _facts(trainer: Trainer, tokens: int) -> list[str]:
    """Short lines about the run for the report's heading."""
    data, module = trainer.datamodule, trainer.lightning_module
    facts = []
    if isinstance(data, ExportData):
        metadata = data.sae_metadata()
        facts.append(f"model {metadata['model_name']}")
    facts.append(type(module).__name__)
    if "d_sae" in module.hparams:
        facts.append(f"{module.hparams['d_sae']:,} latents")
    facts.append(f"{trainer.global_step:,} steps")
    facts.append(f"{tokens:,} training tokens")
    return facts
