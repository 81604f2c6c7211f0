"""``python -m benchmarks SUITE [--out DIR]``."""

import argparse
import warnings

from . import (
    checkpoints,
    estimate,
    experts_kernel,
    fidelity,
    moe,
    optimizer_kernels,
    plan,
    rss,
    study_instruct,
    study_memory,
    study_throughput,
    train,
    zoo,
)

SUITES = {"checkpoints": checkpoints.main, "estimate": estimate.main,
          "experts": experts_kernel.main, "fidelity": fidelity.main,
          "kernels": optimizer_kernels.main, "moe": moe.main, "plan": plan.main,
          "rss": rss.main, "study-instruct": study_instruct.main,
          "study-memory": study_memory.main,
          "study-throughput": study_throughput.main,
          "train": train.main,
          "zoo": zoo.main}

parser = argparse.ArgumentParser(prog="python -m benchmarks")
parser.add_argument("suite", choices=sorted(SUITES))
parser.add_argument("--out", help="directory for the markdown table and PNG plots")
parser.add_argument("--nproc", type=int, help="ranks to launch (train, fidelity, moe)")
parser.add_argument("--families", help="zoo: comma-separated model_types (default: all)")
parser.add_argument("--front-only", action="store_true", help="zoo: capture and estimate only")
parser.add_argument("--data", help="study-instruct: JSON Lines instruction records (the last "
                    "150 held out)")
parser.add_argument("--model", help="study-instruct: the base model folder (HF weights)")
args = parser.parse_args()
warnings.filterwarnings("ignore")
if args.nproc and args.suite not in ("train", "fidelity", "moe"):
    parser.error(f"--nproc applies to train, fidelity and moe, not {args.suite}")
extra = {"nproc": args.nproc} if args.nproc else {}
if args.families:
    if args.suite != "zoo":
        parser.error("--families applies to zoo")
    extra["families"] = args.families.split(",")
if (args.data or args.model) and args.suite != "study-instruct":
    parser.error("--data and --model apply to study-instruct")
if args.data and not args.model:
    parser.error("--data needs --model (the base to tune)")
extra.update({k: v for k, v in (("data", args.data), ("model", args.model)) if v})
if args.front_only:
    extra["layouts"] = False
SUITES[args.suite](args.out, **extra)
