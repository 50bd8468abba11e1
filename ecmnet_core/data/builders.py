"""Find the samples of a dataset split: CamVid (SegNet layout), Cityscapes (official layout), a plain folder
with a ``classes.yaml``, or packed shards. ``build_dataset`` is the single entry point."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ecmnet_core.data.classes import CAMVID, CITYSCAPES, DatasetInfo, load_classes_yaml
from ecmnet_core.data.errors import DataError
from ecmnet_core.data.io import Sample
from ecmnet_core.data.layout import KINDS, UNION_SPLITS, keeps, parse_split
from ecmnet_core.data.validate import validate_samples

if TYPE_CHECKING:
    from ecmnet_core.data.shards import ShardReader

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CLASSES_FILES = ("classes.yaml", "classes.yml")


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (any of :data:`IMAGE_EXTENSIONS`, any case), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_label(folder: Path, stem: str) -> Path:
    """The label file for ``stem`` in ``folder``: ``stem.png`` or any image extension; missing -> stem.png."""
    png = folder / f"{stem}.png"
    if png.exists():
        return png
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return png  # validation reports it as missing, by name


def _resolve_list_path(entry: str, root: Path, list_dir: Path) -> Path:
    """A path from a list file: absolute paths from another machine (``/SegNet/CamVid/train/x.png``) are
    re-rooted at the first component that exists under ``root``; relative ones are taken from ``root``
    (or the list file's folder)."""
    p = Path(entry)
    if p.is_absolute():
        if p.exists():
            return p
        parts = p.parts[1:]
        for i in range(len(parts) - 1):
            if (root / parts[i]).is_dir():
                return root.joinpath(*parts[i:])
        return p
    for base in (root, list_dir):
        if (base / p).exists():
            return base / p
    return root / p


def _label_encoding(label: Path | None, kind: str) -> str:
    if kind == "cityscapes" and label is not None and label.name.endswith("_labelIds.png"):
        return "cityscapes"
    return "train"


def read_list_file(list_file: str | Path, root: Path, kind: str) -> list[Sample]:
    """Samples from an "image [label]" list file (SegNet absolute-prefix or LETNet relative style)."""
    list_file = Path(list_file)
    if not list_file.is_file() and (root / list_file).is_file():
        list_file = root / list_file
    try:
        lines = list_file.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"list file {list_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"list file {list_file} is not readable: {e}") from None
    samples = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise DataError(f"list file {list_file} line {n}: expected 'image [label]', got {line!r}")
        image = _resolve_list_path(fields[0], root, list_file.parent)
        label = _resolve_list_path(fields[1], root, list_file.parent) if len(fields) == 2 else None
        stem = image.stem.removesuffix("_leftImg8bit")
        samples.append(Sample(image, label, stem, _label_encoding(label, kind)))
    return samples


def _split_parts(split: str) -> tuple[str, ...]:
    return UNION_SPLITS.get(split, (split,))


def camvid_samples(root: Path, split: str) -> list[Sample]:
    """SegNet CamVid layout: ``<split>/*.png`` paired by name with ``<split>annot/*.png``."""
    samples = []
    for part in _split_parts(split):
        images, labels = root / part, root / f"{part}annot"
        if not images.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir() and (root / f"{p.name}annot").is_dir())
            raise DataError(f"camvid split {part!r}: folder {images} does not exist (splits found: {available})")
        if not labels.is_dir():
            raise DataError(f"camvid split {part!r}: label folder {labels} does not exist")
        samples += [Sample(p, _find_label(labels, p.stem), p.stem) for p in image_files(images)]
    return samples


def cityscapes_samples(root: Path, split: str) -> list[Sample]:
    """Official layout: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``."""
    samples = []
    for part in _split_parts(split):
        images = root / "leftImg8bit" / part
        if not images.is_dir():
            raise DataError(f"cityscapes split {part!r}: folder {images} does not exist")
        gt = root / "gtFine" / part
        for p in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = p.name.removesuffix("_leftImg8bit.png")
            label = gt / p.parent.name / f"{stem}_gtFine_labelIds.png" if gt.is_dir() else None
            samples.append(Sample(p, label, stem, "cityscapes"))
    return samples


def find_classes_yaml(root: Path) -> Path | None:
    return next((root / n for n in CLASSES_FILES if (root / n).is_file()), None)


def folder_samples(root: Path, split: str) -> list[Sample]:
    """``images/`` + optional ``labels/`` (same stem, PNG). Split sub-folders (``images/<split>/`` or
    ``<split>/images/``) are used when present; a flat ``images/`` serves every split name."""
    candidates = [
        (root / "images" / split, root / "labels" / split),
        (root / split / "images", root / split / "labels"),
        (root / "images", root / "labels"),
    ]
    found = next(((i, lab) for i, lab in candidates if i.is_dir()), None)
    if found is None:
        raise DataError(f"folder dataset {root}: no images folder for split {split!r} "
                        f"(looked for {', '.join(str(c[0]) for c in candidates)})")
    images, labels = found
    has_labels = labels.is_dir()
    return [Sample(p, _find_label(labels, p.stem) if has_labels else None, p.stem) for p in image_files(images)]


def detect_kind(root: str | Path) -> str:
    """Guess the dataset layout under ``root``: "shards", "cityscapes", "camvid" or "folder"."""
    root = Path(root)
    if root.is_file():
        if root.suffix == ".json":
            return "shards"
        raise DataError(f"dataset root {root} is a file; expected a dataset folder or a shard index JSON")
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist")
    if (root / "index.json").is_file():
        return "shards"
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if find_classes_yaml(root) is not None:
        return "folder"
    if any(p.is_dir() and (root / f"{p.name}annot").is_dir() for p in root.iterdir()):
        return "camvid"
    raise DataError(
        f"cannot tell the dataset layout of {root}: expected index.json (shards), leftImg8bit/ (cityscapes), "
        "classes.yaml (folder) or <split>/ + <split>annot/ (camvid)"
    )


def build_dataset(
    kind: str,
    root: str | Path,
    split: str,
    *,
    list_file: str | Path | None = None,
    classes_yaml: str | Path | None = None,
    validate: bool = True,
) -> tuple[DatasetInfo, list[Sample] | ShardReader]:
    """The class info and the samples of one split.

    Args:
        kind: "camvid" | "cityscapes" | "folder" | "shards" | "auto" (see :func:`detect_kind`).
        root: dataset folder (for "shards": the shard folder or its index JSON).
        split: split name; "trainval" is train + val; ``NAME:PREFIX`` / ``NAME:-PREFIX`` keep / drop the samples
            whose name starts with PREFIX (comma-separated list), e.g. ``train:-0006R0`` (:func:`parse_split`).
        list_file: optional "image [label]" list overriding the layout's own file discovery.
        classes_yaml: class definition for "folder" (default ``root/classes.yaml``).
        validate: check every file up front (existence, readability, sizes, label values).

    Returns:
        ``(info, samples)``: a list of :class:`Sample`, or a :class:`ShardReader` for "shards".
    """
    root = Path(root).expanduser()
    if kind == "auto":
        kind = detect_kind(root)
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)} or 'auto'")
    try:
        split_name, prefixes, exclude = parse_split(split)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if prefixes:
        if kind == "shards" or list_file is not None:
            raise DataError(f"split {split!r}: sequence filters apply to folder layouts, not to "
                            f"{'shards' if kind == 'shards' else 'list files'}")
        info, samples = build_dataset(kind, root, split_name, classes_yaml=classes_yaml, validate=False)
        kept = [s for s in samples if keeps(s.stem, prefixes, exclude)]
        if not kept:
            raise DataError(f"{kind} split {split!r} at {root}: no sample name "
                            f"{'is left without' if exclude else 'starts with'} {', '.join(prefixes)}")
        if validate:
            validate_samples(kept, info, f"{kind} split {split!r} at {root}")
        return info, kept
    if kind == "shards":
        from ecmnet_core.data.shards import ShardReader

        reader = ShardReader(root, split, validate=validate)
        return reader.info, reader
    if not root.is_dir():
        raise DataError(f"{kind} dataset root {root} does not exist or is not a folder")
    if kind == "camvid":
        info = CAMVID
    elif kind == "cityscapes":
        info = CITYSCAPES
    else:
        yaml_path = Path(classes_yaml) if classes_yaml is not None else find_classes_yaml(root)
        if yaml_path is None:
            raise DataError(f"folder dataset {root} has no classes.yaml (pass classes_yaml=)")
        info = load_classes_yaml(yaml_path)
    if list_file is not None:
        samples = read_list_file(list_file, root, kind)
        where = f"{kind} list file {list_file}"
    else:
        samples = {"camvid": camvid_samples, "cityscapes": cityscapes_samples, "folder": folder_samples}[kind](
            root, split
        )
        where = f"{kind} split {split!r} at {root}"
    if not samples:
        raise DataError(f"{where} is empty: no images found")
    if validate:
        validate_samples(samples, info, where)
    return info, samples
