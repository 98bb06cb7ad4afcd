"""The fit settings a model's training splats were made with, read from their directories' records."""

import json
import logging

from splatclip.pipelines.layout import SETTINGS, SPEED_ONLY, fit_recipe, view_of
from splatclip.platform.specs import FitParams


def record(directory, **fit) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    settings = FitParams(**fit).model_dump(exclude=SPEED_ONLY)
    (directory / SETTINGS).write_text(json.dumps({"settings": {"fit": settings, "teacher": None}}))
    return settings


def test_shards_of_one_recipe_name_it(tmp_path):
    settings = record(tmp_path / "a", gaussians=49, size=28, init="ink", prefilter=0.018)
    assert settings == record(tmp_path / "b", gaussians=49, size=28, init="ink", prefilter=0.018)
    recipe = fit_recipe([f"{tmp_path}/a/x-00000.tar", f"{tmp_path}/a/x-00001.tar", f"{tmp_path}/b/y-00000.tar"])
    assert recipe == settings and recipe["prefilter"] == 0.018 and not SPEED_ONLY & set(recipe)


def test_a_record_older_than_a_setting_reads_as_its_default(tmp_path):
    settings = record(tmp_path / "a", gaussians=16)
    del settings["prefilter"]  # written before the setting existed
    (tmp_path / "a" / SETTINGS).write_text(json.dumps({"settings": {"fit": settings}}))
    assert fit_recipe([f"{tmp_path}/a/x.tar"]) == FitParams(gaussians=16).model_dump(exclude=SPEED_ONLY)


def test_the_rgb_side_reads_source_images_as_the_record_says_they_were_fitted(tmp_path):
    record(tmp_path / "a", gaussians=49, frame="pad", ground="black", clutter="drop", stroke="thin")
    assert view_of(fit_recipe([f"{tmp_path}/a/x.tar"])) == {"frame": "pad", "ground": "black", "clutter": "drop",
                                                            "stroke": "thin"}
    settings = record(tmp_path / "old", gaussians=49, frame="pad")
    del settings["ground"], settings["clutter"], settings["stroke"]  # a record older than the settings: as they were
    (tmp_path / "old" / SETTINGS).write_text(json.dumps({"settings": {"fit": settings}}))
    assert view_of(fit_recipe([f"{tmp_path}/old/x.tar"])) == {"frame": "pad", "ground": "keep", "clutter": "keep",
                                                              "stroke": "keep"}
    assert view_of(None) == {"frame": "crop", "ground": "keep", "clutter": "keep", "stroke": "keep"}  # the defaults


def test_no_recipe_from_mixed_missing_or_damaged_records(tmp_path, caplog):
    record(tmp_path / "a", gaussians=49)
    record(tmp_path / "b", gaussians=16)
    (tmp_path / "none").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SETTINGS).write_text('{"settings": {"fit": {"gaussians": "many"}}}')
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / SETTINGS).write_text("[1, 2")
    with caplog.at_level(logging.WARNING):
        assert fit_recipe([f"{tmp_path}/a/x.tar", f"{tmp_path}/b/y.tar"]) is None
        assert "fitted with other settings" in caplog.text
        for other in ("none", "bad", "junk"):
            caplog.clear()
            assert fit_recipe([f"{tmp_path}/a/x.tar", f"{tmp_path}/{other}/y.tar"]) is None
            assert f"{other} have no fit record" in caplog.text, other
    assert fit_recipe([]) is None


def test_evaluation_names_each_setting_fitted_otherwise(caplog):
    from splatclip.pipelines.evaluate import fit_differences

    trained = FitParams(gaussians=49, init="ink", prefilter=0.018).model_dump(exclude=SPEED_ONLY)
    assert fit_differences(trained, dict(trained)) == []
    assert fit_differences(trained, None) == fit_differences(None, trained) == []  # one side unknown: nothing said
    with caplog.at_level(logging.WARNING):
        other = {**trained, "prefilter": 0.0, "init": "structured"}
        assert fit_differences(trained, other) == ["init: 'ink' in training, 'structured' here",
                                                   "prefilter: 0.018 in training, 0.0 here"]
    assert "fit.prefilter: 0.018 in training, 0.0 here" in caplog.text
