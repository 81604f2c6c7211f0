"""``python -m benchmarks SUITE``."""

import argparse
import warnings

from . import estimate, plan

SUITES = {"estimate": estimate.main, "plan": plan.main}

parser = argparse.ArgumentParser(prog="python -m benchmarks")
parser.add_argument("suite", choices=sorted(SUITES))
args = parser.parse_args()
warnings.filterwarnings("ignore")
SUITES[args.suite]()
