"""The demo's teacher recipe (examples/demo/specs/teacher.yaml) learns: its model config (inputs
framed by their ink included), loss (class positives), options (a zoom after the framing),
optimizer and schedule of its first stage, through the train job's own pieces, at a reduced size."""

from pathlib import Path

import torch

from splatclip import datasets
from splatclip.models.gsclip import from_open_clip
from splatclip.models.zeroshot import class_embeddings, load_templates, topk_correct
from splatclip.pipelines.samples import SampleFormat, Skipped, collate, decode_sample
from splatclip.models.objectives import OBJECTIVES, settings
from splatclip.train.loop import warmup_cosine
from splatclip.platform.loader import load_spec
from splatclip.platform.specs import TrainSpec

TEACHER = Path(__file__).resolve().parents[2] / "examples" / "demo" / "specs" / "teacher.yaml"
STEPS, TRAIN, TEST = 100, 500, 200
STATED_TOP1 = 0.5  # chance is 0.1; measured 0.595 here with the reframe, 0.715 without (the full demo: >= 0.90)


def digits(split: str, n: int, size: int) -> list[dict]:
    skipped = Skipped()
    out = [decode_sample(s, SampleFormat(encoder="rgb", image_size=size, classes=10), skipped) for s in datasets.digits(split, limit=n)]
    assert not skipped.reasons
    return out


def test_demo_teacher_recipe_learns():
    torch.manual_seed(0)
    recipe = load_spec(TrainSpec, TEACHER, ["data=unused"])
    stage = recipe.stages[0]
    model = from_open_clip(recipe.model.name, None, recipe.model)
    size = model.clip.visual.image_size[0]
    train, test = digits("train", TRAIN, size), digits("test", TEST, size)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(stage.warmup_steps, STEPS))
    order = torch.Generator().manual_seed(0)
    contrastive = OBJECTIVES[stage.kind](settings(stage.kind, stage.options))
    for _ in range(STEPS):
        idx = torch.randint(0, TRAIN, (recipe.batch_size,), generator=order)
        batch = collate([train[i] for i in idx], model.tokenizer, size, recipe.positives)
        loss = contrastive(model, batch, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        classes = class_embeddings(model.encode_text, model.tokenizer, datasets.DIGIT_CLASSES, load_templates("digits"))
        images = model.encode_image(torch.stack([s["image"] for s in test]))
        top1 = topk_correct(images, classes, torch.tensor([s["label"] for s in test]), ks=(1,))[1] / TEST
    print(f"teacher recipe, {STEPS} steps on {TRAIN} digits: top-1 {top1:.3f} on {TEST} held-out digits")
    assert top1 >= STATED_TOP1
