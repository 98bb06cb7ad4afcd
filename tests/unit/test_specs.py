import json
from pathlib import Path

import pytest

from splatclip.cli import main as cli
from splatclip.platform.loader import SpecError, load_spec, spec_from_args
from splatclip.platform.serialize import flatten, public_dict, spec_hash
from splatclip.platform.specs import SPECS, FitSpec, TrainSpec

SPEC_FILES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_every_example_spec_validates(path):
    kind = SPECS[path.name.split(".")[0].split("-")[0]]  # train-rgb.local.yaml is a train spec
    assert isinstance(load_spec(kind, path), kind)


DEMO_FILES = sorted((Path(__file__).resolve().parents[2] / "examples" / "demo" / "specs").glob("*.yaml"))
DEMO_SCHEMAS = {"teacher": TrainSpec, "student": TrainSpec, "fit": FitSpec, "evaluate": SPECS["eval"]}


@pytest.mark.parametrize("path", DEMO_FILES, ids=lambda p: p.name)
def test_every_demo_spec_validates(path):
    kind = DEMO_SCHEMAS[path.stem.split("-")[0]]
    assert isinstance(load_spec(kind, path), kind)


def test_example_specs_exist_for_every_job():
    names = {p.name for p in SPEC_FILES}
    for kind in SPECS:
        assert f"{kind}.local.yaml" in names and f"{kind}.s3.yaml" in names


def run_job_args(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        spec_from_args(FitSpec, argv, "fit.py")
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, field",
    [
        ("fit.gaussianz=400", "fit.gaussianz"),  # misspelled key
        ("batch_size=many", "batch_size"),  # wrong type
        ("fit.iterations=-5", "fit.iterations"),  # negative count
        ("ray.actors=0", "ray.actors"),
        ("fit.backend=cuda9", "fit.backend"),
    ],
)
def test_bad_override_exits_2_naming_the_field(override, field, capsys):
    code, err = run_job_args(["jobs/specs/fit.local.yaml", "--set", override], capsys)
    assert code == 2
    assert err.startswith(f"fit.py: {field}:")
    assert "Traceback" not in err


def test_malformed_set_exits_2(capsys):
    code, err = run_job_args(["jobs/specs/fit.local.yaml", "--set", "no_equals_sign"], capsys)
    assert code == 2 and "no_equals_sign" in err and "dotted.key=value" in err


def test_bad_spec_file_reports_one_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: a.tar\noutputt: b\nbatch_size: -1\nfit: {gaussians: x}\n")
    code, err = run_job_args([str(bad)], capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert {line.split(":")[1].strip() for line in lines} == {"output", "outputt", "batch_size", "fit.gaussians"}


def test_missing_spec_file(capsys):
    code, err = run_job_args(["/nonexistent/spec.yaml"], capsys)
    assert code == 2 and "no such spec file" in err


def test_overrides_are_typed_by_the_model():
    spec = load_spec(FitSpec, None, ["input=a.tar", "output=o", "fit.gaussians=900", "fit.lr_color=1e-3",
                                     "fit.compile=false", "ray.gpus_per_actor=0.5"])
    assert spec.fit.gaussians == 900 and spec.fit.lr_color == 1e-3
    assert spec.fit.compile is False and spec.ray.gpus_per_actor == 0.5


def test_secrets_never_printed_or_in_public_dict(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    spec = load_spec(FitSpec, None, ["input=a", "output=b", "storage.access_key_id=spec-secret-key"])
    assert spec.storage.secret_access_key.get_secret_value() == "env-secret-value"
    text = json.dumps(public_dict(spec)) + repr(spec) + str(spec) + json.dumps(flatten(public_dict(spec)))
    assert "env-secret-value" not in text and "spec-secret-key" not in text
    assert cli(["spec", "fit", "jobs/specs/fit.local.yaml", "--set", "storage.access_key_id=spec-secret-key"]) == 0
    assert "spec-secret-key" not in capsys.readouterr().out


def test_spec_hash_ignores_secrets():
    a = load_spec(FitSpec, None, ["input=a", "output=b", "storage.access_key_id=one"])
    b = load_spec(FitSpec, None, ["input=a", "output=b", "storage.access_key_id=two"])
    c = load_spec(FitSpec, None, ["input=a", "output=c"])
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_schema_command(kind, capsys):
    assert cli(["spec", kind, "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False and "properties" in schema


def test_load_spec_raises_spec_error():
    with pytest.raises(SpecError) as info:
        load_spec(FitSpec, None, [])
    assert {p.split(":")[0] for p in info.value.problems} == {"input", "output"}


def test_train_spec_teacher_needs_images():
    from splatclip.platform.specs import TrainSpec

    with pytest.raises(SpecError, match="teacher embeds the source images: set images"):
        load_spec(TrainSpec, None, ["data=x.tar", "stages=[{kind: distill}]", "teacher.model=ViT-B-16"])
    with pytest.raises(SpecError, match="stages.0.kind"):
        load_spec(TrainSpec, None, ["data=x.tar", "stages=[{kind: 'Not a name'}]"])
    spec = load_spec(TrainSpec, None, ["data=x.tar", "images=src.tar", "stages=[{kind: distill}, {kind: contrastive}]"])
    assert spec.images == "src.tar" and spec.teacher is None


def test_override_into_a_list_item():
    from splatclip.platform.specs import TrainSpec

    local = SPEC_FILES[0].parent / "train.local.yaml"
    spec = load_spec(TrainSpec, local, ["stages.1.lr=0.123"])
    assert spec.stages[1].lr == 0.123
    with pytest.raises(SpecError, match="stages.5"):
        load_spec(TrainSpec, local, ["stages.5.lr=1"])


def test_markdown_reference_lists_every_field(capsys):
    assert cli(["spec", "train", "--markdown"]) == 0
    out = capsys.readouterr().out
    for field in ("`data`", "`model.latents`", "`stages`", "`storage.secret_access_key`", "`ray.actors`"):
        assert field in out


def test_train_paths_are_made_absolute_for_workers_in_other_directories(tmp_path, monkeypatch):
    """Ray Train workers run in their own directory: relative paths (and a relative SQLite URI) are
    resolved against the job's directory first; names, tags and URLs stay as they are."""
    from splatclip.train.job import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    (tmp_path / "classes.json").write_text("[]")
    spec = load_spec(TrainSpec, None, [
        "data=splats/{0..1}.tar", "images=examples://digits/train-00000.tar", "eval_data=s3://b/test.tar",
        "storage_path=runs", "classes=classes.json", "templates=digits", "model.name=demo-vit",
        "model.pretrained=w.pt", "teacher.model=ViT-B-16", "teacher.pretrained=openai", "stages=[{kind: distill}]"])
    got = absolute_paths(spec)
    assert got.data == f"{tmp_path}/splats/{{0..1}}.tar" and got.storage_path == f"{tmp_path}/runs"
    assert got.images == spec.images and got.eval_data == spec.eval_data
    assert got.classes == f"{tmp_path}/classes.json" and got.templates == "digits"
    assert got.model.name == "demo-vit" and got.model.pretrained == f"{tmp_path}/w.pt"
    assert (got.teacher.model, got.teacher.pretrained) == ("ViT-B-16", "openai")
    assert got.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_paths(load_spec(TrainSpec, None, ["data=x.tar", "tracking.uri=http://127.0.0.1:5000"])
                          ).tracking.uri == "http://127.0.0.1:5000"


def test_the_spec_reference_in_docs_is_generated_from_the_models(monkeypatch):
    from splatclip.cli import spec_reference

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)  # defaults that read the environment
    doc = (Path(__file__).resolve().parents[2] / "docs" / "specs.md").read_text()
    for name, kind in SPECS.items():
        assert f"## {name}\n\n{spec_reference(kind)}\n" in doc, f"docs/specs.md: the {name} table is out of date"


@pytest.mark.parametrize("override", [
    "storage.secret_acess_key=SECRET-VALUE-1",  # misspelled: an unknown field, its value still a secret
    "storage.secret_access_key={nested: SECRET-VALUE-1}",  # wrong type on a secret field
    "storage.access_key_id=[SECRET-VALUE-1]",
    "tracking.password=SECRET-VALUE-1",
    "tracking.uri=[https://user:SECRET-VALUE-1@mlflow.invalid]",
    "ray.address=7",  # a plain field keeps its value in the message (here a number; nothing secret)
])
def test_validation_errors_name_the_field_never_a_secret(override, capsys):
    code, err = run_job_args(["jobs/specs/fit.local.yaml", "--set", override], capsys)
    assert code == 2 and err.startswith(f"fit.py: {override.split('=')[0]}")
    assert "SECRET-VALUE-1" not in err


def test_yaml_error_on_a_secrets_line_shows_its_position_not_its_text(tmp_path, capsys):
    bad = tmp_path / "spec.yaml"
    bad.write_text('input: a.tar\noutput: b\nstorage:\n  secret_access_key: "SECRET-VALUE-2\n')
    code, err = run_job_args([str(bad)], capsys)
    assert code == 2 and "not valid YAML at line" in err and "SECRET-VALUE-2" not in err
    code, err = run_job_args(["jobs/specs/fit.local.yaml", "--set", "storage.secret_access_key='SECRET-VALUE-2"],
                             capsys)
    assert code == 2 and "SECRET-VALUE-2" not in err


def test_url_credentials_are_redacted_wherever_the_spec_is_shown():
    spec = load_spec(FitSpec, None, ["input=https://crawler:SECRET-VALUE-3@data.invalid/{0..1}.tar", "output=o",
                                     "tracking.uri=http://me:SECRET-VALUE-3@127.0.0.1:5000"])
    assert spec.tracking.uri == "http://me:SECRET-VALUE-3@127.0.0.1:5000"  # the job itself still uses it
    shown = json.dumps(public_dict(spec))
    assert "SECRET-VALUE-3" not in shown and "http://***@127.0.0.1:5000" in shown


@pytest.mark.parametrize("override, field", [
    ("fit.lr_color=.nan", "fit.lr_color"),
    ("fit.lr_color=.inf", "fit.lr_color"),
    ("max_failed_fraction=.nan", "max_failed_fraction"),
    ("fit.size=8", "fit.size"),  # below SSIM's 11-pixel window
    ("fit.gaussians=100000000", "fit.gaussians"),
    ("batch_size=10000000", "batch_size"),
    ("limits.max_image_pixels=1000000000", "limits.max_image_pixels"),  # beyond PIL's own guard
    ("limits.image_formats=[PSD]", "limits.image_formats.0"),
    ("output=", "output"),
])
def test_specs_refuse_what_cannot_work(override, field, capsys):
    code, err = run_job_args(["jobs/specs/fit.local.yaml", "--set", override], capsys)
    assert code == 2 and err.startswith(f"fit.py: {field}:"), err


def test_a_list_override_works_when_the_file_has_no_list(tmp_path):
    bare = tmp_path / "train.yaml"
    bare.write_text("data: x.tar\n")
    spec = load_spec(TrainSpec, bare, ["stages.0.lr=0.002", "stages.0.epochs=3"])
    assert len(spec.stages) == 1 and spec.stages[0].kind == "contrastive"
    assert spec.stages[0].lr == 0.002 and spec.stages[0].epochs == 3
    with pytest.raises(SpecError, match="stages.1 is not an item of a 1-item list"):
        load_spec(TrainSpec, bare, ["stages.1.lr=0.002"])


def test_train_run_names_cannot_leave_the_storage_path():
    with pytest.raises(SpecError, match="^name:"):
        load_spec(TrainSpec, None, ["data=x.tar", "name=../../elsewhere"])


def test_the_log_filter_redacts_url_credentials_and_known_secrets(caplog):
    import logging

    from splatclip.platform.secrets import RedactingFilter, redact

    assert redact("s3 at https://ak:sk@minio.invalid:9000/b and http://plain.invalid/x") == \
        "s3 at https://***@minio.invalid:9000/b and http://plain.invalid/x"
    log = logging.getLogger("redaction-test")
    caplog.handler.addFilter(RedactingFilter(["KNOWN-SECRET"]))
    log.warning("uri %s, key %s", "http://u:PASS-IN-URI@h:1", "KNOWN-SECRET")
    try:
        raise ValueError("failed with KNOWN-SECRET")
    except ValueError:
        log.exception("boom")
    text = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "PASS-IN-URI" not in text and "KNOWN-SECRET" not in text and "http://***@h:1" in text


def alias_bomb(levels: int = 9) -> str:
    """Nine lists of nine aliases of the level below: 9**9 values from ten lines."""
    lines = ["a0: &a0 {x: 1, y: 2, z: 3}"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 9) -> str:
    """Mappings that merge nine copies of the level below (`<<: *m`): 9**9 entries once merged."""
    lines = ["m0: &m0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8, k8: 9}"]
    for i in range(1, levels + 1):
        lines.append(f"m{i}: &m{i}")
        lines += [f"  s{j}:\n    <<: *m{i - 1}" for j in range(9)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("source", ["aliases", "merge keys", "override", "override under an unknown key"])
def test_a_spec_that_expands_without_bound_is_refused_with_bounded_memory(tmp_path, source):
    import tracemalloc

    path, overrides = tmp_path / "spec.yaml", ["input=x", "output=y"]
    path.write_text({"aliases": "tracking:\n  tags:\n" + "".join(f"    {ln}\n" for ln in alias_bomb().splitlines()),
                     "merge keys": "unknown:\n" + "".join(f"  {ln}\n" for ln in merge_bomb().splitlines())}
                    .get(source, "input: x\noutput: y\n"))
    if source.startswith("override"):
        flow = "{a0: &a0 [1, 2, 3], " + ", ".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                   for i in range(1, 10)) + "}"
        overrides.append(("tracking.tags=" if source == "override" else "nowhere.at.all=") + flow)
    tracemalloc.start()
    try:
        with pytest.raises(SpecError, match="expands to more than 100000 values") as info:
            load_spec(FitSpec, path, overrides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 1e6:.0f} MB"  # a few MB: nothing was built from the billions
    assert len(info.value.problems) == 1


def test_a_self_referring_or_too_deep_document_is_a_spec_error(tmp_path):
    from splatclip.platform.loader import read_yaml

    with pytest.raises(SpecError, match="refers to itself"):
        read_yaml("input: &a [x, *a]", "spec.yaml")
    with pytest.raises(SpecError, match="nested too deep"):
        read_yaml("[" * 5000 + "]" * 5000, "spec.yaml")
    (tmp_path / "big.yaml").write_text("input: x\n" + "# padding\n" * 200_000)
    with pytest.raises(SpecError, match="larger than"):
        load_spec(FitSpec, tmp_path / "big.yaml")
    (tmp_path / "ok.yaml").write_text("input: &in x\noutput: y\ntracking: {tags: {source: *in}}\n"
                                      "ray: {<<: {actors: 2}}\n")  # modest aliases and merges are fine
    spec = load_spec(FitSpec, tmp_path / "ok.yaml")
    assert spec.ray.actors == 2 and spec.tracking.tags == {"source": "x"}


def test_the_fit_job_refuses_an_alias_bomb_with_exit_2_and_bounded_memory(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bomb.yaml").write_text("input: x\noutput: y\ntracking:\n  tags:\n"
                                        + "".join(f"    {ln}\n" for ln in merge_bomb().splitlines()))
    job = Path(__file__).resolve().parents[2] / "jobs" / "fit.py"
    # the process's own peak (VmHWM: ru_maxrss would carry this test process's peak over the fork)
    measured = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], "
                "run_name='__main__')\nexcept SystemExit:\n    hwm = [ln for ln in open('/proc/self/status') "
                "if ln.startswith('VmHWM')][0]\n    print('peak_kb', hwm.split()[1])\n    raise")
    proc = subprocess.run([sys.executable, "-c", measured, str(job), str(tmp_path / "bomb.yaml")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if "expands to more than" in ln], proc.stderr[-2000:]
    peak_kb = int(proc.stdout.split("peak_kb")[1])
    assert peak_kb < 256 << 10, f"{peak_kb} kB"  # the spec is refused before torch and Ray load (unbounded: 1.3 GB)
    print(f"fit.py on a merge-key bomb: exit 2, peak RSS {peak_kb / 1024:.0f} MB")
