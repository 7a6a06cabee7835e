"""Downstream evaluations of a pretrained encoder: linear SVM, zero-shot, few-shot.

- ``svm``: frozen features concat[max over the 3 queries, max + mean over patches] (2C) of the
  train and test splits, ``LinearSVC(C=0.075)``; train and test accuracy.
- ``zeroshot``: per class, the sum over the prompt templates of the text-teacher features
  (``teachers/text.zarr``, categories in its ``ids``); the shape feature is
  img_proj(IMG) + r * text_proj(TXT) when the image teacher shares the text space (both teacher
  specs ``open_clip:<same model>``), otherwise text_proj(TXT) alone; cosine similarity; top-1,
  top-5 and per-class accuracy on the test split only.
- ``fewshot``: n-way k-shot episodes drawn (seeded, class-balanced) from any classification
  store, or read from converted Point-BERT folds; a fine-tune per fold; mean ± std (ddof 0).
- ``fewshot_probe``: the same sampled episodes on frozen features: a linear SVM fitted on the
  support shapes, accuracy on the query shapes (raw and standardised); mean ± std (ddof 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store import StoreError, open_store
from recon.downstream.cls_data import ClsData, eval_clouds, load_classification
from recon.downstream.finetune import finetune
from recon.downstream.metrics import per_class_accuracy
from recon.downstream.recipes import FinetuneParams
from recon.downstream.weights import InitSource, load_init
from recon.network.model import ReConConfig, ReConPretrain, recalibrate_batchnorm
from recon.pretraining.probes import SVM_C, batched, svm_accuracy, unit_rows
from recon.pretraining.targets import TargetStats

# ----------------------------------------------------------------------------- model + features


def load_pretrained(path: str | Path) -> ReConPretrain:
    """Our ``model.pt`` / epoch checkpoint or a reference pretraining ``.pth`` as ReConPretrain (eval)."""
    init = load_init(str(path))
    if init is None:
        raise ValueError("evaluation needs a pretrained checkpoint, not 'scratch'")
    return pretrain_from_init(init)


def pretrain_from_init(init: InitSource) -> ReConPretrain:
    names = {f.name for f in dataclasses.fields(ReConConfig)}
    cfg = ReConConfig(**{k: v for k, v in (init.config or {}).items() if k in names})
    if "rebuild_head.weight" in init.state:
        cfg = cfg.replace(group_size=int(init.state["rebuild_head.weight"].shape[0]) // 3)
    model = ReConPretrain(cfg)
    missing, unexpected = model.load_state_dict(init.state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{init.source} is not a ReCon pretraining checkpoint: missing {missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    model.target_stats = TargetStats.from_state(init.target_stats)
    return model.eval()


def recalibration_clouds(train: ClsData | None, n_points: int, normalize: bool, count: int, seed: int,
                         device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``count`` train clouds (a seeded choice) as evaluation inputs [N, n_points, 3] on ``device``:
    what the ``recalibrated`` BatchNorm treatment (:func:`recon.pretraining.probes.with_batchnorm`)
    re-estimates the statistics on. None when there are none to take."""
    if train is None or count <= 0 or not len(train.labels):
        return None
    rows = np.sort(np.random.default_rng(seed).permutation(len(train.labels))[:count])
    return torch.from_numpy(eval_clouds(train.subset(rows), n_points, normalize, device)).to(device)


def baseline_batchnorm(model: ReConPretrain, train: ClsData | None, n_points: int, normalize: bool, count: int,
                       seed: int, device: torch.device | str = "cpu") -> int:
    """Re-estimate a network's BatchNorm statistics in place on :func:`recalibration_clouds`, as
    pretraining does with ``bn_recalibrate``: fresh running statistics (mean 0, variance 1) are ~1e4
    times the real variance of the first layer's output. Returns the clouds used."""
    clouds = recalibration_clouds(train, n_points, normalize, count, seed, device)
    if clouds is None:
        return 0
    recalibrate_batchnorm(model, clouds)
    return len(clouds)


# ----------------------------------------------------------------------------- SVM


def split_features(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int = 1024,
                   normalize: bool = True, batch: int = 64, device: torch.device | str = "cpu"
                   ) -> dict[str, np.ndarray]:
    """The frozen SVM features (``model.svm_features``) of both splits, {"train": [N, 2C], "test": ...}:
    computed once, shared by the SVM and the few-shot probe."""
    model.eval().to(device)
    return {name: batched(model.svm_features, eval_clouds(data, n_points, normalize, device), batch, device)[0]
            for name, data in (("train", train), ("test", test))}


def standardized(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets standardised by the train rows' statistics (the test rows never leak in)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mean) / std, (test_x - mean) / std


def svm_eval(model: ReConPretrain, train: ClsData, test: ClsData, n_points: int = 1024,
             normalize: bool = True, C: float = SVM_C, batch: int = 64,
             device: torch.device | str = "cpu", seed: int = 0,
             feats: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Linear SVM on the frozen features (``feats`` from :func:`split_features`, computed when None)."""
    feats = feats if feats is not None else split_features(model, train, test, n_points, normalize, batch, device)
    train_acc, test_acc = svm_accuracy(feats["train"], train.labels, feats["test"], test.labels, C, seed)
    # Also with features standardised by train-split statistics: weakly trained encoders give
    # features with large constant offsets and tiny spread, which the raw protocol underfits.
    train_std, test_std = standardized(feats["train"], feats["test"])
    std_train, std_test = svm_accuracy(train_std, train.labels, test_std, test.labels, C, seed)
    return {"train_acc": train_acc, "test_acc": test_acc,
            "train_acc_standardized": std_train, "test_acc_standardized": std_test,
            "C": C, "feature_dim": int(feats["train"].shape[1]),
            "train_shapes": len(train), "test_shapes": len(test), "n_points": n_points}


# ----------------------------------------------------------------------------- zero-shot


def class_text_features(text_store: str | Path, class_names: list[str]) -> tuple[np.ndarray, dict]:
    """[K, D] sum over templates of the text-teacher features of every class, and the store params."""
    store = open_store(text_store, expect_arrays={"features": (-1, -1)})
    ids = [str(i) for i in store.ids]
    missing = [c for c in class_names if c not in ids]
    if missing:
        raise StoreError(f"{text_store} has no prompts for classes {missing}: embed them (its ids are "
                         f"{ids[:10]}{' ...' if len(ids) > 10 else ''})")
    feats = np.asarray(store["features"][:], dtype=np.float32)             # [C, T, D]
    return np.stack([feats[ids.index(c)].sum(0) for c in class_names]), store.params


def shares_text_space(image_params: dict | None, text_params: dict) -> bool:
    """True when image and text teachers are the same ``open_clip:`` model (one embedding space)."""
    image_t = str((image_params or {}).get("teacher", ""))
    text_t = str(text_params.get("teacher", ""))
    return image_t.startswith("open_clip:") and text_t.startswith("open_clip:") and image_t == text_t


def zero_shot_scores(img: np.ndarray | None, txt: np.ndarray, class_feats: np.ndarray,
                     ratio: float = 0.25, use_image: bool = False) -> np.ndarray:
    """Cosine similarity [N, K] of the shape features with the class text features."""
    shape = img + ratio * txt if use_image else txt
    return unit_rows(shape) @ unit_rows(class_feats).T


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean() * 100)


def zeroshot_eval(model: torch.nn.Module, test: ClsData, text_store: str | Path,
                  image_store: str | Path | None = None, ratio: float = 0.25, n_points: int = 1024,
                  normalize: bool = True, batch: int = 64, device: torch.device | str = "cpu"
                  ) -> dict[str, Any]:
    """Zero-shot classification of the test split (see module docstring). ``model`` needs
    ``zero_shot_features(points) -> (img_proj(IMG), text_proj(TXT))``."""
    class_feats, text_params = class_text_features(text_store, test.class_names)
    image_params = None
    if image_store is not None and Path(image_store).exists():
        image_params = open_store(image_store).params
    use_image = shares_text_space(image_params, text_params)
    model.eval().to(device)
    img, txt = batched(model.zero_shot_features, eval_clouds(test, n_points, normalize, device), batch, device)
    if txt.shape[1] != class_feats.shape[1] or (use_image and img.shape[1] != class_feats.shape[1]):
        raise ValueError(f"projection dims (img {img.shape[1]}, text {txt.shape[1]}) do not match the text "
                         f"teacher's {class_feats.shape[1]}: the checkpoint was pretrained with another teacher")
    scores = zero_shot_scores(img, txt, class_feats, ratio, use_image)
    pred = scores.argmax(1)
    per_class = per_class_accuracy(pred, test.labels, test.class_names)
    return {"top1_acc": topk_accuracy(scores, test.labels, 1), "top5_acc": topk_accuracy(scores, test.labels, 5),
            "mean_class_acc": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "per_class_acc": per_class, "test_shapes": len(test),
            "shape_feature": f"img_proj(IMG) + {ratio} * text_proj(TXT)" if use_image else "text_proj(TXT)",
            "text_teacher": text_params.get("teacher"), "_pred": pred}


# ----------------------------------------------------------------------------- few-shot


@dataclass
class FewshotSettings:
    ways: list[int] = field(default_factory=lambda: [5, 10])
    shots: list[int] = field(default_factory=lambda: [10, 20])
    folds: int = 10
    query: int = 20          # test shapes per class
    seed: int = 0


@dataclass
class Episode:
    classes: np.ndarray      # source class of episode label i
    support: np.ndarray      # rows of the train split
    query: np.ndarray        # rows of the test split


def sample_episode(train_labels: np.ndarray, test_labels: np.ndarray, way: int, shot: int, query: int,
                   seed: int, fold: int) -> Episode:
    """``way`` classes, ``shot`` train and ``query`` test shapes each; seeded by (seed, way, shot, fold)."""
    rng = np.random.default_rng([seed, way, shot, fold])
    eligible = [c for c in np.unique(train_labels)
                if (train_labels == c).sum() >= shot and (test_labels == c).sum() >= query]
    if len(eligible) < way:
        raise ValueError(f"only {len(eligible)} classes have {shot} train and {query} test shapes; "
                         f"a {way}-way episode needs {way}")
    classes = rng.choice(np.asarray(eligible), way, replace=False)
    support = np.concatenate([rng.choice(np.flatnonzero(train_labels == c), shot, replace=False) for c in classes])
    queries = np.concatenate([rng.choice(np.flatnonzero(test_labels == c), query, replace=False) for c in classes])
    return Episode(classes, support, queries)


def episode_data(train: ClsData, test: ClsData, ep: Episode) -> tuple[ClsData, ClsData]:
    """The episode's support / query sets with labels 0..way-1."""
    remap = {int(c): i for i, c in enumerate(ep.classes)}
    names = [train.class_names[int(c)] for c in ep.classes]

    def part(data: ClsData, rows: np.ndarray) -> ClsData:
        sub = data.subset(rows)
        return ClsData(sub.points, np.array([remap[int(y)] for y in sub.labels], np.int64), sub.ids, names)

    return part(train, ep.support), part(test, ep.query)


def _summary(accs: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "folds": [float(a) for a in accs]}


def fewshot_eval(train: ClsData, test: ClsData, settings: FewshotSettings, params: FinetuneParams,
                 init: InitSource | None, log=print) -> dict[str, Any]:
    """Fine-tune per fold on sampled episodes; ``{'5way10shot': {mean, std, folds}, ...}``."""
    results = {}
    for way in settings.ways:
        for shot in settings.shots:
            accs = []
            for fold in range(settings.folds):
                ep = sample_episode(train.labels, test.labels, way, shot, settings.query, settings.seed, fold)
                ep_train, ep_test = episode_data(train, test, ep)
                r = finetune(params, ep_train, ep_test, seed=settings.seed + fold, init=init, log=lambda *_: None)
                accs.append(r.metrics["test_acc"])
                log(f"fewshot {way}-way {shot}-shot fold {fold}: {accs[-1]:.2f}%")
            results[f"{way}way{shot}shot"] = _summary(accs)
    return results


def fewshot_probe(feats: dict[str, np.ndarray], train: ClsData, test: ClsData, settings: FewshotSettings,
                  C: float = SVM_C) -> dict[str, Any]:
    """Few-shot on frozen features: per episode (the same seeded episodes as :func:`fewshot_eval`) a
    ``LinearSVC(C)`` fitted on the support rows' features (``feats`` from :func:`split_features`),
    accuracy on the query rows; raw and standardised by the support rows' statistics. No training of
    the encoder, so a network at random init is measured as it is, not by how far a short fine-tune
    moves it: ``{'5way10shot': {mean, std, folds, mean_standardized, std_standardized,
    folds_standardized}, ...}``."""
    results = {}
    for way in settings.ways:
        for shot in settings.shots:
            raw, std = [], []
            for fold in range(settings.folds):
                ep = sample_episode(train.labels, test.labels, way, shot, settings.query, settings.seed, fold)
                ep_train, ep_test = episode_data(train, test, ep)
                support, query = feats["train"][ep.support], feats["test"][ep.query]
                raw.append(svm_accuracy(support, ep_train.labels, query, ep_test.labels, C, settings.seed + fold)[1])
                support_std, query_std = standardized(support, query)
                std.append(svm_accuracy(support_std, ep_train.labels, query_std, ep_test.labels, C,
                                        settings.seed + fold)[1])
            s = _summary(std)
            results[f"{way}way{shot}shot"] = {**_summary(raw), **{f"{k}_standardized": v for k, v in s.items()}}
    return results


def fewshot_from_folds(folder: str | Path, params: FinetuneParams, init: InitSource | None,
                       seed: int = 0, log=print) -> dict[str, Any]:
    """The same over converted Point-BERT folds ``folder/{way}way{shot}shot/{fold}.zarr``."""
    results = {}
    for setting in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        accs = []
        for fold_store in sorted(setting.glob("*.zarr"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
            tr, te = load_classification(fold_store, "train"), load_classification(fold_store, "test")
            r = finetune(params, tr, te, seed=seed + (int(fold_store.stem) if fold_store.stem.isdigit() else 0),
                         init=init, log=lambda *_: None)
            accs.append(r.metrics["test_acc"])
            log(f"fewshot {setting.name} fold {fold_store.stem}: {accs[-1]:.2f}%")
        if accs:
            results[setting.name] = _summary(accs)
    return results
