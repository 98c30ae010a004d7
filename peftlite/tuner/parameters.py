"""Which parameters get LoRA (PEFT's `target_parameters`), and the nested wrappers that hold it.

A target is named `<module path>.<parameter name>`, e.g.
`model.layers.0.mlp.experts.gate_up_proj`; an entry of
config.target_parameters matches it whole or as a dotted suffix, as PEFT
matches. Several parameters of one module nest, one ParamWrapper each, the
parameter registered last outermost (PEFT's order), so the wrapper of a
parameter nested d deep sits at `<module path>` + ".base_layer"·d: the path
its file keys use (keys.py).
"""

from __future__ import annotations

from torch import nn

from ..config import LoraConfig
from ..layers import AdapterState, LoraLayer, ParamWrapper


def unwrapped(module: nn.Module) -> nn.Module:
    """The module under any parameter wrappers."""
    return module.get_base_layer() if isinstance(module, ParamWrapper) else module


def wrapper_chain(module: nn.Module) -> list[ParamWrapper]:
    """The parameter wrappers at one path, outermost first (empty for a plain module)."""
    return module.chain() if isinstance(module, ParamWrapper) else []


def find_target_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module path, parameter name) of each parameter config.target_parameters selects, in model order.

    ValueError for a parameter of the top-level module or of a module that already has
    LoRA of another kind, and when an entry list matches nothing.
    """
    names = config.target_parameters or []
    if not names:
        return []
    found: list[tuple[str, str]] = []
    candidates: set[str] = set()
    for path, module in model.named_modules():
        if "base_layer" in path.split(".") or any(p in ("lora_A", "lora_B") for p in path.split(".")):
            continue
        owner = module.base_layer if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) \
            else unwrapped(module)
        for param_name, param in owner._parameters.items():
            if param is None:
                continue
            key = f"{path}.{param_name}" if path else param_name
            if param.dim() == 3:
                candidates.add(".".join(key.split(".")[-2:]))
            if not (key in names or any(key.endswith("." + name) for name in names)):
                continue
            if not path:
                raise ValueError(f"target_parameters entry {param_name!r} is a parameter of the top-level module, "
                                 "which PEFT cannot wrap either: expected a parameter of a submodule")
            if module is not owner and not isinstance(module, ParamWrapper):
                raise ValueError(f"parameter {key!r} is in {path!r}, which already has LoRA as a "
                                 f"{type(module).__name__}: a module takes target_modules or target_parameters, "
                                 "not both")
            found.append((path, param_name))
    if not found:
        raise ValueError(f"target_parameters={names!r} matched no parameter; 3-D parameters found (module."
                         f"parameter): {sorted(candidates)}")
    return found


def check_parameter_config(config: LoraConfig) -> None:
    """What PEFT's ParamWrapper refuses: the update must be W + ΔW, with nothing that needs x itself."""
    for name, value in (("lora_dropout", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                        ("lora_bias", config.lora_bias), ("use_dora", config.use_dora)):
        if value:
            raise ValueError(f"{name}={value!r} does not work with target_parameters (LoRA on a parameter is "
                             "folded into it, as in PEFT): expected it off")


def parameter_layout(model: nn.Module, targets: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """(config key `<path>.<param>`, module path, nesting depth) per target, after wrapping.

    Parameters already wrapped keep their wrappers; new ones wrap the chain from
    outside, in registration order, so the last one ends outermost (depth 0).
    """
    by_path: dict[str, list[str]] = {}
    for path, param_name in targets:
        by_path.setdefault(path, []).append(param_name)
    layout = []
    for path, param_names in by_path.items():
        existing = [w.parameter_name for w in wrapper_chain(model.get_submodule(path))]
        new = [p for p in param_names if p not in existing]
        chain = list(reversed(new)) + existing  # outermost first
        layout += [(f"{path}.{p}", path, chain.index(p)) for p in param_names]
    return layout


def plan_parameter_layers(model: nn.Module, state: AdapterState, config: LoraConfig,
                          targets: list[tuple[str, str]]) -> list[tuple[str, nn.Module, LoraLayer]]:
    """(module path, module there before, wrapper) per target, new wrappers nested in order; changes nothing."""
    if not targets:
        return []
    check_parameter_config(config)
    planned: list[tuple[str, nn.Module, LoraLayer]] = []
    tops: dict[str, nn.Module] = {}
    for path, param_name in targets:
        top = tops.get(path, model.get_submodule(path))
        existing = {w.parameter_name: w for w in wrapper_chain(top)}
        layer = existing.get(param_name) or ParamWrapper(top, state, param_name)
        if layer is not existing.get(param_name):
            tops[path] = layer
        layer.factor_shapes(config.rank_for(layer.config_key(path)))
        planned.append((path, top if layer is tops.get(path) else layer, layer))
    return planned
