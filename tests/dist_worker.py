"""Runs under torchrun: trains each requested configuration with ``parallelize`` and
compares with one process training the same model on the same data (rank 0 writes the
comparison as JSON). Used by test_runtime.py: one launch covers many configurations."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import traceback

import torch
import torch.distributed as dist
from packed_documents import each_document_alone, flattened_rows

from collie_compile.cost.measure import LiveBytes
from collie_compile.dtensor import local_tensor
from collie_compile.dtypes import torch_dtype
from collie_compile.errors import CollieError
from collie_compile.models.registry import build_model, load_config, with_layers
from collie_compile.passes.data_parallel import grad_reducers
from collie_compile.runtime.distributed import ensure_initialized
from collie_compile.runtime.parallel_model import parallelize

STEPS, SEQ, BATCH, VOCAB = int(os.environ.get("STEPS", 3)), 16, 8, 256


def make_model(name: str, layers: int, heads: int | None = None,
               dtype: str = "fp32") -> torch.nn.Module:
    cfg = with_layers(load_config(name), layers)
    if heads:  # a variant whose head count tp may not divide
        cfg.num_attention_heads = cfg.num_key_value_heads = heads
    torch.manual_seed(0)
    return build_model(cfg, device="cpu", dtype=torch_dtype(dtype))


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(max(n, 4))][:n]


def eval_batch() -> dict[str, torch.Tensor]:
    """A held-out batch whose first half of labels does not count (as a prompt's)."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :SEQ // 2] = -100
    return {"input_ids": ids, "labels": labels}


# AdamW's defaults except eps: with eps=1e-8 an element whose gradient is ~0 moves by up
# to ±lr on rounding noise alone (1e-12 differences in a sum flip g/(|g|+eps)), so any
# reordering of a sum shows up as 1e-5..1e-4 weight differences after one step.
# eps=1e-6 keeps the update a smooth function of the gradient; gradients are compared
# directly as well.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def reference(name: str, layers: int, clip: float | None = None, optimizer: str = "adamw",
              kwargs: dict | None = None, cls: type | None = None
              ) -> tuple[list[float], dict, dict]:
    """Losses, final weights and last-step gradients of plain single-process training
    (with ``cls``, that optimizer class and ``kwargs`` alone)."""
    from collie_compile.optim.optimizers import optimizer_class

    m = make_model(name, layers)
    opts = {} if cls else dict(ADAMW) if optimizer == "adamw" else {"lr": ADAMW["lr"]}
    opts.update(kwargs or {})
    opt = (cls or optimizer_class(optimizer))(m.parameters(), **opts)
    losses = []
    for b in batches():
        opt.zero_grad(set_to_none=True)
        out = m(input_ids=b, labels=b)
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()
        losses.append(out.loss.item())
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return losses, weights, grads


def rel_err(a: dict, b: dict) -> float:
    """Largest over tensors of ||a-b|| / ||b|| (2-norms). A tensor 1e4 times smaller than
    the largest is measured against that floor instead: k_proj biases have an analytically
    zero gradient (softmax ignores a shift of the keys), so theirs is pure rounding."""
    floor = 1e-4 * max(float(t.norm()) for t in b.values())
    errs = {k: float((a[k] - b[k]).norm()) / max(float(b[k].norm()), floor) for k in b}
    if os.environ.get("DEBUG_ERR"):
        print(sorted(errs.items(), key=lambda kv: -kv[1])[:4])
    return max(errs.values())


def model_err(a: dict, b: dict) -> float:
    """‖a - b‖ / ‖b‖ over every tensor of ``b`` together (2-norms)."""
    diff = sum(float((a[k] - b[k]).norm()) ** 2 for k in b) ** 0.5
    return diff / sum(float(v.norm()) ** 2 for v in b.values()) ** 0.5


def run_config(cfg: dict) -> dict:
    name, layers = cfg["model"], cfg.get("layers", 2)
    opt = cfg.get("optimizer", "adamw")
    kwargs = cfg.get("optimizer_kwargs", {"eps": ADAMW["eps"]})
    pins = {k: v for k, v in cfg.items()
            if k not in ("model", "layers", "id", "optimizer", "optimizer_kwargs", "memory",
                         "grad_tol")}
    pm = parallelize(make_model(name, layers), seq_len=SEQ, global_batch_size=BATCH,
                     optimizer=opt, lr=ADAMW["lr"], optimizer_kwargs=kwargs, **pins)
    measure = cfg.get("memory", False)  # this rank's peak against its stage's estimate
    live = LiveBytes() if measure else contextlib.nullcontext()
    if measure:
        live.hold(t for st in pm.stages for t in [*st.parameters(), *st.buffers()])
    with live:
        losses = [pm.train_step({"input_ids": b}) for b in batches()]
    memory_errors = []
    if measure:
        est = pm.chosen.memory[pm.stage_ids[0]]["total_bytes"]
        errors = [torch.zeros(1) for _ in range(dist.get_world_size())]
        dist.all_gather(errors, torch.tensor([est / live.peak - 1]))
        memory_errors = [float(e) for e in errors]
    grads = pm.full_state_dict(grads=True)
    weights = pm.full_state_dict()
    # evaluation after training: this rank's rows only, half the labels masked
    held = eval_batch()
    rows = pm.batch_rows()
    total, tokens = pm.eval_loss({k: v[rows] for k, v in held.items()}, local=True)
    same = [float(t) for t in _all_ranks(torch.tensor(losses))]
    reducers = [r for st in pm.stages for r in grad_reducers(st)]
    out = {"layout": pm.chosen.layout_str(), "losses": losses, "losses_all_ranks": same,
           "eval_loss": total / tokens,
           "vocab_slice": pm.vocab_slice, "memory_errors": memory_errors,
           # ZeRO 0/1: every gradient a view of its bucket's flat buffer
           "reducer_buckets": sum(len(r.buckets) for r in reducers),
           "grad_storages": len({p.grad.untyped_storage().data_ptr() for st in pm.stages
                                 for p in st.parameters() if p.grad is not None})
           if reducers else 0}
    if dist.get_rank() == 0:
        ref_losses, ref_w, ref_g = reference(name, layers, cfg.get("max_grad_norm"), opt,
                                             kwargs)
        # Weights: relative error of all of them together. Per tensor, a zero-initialised
        # bias is nothing but three AdamW updates, which amplify rounding in small
        # gradients; its error is reported (weight_err_per_tensor) but not the criterion.
        m = make_model(name, layers)
        m.load_state_dict(ref_w, strict=False)
        with torch.no_grad():
            ref_eval = float(m(**held).loss)
        out.update(ref_losses=ref_losses, grad_err=rel_err(grads, ref_g), ref_eval=ref_eval,
                   weight_err=model_err(weights, ref_w),
                   weight_err_per_tensor=rel_err(weights, ref_w),
                   names_match=sorted(weights) == sorted(ref_w))
    return out


def _all_ranks(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts).max(0).values - torch.stack(parts).min(0).values


PLAN_KEYS = ("dp", "tp", "pp", "zero", "schedule", "recompute", "micro_batch_size",
             "optimizer", "lr", "update_in_backward", "ep")  # passed through to parallelize


def run_save(cfg: dict) -> dict:
    """Train 2 steps, save a training checkpoint and an HF checkpoint, compare this
    model's logits with the HF checkpoint's in plain transformers, train 2 more."""
    from transformers import AutoModelForCausalLM

    out_dir = cfg["dir"]
    pm = parallelize(make_model(cfg["model"], cfg.get("layers", 2),
                                dtype=cfg.get("dtype", "fp32")), seq_len=SEQ,
                     global_batch_size=BATCH, **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    data = batches(4)
    first = [pm.train_step({"input_ids": b}) for b in data[:2]]
    pm.save_checkpoint(f"{out_dir}/ckpt")
    pm.save_pretrained(f"{out_dir}/hf")
    refusals = folder_refusals(pm, out_dir) if cfg.get("folders") else None
    logits = pm.forward(data[0])
    rest = [pm.train_step({"input_ids": b}) for b in data[2:]]
    states = pm._inner_optimizer().state.values() if pm.optimizer is not None else []
    masters = [st["master"] for st in states if "master" in st]  # fused ones update in place
    out = {"layout": pm.chosen.layout_str(), "first": first, "continued": rest,
           "local_experts": local_experts(pm),
           "masters": len(masters), "master_dtypes": sorted({str(m.dtype) for m in masters}),
           "refusals": refusals}
    if dist.get_rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(f"{out_dir}/hf")
        with torch.no_grad():
            ref = hf(input_ids=data[0]).logits
        out["logits_err"] = float((logits - ref).abs().max() / ref.abs().max())
    return out


def folder_refusals(pm: object, out_dir: str) -> list[str]:
    """What each rank was told when saving a checkpoint over the HF save, the HF save over
    the checkpoint, and loading a copy of the checkpoint with 4 KiB of 0xff in rank 1's
    file (rank 0 gathers: ``rank r: message``)."""
    import shutil

    def refused(fn: object) -> str:
        try:
            fn()
        except CollieError as e:
            return str(e)
        return "not refused"

    said = [refused(lambda: pm.save_checkpoint(f"{out_dir}/hf")),
            refused(lambda: pm.save_pretrained(f"{out_dir}/ckpt"))]
    bad = f"{out_dir}/ckpt-damaged"
    if dist.get_rank() == 0:
        shutil.copytree(f"{out_dir}/ckpt", bad)
        with open(f"{bad}/rank00001.safetensors", "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            f.write(b"\xff" * 4096)
    dist.barrier()
    said.append(refused(lambda: pm.load_checkpoint(bad)))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, said)
    return [f"rank {r}: {m}" for r, msgs in enumerate(every) for m in msgs]


def run_eval(cfg: dict) -> dict:
    """GPT-2 from its default config (dropout 0.1 everywhere) under the layout: logits and
    eval loss twice, the HF model's in eval() mode on the same weights (rank 0), and what a
    batch with a key training does not use is told."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=cfg.get("layers", 2), n_head=4, n_positions=64))
    hf = AutoModelForCausalLM.from_config(model.config).eval()
    hf.load_state_dict(model.state_dict())
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH,
                     **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    ids = batches(1)[0]
    batch = eval_batch()
    out = {"layout": pm.chosen.layout_str(),
           "logits_twice_equal": bool(torch.equal(pm.forward(ids), pm.forward(ids))),
           "eval_twice": [pm.eval_loss(batch)[0], pm.eval_loss(batch)[0]]}
    refused = []
    for extra in ({"position_ids": torch.arange(SEQ).repeat(BATCH, 1)}, {"bogus_key": 1}):
        try:
            pm.eval_loss({**batch, **extra})
            refused.append("not refused")
        except CollieError as e:
            refused.append(str(e))
    out["refused"] = refused
    if dist.get_rank() == 0:
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
            want = hf(input_ids=batch["input_ids"], labels=batch["labels"])
        n = int((batch["labels"][:, 1:] != -100).sum())
        out["logits_err"] = float((pm.forward(ids) - ref).abs().max() / ref.abs().max())
        out["hf_eval_sum"] = float(want.loss) * n
    else:
        pm.forward(ids)
    return out


def packed_model(family: str, layers: int) -> torch.nn.Module:
    """A model from transformers' own config class (dropout off: tp ranks draw other
    masks than one process does)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if family == "gpt2":  # learned absolute positions
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4,
                         n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:  # rotary positions, grouped K/V
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg)


def run_packed(cfg: dict) -> dict:
    """Documents packed into rows (position_ids from DataCollatorWithFlattening) under the
    layout: two AdamW steps, then eval_loss and forward, against the transformers model
    given the same batches without a KV cache (rank 0)."""
    layers = cfg.get("layers", 2)
    model = packed_model(cfg["family"], layers)
    hf = packed_model(cfg["family"], layers)
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH, optimizer="adamw",
                     lr=ADAMW["lr"], optimizer_kwargs={"eps": ADAMW["eps"]},
                     position_ids=True, **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    train = [flattened_rows(BATCH, SEQ, VOCAB, 8, seed=s) for s in (1, 2)]
    losses = [pm.train_step(b) for b in train]
    grads, weights = pm.full_state_dict(grads=True), pm.full_state_dict()
    held = flattened_rows(BATCH, SEQ, VOCAB, 8, seed=3)
    total, tokens = pm.eval_loss(held)
    logits = pm.forward(held["input_ids"], held["position_ids"])
    out = {"layout": pm.chosen.layout_str(), "losses": losses, "eval": total / tokens}
    if dist.get_rank() == 0:
        opt = torch.optim.AdamW(hf.parameters(), **ADAMW)
        ref_losses = []
        for b in train:
            opt.zero_grad(set_to_none=True)
            loss = hf(**b, use_cache=False).loss
            loss.backward()
            opt.step()
            ref_losses.append(float(loss))
        hf.eval()
        with torch.no_grad():
            want = hf(**held, use_cache=False)
        alone = each_document_alone(hf, held["input_ids"][0], held["position_ids"][0])
        ref_g = {n: p.grad for n, p in hf.named_parameters()}
        ref_w = {n: p.detach() for n, p in hf.named_parameters()}
        out.update(ref_losses=ref_losses, grad_err=rel_err(grads, ref_g),
                   weight_err=model_err(weights, ref_w),
                   weight_err_per_tensor=rel_err(weights, ref_w),
                   ref_eval=float(want.loss),
                   logits_err=float((logits - want.logits).abs().max()
                                    / want.logits.abs().max()),
                   hf_is_per_document=float((want.logits[0] - alone).abs().max()),
                   documents=int((held["position_ids"][0] == 0).sum()))
    return out


def run_resume(cfg: dict) -> dict:
    """A differently initialised model under another plan, resumed from the checkpoint,
    trains the last 2 steps."""
    torch.manual_seed(123)
    m = make_model(cfg["model"], cfg.get("layers", 2), dtype=cfg.get("dtype", "fp32"))
    for p in m.parameters():  # make sure nothing of the original init survives
        torch.nn.init.normal_(p.data, std=0.5)
    pm = parallelize(m, seq_len=SEQ, global_batch_size=BATCH,
                     **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    pm.load_checkpoint(f"{cfg['dir']}/ckpt")
    losses = [pm.train_step({"input_ids": b}) for b in batches(4)[2:]]
    return {"layout": pm.chosen.layout_str(), "losses": losses, "step": pm.step_count,
            "local_experts": local_experts(pm)}


def local_experts(pm: object) -> list[int]:
    """The experts each bank of this rank holds (dim 0 of its 3-D weights)."""
    return sorted({p.shape[0] for n, p in pm.program.local_parameters().items()
                   if ".experts." in n and p.dim() == 3})


def run_weights(cfg: dict) -> dict:
    """A meta-device model loaded from the saved HF checkpoint with ``weights=DIR``
    gives the logits plain transformers gives for that checkpoint."""
    from transformers import AutoModelForCausalLM

    cfg_m = with_layers(load_config(cfg["model"]), cfg.get("layers", 2))
    model = build_model(cfg_m, device="meta")
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH,
                     weights=f"{cfg['dir']}/hf", **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    data = batches(1)[0]
    logits = pm.forward(data)
    held = sum(p.numel() for p in pm.local_parameters().values())
    out = {"layout": pm.chosen.layout_str(), "held": held}
    if dist.get_rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(f"{cfg['dir']}/hf")
        with torch.no_grad():
            ref = hf(input_ids=data).logits
        out["logits_err"] = float((logits - ref).abs().max() / ref.abs().max())
        out["total"] = sum(p.numel() for p in hf.parameters())
    return out


LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # column- and row-parallel bases


def run_lora(cfg: dict) -> dict:
    """LoRA through our pass (parallel) against peft's own model in one process: same base
    weights, adapter init (a saved PEFT adapter with random A and B) and data."""
    from peft import LoraConfig, PeftModel, get_peft_model

    name, layers, d = cfg["model"], cfg.get("layers", 2), cfg["dir"]
    if dist.get_rank() == 0:
        # and LoRA on parameters (a mixture of experts' banks), with their own ranks
        extra = {k: cfg[k] for k in ("target_parameters", "rank_pattern", "alpha_pattern")
                 if k in cfg}
        peft_model = get_peft_model(make_model(name, layers), LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, **extra))
        gen = torch.Generator().manual_seed(7)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
        peft_model.save_pretrained(f"{d}/init")
        if cfg.get("from_disk"):
            make_model(name, layers).save_pretrained(f"{d}/base")
    dist.barrier()
    # from_disk: the base on the meta device, each rank reading its slices of a saved one
    model = (build_model(with_layers(load_config(name), layers), device="meta")
             if cfg.get("from_disk") else make_model(name, layers))
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH,
                     lr=ADAMW["lr"], optimizer_kwargs={"eps": ADAMW["eps"]},
                     weights=f"{d}/base" if cfg.get("from_disk") else None,
                     lora_adapter=f"{d}/init", **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    data = batches()
    losses = [pm.train_step({"input_ids": b}) for b in data]
    ours = {k: v for k, v in pm.full_state_dict().items() if ".lora_" in k}
    pm.save_pretrained(f"{d}/trained")
    pm.save_pretrained(f"{d}/merged", merge=True)
    logits = pm.forward(data[0])
    trainable = sum(p.numel() for p in pm.local_parameters().values() if p.requires_grad)
    out = {"layout": pm.chosen.layout_str(), "losses": losses, "trainable": trainable,
           "expert_adapters": sum(".experts." in k for k in ours),
           "planned": [pm.plan.lora_rank, pm.plan.lora_targets]}
    if dist.get_rank() == 0:
        ref = PeftModel.from_pretrained(make_model(name, layers), f"{d}/init", is_trainable=True)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], **ADAMW)
        ref_losses = []
        for b in data:
            opt.zero_grad(set_to_none=True)
            loss = ref(input_ids=b, labels=b).loss
            loss.backward()
            opt.step()
            ref_losses.append(loss.item())
        ref_w = {k.removeprefix("base_model.model.").replace(".default", ""): v.detach()
                 for k, v in ref.named_parameters() if "lora_" in k}
        loaded = PeftModel.from_pretrained(make_model(name, layers), f"{d}/trained")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(f"{d}/merged")
        with torch.no_grad():
            ref_logits = loaded(input_ids=data[0]).logits
            merged_logits = merged(input_ids=data[0]).logits
        out["merged_err"] = float((merged_logits - ref_logits).abs().max()
                                  / ref_logits.abs().max())
        out.update(ref_losses=ref_losses, adapter_err=rel_err(ours, ref_w),
                   names_match=sorted(ours) == sorted(ref_w),
                   logits_err=float((logits - ref_logits).abs().max() / ref_logits.abs().max()))
    return out


FUSED_LR, FUSED_WD = 1e-2, 0.1


def fused_reference(name: str, layers: int, rule: str, clip: float | None,
                    clip_value: float | None) -> tuple[list[float], dict]:
    """One process: full backward, then the same rule on each (clipped) gradient."""
    from collie_compile.kernels.adalomo import adalomo_state, adalomo_update_reference
    from collie_compile.kernels.lomo import lomo_update_reference

    m = make_model(name, layers)
    params = dict(m.named_parameters())
    states = {n: adalomo_state(p) for n, p in params.items()}
    losses = []
    for b in batches():
        out = m(input_ids=b, labels=b)
        out.loss.backward()
        norm = float(torch.stack([p.grad.norm() for p in params.values()]).norm())
        coef = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad * coef
                if clip_value is not None:
                    g = g.clamp(-clip_value, clip_value)
                if rule == "lomo":
                    lomo_update_reference(p, g, FUSED_LR, FUSED_WD)
                else:
                    adalomo_update_reference(p, g, states[n], FUSED_LR, FUSED_WD)
                p.grad = None
        losses.append(out.loss.item())
    return losses, {n: p.detach().clone() for n, p in params.items()}


def after_backward_reference(name: str, layers: int, rule: str, clip: float | None
                             ) -> tuple[list[float], dict]:
    """One process: plain backward, clip, then the rule's own after-backward optimizer:
    torch.optim.AdamW, lion-pytorch's Lion, the Adan paper's update."""
    from lion_pytorch import Lion

    from collie_compile.optim.optimizers import Adan

    cls = {"adamw": torch.optim.AdamW, "lion": Lion, "adan": Adan}[rule]
    losses, weights, _ = reference(name, layers, clip, kwargs=STATEFUL_OPTIONS[rule], cls=cls)
    return losses, weights


# lr and weight decay high enough that three steps move every weight measurably
STATEFUL_OPTIONS = {"adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1),
                    "lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
                    "adan": dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-6,
                                 weight_decay=0.1)}


def run_fused(cfg: dict) -> dict:
    """A rule updated inside the parallel backward against one process applying the
    same rule after a plain backward."""
    name, layers = cfg["model"], cfg.get("layers", 2)
    clip, clip_value = cfg.get("max_grad_norm"), cfg.get("clip_value")
    rule = cfg["optimizer"]
    if rule in STATEFUL_OPTIONS:
        opts = dict(STATEFUL_OPTIONS[rule])
        lr, extra = opts.pop("lr"), {"update_in_backward": True}
    else:
        lr, opts, extra = FUSED_LR, {"weight_decay": FUSED_WD}, {}
    def train(**kwargs: object) -> tuple:
        pm = parallelize(make_model(name, layers), seq_len=SEQ, global_batch_size=BATCH,
                         lr=lr, optimizer_kwargs=opts, max_grad_norm=clip,
                         clip_value=clip_value, **kwargs,
                         **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
        losses = [pm.train_step({"input_ids": b}) for b in batches()]
        return pm, losses, pm.full_state_dict()

    pm, losses, weights = train(**extra)
    grads_left = sum(p.grad is not None for p in pm.local_parameters().values())
    out = {"layout": pm.chosen.layout_str(), "losses": losses, "grads_left": grads_left,
           "grad_norm": pm.last_grad_norm, "in_backward": pm.fused is not None}
    after = None
    if rule in STATEFUL_OPTIONS:  # the same layout updating after backward
        after = train(update_in_backward=False)
        out.update(after_layout=after[0].chosen.layout_str(), after_losses=after[1])
    if dist.get_rank() == 0:
        ref_losses, ref_w = (after_backward_reference(name, layers, rule, clip)
                             if rule in STATEFUL_OPTIONS else
                             fused_reference(name, layers, rule, clip, clip_value))
        diff = sum(float((weights[k] - ref_w[k]).norm()) ** 2 for k in ref_w) ** 0.5
        moved = sum(float((ref_w[k] - v).norm()) ** 2
                    for k, v in make_model(name, layers).state_dict().items()
                    if k in ref_w) ** 0.5
        out.update(ref_losses=ref_losses, weight_err=diff / moved,
                   weight_err_per_tensor=rel_err(weights, ref_w))
        if after is not None:
            same = sum(float((weights[k] - after[2][k]).norm()) ** 2 for k in ref_w) ** 0.5
            out["weight_err_vs_after"] = same / moved
            out["weight_err_vs_after_per_tensor"] = rel_err(weights, after[2])
    return out


def run_release(cfg: dict) -> dict:
    """Bytes of the user's weights left after parallelize, and of this rank's own."""
    model = make_model(cfg["model"], cfg.get("layers", 2))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pm = parallelize(model, seq_len=SEQ, global_batch_size=BATCH,
                     **{k: cfg[k] for k in PLAN_KEYS if k in cfg})
    held = sum(local_tensor(p).untyped_storage().nbytes()
               for p in pm.local_parameters().values())
    ours = {local_tensor(p).untyped_storage().data_ptr()
            for p in pm.local_parameters().values()}
    left = sum(p.untyped_storage().nbytes() for p in model.parameters()
               if not p.is_meta and p.untyped_storage().data_ptr() not in ours)
    pm.train_step({"input_ids": batches(1)[0]})  # still trains
    return {"weight_bytes": weights, "held_bytes": held, "user_bytes_left": left}


def run_error(cfg: dict) -> dict:
    """A bad request must raise a CollieError on every rank (not hang)."""
    try:
        kwargs = {k: v for k, v in cfg.items() if k not in (
            "model", "layers", "id", "error", "heads", "step_with_token", "local_world_size")}
        if "local_world_size" in cfg:  # as if torchrun ran this many per node
            os.environ["LOCAL_WORLD_SIZE"] = str(cfg["local_world_size"])
        pm = parallelize(make_model(cfg["model"], cfg.get("layers", 2), cfg.get("heads")),
                         seq_len=SEQ, global_batch_size=BATCH, **kwargs)
        if "step_with_token" in cfg:
            pm.train_step({"input_ids": torch.full((BATCH, SEQ), cfg["step_with_token"])})
        msg = ""
    except CollieError as e:
        msg = str(e)
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = str(dist.get_world_size())
    flags = [torch.tensor([int(bool(msg))]) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, torch.tensor([int(bool(msg))]))
    return {"error": msg, "all_ranks_raised": all(int(f) for f in flags)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", required=True, help="JSON list of configurations")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ensure_initialized()
    results = {}
    for cfg in json.loads(open(args.configs).read()):
        try:
            kind = cfg.get("kind") or ("error" if cfg.get("error") else "train")
            run = {"train": run_config, "error": run_error, "save": run_save,
                   "resume": run_resume, "weights": run_weights, "lora": run_lora,
                   "fused": run_fused, "release": run_release, "eval": run_eval,
                   "packed": run_packed}[kind]
            results[cfg["id"]] = run(cfg)
        except Exception:  # record and go on: one broken layout must not hide the others
            results[cfg["id"]] = {"crash": traceback.format_exc()}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
