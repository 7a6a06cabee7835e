"""Part-segmentation scores: hand-computed IoUs, the category-restricted argmax, class vs instance
mIoU, agreement with the reference's validate loop written out literally, and the picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recon.downstream.partseg_metrics import miou_summary, part_colours, plot_parts, restrict_to_category, shape_ious

PARTS = [[0, 1], [2, 3, 4]]          # category A: parts 0, 1; category B: parts 2, 3, 4
NAMES = ["A", "B", "C"]              # C has no shape below


def test_perfect_prediction_scores_one():
    labels = np.array([[0, 0, 1, 1], [2, 3, 4, 4]])
    assert shape_ious(labels, labels, np.array([0, 1]), PARTS).tolist() == [1.0, 1.0]


def test_one_wrong_point():
    # part 0: 2 shared of 3 in either -> 2/3; part 1: 1 of 2 -> 1/2; mean 7/12
    got = shape_ious(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 1, 1]]), np.array([0]), PARTS)
    assert got[0] == pytest.approx(7 / 12, abs=1e-12)


def test_part_absent_from_both_counts_one():
    labels = np.array([[2, 2, 3, 3], [2, 2, 2, 3], [2, 2, 3, 3]])
    pred = np.array([[2, 2, 3, 3],      # part 4 neither true nor predicted: 1 -> (1 + 1 + 1) / 3
                     [2, 2, 2, 2],      # part 2: 3/4, part 3: 0/1, part 4 absent: 1 -> 1.75 / 3
                     [0, 2, 3, 3]])     # another category's part: part 2: 1/2, parts 3, 4: 1 -> 2.5 / 3
    got = shape_ious(pred, labels, np.array([1, 1, 1]), PARTS)
    np.testing.assert_allclose(got, [1.0, 1.75 / 3, 2.5 / 3], rtol=0, atol=1e-12)


def test_a_part_predicted_but_absent_scores_zero():
    # part 1 predicted at one point, absent from the truth: IoU 0, not 1
    got = shape_ious(np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]]), np.array([0]), PARTS)
    assert got[0] == pytest.approx((3 / 4 + 0.0) / 2, abs=1e-12)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_restricted_argmax_ignores_other_categories(kind):
    logits = np.full((2, 3, 5), -5.0, dtype=np.float32)
    logits[0, 0, [0, 1, 3]] = [0.1, 0.5, 9.0]   # category A: part 3 scores highest but is B's -> 1
    logits[0, 1, [0, 1, 2]] = [0.7, 0.2, 8.0]   # -> 0
    logits[0, 2, [0, 1]] = [0.3, 0.3]           # tie -> the lower id, 0
    logits[1, 0, [0, 3, 4]] = [9.0, 1.0, 2.0]   # category B: part 0 is A's -> 4
    logits[1, 1, [1, 2, 3]] = [9.0, 1.0, 0.5]   # -> 2
    logits[1, 2, [2, 4]] = [1.5, 1.5]           # tie -> 2
    category = np.array([0, 1])
    if kind == "torch":
        got = restrict_to_category(torch.from_numpy(logits), torch.from_numpy(category), PARTS)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
        got = got.numpy()
    else:
        got = restrict_to_category(logits, category, PARTS)
        assert got.dtype == np.int64
    assert got.tolist() == [[1, 0, 0], [4, 2, 2]]


def test_class_and_instance_miou_differ_on_unbalanced_categories():
    ious = np.array([1.0, 0.5, 0.6, 0.2])
    got = miou_summary(ious, np.array([0, 0, 0, 1]), NAMES)
    assert got["instance_miou"] == pytest.approx(57.5, abs=1e-9)        # 2.3 / 4
    assert got["class_miou"] == pytest.approx(45.0, abs=1e-9)           # (0.7 + 0.2) / 2, C absent
    assert got["per_category"] == pytest.approx({"A": 70.0, "B": 20.0}, abs=1e-9)
    assert list(got["per_category"]) == ["A", "B"] and got["shapes"] == 4


def reference_validate(logits: np.ndarray, target: np.ndarray, seg_classes: dict[str, list[int]]):
    """The reference's ``validate`` (segmentation/main.py), its metric lines kept as they are."""
    seg_label_to_cat = {label: cat for cat, labels in seg_classes.items() for label in labels}
    shape_ious = {cat: [] for cat in seg_classes.keys()}
    cur_pred_val = np.zeros(target.shape).astype(np.int32)
    for i in range(len(target)):
        cat = seg_label_to_cat[target[i, 0]]
        cur_pred_val[i, :] = np.argmax(logits[i][:, seg_classes[cat]], 1) + seg_classes[cat][0]
    per_shape = []
    for i in range(len(target)):
        segp, segl = cur_pred_val[i, :], target[i, :]
        cat = seg_label_to_cat[segl[0]]
        part_ious = [0.0 for _ in range(len(seg_classes[cat]))]
        for l in seg_classes[cat]:
            if (np.sum(segl == l) == 0) and (np.sum(segp == l) == 0):
                part_ious[l - seg_classes[cat][0]] = 1.0
            else:
                part_ious[l - seg_classes[cat][0]] = np.sum((segl == l) & (segp == l)) / float(
                    np.sum((segl == l) | (segp == l)))
        shape_ious[cat].append(np.mean(part_ious))
        per_shape.append(np.mean(part_ious))
    all_shape_ious = [iou for cat in shape_ious for iou in shape_ious[cat]]
    class_avg = np.mean([np.mean(v) for v in shape_ious.values()])
    return cur_pred_val, np.array(per_shape), class_avg, np.mean(all_shape_ious)


def test_agrees_with_the_reference_validate_loop():
    rng = np.random.default_rng(3)
    parts = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    category = rng.integers(0, 3, 40)
    target = np.stack([rng.choice(parts[c][: rng.integers(1, len(parts[c]) + 1)], 64) for c in category])
    logits = rng.normal(size=(40, 64, 9)).astype(np.float32)
    logits[:, :16] += 4.0 * np.eye(9, dtype=np.float32)[target[:, :16]]   # some points right, some not
    seg_classes = {"a": parts[0], "b": parts[1], "c": parts[2]}
    ref_pred, ref_ious, ref_class, ref_instance = reference_validate(logits, target, seg_classes)
    pred = restrict_to_category(logits, category, parts)
    assert pred.tolist() == ref_pred.tolist()
    ious = shape_ious(pred, target, category, parts)
    np.testing.assert_allclose(ious, ref_ious, rtol=0, atol=1e-12)
    assert len(set(category.tolist())) == 3 and 0.2 < ious.mean() < 0.9    # not all perfect, not all wrong
    summary = miou_summary(ious, category, ["a", "b", "c"])
    assert summary["instance_miou"] == pytest.approx(ref_instance * 100, abs=1e-9)
    assert summary["class_miou"] == pytest.approx(ref_class * 100, abs=1e-9)


def test_plot_parts_draws_predicted_beside_true(tmp_path):
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.6, 0.6, size=(3, 400, 3)).astype(np.float32)
    pred = np.zeros((3, 400), dtype=np.int64)            # every point predicted part 0 ...
    labels = np.full((3, 400), 1, dtype=np.int64)        # ... whose truth is part 1
    path = plot_parts(points, pred, labels, ["s0", "s1", "s2"], tmp_path / "fig" / "parts.png", max_shapes=2)
    assert path == tmp_path / "fig" / "parts.png" and [p.name for p in path.parent.iterdir()] == ["parts.png"]
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape == (800, 800, 3)                  # 2 rows of 400 px, 2 panels of 400 px
    colour = (part_colours(np.array([0, 1]))[:, :3] * 255).round().astype(int)

    def near(block: np.ndarray, rgb: np.ndarray) -> int:
        return int((np.abs(block - rgb).max(-1) <= 2).sum())

    left, right = image[:, :400], image[:, 400:]
    assert near(left, colour[0]) > 100 and near(left, colour[1]) == 0
    assert near(right, colour[1]) > 100 and near(right, colour[0]) == 0


def test_plot_parts_refuses_an_empty_batch(tmp_path):
    with pytest.raises(ValueError, match="no shape"):
        plot_parts(np.zeros((0, 4, 3)), np.zeros((0, 4)), np.zeros((0, 4)), [], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
