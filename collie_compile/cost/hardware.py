"""Hardware specs: a catalog of GPUs and user-defined specs from JSON.

A :class:`GPUSpec` is plain data. Peak numbers are the vendors' dense (non-sparse)
figures; the efficiency factors turn them into what training kernels reach and are what
``collie-compile calibrate`` measures on a real device.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

from collie_compile.dtypes import DTYPE_NAMES, fused_gqa_dtypes
from collie_compile.errors import CollieError

GiB = 1 << 30
GB = 10**9
TFLOPS = 10**12


# Checkpoint overheads per op as multiples of op_latency (full, selective), where a spec
# does not give them (catalog entries, spec files older than the fields): fitted to one
# H200's fidelity rows at micro-batch 4 x 512 (full 1.20x, selective 1.41x of a price
# that counted a replayed op as one plain op), not measured by calibrate on that card.
CHECKPOINT_RATIOS = (0.7, 1.6)
# Fields that are fractions of a peak rate (GPUSpec.from_dict checks them).
FRACTIONS = ("matmul_efficiency", "memory_efficiency", "link_efficiency", "zero_efficiency")
# The training dtypes by the names plans, specs and the CLI use.


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator and the links between them. Bandwidths are bytes/s one way."""

    name: str
    memory_bytes: int
    bf16_flops: float
    fp16_flops: float
    fp32_flops: float
    hbm_bandwidth: float
    intra_node_bandwidth: float  # per GPU, e.g. NVLink
    intra_node_latency: float  # seconds per collective step
    inter_node_bandwidth: float  # per GPU, e.g. InfiniBand NIC
    inter_node_latency: float
    matmul_efficiency: float = 0.65  # fraction of peak FLOPs large GEMMs reach
    memory_efficiency: float = 0.8  # fraction of peak bandwidth streaming kernels reach
    link_efficiency: float = 0.8  # fraction of link bandwidth NCCL rings reach
    # Host time per operator in an eager training step (dispatch, autograd, kernel launch):
    # no op is faster than this, which is what small micro-batches run into.
    op_latency: float = 5e-6
    # Host time per forward op that activation checkpointing adds beyond rerunning it:
    # non-reentrant checkpoint's saved-tensor hooks (full); the selective policy's dispatch
    # mode on every op, forward and replay (selective). Like op_latency it shows where ops
    # are small and hides behind big ones. Defaults: CHECKPOINT_RATIOS x op_latency.
    checkpoint_op_overhead: float = CHECKPOINT_RATIOS[0] * 5e-6
    selective_op_overhead: float = CHECKPOINT_RATIOS[1] * 5e-6
    # Fraction of communication that hides behind compute when both are pending: 1 where
    # collectives run on their own engines (NCCL), 0 where they take the compute cores (CPU).
    comm_overlap: float = 1.0
    # Fraction of the ring model's rate that ZeRO-2/3's gathers and reduce-scatters reach
    # once FSDP's copies into and out of its flat buffers are counted: near 1 on GPUs
    # (copies at HBM speed beside a link ten times slower); on a CPU the copies fault in
    # fresh pages and gloo's reduce-scatter runs as an all-reduce (calibrate measures it).
    zero_efficiency: float = 1.0
    # Dtypes in which SDPA has a fused kernel for grouped-query attention: flash, in 16
    # bits on sm80 and later; the CPU's in all. Elsewhere K/V are expanded to every head
    # first, which costs activation memory (collie_compile.models.attention).
    fused_gqa_dtypes: tuple[str, ...] = ("bf16", "fp16")

    def peak_flops(self, dtype: str) -> float:
        return {"bf16": self.bf16_flops, "fp16": self.fp16_flops, "fp32": self.fp32_flops}[dtype]

    def fused_gqa(self, dtype: str) -> bool:
        """Whether grouped-query attention in ``dtype`` runs fused, K/V unexpanded."""
        return dtype in self.fused_gqa_dtypes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict, source: str = "spec") -> GPUSpec:
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        if isinstance(data, list):  # what `gpus --json` prints: the whole catalog
            raise CollieError(f"{source} holds a list of GPU specs; --gpu takes one object: "
                              "`collie-compile gpus NAME > SPEC.json` writes one to edit")
        if not isinstance(data, dict):
            raise CollieError(f"{source}: a GPU spec must be a JSON object with keys "
                              f"{', '.join(sorted(required))}")
        unknown = set(data) - known
        missing = required - set(data)
        if unknown or missing:
            what = "; ".join(filter(None, [
                f"unknown keys {sorted(unknown)}" if unknown else "",
                f"missing keys {sorted(missing)}" if missing else ""]))
            raise CollieError(f"{source}: bad GPU spec ({what}); `collie-compile gpus NAME` "
                              "prints one in the format")
        for k, v in data.items():
            if k == "name":
                if not isinstance(v, str) or not v:
                    raise CollieError(f"{source}: GPU spec field 'name' must be a non-empty "
                                      f"string, got {v!r}")
                continue
            if k == "fused_gqa_dtypes":
                if not isinstance(v, (list, tuple)) or not set(v) <= set(DTYPE_NAMES):
                    raise CollieError(f"{source}: GPU spec field 'fused_gqa_dtypes' must be a "
                                      f"list of dtypes among {', '.join(DTYPE_NAMES)}, got {v!r}")
                continue
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if k == "comm_overlap":  # 0 is meaningful: nothing overlaps
                ok, what = number and 0 <= v <= 1, "a fraction from 0 to 1"
            elif k in ("checkpoint_op_overhead", "selective_op_overhead"):  # 0: free
                ok, what = number and v >= 0, "a number of seconds, 0 or more"
            elif k in FRACTIONS:  # shares of a peak: above 1 is a typo (percent?)
                ok, what = number and 0 < v <= 1, "a fraction above 0, at most 1"
            else:
                ok, what = number and v > 0, "a positive number"
            if not ok:
                raise CollieError(f"{source}: GPU spec field {k!r} must be {what}, got {v!r}")
        if "fused_gqa_dtypes" in data:  # JSON has lists; the dataclass keeps a tuple
            data = {**data, "fused_gqa_dtypes": tuple(data["fused_gqa_dtypes"])}
        # a spec without the checkpoint overheads (written before them): in proportion to
        # its own op latency, not the catalog's
        latency = data.get("op_latency", cls.op_latency)
        for key, ratio in zip(("checkpoint_op_overhead", "selective_op_overhead"),
                              CHECKPOINT_RATIOS):
            data = {key: ratio * latency, **data}
        return cls(**data)


def _nv(name: str, mem: int, bf16: float, fp16: float, fp32: float, hbm: float, intra: float,
        inter: float, intra_lat: float = 5e-6, inter_lat: float = 10e-6,
        fused_gqa: tuple[str, ...] = ("bf16", "fp16")) -> GPUSpec:
    return GPUSpec(name, mem, bf16 * TFLOPS, fp16 * TFLOPS, fp32 * TFLOPS, hbm * GB, intra * GB,
                   intra_lat, inter * GB, inter_lat, fused_gqa_dtypes=fused_gqa)


# Dense tensor-core peaks (fp32 = plain FP32, not TF32). Links: NVLink one-way per GPU for
# SXM parts, PCIe 4.0 x16 for consumer/PCIe cards; inter-node one NIC per GPU. Memory is
# what torch reports as total_memory where we measured it (H200: 139.8 GiB, not "141 GB").
CATALOG: dict[str, GPUSpec] = {g.name: g for g in [
    _nv("a100-40gb", 40 * GiB, 312, 312, 19.5, 1555, 300, 25),
    _nv("a100-80gb", 80 * GiB, 312, 312, 19.5, 2039, 300, 25),
    _nv("h100-80gb", 80 * GiB, 989, 989, 67, 3350, 450, 50),
    _nv("h200", 150_109_880_320, 989, 989, 67, 4800, 450, 50),
    _nv("rtx3090", 24 * GiB, 71, 71, 35.6, 936, 25, 12.5, intra_lat=10e-6, inter_lat=20e-6),
    _nv("rtx4090", 24 * GiB, 165, 165, 82.6, 1008, 25, 12.5, intra_lat=10e-6, inter_lat=20e-6),
    # V100 has no bf16 tensor cores: bf16 runs at the fp32 rate; and no flash attention.
    _nv("v100-32gb", 32 * GiB, 15.7, 125, 15.7, 900, 150, 12.5, fused_gqa=()),
    _nv("l40s", 48 * GiB, 362, 362, 91.6, 864, 25, 25, intra_lat=10e-6),
]}


def get_gpu(name_or_path: str | GPUSpec) -> GPUSpec:
    """A catalog name (``collie-compile gpus``) or the path of a JSON spec file."""
    if isinstance(name_or_path, GPUSpec):
        return name_or_path
    key = name_or_path.lower()
    if key in CATALOG:
        return CATALOG[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise CollieError(f"cannot read GPU spec {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CollieError(f"GPU spec {path} is not valid JSON ({e})") from None
        return GPUSpec.from_dict(data, source=str(path))
    raise CollieError(f"unknown GPU {name_or_path!r}; use one of {', '.join(CATALOG)} "
                      "(see `collie-compile gpus`) or a JSON spec file")


def catalog_name(device_name: str, memory_bytes: int) -> str | None:
    """The catalog entry of a CUDA device as torch names it (``NVIDIA H100 80GB HBM3`` ->
    ``h100-80gb``), or None for one the catalog lacks."""
    name = device_name.lower()
    a100 = "a100-40gb" if memory_bytes < 60 * GiB else "a100-80gb"
    for part, entry in (("h200", "h200"), ("h100", "h100-80gb"), ("a100", a100),
                        ("4090", "rtx4090"), ("3090", "rtx3090"), ("v100", "v100-32gb"),
                        ("l40s", "l40s")):
        if part in name:
            return entry
    return None


def local_gpu() -> GPUSpec:
    """The device this process trains on, as a spec. A CUDA GPU: its catalog entry with
    the memory torch reports (A100 figures under its own name if the catalog lacks it;
    ``collie-compile calibrate`` measures the real ones). A CPU: a100-80gb's figures,
    with the CPU's attention kernels (fused for grouped-query attention in every dtype),
    so that a CPU run is priced as it runs."""
    import torch

    if not torch.cuda.is_available():
        return replace(CATALOG["a100-80gb"], fused_gqa_dtypes=DTYPE_NAMES)
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    entry = catalog_name(props.name, props.total_memory)
    return replace(CATALOG[entry or "a100-80gb"],
                   name=entry or props.name.lower().replace(" ", "-"),
                   memory_bytes=int(props.total_memory),
                   fused_gqa_dtypes=fused_gqa_dtypes(device))
