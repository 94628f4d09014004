"""What the exporter and the evaluation need from the data, stated as typed protocols.

:class:`~lightning_sae.ActivationDataModule` satisfies both; any other DataModule (a user's own)
may implement them to get calibrated BatchTopK exports, sae-lens metadata, and LM evaluation.
They are read from ``trainer.datamodule`` and checked with ``isinstance`` (runtime protocols).
"""

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ExportData(Protocol):
    """Data facts an sae-lens export records, and held-out activations to calibrate with.

    The exporter passes ``hook_name`` only for one SAE of several (a ``MultiSAEModule``); a
    DataModule of one hook may define both methods without it.
    """

    def sae_metadata(self, hook_name: str | None = None) -> dict[str, Any]:
        """sae-lens ``metadata`` fields (model, hook, context size, dataset) for one hook."""
        ...

    def sample_activations(self, n_tokens: int, hook_name: str | None = None) -> Tensor:
        """``[n_tokens, d_in]`` raw activations of held-out tokens at ``hook_name``, on the CPU."""
        ...


@runtime_checkable
class EvaluationData(Protocol):
    """A language model to splice SAEs into, and held-out token rows to run it on."""

    hook_names: list[str]

    @property
    def hooked_model(self) -> Any:
        """The :class:`~lightning_sae.data.models.HookedModel` the activations come from."""
        ...

    def holdout_token_rows(self, n_rows: int) -> Tensor:
        """Token ids ``[n, context_size]`` (``n <= n_rows``) of never-trained documents."""
        ...
