"""The evidence on a real-mesh corpus (issue #23 item 4), after ``bench/real_meshes.py`` built its
cache in ``--work``: what pretraining gives on held-out shapes, against the same network at random
init, over pretraining seeds. Not part of CI (the corpus is fetched, never committed).

    ./tools/env.sh python bench/real_evidence.py --work /tmp/realfull          # after real_meshes.py
    ./tools/env.sh python bench/real_evidence.py --work /tmp/realfull --steps seeds,ceiling   # a part
    ./tools/env.sh python bench/real_evidence.py --work /tmp/realfull --steps transfer,parts \
        --psb /tmp/psb/LabeledDB_new        # the second corpus (docs/labeled-psb.md says how to get it)

Steps (``--steps``, in this order; each finished one is kept and skipped on a rerun):

- ``seeds``: per pretraining seed (``--seeds``) a pretraining run with the work folder's params
  (seed 0 reuses real_meshes.py's run when its seed is 0) and ``recon evaluate --baseline`` with the
  same seed, so the random-init twin is that run's own starting point: held-out linear SVM (raw and
  standardised) and zero-shot top-1 / top-5 under every BatchNorm treatment, few-shot (``--fewshot``)
  fine-tuned from each network; the monitor's held-out k-NN against its random-init twins; and the
  frozen few-shot probe (``--fewshot-probe``: a linear SVM on each episode's support features, every
  BatchNorm treatment, in ``metrics/fewshot_probe``), few-shot with the same budget for both networks.
- ``ceiling``: the image teacher's own held-out k-NN and linear SVM on the same split (its clean
  embedding averaged over the rendered views): what distillation could at best transfer.
- ``finetune``: fine-tuning from each seed's pretraining and from scratch with the same seed
  (``--finetune-epochs``; the pretraining's patch count), single-pass test accuracy.
- ``study``: ``recon study`` on the corpus's held-out split (``--study-arms``): random init, reconstruction
  only, distillation only, full ReCon (standardised targets) and ReCon++ (one image query per rendered view,
  Hungarian-matched, reconstruction-first stage: docs/reconpp.md), with its table and plot; or, with
  ``--study-preset``, one paper table's arms (e.g. ``table6``) beside the paper's figures.
- ``transfer`` (with ``--psb``, the Labeled PSB ``LabeledDB_new`` folder: another corpus, 19
  classes): each seed's encoder and its random-init twin, frozen, on its held-out split (linear SVM
  under every BatchNorm treatment), and fine-tuned on it against from scratch.
- ``parts`` (with ``--psb``): part segmentation on its real per-face part labels, fine-tuned from
  each seed's encoder and from scratch with the same seed: instance and class mIoU.

Everything lands in ``<work>/evidence/`` (one folder a run, its stage logs in ``logs/``) and the
summary, mean ± std over seeds, in ``<work>/evidence/evidence.json`` and ``evidence.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_rehearsal import ROOT, run_stage  # noqa: E402  (one stage runner for every benchmark)

CLI = [sys.executable, "-c", "import sys; from cli import app; sys.argv = ['recon', *sys.argv[1:]]; app()"]
#: what a seed's own cache shares with the corpus's (read only)
SHARED = ("shapes.parquet", "points.zarr", "teachers", "renders.zarr", "downstream")
STORE = "cache/downstream/real.zarr"


def seed_cache(work: Path, name: str) -> Path:
    """``<work>/evidence/<name>/cache``: the corpus's stores linked in, its own outputs."""
    cache = work / "evidence" / name / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for entry in SHARED:
        link = cache / entry
        if not link.exists():
            link.symlink_to(work / "cache" / entry)
    return cache


def stage(work: Path, name: str, args: list[str], cache: Path, shapes: int) -> dict:
    return run_stage(name, CLI + args, work, [cache], shapes, cache=str(cache))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def fewshot_sets(spec: str) -> list[str]:
    if spec == "none":
        return []
    ways, shots, folds, query, epochs = (int(x) for x in spec.split(","))
    return ["--set", f"fewshot_ways=[{ways}]", "--set", f"fewshot_shots=[{shots}]", "--set", f"fewshot_folds={folds}",
            "--set", f"fewshot_query={query}", "--set", f"fewshot_finetune.epochs={epochs}",
            "--set", "fewshot_finetune.votes=0"]


def fewshot_probe_sets(spec: str) -> list[str]:
    """``ways/shots/folds/query`` (ways and shots comma lists) as evaluate's settings."""
    ways, shots, folds, query = spec.split("/")
    return ["--set", f"fewshot_ways=[{ways}]", "--set", f"fewshot_shots=[{shots}]", "--set", f"fewshot_folds={folds}",
            "--set", f"fewshot_query={query}"]


def run_seeds(work: Path, seeds: list[int], fewshot: str, probe: str, shapes: int) -> None:
    corpus_run = work / "cache" / "pretrain" / "model.pt"
    for seed in seeds:
        cache = seed_cache(work, f"seed-{seed}")
        ckpt = cache / "pretrain" / "model.pt"
        if not ckpt.exists():
            reused = seed == 0 and corpus_run.exists() and read(work / "cache" / "metrics" / "pretrain" /
                                                                  "details.json").get("epochs") is not None
            if reused and _pretrain_seed(work) == 0:
                (cache / "pretrain").symlink_to(work / "cache" / "pretrain")
                (cache / "metrics").mkdir(exist_ok=True)
                (cache / "metrics" / "pretrain").symlink_to(work / "cache" / "metrics" / "pretrain")
            else:
                stage(work, f"pretrain-seed-{seed}", ["pretrain", "--set", f"seed={seed}"], cache, shapes)
        out = cache / "metrics" / "evaluate"
        if not (out / "metrics.json").exists():
            stage(work, f"evaluate-seed-{seed}",
                  ["evaluate", "--checkpoint", str(ckpt), "--store", str(work / STORE), "--baseline", "--out", str(out),
                   "--set", f"tasks=[svm,zeroshot{'' if fewshot == 'none' else ',fewshot'}]", "--set", f"seed={seed}",
                   *fewshot_sets(fewshot)],
                  cache, shapes)
        out = cache / "metrics" / "fewshot_probe"
        if probe != "none" and not (out / "metrics.json").exists():
            stage(work, f"fewshot-probe-seed-{seed}",
                  ["evaluate", "--checkpoint", str(ckpt), "--store", str(work / STORE), "--baseline", "--out", str(out),
                   "--set", "tasks=[fewshot_probe]", "--set", f"seed={seed}", *fewshot_probe_sets(probe)],
                  cache, shapes)


def _pretrain_section(work: Path) -> dict:
    """The work folder's params.yaml ``pretrain`` section (what every pretraining run here used)."""
    import yaml

    return yaml.safe_load((work / "params.yaml").read_text()).get("pretrain") or {}


def _pretrain_seed(work: Path) -> int:
    return int(_pretrain_section(work).get("seed", 0))


def _num_group(work: Path) -> int:
    """The patches per cloud the encoder was pretrained with: fine-tuning keeps them."""
    return int((_pretrain_section(work).get("model") or {}).get("num_group", 64))


def teacher_ceiling(work: Path) -> dict:
    """Held-out k-NN (k=5, cosine, as the monitor's) and linear SVM of the image teacher's clean
    embedding, averaged over views, with the corpus's train/test split."""
    import polars as pl

    from pipeline.store import open_store
    from recon.pretraining.probes import knn_probe, svm_accuracy

    shapes = pl.read_parquet(work / "cache" / "shapes.parquet")
    image = open_store(work / "cache" / "teachers" / "image.zarr")
    row = {str(i): k for k, i in enumerate(image.ids)}
    features = np.asarray(image["features"][:, :, 0]).mean(axis=1)        # variant 0: the clean render
    classes = sorted(shapes["category"].unique().to_list())
    result = {"teacher": image.params.get("teacher") or image.params.get("image_teacher")}
    splits = {}
    for split in ("train", "test"):
        part = shapes.filter((pl.col("split") == split) & pl.col("id").is_in(list(row)))
        take = [row[i] for i in part["id"].to_list()]
        splits[split] = (features[take], np.array([classes.index(c) for c in part["category"].to_list()]))
    (tr_x, tr_y), (te_x, te_y) = splits["train"], splits["test"]
    result.update(knn=100 * knn_probe(tr_x, tr_y, te_x, te_y), train_shapes=len(tr_y), test_shapes=len(te_y))
    result["svm"] = svm_accuracy(tr_x, tr_y, te_x, te_y, seed=0)[1]
    return result


def pretrained_vs_scratch(work: Path, prefix: str, seeds: list[int], task: str, args: list[str], shapes: int) -> None:
    """Per seed, ``recon finetune`` from that seed's pretraining and from scratch with the same seed
    (runs ``<prefix>-pretrained-<seed>`` and ``<prefix>-scratch-<seed>``; ``task``: the metrics folder)."""
    for seed in seeds:
        pretrained = work / "evidence" / f"seed-{seed}" / "cache" / "pretrain" / "model.pt"
        for kind, init in (("pretrained", str(pretrained)), ("scratch", "scratch")):
            cache = seed_cache(work, f"{prefix}-{kind}-{seed}")
            if not (cache / "metrics" / task / "metrics.json").exists():
                stage(work, f"{prefix}-{kind}-{seed}", [*args, "--set", f"init={init}", "--set", f"seed={seed}"],
                      cache, shapes)


def run_finetune(work: Path, seeds: list[int], epochs: int, shapes: int) -> None:
    num_group = _num_group(work)
    pretrained_vs_scratch(work, "finetune", seeds, "finetune",
                          ["finetune", "--store", str(work / STORE), "--epochs", str(epochs), "--votes", "0",
                           "--set", f"num_group={num_group}"], shapes)


def study_folder(work: Path, preset: str | None) -> Path:
    """The study's folder: ``evidence/study``, or a preset's ``evidence/study-<preset>/<preset>``."""
    return work / "evidence" / "study" if preset is None else work / "evidence" / f"study-{preset}" / preset


def run_study(work: Path, arms: str, epochs: int, fewshot: str, shapes: int, preset: str | None = None) -> None:
    out = study_folder(work, preset)
    if (out / "table.md").exists():
        return
    ways, shots, folds, query, fs_epochs = (int(x) for x in fewshot.split(","))
    num_group = _num_group(work)
    chosen = ["--set", f"arms=[{arms}]", "--set", f"out={work / 'evidence' / 'study'}"] if preset is None else \
        ["--preset", preset, "--set", f"out={out.parent}"]   # a preset writes into <out>/<preset>
    stage(work, "study" if preset is None else f"study-{preset}", ["study", *chosen,
                          "--set", f"stores.real={work / STORE}",
                          "--set", "pretrain.baseline_seeds=1",   # the arms' own probes judge them
                          "--set", "finetune_seeds=[0]", "--set", f"finetune.epochs={epochs}",
                          "--set", "finetune.votes=0", "--set", f"finetune.num_group={num_group}",
                          "--set", f"fewshot.ways=[{ways}]", "--set", f"fewshot.shots=[{shots}]",
                          "--set", f"fewshot.folds={folds}", "--set", f"fewshot.query={query}",
                          "--set", f"fewshot_finetune.epochs={fs_epochs}", "--set", "fewshot_finetune.votes=0",
                          "--set", f"fewshot_finetune.num_group={num_group}"],
          work / "cache", shapes)


def psb_stores(work: Path, psb: Path, shapes: int) -> tuple[Path, Path]:
    """The Labeled PSB folder as a classification and a part store (2,048 points, one split)."""
    folder = work / "evidence" / "psb"
    stores = folder / "cls.zarr", folder / "parts.zarr"
    cache = seed_cache(work, "psb")
    for fmt, store in zip(("labeled-psb", "labeled-psb-parts"), stores):
        if not (store / "zarr.json").exists():
            stage(work, f"convert-{fmt}", ["convert", fmt, str(psb), "--out", str(store)], cache, shapes)
    return stores


def run_transfer(work: Path, psb: Path, seeds: list[int], epochs: int, shapes: int) -> None:
    cls_store, _ = psb_stores(work, psb, shapes)
    num_group = _num_group(work)
    for seed in seeds:
        cache = seed_cache(work, f"seed-{seed}")
        out = cache / "metrics" / "transfer"
        if not (out / "metrics.json").exists():
            stage(work, f"transfer-svm-seed-{seed}",
                  ["evaluate", "--checkpoint", str(cache / "pretrain" / "model.pt"), "--store", str(cls_store),
                   "--baseline", "--out", str(out), "--set", "tasks=[svm]", "--set", f"seed={seed}"], cache, shapes)
    pretrained_vs_scratch(work, "psb-finetune", seeds, "finetune",
                          ["finetune", "--store", str(cls_store), "--epochs", str(epochs), "--votes", "0",
                           "--set", f"num_group={num_group}"], shapes)


def run_parts(work: Path, psb: Path, seeds: list[int], epochs: int, shapes: int) -> None:
    _, parts_store = psb_stores(work, psb, shapes)
    num_group = _num_group(work)
    pretrained_vs_scratch(work, "parts", seeds, "partseg",
                          ["finetune", "--task", "partseg", "--set", f"store={parts_store}", "--set", f"epochs={epochs}",
                           "--set", "n_points=1024", "--set", f"num_group={num_group}", "--set", "group_size=32"], shapes)


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def summarise(work: Path, seeds: list[int]) -> dict:
    """Per figure: the pretrained and random-init values per seed, and the table of mean ± std."""
    rows: dict[str, dict[str, list]] = {}

    def add(figure: str, pretrained, random_init) -> None:
        row = rows.setdefault(figure, {"pretrained": [], "random_init": []})
        row["pretrained"].append(pretrained)
        row["random_init"].append(random_init)

    for seed in seeds:
        cache = work / "evidence" / f"seed-{seed}" / "cache" / "metrics"
        if (cache / "pretrain" / "details.json").exists():
            d = read(cache / "pretrain" / "details.json")
            add("k-NN (monitor; random init: max over BN treatments of 3 twins' mean)", d.get("probe_knn"),
                d.get("probe_knn_random_init"))
        if (cache / "evaluate" / "details.json").exists():
            d = read(cache / "evaluate" / "details.json")
            for name, label in (("svm", "linear SVM, raw"), ("svm_standardized", "linear SVM, standardised"),
                                ("zeroshot_top1", "zero-shot top-1"), ("zeroshot_top5", "zero-shot top-5")):
                v = d.get("verdict", {}).get(name)
                if v:
                    add(f"{label} (random init: strongest BN treatment)", v["pretrained"], v["random_init"])
            for setting, r in (d.get("fewshot") or {}).items():
                add(f"few-shot {setting}", r.get("mean"), (d.get("random_init", {}).get("fewshot") or {})
                    .get(setting, {}).get("mean"))
        if (cache / "fewshot_probe" / "details.json").exists():
            for figure, v in read(cache / "fewshot_probe" / "details.json").get("verdict", {}).items():
                setting = figure.removeprefix("fewshot_probe_").removesuffix("_standardized")
                kind = "standardised" if figure.endswith("_standardized") else "raw"
                add(f"few-shot probe {setting}, {kind} (frozen; random init: strongest BN treatment)",
                    v["pretrained"], v["random_init"])
        pre = work / "evidence" / f"finetune-pretrained-{seed}" / "cache" / "metrics" / "finetune" / "details.json"
        scratch = work / "evidence" / f"finetune-scratch-{seed}" / "cache" / "metrics" / "finetune" / "details.json"
        if pre.exists() and scratch.exists():
            add("fine-tuning, test accuracy (random init: from scratch)", read(pre)["test_acc"], read(scratch)["test_acc"])
        transfer = work / "evidence" / f"seed-{seed}" / "cache" / "metrics" / "transfer" / "details.json"
        if transfer.exists():
            d = read(transfer)
            for name, label in (("svm", "Labeled PSB: linear SVM, raw"), ("svm_standardized", "Labeled PSB: linear SVM, standardised")):
                v = d.get("verdict", {}).get(name)
                if v:
                    add(f"{label} (random init: strongest BN treatment)", v["pretrained"], v["random_init"])
        runs = {kind: work / "evidence" / f"psb-finetune-{kind}-{seed}" / "cache" / "metrics" / "finetune" / "details.json"
                for kind in ("pretrained", "scratch")}
        if all(p.exists() for p in runs.values()):
            add("Labeled PSB: fine-tuning, test accuracy (random init: from scratch)",
                read(runs["pretrained"])["test_acc"], read(runs["scratch"])["test_acc"])
        parts = {kind: work / "evidence" / f"parts-{kind}-{seed}" / "cache" / "metrics" / "partseg" / "details.json"
                 for kind in ("pretrained", "scratch")}
        if all(p.exists() for p in parts.values()):
            for key, label in (("test_instance_miou", "instance"), ("test_class_miou", "class")):
                add(f"Labeled PSB parts: {label} mIoU (random init: from scratch)",
                    read(parts["pretrained"])[key], read(parts["scratch"])[key])
    table = ["| held-out figure (%) | pretrained | random init | margin | seeds |", "|---|---|---|---|---|"]
    for figure, row in rows.items():
        margins = [p - r for p, r in zip(row["pretrained"], row["random_init"]) if p is not None and r is not None]
        table.append(f"| {figure} | {mean_std(row['pretrained'])} | {mean_std(row['random_init'])} | "
                     f"{mean_std(margins)} | {len(margins)} |")
    return {"rows": rows, "table": "\n".join(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the --work folder of bench/real_meshes.py")
    parser.add_argument("--steps", default="seeds,ceiling,transfer,finetune,parts,study",
                        help="any of seeds, ceiling, transfer, finetune, parts, study (run in that order)")
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds")
    parser.add_argument("--fewshot", default="5,10,5,10,10",
                        help="ways,shots,folds,query,fine-tune epochs of evaluate's few-shot; none: no few-shot")
    parser.add_argument("--fewshot-probe", default="5,10/10,20/10/5",
                        help="ways/shots/folds/query of the frozen few-shot probe (ways, shots: comma lists); "
                             "none: no probe")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--study-arms", default="random_init,rec_only,distill_only,recon_std,reconpp",
                        help="the study's arms (recon.downstream.study.ARMS)")
    parser.add_argument("--study-preset", default=None,
                        help="run a paper table's preset (docs/studies.md) instead of --study-arms, into "
                             "evidence/study-<preset>/<preset>")
    parser.add_argument("--study-finetune-epochs", type=int, default=2)
    parser.add_argument("--study-fewshot", default="5,10,5,10,20",
                        help="the study's few-shot: ways,shots,folds,query,fine-tune epochs (the demo recipe)")
    parser.add_argument("--psb", type=Path, help="the Labeled PSB LabeledDB_new folder (transfer, parts)")
    parser.add_argument("--psb-epochs", type=int, default=10, help="fine-tuning epochs on Labeled PSB")
    args = parser.parse_args()
    work = args.work.resolve()
    if not (work / STORE).exists():
        raise SystemExit(f"{work / STORE} not found: run bench/real_meshes.py --work {work} first")
    seeds = [int(s) for s in args.seeds.split(",")]
    import polars as pl

    shapes = pl.read_parquet(work / "cache" / "shapes.parquet").height
    steps = args.steps.split(",")
    report_path = work / "evidence" / "evidence.json"
    report = read(report_path) if report_path.exists() else {}
    if "seeds" in steps:
        run_seeds(work, seeds, args.fewshot, args.fewshot_probe, shapes)
    if "ceiling" in steps:
        report["teacher_ceiling"] = teacher_ceiling(work)
        print("teacher ceiling:", report["teacher_ceiling"], flush=True)
    if {"transfer", "parts"} & set(steps) and not args.psb:
        raise SystemExit("transfer and parts need --psb /path/to/LabeledDB_new")
    if "transfer" in steps:
        run_transfer(work, args.psb.resolve(), seeds, args.psb_epochs, shapes)
    if "finetune" in steps:
        run_finetune(work, seeds, args.finetune_epochs, shapes)
    if "parts" in steps:
        run_parts(work, args.psb.resolve(), seeds, args.psb_epochs, shapes)
    if "study" in steps:
        run_study(work, args.study_arms, args.study_finetune_epochs, args.study_fewshot, shapes, args.study_preset)
    summary = summarise(work, seeds)
    report.update(seeds=seeds, fewshot=args.fewshot, fewshot_probe=args.fewshot_probe,
                  finetune_epochs=args.finetune_epochs, **summary)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    text = summary["table"]
    if "teacher_ceiling" in report:
        c = report["teacher_ceiling"]
        text += f"\n\nimage teacher's own held-out k-NN {c['knn']:.1f}, linear SVM {c['svm']:.1f} (the ceiling)"
    if (work / "evidence" / "study" / "table.md").exists():
        text += "\n\n" + (work / "evidence" / "study" / "table.md").read_text()
    (work / "evidence" / "evidence.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if not (ROOT / "cli.py").exists():
        raise SystemExit("run from a clone of recon")
    main()
