"""Route a model's parameters to optimizer groups by name and shape (docs/INTERFACES.md).

Roles, from the parameter naming convention:
- embed:  the name contains "embed" (token and value embeddings);
- head:   the name starts with "lm_head." (dense, norm, decoder, bias);
- scalar: any other parameter with ndim < 2 (norms, biases, learned scalars);
- hidden: any other parameter with ndim >= 2 (Muon with name="muon", AdamW with "adamw").

Weight decay (AdamW's `weight_decay`, the ESM2 recipe) applies to matrices only, embeddings
included, never to vectors, so the head is split into "head" (matrices) and "head_no_decay".
A decoder tied to the embedding is one parameter with two names; it is the embedding.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from .config import OptimConfig

# Group names in the order they are built; empty groups are left out.
GROUP_NAMES = ("embed", "head", "head_no_decay", "scalar", "hidden")


def trainable_parameters(model: nn.Module) -> list[tuple[tuple[str, ...], nn.Parameter]]:
    """Each trainable parameter once, with every name it has (tied parameters have several)."""
    aliases: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            aliases.setdefault(id(p), (p, []))[1].append(name)
    return [(tuple(names), p) for p, names in aliases.values()]


def _roles_of_name(name: str, p: nn.Parameter) -> set[str]:
    roles = set()
    if "embed" in name:
        roles.add("embed")
    if name.startswith("lm_head."):
        roles.add("head")
    if p.ndim < 2 and "head" not in roles:
        roles.add("scalar")
    if not roles:
        roles.add("hidden")
    return roles


def param_role(names: tuple[str, ...], p: nn.Parameter) -> str:
    """The role of one parameter, or ValueError when its names point to more than one."""
    per_name = [_roles_of_name(n, p) for n in names]
    clashing = [n for n, roles in zip(names, per_name) if len(roles) > 1]
    if clashing:
        raise ValueError(
            f"optim: parameter {clashing[0]!r} (shape {tuple(p.shape)}) matches several groups "
            f"({', '.join(sorted(per_name[names.index(clashing[0])]))}); rename it so that it "
            "follows the naming convention in docs/INTERFACES.md"
        )
    roles = set().union(*per_name)
    if roles == {"embed", "head"}:  # a head decoder tied to the embedding is the embedding
        return "embed"
    if len(roles) > 1:
        raise ValueError(
            f"optim: the parameter shared by {', '.join(names)} would land in groups "
            f"{', '.join(sorted(roles))}; untie it or rename its aliases to one role"
        )
    return roles.pop()


def _group_name(role: str, p: nn.Parameter) -> str:
    if role == "head" and p.ndim < 2:
        return "head_no_decay"
    return role


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Optimizer groups: params, name, base_lr, lr, weight_decay, optimizer, lr_warmup (+ momentum)."""
    trainable = trainable_parameters(model)
    if not trainable:
        raise ValueError("optim: the model has no trainable parameters; nothing to optimize")
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for names, p in trainable:
        members[_group_name(param_role(names, p), p)].append(p)

    groups = []
    for name, params in members.items():
        if params:
            groups.append(_group_settings(name, cfg) | {"params": params, "name": name})
    check_partition(model, groups)
    return groups


def _group_settings(name: str, cfg: OptimConfig) -> dict:
    role = "head" if name == "head_no_decay" else name
    base_lr = cfg.group_lr(role)
    settings = dict(base_lr=base_lr, lr=base_lr, optimizer="adamw", lr_warmup=True)
    if name == "hidden" and cfg.name == "muon":
        return settings | dict(
            optimizer="muon",
            lr_warmup=False,  # speedrun convention; see schedules.apply_schedule
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum_start,
        )
    decays = name in ("embed", "head", "hidden")  # matrices; vectors never decay
    return settings | dict(weight_decay=cfg.weight_decay if decays else 0.0)


def check_partition(model: nn.Module, groups: list[dict]) -> None:
    """ValueError unless every trainable parameter of `model` is in exactly one group."""
    trainable = trainable_parameters(model)
    counts = Counter(id(p) for g in groups for p in g["params"])
    missing = [names[0] for names, p in trainable if counts[id(p)] == 0]
    repeated = [names[0] for names, p in trainable if counts[id(p)] > 1]
    known = {id(p) for _, p in trainable}
    foreign = sum(1 for g in groups for p in g["params"] if id(p) not in known)
    if missing:
        raise ValueError(
            f"optim: parameter(s) {', '.join(missing)} are in no optimizer group; "
            "name them by the convention in docs/INTERFACES.md or freeze them"
        )
    if repeated:
        raise ValueError(
            f"optim: parameter(s) {', '.join(repeated)} are in more than one optimizer group; "
            "each parameter must be routed exactly once"
        )
    if foreign:
        raise ValueError(
            f"optim: {foreign} parameter(s) in the optimizer groups are not trainable parameters "
            "of the model; build the optimizer from the model being trained"
        )
