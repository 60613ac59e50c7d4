"""The one training recipe against naive references, the run config file, the loss parameters it
carries, and mining across ranks under DDP."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import train_embed
from retrieval.config import FIELDS, TrainConfig, read_config_file
from retrieval.errors import UserError
from retrieval.models.model import ModelConfig, create_model
from retrieval.training import recipe
from retrieval.training.losses import create_loss

from .conftest import ROOT


def naive_factor(step, steps_per_epoch, epochs, warmup_epochs):
    """The schedule as the README states it: flat while frozen, then cosine from 1 to 0.01."""
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return 1.0
    t = (step - warmup) / (epochs * steps_per_epoch - warmup)
    return 0.01 + 0.99 * (math.cos(math.pi * min(t, 1.0)) + 1) / 2


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_schedule_matches_the_naive_reference(warmup):
    plan = recipe.Recipe(warmup_epochs=warmup)
    factors = [recipe.lr_factor(s, 7, 5, plan) for s in range(36)]
    assert factors == pytest.approx([naive_factor(s, 7, 5, warmup) for s in range(36)])
    assert factors[35] == pytest.approx(0.01) and max(factors) == 1.0
    constant = recipe.Recipe(warmup_epochs=warmup, schedule="constant")
    assert {recipe.lr_factor(s, 7, 5, constant) for s in range(36)} == {1.0}


def test_groups_hold_every_parameter_once_with_its_rate():
    model = create_model(ModelConfig(embedding_dim=16), pretrained=False)
    loss = create_loss("arcface", 5, 16).loss
    head = torch.nn.Linear(16, 3)
    plan = recipe.Recipe(lr=1.0, head_lr=2.0, loss_lr=3.0, weight_decay=0.5)
    groups = recipe.param_groups(model, plan, loss, extra_head=head.parameters())
    seen = [id(p) for g in groups.values() for p in g["params"]]
    expected = [*model.parameters(), *loss.parameters(), *head.parameters()]
    assert sorted(seen) == sorted(id(p) for p in expected)  # each exactly once
    rates = {name: g["lr"] for name, g in groups.items()}
    assert rates == {"backbone": 1.0, "pool": 2.0, "neck": 2.0, "loss": 3.0}
    optimizer = recipe.create_optimizer(groups.values(), plan)
    decay = {g["lr"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {1.0: 0.5, 2.0: 0.5, 3.0: 0.0}  # no decay on the loss's class centres


def test_a_frozen_backbone_gets_no_gradient_and_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    model = create_model(ModelConfig(embedding_dim=8), pretrained=False)
    model.train()
    recipe.set_backbone_frozen(model, True)
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.neck.parameters())
    for key, value in model.backbone.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key
    recipe.set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_freeze_bn_keeps_the_statistics_of_a_training_backbone(freeze_bn):
    torch.manual_seed(0)
    model = create_model(ModelConfig(embedding_dim=8), pretrained=False)
    model.train()
    recipe.set_backbone_frozen(model, False, freeze_bn=freeze_bn)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    after = model.backbone.state_dict()
    stats = [k for k in before if "running_mean" in k or "running_var" in k]
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])  # it trains
    assert all(torch.equal(before[k], after[k]) for k in stats) == freeze_bn


def test_loss_parameters_come_from_the_config():
    config = TrainConfig(arcface_margin=20.0, arcface_scale=10.0, sub_centers=5, triplet_margin=0.3)
    arcface = create_loss("arcface", 4, 8, **config.loss_params()).loss
    assert arcface.margin == pytest.approx(math.radians(20)) and arcface.scale == 10
    subcenter = create_loss("subcenter-arcface", 4, 8, **config.loss_params()).loss
    assert subcenter.sub_centers == 5 and subcenter.W.shape == (8, 20)
    triplet = create_loss("triplet", 4, 8, **config.loss_params())
    assert triplet.loss.margin == 0.3 and triplet.miner.margin == 0.3


def test_every_config_field_has_a_flag():
    dests = {action.dest for action in train_embed.build_parser()._actions}
    assert set(FIELDS) <= dests, sorted(set(FIELDS) - dests)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_fields_and_flags_override_it(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"epochs": 7, "arcface_margin": 20.0, "loss": "subcenter-arcface", "image_size": 96}
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("\n".join(f"{k}: {v}" for k, v in values.items()) + "\n")
    args = train_embed.parse_args(["--gallery", "g", "--config", str(path), "--epochs", "3"])
    config = TrainConfig.from_dict(vars(args))
    assert (config.epochs, config.arcface_margin, config.loss, config.image_size) == \
        (3, 20.0, "subcenter-arcface", 96)  # the flag beat the file, the file beat the defaults
    assert config.lr == TrainConfig().lr


@pytest.mark.parametrize("text, expected", [
    ("epochs: 5\nepoch: 3\n", "unknown field(s) epoch"),
    ("epochs: many\n", "epochs"),
    ("loss: softmax\n", "loss"),
    ("- epochs\n", "must map field names"),
    ("epochs: [\n", "cannot read config file"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        read_config_file(path)
    assert "\n" not in str(err.value)


def test_help_starts_without_loading_torch():
    """train_embed.py --help (and argument errors) must not wait for torch and timm to import."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train_embed.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--config" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "timm", "faiss", "pandas", "albumentations"}, imported


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MINING_ACROSS_RANKS = r"""
import os, sys, torch, torch.distributed as dist
from retrieval.training.losses import create_loss
rank, port, wrapped = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(rank)
# each rank holds one image of identities 0 and 1: positives exist only across ranks
embeddings = torch.nn.functional.normalize(torch.randn(2, 8), dim=1).requires_grad_()
labels = torch.tensor([0, 1])
spec = create_loss("triplet", 2, 8, triplet_margin=0.5, distributed=wrapped)
loss = spec.loss(embeddings, labels, spec.miner(embeddings, labels))
print(f"loss {float(loss):.6f}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("wrapped", [False, True])
def test_pair_losses_mine_across_ranks_under_ddp(wrapped):
    """Within one rank's batch there is no positive pair, so a per-rank triplet loss is 0; the
    wrapped loss (what training uses under DDP) gathers both ranks and finds the triplets."""
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-c", MINING_ACROSS_RANKS, str(r), port,
                               "1" if wrapped else "0"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [err[-1500:] for _, err in outputs]
    losses = [float(out.split()[-1]) for out, _ in outputs]
    if wrapped:
        assert all(value > 0 for value in losses)
    else:
        assert losses == [0.0, 0.0]


def test_layer_decay_gives_each_backbone_block_a_geometric_rate():
    """layer_decay 0.5: the backbone's last block at lr, the stem lowest, every rate lr * 0.5^n,
    and still every parameter exactly once (the layering is timm's own)."""
    model = create_model(ModelConfig(embedding_dim=16), pretrained=False)
    loss = create_loss("arcface", 5, 16).loss
    plan = recipe.Recipe(lr=1.0, head_lr=2.0, loss_lr=3.0, layer_decay=0.5)
    groups = recipe.param_groups(model, plan, loss)
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in [*model.parameters(), *loss.parameters()])
    backbone = recipe.backbone_groups(groups)
    rates = sorted({g["lr"] for g in backbone})
    assert groups["backbone"]["lr"] == 1.0 == rates[-1] and len(rates) > 5
    for rate in rates:
        assert math.log2(rate) == pytest.approx(round(math.log2(rate)))  # a power of 0.5
    stem = next(p for name, p in model.backbone.named_parameters() if name.startswith("conv_stem"))
    stem_rate = next(g["lr"] for g in backbone if any(p is stem for p in g["params"]))
    assert stem_rate == rates[0]
    assert {g["lr"] for name, g in groups.items() if not name.startswith("backbone")} == {2.0, 3.0}


def test_trainable_blocks_release_only_the_last_blocks_of_the_backbone():
    """Partial fine-tuning: after the warm-up only the last N of timm's fine-grained groups learn;
    the earlier blocks keep their weights and BatchNorm statistics even with freeze_bn off."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(embedding_dim=8), pretrained=False)
    model.train()
    recipe.set_backbone_frozen(model, False, freeze_bn=False, trainable_blocks=1)
    learning = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert "conv_head.weight" in learning and "blocks.6.0.conv_pw.weight" in learning
    assert "conv_stem.weight" not in learning and "blocks.5.3.conv_pw.weight" not in learning
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
    optimizer.step()
    after = model.backbone.state_dict()
    assert torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
    assert torch.equal(before["blocks.0.0.bn1.running_mean"], after["blocks.0.0.bn1.running_mean"])
    assert not torch.equal(before["conv_head.weight"], after["conv_head.weight"])
    assert not torch.equal(before["bn2.running_mean"], after["bn2.running_mean"])  # released BN adapts
    more = recipe.released_parameters(model.backbone, 5)
    assert learning < more < recipe.released_parameters(model.backbone, 0)
    assert "blocks.5.0.conv_pw.weight" in more and "blocks.4.2.conv_pw.weight" not in more
    assert recipe.Recipe.from_config(TrainConfig(trainable_blocks=5)).trainable_blocks == 5


def test_partial_epochs_release_the_whole_backbone_after_them():
    """Gradual unfreezing: warm-up frozen, then the last blocks only for partial_epochs, then all."""
    plan = recipe.Recipe(warmup_epochs=1, trainable_blocks=2, partial_epochs=3)
    assert [recipe.released_blocks(e, plan) for e in range(1, 6)] == [2, 2, 2, 0, 0]
    to_the_end = recipe.Recipe(warmup_epochs=1, trainable_blocks=2)
    assert {recipe.released_blocks(e, to_the_end) for e in range(1, 20)} == {2}
    assert recipe.released_blocks(3, recipe.Recipe(partial_epochs=3)) == 0  # no blocks: all
    config = TrainConfig.from_dict({"trainable_blocks": 1, "partial_epochs": 7})
    assert recipe.Recipe.from_config(config).partial_epochs == 7


def test_several_depths_are_a_choice_one_depth_is_the_number(tmp_path):
    """``--trainable-blocks 0 1`` (flag or config file) asks selection to choose; one value is that
    depth; a bad value is one line. A recipe is always one depth: the choice is the trainer's."""
    args = train_embed.parse_args(["--gallery", "g", "--trainable-blocks", "0", "1"])
    assert TrainConfig.from_dict(vars(args)).depth_choices() == [0, 1]
    args = train_embed.parse_args(["--gallery", "g", "--trainable-blocks", "2"])
    assert TrainConfig.from_dict(vars(args)).trainable_blocks == 2
    path = tmp_path / "run.yaml"
    path.write_text("trainable_blocks: [1, 0, 1]\n")
    assert TrainConfig.from_dict(read_config_file(path)).depth_choices() == [1, 0]
    for bad in ([], [-1], "1", [True]):
        with pytest.raises(UserError, match="trainable_blocks must be"):
            TrainConfig(trainable_blocks=bad)
    with pytest.raises(ValueError, match="one recipe per depth"):
        recipe.Recipe.from_config(TrainConfig(trainable_blocks=[0, 1]))


def test_l2_sp_pull_matches_the_naive_formula_and_replaces_the_backbone_decay():
    """L2-SP, decoupled: after each AdamW step a backbone weight moves by -lr * strength * (w -
    w_start) at its group's current rate; the head is not pulled; the backbone's decay towards zero
    is off (the pull replaces it), the other groups keep theirs."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(embedding_dim=8), pretrained=False)
    plan = recipe.Recipe(lr=0.1, head_lr=0.2, l2_sp=3.0)
    groups = recipe.param_groups(model, plan)
    assert [g.get("weight_decay") for g in recipe.backbone_groups(groups)] == [0.0]
    assert "weight_decay" not in groups["neck"]
    optimizer = recipe.create_optimizer(groups.values(), plan)
    pull = recipe.StartingPointPull(optimizer, model.backbone.parameters(), plan.l2_sp)
    start = [p.detach().clone() for p in model.parameters()]
    backbone = {id(p) for p in model.backbone.parameters()}
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32)).square().sum().backward()
        optimizer.step()
        stepped = [p.detach().clone() for p in model.parameters()]
        optimizer.param_groups[0]["lr"] *= 0.5  # a scheduler moving the rate between steps
        pull.step()
        rate = optimizer.param_groups[0]["lr"] * 3.0
        for p, s, w0 in zip(model.parameters(), stepped, start):
            expected = s - rate * (s - w0) if id(p) in backbone else s
            assert torch.allclose(p, expected, atol=1e-7)
        optimizer.zero_grad()


def test_l2_sp_is_a_config_field_with_a_flag_and_refuses_a_negative_strength():
    args = train_embed.build_parser().parse_args(["--gallery", "x", "--l2-sp", "30"])
    assert TrainConfig.from_dict(vars(args)).l2_sp == 30.0
    assert TrainConfig().l2_sp == 0.0
    with pytest.raises(UserError, match="l2_sp"):
        TrainConfig(l2_sp=-1.0)


def test_a_step_the_grad_scaler_skips_is_not_followed_by_the_pull():
    """GradScaler skips an optimiser step on inf gradients and lowers its scale; the L2-SP pull
    that follows each step must see that (``recipe.scaler_stepped``), on CPU's scaler too."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    stepped = []
    for gradient in (torch.full((3,), float("inf")), torch.ones(3)):
        before, scale = weight.detach().clone(), scaler.get_scale()
        optimizer.zero_grad()
        scaler.scale((weight * gradient).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        stepped.append(recipe.scaler_stepped(scaler, scale))
        assert stepped[-1] == (not torch.equal(weight.detach(), before))  # agrees with the weights
    assert stepped == [False, True]
    assert recipe.scaler_stepped(torch.amp.GradScaler("cpu", enabled=False), 1.0)
