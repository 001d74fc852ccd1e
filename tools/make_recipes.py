"""Write the flat YAML recipes under configs/ (one complete file per experiment; no inheritance at load time).

Run ``python tools/make_recipes.py`` after changing a default here; the recipes are committed. Naming:
``<method>_<family>_<teacher>_<student>_<dataset>.yaml`` (``baseline_...`` for a student trained alone,
``teacher_...`` for the teacher run that the distillation recipes load).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from detkd.losses.fgd import FGD_DEFAULTS  # official per-detector FGD hyper-parameters (methods.md §3.2)
from detkd.losses.lgd import scaled_warmup

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "configs"

FAMILIES = ["retinanet", "fcos", "gfl", "faster_rcnn"]

# ---------------------------------------------------------------------------------------------- datasets
DATASETS = {
    "synth": {
        "data": {"format": "synthetic", "root": ".cache/detkd/synthetic", "batch_size": 8,
                 "synthetic": {"num_train": 320, "num_val": 80, "image_size": 160, "max_objects": 6, "seed": 0}},
        "size": 160, "epochs": 12, "student": ("resnet18", 64, 2), "teacher": ("resnet50", 128, 4),
    },
    "bccd": {
        "data": {"format": "coco", "root": "../shared/data/bccd/coco",
                 "image_root": "../shared/data/bccd/voc/JPEGImages", "batch_size": 4},
        "size": 320, "epochs": 24, "student": ("resnet18", 64, 2), "teacher": ("resnet50", 128, 4),
    },
    "coco": {
        "data": {"format": "coco", "root": "data/coco", "ann_file": "data/coco/annotations/instances_{split}2017.json",
                 "image_root": "data/coco/{split}2017", "train_split": "train", "val_split": "val",
                 "batch_size": 2, "num_workers": 4},
        "size": 800, "epochs": 24, "student": ("resnet50", 256, 4), "teacher": ("resnet101", 256, 4),
    },
}

# ----------------------------------------------------------------------------------------------- methods
DENSE_LEVELS = ["p3", "p4", "p5", "p6", "p7"]
TWO_STAGE_LEVELS = ["p2", "p3", "p4", "p5"]  # FGD and CWD on Faster R-CNN: the max-pooled P6 is not distilled


def levels(family: str) -> list[str]:
    return TWO_STAGE_LEVELS if family == "faster_rcnn" else DENSE_LEVELS


# LGD's reference schedule: 180k iterations with 30k of distillation warm-up (student detached) and 20k with a
# frozen backbone. CPU-sized recipes keep those fractions (1/6 and 1/9) of their own length.
LGD_WARMUP = {
    "coco": {"pre_nondistill_steps": 30000, "freeze_backbone_steps": 20000, "post_nondistill_steps": 0},
    "synth": {**scaled_warmup(480), "post_nondistill_steps": 0},  # 12 epochs of 40 steps
    "bccd": {**scaled_warmup(1248), "post_nondistill_steps": 0},  # 24 epochs of 52 steps
}


def method_losses(method: str, family: str, dataset: str = "synth") -> tuple[list[dict], dict]:
    """Loss list and extra distill-section keys for one method on one family."""
    if method == "cwd":
        return [{"method": "cwd", "weight": 10.0, "levels": levels(family), "params": {"tau": 1.0}}], {}
    if method == "fgd":  # on COCO the student has the teacher's widths, so FGD inherits as its authors run it
        extra = {"inherit": True} if dataset == "coco" else {}
        return [{"method": "fgd", "weight": 1.0, "levels": levels(family), "params": dict(FGD_DEFAULTS[family])}], extra
    if method == "fgd_inherit":  # FGD as its authors run it: the student starts from the teacher's neck and head
        return method_losses("fgd", family, dataset)[0], {"inherit": True}
    if method == "hint":
        lv = ["p2", "p3", "p4"] if family == "faster_rcnn" else ["p3", "p4", "p5"]
        return [{"method": "hint", "weight": 0.5, "levels": lv, "params": {"norm": "l2"}}], {}
    if method == "ld":
        return [
            {"method": "ld", "weight": 0.25, "params": {"tau": 10.0}},
            {"method": "kd", "weight": 10.0, "params": {"tau": 2.0}},
            {"method": "vlr_ld", "weight": 0.25, "params": {"tau": 10.0, "alpha": 0.25}},
        ], {}
    if method == "ld_tau2":  # LD for small data trained from scratch (README, "LD at a lower temperature"): Main LD
        # and VLR LD at tau 2 instead of 10, Main KD at weight 0.25 instead of 10; everything else official
        ld, _ = method_losses("ld", family, dataset)
        for term in ld:
            if term["method"] == "kd":
                term["weight"] = 0.25
            else:
                term["params"]["tau"] = 2.0
        return ld, {}
    if method == "ld_fgd":
        ld, _ = method_losses("ld", family, dataset)
        fgd, _ = method_losses("fgd", family, dataset)
        return ld + fgd, {}
    if method in ("chen", "chen_dense"):
        # L_cls = mu * L_hard + (1 - mu) * L_soft (mu goes to the task's classification terms), the teacher-bounded box
        # loss, and a hint on one level. chen: RPN + RoI head of Faster R-CNN; chen_dense: every location of a dense
        # head (a background column for sigmoid heads, see ChenDenseLoss)
        mu, two_stage = 0.5, method == "chen"
        params = {"T": 1.0, "bg_weight": 1.5, **({"bg_index": "first"} if two_stage else {}), "mu": mu, "nu": 0.5,
                  "margin": 0.0}
        hint = {"method": "hint", "weight": 0.5, "levels": ["p3"], "params": {"norm": "l2"}}
        task = ["loss_classifier", "loss_objectness"] if two_stage else ["classification"]
        return [{"method": method, "weight": 1.0, "params": params}, hint], {"task_weights": dict.fromkeys(task, mu)}
    if method == "lgd":
        params = {"add_context": family != "fcos", "detach_appearance": family == "faster_rcnn"}
        params.update(LGD_WARMUP[dataset])
        return [{"method": "lgd", "weight": 1.0, "params": params}], {}
    raise ValueError(method)


# which methods go with which families
PLAN = {
    "cwd": FAMILIES, "fgd": FAMILIES, "hint": FAMILIES, "lgd": FAMILIES,
    "ld": ["gfl"], "ld_tau2": ["gfl"], "ld_fgd": ["gfl"], "chen": ["faster_rcnn"],
    "chen_dense": [f for f in FAMILIES if f != "faster_rcnn"],
    "fgd_inherit": FAMILIES,
}
#: (method, dataset) pairs not written: on COCO the student already has the teacher's widths and ``fgd`` inherits;
#: ``ld_tau2`` is a small-data setting, COCO keeps LD's official one
SKIP = {("fgd_inherit", "coco"), ("ld_tau2", "coco")}


def student_arch(method: str | None, spec: dict) -> tuple[str, int, int]:
    """The student's (backbone, FPN width, head convs); ``fgd_inherit`` gives it the teacher's neck and head widths,
    so that every neck/head tensor of the teacher fits it (its backbone stays the student's)."""
    if method == "fgd_inherit":
        return (spec["student"][0], *spec["teacher"][1:])
    return spec["student"]


def model(family: str, arch: tuple[str, int, int], size: int, coco: bool) -> dict:
    backbone, fpn, convs = arch
    m = {"family": family, "backbone": backbone, "fpn_channels": fpn, "head_convs": convs,
         "min_size": size, "max_size": 1333 if coco else size}
    if coco:
        m["backbone_norm"] = "frozen_bn"
        m["backbone_weights"] = f"ResNet{backbone[6:]}_Weights.IMAGENET1K_V1"
    if family == "faster_rcnn" and not coco:
        m["options"] = {"representation_size": 256}
    return m


def train(dataset: str, family: str, method: str | None) -> dict:
    spec = DATASETS[dataset]
    if dataset == "coco":
        lr = 0.02 if family == "faster_rcnn" else 0.01
        t = {"epochs": spec["epochs"], "optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4,
             "warmup_steps": 500, "warmup_factor": 0.001, "schedule": "step", "milestones": [0.667, 0.917]}
        if family == "gfl":
            t["epochs"] = 12
    else:
        t = {"epochs": spec["epochs"], "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 50,
             "schedule": "cosine", "grad_clip": 10.0}
    if method and "fgd" in method:
        t["grad_clip"] = 35.0  # every official FGD config clips at max-norm 35
    if method == "lgd" and dataset == "coco":
        t["find_unused_parameters"] = True  # DDP: the frozen-backbone warm-up leaves parameters without gradients
    return t


def recipe(method: str | None, family: str, dataset: str, role: str = "student") -> tuple[str, dict]:
    spec = DATASETS[dataset]
    coco = dataset == "coco"
    t_arch, s_arch = spec["teacher"], student_arch(method, spec)
    tname = f"{t_arch[0].replace('resnet', 'r')}"
    sname = f"{s_arch[0].replace('resnet', 'r')}"
    cfg: dict = {"seed": 0, "output_dir": "runs", "data": copy.deepcopy(spec["data"])}
    if role == "teacher":
        name = f"teacher_{family}_{tname}_{dataset}"
        cfg["model"] = model(family, t_arch, spec["size"], coco)
        cfg["train"] = train(dataset, family, None)
    elif method is None:
        name = f"baseline_{family}_{sname}_{dataset}"
        cfg["model"] = model(family, s_arch, spec["size"], coco)
        cfg["train"] = train(dataset, family, None)
    else:
        name = f"{method}_{family}_{tname}_{sname}_{dataset}" if method != "lgd" else f"lgd_{family}_{sname}_{dataset}"
        cfg["model"] = model(family, s_arch, spec["size"], coco)
        losses, extra = method_losses(method, family, dataset)
        if method != "lgd":
            cfg["teacher"] = model(family, t_arch, spec["size"], coco)
            cfg["teacher"]["weights"] = f"runs/teacher_{family}_{tname}_{dataset}/last.pt"
            cfg["teacher"].pop("backbone_weights", None)
        cfg["distill"] = {"losses": losses, **extra}
        cfg["train"] = train(dataset, family, method)
    cfg = {"name": name, **cfg}
    return name, cfg


def main() -> None:
    OUT.mkdir(exist_ok=True)
    written = []
    for dataset in DATASETS:
        for family in FAMILIES:
            for role, method in (("teacher", None), ("student", None)):
                written.append(recipe(method, family, dataset, role))
        for method, families in PLAN.items():
            for family in families:
                if (method, dataset) not in SKIP:
                    written.append(recipe(method, family, dataset))
    for name, cfg in written:
        text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)
        (OUT / f"{name}.yaml").write_text(f"# generated by tools/make_recipes.py\n{text}")
    print(f"wrote {len(written)} recipes to {OUT}")


if __name__ == "__main__":
    main()
