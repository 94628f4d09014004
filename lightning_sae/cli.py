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

from typing import Any, NoReturn

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_sae.modules  # noqa: F401  (imports every module class for --model NAME)
from lightning_sae.data import ActivationDataModule
from lightning_sae.registry import available_architectures, get_module_class


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

    def instantiate_classes(self) -> None:
        """Build the DataModule, module and Trainer; report invalid values as a usage error."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            self.parser.error(f"{type(error).__name__}: {error}")


def _d_in(datamodule: ActivationDataModule) -> int | dict[str, int]:
    return datamodule.d_in if len(datamodule.hook_names) == 1 else datamodule.d_in_per_hook


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-sae`` command (``args`` defaults to ``sys.argv[1:]``)."""
    SAECLI(args=args)
