"""The published numbers shown beside ours: the papers' COCO AP (percent) and training-time ratio,
and the mmdet 3.3.0 model zoo's rows (box AP, training memory, inference time), read from the
metafiles of the installed wheel without importing mmdet."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from detection.config import load_yaml

PAPER_ROWS: dict[str, dict[str, dict[str, float]]] = {
    "faster_rcnn": {
        "baseline": {"AP": 35.9, "AP50": 58.0, "AP75": 38.4, "APs": 21.2, "APm": 39.5, "APl": 46.4},
        "IS": {"AP": 36.8, "AP50": 58.0, "AP75": 40.0, "APs": 21.1, "APm": 40.3, "APl": 48.2},
        "IS+BFP": {"AP": 37.7, "AP50": 59.4, "AP75": 40.9, "APs": 22.4, "APm": 41.3, "APl": 49.3},
        "IS+BFP+BL": {"AP": 38.5, "AP50": 59.3, "AP75": 42.0, "APs": 22.9, "APm": 42.1, "APl": 50.5,
                      "train_time_ratio": 1.06},
    },
    "retinanet": {
        "baseline": {"AP": 35.8},
        "BFP+BL": {"AP": 37.8, "dAP": 2.0},
        "IoU-cls": {"dAP": 0.7},
        "IoU-loc": {"dAP": 0.8},
        "IoU-cls+IoU-loc": {"dAP": 1.3},
    },
}
"""Per detector and combination: the published numbers (ΔAP where only the gain is published;
``train_time_ratio``: training time relative to the baseline, about 1.06 for Libra R-CNN)."""

PAPER_SOURCES: dict[str, str] = {
    "faster_rcnn": ("Libra R-CNN (Pang et al., CVPR 2019), Table 2: Faster R-CNN R50-FPN, 1x, COCO val2017; "
                    "training time about 1.06x the baseline's."),
    "retinanet": ("Libra R-CNN: RetinaNet R50-FPN 1x 35.8 -> Libra RetinaNet (BFP+BL) 37.8, COCO test-dev; "
                  "IoU-balanced losses (Wu et al. 2019), RetinaNet R50: gains only (cls +0.7, loc +0.8, "
                  "both +1.3 AP; best eta = lambda = 1.5)."),
}


def paper_row(detector: str, combination: str) -> dict[str, float]:
    """The published numbers of ``combination`` (empty if none), with ΔAP derived where both APs are known."""
    rows = PAPER_ROWS.get(detector, {})
    row = dict(rows.get(combination, {}))
    base = rows.get("baseline", {}).get("AP")
    if "dAP" not in row and "AP" in row and base is not None and combination != "baseline":
        row["dAP"] = round(row["AP"] - base, 1)
    return row


MMDET_VERSION = "3.3.0"
MODEL_ZOO: dict[str, dict[str, tuple[str, str]]] = {
    "faster_rcnn": {"baseline": ("faster_rcnn", "faster-rcnn_r50_fpn_1x_coco"),
                    "IS+BFP+BL": ("libra_rcnn", "libra-faster-rcnn_r50_fpn_1x_coco")},
    "retinanet": {"baseline": ("retinanet", "retinanet_r50_fpn_1x_coco"),
                  "BFP+BL": ("libra_rcnn", "libra-retinanet_r50_fpn_1x_coco")},
}
"""Per detector and combination: (config folder, model name) of the mmdet model-zoo row shown."""


@dataclass(frozen=True)
class ModelZooRow:
    """One model of an mmdet metafile: COCO box AP (percent), training memory (MB, as the zoo's
    GB x 1024), inference time (ms per image) and the hardware/mode it was timed on."""

    detector: str
    combination: str
    config: str
    metafile: str
    """Path of the metafile inside the mmdet package, e.g. ``.mim/configs/libra_rcnn/metafile.yml``."""
    AP: float
    train_mem_mb: float | None
    infer_ms_per_image: float | None
    infer_hardware: str

    @property
    def citation(self) -> str:
        return f"{self.config} (mmdet/{self.metafile}, mmdet {MMDET_VERSION} model zoo)"


def mmdet_configs_dir() -> Path | None:
    """``mmdet/.mim/configs`` of the installed wheel, located without importing mmdet (None if absent)."""
    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"
    return folder if folder.is_dir() else None


def _zoo_row(detector: str, combination: str, configs: Path, folder: str, name: str) -> ModelZooRow:
    metafile = configs / folder / "metafile.yml"
    if not metafile.exists():
        raise FileNotFoundError(f"{metafile}: no mmdet model-zoo metafile; install mmdet {MMDET_VERSION} "
                                f"(`pip install mmdet=={MMDET_VERSION}`)")
    models = {m["Name"]: m for m in load_yaml(metafile.read_text(), str(metafile))["Models"]}
    if name not in models:
        raise KeyError(f"{metafile}: no model named {name!r}; is mmdet {MMDET_VERSION} installed?")
    model = models[name]
    meta = model.get("Metadata", {})
    box_ap = next(r["Metrics"]["box AP"] for r in model["Results"] if "box AP" in r.get("Metrics", {}))
    memory = meta.get("Training Memory (GB)")
    timing = (meta.get("inference time (ms/im)") or [{}])[0]
    hardware = ", ".join(f"{timing[k]}" for k in ("hardware", "mode") if k in timing)
    if "batch size" in timing:
        hardware += f", batch {timing['batch size']}"
    return ModelZooRow(detector, combination, name, f".mim/configs/{folder}/metafile.yml", float(box_ap),
                       None if memory is None else float(memory) * 1024, timing.get("value"), hardware)


def model_zoo_rows(configs: Path | None = None) -> list[ModelZooRow] | None:
    """The rows of :data:`MODEL_ZOO` read from the metafiles under ``configs`` (default: the installed
    mmdet's); None when mmdet is not installed."""
    configs = configs or mmdet_configs_dir()
    if configs is None:
        return None
    return [_zoo_row(detector, combination, configs, folder, name)
            for detector, combinations in MODEL_ZOO.items() for combination, (folder, name) in combinations.items()]
