"""A rank program's state in and out: whole weights gathered on every rank, Hugging Face
and PEFT checkpoints for other tools, and sharded training checkpoints (weights,
optimizer states, step) that resume under another plan or GPU count. The file formats
are :mod:`collie_compile.runtime.state`'s; every function here is a collective."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from collie_compile.dtensor import local_tensor
from collie_compile.errors import CollieError
from collie_compile.kernels.adalomo import adalomo_state
from collie_compile.models.prompts import is_prompt_method, saved_prompts
from collie_compile.models.registry import architecture
from collie_compile.optim.in_backward import STATE_KEYS
from collie_compile.passes.lora import (
    Adapter,
    expert_delta,
    is_adapter,
    is_svd,
    scaling_of,
    svd_scaling,
)
from collie_compile.runtime import distributed as cdist
from collie_compile.runtime import folders
from collie_compile.runtime import state as ckpt
from collie_compile.runtime.options import ADAPTER_PREFIX
from collie_compile.runtime.program import RankProgram
from collie_compile.runtime.updates import Updates

FACTORED = {"row": 0, "col": 1}  # AdaLomo's statistics: which dim of the weight each spans


def full_state_dict(prog: RankProgram, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) whole, on every rank, under its HF name:
    gathered over dp (ZeRO 2/3), tp (slices) and pp (stages); copies, which later
    steps leave alone."""
    local = prog.local_parameters()
    whole: dict[str, torch.Tensor] = {}
    for name in sorted(local):  # same order on all ranks of this pp stage
        p = local[name]
        t = p.grad if grads else p.detach()
        if t is None:
            t = torch.zeros_like(p.detach())
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        whole[name] = prog.gather_tp(name, t)
    out = {}
    for name in sorted(prog.owner):
        src = int(prog.mesh.mesh[prog.owner[name], 0, 0])
        buf = (whole[name].contiguous() if name in whole
               else torch.empty(prog.param_shapes[name], dtype=prog.param_dtypes[name],
                                device=prog.device))
        dist.broadcast(buf, src=src)
        # a snapshot: a local whole tensor on the CPU would alias the live weight or
        # gradient (a view of a flat bucket buffer), which the next step changes
        out[name] = buf.to("cpu", copy=name in whole)
    for alias in prog.tied:  # a tied weight under all its names
        if alias not in out:
            have = prog.stored_name(alias, out)
            if have is not None:
                out[alias] = out[have]
    return out


def save_kind(lora: object | None, merge: bool) -> str:
    """The kind of folder :func:`save_pretrained` writes (:mod:`.folders`); refuses to
    merge what peft cannot merge either (virtual tokens are not a weight)."""
    if merge and is_prompt_method(lora):
        raise CollieError(f"{lora.peft_type.value} adds virtual tokens, not weights: there "
                          "is nothing to merge into the model (peft cannot either); save "
                          "the adapter (leave out merge / --merge)")
    return "adapter" if lora is not None and not merge else "pretrained"


def check_save_path(directory: str | Path, kind: str) -> None:
    """Raise on every rank if rank 0, the writer, may not write a ``kind`` save to
    ``directory`` (:func:`.folders.check_target`)."""
    cdist.agree(lambda: folders.check_target(directory, kind)
                if dist.get_rank() == 0 else None)


def save_pretrained(prog: RankProgram, lora: object | None, directory: str | Path,
                    merge: bool = False, files: Iterable[Path] = ()) -> None:
    """A plain Hugging Face checkpoint (config.json + model.safetensors); with ``lora``
    (a ``peft.LoraConfig``) a PEFT adapter instead, unless ``merge`` folds the adapters
    into the weights. ``files`` (a tokenizer's, a generation config) are copied in beside
    them. Rank 0 writes."""
    from safetensors.torch import save_file

    kind = save_kind(lora, merge)
    check_save_path(directory, kind)
    weights = full_state_dict(prog)
    if dist.get_rank() == 0:
        tmp = folders.begin(directory, kind)
        if kind == "adapter":
            adapters = {ADAPTER_PREFIX + k: v for k, v in weights.items() if is_adapter(k)}
            if is_svd(lora):  # AdaLoRA's pattern: the ranks kept (LoRA's: ranks by module)
                for e_name, keep in (lora.rank_pattern or {}).items():
                    adapters.update(ranks_kept(adapters, ADAPTER_PREFIX + e_name, keep))
            if is_prompt_method(lora):  # peft saves the prompts alone, unprefixed
                adapters = {"prompt_embeddings": saved_prompts(weights, lora)}
            save_file({k: v.contiguous() for k, v in adapters.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            lora.save_pretrained(str(tmp))
        else:
            weights = merged(weights, lora, prog.fan_in_fan_out, prog.adapters)
            # a tied weight once, under the name HF stores (it re-ties on load)
            weights = {k: v for k, v in weights.items() if prog.tied.get(k, k) == k}
            weights.update({k: v for k, v in prog.buffers.items() if k not in weights})
            save_file({k: v.contiguous() for k, v in weights.items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            prog.config.save_pretrained(tmp)
        for f in files:
            if not (tmp / f.name).exists():  # never in place of what the save wrote
                shutil.copyfile(f, tmp / f.name)
        folders.finish(tmp, directory, kind)
    dist.barrier()


def save_checkpoint(prog: RankProgram, updates: Updates, step: int,
                    directory: str | Path, extra: dict[str, str] | None = None,
                    more: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The training state (weights, optimizer states, step) sharded: each rank saves the
    boxes it alone holds; rank 0 adds the text files ``extra`` (name -> content) before
    the folder is renamed into place. ``more``: other states shaped as their parameter
    (name -> key -> this rank's slice; AdaLoRA's importance), saved as ``name/key``."""
    check_save_path(directory, "checkpoint")
    tmp = folders.staging(directory)
    if dist.get_rank() == 0:
        folders.begin(directory, "checkpoint")
    dist.barrier()
    tensors, scalars = {}, {}
    states = updates.states(prog)
    local = prog.local_parameters()
    for name, p in local.items():
        if not prog.writes(name, p):
            continue
        tensors[name] = prog.cut(name, p, p.detach())
        for key, v in states.get(name, {}).items():
            if not torch.is_tensor(v) or v.dim() == 0:
                scalars[key] = float(v)
            elif key in FACTORED:  # AdaLomo's row/column statistics
                dim = FACTORED[key]
                # FSDP splits rows only: every dp rank holds the same column statistics
                if dim == 0 or not hasattr(p, "to_local") or prog.coords.dp == 0:
                    tensors[f"{name}/{key}"] = prog.cut(name, p, v, dim)
            elif v.shape == p.shape:
                tensors[f"{name}/{key}"] = prog.cut(name, p, v)
    if not updates.writes_states(prog):  # ZeRO-1: states live on their owner only
        tensors = {k: v for k, v in tensors.items() if "/" not in k}
        tensors.update({f"{n}/{k}": prog.cut(n, p, v)
                        for n, p in local.items() if prog.tp_first(n)
                        for k, v in states.get(n, {}).items()
                        if torch.is_tensor(v) and v.shape == p.shape})
    tensors.update({f"{n}/{k}": prog.cut(n, local[n], v) for n, kv in (more or {}).items()
                    if prog.writes(n, local[n]) for k, v in kv.items()})
    mine = tmp / f"rank{dist.get_rank():05d}.safetensors"
    entries = ckpt.write_rank_file(mine, tensors)
    _fault_point("save", step)
    every = cdist.all_strings(json.dumps({"tensors": entries, "scalars": scalars,
                                          "digest": [mine.name, folders.sha256(mine)]}))
    if dist.get_rank() == 0:
        index: dict = {"format": ckpt.FORMAT, "version": ckpt.VERSION,
                       "model": prog.plan.model, "architecture": architecture(prog.config),
                       "dtype": prog.plan.dtype, "step": step,
                       "optimizer": {"rule": updates.rule,
                                     "hyperparameters": updates.hyperparameters()},
                       "scalars": {}, "tensors": {}}
        digests = {}
        for text in every:
            part = json.loads(text)
            digests[part["digest"][0]] = part["digest"][1]
            index["scalars"].update(part["scalars"])
            for k, e in part["tensors"].items():
                index["tensors"].setdefault(k, []).extend(e)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        folders.finish(tmp, directory, "checkpoint", digests)
    dist.barrier()


def _fault_point(where: str, step: int) -> None:
    """Tests of crash safety: with ``COLLIE_COMPILE_KILL_AT=save:N``, rank 0 kills itself
    (SIGKILL, as an out-of-memory killer or a lost node would) halfway through writing
    the checkpoint of step N, its own file written and the index not."""
    if os.environ.get("COLLIE_COMPILE_KILL_AT") == f"{where}:{step}" and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(prog: RankProgram, updates: Updates, directory: str | Path,
                    fresh_optimizer: bool = False) -> int:
    """Weights and optimizer states from :func:`save_checkpoint`'s directory, whatever
    plan wrote it; each rank reads only what it holds. The states must be of this run's
    optimizer; ``fresh_optimizer`` reads the weights alone and starts the optimizer
    afresh. Returns the step."""
    def read() -> tuple[dict, dict]:
        # each rank hashes its share of the files: all of them read once in all
        if not folders.verify(directory, dist.get_rank(), dist.get_world_size()):
            _warn_unverified(directory)
        meta, pieces = ckpt.read_index(Path(directory))
        _check_model(directory, meta, prog)
        if not fresh_optimizer:
            _check_optimizer(directory, meta.get("optimizer"), updates)
        return meta, pieces

    meta, pieces = cdist.agree(read)

    def load() -> None:
        for name, p in prog.local_parameters().items():
            stored = prog.stored_name(name, pieces)
            if stored is None:
                raise CollieError(f"{directory} has no tensor {name!r}")
            with torch.no_grad():
                local_tensor(p).copy_(prog.read(name, p, pieces[stored], name))
            if p.requires_grad and not fresh_optimizer:
                _restore_state(prog, updates, name, p, pieces, meta["scalars"])

    cdist.agree(load)
    dist.barrier()
    return int(meta["step"])


def _check_model(directory: str | Path, meta: dict, prog: RankProgram) -> None:
    """Refuse a checkpoint of another model (by its config's architecture fields, not the
    path it was loaded from) or another weight dtype, naming what differs."""
    saved = meta.get("architecture")
    if saved is None:  # written before architectures were recorded: by name
        if meta.get("model") != prog.plan.model:
            raise CollieError(f"{directory} holds model {meta.get('model')!r}, not "
                              f"{prog.plan.model!r}")
        return
    now = architecture(prog.config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} here"
                          for k in changed[:3]) + ("; ..." if len(changed) > 3 else "")
        raise CollieError(f"{directory} holds another model than this one ({shown}); "
                          "resume with the model it was saved from")
    if meta.get("dtype", prog.plan.dtype) != prog.plan.dtype:
        raise CollieError(f"{directory} was saved with {meta['dtype']} weights and this run's "
                          f"are {prog.plan.dtype}; resume in {meta['dtype']}, or start a new "
                          "run from its weights")


def _check_optimizer(directory: str | Path, saved: object, updates: Updates) -> None:
    """Refuse the states of another optimizer rule (they would be read as this one's, or
    be missing: a raw KeyError at the next step); say where the settings differ."""
    if not isinstance(saved, dict):  # written before the rule was recorded
        return
    rule = saved.get("rule")
    if rule != updates.rule:
        raise CollieError(f"{directory} holds the states of the {rule} optimizer, and this "
                          f"run uses {updates.rule}; resume with {rule}, or start the "
                          "optimizer afresh (fresh_optimizer=True, --fresh-optimizer)")
    now, then = updates.hyperparameters(), saved.get("hyperparameters", {})
    # settings both record (inside and after backward keep different sets)
    changed = sorted(k for k in set(now) & set(then) if now[k] != then[k])
    if changed and dist.get_rank() == 0:
        warnings.warn(f"{directory}: {rule}'s " + ", ".join(
            f"{k} was {then[k]}, now {now[k]}" for k in changed)
            + "; resuming with the new settings", stacklevel=4)


def _warn_unverified(directory: str | Path) -> None:
    if dist.get_rank() == 0:
        warnings.warn(f"{directory} was saved before checkpoints recorded checksums: its "
                      "files are read unchecked", stacklevel=3)


def _restore_state(prog: RankProgram, updates: Updates, name: str, p: torch.Tensor,
                   pieces: dict, scalars: dict) -> None:
    """The optimizer state of ``p`` from the checkpoint's boxes of it. Inside backward:
    AdaLomo's row/column statistics, the other rules' p-shaped states (each fresh where
    the checkpoint has none), for LOMO nothing; after backward every p-shaped state and
    the scalars."""
    key = prog.stored_name(name, pieces) or name  # a tied weight's other name
    stored = {k.split("/", 1)[1]: v for k, v in pieces.items() if k.startswith(key + "/")}
    if updates.fused is not None:
        engine = updates.fused
        if updates.rule == "adalomo":
            state = adalomo_state(local_tensor(p.detach()))
        elif updates.rule in STATE_KEYS and engine.owns(name):
            state = engine.fresh_state(local_tensor(p.detach()))  # its master: the weight
        else:
            return
        for key, t in state.items():
            if key in stored and torch.is_tensor(t):
                t.copy_(prog.read(name, p, stored[key], f"{name}/{key}", FACTORED.get(key)))
        state["step"] = int(scalars.get("step", 0))
        engine.state[name] = state
        return
    inner = updates.inner()
    if not any(p is q for g in inner.param_groups for q in g["params"]):
        return  # ZeRO-1: another rank owns this parameter's state
    state = {}
    for key in sorted(stored):
        value = prog.read(name, p, stored[key], f"{name}/{key}")
        # in the dtype saved: fp32 masters and moments of 16-bit weights stay fp32
        t = torch.zeros_like(p.detach(), dtype=value.dtype)
        local_tensor(t).copy_(value)
        state[key] = t
    for key, v in scalars.items():
        state[key] = torch.tensor(v, dtype=torch.float32)
    if state:
        inner.state[p] = state


def ranks_kept(tensors: dict[str, torch.Tensor], e_name: str, keep: list[bool]
               ) -> dict[str, torch.Tensor]:
    """AdaLoRA's A, E and B of ``e_name`` (``<module>.lora_E``) cut to the ranks
    ``keep`` marks, as peft saves them once ranks are allocated."""
    prefix, idx = e_name.removesuffix(".lora_E"), torch.tensor(keep, dtype=torch.bool)
    return {f"{prefix}.lora_A": tensors[f"{prefix}.lora_A"][idx],
            e_name: tensors[e_name][idx],
            f"{prefix}.lora_B": tensors[f"{prefix}.lora_B"][:, idx]}


def merged(weights: dict[str, torch.Tensor], config: object | None,
           fan_in_fan_out: set[str] = frozenset(),
           adapters: dict[str, Adapter] | None = None) -> dict[str, torch.Tensor]:
    """Base weights with each adapter folded in as peft merges it, adapters dropped:
    LoRA's W + scaling·B·A (transposed for the modules in ``fan_in_fan_out`` that store
    W as [in, out]; expert by expert for a bank of experts), with DoRA's magnitude
    rescaling each output feature to m/‖W + scaling·B·A‖; IA3's vector multiplying W's
    input columns or output rows (and then the bias). ``adapters`` (the LoRA pass's
    record) says what each LoRA adapts; by default the linear weight of its module."""
    out = {k: v for k, v in weights.items() if not is_adapter(k)}
    for a_name in [k for k in weights if k.endswith(".lora_A.weight")]:
        prefix = a_name.removesuffix(".lora_A.weight")
        a, b = weights[a_name], weights[f"{prefix}.lora_B.weight"]
        spec = (adapters or {}).get(prefix) or Adapter(f"{prefix}.weight",
                                                       scaling_of(config, prefix)[1])
        if spec.experts:
            delta = expert_delta(a, b, spec.experts, spec.transposed)
        else:
            delta = b @ a
            delta = delta.T if prefix in fan_in_fan_out else delta
        w = out[spec.weight] + spec.scaling * delta
        m = weights.get(f"{prefix}.lora_magnitude_vector")
        if m is not None:  # DoRA: each output feature's norm becomes its magnitude
            dim = 0 if prefix in fan_in_fan_out else 1
            w = w * (m / torch.linalg.vector_norm(w, dim=dim)).unsqueeze(dim)
        out[spec.weight] = w
    for e_name in [k for k in weights if k.endswith(".lora_E")]:  # AdaLoRA
        prefix = e_name.removesuffix(".lora_E")
        a, e, b = (weights[f"{prefix}.lora_{k}"] for k in "AEB")
        _, scaling, divisor = svd_scaling(config)
        spec = (adapters or {}).get(prefix) or Adapter(f"{prefix}.weight", scaling / divisor)
        delta = b @ (a * e)
        out[spec.weight] = out[spec.weight] + spec.scaling * (
            delta.T if prefix in fan_in_fan_out else delta)
    for l_name in [k for k in weights if k.endswith(".ia3_l")]:
        module = l_name.removesuffix(".ia3_l")
        vec, w_name = weights[l_name], f"{module}.weight"
        outputs = vec.shape[1] == 1 and vec.shape[0] != 1  # [out, 1]; [1, in] scales inputs
        as_stored = vec.T if module in fan_in_fan_out else vec
        out[w_name] = out[w_name] * as_stored
        if outputs and f"{module}.bias" in out:
            out[f"{module}.bias"] = out[f"{module}.bias"] * vec.flatten()
    return out
