"""Serve job (`python jobs/serve.py SPEC [--set key=value ...]`, or `ray job submit ... -- python
jobs/serve.py SPEC` to deploy on a cluster): the trained splat encoder behind a URL."""

import logging
import sys
from pathlib import Path

from splatclip.platform.loader import spec_from_args
from splatclip.platform.secrets import install_log_filter, secret_values
from splatclip.platform.specs import ServeSpec

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = spec_from_args(ServeSpec, sys.argv[1:], "serve.py",
                          default=str(Path(__file__).parent / "specs" / "serve.local.yaml"))
    install_log_filter(secret_values(spec))  # the token and URL credentials never reach a log line
    from splatclip.serve.deploy import run  # after the spec: a bad one exits 2 before torch and Ray load

    sys.exit(run(spec))
