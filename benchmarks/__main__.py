"""``python -m benchmarks SUITE [--out DIR]``."""

import argparse
import warnings

from . import estimate, kernels, plan

SUITES = {"estimate": estimate.main, "kernels": kernels.main, "plan": plan.main}

parser = argparse.ArgumentParser(prog="python -m benchmarks")
parser.add_argument("suite", choices=sorted(SUITES))
parser.add_argument("--out", help="directory for the markdown table and PNG plots")
args = parser.parse_args()
warnings.filterwarnings("ignore")
if args.suite == "kernels":
    SUITES[args.suite](args.out)
else:
    SUITES[args.suite]()
