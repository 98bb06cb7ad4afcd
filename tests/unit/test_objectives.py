"""The objectives a stage names: looked up by name, checked against the spec, the losses they stand for."""

import pytest
import torch
import torch.nn.functional as F

from splatclip.models.augment import Augment, augment_images, augment_splats, draw
from splatclip.models.backbone import embed_images, normalize_images, patch_tokens
from splatclip.models.gsclip import from_open_clip, through_vit
from splatclip.models.losses import clip_loss, distill_loss
from splatclip.models.objectives import OBJECTIVES, NoSettings, Objective, register, settings, stage_problems
from splatclip.platform.specs import ModelSpec, StageSpec, TrainSpec
from splatclip.train.job import TrainJob
from splatclip.warps import canonical_images


def stages(*kinds: str, **options) -> list[StageSpec]:
    return [StageSpec(kind=k, options=options.get(k, {})) for k in kinds]


def test_a_spec_names_known_objectives_for_its_encoder():
    assert stage_problems(stages("distill", "contrastive"), "splat", True) == []
    assert stage_problems(stages("contrastive"), "rgb", False) == []
    assert stage_problems(stages("distill"), "rgb", False) == ["stages.0.kind: distill trains the splat encoder, not rgb"]
    assert stage_problems(stages("contrastive", "diffusion"), "splat", False) == [
        "stages.1.kind: 'diffusion' is no objective (known: contrastive, distill)"]
    assert stage_problems(stages("contrastive"), "splat", True) == [
        "images: no stage reads the source images (objectives that do: distill)"]


def test_a_stage_sets_its_objectives_own_settings_and_nothing_else():
    assert settings("distill", {}).normalize and not settings("distill", {"normalize": False}).normalize
    assert stage_problems(stages("distill", distill={"normalize": False}), "splat", False) == []
    assert stage_problems(stages("distill", distill={"normalise": False}), "splat", False) == [
        "stages.0.options.normalise: Extra inputs are not permitted (distill takes normalize, augment, tokens)"]
    assert stage_problems(stages("contrastive", contrastive={"temperature": 0.1}), "splat", False) == [
        "stages.0.options.temperature: Extra inputs are not permitted (contrastive takes augment)"]


def test_augmentation_is_refused_where_it_would_not_be_exact_or_paired():
    augment = {"augment": {"rotate": 10, "blur": 0.02}}
    assert stage_problems(stages("distill", distill=augment), "splat", True) == []
    assert stage_problems(stages("contrastive", contrastive=augment), "splat", False) == []
    assert stage_problems(stages("distill", distill=augment), "splat", False) == [
        "stages.0.options.augment: the stored teacher embeddings are of the untransformed images; augmenting "
        "distillation needs the source images (`images:`), which the teacher embeds after the same transform as "
        "the splats"]
    assert stage_problems(stages("distill", distill={"tokens": 1.0}), "splat", False) == [
        "stages.0.options.tokens: the teacher's patch tokens come from the source images (`images:`); the shards' "
        "stored teacher embeddings do not hold them"]
    reframe = {"augment": {"reframe": 1.3}}  # a zoom after a framing that only a framing model does
    assert stage_problems(stages("contrastive", contrastive=reframe), "rgb", False, framed=True) == []
    assert stage_problems(stages("contrastive", contrastive=reframe), "rgb", False) == [
        "stages.0.options.augment.reframe: a zoom after the model's framing by its ink, which this model does not "
        "do; set model.canonical_spread"]
    stroke = {"augment": {"stroke": 0.04}}
    assert stage_problems(stages("contrastive", contrastive=stroke), "rgb", False) == []
    assert stage_problems(stages("contrastive", contrastive=stroke), "splat", False) == [
        "stages.0.options.augment.stroke: a change of stroke width has no exact form on splats; it augments the "
        "RGB encoder's images only"]


def test_a_new_objective_is_one_registered_class():
    class AlignmentSettings(NoSettings):
        target: float = 1.0

    @register
    class Alignment(Objective):
        name = "alignment_test"
        Settings = AlignmentSettings

        def __call__(self, model, batch, device):
            return (model.encode_splats(batch["params"], batch["mask"]) - self.settings.target).square().mean()

    try:
        assert stage_problems(stages("distill", "alignment_test", alignment_test={"target": 0.5}), "splat", False) == []
        assert Alignment(settings("alignment_test", {"target": 0.5})).settings.target == 0.5
        assert OBJECTIVES["alignment_test"] is Alignment and not Alignment.global_batch
    finally:
        del OBJECTIVES["alignment_test"]


def batch(b=4, n=12, dim=None):
    g = torch.Generator().manual_seed(0)
    params = torch.rand(b, n, 8, generator=g)
    params[..., 2:5] = 0.05
    out = {"params": params, "mask": torch.ones(b, n, dtype=torch.bool), "positive_ids": torch.tensor([0, 1, 0, 2])}
    if dim:
        out["teacher"] = torch.randn(b, dim, generator=g)
    return out


def test_the_objectives_are_the_losses_they_name():
    torch.manual_seed(0)
    model = from_open_clip("demo-vit", None, ModelSpec(name="demo-vit", latents=4, resampler_layers=1,
                                                      resampler_width=32, fourier_bands=2))
    model.eval()
    cpu = torch.device("cpu")
    data = batch(dim=model.clip.visual.output_dim)
    data["tokens"] = model.tokenizer(["a", "b", "a", "c"])
    with torch.no_grad():
        want = distill_loss(model.splat_features(data["params"], data["mask"]), data["teacher"])
        assert torch.allclose(OBJECTIVES["distill"]()(model, data, cpu), want)
        raw = distill_loss(model.splat_features(data["params"], data["mask"]), data["teacher"], normalize=False)
        assert torch.allclose(OBJECTIVES["distill"](settings("distill", {"normalize": False}))(model, data, cpu), raw)
        assert not torch.allclose(raw, want)
        want = clip_loss(model.encode_splats(data["params"], data["mask"]), model.encode_text(data["tokens"]),
                         model.logit_scale, data["positive_ids"])
        assert torch.allclose(OBJECTIVES["contrastive"]()(model, data, cpu), want)
    assert OBJECTIVES["contrastive"].global_batch and not OBJECTIVES["distill"].global_batch


def student_and_teacher(latents: int):
    """A small splat student and an RGB teacher on demo-vit (16 patches), and a batch with its source images."""
    torch.manual_seed(0)
    spec = ModelSpec(name="demo-vit", latents=latents, resampler_layers=1, resampler_width=32, fourier_bands=2)
    model, teacher = from_open_clip("demo-vit", None, spec), from_open_clip("demo-vit", None, spec).clip
    model.eval(), teacher.eval()
    data = batch()
    data["images"] = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, teacher, data


def test_augmented_distillation_shows_the_teacher_the_splats_transform():
    """One draw per batch moves the student's splats and the teacher's source images alike."""
    model, teacher, data = student_and_teacher(latents=4)
    augment = Augment(rotate=30, shift=0.1, blur=0.05, gain=(0.5, 1.5))
    objective = OBJECTIVES["distill"](settings("distill", {"augment": augment.model_dump()}), teacher)
    with torch.no_grad():
        torch.manual_seed(7)
        loss = objective(model, data, torch.device("cpu"))
        torch.manual_seed(7)
        d = draw(augment, 4)
        want = distill_loss(model.splat_features(augment_splats(data["params"], d), data["mask"]),
                            embed_images(teacher, augment_images(data["images"], d)))
        plain = OBJECTIVES["distill"](settings("distill", {}), teacher)(model, data, torch.device("cpu"))
    assert torch.allclose(loss, want) and not torch.allclose(loss, plain)


def test_token_distillation_matches_the_students_tokens_to_the_teachers_patches():
    """The teacher's patch tokens run through its own blocks give its image embedding, so they are what
    the student's tokens can stand in for; the loss adds their relative squared error to the embeddings'."""
    model, teacher, data = student_and_teacher(latents=16)
    want = patch_tokens(teacher, data["images"])  # [4, 16, 128]
    torch.testing.assert_close(F.normalize(through_vit(teacher.visual, want), dim=-1),
                               F.normalize(teacher.encode_image(normalize_images(teacher, data["images"])), dim=-1))
    with torch.no_grad():
        loss = OBJECTIVES["distill"](settings("distill", {"tokens": 0.5}), teacher)(model, data, torch.device("cpu"))
        tokens = model.splat_tokens(data["params"], data["mask"])
        expected = (distill_loss(through_vit(model.clip.visual, tokens), embed_images(teacher, data["images"]))
                    + 0.5 * F.mse_loss(tokens, want) / want.pow(2).mean())
    torch.testing.assert_close(loss, expected)
    fewer, _, _ = student_and_teacher(latents=4)
    with pytest.raises(ValueError, match="the student makes 4 tokens .* the teacher's image tower 16 patches"):
        OBJECTIVES["distill"](settings("distill", {"tokens": 0.5}), teacher)(fewer, data, torch.device("cpu"))


def test_a_reframed_distillation_zooms_the_students_splats_and_the_teachers_view_alike():
    """With the model framing its input by its ink, `reframe` zooms after that framing: the student's
    splats and the image the teacher embeds by one factor per sample."""
    model, teacher, data = student_and_teacher(latents=4)
    framed = from_open_clip("demo-vit", None, ModelSpec(name="demo-vit", latents=4, resampler_layers=1,
                                                        resampler_width=32, fourier_bands=2, canonical_spread=0.2))
    framed.splat.load_state_dict(model.splat.state_dict())
    framed.eval()
    augment = Augment(reframe=1.5)
    objective = OBJECTIVES["distill"](settings("distill", {"augment": augment.model_dump()}), teacher)
    with torch.no_grad():
        torch.manual_seed(7)
        loss = objective(framed, data, torch.device("cpu"))
        torch.manual_seed(7)
        z = draw(augment, 4).reframe  # [4]
        assert ((z >= 1 / 1.5) & (z <= 1.5)).all() and (z != 1).all()
        want = distill_loss(framed.splat_features(data["params"], data["mask"], z),
                            embed_images(teacher, canonical_images(data["images"], 0.2 * z)))
        plain = OBJECTIVES["distill"](settings("distill", {}), teacher)(framed, data, torch.device("cpu"))
    assert torch.allclose(loss, want) and not torch.allclose(loss, plain)


@pytest.mark.parametrize("view", [{"canonical_spread": 0.2}, {"canonical_level": 0.85}])
def test_a_model_that_frames_or_levels_its_inputs_distils_from_the_source_images(tmp_path, view):
    spec = TrainSpec(data=str(tmp_path / "s-{0..1}.tar"), storage_path=str(tmp_path / "runs"),
                     model={"name": "demo-vit", **view}, stages=[{"kind": "distill"}])
    name = next(iter(view))
    assert [p for p in TrainJob(spec).check() if p.startswith("model.")] == [
        f"model.{name}: stored teacher embeddings are of the images as they are, not as this model sees them; set "
        "images, so that the teacher embeds each image as the model sees it"]
    with_images = spec.model_copy(update={"images": str(tmp_path / "i-{0..1}.tar")})
    assert [p for p in TrainJob(with_images).check() if p.startswith("model.")] == []
