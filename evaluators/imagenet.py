"""ImageNet-style classification accuracy: top-1 (primary, `top1`) and `top5`.

Data, in a folder:
- images plus a label file (tsv/csv/txt, header optional): `file -> class index`, or `file -> synset id` mapped to
  an index through a synset list (`synset_to_index.tsv` with columns index/synset, or one synset per line in index
  order such as LOC_synset_mapping.txt); or
- an ImageFolder tree `<class name or synset>/*.jpg` (classes sorted; synset folders use the synset list if any).

Samples are sorted by file name; `skip` drops the first n (typically the calibration images) and
`evaluate(limit=n)` scores the first n of the rest.

Preprocessing: shorter side to 256/224 of the crop (PIL bilinear), centre crop, (x - mean) / std on 0-255 values.
Mean/std come from the caller (e.g. an xquant config), else from the model's metadata when it states them
(`mean`/`std` lists, or a "(x-0.5)/0.5"-style formula after x/255), else the standard ImageNet values.
"""
from __future__ import annotations

import ast
import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sensq.errors import SensqError
from sensq.evaluators.base import EvalResult, Stopwatch, resolve_indices, topk_correct
from sensq.evaluators.pixel_store import PixelStore
from sensq.evaluators.samples import MeanSamples
from sensq.preprocess import IMAGE_SUFFIXES, ImagePreprocess
from sensq.runtime import make_session

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
SYNSET = re.compile(r"^n\d{8}$")
SYNSET_IN_TEXT = re.compile(r"\bn\d{8}\b")
FILE_COLUMNS = ("file", "filename", "file_name", "path", "image", "img", "name")
INDEX_COLUMNS = ("index", "label", "class", "class_index", "target", "class_id", "idx")
SYNSET_COLUMNS = ("synset", "wnid", "synset_id")
LABEL_FILE_NAMES = ("images_labels.tsv", "labels.tsv", "labels.txt", "labels.csv", "val_labels.txt", "val.txt",
                    "val_labels.tsv", "ground_truth.txt")
SYNSET_FILE_NAMES = ("synset_to_index.tsv", "synsets.txt", "synset_words.txt", "LOC_synset_mapping.txt", "synsets.tsv")


@dataclass
class ClassificationSet:
    files: list[Path]  # sorted by file name
    labels: np.ndarray  # class index per file
    source: str

    def __len__(self) -> int:
        return len(self.files)


def _split(line: str) -> list[str]:
    if "\t" in line:
        return [c.strip() for c in line.split("\t")]
    if "," in line:
        return [c.strip() for c in next(csv.reader([line]))]
    return line.split()


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def read_synsets(path: Path) -> dict[str, int]:
    """synset -> class index, from an index/synset table (header optional) or one synset per line in index order."""
    if not path.is_file():
        raise SensqError(f"synset list not found: {path}", "pass synsets=FILE (e.g. synset_to_index.tsv) or class indices in the label file")
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    header = [c.lower() for c in _split(lines[0])] if lines else []
    if any(c in SYNSET_COLUMNS for c in header):
        si = next(header.index(c) for c in SYNSET_COLUMNS if c in header)
        ii = next((header.index(c) for c in INDEX_COLUMNS if c in header), None)
        rows = [_split(l) for l in lines[1:]]
        return {r[si]: (int(r[ii]) if ii is not None else n) for n, r in enumerate(rows)}
    out = {}
    for n, line in enumerate(lines):  # e.g. "n01440764 tench, Tinca tinca" or "0<TAB>n01440764"
        syn = SYNSET_IN_TEXT.search(line)
        if syn is None:
            raise SensqError(f"{path}: line {n + 1} has no synset id (nXXXXXXXX)", "use a synset list such as synset_to_index.tsv")
        lead = line.split()[0]
        out[syn.group(0)] = int(lead) if _is_int(lead) else n
    return out


def find_synsets(folder: Path) -> Path | None:
    return next((folder / n for n in SYNSET_FILE_NAMES if (folder / n).is_file()), None)


def find_label_file(folder: Path) -> Path | None:
    for n in LABEL_FILE_NAMES:
        if (folder / n).is_file():
            return folder / n
    cands = [p for ext in ("tsv", "csv", "txt") for p in sorted(folder.glob(f"*label*.{ext}"))]
    return cands[0] if cands else None


def _resolve(file: str, bases: list[Path]) -> Path:
    for b in bases:
        if (b / file).is_file():
            return b / file
    return bases[0] / file


def read_label_file(path: Path, bases: list[Path], synsets: Path | None = None) -> tuple[list[Path], list[int]]:
    """(files, class indices) from `file<TAB>index`, `file<TAB>synset` or a table with a header naming them."""
    rows = [_split(l) for l in path.read_text(errors="replace").splitlines() if l.strip()]
    if not rows:
        raise SensqError(f"label file {path} is empty", "write one line per image: file<TAB>class_index")
    header = [c.lower() for c in rows[0]]
    has_header = any(c in FILE_COLUMNS + INDEX_COLUMNS + SYNSET_COLUMNS for c in header)
    if has_header:
        fi = next((header.index(c) for c in FILE_COLUMNS if c in header), 0)
        ii = next((header.index(c) for c in INDEX_COLUMNS if c in header), None)
        si = next((header.index(c) for c in SYNSET_COLUMNS if c in header), None)
        rows = rows[1:]
    else:
        first = rows[0]
        fi = 0
        ii = next((i for i in range(len(first) - 1, 0, -1) if _is_int(first[i])), None)
        si = next((i for i in range(1, len(first)) if SYNSET.match(first[i])), None)
    if ii is None and si is None:
        raise SensqError(f"{path}: no class column (an integer index or a synset id) found",
                         "write one line per image: file<TAB>class_index (or file<TAB>synset with a synset list)")
    syn_map = None
    if ii is None:
        syn_path = synsets or find_synsets(path.parent)
        if syn_path is None:
            raise SensqError(f"{path} gives synsets but no synset list was found",
                             "pass synsets=FILE (e.g. synset_to_index.tsv) or put it next to the label file")
        syn_map = read_synsets(Path(syn_path))
    files, labels = [], []
    for n, r in enumerate(rows, 2 if has_header else 1):
        try:
            label = int(r[ii]) if ii is not None else syn_map[r[si]]
            files.append(_resolve(r[fi], bases))
        except (IndexError, ValueError):
            raise SensqError(f"{path}:{n}: cannot read file and class from {r!r}", "write file<TAB>class_index per line") from None
        except KeyError:
            raise SensqError(f"{path}:{n}: synset {r[si]} is not in the synset list", "pass the synset list of the model's classes") from None
        labels.append(label)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise SensqError(f"{len(missing)} of {len(files)} images listed in {path.name} are missing, e.g. {missing[0]}",
                         "put the images next to the label file (paths are relative to it) or fix the paths")
    return files, labels


def read_image_tree(root: Path, synsets: Path | None = None) -> tuple[list[Path], list[int]]:
    """ImageFolder layout: one sub-folder per class, classes sorted (synset folders use the synset list if given)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and any(
        f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir()))
    syn_path = synsets or find_synsets(root)
    syn_map = read_synsets(Path(syn_path)) if syn_path and all(SYNSET.match(c) for c in classes) else None
    files, labels = [], []
    for i, c in enumerate(classes):
        idx = syn_map[c] if syn_map and c in syn_map else i
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(idx)
    return files, labels


def load_imagenet(data: str | Path, labels: str | Path | None = None, synsets: str | Path | None = None,
                  skip: int = 0) -> ClassificationSet:
    """A classification set from a folder (label file or class sub-folders), sorted by file name, first `skip` dropped."""
    data = Path(data)
    if not data.is_dir():
        raise SensqError(f"data folder not found: {data}", "pass the folder holding the images and the label file")
    syn = Path(synsets) if synsets is not None else None
    if labels is not None:
        lab = Path(labels) if Path(labels).is_absolute() or Path(labels).is_file() else data / labels
        if not lab.is_file():
            raise SensqError(f"label file not found: {labels}", "pass labels=FILE (file<TAB>class_index per line)")
        files, idx = read_label_file(lab, [lab.parent, data, data / "images"], syn)
        source = f"imagenet:{lab}"
    elif (lab := find_label_file(data)) is not None:
        files, idx = read_label_file(lab, [lab.parent, data, data / "images"], syn)
        source = f"imagenet:{lab}"
    else:
        files, idx = read_image_tree(data, syn)
        source = f"imagefolder:{data}"
        if not files:
            raise SensqError(f"no label file and no class sub-folders with images in {data}",
                             "add a labels file (file<TAB>class_index) or use one sub-folder of images per class")
    order = sorted(range(len(files)), key=lambda i: (files[i].name, str(files[i])))
    order = order[int(skip):]
    if not order:
        raise SensqError(f"no images left to evaluate in {data} (found {len(files)}, skip={skip})", "lower skip or add images")
    return ClassificationSet([files[i] for i in order], np.asarray([idx[i] for i in order], np.int64), source)


_FORMULA = re.compile(r"\(\s*x\s*-\s*([0-9.]+)\s*\)\s*/\s*([0-9.]+)")


def _as_255(values: list[float], scaled_by_255: bool) -> list[float]:
    return [v * 255.0 for v in values] if scaled_by_255 else values


def metadata_normalization(metadata: dict[str, str]) -> tuple[list[float], list[float]] | None:
    """(mean, std) on the 0-255 scale if the model's metadata states them, else None."""
    low = {k.lower(): v for k, v in metadata.items()}
    for mk, sk in (("mean", "std"), ("mean_values", "std_values"), ("norm_mean", "norm_std"), ("mean_value", "std_value")):
        if mk in low and sk in low:
            try:
                mean = [float(v) for v in np.atleast_1d(ast.literal_eval(low[mk]))]
                std = [float(v) for v in np.atleast_1d(ast.literal_eval(low[sk]))]
            except (ValueError, SyntaxError):
                continue
            unit = max(mean + std) <= 1.0  # given on the 0-1 scale
            return _as_255(mean, unit), _as_255(std, unit)
    for key in sorted(low, key=lambda k: "native" not in k):  # the model's native preprocessing first
        m = _FORMULA.search(low[key]) if "preproc" in key or "normal" in key else None
        if m:
            mean, std = float(m.group(1)), float(m.group(2))
            unit = "/255" in low[key].replace(" ", "") and max(mean, std) <= 1.0
            return _as_255([mean] * 3, unit), _as_255([std] * 3, unit)
    return None


class ClassificationEvaluator:
    """top-1 / top-5 accuracy; uint8 crops cached on disk (evaluators/pixel_store.py), batched inference when the
    batch dimension is dynamic. Memory does not grow with the evaluation set (per-sample results are 3 numbers)."""

    name = "imagenet"
    primary = "top1"

    def __init__(self, dataset: ClassificationSet, input_size=None, mean=None, std=None, color_format: str = "rgb",
                 batch_size: int = 32, threads: int | None = None, label_offset: int | None = None,
                 pixel_cache: str | Path | None = None):
        self.data = dataset
        self.input_size = (int(input_size), int(input_size)) if isinstance(input_size, (int, float)) else (
            tuple(int(v) for v in input_size) if input_size is not None else None)
        self.mean, self.std = mean, std
        self.color_format, self.batch_size, self.threads, self.label_offset = color_format, batch_size, threads, label_offset
        self.preprocessor: ImagePreprocess | None = None  # of the cached pixels
        self.pixel_cache = pixel_cache  # folder of the preprocessed crops (default $SENSQ_CACHE/pixels)
        self.store: PixelStore | None = None  # the crops of the current input size, on disk

    def __len__(self) -> int:
        return len(self.data)

    def _make_preprocessor(self, hw: tuple[int, int], metadata: dict[str, str]) -> tuple[ImagePreprocess, str]:
        hint = metadata_normalization(metadata) if self.mean is None and self.std is None else None
        if self.mean is not None or self.std is not None:
            mean, std, origin = self.mean if self.mean is not None else [0.0], self.std if self.std is not None else [1.0], "given"
        elif hint:
            (mean, std), origin = hint, "model metadata"
        else:
            mean, std, origin = IMAGENET_MEAN, IMAGENET_STD, "imagenet default"
        pre = ImagePreprocess(hw[0], hw[1], resize="imagenet", color_format=self.color_format, mean=list(mean), std=list(std))
        if self.store is None or (self.store.pre.height, self.store.pre.width) != hw:
            self.store = PixelStore(self.pixel_cache, pre, self.data.files)  # crops depend only on the size
        self.preprocessor = pre
        return pre, origin

    def _labels(self, batch: list[int], n_classes: int) -> np.ndarray:
        """Labels of `batch` in the model's class indices (TF-slim models put a background class at 0: 1001 outputs)."""
        offset = self.label_offset if self.label_offset is not None else (1 if n_classes == 1001 else 0)
        labels = self.data.labels[batch] + offset
        if labels.max() >= n_classes:
            raise SensqError(f"label {int(labels.max())} is outside the model's {n_classes} classes",
                             "check that the label file uses the model's class indices (or pass label_offset)")
        return labels

    def signature(self) -> str:
        return (f"{self.name}:{self.data.source}:{len(self.data)}:{self.data.files[0].name}:size={self.input_size}"
                f":mean={self.mean}:std={self.std}:color={self.color_format}:offset={self.label_offset}")

    def evaluate(self, model, limit: int | None = None, progress: bool = True, indices=None) -> EvalResult:
        t0 = time.perf_counter()
        idx = resolve_indices(len(self.data), limit, indices)
        session = make_session(model, self.threads)
        inp = session.get_inputs()[0]
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        shape = inp.shape
        static_hw = tuple(int(s) for s in shape[2:]) if len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]) else None
        hw = static_hw or self.input_size or (224, 224)
        pre, origin = self._make_preprocessor(hw, metadata)
        self.store.fill(idx, progress, "imagenet: preprocess")
        static_bs = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        bs = static_bs or max(1, int(self.batch_size))
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        watch = Stopwatch()
        top1, top5, pred = [], [], []
        bar = tqdm(total=len(idx), desc="imagenet: evaluate", disable=not progress, leave=False)
        for batch, px, _ in self.store.batches(idx, bs):
            real = len(batch)
            if static_bs and real < bs:
                px = np.concatenate([px, np.repeat(px[-1:], bs - real, axis=0)])  # static batch: pad, drop the padding
            x = pre.normalize(px).astype(dtype, copy=False)
            with watch:
                out = session.run(None, {inp.name: x})[0]
            logits = np.asarray(out, np.float32).reshape(len(px), -1)[:real]
            # scored per batch: only three numbers per sample are kept, not the logits
            labels = self._labels(batch, logits.shape[1])
            top1.append(topk_correct(logits, labels, 1))
            top5.append(topk_correct(logits, labels, min(5, logits.shape[1])))
            pred.append(logits.argmax(1))
            bar.update(real)
        bar.close()
        top1, top5 = np.concatenate(top1), np.concatenate(top5)
        samples = MeanSamples(np.asarray(idx, np.int64), {"top1": top1, "top5": top5, "pred": np.concatenate(pred)}, "top1")
        return EvalResult(metrics={"top1": float(top1.mean()), "top5": float(top5.mean())}, primary=self.primary,
                          n_samples=len(idx), seconds=time.perf_counter() - t0, inference_seconds=watch.total,
                          samples=samples,
                          extra={"input_size": list(hw), "mean": list(pre.mean), "std": list(pre.std),
                                 "normalization": origin, "batch_size": bs})


def make_imagenet_evaluator(data, labels=None, synsets=None, skip: int = 0, **options) -> ClassificationEvaluator:
    return ClassificationEvaluator(load_imagenet(data, labels, synsets, skip), **options)
