"""BatchNorm statistics as a controlled variable of every frozen probe: each treatment does exactly
what it says to the running statistics of a copy and nothing else, a random init's ``reset`` is its
``saved``, and a verdict compares the pretrained network's saved figure with the strongest
random-init treatment."""

from __future__ import annotations

import math

import pytest
import torch

from recon.network.model import ReConConfig, ReConPretrain, recalibrate_batchnorm
from recon.pretraining import probes as P

TINY = {"trans_dim": 48, "num_heads": 3, "decoder_num_heads": 3, "depth": 2, "decoder_depth": 1,
        "num_group": 8, "group_size": 16, "img_feat_dim": 8, "text_feat_dim": 8}


def trained_like(seed: int = 0) -> ReConPretrain:
    """A network whose BatchNorm running statistics are neither the initial ones nor any estimate
    (every BatchNorm kind: the patch embedding's, the projection norms, the SMC head's)."""
    torch.manual_seed(seed)
    model = ReConPretrain(ReConConfig(**TINY, proj_norm="batch", targets=("rec", "img", "text", "smc"))).eval()
    for m in P.batchnorms(model):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.num_batches_tracked.fill_(11)
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bn_buffers(model: torch.nn.Module) -> set[str]:
    names = {name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {f"{n}.{b}" for n in names for b in ("running_mean", "running_var", "num_batches_tracked")}


def same_state(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_every_batchnorm_kind_is_covered():
    model = trained_like()
    buffers = bn_buffers(model)
    assert {"encoder.patch_embed.bn1.running_var", "img_norm.running_var", "text_norm.running_mean",
            "cls_proj.1.num_batches_tracked"} <= buffers and len(P.batchnorms(model)) == len(buffers) // 3
    assert not P.at_initial_statistics(model) and P.at_initial_statistics(ReConPretrain(ReConConfig(**TINY)))


def test_saved_is_an_untouched_copy():
    model = trained_like()
    before = snapshot(model)
    copy = P.with_batchnorm(model, "saved")
    assert copy is not model and copy.cfg == model.cfg and not copy.training
    assert same_state(copy.state_dict(), before, before) and same_state(model.state_dict(), before, before)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy.parameters(), model.parameters()))


def test_reset_sets_every_batchnorm_to_its_initial_statistics_and_nothing_else():
    model = trained_like()
    model.target_stats = "kept"
    before = snapshot(model)
    reset = P.with_batchnorm(model, "reset")
    after = reset.state_dict()
    buffers = bn_buffers(model)
    for m in P.batchnorms(reset):
        assert not m.running_mean.any() and bool((m.running_var == 1).all()) and int(m.num_batches_tracked) == 0
    assert P.at_initial_statistics(reset) and reset.target_stats == "kept"
    assert same_state(after, before, set(before) - buffers)               # weights and other buffers untouched
    assert same_state(model.state_dict(), before, before)                 # the original untouched
    fresh = ReConPretrain(model.cfg).state_dict()                           # = the statistics a network starts with
    assert same_state(after, fresh, buffers)


def test_recalibrated_is_recalibrate_batchnorm_on_a_copy():
    model = trained_like()
    before = snapshot(model)
    clouds = torch.rand(6, 128, 3)
    treated = P.with_batchnorm(model, "recalibrated", clouds)
    in_place = trained_like()
    recalibrate_batchnorm(in_place, clouds)
    after, expected = treated.state_dict(), in_place.state_dict()
    assert same_state(after, expected, expected)                           # exactly what precise BN computes
    buffers = bn_buffers(model)
    assert same_state(after, before, set(before) - buffers)               # weights untouched
    assert same_state(model.state_dict(), before, before)                 # the original untouched
    embed = {k for k in buffers if k.startswith(("encoder.patch_embed.", "img_norm.", "text_norm."))
             and not k.endswith("num_batches_tracked")}
    assert embed and not any(torch.equal(after[k], before[k]) for k in embed)   # re-estimated
    smc = {k for k in buffers if k.startswith("cls_proj.")}
    assert same_state(after, before, smc)                                 # off the probes' path: as saved
    assert not treated.training and not model.training
    with pytest.raises(ValueError, match="needs train clouds"):
        P.with_batchnorm(model, "recalibrated")
    with pytest.raises(ValueError, match="unknown BatchNorm treatment"):
        P.with_batchnorm(model, "frozen")


def test_per_treatment_reuses_a_random_inits_saved_and_skips_recalibration_without_clouds():
    torch.manual_seed(0)
    fresh = ReConPretrain(ReConConfig(**TINY)).eval()
    seen: list[dict] = []

    def measure(net):
        seen.append(snapshot(net))
        return {"calls": len(seen)}

    clouds = torch.rand(4, 128, 3)
    got = P.per_treatment(fresh, ["saved", "reset", "recalibrated"], clouds, measure)
    assert got == {"saved": {"calls": 1}, "reset": {"calls": 1}, "recalibrated": {"calls": 2}}   # reset = saved
    assert P.per_treatment(fresh, ["saved", "reset", "recalibrated"], None, measure) == {
        "saved": {"calls": 3}, "reset": {"calls": 3}}
    trained = trained_like()
    got = P.per_treatment(trained, ["reset", "saved"], None, measure, saved={"given": True})
    assert list(got) == ["saved", "reset"] and got["saved"] == {"given": True} and got["reset"] == {"calls": 4}
    assert P.at_initial_statistics(ReConPretrain(trained.cfg)) and not P.at_initial_statistics(trained)
    with pytest.raises(ValueError, match="unknown"):
        P.check_treatments(["saved", "frozen"])
    with pytest.raises(ValueError, match="must include 'saved'"):
        P.check_treatments(["reset", "recalibrated"])
    assert P.check_treatments(["recalibrated", "saved"]) == ["saved", "recalibrated"]


def test_verdict_is_the_saved_figure_against_the_strongest_random_init():
    v = P.verdict({"saved": 84.5, "reset": 88.5, "recalibrated": 83.0},
                  {"saved": 86.6, "reset": 86.6, "recalibrated": 81.8})
    assert v == {"pretrained": 84.5, "pretrained_treatment": "saved", "random_init": 86.6,
                 "random_init_treatment": "saved", "margin": pytest.approx(-2.1)}
    v = P.verdict({"saved": 50.0}, {"saved": 37.5, "reset": 37.5, "recalibrated": 48.5})
    assert (v["random_init"], v["random_init_treatment"], v["margin"]) == (48.5, "recalibrated", 1.5)
    assert P.strongest({"saved": math.nan, "recalibrated": 10.0}) == "recalibrated"
