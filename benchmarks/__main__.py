"""``python -m benchmarks SUITE [--out DIR]``."""

import argparse
import warnings

from . import estimate, fidelity, optimizer_kernels, plan, train

SUITES = {"estimate": estimate.main, "fidelity": fidelity.main,
          "kernels": optimizer_kernels.main, "plan": plan.main, "train": train.main}

parser = argparse.ArgumentParser(prog="python -m benchmarks")
parser.add_argument("suite", choices=sorted(SUITES))
parser.add_argument("--out", help="directory for the markdown table and PNG plots")
args = parser.parse_args()
warnings.filterwarnings("ignore")
SUITES[args.suite](args.out)
