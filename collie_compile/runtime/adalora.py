"""AdaLoRA between the steps, as peft trains it: the orthogonality regulariser and the
rank budget (peft's ``AdaLoraModel.forward`` and ``update_and_allocate``).

- Before the update, each factor's regulariser ``‖P Pᵀ - I‖_F`` (A: ``P = A``; B:
  ``P = Bᵀ``), averaged over every factor of the model and weighted by
  ``orth_reg_weight``, joins the loss, and its gradient ``2·G·A`` / ``2·B·G`` (``G`` the
  normalised residual) joins the factors' gradients. peft adds it to every forward's loss;
  one step's gradient is the same sum. The Gram matrix sums over tp slices, the factor
  is gathered over ZeRO-3 shards first (both are small: rank x features).
- After the update, from the step's gradients: importance ``|p·g|``, smoothed (``beta1``)
  and its uncertainty (``beta2``); every ``deltaT`` steps between ``tinit`` and
  ``total_step - tfinal``, each adapter's triplets (E's score plus the mean of A's row
  and B's column) are ranked over the whole model (every stage) and the singular values
  E below the budget's k-th score are zeroed; the budget falls cubically from
  ``init_r`` to ``target_r`` per adapter. At ``total_step - tfinal`` the final pattern
  is fixed and then reapplied after every step.

``global_step`` counts steps from 0, as peft's docstring loop does. The rank pattern
(adapter E -> which ranks stay) is the same on every rank and goes into the saved
adapter's config, which peft reads to cut the factors to their ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError
from collie_compile.runtime.program import RankProgram

ADALORA_FILE = "adalora.json"  # a checkpoint's rank pattern


def _rows_whole(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (this rank's rows of parameter ``p``, or a statistic per row) with every
    ZeRO-3 shard's rows, in order; ``t`` itself where ``p`` is not sharded."""
    if not hasattr(p, "placements"):
        return t
    from torch.distributed.tensor import DTensor

    shape = (p.shape[0], *t.shape[1:])
    return DTensor.from_local(t, p.device_mesh, p.placements, shape=shape,
                              stride=torch.empty(shape).stride(),
                              run_check=False).full_tensor()


def _own_rows(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``t`` (whole over ZeRO-3 shards), as ``p`` holds them."""
    if not hasattr(p, "placements"):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()


class AdaLoraSteps:
    """The regulariser and the rank allocation of ``config`` (an ``AdaLoraConfig``) for
    the adapters ``program`` holds. Collectives: every rank calls each method."""

    def __init__(self, program: RankProgram, config: object) -> None:
        self.program, self.config = program, config
        params = program.local_parameters()
        self.prefixes = sorted(n.removesuffix(".lora_E") for n in params
                               if n.endswith(".lora_E"))
        self.params = {f"{p}.lora_{k}": params[f"{p}.lora_{k}"] for p in self.prefixes
                       for k in "AEB"}
        c = program.coords
        self._counts = c.tp == 0 and c.dp == 0  # one rank per stage speaks for it
        # collectives on the rank's device (NCCL reduces no host tensor)
        n = torch.tensor(float(len(self.prefixes) if self._counts else 0),
                         device=program.device)
        dist.all_reduce(n)
        self.adapters = int(n)  # over the whole model
        self.init_budget = self.adapters * int(config.init_r)
        self.target_budget = self.adapters * int(config.target_r)
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None

    # -- checkpoints -------------------------------------------------------------------

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The importance averages by parameter (this rank's slices), for a checkpoint."""
        return {n: {"adalora_ipt": self.ipt[n], "adalora_unc": self.unc[n]} for n in self.ipt}

    def pattern_json(self) -> str:
        return json.dumps({"rank_pattern": self.rank_pattern})

    def load_checkpoint(self, directory: str | Path) -> None:
        """The importance averages and rank pattern a checkpoint of this run holds."""
        from collie_compile.runtime import state as ckpt

        path = Path(directory) / ADALORA_FILE
        if not path.is_file():
            raise CollieError(f"{directory} holds no AdaLoRA state ({ADALORA_FILE}): it was "
                              "not saved by an AdaLoRA run, whose rank allocation could not "
                              "go on from it; start the run afresh")
        self.rank_pattern = json.loads(path.read_text())["rank_pattern"]
        _, pieces = ckpt.read_index(Path(directory))
        self.ipt, self.unc = {}, {}
        for name, p in self.params.items():
            for key, into in (("adalora_ipt", self.ipt), ("adalora_unc", self.unc)):
                if f"{name}/{key}" in pieces:
                    into[name] = self.program.read(name, p, pieces[f"{name}/{key}"],
                                                   f"{name}/{key}").to(local_tensor(p).device)

    def config_to_save(self) -> object:
        """A copy of the config with the rank pattern allocated so far (peft's keys: no
        adapter name), which tells peft's loader the ranks kept."""
        import copy

        config = copy.deepcopy(self.config)
        config.rank_pattern = copy.deepcopy(self.rank_pattern)
        return config

    # -- the regulariser -----------------------------------------------------------------

    def _tp_split(self, name: str) -> int | None:
        shard = self.program.tp_shards.get(name)
        return None if shard is None else shard.dim

    def add_orth_grads(self) -> float:
        """Add ``orth_reg_weight`` x the mean regulariser's gradient to the factors'
        gradients (after their tp and dp sums); returns the weighted regulariser (the
        same on every rank), which joins the step's loss."""
        weight = float(self.config.orth_reg_weight)
        if weight < 0:
            raise CollieError("AdaLoRA's orth_reg_weight must be 0 or more, as peft requires")
        if weight == 0:
            return 0.0
        coef = weight / (2 * self.adapters)
        total = torch.zeros((), dtype=torch.float64, device=self.program.device)
        tp = self.program.mesh.get_group("tp")
        for name, p in self.params.items():
            if name.endswith(".lora_E"):
                continue
            whole = _rows_whole(p, local_tensor(p.detach()))
            a = name.endswith(".lora_A")
            gram = whole @ whole.T if a else whole.T @ whole
            if self._tp_split(name) == (1 if a else 0):  # features split over tp
                dist.all_reduce(gram, group=tp)
            resid = gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            norm = torch.linalg.matrix_norm(resid)
            if self._counts:
                total += norm
            if p.grad is None:
                continue
            # on the device, no sync per factor; a zero residual has a zero gradient
            g = resid / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            grad = 2 * (g @ whole if a else whole @ g)
            local_tensor(p.grad).add_(_own_rows(p, grad), alpha=coef)
        dist.all_reduce(total)
        return weight * float(total) / (2 * self.adapters)

    # -- the rank budget -----------------------------------------------------------------

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask) at ``step``: peft's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def allocate(self, step: int) -> None:
        """peft's ``update_and_allocate(step)``, after the step's update, from its
        gradients."""
        c = self.config
        end = c.total_step - c.tfinal
        if step < end:
            self._update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.rank_pattern = self._mask_to(budget)
        elif step == end:
            self.rank_pattern = self._mask_to(self.budget(step)[0])
            self.ipt, self.unc = {}, {}
        elif self.rank_pattern is not None:
            self._mask_with(self.rank_pattern)

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                ipt = (local_tensor(p.detach()) * local_tensor(p.grad)).abs()
                if name not in self.ipt:
                    self.ipt[name] = torch.zeros_like(ipt)
                    self.unc[name] = torch.zeros_like(ipt)
                self.ipt[name] = b1 * self.ipt[name] + (1 - b1) * ipt
                self.unc[name] = b2 * self.unc[name] + (1 - b2) * (ipt - self.ipt[name]).abs()

    def _triplets(self) -> dict[str, list[float]]:
        """Each adapter's triplet scores (E -> [r]) over the whole model, on every rank."""
        tp = self.program.mesh.get_group("tp")
        dp = self.program.mesh.get_group("dp")
        mine: dict[str, list[float]] = {}
        with torch.no_grad():
            for prefix in self.prefixes:
                score = {k: self.ipt[f"{prefix}.lora_{k}"] * self.unc[f"{prefix}.lora_{k}"]
                         for k in "AEB"}
                pa, pb = self.params[f"{prefix}.lora_A"], self.params[f"{prefix}.lora_B"]
                rows = score["A"].sum(1, keepdim=True)  # A's rows: mean over its inputs
                width = torch.tensor(float(score["A"].shape[1]), device=rows.device)
                if self._tp_split(f"{prefix}.lora_A") == 1:
                    dist.all_reduce(rows, group=tp)
                    dist.all_reduce(width, group=tp)
                a = _rows_whole(pa, rows) / width
                cols = score["B"].sum(0)  # B's columns: mean over its outputs
                # whole over ZeRO-3's shards
                height = torch.tensor(float(pb.shape[0]), device=cols.device)
                if hasattr(pb, "placements"):  # ZeRO-3 splits B's outputs over dp
                    dist.all_reduce(cols, group=dp)
                if self._tp_split(f"{prefix}.lora_B") == 0:
                    dist.all_reduce(cols, group=tp)
                    dist.all_reduce(height, group=tp)
                b = (cols / height).view(-1, 1)
                e = _rows_whole(self.params[f"{prefix}.lora_E"], score["E"])
                mine[f"{prefix}.lora_E"] = (e.view(-1) + torch.cat([a, b], 1).sum(1)).tolist()
        gathered: list[dict[str, list[float]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine if self._counts else {})
        return {k: v for part in gathered for k, v in (part or {}).items()}

    def _mask_to(self, budget: int) -> dict[str, list[bool]]:
        triplets = self._triplets()
        k = self.init_budget - budget
        if k <= 0:  # nothing to cut
            pattern = {n: [True] * len(v) for n, v in triplets.items()}
        else:
            scores = torch.tensor([x for n in sorted(triplets) for x in triplets[n]])
            threshold = float(torch.kthvalue(scores, k)[0])
            pattern = {n: [x > threshold for x in v] for n, v in triplets.items()}
        self._mask_with(pattern)
        return pattern

    def _mask_with(self, pattern: dict[str, list[bool]]) -> None:
        with torch.no_grad():
            for prefix in self.prefixes:
                name = f"{prefix}.lora_E"
                p = self.params[name]
                keep = torch.tensor(pattern[name], device=p.device).view(-1, 1)
                local_tensor(p).masked_fill_(~_own_rows(p, keep), 0.0)
