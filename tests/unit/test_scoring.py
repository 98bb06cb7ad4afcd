"""Zero-shot scoring on labeled shards: every usable labeled sample scored once, the rest skipped and
counted, and the accuracy the same as computed by hand from the embeddings."""

import numpy as np
import pytest
import torch

from splatclip import datasets
from splatclip.models.zeroshot import class_embeddings, load_templates, topk_correct
from splatclip.pipelines.samples import SampleFormat, ShardSet
from splatclip.pipelines.scoring import LabeledSet, embed, zero_shot
from splatclip.platform.shards import write_shard
from test_models import tiny
from test_samples import good_splats


def labeled_shards(tmp_path) -> str:
    for s in range(2):
        with write_shard(str(tmp_path / f"eval-{s}.tar")) as w:
            for i in range(6):
                sample = {"__key__": f"k{s}{i}", "splats.npy": good_splats(3 + i), "cls": str((s * 6 + i) % 10).encode()}
                if i == 5:
                    sample["cls"] = b"11"  # beyond the 10 digit classes: skipped
                w.write(sample)  # no caption: evaluation needs none
    return f"{tmp_path}/eval-{{0..1}}.tar"


def test_zero_shot_scores_every_labeled_sample_once(tmp_path):
    model = tiny()
    model.eval()
    data = labeled_shards(tmp_path)
    result = zero_shot(model, LabeledSet(data, "digits", "digits"), batch_size=4)
    assert result["images"] == 10 and result["skipped"] == {"bad_class": 2}
    urls = (str(tmp_path / "eval-0.tar"), str(tmp_path / "eval-1.tar"))
    fmt = SampleFormat(image_size=model.clip.visual.image_size[0], need_text=False, classes=10)
    feats, labels, _ = embed(model, ShardSet(urls), fmt, batch_size=3)  # batches of another size: the same
    assert sorted(labels.tolist()) == [0, 0, 1, 2, 3, 4, 6, 7, 8, 9]
    with torch.no_grad():
        text = class_embeddings(model.encode_text, model.tokenizer, datasets.DIGIT_CLASSES, load_templates("digits"))
    hits = topk_correct(feats, text, labels, ks=(1, 5))
    assert np.isclose(result["top1"], hits[1] / 10) and np.isclose(result["top5"], hits[5] / 10)


def test_no_matching_shard_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        zero_shot(tiny(), LabeledSet(f"{tmp_path}/none-{{0..1}}.tar", "digits", "digits"), batch_size=4)
