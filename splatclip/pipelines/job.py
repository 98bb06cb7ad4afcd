"""The skeleton that fit, train and evaluate share: inputs, the MLflow run and its run file, Ray,
and what a failure leaves behind.

    Job(spec).run():
        the spec's input patterns resolved (`examples://SET/...` to the local example shards)
        check()          -> problems, one line each: exit 2 before anything is written or started
        requests() and cluster_paths() checked against the cluster's node types (a job that uses
                            Ray; joining its cluster): a request no node type can hold, or a local
                            path on a cluster of several nodes, exit 2 (`placement`)
        the lease on lease_dir() taken (another job holding it: exit 2 naming that job), then
        prepare()        -> what the job writes before it starts (problems: exit 2)
        the MLflow run opened, or reopened from the run file a previous attempt wrote
        Ray started or joined, when needs_ray()
        body(tracker)    -> the exit status; an exception is logged (secrets redacted), exit 1;
                            storage failing after its retries is one line naming the operation and URL
        the run ended FINISHED (status 0) or FAILED (anything else, an exception included);
        KILLED when the job is interrupted

A job is a subclass that names its inputs and fills in `check` and `body`.
"""

from __future__ import annotations

import logging
import posixpath

from pydantic import BaseModel

from splatclip.datasets import resolve_example
from splatclip.platform import placement, storage
from splatclip.platform.lease import Lease, LeaseHeld
from splatclip.platform.runtime import init_ray, node_types
from splatclip.platform.secrets import redact
from splatclip.platform.tracking import Tracker

log = logging.getLogger(__name__)


class Job:
    name: str  # the MLflow tag `splatclip.job`
    inputs: tuple[str, ...] = ()  # the spec's fields that name shard patterns
    system_metrics = True  # this process samples its machine into the run (the train driver leaves it to rank 0)
    uses_ray = False  # its body starts Ray work (actors, tasks, a trainer)

    def __init__(self, spec: BaseModel):
        self.spec = spec

    def check(self) -> list[str]:
        """What stops the job before it starts, one line each."""
        return []

    def requests(self) -> dict[str, tuple[dict[str, float], int]]:
        """What the job asks of Ray, by what asks it: ("a fitting actor": ({CPU, GPU, markers}, how
        many at once)). `place` checks them and keeps them, fitted to the cluster, in `self.placed`."""
        return {}

    def cluster_paths(self) -> dict[str, str]:
        """The spec's paths (field: URL) that every node reads or writes, not only this process."""
        return {}

    def place(self) -> list[str]:
        """Check the job's requests and paths against the node types of the cluster it will run on;
        problems as in `check`."""
        types, source = node_types(self.spec.ray)
        log.info("node types (from %s): %s", source, "; ".join(f"{t.name} {placement.fmt(t.resources)}" for t in types))
        self.placed, problems = {}, []
        for what, (request, count) in self.requests().items():
            self.placed[what], problem = placement.fit_request(what, request, types, count)
            problems += [problem] if problem else []
        return problems + placement.local_path_problems(self.cluster_paths(), types,
                                                        self.spec.storage.shared_filesystem)

    def lease_dir(self) -> str | None:
        """The directory this job holds a lease on while it runs (None: none), so that a second job on
        it refuses at start instead of mixing its writes with this one's."""
        return None

    def prepare(self) -> list[str]:
        """What the job writes before it starts, once it holds its lease; problems as in `check`."""
        return []

    def run_file(self) -> str | None:
        """Where the run's id is recorded for a rerun to reopen it (None: every run is a new one)."""
        return None

    def needs_ray(self) -> bool:
        return False

    def body(self, tracker: Tracker) -> int:
        raise NotImplementedError

    def shards(self, pattern: str, what: str, problems: list[str]) -> tuple[list[str], list[str]]:
        """(the shards a pattern names, the names it expects that are missing, each logged); a
        problem when it names none."""
        try:
            found, missing = storage.list_shards(pattern, self.spec.storage)
        except ValueError as err:
            problems.append(f"{what} shards {redact(pattern)}: {err}")
            return [], []
        for url in missing:
            log.warning("%s shard missing: %s", what, redact(url))
        if not found:
            problems.append(f"no {what} shards match {redact(pattern)} ({len(missing)} expected names missing)")
        return found, missing

    def resolve_inputs(self) -> list[str]:
        """`examples://` patterns in the input fields made local paths (the set written on first use)."""
        update, problems = {}, []
        for field in self.inputs:
            value = getattr(self.spec, field)
            if value is not None:
                try:
                    update[field] = resolve_example(value)
                except ValueError as err:
                    problems.append(f"{field}: {err}")
        self.spec = self.spec.model_copy(update=update)
        return problems

    def open_run(self, tracker: Tracker) -> None:
        run_file = self.run_file() if tracker.active else None
        previous = {}
        if run_file and storage.exists(run_file, self.spec.storage):
            previous = storage.read_json(run_file, self.spec.storage)
        tracker.start(self.spec, resume_run_id=tracker.recorded_run(previous), system_metrics=self.system_metrics)
        if run_file:
            # the file itself may not be a link (its directory is the job's output or run directory)
            storage.write_json(run_file, tracker.run_record(), self.spec.storage, root=posixpath.dirname(run_file))

    def run(self) -> int:
        try:
            problems = self.resolve_inputs() or self.check()
            if not problems and self.uses_ray:
                problems = self.place()
            if problems:
                for line in problems:
                    log.error("%s", line)
                return 2
            directory = self.lease_dir()
            lease = Lease(directory, self.spec.storage, self.name) if directory is not None else None
            try:
                if lease is not None:
                    lease.acquire()
                problems = self.prepare()
                for line in problems:
                    log.error("%s", line)
                return 2 if problems else self._run()
            finally:
                if lease is not None:
                    lease.release()
        except LeaseHeld as err:
            log.error("another job is running on this output: %s", err)
            return 2
        except storage.StorageError as err:  # before the run exists: nothing to mark
            log.error("the %s job failed: storage: %s", self.name, err)
            return 1

    def _run(self) -> int:
        tracker = Tracker(self.spec.tracking, self.name)
        try:
            self.open_run(tracker)
            if self.needs_ray():
                init_ray(self.spec.ray)
            status = self.body(tracker)
        except Exception as err:
            failure = storage.storage_failure(err)
            if failure:  # one line: the operation and the URL (the trace is for debugging)
                log.debug("the %s job failed", self.name, exc_info=True)
                log.error("the %s job failed: storage: %s", self.name, failure)
            else:
                log.exception("the %s job failed", self.name)
            tracker.end("FAILED")
            return 1
        except BaseException:  # interrupted (Ctrl-C, SystemExit): the run says so, and the job stops
            tracker.end("KILLED")
            raise
        tracker.end("FINISHED" if status == 0 else "FAILED")
        return status
