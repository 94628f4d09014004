"""The hooked language model whose activations the DataModule streams.

Two kinds of model, one interface (sae-lens's ``HookedRootModule.run_with_cache``):

- transformer-lens ``HookedTransformer``, hook names such as ``blocks.3.hook_resid_post``; the
  forward stops after the last needed block. Built from a transformer-lens model name, or from any
  Hugging Face causal LM transformer-lens can convert (a local folder, a hub name, a
  ``PreTrainedModel``, or the offline default ``"smollm2-135m"``) by
  :func:`build_hooked_transformer`, without weight processing, so its activations are the Hugging
  Face model's.
- Hugging Face causal LMs (a name, a local folder or a ``PreTrainedModel``), hook names that are
  module paths such as ``model.layers.3``; wrapped in sae-lens's ``HookedProxyLM``, whose forward
  hooks raise ``StopForward`` once every requested module has run, so later layers never execute.

Every transformer-lens-based tool (sae-lens's ``HookedSAETransformer``, SAEDashboard, SAEBench)
needs transformer-lens hook names, so an export records a decoder layer's module path under its
transformer-lens name (:func:`exported_hook`): ``model.layers.6`` is ``blocks.6.hook_resid_post``.
"""

import copy
import difflib
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
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
#: Module paths of decoder layer ``N`` in Hugging Face causal LMs (Llama, Mistral, Qwen, Gemma,
#: Phi, OLMo: ``model.layers``; GPT-2, GPT-Neo, GPT-J, Bloom: ``transformer.h``; Pythia:
#: ``gpt_neox.layers``; OPT: ``model.decoder.layers``). A layer's output is the residual stream
#: after block ``N``: transformer-lens's ``blocks.N.hook_resid_post``.
_DECODER_LAYER = re.compile(
    r"^(?:model\.layers|model\.decoder\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)$"
)
#: First components of transformer-lens hook names (``blocks.3.hook_z``, ``hook_embed``, ...).
_TL_PREFIXES = ("blocks.", "hook_", "embed.", "pos_embed.", "ln_final.", "unembed.")


def transformer_lens_hook_name(module_path: str) -> str | None:
    """``blocks.N.hook_resid_post`` for a Hugging Face decoder layer's module path, else ``None``.

    >>> transformer_lens_hook_name("model.layers.6")
    'blocks.6.hook_resid_post'
    >>> transformer_lens_hook_name("model.layers.6.mlp") is None
    True
    """
    match = _DECODER_LAYER.match(module_path)
    return None if match is None else f"blocks.{match.group(1)}.hook_resid_post"


def exported_hook(hook_name: str, model_class_name: str) -> tuple[str, str]:
    """Return the ``(hook_name, model_class_name)`` an sae-lens export records for a hook.

    A decoder layer's module path (``model.layers.6``) is recorded as transformer-lens's
    ``blocks.6.hook_resid_post`` of a ``HookedTransformer``: the same activations (tested on Llama
    and GPT-2), under the name transformer-lens-based tools attach SAEs to. Other hooks keep their
    name and class.
    """
    tl_name = transformer_lens_hook_name(hook_name)
    return (hook_name, model_class_name) if tl_name is None else (tl_name, "HookedTransformer")


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
    hf = model_class_name == "AutoModelForCausalLM"
    kind = "module paths" if hf else "hook points"
    near = difflib.get_close_matches(name, valid, n=6, cutoff=0.5)
    hint = f"Did you mean one of {near}?" if near else f"The first valid ones: {valid[:8]}."
    if hf and _looks_transformer_lens(name):
        hint = (
            f"{name!r} is a transformer-lens hook name, but this model is hooked by Hugging Face "
            "module path (e.g. 'model.layers.6', the output of decoder layer 6): pass that, or "
            "leave model_class_name unset (or 'HookedTransformer') to build the model with "
            "transformer-lens."
        )
    elif not hf and not _looks_transformer_lens(name):
        tl_name = transformer_lens_hook_name(name)
        layer = f" The output of {name!r} is {tl_name!r}." if tl_name else ""
        hint = (
            f"{name!r} looks like a Hugging Face module path, but this is a transformer-lens "
            f"model, whose hooks are named like 'blocks.6.hook_resid_post'.{layer} {hint}"
        )
    return (
        f"Unknown hook name {name!r}: the model has no such {kind[:-1]} ({len(valid)} {kind} "
        f"exist). {hint}"
    )


def _looks_transformer_lens(name: str) -> bool:
    return name.startswith(_TL_PREFIXES) or name.rsplit(".", 1)[-1].startswith("hook_")


def _hf_max_context(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _guess_class_name(hook_names: Sequence[str]) -> str:
    """transformer-lens hook names (``blocks.6.hook_resid_post``) or Hugging Face module paths."""
    if all(_looks_transformer_lens(name) for name in hook_names):
        return "HookedTransformer"
    return "AutoModelForCausalLM"


def _offline_error(name: str, error: Exception) -> OSError:
    return OSError(
        f"Could not load model {name!r}: it is not a local folder and downloading it failed "
        f"(offline, or no such model on the Hugging Face hub). Pass the path of a local folder "
        f"saved with `save_pretrained`, a model instance, or {SMOLLM2_NAME!r} for the offline "
        f"default. Cause: {type(error).__name__}: {error}"
    )


def _is_official_transformer_lens_name(name: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:  # its message lists every official name (7,000 characters)
        return False
    return True


def build_hooked_transformer(
    model: str | torch.nn.Module,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    model_class: type[HookedTransformer] = HookedTransformer,
    trust_remote_code: bool = False,
) -> HookedTransformer:
    """Build ``model`` as a transformer-lens model, with no weight processing.

    A transformer-lens model name (``"gpt2"``) loads with ``from_pretrained_no_processing``. Any
    other model — ``"smollm2-135m"`` (the offline default), a local Hugging Face folder, a hub
    name, or a ``PreTrainedModel`` — is converted from its Hugging Face weights by
    transformer-lens's own converters (``get_pretrained_model_config`` and
    ``get_pretrained_state_dict``; ``from_pretrained`` refuses names outside its list). No
    layer-norm folding or centring, so the hooks see the Hugging Face model's activations.

    Args:
        model: A name, a local folder, ``"smollm2-135m"`` or a Hugging Face ``PreTrainedModel``.
        tokenizer: Tokenizer to attach (default: the model's own).
        dtype: Dtype of the weights.
        device: Device to build on.
        model_class: ``HookedTransformer`` or a subclass (``sae_lens.HookedSAETransformer``).
        trust_remote_code: Passed to ``from_pretrained``; off unless asked for by name.

    Raises:
        ValueError: transformer-lens has no converter for the model's architecture.
        OSError: The model is neither local nor downloadable.

    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str):
        source = str(smollm2_path()) if model == SMOLLM2_NAME else model
        if not Path(source).is_dir() and _is_official_transformer_lens_name(model):
            try:
                return model_class.from_pretrained_no_processing(
                    model, dtype=dtype, device=str(device), tokenizer=tokenizer
                )
            except OSError as error:
                raise _offline_error(model, error) from error
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code
            )
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
        except OSError as error:
            raise _offline_error(model, error) from error
        name = model
    else:
        hf, name = model, model.name_or_path
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    return _convert(hf, tokenizer, name, dtype, device, model_class)


def _convert(
    hf: Any,
    tokenizer: Any,
    name: str,
    dtype: torch.dtype,
    device: torch.device | str,
    model_class: type[HookedTransformer],
) -> HookedTransformer:
    """transformer-lens's Hugging Face converters on a model object, through its config alone."""
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    config = copy.deepcopy(hf.config)
    # transformer-lens picks its converter by config.architectures, unset on a model built from a
    # config object; it reads only config.json from the folder it is given.
    config.architectures = config.architectures or [type(hf).__name__]
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        try:
            cfg = get_pretrained_model_config(
                folder, hf_cfg=config.to_dict(), fold_ln=False, device=str(device), dtype=dtype
            )
        except NotImplementedError as error:
            raise ValueError(
                f"transformer-lens cannot build {name!r} ({config.architectures[0]}): {error} "
                "Hook it by Hugging Face module path instead (e.g. 'model.layers.6')."
            ) from error
        state = get_pretrained_state_dict(folder, cfg, hf_model=hf, dtype=dtype)
    cfg.model_name = str(name).rstrip("/").rsplit("/", 1)[-1]
    hooked = model_class(cfg, tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    torch.nn.Module.to(hooked, device)  # HookedTransformer.to prints a message
    return hooked.eval()


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
        model_class_name: ``HookedTransformer`` (transformer-lens hook names; a Hugging Face
            model is converted by :func:`build_hooked_transformer`) or ``AutoModelForCausalLM``
            (module paths); guessed from the hook names when ``None``.
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
    if not isinstance(model, str | torch.nn.Module):
        raise TypeError(
            f"model must be a name, a local folder or a model instance, got {type(model).__name__}."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class_name = model_class_name or _guess_class_name(hook_names)
    name = model if isinstance(model, str) else model.name_or_path
    if class_name == "HookedTransformer":
        hooked: HookedRootModule = build_hooked_transformer(
            model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        return HookedModel(hooked, hook_names, name, class_name)
    if isinstance(model, str):
        source = str(smollm2_path()) if model == SMOLLM2_NAME else model
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code
            ).to(device)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
        except OSError as error:
            raise _offline_error(model, error) from error
    else:
        hf = model
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
    proxy = HookedProxyLM(hf, tokenizer, hook_names=_existing(hf, hook_names))
    return HookedModel(proxy, hook_names, name, class_name)


def _existing(model: torch.nn.Module, hook_names: Sequence[str]) -> list[str]:
    """Keep the hook names that are modules of ``model`` (unknown ones get a clear error later)."""
    modules = dict(model.named_modules())
    return [name for name in hook_names if name in modules]
