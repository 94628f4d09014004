"""The hooked language model whose activations the DataModule streams.

Two kinds of model, one interface (sae-lens's ``HookedRootModule.run_with_cache``):

- transformer-lens ``HookedTransformer`` (a name or an instance), hook names such as
  ``blocks.3.hook_resid_post``; the forward stops after the last needed block.
- Hugging Face causal LMs (a name, a local folder or a ``PreTrainedModel``), hook names that are
  module paths such as ``model.layers.3``; wrapped in sae-lens's ``HookedProxyLM``, whose forward
  hooks raise ``StopForward`` once every requested module has run, so later layers never execute.
"""

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from sae_lens.load_model import HookedProxyLM
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookedRootModule

from lightning_sae.data.offline import SMOLLM2_NAME, smollm2_path

#: sae-lens ``model_class_name`` values this module loads.
MODEL_CLASS_NAMES = ("HookedTransformer", "AutoModelForCausalLM")
#: Hugging Face id recorded in exported metadata for the offline default. The offline weights
#: are the dequantised Q4_1 GGUF of this model, so its activations differ slightly from the hub's.
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class HookedModel:
    """A hooked LM in eval mode with the hooks to read, their widths and its tokenizer.

    Args:
        model: The hooked model (``HookedTransformer`` or ``HookedProxyLM``).
        hook_names: Hooks to read; validated against the model's own hook points.
        model_name: Name recorded in exported metadata.
        model_class_name: ``HookedTransformer`` or ``AutoModelForCausalLM`` (sae-lens's names).

    """

    def __init__(
        self,
        model: HookedRootModule,
        hook_names: Sequence[str],
        model_name: str,
        model_class_name: str,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.hook_names = list(hook_names)
        self.model_name = model_name
        self.model_class_name = model_class_name
        self.tokenizer = model.tokenizer
        if isinstance(model, HookedProxyLM):
            valid = [name for name, _ in model.model.named_modules() if name]
        else:
            valid = list(model.hook_dict)
        for name in self.hook_names:
            if name not in model.hook_dict:
                raise ValueError(_unknown_hook_message(name, valid, model_class_name))
        if isinstance(model, HookedProxyLM):
            self.max_context: int | None = _hf_max_context(model.model)
            # Any stop_at_layer makes HookedProxyLM stop after the last requested module.
            self._stop_at_layer: int | None = 1
        else:
            self.max_context = model.cfg.n_ctx
            layers = [extract_stop_at_layer_from_tlens_hook_name(h) for h in self.hook_names]
            self._stop_at_layer = None if None in layers else max(layers)  # type: ignore[type-var]
        self.d_in = {
            name: acts.shape[-1] for name, acts in self.activations(self._probe_tokens()).items()
        }

    @property
    def device(self) -> torch.device:
        """Device the model's weights are on."""
        return next(self.model.parameters()).device

    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's BOS id (``None`` without a tokenizer or a BOS token)."""
        return getattr(self.tokenizer, "bos_token_id", None)

    def special_token_ids(self) -> list[int]:
        """BOS/EOS/PAD/SEP ids, dropped from activations with ``exclude_special_tokens``."""
        return [] if self.tokenizer is None else sorted(get_special_token_ids(self.tokenizer))

    def to(self, device: torch.device | str) -> "HookedModel":
        """Move the model to ``device`` in place."""
        torch.nn.Module.to(self.model, device)  # HookedTransformer.to prints a message
        if isinstance(self.model, HookedTransformer):
            self.model.cfg.device = str(device)
        return self

    @torch.no_grad()
    def activations(self, tokens: Tensor) -> dict[str, Tensor]:
        """Activations ``{hook: [batch, pos, d_in]}`` of token ids ``[batch, pos]``, one forward.

        Per-head hooks (``[batch, pos, heads, d_head]``) are flattened to ``heads * d_head`` as
        sae-lens does for ``hook_z``.
        """
        _, cache = self.model.run_with_cache(
            tokens.to(self.device),
            names_filter=self.hook_names,
            stop_at_layer=self._stop_at_layer,
        )
        return {name: cache[name].flatten(2) for name in self.hook_names}

    def _probe_tokens(self) -> Tensor:
        return torch.full((1, 2), self.bos_token_id or 0, dtype=torch.long)


def _unknown_hook_message(name: str, valid: list[str], model_class_name: str) -> str:
    near = difflib.get_close_matches(name, valid, n=6, cutoff=0.5)
    kind = "module paths" if model_class_name == "AutoModelForCausalLM" else "hook points"
    hint = f"Did you mean one of {near}?" if near else f"The first valid ones: {valid[:8]}."
    return (
        f"Unknown hook name {name!r}: the model has no such {kind[:-1]} ({len(valid)} {kind} "
        f"exist). {hint}"
    )


def _hf_max_context(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _guess_class_name(hook_names: Sequence[str]) -> str:
    """transformer-lens hook points all contain ``hook_``; HF module paths do not."""
    if all("hook_" in name.rsplit(".", 1)[-1] for name in hook_names):
        return "HookedTransformer"
    return "AutoModelForCausalLM"


def _offline_error(name: str, error: Exception) -> OSError:
    return OSError(
        f"Could not load model {name!r}: it is not a local folder and downloading it failed "
        f"(offline, or no such model on the Hugging Face hub). Pass the path of a local folder "
        f"saved with `save_pretrained`, a model instance, or {SMOLLM2_NAME!r} for the offline "
        f"default. Cause: {type(error).__name__}: {error}"
    )


def load_hooked_model(
    model: str | torch.nn.Module,
    hook_names: Sequence[str],
    model_class_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer: Any = None,
    trust_remote_code: bool = False,
) -> HookedModel:
    """Load ``model`` (a name, a local folder or an instance) as a :class:`HookedModel`.

    Args:
        model: A transformer-lens model name, a Hugging Face name or local folder,
            ``"smollm2-135m"`` for the offline default, a ``HookedTransformer`` / sae-lens
            ``HookedProxyLM``, or a Hugging Face ``PreTrainedModel``.
        hook_names: Hooks to read.
        model_class_name: ``HookedTransformer`` or ``AutoModelForCausalLM``; guessed from the
            hook names when ``None`` (transformer-lens hook points contain ``hook_``).
        dtype: Dtype of a model loaded by name.
        device: Device to load onto.
        tokenizer: Tokenizer for a ``PreTrainedModel`` instance (default: loaded from its
            ``name_or_path``).
        trust_remote_code: Passed to ``from_pretrained``; off unless asked for by name.

    """
    if model_class_name is not None and model_class_name not in MODEL_CLASS_NAMES:
        raise ValueError(
            f"model_class_name must be one of {MODEL_CLASS_NAMES}, got {model_class_name!r}."
        )
    if isinstance(model, HookedProxyLM):
        name = getattr(model.model, "name_or_path", type(model.model).__name__)
        return HookedModel(model, hook_names, name, "AutoModelForCausalLM")
    if isinstance(model, HookedRootModule):
        name = getattr(model.cfg, "model_name", type(model).__name__)
        return HookedModel(model, hook_names, name, "HookedTransformer")
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        name = model.name_or_path
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        return HookedModel(
            HookedProxyLM(model, tokenizer, hook_names=_existing(model, hook_names)),
            hook_names,
            name,
            "AutoModelForCausalLM",
        )
    if not isinstance(model, str):
        raise TypeError(
            f"model must be a name, a local folder or a model instance, got {type(model).__name__}."
        )
    class_name = model_class_name or _guess_class_name(hook_names)
    name, source = model, model
    if model == SMOLLM2_NAME:
        name, source = SMOLLM2_HF_ID, str(smollm2_path())
    try:
        if class_name == "HookedTransformer":
            hooked: HookedRootModule = HookedTransformer.from_pretrained_no_processing(
                source, device=str(device), dtype=dtype
            )
        else:
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code
            ).to(device)
            hf_tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
            hooked = HookedProxyLM(hf, hf_tokenizer, hook_names=_existing(hf, hook_names))
    except OSError as error:
        raise _offline_error(model, error) from error
    return HookedModel(hooked, hook_names, name, class_name)


def _existing(model: torch.nn.Module, hook_names: Sequence[str]) -> list[str]:
    """Keep the hook names that are modules of ``model`` (unknown ones get a clear error later)."""
    modules = dict(model.named_modules())
    return [name for name in hook_names if name in modules]
