"""Stages: freezing changes exactly the intended tensors, groups carry the stage lrs, the table counts right."""

import pytest
import torch

from rice_mllm.train.stages import STAGES, apply_stage, get_stage, parameter_table
from tests.fixtures import ToyDataset, ToyMllm, ToyMllmConfig, collate


def _changed_after_step(model, groups) -> set[str]:
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW(groups)
    model(**collate([ToyDataset()[i] for i in range(2)])).loss.backward()
    optimizer.step()
    return {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}


def _names_under(model, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in model.state_dict() if n.startswith(prefixes)}


def test_stage1_changes_only_projector_and_newline():
    model = ToyMllm(ToyMllmConfig())
    changed = _changed_after_step(model, apply_stage(model, get_stage("stage1_align")))
    assert changed == _names_under(model, ("projector.", "image_newline"))


def test_stage2_with_optional_vision_changes_everything_but_the_unused_parameters():
    model = ToyMllm(ToyMllmConfig())
    groups = apply_stage(model, get_stage("stage2_instruct"), ["vision"], weight_decay=0.1)
    changed = _changed_after_step(model, groups)
    unused = _names_under(model, ("vision_tower.post_layernorm.",))  # the toy never reaches the pooled-CLS norm
    assert unused and unused == set(model.unused_parameter_names())
    assert changed == _names_under(model, ("projector.", "image_newline", "language_model.", "vision_tower.")) - unused
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in unused)  # frozen, so wd can't move it


def test_stage2_without_optional_keeps_vision_frozen():
    model = ToyMllm(ToyMllmConfig())
    changed = _changed_after_step(model, apply_stage(model, get_stage("stage2_instruct")))
    assert not changed & _names_under(model, ("vision_tower.",))
    assert _names_under(model, ("language_model.",)) <= changed


def test_groups_carry_stage_lrs_and_no_decay_on_vectors():
    model = ToyMllm(ToyMllmConfig())
    groups = apply_stage(model, get_stage("stage2_instruct"), ["vision"], weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    expected_lr = {"vision_tower": 2e-6, "projector": 1e-5, "language_model": 1e-5}
    for name, p in model.named_parameters():
        if name in model.unused_parameter_names():
            continue
        top = name.split(".")[0]
        lr = expected_lr.get(top, 1e-5)  # image_newline: 1e-5
        assert by_id[id(p)]["lr"] == lr, name
        assert by_id[id(p)]["weight_decay"] == (0.0 if p.ndim == 1 else 0.1), name
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # no parameter in two groups
    assert set(model.state_dict()) - {n for n, p in model.named_parameters() if id(p) in by_id} == set(
        model.unused_parameter_names()
    )


def test_unknown_stage_and_optional_part_name_the_valid_ones():
    with pytest.raises(KeyError, match="stage1_align"):
        get_stage("stage9")
    with pytest.raises(KeyError, match="vision"):
        apply_stage(ToyMllm(ToyMllmConfig()), STAGES["stage1_align"], ["vision"])


def test_missing_part_is_an_error():
    model = ToyMllm(ToyMllmConfig())
    del model.projector
    with pytest.raises(KeyError, match="projector"):
        apply_stage(model, get_stage("stage1_align"))


def test_parameter_table_counts():
    model = ToyMllm(ToyMllmConfig())
    apply_stage(model, get_stage("stage1_align"))
    rows = {line.split()[0]: line.split()[1:] for line in parameter_table(model).splitlines()[1:-1]}
    projector = sum(p.numel() for p in model.projector.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert rows["projector"] == [f"{projector:,}", f"{projector:,}"]
    assert rows["llm"] == ["0", f"{llm:,}"]
    assert rows["total"] == [f"{projector + model.image_newline.numel():,}", f"{total:,}"]


def test_lr_scale_multiplies_every_stage_lr():
    model = ToyMllm(ToyMllmConfig())
    stage = get_stage("stage2_instruct")
    groups = apply_stage(model, stage, ["vision"], lr_scale=100.0)
    expected = {**stage.train, **stage.optional}
    assert {g["name"].removesuffix("_no_decay"): g["lr"] for g in groups} == {
        part: lr * 100.0 for part, lr in expected.items()
    }
