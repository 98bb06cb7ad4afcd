"""The fit job end to end: real Ray (in-process and `ray job submit`), local files and moto S3."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from splatclip import datasets, pictures, splats
from splatclip.fitting.images import clip_crop, decode
from splatclip.fit.job import run
from splatclip.platform import storage
from splatclip.platform.shards import read_samples, write_shard
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import FitSpec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FAST = ["fit.gaussians=16", "fit.iterations=4", "fit.size=32", "fit.compile=false", "batch_size=4"]


def spec_for(src, out, *extra):
    return load_spec(FitSpec, None, [f"input={src}", f"output={out}", "tracking.enabled=false", *FAST, *extra])


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    datasets.write_shards(datasets.photos(), str(src), "photos", 3)  # 8 photos -> 3 shards
    return src


def keys_of(url, spec=None):
    return [s["__key__"] for s in read_samples(url, spec)]


def test_fit_pipeline_local(ray_local, photo_shards, tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_for(f"{photo_shards}/photos-{{00000..00002}}.tar", tmp_path / "out", "tracking.enabled=true",
                    f"tracking.uri={uri}", "tracking.experiment=fit-tests")
    with caplog.at_level(logging.DEBUG, logger="splatclip.progress"):
        assert run(spec) == 0
    progress = [r.progress for r in caplog.records if r.name == "splatclip.progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 3 and progress[-1]["unit"] == "shards"
    assert "images done" in progress[-1]["note"]
    out = tmp_path / "out"
    for i, names in enumerate([datasets.PHOTOS[:3], datasets.PHOTOS[3:6], datasets.PHOTOS[6:]]):
        samples = list(read_samples(str(out / f"photos-{i:05d}.tar")))
        assert [s["__key__"] for s in samples] == names
        for s in samples:
            arr = splats.from_bytes(s["splats.npy"])
            meta = json.loads(s["json"])
            assert arr.shape == (16, 8) and meta["bytes"] == 256 and meta["psnr"] > 5
            assert meta["source_bytes"] > 0 and meta["source_width"] > 0 and s["txt"].startswith(b"a photo")
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images"] == summary["fitted"] == 8 and summary["failed"] == 0 and summary["ok"]
    assert (out / "_SUCCESS.json").exists()

    # MLflow: the summary as metrics, and a contact sheet of the first 8 fitted photos (original,
    # render, error rows of 32-pixel tiles)
    client = MlflowClient(uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("fit-tests").experiment_id])
    assert run_info.data.metrics["fitted"] == 8
    sheet = np.array(Image.open(client.download_artifacts(run_info.info.run_id, "pictures/contact_sheet.png",
                                                          str(tmp_path))))
    assert sheet.shape[0] == 3 * 32 + 2 * 8
    first = datasets.photos()[0]
    crop = pictures.to_uint8(clip_crop(decode(first["jpg"] if "jpg" in first else first["png"]), 32))
    assert np.array_equal(sheet[:32, :32], crop) and not np.array_equal(sheet[40:72, :32], crop)

    # A rerun finds every shard committed and fits nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert run(spec) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def bad_shard(path: Path):
    """Good photos around every kind of bad sample."""
    good = datasets.photos()[:2]
    jpeg = good[0]["jpg"]
    bomb = io.BytesIO()
    Image.new("L", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx of zeros: a few KB on disk
    samples = [
        good[0],
        {"__key__": "undecodable", "jpg": b"this is not an image at all", "txt": b"x"},
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 3], "txt": b"x"},
        {"__key__": "zero", "jpg": b"", "txt": b"x"},
        {"__key__": "bomb", "png": bomb.getvalue(), "txt": b"x"},
        {"__key__": "noimage", "txt": b"a caption without its image", "json": b"{\"status\": \"failed\"}"},
        {"__key__": "../../etc/escape", "jpg": jpeg, "txt": b"x"},
        good[1],
    ]
    with write_shard(str(path)) as w:
        for s in samples:
            w.write(s)


def test_bad_inputs_are_recorded_and_the_job_goes_on(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad_shard(src / "mixed-00000.tar")
    (src / "mixed-00001.tar").write_bytes(b"\x00garbage, not a tar archive" * 100)
    # three shards: 00000 mixed, 00001 garbage, 00002 missing; budget large enough to pass
    spec = spec_for(f"{src}/mixed-{{00000..00002}}.tar", tmp_path / "out", "max_failed_fraction=0.9")
    assert run(spec) == 0
    out = tmp_path / "out"
    assert keys_of(str(out / "mixed-00000.tar")) == ["astronaut", "coffee"]
    stats = json.loads((out / "_stats" / "mixed-00000.json").read_text())
    reasons = {e["key"]: e["reason"] for e in stats["errors"]}
    assert reasons == {"undecodable": "undecodable", "truncated": "truncated", "zero": "empty", "bomb": "too_large",
                       "noimage": "no_image", "../../etc/escape": "unsafe_path"}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_unreadable"] == [str(src / "mixed-00001.tar")]
    assert summary["shards_missing"] == [str(src / "mixed-00002.tar")]
    assert summary["failed_by_reason"]["unreadable_shard"] == 1 and summary["fitted"] == 2
    assert not (out / "mixed-00001.tar").exists()
    # The same job with the default 1% budget exits non-zero, writing nothing new.
    assert run(spec_for(f"{src}/mixed-{{00000..00002}}.tar", tmp_path / "out")) == 1


def test_fit_pipeline_on_s3_with_two_actors_committing(ray_local, photo_shards, s3_bucket):
    """Two fitting actors write parts of the same shards (batches of 2 across shards of 3) and
    commit them on S3 (moto): every shard whole, no part left behind."""
    bucket, storage_spec = s3_bucket
    for name in ("photos-00000.tar", "photos-00001.tar"):
        storage.write_bytes(f"{bucket}/src/{name}", (photo_shards / name).read_bytes(), storage_spec)
    spec = spec_for(f"{bucket}/src/photos-{{00000..00001}}.tar", f"{bucket}/splats",
                    f"storage.endpoint_url={storage_spec.endpoint_url}", "storage.region=us-east-1",
                    "ray.actors=2", "batch_size=2")
    assert run(spec) == 0
    assert keys_of(f"{bucket}/splats/photos-00000.tar", storage_spec) == datasets.PHOTOS[:3]
    fs, path = storage.filesystem(f"{bucket}/splats", storage_spec)
    assert not [p for p in fs.find(path) if "/_parts/" in p]
    assert keys_of(f"{bucket}/splats/photos-00001.tar", storage_spec) == datasets.PHOTOS[3:6]
    assert storage.read_success(f"{bucket}/splats", storage_spec)["shards"] == ["photos-00000.tar", "photos-00001.tar"]


def test_killed_job_resumes_by_batch_to_the_same_output(photo_shards, tmp_path, kill_job):
    """Kill the whole job in the middle of a shard (some of its batches written as parts, the shard
    not committed), rerun: the rerun fits only what no part holds, and the output equals a clean
    run's byte for byte; the killed run left no committed shard half written."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    pattern = f"{photo_shards}/photos-{{00000..00002}}.tar"
    slow = [f"--set={o}" for o in FAST + ["tracking.enabled=false", "fit.iterations=100", "batch_size=1",
                                           f"input={pattern}"]]
    cmd = [sys.executable, str(ROOT / "jobs" / "fit.py"), str(ROOT / "jobs/specs/fit.local.yaml"), *slow]
    out = tmp_path / "resumed"
    proc = subprocess.Popen([*cmd, f"--set=output={out}"], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mid_shard():  # a shard with a written part that is not committed yet
        return [p for p in out.glob("_parts/*/*.json") if not (out / f"{p.parent.name}.tar").exists()]

    deadline = time.time() + 900  # bounds a hang only: the first part appears in seconds on an idle machine
    while time.time() < deadline and not mid_shard():
        time.sleep(0.05)
    kill_job(proc)
    parts = list(out.glob("_parts/*/*.json"))
    committed = sorted(p.name for p in out.glob("*.tar"))
    assert parts and len(committed) < 3, (parts, committed)  # killed in the middle of a shard
    for name in committed:  # every visible shard is complete
        assert len(keys_of(str(out / name))) == {"photos-00002.tar": 2}.get(name, 3)
    done_before = sum({"photos-00002.tar": 2}.get(n, 3) for n in committed) + len(parts)  # batch_size=1

    subprocess.run([*cmd, f"--set=output={out}"], env=env, cwd=tmp_path, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run([*cmd, f"--set=output={clean}"], env=env, cwd=tmp_path, check=True, capture_output=True)
    resumed = json.loads((out / "_summary.json").read_text())
    assert resumed["images_this_run"] == 8 - done_before  # every finished part was reused
    assert resumed["fitted"] == 8 and resumed["shards_done"] == 3 and not list(out.glob("_parts/*/*"))
    names = sorted(p.name for p in clean.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == names == [f"photos-{i:05d}.tar" for i in range(3)]
    for name in names:
        a, b = list(read_samples(str(out / name))), list(read_samples(str(clean / name)))
        assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
        assert [s["splats.npy"] for s in a] == [s["splats.npy"] for s in b]


def test_ray_job_submit(ray_head, photo_shards, tmp_path):
    address, env = ray_head
    out = tmp_path / "submitted"
    sets = [f"--set={o}" for o in FAST + ["tracking.enabled=false", f"output={out}",
                                           f"input={photo_shards}/photos-{{00000..00002}}.tar"]]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--", "python", "jobs/fit.py", "jobs/specs/fit.local.yaml", *sets],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    assert keys_of(str(out / "photos-00002.tar")) == datasets.PHOTOS[6:]
    arr = splats.from_bytes(next(read_samples(str(out / "photos-00000.tar")))["splats.npy"])
    assert arr.dtype == np.float16 and arr.shape == (16, 8)


def test_hostile_corpus_costs_only_its_bad_samples(ray_local, tmp_path):
    """Every class of hostile input in tests/corpus.py, through the real job: each bad sample is
    recorded with its reason, each good one is fitted, nothing else is lost, written twice or
    written outside the output, and the job ends within its budget."""
    import corpus

    src = tmp_path / "src"
    corpus.hostile_shards(src)
    names = "hostile-{00000.tar,00000.tar,00001.tar.gz,00002.tar.gz,00003.tar,00004.tar,00005.tar}"  # 00000 twice
    spec = spec_for(f"{src}/{names}", tmp_path / "out", *corpus.LIMITS, "max_failed_fraction=0.7")
    assert run(spec) == 0
    out = tmp_path / "out"
    fitted = [k for n in ("hostile-00000.tar", "hostile-00001.tar", "hostile-00002.tar") for k in keys_of(str(out / n))]
    assert fitted == corpus.GOOD  # in order, each once: the duplicate good0 was not written again
    for name in ("hostile-00000.tar", "hostile-00001.tar", "hostile-00002.tar"):
        with tarfile.open(out / name) as tar:
            members = tar.getnames()
        assert len(members) == len(set(members)), f"{name} has duplicate members"
        assert not [m for m in members if ".__" in m or m.startswith(("/", ".."))]
    records = [json.loads((out / "_stats" / f"hostile-0000{i}.json").read_text()) for i in range(5)]
    failed = [(e["key"], e["reason"]) for r in records for e in r["errors"] if e["reason"] != "unreadable_shard"]
    assert failed == corpus.EXPECT_FAILED
    noted = {n["key"]: n["reason"] for r in records for n in r["notes"]}
    assert noted == corpus.EXPECT_NOTED
    assert records[3]["status"] == "unreadable" and records[4]["status"] == "empty"
    by_key = {s["__key__"]: s for s in read_samples(str(out / "hostile-00000.tar"))}
    assert by_key["badutf8"]["txt"].decode("utf-8") == "caf\ufffd \ufffd\ufffd"  # cleaned, still a caption
    assert "cls" not in by_key["badcls"] and by_key["good0"]["cls"] == b"3"
    assert json.loads(by_key["deepjson"]["json"])["source"] is None
    assert json.loads(by_key["good0"]["json"])["source"] == {"url": "http://example.invalid/0"}
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["fitted"] == len(corpus.GOOD) and summary["failed"] == len(corpus.EXPECT_FAILED)
    assert summary["shards"] == 6 and summary["shards_missing"] == [f"{src}/hostile-00005.tar"]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"src", "out"}  # nothing outside the output (and the sources untouched)
    # The default 1% budget counts images: 16 of 27 failed is far past it.
    assert run(spec_for(f"{src}/{names}", tmp_path / "out", *corpus.LIMITS)) == 1


def test_inputs_that_would_collide_stop_the_job_before_it_writes(tmp_path, caplog):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(ROOT / "tests" / "unit" / "tests_helpers.py", tmp_path / folder / "00000.tar")
    spec = spec_for(f"{tmp_path}/{{a,b}}/00000.tar", tmp_path / "out")
    assert run(spec) == 2
    assert f"{tmp_path}/a/00000.tar and {tmp_path}/b/00000.tar would both write 00000.tar" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_fit_settings_needs_overwrite(ray_local, photo_shards, tmp_path, caplog):
    src = f"{photo_shards}/photos-00000.tar"
    out = tmp_path / "out"
    assert run(spec_for(src, out)) == 0
    assert (out / "_SUCCESS.json").exists()
    assert run(spec_for(src, out, "fit.gaussians=25")) == 2
    assert "fit.gaussians: 16 in the output, 25 in this spec" in caplog.text
    assert splats.from_bytes(next(read_samples(str(out / "photos-00000.tar")))["splats.npy"]).shape == (16, 8)
    assert run(spec_for(src, out, "fit.gaussians=25", "overwrite=true")) == 0
    assert splats.from_bytes(next(read_samples(str(out / "photos-00000.tar")))["splats.npy"]).shape == (25, 8)
    assert json.loads((out / "_fit.json").read_text())["settings"]["fit"]["gaussians"] == 25
    # an output written before a setting existed was fitted as its default does: the same spec goes on, another refits
    record = json.loads((out / "_fit.json").read_text())
    del record["settings"]["fit"]["prefilter"]
    (out / "_fit.json").write_text(json.dumps(record))
    assert run(spec_for(src, out, "fit.gaussians=25")) == 0
    assert run(spec_for(src, out, "fit.gaussians=25", "fit.prefilter=0.02")) == 2
    assert "fit.prefilter: 0.0 in the output, 0.02 in this spec" in caplog.text


def test_no_secret_reaches_output_logs_or_mlflow(photo_shards, tmp_path, mlflow_server):
    """The real job with a storage secret in its spec file and a password in its tracking URI: the
    secrets appear nowhere in its stdout/stderr, the MLflow server's params, tags and artifacts, or
    any file it wrote. A misspelled secret key and a YAML error on a secret's line do not echo it."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    secret, password = "SECRET-KEY-9f8e7d", "PASSWORD-1a2b3c"
    spec_file = tmp_path / "fit.yaml"
    spec_file.write_text(f"input: {photo_shards}/photos-00000.tar\noutput: {tmp_path}/out\n"
                         f"storage:\n  access_key_id: KEYID-77\n  secret_access_key: {secret}\n")
    uri = mlflow_server.replace("http://", f"http://splat:{password}@")
    sets = [f"--set={o}" for o in FAST + [f"tracking.uri={uri}", "tracking.experiment=secrets"]]
    job = [sys.executable, str(ROOT / "jobs" / "fit.py")]
    done = subprocess.run([*job, str(spec_file), *sets], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = [done.stdout, done.stderr]
    client = MlflowClient(mlflow_server)
    (found,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    shown += [json.dumps(found.data.params), json.dumps(found.data.tags)]
    artifacts = Path(client.download_artifacts(found.info.run_id, "", str(tmp_path / "artifacts")))
    files = [p for p in [*artifacts.rglob("*"), *(tmp_path / "out").rglob("*")] if p.is_file()]
    assert any(p.name == "_mlflow_run.json" for p in files) and any(p.suffix == ".png" for p in files)
    shown += [p.read_bytes().decode("latin-1") for p in files]
    for text in shown:
        assert secret not in text and password not in text and "KEYID-77" not in text
    assert found.data.params["tracking.uri"] == mlflow_server.replace("http://", "http://***@")

    spec_file.write_text(f"input: a.tar\noutput: b\nstorage:\n  secret_access_key: '{secret}\n")  # unclosed quote
    for argv in ([str(spec_file)], ["--set=input=a", "--set=output=b", f"--set=storage.secret_acess_key={secret}"]):
        bad = subprocess.run([*job, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
        assert bad.returncode == 2 and secret not in bad.stdout + bad.stderr, bad.stderr
