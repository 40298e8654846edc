"""FSDP 2: sharding on the CPU, and full state dicts from a sharded model (docs/scale.md).

accelerate (1.15) shards with FSDP only on accelerators. With ``ACCELERATE_USE_CPU=1`` its processes are
``MULTI_CPU``, and ``AcceleratorState`` takes its FSDP branch only for MULTI_GPU, MULTI_XPU and the other
accelerator types (accelerate/state.py, ``AcceleratorState.__init__``): an FSDP launch config on the CPU is
dropped without a word and the model wrapped in DDP. ``cpu_plugin`` notices that case (the launcher asked
for FSDP, accelerate did not do it) and ``shard`` does it instead, from the same launch config parsed by
accelerate's own ``FullyShardedDataParallelPlugin``: torch's ``fully_shard`` on every transformer layer, then on
the whole model, over a gloo mesh of all processes. Options it does not implement on the CPU are refused.

Whoever sharded the model (accelerate on GPUs, ``shard`` here), each process holds one shard of every
parameter (a DTensor). Saving gathers full tensors: every process takes part, the main one receives them
and writes the same files a single process writes; loading gives every process its shards of the full
tensors read from those files. So deltas and checkpoints do not depend on how many processes trained.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env
from torch import nn

from ..errors import ConfigError
from ..lazy import lazy

# torch's distributed checkpoint functions take a second to import: only a sharded run needs them
dcp = lazy("torch.distributed.checkpoint.state_dict")


def requested() -> bool:
    """The launch config asks for FSDP (``accelerate launch`` sets this from ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def problems(own_loop: bool, forgetting: bool) -> list[str]:
    """What a run cannot do when the launch asks for FSDP: checked before the run directory exists."""
    if not requested():
        return []
    out = []
    if own_loop:
        out.append("task: its own loop (PPO, GRPO) does not run under FSDP; launch it with a DDP config "
                   "(configs/accelerate/cpu-ddp.yaml, multi-gpu-ddp.yaml)")
    if forgetting:
        out.append("eval.forgetting: measured by the main process alone after training, which a sharded model "
                   "cannot do; set eval.forgetting=false under FSDP")
    if parse_flag_from_env("ACCELERATE_USE_CPU"):  # deltatune will shard (``cpu_plugin``): its options too
        out += _refused(_plugin())
    return out


def cpu_plugin(accelerator: Accelerator):
    """accelerate's FSDP settings from the launch, when the launch asked for FSDP on the CPU (where accelerate
    leaves it undone, see the module's docstring); None otherwise. A ConfigError names every option that
    deltatune does not implement on the CPU."""
    if not requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return None
    plugin = _plugin()
    found = _refused(plugin)
    if found:
        raise ConfigError(found)
    return plugin


def _plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set from the config


def _refused(plugin) -> list[str]:
    wrap = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")
    refused = {
        "fsdp_version": (plugin.fsdp_version != 2, "deltatune shards on the CPU with FSDP 2 only; set it to 2"),
        "fsdp_offload_params": (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
                                "the parameters are in CPU memory already; set it to false"),
        "fsdp_activation_checkpointing": (plugin.activation_checkpointing,
                                          "set it to false and train.gradient_checkpointing=true instead"),
        "fsdp_cpu_ram_efficient_loading": (plugin.cpu_ram_efficient_loading, "every process loads the whole model "
                                           "before it is sharded here; set it to false"),
        "fsdp_auto_wrap_policy": (wrap not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"),
                                  f"{wrap} is not implemented on the CPU; use TRANSFORMER_BASED_WRAP or NO_WRAP"),
        "fsdp_state_dict_type": (plugin.state_dict_type.name != "FULL_STATE_DICT",
                                 "deltatune saves full state dicts (the same files as one process); set "
                                 "FULL_STATE_DICT"),
        "fsdp_ignored_modules": (plugin.ignored_modules is not None, "not implemented on the CPU; remove it"),
        "mixed_precision": (plugin.mixed_precision_policy is not None, "set it to 'no'; train.bf16 turns autocast on"),
    }
    return [f"accelerate launch config: {key}: {why}" for key, (bad, why) in refused.items() if bad]


def shard(model: nn.Module, accelerator: Accelerator) -> bool:
    """FSDP 2 in place, as accelerate does on GPUs, when the launch asked for it on the CPU (``cpu_plugin``);
    returns whether it sharded. Call it before building the optimizer: sharding replaces the parameters."""
    plugin = cpu_plugin(accelerator)
    if plugin is None:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers: set[str] = set()
    if os.environ.get("FSDP_AUTO_WRAP_POLICY") == "TRANSFORMER_BASED_WRAP":
        plugin.set_auto_wrap_policy(model)  # its layer classes (fsdp_transformer_layer_cls_to_wrap, else the model's)
        layers = set(plugin.transformer_cls_names_to_wrap or ())
    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for module in list(model.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=plugin.reshard_after_forward)  # the rest: embeddings, head
    return True


def from_main(value):
    """The main process's ``value`` in every process (where each must decide the same: gather or not)."""
    shared = [value]
    broadcast_object_list(shared)
    return shared[0]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (under every name, tied ones too) and the buffers as full CPU tensors, in the
    main process (the others get an empty dict); the frozen base is left out. Every process must call it."""
    state = dcp.get_model_state_dict(model, options=_full(ignore_frozen_params=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        original = first.setdefault(id(param), name)
        if name != original and name in state:  # a tied weight's second name
            if original in state:  # gathered twice: one tensor again (transformers leaves tied copies out)
                state[name] = state[original]
            else:  # frozen (ignore_frozen_params leaves out its first name only)
                del state[name]
    return state


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` of the unsharded optimizer (parameters by index, in group order), full tensors,
    in the main process (the others get an empty dict). Every process must call it."""
    named = dcp.get_optimizer_state_dict(model, _inner(optimizer), options=_full())  # parameters by name
    if not named:
        return {}
    index: dict[str, int] = {}
    groups = [{**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]}
              for g in named["param_groups"]]
    return {"state": {index[name]: slots for name, slots in named["state"].items()}, "param_groups": groups}


def load_trained(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Full tensors of some parameters (every process read them) into this process's shards."""
    dcp.set_model_state_dict(model, params, options=dcp.StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """What ``optimizer_state`` returned (every process read it) into this process's shards."""
    inner = _inner(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in inner.param_groups for p in g["params"]]
    named = {"state": {order[int(i)]: slots for i, slots in state["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    dcp.set_optimizer_state_dict(model, inner, named, options=dcp.StateDictOptions(full_state_dict=True))


def _full(**kwargs):
    return dcp.StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)  # into the main process's CPU memory


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
