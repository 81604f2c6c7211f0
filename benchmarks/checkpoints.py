"""What checkpoint integrity costs: a ~1 GB training checkpoint saved and loaded through
``ParallelModel`` (one process), beside the same tensors written with plain safetensors,
and the checksum pass alone (SHA-256 of every file, :func:`folders.verify`), warm and,
where the kernel lets this process drop its page cache, cold.

A Llama of 0.27 B parameters in fp32 with SGD (no optimizer state), so the checkpoint is
the weights alone: 1.08 GB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .report import Report, table

GB = 1e9


def _drop_caches() -> bool:
    """Empty the page cache (root on a kernel that allows it), so reads come from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(out: str | None = None) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from collie_compile import parallelize
    from collie_compile.runtime import folders

    rep = Report("checkpoints", out)
    work = Path(tempfile.mkdtemp(prefix="collie-ckpt-bench-"))
    dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16))
        pm = parallelize(model, gpus=1, seq_len=16, global_batch_size=1, optimizer="sgd",
                         lr=0.0)
        weights = {k: v.contiguous() for k, v in pm.full_state_dict().items()}
        ck, plain = work / "ck", work / "plain.safetensors"
        rows = []
        t_plain = _timed(lambda: save_file(weights, str(plain)))
        t_save = _timed(lambda: pm.save_checkpoint(ck))
        size = sum(f.stat().st_size for f in ck.iterdir())
        rows.append(["save: plain safetensors file", f"{t_plain:.2f}",
                     f"{t_plain / (plain.stat().st_size / GB):.2f}"])
        rows.append(["save_checkpoint (writes, hashes its file, manifest)", f"{t_save:.2f}",
                     f"{t_save / (size / GB):.2f}"])
        for cache in ("warm", "cold"):
            if cache == "cold" and not _drop_caches():
                rows.append(["(cold: this process may not drop the page cache)", "", ""])
                continue
            t_verify = _timed(lambda: folders.verify(ck))
            if cache == "cold":
                _drop_caches()
            t_load = _timed(lambda: pm.load_checkpoint(ck))
            rows.append([f"verify alone, {cache} cache", f"{t_verify:.2f}",
                         f"{t_verify / (size / GB):.2f}"])
            rows.append([f"load_checkpoint (verify + read), {cache} cache", f"{t_load:.2f}",
                         f"{t_load / (size / GB):.2f}"])
        rep.add(f"Checkpoint of {sum(v.numel() for v in weights.values()) / 1e9:.2f} B "
                f"fp32 parameters, {size / GB:.2f} GB, one process:\n\n"
                + table(["step", "seconds", "s/GB"], rows, right=(1, 2)))
    finally:
        dist.destroy_process_group()
        shutil.rmtree(work, ignore_errors=True)
    rep.save()
