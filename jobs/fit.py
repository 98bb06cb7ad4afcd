"""Fit job: image-text shards -> splat shards (`ray job submit --working-dir . -- python jobs/fit.py SPEC`)."""

import logging
import sys
from pathlib import Path

from splatclip.platform.secrets import install_log_filter, secret_values
from splatclip.platform.loader import spec_from_args
from splatclip.platform.specs import FitSpec

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = spec_from_args(FitSpec, sys.argv[1:], "fit.py",
                           default=str(Path(__file__).parent / "specs" / "fit.local.yaml"))
    install_log_filter(secret_values(spec))  # URL credentials and the spec's secrets never reach a log line
    from splatclip.fit.job import run  # after the spec: a bad one exits 2 before torch and Ray load

    sys.exit(run(spec))
