"""Per-op tensor-parallel sharding of the repeated block, as an ILP (Alpa's intra-op pass).

Every non-view node of one decoder block picks a strategy; blocks are identical, so the
choice holds for all of them. Layouts of a tensor across the tp ranks: R (replicated),
S (split on the feature/head axis), P (partial sums).

  linear      column: R in -> S out, weight / tp    row: S in -> P out, weight / tp
              replicate: R in -> R out, full weight and FLOPs
  attention,  split: S in -> S out (heads / tp)     replicate: R in -> R out
  elementwise (ops that reduce over the features, and residual adds, only replicate)

  variables   s[v,j] in {0,1}    node v uses strategy j
              e[u,j,L] >= 0      u (strategy j) is resharded to layout L for some
                                 consumer: made once, read by every consumer wanting L
              g[u,j] >= 0        u (strategy j) feeds column linears: their input gradient
                                 is partial and is summed once
  objective   minimise  sum_v,j s[v,j] c[v,j] + sum e[u,j,L] r[u,j,L] + sum g a
  s.t.        sum_j s[v,j] = 1
              e[u,j,IN(k)] >= s[u,j] + s[v,k] - 1        for edges u->v (only where r > 0)
              g[u,j] >= s[u,j] + s[v,column] - 1          for edges u->v
  c: compute time of v under j (roofline, / tp when sharded); r: resharding u's output
  from OUT(j) to L, forward and backward (S->R all-gather, P->R all-reduce, P->S
  reduce-scatter + all-gather, R->S free forward, all-gather of the gradient backward);
  a: all-reduce of u's output (a reduce-scatter if u is split), summing the column
  linear's partial input gradients.
"""

from __future__ import annotations

import warnings

import pulp

from collie_compile.cost.compute import allgather_time, allreduce_time, roofline
from collie_compile.cost.hardware import GPUSpec
from collie_compile.cost.profile import ModelProfile

# Routed experts stay whole on every tp rank (the tp pass shards no expert; expert
# parallelism is what splits them)
STRATEGIES = {"linear": ("column", "row", "replicate"), "attention": ("split", "replicate"),
              "experts": ("replicate",), "other": ("split", "replicate")}
OUT = {"column": "S", "row": "P", "replicate": "R", "split": "S"}
IN = {"column": "R", "row": "S", "replicate": "R", "split": "S"}


def _reshard(src: str, dst: str, nbytes: float, tp: int, gpu: GPUSpec) -> float:
    """Forward + backward seconds to turn layout ``src`` into ``dst``."""
    if src == dst or tp == 1:
        return 0.0
    gather = allgather_time(nbytes, tp, gpu)
    if src == "R" and dst == "S":
        return gather  # slice forward; the gradient is gathered backward
    if src == "S" and dst == "R":
        return gather  # gather forward; slice the gradient backward
    if src == "P" and dst == "R":
        return allreduce_time(nbytes, tp, gpu)  # the gradient is already whole
    if src == "P" and dst == "S":
        return 2 * gather  # reduce-scatter forward, all-gather backward
    raise ValueError(f"no resharding from {src} to {dst}")


def solve_block_sharding(profile: ModelProfile, tp: int, gpu: GPUSpec, micro_batch: int = 1,
                         solver: pulp.LpSolver | None = None) -> dict[str, str]:
    """The fastest strategy per node of the block (node name -> strategy)."""
    nodes = {n["name"]: n for n in profile.block_graph}
    dtype = profile.dtype

    def options(n: dict) -> tuple[str, ...]:
        if n["residual"] or n["whole_features"] or n.get("replicated"):
            return ("replicate",)
        return STRATEGIES[n["kind"]]

    def compute(n: dict, j: str) -> float:
        share = 1 if j == "replicate" else tp
        t = roofline(n["flops"] * micro_batch / share, n["bytes"] * micro_batch / share,
                     gpu, dtype)
        return 3 * t  # forward and backward

    with warnings.catch_warnings():  # PuLP 3 announces its 4.0 API on every variable
        warnings.simplefilter("ignore", DeprecationWarning)
        lp = pulp.LpProblem("sharding", pulp.LpMinimize)
        s = {(v, j): pulp.LpVariable(f"s_{v}_{j}", cat="Binary")
             for v, n in nodes.items() for j in options(n)}
        cost = [s[v, j] * compute(nodes[v], j) for v, j in s]
        g: dict[tuple[str, str], pulp.LpVariable] = {}
        e: dict[tuple[str, str, str], pulp.LpVariable] = {}
        input_bytes = profile.act_full.replicated * micro_batch  # the block's hidden input
        for v, n in nodes.items():
            lp += pulp.lpSum(s[v, j] for j in options(n)) == 1
            if n["reads_input"]:  # replicated input: slicing it costs a gradient gather
                for k in options(n):
                    cost.append(s[v, k] * _reshard("R", IN[k], input_bytes, tp, gpu))
                    if k == "column":
                        cost.append(s[v, k] * allreduce_time(input_bytes, tp, gpu))
        for v, n in nodes.items():
            for u in n["inputs"]:
                nbytes = nodes[u]["out_bytes"] * micro_batch
                for j in options(nodes[u]):
                    for k in options(n):
                        r = _reshard(OUT[j], IN[k], nbytes, tp, gpu)
                        if r > 0:  # one resharded copy serves every consumer (q, k, v)
                            if (u, j, IN[k]) not in e:
                                e[u, j, IN[k]] = pulp.LpVariable(f"e_{u}_{j}_{IN[k]}", 0)
                                cost.append(r * e[u, j, IN[k]])
                            lp += e[u, j, IN[k]] >= s[u, j] + s[v, k] - 1
                        if k == "column":  # its input gradient is partial: reduce it,
                            # once for all the column linears u feeds (q, k, v share one)
                            if (u, j) not in g:
                                g[u, j] = pulp.LpVariable(f"g_{u}_{j}", 0)
                                reduce = allgather_time if OUT[j] == "S" else allreduce_time
                                cost.append(reduce(nbytes, tp, gpu) * g[u, j])
                            lp += g[u, j] >= s[u, j] + s[v, k] - 1
        lp += pulp.lpSum(cost)
        lp.solve(solver or pulp.PULP_CBC_CMD(msg=False, threads=1))
    return {v: j for (v, j), var in s.items() if (var.value() or 0) > 0.5}


def linear_layout(profile: ModelProfile, sharding: dict[str, str]) -> dict[str, str]:
    """Strategy per linear module path of the block (what the plan records)."""
    return {n["module"]: sharding[n["name"]] for n in profile.block_graph
            if n["kind"] == "linear"}
