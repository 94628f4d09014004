"""SAEs wider than one device, on Lightning's ``ModelParallelStrategy``.

The strategy's two mesh dimensions choose the mode (``SAEModule.configure_model`` calls
:func:`parallelize`):

* ``tensor_parallel_size > 1`` — **latent-parallel** (TopK and BatchTopK): the ranks of a
  tensor-parallel group hold ``d_sae / N`` latents each (``W_enc`` columns, ``b_enc``, ``W_dec``
  rows as ``DTensor`` shards; ``b_dec`` replicated) and train on the same batch (the group's
  first rank's, broadcast each step); see :mod:`lightning_sae.saes.latent_parallel` for the
  exact top-k over shards. The strategy's default on one node (``tensor_parallel_size="auto"``:
  every device) is this mode.
* ``tensor_parallel_size == 1``, ``data_parallel_size > 1`` — **FSDP2** (every architecture):
  ``fully_shard`` over the data-parallel dimension, each rank on its own batch, gradients averaged
  as under DDP. ``training_forward_pass`` is registered as an FSDP forward method so the
  parameters are gathered around it.

Both dimensions above 1 at once is refused. Checkpoints are Lightning's: sharded folders by
default (``save_distributed_checkpoint=True``), one gathered file with ``False``; either resumes
on the same mesh, and a gathered file also loads in one process
(``SAEModule.load_from_checkpoint``). :func:`gathered_module` (every rank calls it) returns a
plain one-process copy on rank 0 to export or evaluate.
"""

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn import Parameter

from lightning_sae.saes.latent_parallel import LatentParallelTraining, latent_parallel_class

#: How latent-parallel training shards each SAE parameter over the tensor-parallel dimension.
LATENT_PLACEMENTS = {"W_enc": Shard(1), "b_enc": Shard(0), "W_dec": Shard(0), "b_dec": Replicate()}


def parallelize(module: Any, mesh: DeviceMesh) -> None:
    """Apply the mode ``mesh`` asks for to an ``SAEModule`` (idempotent: a no-op once applied).

    Raises:
        ValueError: Both mesh dimensions above 1, or latents that do not split evenly.
        TypeError: Latent-parallel training of an architecture other than TopK/BatchTopK.

    """
    sae = module.unit.sae
    if is_sharded(sae):
        return
    data, latents = mesh["data_parallel"], mesh["tensor_parallel"]
    if data.size() > 1 and latents.size() > 1:
        raise ValueError(
            f"ModelParallelStrategy gave a {data.size()} x {latents.size()} mesh: lightning-sae "
            "shards either the latents (tensor_parallel_size=N, data_parallel_size=1) or with "
            "FSDP2 (data_parallel_size=N, tensor_parallel_size=1), not both at once."
        )
    if latents.size() > 1:
        shard_latents(module.unit, latents)
    elif data.size() > 1:
        shard_fsdp2(module.unit, data)


def shard_latents(unit: Any, mesh: DeviceMesh) -> None:
    """Shard ``unit``'s SAE by latent over the 1-D ``mesh`` (rank 0's weights are kept)."""
    sae = unit.sae
    ranks, d_sae = mesh.size(), sae.cfg.d_sae
    if d_sae % ranks:
        raise ValueError(
            f"d_sae={d_sae} does not split over {ranks} latent-parallel ranks: choose a d_sae "
            f"divisible by {ranks}."
        )
    sae.__class__ = latent_parallel_class(type(sae))
    for name, placement in LATENT_PLACEMENTS.items():
        tensor = getattr(sae, name).detach()
        setattr(sae, name, Parameter(distribute_tensor(tensor, mesh, [placement])))
    sae.latent_group = mesh.get_group()
    unit.batch_group = mesh.get_group()
    unit.statistics.replicas = ranks


def shard_fsdp2(unit: Any, mesh: DeviceMesh) -> None:
    """``fully_shard`` ``unit``'s SAE over the 1-D data-parallel ``mesh``.

    The training pass and the first-batch initialisation run on the gathered parameters (FSDP
    forward methods). Some write parameters in place (JumpReLU's threshold step scaling and its
    data initialisation); FSDP2 would drop those writes when it frees the gathered copy, so each
    rank copies its part of the gathered parameters back into its shard after these methods.
    """
    sae = unit.sae
    fully_shard(sae, mesh=mesh)
    for name in ("training_forward_pass", "initialize_from_batch"):
        if callable(getattr(sae, name, None)):
            register_fsdp_forward_method(sae, name)
            setattr(sae, name, _keeping_writes(sae, getattr(sae, name), mesh))


def _keeping_writes(sae: Any, method: Any, mesh: DeviceMesh) -> Any:
    """Wrap ``method``: afterwards copy the gathered parameters into this rank's shards."""
    ranks, rank = mesh.size(), mesh.get_local_rank()

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        out = method(*args, **kwargs)
        with torch.no_grad():
            for group in sae._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:
                    shard = param.sharded_param.to_local()
                    chunks = param.unsharded_param.chunk(ranks, dim=0)
                    if rank < len(chunks) and shard.numel():
                        shard.copy_(chunks[rank])
        return out

    return run


@contextlib.contextmanager
def gathered_parameters(sae: torch.nn.Module) -> Iterator[None]:
    """Run the body (inference: ``encode``/``decode``) on an FSDP2 SAE's whole parameters.

    A collective for an FSDP2 SAE (every rank enters it, as in validation); a no-op otherwise.
    Only the training pass is an FSDP forward method: inference outside it would mix the
    sharded parameters with plain tensors.
    """
    if not isinstance(sae, FSDPModule):
        yield
        return
    sae.unshard()
    try:
        yield
    finally:
        sae.reshard()


def is_sharded(sae: torch.nn.Module) -> bool:
    """Whether ``sae``'s parameters are split over ranks (latent-parallel or FSDP2)."""
    return isinstance(sae, LatentParallelTraining | FSDPModule)


def gathered_module(module: Any) -> Any:
    """Return a one-process CPU copy of a sharded ``SAEModule`` on global rank 0, else ``None``.

    A collective: every rank calls it. The parameters are gathered one tensor at a time onto
    rank 0's CPU, so no device ever holds more than one whole tensor. The copy holds the whole
    SAE, its activation scale, statistics and metadata:
    ``export_to_sae_lens(gathered_module(module), ...)`` on rank 0 writes the plain sae-lens
    folder. An unsharded module is returned as it is (on every rank).
    """
    if not is_sharded(module.unit.sae):
        return module
    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not state:  # cpu_offload gathers onto rank 0 only
        return None
    # LightningCLI adds ``_class_path``/``_instantiator`` to the hyper-parameters: not arguments.
    copy = type(module)(**{k: v for k, v in module.hparams.items() if not k.startswith("_")})
    copy.load_state_dict({name: _full(tensor) for name, tensor in state.items()})
    copy.unit.mark_restored()
    copy.unit.statistics.density_published = module.unit.statistics.density_published
    copy.sae.cfg.metadata = module.sae.cfg.metadata
    return copy


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
