"""SVM, zero-shot and few-shot evaluations: known answers on small stores, deterministic,
class-balanced episodes, and the evaluate stage end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.convert import Sample, write_classification_store
from pipeline.store import ArraySpec, StoreWriter
from recon.downstream import evaluate as E
from recon.downstream.cls_data import ClsData, load_classification
from recon.downstream.recipes import FinetuneParams
from recon.network.model import ReConConfig, ReConPretrain
from recon.network.pointops import fps_indices
from recon.pretraining import probes as P

K, T, D = 3, 4, 8



def make_store(path, per_class: int = 4, classes: int = K, points: int = 64, seed: int = 0):
    """Train and test shapes whose x coordinates sit at ``label + 2`` (a label the stub can read)."""
    rng = np.random.default_rng(seed)
    samples = []
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class):
                pts = rng.uniform(-1, 1, size=(points, 3)).astype(np.float32)
                pts[:, 0] = c + 2 + 0.01 * pts[:, 0]
                samples.append(Sample(f"{split}-{c}-{i}", split, c, lambda a=pts: a))
    return write_classification_store(path, samples, [f"cat{c}" for c in range(classes)], points,
                                      {"format": "test"}, log=lambda *_: None, fps=fps_indices).path


def make_text_store(path, teacher: str, protos: np.ndarray, names: list[str]):
    """Text store: features [C, T, D] whose template sum points along ``protos``."""
    rng = np.random.default_rng(1)
    feats = protos[:, None, :] / T + 0.01 * rng.normal(size=(len(names), T, protos.shape[1]))
    w = StoreWriter.open(path, names, {"features": ArraySpec((T, protos.shape[1]), "float16", len(names))},
                         {"teacher": teacher}, log=lambda *_: None)
    w.write_rows(np.arange(len(names)), {"features": feats.astype(np.float16)}, np.ones(len(names), bool))
    w.finalise()
    return path


def make_image_store(path, teacher: str):
    w = StoreWriter.open(path, ["s0"], {"features": ArraySpec((1, 1, D), "float16", 1)}, {"teacher": teacher},
                         log=lambda *_: None)
    w.write_rows(np.arange(1), {"features": np.zeros((1, 1, 1, D), np.float16)}, np.ones(1, bool))
    w.finalise()
    return path


class LabelReader(nn.Module):
    """A stand-in encoder: TXT = the true class prototype, IMG = the next class's prototype."""

    def __init__(self, protos: np.ndarray):
        super().__init__()
        self.protos = torch.from_numpy(protos.astype(np.float32))

    def zero_shot_features(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label = (points[..., 0].mean(1) - 2).round().long()
        return self.protos[(label + 1) % len(self.protos)], self.protos[label]


def test_svm_separable_features_give_100():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = np.eye(4)[y] * 5 + 0.1 * rng.normal(size=(40, 4))
    assert P.svm_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == (100.0, 100.0)
    assert P.SVM_C == 0.075


def test_topk_and_text_space():
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3]])
    assert E.topk_accuracy(scores, np.array([2, 0]), 1) == 50.0
    assert E.topk_accuracy(scores, np.array([2, 0]), 2) == 100.0
    assert E.topk_accuracy(scores, np.array([2, 0]), 5) == 100.0          # k capped at the class count
    assert E.shares_text_space({"teacher": "open_clip:ViT-B-32"}, {"teacher": "open_clip:ViT-B-32"})
    assert not E.shares_text_space({"teacher": "open_clip:ViT-L-14"}, {"teacher": "open_clip:ViT-B-32"})
    assert not E.shares_text_space({"teacher": "timm:vit_base_patch16_224"}, {"teacher": "open_clip:ViT-B-32"})
    assert not E.shares_text_space(None, {"teacher": "open_clip:ViT-B-32"})


def test_zero_shot_known_answer(tmp_path):
    store = make_store(tmp_path / "d.zarr")
    test = load_classification(store, "test")
    protos = np.eye(K, D) * 3
    names = ["other", *test.class_names]                                 # extra categories are fine
    text = make_text_store(tmp_path / "text.zarr", "open_clip:ViT-B-32", np.vstack([np.ones(D), protos]), names)
    model = LabelReader(protos)
    # the image teacher is not CLIP: only text_proj(TXT) is used -> the right class every time
    r = E.zeroshot_eval(model, test, text, make_image_store(tmp_path / "img1.zarr", "timm:vit"), normalize=False, n_points=32)
    assert r["top1_acc"] == 100.0 and r["shape_feature"] == "text_proj(TXT)" and r["test_shapes"] == 12
    assert set(r["per_class_acc"].values()) == {100.0} and r["top5_acc"] == 100.0
    # CLIP image teacher in the same space: img_proj(IMG) + r * text_proj(TXT), dominated by IMG here
    r = E.zeroshot_eval(model, test, text, make_image_store(tmp_path / "img2.zarr", "open_clip:ViT-B-32"),
                        ratio=0.25, normalize=False, n_points=32)
    assert r["top1_acc"] == 0.0 and r["shape_feature"].startswith("img_proj(IMG) + 0.25")
    feats, _ = E.class_text_features(text, ["cat1"])
    np.testing.assert_allclose(feats[0], protos[1], atol=0.1)           # sum over the templates
    with pytest.raises(Exception, match="no prompts for classes"):
        E.class_text_features(text, ["cat1", "unicorn"])


def test_episodes_deterministic_and_class_balanced():
    train_y = np.repeat(np.arange(6), 12)
    test_y = np.repeat(np.arange(6), 25)
    test_y[test_y == 5] = 4                                              # class 5: no test shapes
    a = E.sample_episode(train_y, test_y, way=3, shot=10, query=20, seed=0, fold=1)
    b = E.sample_episode(train_y, test_y, way=3, shot=10, query=20, seed=0, fold=1)
    c = E.sample_episode(train_y, test_y, way=3, shot=10, query=20, seed=0, fold=2)
    assert all(np.array_equal(x, y) for x, y in ((a.classes, b.classes), (a.support, b.support), (a.query, b.query)))
    assert not (np.array_equal(a.classes, c.classes) and np.array_equal(a.support, c.support))
    assert len(set(a.classes.tolist())) == 3 and 5 not in a.classes
    assert np.bincount(train_y[a.support], minlength=6)[a.classes].tolist() == [10, 10, 10]
    assert np.bincount(test_y[a.query], minlength=6)[a.classes].tolist() == [20, 20, 20]
    assert len(np.unique(a.support)) == 30 and len(np.unique(a.query)) == 60
    with pytest.raises(ValueError, match="6-way"):
        E.sample_episode(train_y, test_y, way=6, shot=10, query=20, seed=0, fold=0)
    data = ClsData(np.zeros((72, 4, 3), np.float32), train_y, np.arange(72).astype(str), [f"c{i}" for i in range(6)])
    tr, _ = E.episode_data(data, data, E.sample_episode(train_y, train_y, 2, 3, 2, 0, 0))
    assert sorted(tr.labels.tolist()) == [0, 0, 0, 1, 1, 1] and len(tr.class_names) == 2


def test_fewshot_tiny_folds(tmp_path):
    store = make_store(tmp_path / "d.zarr", per_class=3, points=96)
    train, test = load_classification(store, "train"), load_classification(store, "test")
    params = FinetuneParams(profile="fewshot", init="scratch", votes=0, n_points=64, num_group=8, group_size=16,
                            epochs=1, warmup_epochs=0, batch_size=4, device="cpu",
                            model=dict(trans_dim=48, depth=1, num_heads=3, decoder_depth=1, decoder_num_heads=3))
    settings = E.FewshotSettings(ways=[2], shots=[2], folds=2, query=2, seed=0)
    r = E.fewshot_eval(train, test, settings, params, None, log=lambda *_: None)
    folds = r["2way2shot"]["folds"]
    assert len(folds) == 2 and all(a in (0.0, 25.0, 50.0, 75.0, 100.0) for a in folds)
    assert r["2way2shot"]["mean"] == pytest.approx(np.mean(folds)) and r["2way2shot"]["std"] == pytest.approx(np.std(folds))


def test_fewshot_probe_fits_the_support_rows_and_scores_the_episodes_query_rows():
    """Frozen few-shot: train features that name their class, test features that name it (100 % on
    every fold, for 2 of 4 classes too: the episode's labels are remapped) or the next class (0 %: the
    SVM learnt from the support rows, and is scored on the query rows); the episodes are
    :func:`sample_episode`'s, raw and standardised reported."""
    classes, per_class = 4, 6
    labels = np.repeat(np.arange(classes), per_class)
    data = ClsData(np.zeros((len(labels), 4, 3), np.float32), labels, np.arange(len(labels)).astype(str),
                   [f"c{i}" for i in range(classes)])
    rng = np.random.default_rng(0)
    onehot = np.eye(classes, dtype=np.float32) * 5
    train_x = onehot[labels] + 0.1 * rng.normal(size=(len(labels), classes))
    right = {"train": train_x, "test": onehot[labels] + 0.1 * rng.normal(size=(len(labels), classes))}
    wrong = {"train": train_x, "test": onehot[(labels + 1) % classes]}
    settings = E.FewshotSettings(ways=[2, 4], shots=[3], folds=3, query=2, seed=0)
    got = E.fewshot_probe(right, data, data, settings)
    assert list(got) == ["2way3shot", "4way3shot"]
    for r in got.values():
        assert r["folds"] == [100.0] * 3 == r["folds_standardized"] and r["mean"] == 100.0 and r["std"] == 0.0
    assert E.fewshot_probe(wrong, data, data, E.FewshotSettings([4], [3], 3, 2, 0))["4way3shot"]["folds"] == [0.0] * 3
    # the rows it reads are the episode's: scramble every other test row and the folds keep their accuracy
    ep = E.sample_episode(labels, labels, 2, 3, 2, 0, 0)
    scrambled = {"train": train_x, "test": np.where(np.isin(np.arange(len(labels)), ep.query)[:, None],
                                                    right["test"], -right["test"])}
    assert E.fewshot_probe(scrambled, data, data, E.FewshotSettings([2], [3], 1, 2, 0))["2way3shot"]["folds"] == [100.0]


def make_blob_store(path, per_class: int = 6, classes: int = K, points: int = 64, seed: int = 0):
    """Train and test shapes that stay distinct after centring and scaling: class c is a blob
    elongated along axis c (any encoder, even at random init, separates them)."""
    rng = np.random.default_rng(seed)
    samples = []
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class):
                scale = np.full(3, 0.25)
                scale[c % 3] = 1.0
                pts = (rng.normal(size=(points, 3)) * scale).astype(np.float32)
                samples.append(Sample(f"{split}-{c}-{i}", split, c, lambda a=pts: a))
    return write_classification_store(path, samples, [f"cat{c}" for c in range(classes)], points,
                                      {"format": "test"}, log=lambda *_: None, fps=fps_indices).path


def tiny_checkpoint(path, seed: int = 0) -> ReConPretrain:
    torch.manual_seed(seed)
    cfg = ReConConfig.variant("tiny", trans_dim=48, depth=2, num_heads=3, decoder_depth=1, decoder_num_heads=3,
                              num_group=8, group_size=16, img_feat_dim=D, text_feat_dim=D)
    model = ReConPretrain(cfg)
    torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(cfg.__dict__, default=list))}, path)
    return model


def test_svm_on_separable_shapes_reaches_what_they_allow(tmp_path):
    """Blobs elongated along different axes: the standardised SVM on a random-init encoder's features
    separates them on the held-out split; the raw protocol sees the same features (no hidden
    preprocessing) and fits the train split."""
    store = make_blob_store(tmp_path / "d.zarr")
    train, test = load_classification(store, "train"), load_classification(store, "test")
    model = tiny_checkpoint(tmp_path / "model.pt")
    r = E.svm_eval(model, train, test, n_points=32)
    assert r["test_acc_standardized"] >= 90 and r["train_acc_standardized"] == 100
    assert r["feature_dim"] == 96 and (r["train_shapes"], r["test_shapes"]) == (18, 18)
    feats = [P.batched(model.svm_features, E.eval_clouds(data, 32), 64, "cpu")[0] for data in (train, test)]
    assert (r["train_acc"], r["test_acc"]) == P.svm_accuracy(feats[0], train.labels, feats[1], test.labels)


def test_evaluate_stage_svm_and_zeroshot(tmp_path, monkeypatch):
    from stages import evaluate as stage

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=6)
    model = tiny_checkpoint(tmp_path / "model.pt")
    text = make_text_store(tmp_path / "text.zarr", "minilm", np.eye(K, D), [f"cat{c}" for c in range(K)])
    p = stage.params(dict(checkpoint=str(tmp_path / "model.pt"), store=str(store), text_store=str(text),
                          image_store=str(tmp_path / "absent.zarr"), n_points=32, device="cpu"))
    metrics = stage.run(p, tmp_path / "evaluate")
    train, test = load_classification(store, "train"), load_classification(store, "test")
    assert metrics["svm"] == E.svm_eval(model, train, test, n_points=32)        # the stage adds nothing hidden
    assert metrics["svm"]["test_acc_standardized"] >= 2 / 3 * 100             # separable blobs, 18 test shapes
    zs = metrics["zeroshot"]
    assert zs["shape_feature"] == "text_proj(TXT)" and zs["test_shapes"] == 18
    scores = E.zero_shot_scores(None, P.batched(model.zero_shot_features, E.eval_clouds(test, 32), 64, "cpu")[1],
                                E.class_text_features(text, test.class_names)[0])
    assert zs["top1_acc"] == pytest.approx(100 * float((scores.argmax(1) == test.labels).mean()))
    assert "random_init" not in metrics
    published = tmp_path / "metrics" / "evaluate"     # every figure in details.json, the headline in metrics.json
    assert json.loads((published / "details.json").read_text()) == metrics
    assert json.loads((published / "metrics.json").read_text()) == stage.headline(metrics) == {
        "svm": metrics["svm"]["test_acc"], "zs_top1": zs["top1_acc"]}
    confusion = (tmp_path / "metrics" / "evaluate" / "zeroshot" / "confusion.csv").read_text().splitlines()
    assert len(confusion) == 19 and (tmp_path / "evaluate" / "zeroshot" / "confusion.png").stat().st_size > 1000
    assert sum(row.split(",")[0] == row.split(",")[1] for row in confusion[1:]) == round(zs["top1_acc"] * 18 / 100)


def test_random_init_baseline_side_by_side(tmp_path, monkeypatch):
    """``baseline``: the checkpoint's network at random init (seeded) is evaluated in the same run,
    both under every BatchNorm treatment; a checkpoint that *is* that random init gives identical
    figures, a trained one its own."""
    from stages import evaluate as stage

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=3)
    model = tiny_checkpoint(tmp_path / "model.pt", seed=5)
    baseline = P.random_init_like(model, seed=0)
    assert not torch.equal(baseline.encoder.blocks[0].patch_attn.qkv.weight, model.encoder.blocks[0].patch_attn.qkv.weight)
    state = torch.get_rng_state()
    assert torch.equal(P.random_init_like(model, seed=0).img_proj.weight, baseline.img_proj.weight)
    assert torch.equal(torch.get_rng_state(), state)                          # the caller's RNG is untouched
    torch.save({"model": baseline.state_dict(), "config": json.loads(json.dumps(model.cfg.__dict__, default=list))},
               tmp_path / "random.pt")
    common = dict(store=str(store), tasks=["svm"], n_points=32, device="cpu", baseline=True, seed=0, bn_recalibrate=0)
    same = stage.run(stage.params(dict(checkpoint=str(tmp_path / "random.pt"), **common)), tmp_path / "a")
    assert same["random_init"]["bn_treatments"] == same["bn_treatments"] and same["random_init"]["seed"] == 0
    assert list(same["bn_treatments"]) == ["saved", "reset"]                  # no clouds: nothing to recalibrate on
    assert same["random_init"]["bn_recalibrated_clouds"] == 0 == same["bn_recalibrated_clouds"]
    assert same["svm"] == same["bn_treatments"]["saved"]["svm"]
    other = stage.run(stage.params(dict(checkpoint=str(tmp_path / "model.pt"), **common)), tmp_path / "b")
    assert other["random_init"]["bn_treatments"] == same["bn_treatments"]    # the baseline depends on the config only
    train, test = load_classification(store, "train"), load_classification(store, "test")
    assert other["svm"] == E.svm_eval(model, train, test, n_points=32)
    # by default the recalibrated treatment re-estimates both networks' statistics on the same seeded train clouds
    calibrated = stage.run(stage.params(dict(checkpoint=str(tmp_path / "model.pt"), **{**common, "bn_recalibrate": 4})),
                           tmp_path / "c")
    clouds = E.recalibration_clouds(train, 32, True, 4, 0)
    assert len(clouds) == 4 == calibrated["bn_recalibrated_clouds"]
    assert calibrated["random_init"]["bn_recalibrated_clouds"] == 4
    for net, section in ((model, calibrated), (P.random_init_like(model, seed=0), calibrated["random_init"])):
        assert list(section["bn_treatments"]) == list(P.BN_TREATMENTS)
        for treatment in P.BN_TREATMENTS:
            assert section["bn_treatments"][treatment]["svm"] == E.svm_eval(
                P.with_batchnorm(net, treatment, clouds), train, test, n_points=32), treatment
    assert calibrated["svm"] == other["svm"]                                   # the checkpoint as saved is untouched
    assert set(calibrated["verdict"]) == {"svm", "svm_standardized"}
    # recon attention's baseline: the recalibrated treatment, in place
    expected = P.random_init_like(model, seed=0)
    assert E.baseline_batchnorm(expected, train, 32, True, 4, 0) == 4
    bn = next(m for m in expected.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert float(bn.running_var.mean()) < 0.5                                  # not the fresh variance of 1
    recalibrated = P.with_batchnorm(P.random_init_like(model, seed=0), "recalibrated", clouds).state_dict()
    assert all(torch.equal(v, recalibrated[k]) for k, v in expected.state_dict().items())


def test_evaluate_fewshot_probe_under_every_treatment_with_its_verdict(tmp_path, monkeypatch):
    """``fewshot_probe`` beside ``svm``: both networks, every BatchNorm treatment, the figures of
    :func:`fewshot_probe` on the network's own features (the same seeded episodes), a verdict per
    setting (raw and standardised) and the headline's ``fsp_<w>w<s>s`` with its ``_rand``."""
    from stages import evaluate as stage

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=4)
    model = tiny_checkpoint(tmp_path / "model.pt", seed=5)
    metrics = stage.run(stage.params(dict(
        checkpoint=str(tmp_path / "model.pt"), store=str(store), tasks=["svm", "fewshot_probe"], n_points=32,
        device="cpu", baseline=True, seed=0, bn_recalibrate=4, fewshot_ways=[2, 3], fewshot_shots=[2],
        fewshot_folds=3, fewshot_query=2)), tmp_path / "e")
    train, test = load_classification(store, "train"), load_classification(store, "test")
    clouds = E.recalibration_clouds(train, 32, True, 4, 0)
    settings = E.FewshotSettings([2, 3], [2], 3, 2, 0)
    for net, section in ((model, metrics), (P.random_init_like(model, seed=0), metrics["random_init"])):
        for treatment in P.BN_TREATMENTS:
            treated = P.with_batchnorm(net, treatment, clouds)
            expected = E.fewshot_probe(E.split_features(treated, train, test, 32), train, test, settings)
            assert section["bn_treatments"][treatment]["fewshot_probe"] == expected, treatment
    assert metrics["fewshot_probe"] == metrics["bn_treatments"]["saved"]["fewshot_probe"]
    assert len(metrics["fewshot_probe"]["3way2shot"]["folds"]) == 3
    v = metrics["verdict"]["fewshot_probe_3way2shot"]
    assert v["pretrained"] == metrics["fewshot_probe"]["3way2shot"]["mean"]
    assert v["random_init"] == max(t["fewshot_probe"]["3way2shot"]["mean"]
                                   for t in metrics["random_init"]["bn_treatments"].values())
    assert set(metrics["verdict"]) == {"svm", "svm_standardized", "fewshot_probe_2way2shot",
                                       "fewshot_probe_2way2shot_standardized", "fewshot_probe_3way2shot",
                                       "fewshot_probe_3way2shot_standardized"}
    h = stage.headline(metrics)
    assert h["fsp_3w2s"] == v["pretrained"] and h["fsp_3w2s_rand"] == v["random_init"]
    assert h["fsp_2w2s_rand"] == metrics["verdict"]["fewshot_probe_2way2shot"]["random_init"]


def test_verdict_takes_the_strongest_random_init_treatment(tmp_path, monkeypatch):
    """Treatments that rank differently per network and per figure (a stubbed SVM reads which
    network and which BatchNorm statistics it got): every treatment is reported for both networks,
    the pretrained figure is its saved one (not its best), and each figure's random-init side is the
    max over that network's treatments; the headline's ``*_random_init`` is that max."""
    from stages import evaluate as stage
    from stages.common import StageError

    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=3)
    torch.manual_seed(5)
    cfg = ReConConfig.variant("tiny", trans_dim=48, depth=2, num_heads=3, decoder_depth=1, decoder_num_heads=3,
                              num_group=8, group_size=16, img_feat_dim=D, text_feat_dim=D)
    model = ReConPretrain(cfg)
    for m in P.batchnorms(model):                   # statistics as a trained checkpoint has them: not the initial
        m.running_var.fill_(2.0)
        m.num_batches_tracked.fill_(7)
    torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(cfg.__dict__, default=list))},
               tmp_path / "model.pt")
    weight = model.encoder.blocks[0].patch_attn.qkv.weight.detach().clone()
    # (network, treatment) -> (raw, standardised) held-out accuracy
    table = {("pretrained", "saved"): (70.0, 60.0), ("pretrained", "reset"): (95.0, 95.0),
             ("pretrained", "recalibrated"): (65.0, 55.0),
             ("random_init", "saved"): (50.0, 85.0), ("random_init", "recalibrated"): (80.0, 75.0)}

    def stub_svm(net, train, test, *args, **kwargs):
        name = "pretrained" if torch.equal(net.encoder.blocks[0].patch_attn.qkv.weight, weight) else "random_init"
        bn = P.batchnorms(net)[0]
        treatment = ("saved" if name == "random_init" else "reset") if P.at_initial_statistics(net) else \
            "saved" if bool((bn.running_var == 2.0).all()) else "recalibrated"
        raw, std = table[name, treatment]
        return {"train_acc": 100.0, "test_acc": raw, "train_acc_standardized": 100.0, "test_acc_standardized": std}

    monkeypatch.setattr(stage, "svm_eval", stub_svm)
    metrics = stage.run(stage.params(dict(checkpoint=str(tmp_path / "model.pt"), store=str(store), tasks=["svm"],
                                          n_points=32, device="cpu", baseline=True, bn_recalibrate=4)), tmp_path / "e")
    for name, section in (("pretrained", metrics), ("random_init", metrics["random_init"])):
        assert list(section["bn_treatments"]) == ["saved", "reset", "recalibrated"]
        for treatment, got in section["bn_treatments"].items():
            raw, std = table[name, "saved" if (name, treatment) == ("random_init", "reset") else treatment]
            assert (got["svm"]["test_acc"], got["svm"]["test_acc_standardized"]) == (raw, std), (name, treatment)
    assert metrics["svm"]["test_acc"] == 70.0                                 # the checkpoint as saved
    assert metrics["verdict"] == {
        "svm": {"pretrained": 70.0, "pretrained_treatment": "saved", "random_init": 80.0,
                "random_init_treatment": "recalibrated", "margin": -10.0},
        "svm_standardized": {"pretrained": 60.0, "pretrained_treatment": "saved", "random_init": 85.0,
                             "random_init_treatment": "saved", "margin": -25.0}}
    assert stage.headline(metrics) == {"svm": 70.0, "svm_rand": 80.0}   # the verdict's strongest treatment
    assert json.loads((tmp_path / "metrics" / "e" / "metrics.json").read_text()) == stage.headline(metrics)
    with pytest.raises(StageError, match="must include 'saved'"):
        stage.run(stage.params(dict(checkpoint=str(tmp_path / "model.pt"), store=str(store), tasks=["svm"],
                                    n_points=32, device="cpu", bn_treatments=["reset"])), tmp_path / "f")


def test_cli_evaluate_by_hand_keeps_the_pipeline_metrics(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    store = make_blob_store(tmp_path / "d.zarr", per_class=3)
    tiny_checkpoint(tmp_path / "model.pt")
    (tmp_path / "params.yaml").write_text("evaluate:\n  tasks: [svm]\n  n_points: 32\n  device: cpu\n")
    args = ["evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--store", str(store)]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "give --out" in refused.output
    assert not (tmp_path / "cache").exists()
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "mine"), "--baseline"])
    assert done.exit_code == 0, done.output
    written = json.loads((tmp_path / "mine" / "details.json").read_text())
    random_init = written["random_init"]["bn_treatments"]
    assert set(random_init) == set(written["bn_treatments"]) == set(P.BN_TREATMENTS)
    assert not (tmp_path / "cache").exists()
    assert set(random_init["saved"]["svm"]) == set(written["svm"])
    assert json.loads((tmp_path / "mine" / "metrics.json").read_text()) == {
        "svm": written["svm"]["test_acc"], "svm_rand": max(r["svm"]["test_acc"] for r in random_init.values())}
