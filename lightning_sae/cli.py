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

Everything else is Lightning's: ``fit``/``validate``/``test`` subcommands, ``--print_config``, the
resolved config saved as ``config.yaml`` in the logger's folder (``SaveConfigCallback``), and
callbacks such as :class:`~lightning_sae.SAELensExport` under ``trainer.callbacks`` in YAML.
"""

import copy
import warnings
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_sae.modules  # noqa: F401  (imports every module class for --model NAME)
from lightning_sae.data import ActivationDataModule
from lightning_sae.registry import available_architectures, get_module_class, import_class


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
        super().__init__(
            None,  # any LightningModule: the SAE modules and MultiSAEModule
            ActivationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_class=SAEArgumentParser,
            args=args,
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
        """
        subcommand = self.config.get("subcommand")
        asked = copy.deepcopy(self.config[subcommand].get("model")) if subcommand else None
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

    def instantiate_classes(self) -> None:
        """Build the DataModule, module and Trainer; report invalid values as a usage error."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            self.parser.error(f"{type(error).__name__}: {error}")


def _class_of(model_config: Any) -> type | None:
    """Import the class a config's ``class_path`` names (jsonargparse already imported it)."""
    module_name, _, name = str(model_config.get("class_path")).rpartition(".")
    try:
        return import_class(f"{module_name}:{name}")
    except (ImportError, AttributeError, TypeError):
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


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-sae`` command (``args`` defaults to ``sys.argv[1:]``)."""
    SAECLI(args=args)
