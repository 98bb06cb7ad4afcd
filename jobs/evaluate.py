"""Eval job (`ray job submit --working-dir . -- python jobs/evaluate.py SPEC [--set key=value ...]`)."""

import logging
import sys
from pathlib import Path

from splatclip.platform.secrets import install_log_filter, secret_values
from splatclip.platform.loader import spec_from_args
from splatclip.platform.specs import EvalSpec

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = spec_from_args(EvalSpec, sys.argv[1:], "evaluate.py",
                           default=str(Path(__file__).parent / "specs" / "eval.local.yaml"))
    install_log_filter(secret_values(spec))  # URL credentials and the spec's secrets never reach a log line
    from splatclip.pipelines.evaluate import run  # after the spec: a bad one exits 2 before torch and Ray load

    sys.exit(run(spec))
