"""The ``lightning-sae`` command line: Lightning's ``LightningCLI`` over every SAE module.

Any :class:`~lightning_sae.SAEModule` subclass, or :class:`~lightning_sae.MultiSAEModule` (one SAE
per hook from one forward pass), trains from any :class:`~lightning_sae.ActivationDataModule` (or a
subclass of it), chosen by class name or ``class_path``; the SAE's ``d_in`` (``{hook: width}`` for
several hooks) is read from the DataModule, so configs never repeat it.

.. code-block:: bash

    lightning-sae fit --config examples/batchtopk.yaml
    lightning-sae fit --config examples/topk.yaml --model BatchTopKSAE --model.k 16
    lightning-sae fit --config examples/batchtopk.yaml --ckpt_path runs/batchtopk/.../last.ckpt
    lightning-sae fit --config examples/batchtopk.yaml --trainer.strategy ddp --trainer.devices 2
    lightning-sae fit --config examples/multi_hook.yaml
    lightning-sae validate --config examples/batchtopk.yaml --ckpt_path .../last.ckpt
    lightning-sae cache --config examples/batchtopk.yaml --path acts/ --n_tokens 2000000

``lightning-sae cache`` runs the config's ``data`` (a live DataModule) once and writes its
activations to an activation store (:meth:`~lightning_sae.ActivationDataModule.write_cache`'s
arguments are its options: ``--dtype bfloat16``, ``--append true``, an ``s3://`` path with
``--storage_options``...); a killed run resumes when run again. Its other sections are ignored,
so the fit config that trains from the store (``--data.init_args.cache_dir acts/``) serves.

Everything else is Lightning's: ``fit``/``validate``/``test`` subcommands, ``--print_config``, the
resolved config saved as ``config.yaml`` in the logger's folder (``SaveConfigCallback``), and
callbacks such as :class:`~lightning_sae.SAELensExport` under ``trainer.callbacks`` in YAML.

**What a config may run.** jsonargparse instantiates any ``class_path`` it meets, and where a
parameter's type is ``Any`` (``data.init_args.dataset``) it would call any importable function
with the config's arguments (``os.system`` included). Before anything is built, every
``class_path`` in the config must name a Lightning component class (a ``LightningModule``,
``LightningDataModule``, callback, logger, strategy, accelerator, plugin, profiler), a function
of :data:`CONFIG_FUNCTIONS`, or, as the DataModule's ``model``, a ``torch.nn.Module`` (a
transformer-lens model built from its config); anything else is a usage error.
"""

import copy
import importlib
import inspect
import sys
import warnings
from typing import Any, NoReturn

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import LayerSync, Precision
from lightning.pytorch.profilers import Profiler
from lightning.pytorch.strategies import Strategy

import lightning_sae.modules  # noqa: F401  (imports every module class for --model NAME)
from lightning_sae.data import ActivationDataModule
from lightning_sae.errors import ConfigurationError
from lightning_sae.io import read_checkpoint
from lightning_sae.registry import available_architectures, get_module_class, import_class

#: Functions a config may name as a ``class_path`` (they return data): the offline documents.
CONFIG_FUNCTIONS = frozenset({"lightning_sae.data.shakespeare_documents"})
#: Classes a config's ``class_path`` may name (and their subclasses): Lightning's components.
CONFIG_CLASSES = (
    LightningModule,
    LightningDataModule,
    Callback,
    Logger,
    Strategy,
    Accelerator,
    Precision,
    CheckpointIO,
    ClusterEnvironment,
    LayerSync,
    Profiler,
)
#: Where a config may also build a ``torch.nn.Module``: the DataModule's language model.
MODULE_POSITIONS = ("data.init_args.model",)


class SAEArgumentParser(LightningArgumentParser):
    """Lightning's parser; an error about ``--model`` also lists the SAE modules to choose from."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Exit with ``message`` (status 2), naming the SAE modules when ``model`` is at fault."""
        if 'Parser key "model"' in message:
            names = sorted(get_module_class(name).__name__ for name in available_architectures())
            names.append("MultiSAEModule")
            message += f"\nSAE modules (--model NAME): {', '.join(names)}.\n"
        super().error(message, ex)


class SAECLI(LightningCLI):
    """``LightningCLI`` in subclass mode for SAE modules and activation DataModules.

    The module owns its optimiser and learning-rate schedule (``lr``, ``lr_warm_up_steps``, ...
    under ``model.init_args``), so the CLI adds no ``--optimizer``/``--lr_scheduler`` options.
    A ``ValueError`` raised while building the module or the DataModule (a ``k`` above ``d_sae``,
    an unknown hook name) ends the command with a usage error naming it instead of a traceback.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        parser_kwargs = {"epilog": CACHE_HELP} | (kwargs.pop("parser_kwargs", None) or {})
        super().__init__(
            None,  # any LightningModule: the SAE modules and MultiSAEModule
            ActivationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_class=SAEArgumentParser,
            args=args,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Take ``d_in`` from the DataModule: a width, or ``{hook: width}`` for several hooks."""
        parser.link_arguments("data", "model.init_args.d_in", _d_in, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Take ``--ckpt_path``'s hyper-parameters, refusing any that contradict the config.

        Lightning lets the checkpoint's model silently replace the one asked for (another
        ``--model``, another ``k``); here a different class or SAE-defining setting is a usage
        error, and other differences (learning rate...) are reported as the checkpoint's values.
        A path that is missing or not a checkpoint is a usage error too.
        """
        subcommand = self.config.get("subcommand")
        asked = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            try:  # memory-mapped: tensors are not read, only the file's structure
                read_checkpoint(
                    ckpt_path,
                    lambda: torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True),
                )
            except (OSError, ValueError) as error:
                self.parser.error(f"--ckpt_path: {error}")
        super()._parse_ckpt_path()
        used = self.config[subcommand].get("model") if subcommand else None
        if asked is None or used is None or asked == used:
            return
        asked_cls, used_cls = _class_of(asked), _class_of(used)
        if asked_cls is not used_cls:
            self.parser.error(
                f"--ckpt_path holds a {used.get('class_path')} but the config asks for "
                f"{asked.get('class_path')}: drop --model (resume the checkpoint as it is) or "
                "start a new run without --ckpt_path."
            )
        given, saved = _init_args(asked), _init_args(used)
        view = getattr(used_cls, "structural_view", None)
        if view is not None:
            theirs, ours = view(saved), view(given)
            blocking = {
                name: (ours.get(name), theirs.get(name))
                for name in sorted(theirs.keys() | ours.keys())
                if theirs.get(name) != ours.get(name)
            }
            if blocking:
                self.parser.error(
                    f"--ckpt_path holds an SAE that differs from the config's: {blocking} "
                    "(config, checkpoint). Resume with the checkpoint's settings, or start a new "
                    "run without --ckpt_path."
                )
        differing = {
            name: (value, saved.get(name))
            for name, value in given.items()
            if value is not None and value != saved.get(name)
        }
        if differing:
            warnings.warn(
                f"Resuming with the checkpoint's {differing} (config, checkpoint): the "
                "checkpoint's values are used.",
                stacklevel=2,
            )

    def before_instantiate_classes(self) -> None:
        """Refuse a config whose ``class_path`` s name anything but Lightning components."""
        for where, path in _class_paths(self.config):
            error = _refused_class_path(path, where)
            if error:
                self.parser.error(f"{where}: class_path {path!r} {error}")

    def instantiate_classes(self) -> None:
        """Build the DataModule, module and Trainer; report invalid values as a usage error.

        jsonargparse wraps what a constructor raised in its own ``ValueError``; the constructor's
        own error (``k`` above ``d_sae``, a missing cache folder) is the one reported.
        """
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause: BaseException = error
            while cause.__cause__ is not None or cause.__context__ is not None:
                cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
            self.parser.error(f"{type(cause).__name__}: {cause}")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``fit``/``validate``/...; settings the run contradicts are a usage error."""
        try:
            super()._run_subcommand(subcommand)
        except ConfigurationError as error:
            self.parser.error(f"{type(error).__name__}: {error}")


def _class_of(model_config: Any) -> type | None:
    """Import the class a config's ``class_path`` names (jsonargparse already imported it)."""
    module_name, _, name = str(model_config.get("class_path")).rpartition(".")
    try:
        return import_class(f"{module_name}:{name}")
    except (ImportError, AttributeError, TypeError):
        return None


def _class_paths(node: Any, where: str = "config") -> list[tuple[str, str]]:
    """Every ``(location, class_path)`` in a parsed config, however deep."""
    if isinstance(node, Namespace):
        node = node.as_dict()
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            found.append((where, node["class_path"]))
        for key, value in node.items():
            found += _class_paths(value, f"{where}.{key}" if where != "config" else str(key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            found += _class_paths(value, f"{where}[{index}]")
    return found


def _refused_class_path(path: str, where: str) -> str | None:
    """Why a config may not name ``path`` at ``where`` (``None``: it may)."""
    if path in CONFIG_FUNCTIONS:
        return None
    target = _import_dotted(path)
    allowed = CONFIG_CLASSES
    if where.endswith(MODULE_POSITIONS):
        allowed = (*allowed, torch.nn.Module)
    if isinstance(target, type) and issubclass(target, allowed):
        return None
    names = ", ".join(cls.__name__ for cls in CONFIG_CLASSES)
    return (
        f"is not allowed: a config may only build Lightning components ({names}) or call "
        f"{sorted(CONFIG_FUNCTIONS)}. Give data as a dataset name, a path or a .txt/.jsonl file."
    )


def _import_dotted(path: str) -> Any:
    """Return the object at dotted ``path`` (``None`` if it does not import)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name, None)
        return target
    return None


def _init_args(model_config: Any) -> dict[str, Any]:
    """Return the model's ``init_args`` and ``dict_kwargs`` as one dict, links excluded."""
    args: dict[str, Any] = {}
    for key in ("init_args", "dict_kwargs"):
        value = model_config.get(key)
        if value is not None:
            args |= value.as_dict() if isinstance(value, Namespace) else dict(value)
    args.pop("d_in", None)  # linked from the DataModule
    return args


def _d_in(datamodule: ActivationDataModule) -> int | dict[str, int]:
    return datamodule.d_in if len(datamodule.hook_names) == 1 else datamodule.d_in_per_hook


#: The ``cache`` command, which LightningCLI's own subcommand list cannot show.
CACHE_HELP = (
    "Also: lightning-sae cache --config CONFIG --path STORE --n_tokens N writes the activation "
    "store of the config's DataModule (lightning-sae cache --help)."
)


def cache(args: list[str]) -> None:
    """``lightning-sae cache``: write the activation store of a config's DataModule."""
    parser = ArgumentParser(
        prog="lightning-sae cache",
        description="Run the config's DataModule once and write its activations to a store "
        "(resumable: run the same command again after a crash).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a fit config (YAML)")
    parser.add_subclass_arguments(ActivationDataModule, "data", required=True)
    parser.add_method_arguments(ActivationDataModule, "write_cache", None)
    for section in ("model", "trainer", "optimizer", "lr_scheduler"):  # a fit config's
        parser.add_argument(f"--{section}", type=dict | None, help="ignored (fit's section)")
    parser.add_argument("--seed_everything", type=bool | int | None, help="ignored")
    parser.add_argument("--ckpt_path", type=str | None, help="ignored")
    config = parser.parse_args(args)
    for where, path in _class_paths(config.data, "data"):
        error = _refused_class_path(path, where)
        if error:
            parser.error(f"{where}: class_path {path!r} {error}")
    try:
        datamodule = parser.instantiate_classes(Namespace(data=config.data)).data
    except ValueError as error:
        cause: BaseException = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        parser.error(f"{type(cause).__name__}: {cause}")
    datamodule.prepare_data()
    parameters = inspect.signature(ActivationDataModule.write_cache).parameters
    options = {name: config[name] for name in parameters if name != "self"}
    try:
        print(datamodule.write_cache(**options))
    except (ValueError, FileExistsError, FileNotFoundError) as error:  # the target or a setting
        parser.error(f"{type(error).__name__}: {error}")


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-sae`` command (``args`` defaults to ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["cache"]:
        cache(argv[1:])
        return
    SAECLI(args=args)
