"""What the fit job reports: a shard's record from its samples' rows, the summary over records, and
the failure budget."""

from splatclip.fit.report import SHARD_LEVEL, over_budget, shard_stats, summarize
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import FitSpec


def row(index, key, error="", psnr=30.0, notes=()):
    meta = None if error else {"psnr": psnr, "bytes": 64, "source_bytes": 500, "raw_bytes": 768, "seconds": 0.5}
    return {"index": index, "key": key, "error": error, "detail": "why" if error else "", "notes": list(notes),
            "meta": meta}


def test_a_shards_record_counts_its_samples_and_names_each_failure():
    note = {"key": "a", "member": "txt", "reason": "bad_text", "detail": ""}
    stats = shard_stats("s3://user:pw@b/x.tar", [row(0, "a", notes=[note]), row(1, "b", "undecodable"),
                                                 row(2, "c", psnr=20.0)])
    assert stats["shard"] == "s3://***@b/x.tar" and stats["status"] == "done"  # credentials never recorded
    assert (stats["images"], stats["fitted"], stats["psnr"], stats["bytes"]) == (3, 2, [30.0, 20.0], 128)
    assert stats["errors"] == [{"key": "b", "reason": "undecodable", "detail": "why"}] and stats["notes"] == [note]
    whole = shard_stats("x.tar", [{"index": SHARD_LEVEL, "key": "", "error": "unreadable_shard", "detail": "eof"}])
    assert whole["status"] == "unreadable" and whole["images"] == 0 and whole["errors"][0]["reason"] == "unreadable_shard"
    empty = shard_stats("y.tar", [{"index": SHARD_LEVEL, "key": "", "error": "empty_shard", "detail": ""}])
    assert empty["status"] == "empty" and empty["errors"] == []


def test_the_summary_and_the_budget():
    records = [shard_stats("a.tar", [row(0, "a"), row(1, "b", "undecodable")]),
               shard_stats("b.tar", [row(0, "c", psnr=20.0)]),
               shard_stats("c.tar", [{"index": SHARD_LEVEL, "key": "", "error": "unreadable_shard", "detail": ""}])]
    summary = summarize(records, ["d.tar"], [], wall=2.0, actors=1)
    assert (summary["shards"], summary["shards_done"], summary["images"], summary["fitted"]) == (4, 2, 3, 2)
    assert summary["failed_by_reason"] == {"undecodable": 1, "unreadable_shard": 1} and summary["failed"] == 1
    assert summary["psnr_mean"] == 25.0 and summary["ratio_raw"] == 768 / 64 and summary["images_per_second"] == 1.0
    spec = lambda budget: load_spec(FitSpec, None, ["input=x", "output=y", f"max_failed_fraction={budget}"])  # noqa: E731
    assert over_budget(summary, spec(0.5)) == []
    assert over_budget(summary, spec(0.2)) == ["1 of 3 images failed (budget 20.00%)",
                                               "2 of 4 shards unreadable or missing"]
    unfinished = summarize(records, [], ["e.tar"], wall=2.0, actors=1)
    assert over_budget(unfinished, spec(1.0)) == ["1 shards unfinished; rerun to complete them"]


def test_the_contact_sheet_shows_each_original_as_its_fit_saw_it(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from splatclip import pictures, splats
    from splatclip.platform.shards import write_shard

    digit = np.zeros((20, 40, 3), np.uint8)  # wider than tall, ink at both ends
    digit[6:14, 2:8] = digit[6:14, 32:38] = 255
    page = io.BytesIO()
    Image.fromarray(230 - (digit * 0.8).astype(np.uint8)).save(page, format="PNG")  # written dark on paper
    with write_shard(str(tmp_path / "src.tar")) as w:
        w.write({"__key__": "a", "png": page.getvalue()})
    with write_shard(str(tmp_path / "fit.tar")) as w:
        w.write({"__key__": "a", "splats.npy": splats.to_bytes(np.array([[0.5, 0.5, 0.1, 0, 0.1, 1, 1, 1]], np.float16))})
    (kept,), _ = pictures.fitted_pairs(str(tmp_path / "src.tar"), str(tmp_path / "fit.tar"), 20, 8)
    (seen,), (render,) = pictures.fitted_pairs(str(tmp_path / "src.tar"), str(tmp_path / "fit.tar"), 20, 8,
                                               frame="pad", ground="black")
    assert kept.shape == seen.shape == render.shape == (3, 20, 20)
    assert kept.min() > 0.85  # the crop: the empty middle of the page
    assert seen[:, :, :3].max() > 0.5 and seen[:, :, -3:].max() > 0.5 and seen[:, :4].max() == 0  # light ends on black
