"""Dataset layouts: which files are a category's training images, test images and masks (METHOD.md §1).

Every layout (`LAYOUTS`; the programs' --dataset) gives training image paths and test records
`(image, mask or None, label)`, which the datasets in data_loader.py read the same way:
- mvtec: MVTec AD, `<root>/<category>/train/good/*.png`, `test/<good|defect>/*.png`, masks
  `ground_truth/<defect>/<stem>_mask.png` (0/255, read as value / 255). Every defect image needs its mask.
- folder: your own images laid out like MVTec AD, `<root>/<category>/train/good/*`,
  `test/<good|defect>/*` (png, jpg, jpeg, bmp, tif, tiff), optional masks
  `ground_truth/<defect>/<stem><mask_suffix>.<png|bmp|tif|tiff>` where every non-zero pixel is
  anomalous (so 0/1 and 0/255 masks both work; JPEG masks are refused: their compression noise
  would mark stray pixels). A defect image without a mask is allowed: it counts as anomalous
  with an all-zero mask, so image metrics stay valid while pixel metrics treat its pixels as
  normal (NaN, with a warning, when no defect image has a mask).
- visa: VisA as published, `<root>/split_csv/1cls.csv` with the columns object,split,label,image,mask
  (paths relative to <root>, label `normal` or `anomaly`, mask empty for normal images). VisA's
  masks mark defects with small non-zero values (1, not 255); like VisA's own preparation script
  (mask != 0 becomes 255) every non-zero pixel is anomalous, so masks read as they would after
  converting VisA to the MVTec layout.
- mvtec_ad2: MVTec AD 2, `<root>/<object>/train/good/*.png`, `validation/good/*.png` (normal only: the
  held-out normal set for validation and calibration), `test_public/good/*.png`, `test_public/bad/*.png`
  with masks `test_public/ground_truth/bad/<stem>_mask.png` (255 = anomalous; every non-zero pixel counts),
  and the flat private splits `test_private/*.png`, `test_private_mixed/*.png` (no ground truth: scored for
  the submission, never evaluated here). test_public is the test set.
- mvtec_loco: MVTec LOCO AD, `<root>/<category>/train/good`, `validation/good` (normal only), `test/<good|
  logical_anomalies|structural_anomalies>/*.png`, and per anomalous image a folder of masks
  `ground_truth/<defect>/<stem>/000.png, 001.png, ...`, merged: a pixel non-zero in any of them is anomalous.
"""
import csv
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from util.cli import plain_name_problem
from util.errors import DraemInputError
from util.images import FOLDER_IMAGE_SUFFIXES, IMAGE_SUFFIXES, find_images, sorted_images

# The released programs' --obj_id order: id i is CATEGORIES[i]; -1 means all of them.
CATEGORIES = (
    "capsule", "bottle", "carpet", "leather", "pill", "transistor", "tile", "cable",
    "zipper", "toothbrush", "metal_nut", "hazelnut", "screw", "grid", "wood",
)
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood")
OBJECT_CATEGORIES = tuple(c for c in CATEGORIES if c not in TEXTURE_CATEGORIES)

# VisA's objects in its published order (split_csv/1cls.csv).
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
# MVTec AD 2's objects and its private test splits (flat folders, no ground truth).
AD2_OBJECTS = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
AD2_PRIVATE_SPLITS = ("test_private", "test_private_mixed")
AD2_TEST_SPLIT = "test_public"
# MVTec LOCO AD's categories and its two kinds of anomalies.
LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
LOCO_DEFECTS = ("logical_anomalies", "structural_anomalies")
LAYOUTS = ("mvtec", "folder", "visa", "mvtec_ad2", "mvtec_loco")
# Layouts with a normal-only `<category>/validation/good` set: validation and calibration use it, training
# never does.
VALIDATION_LAYOUTS = ("mvtec_ad2", "mvtec_loco")
ImageRecord = tuple[Path, Path | None, int]  # (test image, its mask or None, label: 0 good, 1 anomalous)

LOSSY_SUFFIXES = (".jpg", ".jpeg")
GOOD = "good"
MVTEC_MASK_SUFFIX = "_mask"
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}


def resolve_categories(
    obj_id: str | int, known: Sequence[str] = CATEGORIES, data_root: str | os.PathLike | None = None
) -> list[str]:
    """Categories meant by a name, an integer id into `known` (int or text), or -1 for all of `known`.

    A name outside `known` is accepted when `data_root/<name>` is a folder: a category of your own
    laid out like MVTec AD. A name is a plain name (no path: it cannot lead out of data_root or the output
    folders).
    """
    text = str(obj_id).strip()
    problem = plain_name_problem(text) if text else None  # an empty name is just unknown (below)
    if problem is not None:
        raise DraemInputError(f"category {text!r} is not a plain name: {problem}")
    if text in known or (data_root is not None and text and (Path(data_root) / text).is_dir()):
        return [text]
    try:
        number = int(text)
    except ValueError:
        number = None
    if number == -1:
        return list(known)
    if number is not None and 0 <= number < len(known):
        return [known[number]]
    raise DraemInputError(
        f"unknown category {obj_id!r}: use a name ({', '.join(known)}), an id 0..{len(known) - 1}, or -1 for "
        f"all"
    )


def find_anomaly_sources(path: str | os.PathLike) -> list[Path]:
    """Every .jpg/.jpeg/.png under `path`, recursively (so both dtd/ and dtd/images/ work), sorted.

    Each is checked to be a non-empty image file (its first bytes), so a broken source is one line now, not a
    failure at a random step of a long run."""
    return find_images(path, "anomaly source folder", IMAGE_SUFFIXES, check="anomaly source",
                       hint=": pass the DTD folder (dtd/ or dtd/images/), or leave the option out to use "
                            "random-noise sources")


def _flat_folder_images(folder: Path, suffixes: Sequence[str], kind: str, expected: str,
                       noun: str = "images") -> list[Path]:
    """The images directly in `folder` with these suffixes, sorted; a missing folder, or one without such
    images, is one line naming what was expected there."""
    if not folder.is_dir():
        raise DraemInputError(f"{kind} folder {folder} does not exist: expected {expected}")
    paths = sorted_images(folder.iterdir(), suffixes)
    if not paths:
        raise DraemInputError(f"no {'/'.join(suffixes)} {noun} in {folder}")
    return paths


def training_folder_images(root_dir: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                           root: str = "<mvtec>") -> list[Path]:
    return _flat_folder_images(root_dir, suffixes, "training", f"{root}/<category>/train/good",
                              "training images")


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise DraemInputError(f"unknown dataset layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return layout


def _test_images(test_dir: Path, suffixes: Sequence[str], root: str) -> list[Path]:
    """`test_dir/<good|defect>/*` images, sorted."""
    if not test_dir.is_dir():
        raise DraemInputError(f"test folder {test_dir} does not exist: expected {root}/<category>/test")
    images = sorted_images(test_dir.glob("*/*"), suffixes)
    if not images:
        raise DraemInputError(f"no test images in {test_dir}/<defect>/ (expected e.g. test/good/000.png)")
    return images


def mvtec_test_records(test_dir: Path, mask_suffix: str = MVTEC_MASK_SUFFIX) -> list[ImageRecord]:
    """MVTec AD: `good` images are normal; every other image needs
    `ground_truth/<defect>/<stem><mask_suffix>.png`."""
    records = []
    for image in _test_images(test_dir, IMAGE_SUFFIXES, "<mvtec>"):
        if image.parent.name == GOOD:
            records.append((image, None, 0))
            continue
        mask = test_dir.parent / "ground_truth" / image.parent.name / f"{image.stem}{mask_suffix}.png"
        if not mask.is_file():
            raise DraemInputError(f"ground-truth mask {mask} is missing for test image {image}")
        records.append((image, mask, 1))
    return records


def _folder_mask(mask_dir: Path, image: Path, mask_suffix: str) -> Path | None:
    """`mask_dir/<stem><mask_suffix>.<png|bmp|tif|tiff>` (either case of the suffix), or None; a JPEG mask is
    refused."""
    suffixes = [case for suffix in FOLDER_IMAGE_SUFFIXES for case in (suffix, suffix.upper())]
    candidates = (mask_dir / f"{image.stem}{mask_suffix}{suffix}" for suffix in suffixes)
    mask = next((path for path in candidates if path.is_file()), None)
    if mask is not None and mask.suffix.lower() in LOSSY_SUFFIXES:
        raise DraemInputError(f"ground-truth mask {mask} is a JPEG, whose compression noise would mark stray "
                              f"pixels: save it as PNG")
    return mask


def _folder_test_records(test_dir: Path, mask_suffix: str) -> list[ImageRecord]:
    """Generic folder: `good` images are normal, every other one anomalous, with its mask when there is
    one."""
    records = []
    for image in _test_images(test_dir, FOLDER_IMAGE_SUFFIXES, "<data_path>"):
        if image.parent.name == GOOD:
            records.append((image, None, 0))
        else:
            records.append((image, _folder_mask(test_dir.parent / "ground_truth" / image.parent.name, image,
                                                mask_suffix), 1))
    defects = [mask for _, mask, label in records if label == 1]
    if defects.count(None):
        warnings.warn(
            f"{defects.count(None)} of {len(defects)} defect images in {test_dir} have no ground-truth mask "
            f"(ground_truth/<defect>/<stem>{mask_suffix}.png): their pixels count as normal in the pixel "
            f"metrics (NaN when no image has a mask); image metrics are unaffected",
            RuntimeWarning,
            stacklevel=3,
        )
    return records


def _visa_split_file(data_path: str | os.PathLike) -> Path:
    split_file = Path(data_path) / VISA_SPLIT_FILE
    if not split_file.is_file():
        raise DraemInputError(
            f"VisA split file {split_file} not found: VisA's layout is <root>/split_csv/1cls.csv beside "
            "<root>/candle/Data/..., as downloaded; point the data path at that root"
        )
    return split_file


def _check_visa_row(row: dict[str, str], where: str) -> None:
    """A row of 1cls.csv: an image, train or test, normal or anomaly, no anomaly in train, a mask for every
    anomaly."""
    if not row["image"]:
        raise DraemInputError(f"{where}: no image path")
    if row["split"] not in ("train", "test"):
        raise DraemInputError(f"{where}: split {row['split']!r} is neither train nor test")
    if row["label"] not in VISA_LABELS:
        raise DraemInputError(f"{where}: label {row['label']!r} is neither normal nor anomaly")
    anomalous = VISA_LABELS[row["label"]] == 1
    if anomalous and row["split"] == "train":
        raise DraemInputError(f"{where}: an anomalous training image; DRAEM trains on normal images only "
                              f"(use 1cls.csv)")
    if anomalous and not row["mask"]:
        raise DraemInputError(f"{where}: anomalous image {row['image']} has no mask")


def _visa_rows(data_path: str | os.PathLike, category: str, split: str) -> list[ImageRecord]:
    """The rows of `category` and `split` in VisA's 1cls.csv, in file order, as (image, mask or None,
    label)."""
    split_file = _visa_split_file(data_path)
    try:
        with split_file.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or ())]
            if missing:
                raise DraemInputError(f"{split_file} has no column {', '.join(missing)}: VisA's header is "
                                      f"{','.join(VISA_COLUMNS)}")
            rows = [(line, {key: (row[key] or "").strip() for key in VISA_COLUMNS})
                    for line, row in enumerate(reader, start=2)]
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        reason = (exc.reason if isinstance(exc, UnicodeDecodeError)
                  else (getattr(exc, "strerror", None) or str(exc)))
        raise DraemInputError(f"cannot read VisA split file {split_file} ({type(exc).__name__}: {reason}): "
                              f"it must be UTF-8 CSV text, as VisA publishes it") from None
    objects = sorted({row["object"] for _, row in rows})
    if category not in objects:
        raise DraemInputError(f"{split_file} has no rows for object {category!r}; it has "
                              f"{', '.join(objects) or 'none'}")
    for line, row in rows:
        _check_visa_row(row, f"{split_file} line {line}")
    records = []
    for _, row in rows:
        if row["object"] == category and row["split"] == split:
            label = VISA_LABELS[row["label"]]
            records.append((Path(data_path) / row["image"], Path(data_path) / row["mask"] if label else None,
                            label))
    if not records:
        raise DraemInputError(f"{split_file} has no {split} rows for object {category!r}")
    return records


def train_image_paths(layout: str, data_path: str | os.PathLike, category: str) -> list[Path]:
    """The training (normal) images of `category` in a dataset of `layout` (see LAYOUTS and the module
    docstring)."""
    if _check_layout(layout) == "visa":
        return [image for image, _, _ in _visa_rows(data_path, category, "train")]
    train_dir = Path(data_path) / category / "train" / GOOD
    if layout == "folder":
        return training_folder_images(train_dir, FOLDER_IMAGE_SUFFIXES, "<data_path>")
    return training_folder_images(train_dir, root=f"<{layout}>")


def validation_image_paths(layout: str, data_path: str | os.PathLike, category: str) -> list[Path]:
    """The normal-only validation images `<category>/validation/good/*` of a layout that has them
    (VALIDATION_LAYOUTS)."""
    if _check_layout(layout) not in VALIDATION_LAYOUTS:
        raise DraemInputError(f"the {layout} layout has no validation/good set (only "
                              f"{', '.join(VALIDATION_LAYOUTS)} have one): give a folder of good images "
                              f"(--good_dir) instead")
    return _flat_folder_images(Path(data_path) / category / "validation" / GOOD, IMAGE_SUFFIXES, "validation",
                              f"<{layout}>/<category>/validation/good")


def ad2_private_images(data_path: str | os.PathLike, category: str, split: str) -> list[Path]:
    """The images of one MVTec AD 2 private split, `<object>/<split>/*.png` (a flat folder), sorted."""
    return _flat_folder_images(Path(data_path) / category / split, (".png",), "private split",
                              f"<mvtec_ad2>/<object>/{split}")


def _ad2_test_records(test_dir: Path, mask_suffix: str) -> list[ImageRecord]:
    """MVTec AD 2's test_public: `good/*.png` normal, `bad/*.png` anomalous with
    `ground_truth/bad/<stem><mask_suffix>.png`."""
    if not test_dir.is_dir():
        raise DraemInputError(f"test folder {test_dir} does not exist: expected "
                              f"<mvtec_ad2>/<object>/{AD2_TEST_SPLIT}")
    records: list[ImageRecord] = [(image, None, 0)
                                  for image in sorted_images((test_dir / GOOD).glob("*"), (".png",))]
    for image in sorted_images((test_dir / "bad").glob("*"), (".png",)):
        mask = test_dir / "ground_truth" / "bad" / f"{image.stem}{mask_suffix}.png"
        if not mask.is_file():
            raise DraemInputError(f"ground-truth mask {mask} is missing for test image {image}")
        records.append((image, mask, 1))
    if not records:
        raise DraemInputError(f"no test images in {test_dir}/good or {test_dir}/bad")
    return records


def _loco_test_records(test_dir: Path) -> list[ImageRecord]:
    """MVTec LOCO AD: `good` normal; each logical or structural anomaly with its mask folder
    `ground_truth/<defect>/<stem>`."""
    records = []
    for image in _test_images(test_dir, (".png",), "<mvtec_loco>"):
        if image.parent.name == GOOD:
            records.append((image, None, 0))
            continue
        if image.parent.name not in LOCO_DEFECTS:
            raise DraemInputError(f"test image {image} is in neither good nor {' nor '.join(LOCO_DEFECTS)}")
        masks = test_dir.parent / "ground_truth" / image.parent.name / image.stem
        if not masks.is_dir():
            raise DraemInputError(f"ground-truth folder {masks} (000.png, 001.png, ...) is missing for test "
                                  f"image {image}")
        records.append((image, masks, 1))
    return records


def has_test_set(layout: str, data_path: str | os.PathLike, category: str) -> bool:
    """Whether `category` has a labelled test set in `data_path` (VisA's split file always lists one)."""
    if _check_layout(layout) == "visa":
        return True
    return (Path(data_path) / category / (AD2_TEST_SPLIT if layout == "mvtec_ad2" else "test")).is_dir()


def evaluation_records(
    layout: str, data_path: str | os.PathLike, category: str, mask_suffix: str = MVTEC_MASK_SUFFIX
) -> list[ImageRecord]:
    """The test images of `category` as (image, mask or None, label 0 good / 1 anomalous) records.

    `mask_suffix` names masks `<stem><mask_suffix>.<ext>` in the mvtec, folder and mvtec_ad2 layouts; VisA's
    split file names its masks itself, and MVTec LOCO AD has a folder of masks per image. mvtec_ad2's test
    set is test_public; its mask record is the mask file, LOCO's the folder of its masks.
    """
    if _check_layout(layout) in ("visa", "mvtec_loco") and mask_suffix != MVTEC_MASK_SUFFIX:
        raise DraemInputError(f"a mask suffix ({mask_suffix!r}) applies to the mvtec, folder and mvtec_ad2 "
                              f"layouts; VisA's 1cls.csv names its masks and MVTec LOCO AD has a folder of "
                              f"masks per image")
    if layout == "visa":
        return _visa_rows(data_path, category, "test")
    if layout == "mvtec_ad2":
        return _ad2_test_records(Path(data_path) / category / AD2_TEST_SPLIT, mask_suffix)
    test_dir = Path(data_path) / category / "test"
    if layout == "mvtec":
        return mvtec_test_records(test_dir, mask_suffix)
    if layout == "mvtec_loco":
        return _loco_test_records(test_dir)
    return _folder_test_records(test_dir, mask_suffix)


def _folder_categories(data_path: str | os.PathLike) -> list[str]:
    """Sub-folders of `data_path` that hold train/good, sorted."""
    root = Path(data_path)
    return sorted(child.name for child in root.iterdir() if (child / "train" / GOOD).is_dir())


def categories_for(layout: str, obj_id: str | int, data_path: str | os.PathLike) -> list[str]:
    """The categories meant by `obj_id` (a name, an id into the layout's list, or -1 for all of them).

    mvtec: `resolve_categories` over CATEGORIES; visa: over VISA_CATEGORIES; mvtec_ad2: AD2_OBJECTS;
    mvtec_loco: LOCO_CATEGORIES; folder: over the sub-folders of data_path that hold train/good (-1: all
    of them). In every layout a name with a folder under data_path is accepted too.
    """
    if not Path(data_path).is_dir():
        raise DraemInputError(f"--data_path {data_path} does not exist (point it at the dataset root folder)")
    named = {"mvtec": CATEGORIES, "mvtec_ad2": AD2_OBJECTS, "mvtec_loco": LOCO_CATEGORIES}
    if _check_layout(layout) in named:
        return resolve_categories(obj_id, named[layout], data_path)
    if layout == "visa":
        _visa_split_file(data_path)
        return resolve_categories(obj_id, VISA_CATEGORIES, data_path)
    known, name = _folder_categories(data_path), str(obj_id).strip()
    if not known and not (name and (Path(data_path) / name).is_dir()):
        raise DraemInputError(f"no category folder with train/good under {data_path}: expected "
                              f"<data_path>/<category>/train/good")
    return resolve_categories(obj_id, known, data_path)


