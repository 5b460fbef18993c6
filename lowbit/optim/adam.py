"""AdamW / Adam with blockwise-quantized states: one base class, six public optimizers.

Drop-in for ``torch.optim.AdamW`` / ``torch.optim.Adam``: param groups, per-group
hyper-parameters, ``lr`` as float or tensor, LR schedulers, ``zero_grad``, ``add_param_group``,
``maximize``, named parameters. Extras: ``block_size``, ``min_quant_size`` (tensors with fewer
elements keep fp32 state) and ``bf16_stochastic_round``.

Zero second moment: where the updated ``v`` is exactly 0 the element gets no Adam step (weight decay
still applies). With exact states ``v == 0`` implies ``m == 0``, so this is AdamW's step; with quantized
states a tiny ``v`` can round to 0 while ``m`` does not (the 8-bit map flushes ``v`` below ~1.6e-7 of its
block's absmax), and ``m / eps`` would throw the parameter away (e.g. embedding rows of tokens absent from the
batch).

Non-finite gradients: blocks are independent, so a NaN/inf gradient element never touches the
state of other blocks or other parameters. Inside its block the non-finite moment is stored as
0 and left out of the block's absmax, so the other elements of that block are quantized exactly
as if it were not there; the parameter element itself becomes NaN/inf (as with torch.optim.AdamW).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from . import _cpu_kernel, backend, sharding
from ._torch_step import hyper_row, torch_step
from .formats import FORMATS, RANK1, StateFormat, check_state, init_state, is_quantized

_MASK32 = 0xFFFFFFFF


class _AdamLowBit(torch.optim.Optimizer):
    """Adam / AdamW with blockwise-quantized moments; subclasses fix ``_format`` and ``_decoupled``.

    Args:
        params: parameters or param groups (named parameters too), fp32 / bf16 / fp16.
        lr: float or 1-element Tensor. betas, eps, weight_decay: as ``torch.optim.AdamW``
            (``weight_decay=None``: 1e-2 for the AdamW classes, 0 for the Adam ones).
        amsgrad: must be False. maximize: step along the gradient.
        block_size: elements per quantization block, a multiple of 8 up to 8192 (default 256; 4-bit 128).
        min_quant_size: tensors with fewer elements keep fp32 state (default 4096).
        bf16_stochastic_round: bf16 parameters: round the fp32 update stochastically.
        v_norm: 4-bit only: ``"rank1"`` scales each element of a 2-D parameter's second moment by
            min(its row's max, its column's max) (Li et al. 2023) instead of its block's absmax; other
            parameters keep blockwise state (a warning names them). Default ``"blockwise"``. The rank-1 C++
            step is scalar (about 9x the blockwise AVX2 step on CPU); the Triton one makes two passes.

    The step runs as the fused C++ kernel on CPU, one Triton kernel per bucket on CUDA, or the pure-torch
    step, all with the same bits (``lowbit.optim.backend``). State formats: ``lowbit.optim.formats``.
    """

    _format: str = "8bit"
    _decoupled: bool = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        bf16_stochastic_round: bool = False,
        v_norm: str = "blockwise",
    ) -> None:
        if weight_decay is None:
            weight_decay = 1e-2 if self._decoupled else 0.0
        fmt = FORMATS[self._format]
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            block_size=fmt.default_block_size if block_size is None else block_size,
            min_quant_size=min_quant_size,
            bf16_stochastic_round=bf16_stochastic_round,
            v_norm=v_norm,
        )
        _check_hparams(defaults, "defaults")
        if v_norm == "rank1" and self._format != "4bit":
            raise ValueError(f"{self.__class__.__name__}: v_norm='rank1' is for the 4-bit optimizers only")
        self._rank1_warned: set[str] = set()
        super().__init__(params, defaults)

    def _param_format(self, p: Tensor, group: dict, where: str) -> StateFormat:
        """The state format of ``p``: rank-1 ``v`` for 2-D plain tensors when asked, else the class's."""
        fmt = FORMATS[self._format]
        if group.get("v_norm", "blockwise") != "rank1" or not is_quantized(p, group["min_quant_size"]):
            return fmt
        why = (
            "it is a DTensor (the row and column maxima would need the whole tensor)"
            if isinstance(p, DTensor)
            else None
            if p.dim() == 2
            else f"it is {p.dim()}-D"
        )
        if why is None:
            return RANK1
        if where not in self._rank1_warned:
            self._rank1_warned.add(where)
            warnings.warn(
                f"{self.__class__.__name__}: v_norm='rank1' does not apply to {where} (shape "
                f"{list(p.shape)}): {why}; its second moment uses blockwise 4-bit state",
                stacklevel=4,
            )
        return fmt

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        _check_hparams(group, f"param_groups[{gi}]")
        group["betas"] = tuple(float(b) for b in group["betas"])  # plain floats: weights_only-loadable
        for i, p in enumerate(group["params"]):
            where = _where(group, gi, i)
            if p.is_complex():
                raise TypeError(
                    f"{self.__class__.__name__} does not support complex parameters: {where} is {p.dtype}"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"{self.__class__.__name__} needs floating-point parameters: {where} is {p.dtype}"
                )

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict made by the same optimizer class and settings.

        Raises ``ValueError`` naming the parameter if a state tensor has the wrong format or shape.
        State tensors keep their dtypes and move to their parameter's device.
        """
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        id_to_param = {}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param_groups[{gi}] of the loaded state dict has {len(saved['params'])} params, "
                    f"this optimizer's has {len(group['params'])}"
                )
            # the layout options stay this optimizer's: a state of another layout must fail, not switch it
            settings = {**group, **{k: v for k, v in saved.items() if k not in ("params", "v_norm")}}
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                fmt = self._param_format(p, settings, _where(group, gi, i))
                id_to_param[pid] = p, settings, fmt
                st = state_dict["state"].get(pid)
                if st is not None:
                    check_state(
                        st, p, fmt, settings["block_size"], settings["min_quant_size"], _where(group, gi, i)
                    )
        saved_state = state_dict["state"]
        v_norms = [g.get("v_norm", "blockwise") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, v_norm in zip(self.param_groups, v_norms):
            g["v_norm"] = v_norm
        # torch casts floating state to the param dtype; put back the exact saved tensors
        for pid, st in saved_state.items():
            p, settings, fmt = id_to_param[pid]
            mine = self.state[p]
            for k, v in st.items():
                if isinstance(v, Tensor):
                    mine[k] = v.detach().clone() if k == "step" else v.detach().to(device=p.device, copy=True)
            if isinstance(p, DTensor):  # a full (1-process) state dict loaded into a sharded optimizer
                mine.update(
                    sharding.localize_loaded_state(
                        mine, p, fmt, settings["block_size"], settings["min_quant_size"]
                    )
                )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter with a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group)
        return loss

    def _step_group(self, gi: int, group: dict) -> None:
        _check_hparams(group, f"param_groups[{gi}]")
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        bs, mqs = group["block_size"], group["min_quant_size"]
        sr = bool(group["bf16_stochastic_round"])
        buckets: dict[tuple, list] = defaultdict(list)
        gathered: list[tuple[Tensor, Tensor]] = []  # (DTensor param, its updated full copy)
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            where = _where(group, gi, i)
            if g.is_sparse:
                raise TypeError(f"{self.__class__.__name__} does not support sparse gradients: {where}")
            if g.shape != p.shape:
                raise ValueError(f"gradient of {where} has shape {list(g.shape)}, parameter {list(p.shape)}")
            fmt = self._param_format(p, group, where)
            kind = sharding.plan(p, fmt, bs, mqs) if isinstance(p, DTensor) else None
            state = self.state[p]
            if not state:
                state.update(
                    init_state(p, fmt, bs, mqs)
                    if kind is None
                    else sharding.init_dtensor_state(p, kind, fmt, bs, mqs, where)
                )
            state["step"] += 1
            row = hyper_row(
                lr, beta1, beta2, group["eps"], group["weight_decay"], float(state["step"]), self._decoupled
            )
            quant = is_quantized(p, mqs)  # global numel: the format does not depend on the world size
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if kind == "gather":
                p_full = p.full_tensor()
                gathered.append((p, p_full))
                p, g = p_full, g.full_tensor()
            elif kind == "local":
                p, g = p.to_local(), g.to_local()
            if kind is not None:
                state = sharding.local_views(state)
                if p.numel() == 0:
                    continue
            impl = backend.choose(p, g, where)
            buckets[(impl, p.device, p.dtype, fmt if quant else None)].append((p, g, state, row))

        for (impl, _device, dtype, f), items in buckets.items():
            hyper = torch.tensor([it[3] for it in items], dtype=torch.float32)
            stochastic = sr and dtype == torch.bfloat16
            seeds = _sr_seeds(len(items)) if stochastic else [0] * len(items)
            ps, gs, states = [it[0] for it in items], [it[1] for it in items], [it[2] for it in items]
            if impl == "cpp":
                _cpu_kernel.step(
                    _cpu_kernel.get(),
                    ps,
                    gs,
                    states,
                    f,
                    bs,
                    hyper,
                    seeds,
                    group["maximize"],
                    not self._decoupled,
                    stochastic,
                )
            elif impl == "triton":
                from . import _triton_step

                _triton_step.step(
                    ps, gs, states, f, bs, hyper, seeds, group["maximize"], not self._decoupled, stochastic
                )
            else:
                for j, (p, g, state) in enumerate(zip(ps, gs, states)):
                    torch_step(
                        p,
                        g,
                        state,
                        f,
                        bs,
                        hyper[j],
                        group["maximize"],
                        not self._decoupled,
                        stochastic,
                        seeds[j],
                    )
        for p, p_full in gathered:
            sharding.write_back_shard(p, p_full)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this process: for DTensor state, the local shards."""
        return sharding.local_state_bytes(self)


def _sr_seeds(n: int) -> list[int]:
    """Per-parameter 32-bit seeds for stochastic rounding, drawn from torch's default generator."""
    base = int(torch.randint(0, 2**31 - 1, (1,)))
    return [(base + j * 0x9E3779B9) & _MASK32 for j in range(n)]


def _where(group: dict, gi: int, i: int) -> str:
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r} (param_groups[{gi}]['params'][{i}])"
    return f"param_groups[{gi}]['params'][{i}]"


def _check_hparams(group: dict, where: str) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{where}: lr as a Tensor must have one element, got shape {list(lr.shape)}")
    if not float(lr) >= 0.0:
        raise ValueError(f"{where}: invalid learning rate lr={float(lr)}; must be >= 0")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for k, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"{where}: invalid beta{k + 1}={float(b)}; must be in [0, 1)")
    if not float(group["eps"]) >= 0.0:
        raise ValueError(f"{where}: invalid eps={group['eps']}; must be >= 0")
    if not float(group["weight_decay"]) >= 0.0:
        raise ValueError(f"{where}: invalid weight_decay={group['weight_decay']}; must be >= 0")
    if group["amsgrad"]:
        raise ValueError(f"{where}: amsgrad=True is not supported by the low-bit optimizers")
    bs = group["block_size"]
    max_bs = 8192
    if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs % 8 or bs > max_bs:
        raise ValueError(f"{where}: block_size must be a positive multiple of 8 up to {max_bs}, got {bs!r}")
    mqs = group["min_quant_size"]
    if not isinstance(mqs, int) or isinstance(mqs, bool) or mqs < 0:
        raise ValueError(f"{where}: min_quant_size must be an int >= 0, got {mqs!r}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"{where}: maximize must be a bool, got {group['maximize']!r}")
    if group.get("v_norm", "blockwise") not in ("blockwise", "rank1"):
        raise ValueError(f"{where}: v_norm must be 'blockwise' or 'rank1', got {group['v_norm']!r}")


class AdamW8bit(_AdamLowBit):
    """AdamW with 8-bit blockwise-quantized moments (2 B/param of state): dynamic-tree codes, block 256.

    Decoupled weight decay as ``torch.optim.AdamW`` (default 1e-2). Arguments: see :class:`_AdamLowBit`.
    """

    _format = "8bit"
    _decoupled = True


class AdamW4bit(_AdamLowBit):
    """AdamW with 4-bit blockwise-quantized moments (1 B/param of state): a dynamic-tree map for ``m``, a
    zero-free linear map for ``v``, block 128.

    Decoupled weight decay as ``torch.optim.AdamW`` (default 1e-2). Arguments: see :class:`_AdamLowBit`.
    """

    _format = "4bit"
    _decoupled = True


class AdamWFp8(_AdamLowBit):
    """AdamW with e4m3 blockwise-scaled moments (2 B/param of state), the second one stored as ``sqrt(v)``.

    Decoupled weight decay as ``torch.optim.AdamW`` (default 1e-2). Arguments: see :class:`_AdamLowBit`.
    """

    _format = "fp8"
    _decoupled = True


class Adam8bit(_AdamLowBit):
    """Adam with 8-bit moments (as :class:`AdamW8bit`); weight decay added to the gradient as
    ``torch.optim.Adam`` (default 0)."""

    _format = "8bit"
    _decoupled = False


class Adam4bit(_AdamLowBit):
    """Adam with 4-bit moments (as :class:`AdamW4bit`); weight decay added to the gradient as
    ``torch.optim.Adam`` (default 0)."""

    _format = "4bit"
    _decoupled = False


class AdamFp8(_AdamLowBit):
    """Adam with e4m3 moments (as :class:`AdamWFp8`); weight decay added to the gradient as
    ``torch.optim.Adam`` (default 0)."""

    _format = "fp8"
    _decoupled = False


__all__ = ["AdamW8bit", "AdamW4bit", "AdamWFp8", "Adam8bit", "Adam4bit", "AdamFp8"]
