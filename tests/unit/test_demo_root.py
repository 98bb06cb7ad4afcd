"""The demo carries on only the outputs of its own recipe: a directory another recipe (or an earlier
version, which recorded none) left is refused before any stage runs, not mixed into this one's."""

import shutil
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
sys.path.insert(0, str(DEMO))

import demo  # noqa: E402  (the demo's script, from its directory)


def test_a_directory_of_another_recipe_is_refused_and_one_of_this_recipe_carried_on(tmp_path, monkeypatch, capsys):
    root = tmp_path / "demo"
    root.mkdir()
    assert demo.other_recipe(root, "small") is None  # new: this recipe's from now on
    (root / "runs").mkdir()
    assert demo.other_recipe(root, "small") is None  # begun by this recipe: carried on
    assert "another version" in demo.other_recipe(root, "full")  # another size is another recipe
    # a spec changed since the outputs were made
    specs = tmp_path / "specs"
    shutil.copytree(demo.SPECS, specs)
    monkeypatch.setattr(demo, "SPECS", specs)
    assert demo.other_recipe(root, "small") is None
    (specs / "fit-digits.yaml").write_text((specs / "fit-digits.yaml").read_text().replace("prefilter: 0.018", "prefilter: 0.02"))
    assert "another version" in demo.other_recipe(root, "small")
    # an earlier version's directory: outputs and no record
    old = tmp_path / "old"
    (old / "splats").mkdir(parents=True)
    assert "did not record" in demo.other_recipe(old, "small")
    assert demo.main(["--small", "--root", str(old)]) == 2  # before any stage: nothing written into it
    assert "rm -rf" in capsys.readouterr().err and sorted(p.name for p in old.iterdir()) == ["splats"]
