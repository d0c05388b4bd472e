"""report.html: opens from disk, shows the results files' numbers, paper cells only where the paper has
values, galleries picked by rank, and test_draem.py prints its path last."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
import torch

import test_draem
from model_unet import DraemModel
from util import report
from util.checkpoints import save_checkpoint
from util.metrics import CategoryResult, results_rows, write_results
from util.pictures import GAP
from util.report import thin_curve, write_report
from util.thresholds import threshold_path

BASE = "DRAEM_test_0.0001_2_bs4"
# Table cells show percent with two decimals: a cell read back is within half a unit of the last digit of the
# JSON value; a cell off by one unit (0.01) is outside.
HALF_UNIT = 0.005 + 1e-9


class ReportParser(HTMLParser):
    """What a browser would load and what a reader sees: image sources, links, table cells, gallery
    captions."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()
        self.header: list[str] = []  # <th> texts of the table head
        self.cells: dict[str, dict[str, str]] = {}  # data-category → data-key → cell text
        self.cell_classes: dict[str, list[str | None]] = {}  # data-category → class of every <td> in its row
        self.galleries: dict[str, dict[str, list[str]]] = {}  # category section → gallery kind → figcaptions
        self._row = self._key = self._section = self._gallery = None
        self._in_head = self._in_th = self._in_caption = False
        self._text = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "thead":
            self._in_head = True
        if tag == "tr" and "data-category" in attrs:
            self._row = attrs["data-category"]
            self.cells[self._row], self.cell_classes[self._row] = {}, []
        if tag == "td" and self._row is not None:
            self.cell_classes[self._row].append(attrs.get("class"))
            self._key, self._text = attrs.get("data-key"), ""
        if tag == "th" and self._in_head:
            self._in_th, self._text = True, ""
        if tag == "section" and attrs.get("class") == "category":
            self._section = attrs["id"].removeprefix("cat-")
            self.galleries[self._section] = {}
        if tag == "section" and "data-gallery" in attrs:
            self._gallery = attrs["data-gallery"]
            self.galleries[self._section][self._gallery] = []
        if tag == "figcaption":
            self._in_caption, self._text = True, ""

    def handle_endtag(self, tag):
        if tag == "thead":
            self._in_head = False
        if tag == "th" and self._in_th:
            self.header.append(self._text.strip())
            self._in_th = False
        if tag == "td" and self._key is not None:
            self.cells[self._row][self._key] = self._text.strip()
            self._key = None
        if tag == "tr":
            self._row = None
        if tag == "figcaption":
            self.galleries[self._section][self._gallery].append(self._text.strip())
            self._in_caption = False

    def handle_data(self, data):
        self._text += data


def parse_report(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def assert_opens_from_disk(report: Path, parsed: ReportParser) -> None:
    """No script, no external resource; every picture it shows is a relative path to a decodable PNG beside
    it."""
    assert not parsed.tags & {"script", "link", "iframe"}
    assert parsed.sources, "the report shows no pictures"
    for source in parsed.sources + [h for h in parsed.hrefs if not h.startswith("#")]:
        parts = urlsplit(source)
        assert not parts.scheme and not parts.netloc and not source.startswith("/"), (
            f"{source} is not a relative path")
        target = report.parent / unquote(parts.path)
        assert target.is_file(), f"report.html refers to {source}, which does not exist beside it"
    for source in parsed.sources:
        assert cv2.imread(str(report.parent / unquote(source))) is not None, (
            f"{source} is not a readable picture")


def cell_numbers(text: str) -> tuple[float, float | None] | None:
    """('12.34' | '12.34 ± 0.56' | '+1.23' | '97.0' | '—') → (value, std or None), None for the missing
    mark."""
    if text == "—":
        return None
    match = re.fullmatch(r"([+-]?\d+\.\d+)(?: ± (\d+\.\d+))?", text)
    assert match, f"unexpected table cell {text!r}"
    return float(match[1]), None if match[2] is None else float(match[2])


def assert_table_matches(parsed: ReportParser, rows: list[dict]) -> None:
    """Every value of every row is in the table (within the 2-decimal rounding), and nothing else is."""
    assert list(parsed.cells) == [row["category"] for row in rows]
    for row in rows:
        cells = parsed.cells[row["category"]]
        metrics = [k for k in row if k != "category" and not k.endswith(("_std", "_paper", "_delta"))]
        expected_keys = (set(metrics)
                         | {k for k in row if k.endswith(("_paper", "_delta")) and row[k] is not None})
        assert set(cells) == expected_keys, row["category"]
        for key, text in cells.items():
            shown = cell_numbers(text)
            if row[key] is None:
                assert shown is None, f"{row['category']} {key}: {text!r} for a missing value"
                continue
            assert shown is not None, f"{row['category']} {key}: missing mark for {row[key]}"
            assert abs(shown[0] - row[key]) <= HALF_UNIT, f"{row['category']} {key}: {text!r} vs {row[key]}"
            std = row.get(f"{key}_std")
            if std is None:
                assert shown[1] is None, (
                    f"{row['category']} {key}: {text!r} shows a spread the rows do not have")
            else:
                assert shown[1] is not None and abs(shown[1] - std) <= HALF_UNIT, (
                    f"{row['category']} {key}: {text!r} vs ± {std}")


# --- through test_draem.py ---------------------------------------------------------------------

def test_test_draem_writes_a_report_with_the_json_numbers_and_prints_its_path_last(
        tiny_mvtec, tmp_path, capsys):
    torch.manual_seed(0)
    model = DraemModel(4, 4).train()
    model(torch.rand(2, 3, 64, 64))  # one train-mode forward: the BatchNorm running statistics are real ones
    save_checkpoint(model, tmp_path / "ckpt", BASE, "brick")
    # Every image called anomalous at the image threshold (0), none at the pixel one (2): the "at the
    # calibrated threshold" cells are defined numbers, not empty, and recall 100 shows the image threshold was
    # the one used.
    threshold_path(tmp_path / "ckpt", BASE,
                   "brick").write_text(json.dumps({"image_threshold": 0.0, "pixel_threshold": 2.0}))
    out = tmp_path / "results"
    test_draem.main(["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root), "--checkpoint_path",
                     str(tmp_path / "ckpt"), "--base_model_name", BASE, "--image_size", "64", "--device",
                     "cpu", "--output_dir", str(out)])

    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    report = out / "report.html"
    assert printed[-1] == f"report: {report}"
    parsed = parse_report(report)
    assert_opens_from_disk(report, parsed)
    results = json.loads((out / f"results_{BASE}.json").read_text())
    rows = results["rows"]
    # What produced the numbers is on the page: the program, the commit, the versions, the thread count.
    page = report.read_text(encoding="utf-8")
    made_with = results["provenance"]
    assert made_with["program"] == "test_draem.py"
    versions = made_with["versions"]
    assert all(text in page
               for text in (made_with["commit"], f"torch {versions['torch']}", f"numpy {versions['numpy']}",
                                         f'data-key="threads">{made_with["threads"]}<'))
    assert rows[0]["image_recall_at_t"] == 100.0  # the threshold file was read, so the _at_t cells are
                                                  # checked too
    assert_table_matches(parsed, rows)
    # brick is not in the paper: no paper or Δ column anywhere, not even empty ones.
    assert not {"paper", "Δ"} & set(parsed.header)
    assert all(c is None or c == "ours" for classes in parsed.cell_classes.values() for c in classes)
    assert (any("calibrated threshold" in h for h in parsed.header)
            and any("F1-max" in h for h in parsed.header))
    # 3 good and 4 defective test images: all good ones as false alarms, the 4 defective split 2 / 2.
    assert ({k: len(v) for k, v in parsed.galleries["brick"].items()}
            == {"false_alarm": 3, "miss": 2, "detection": 2})


# --- write_report directly, on made-up results ---------------------------------------------------

def fake_result(folder: Path, scores_good: list[float], scores_bad: list[float],
                metrics: dict) -> CategoryResult:
    """A CategoryResult over real little PNGs: good/00i.png then crack/00i.png, 32×32, one anomalous square
    each."""
    rng = np.random.default_rng(0)
    paths = []
    for kind, count in (("good", len(scores_good)), ("crack", len(scores_bad))):
        for i in range(count):
            path = folder / kind / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            paths.append(str(path))
    labels = np.array([0] * len(scores_good) + [1] * len(scores_bad), dtype=np.uint8)
    masks = np.zeros((len(labels), 32, 32), dtype=np.uint8)
    masks[labels == 1, 8:16, 8:16] = 1
    maps = rng.random(masks.shape, dtype=np.float32)
    return CategoryResult(metrics, np.array(scores_good + scores_bad, dtype=np.float32), labels, maps, masks,
                          paths)


CARPET = {"image_auroc": 0.9512, "image_ap": 0.9, "pixel_auroc": 0.9, "pixel_ap": 0.5, "aupro": 0.8,
          "image_f1_max": 0.85, "image_precision_at_t": 0.75, "image_recall_at_t": 0.6,
          "image_f1_at_t": float("nan")}
BRICK = {"image_auroc": 0.5, "image_ap": 0.5, "pixel_auroc": 0.5, "pixel_ap": 0.1, "aupro": 0.3,
         "image_f1_max": 0.6, "image_precision_at_t": float("nan"), "image_recall_at_t": float("nan"),
         "image_f1_at_t": float("nan")}


def test_paper_and_delta_cells_only_for_a_category_the_paper_reports(tmp_path):
    results = {"carpet": fake_result(tmp_path / "carpet", [0.1, 0.2], [0.3, 0.4], CARPET),
               "brick": fake_result(tmp_path / "brick", [0.1, 0.2], [0.3, 0.4], BRICK)}
    rows = results_rows([{c: r.metrics for c, r in results.items()}])
    # as test_draem.py does first: the page links these files
    write_results(rows, tmp_path / "out", "results_x")
    report = write_report(tmp_path / "out", "results_x", rows, results, 32, "carpet and brick")

    parsed = parse_report(report)
    assert report == tmp_path / "out" / "report.html"
    assert_opens_from_disk(report, parsed)
    assert_table_matches(parsed, rows)
    carpet = parsed.cells["carpet"]
    # DRAEM, ICCV 2021, Tables 1 and 2 (carpet: 97.0, 95.5, 53.5); Δ = ours − paper on the percent values
    # above.
    assert ([carpet[f"{m}_paper"] for m in ("image_auroc", "pixel_auroc", "pixel_ap")]
            == ["97.0", "95.5", "53.5"])
    assert ([carpet[f"{m}_delta"] for m in ("image_auroc", "pixel_auroc", "pixel_ap")]
            == ["-1.88", "-5.50", "-3.50"])
    # brick is not in the paper, and so neither is the mean over carpet and brick: their paper cells stay
    # blank.
    for category in ("brick", "mean"):
        assert not any(k.endswith(("_paper", "_delta")) for k in parsed.cells[category])
        # blank paper and Δ cells of the three paper metrics
        assert parsed.cell_classes[category].count(None) == 6
    assert parsed.header.count("paper") == 3 and parsed.header.count("Δ") == 3
    assert carpet["image_f1_at_t"] == "—"


def test_several_runs_show_mean_and_std_and_say_the_pictures_are_the_first_runs(tmp_path):
    first = fake_result(tmp_path / "carpet", [0.1, 0.2], [0.3, 0.4], CARPET)
    second = {**CARPET, "image_auroc": 0.9712, "aupro": 0.7}
    rows = results_rows([{"carpet": CARPET}, {"carpet": second}])
    report = write_report(tmp_path / "out", "results_x_2runs", rows, {"carpet": first}, 32, "two seeds")

    parsed = parse_report(report)
    assert_table_matches(parsed, rows)
    # mean ± sample std of 95.12 and 97.12: 96.12 ± 1.41 (√2); of 80 and 70: 75.00 ± 7.07 (√50)
    assert parsed.cells["carpet"]["image_auroc"] == "96.12 ± 1.41"
    assert parsed.cells["carpet"]["aupro"] == "75.00 ± 7.07"
    assert "first run" in report.read_text(encoding="utf-8")


def test_galleries_rank_false_alarms_misses_and_detections_by_score(tmp_path):
    good = [0.30, 0.90, 0.10, 0.70, 0.50, 0.20]  # highest first: 001 (0.9), 003 (0.7), 004 (0.5), 000 (0.3)
    bad = [0.55, 0.05, 0.95, 0.35, 0.85, 0.65, 0.15]  # lowest: 001, 006, 003, 000; highest of the rest: 002,
                                                      # 004, 005
    result = fake_result(tmp_path / "carpet", good, bad, CARPET)
    report = write_report(tmp_path / "out", "results_x", results_rows([{"carpet": CARPET}]),
                          {"carpet": result}, 32, "t")

    galleries = parse_report(report).galleries["carpet"]
    assert galleries["false_alarm"] == ["good/001.png · score 0.900", "good/003.png · score 0.700",
                                        "good/004.png · score 0.500", "good/000.png · score 0.300"]
    assert galleries["miss"] == ["crack/001.png · score 0.050", "crack/006.png · score 0.150",
                                 "crack/003.png · score 0.350", "crack/000.png · score 0.550"]
    assert galleries["detection"] == ["crack/002.png · score 0.950", "crack/004.png · score 0.850",
                                      "crack/005.png · score 0.650"]


def test_pixel_curves_are_thinned_to_at_most_2000_points_keeping_both_ends():
    x = np.sort(np.random.default_rng(0).random(100_000))
    y = np.sqrt(x)
    thin_x, thin_y = thin_curve(x, y)
    assert len(thin_x) <= 2000
    assert (thin_x[0], thin_x[-1]) == (x[0], x[-1])
    assert np.array_equal(thin_y, np.sqrt(thin_x))  # points of the curve itself, not new ones
    short = np.linspace(0, 1, 50)
    assert thin_curve(short, short)[0] is short


# --- what the pictures show --------------------------------------------------------------------

def hand_result() -> CategoryResult:
    """Four images (normal, normal, anomalous, anomalous) with scores 0.1, 0.35, 0.3, 0.4, and 16 pixels of
    2×2 maps: the anomalous ones (image 2's four) at 0.9, 0.8, 0.7, 0.6, one normal at 0.65, the other eleven
    at 0.1."""
    maps = np.full((4, 2, 2), 0.1, dtype=np.float32)
    maps[0, 0, 0] = 0.65
    maps[2] = [[0.9, 0.8], [0.7, 0.6]]
    masks = np.zeros((4, 2, 2), dtype=np.uint8)
    masks[2] = 1
    scores = np.array([0.1, 0.35, 0.3, 0.4], dtype=np.float32)
    return CategoryResult(CARPET, scores, np.array([0, 0, 1, 1], dtype=np.uint8), maps, masks, [])


def drawn_figure(monkeypatch, result: CategoryResult):
    figures = []
    monkeypatch.setattr(report, "png_bytes", lambda figure: figures.append(figure) or b"")
    report.curves_png(result)
    (figure,) = figures
    return figure


def points(line) -> set[tuple[float, float]]:
    return {(round(float(x), 6), round(float(y), 6)) for x, y in line.get_xydata()}


def test_curves_plot_roc_and_precision_recall_of_the_images_and_of_the_pixels_on_their_axes(monkeypatch):
    """By hand: images, thresholds 0.4, 0.35, 0.3, 0.1 give (FPR, TPR) (0, .5), (.5, .5), (.5, 1), (1, 1) and
    (recall, precision) (.5, 1), (.5, .5), (1, 2/3), (1, .5). Pixels (4 of 16 anomalous), thresholds 0.9 ..
    0.6: (FPR, TPR) (0, .25), (0, .75), (1/12, .75), (1/12, 1); (recall, precision) (.25, 1), (.75, 1), (.75,
    .75), (1, .8), (1, .25). Swapped axes, or the image data in a pixel panel, miss these points."""
    axes = drawn_figure(monkeypatch, hand_result()).axes
    assert [ax.get_title().split(",")[0] for ax in axes] == ["image ROC", "image PR", "pixel ROC", "pixel PR"]
    for ax in axes:
        assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.02)
    for ax in axes[0::2]:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("false-positive rate", "true-positive rate")
    for ax in axes[1::2]:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("recall", "precision")
    image_roc, image_pr, pixel_roc, pixel_pr = (points(ax.lines[0]) for ax in axes)
    assert {(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)} <= image_roc and (0.5, 0.0) not in image_roc
    assert {(0.5, 1.0), (0.5, 0.5), (1.0, 0.666667), (1.0, 0.5)} <= image_pr and (1.0, 0.0) not in image_pr
    assert {(0.0, 0.25), (0.0, 0.75), (0.083333, 0.75), (0.083333, 1.0)} <= pixel_roc
    assert {(0.25, 1.0), (0.75, 1.0), (0.75, 0.75), (1.0, 0.8), (1.0, 0.25)} <= pixel_pr
    # Chance: the diagonal on ROC panels, the anomalous fraction (images 1/2, pixels 1/4) on PR panels.
    assert points(axes[0].lines[1]) == {(0.0, 0.0), (1.0, 1.0)}
    assert [round(float(y), 6) for y in axes[1].lines[1].get_ydata()] == [0.5, 0.5]
    assert [round(float(y), 6) for y in axes[3].lines[1].get_ydata()] == [0.25, 0.25]
    assert "AUROC 95.12 %" in axes[0].get_title()  # the metric of the results, not recomputed


def test_each_gallery_picture_shows_its_own_image_ground_truth_and_map(tmp_path):
    """Flat images of distinct colours; normal 000 scores highest with a map of ones (red in JET), normal 001
    a map of zeros (blue); the anomalous ones have a defect square. Each picture: image | image with the
    defect outlined in red | heat map, each panel from the image it names."""
    colours = {"good/000.png": (40, 90, 140), "good/001.png": (200, 60, 10), "crack/000.png": (90, 200, 90),
               "crack/001.png": (10, 10, 230)}
    paths = []
    for name, colour in colours.items():
        path = tmp_path / "carpet" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((32, 32, 3), colour, dtype=np.uint8))
        paths.append(str(path))
    maps = np.zeros((4, 32, 32), dtype=np.float32)
    maps[0] = 1.0
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[2:, 8:24, 8:24] = 1
    result = CategoryResult(CARPET, np.array([0.9, 0.2, 0.3, 0.8], dtype=np.float32),
                            np.array([0, 0, 1, 1], dtype=np.uint8), maps, masks, paths)
    out = tmp_path / "out"
    write_report(out, "results_x", results_rows([{"carpet": CARPET}]), {"carpet": result}, 32, "t")
    galleries = parse_report(out / "report.html").galleries["carpet"]
    assert galleries == {"false_alarm": ["good/000.png · score 0.900", "good/001.png · score 0.200"],
                         "miss": ["crack/000.png · score 0.300"],
                         "detection": ["crack/001.png · score 0.800"]}
    step = 32 + GAP
    for kind, shown in galleries.items():
        for rank, caption in enumerate(shown, start=1):
            name = caption.split(" ")[0]
            picture = cv2.imread(str(out / "report_files" / "carpet" / f"{kind}_{rank}.png"))
            image, outlined, heat = (picture[:, i * step : i * step + 32].astype(int) for i in range(3))
            assert (image == colours[name]).all(), (kind, rank)
            red_outline = (outlined[..., 2] == 255) & (outlined[..., :2] == 0).all(-1)
            assert red_outline.any() == name.startswith("crack"), (kind, rank)
            # The heat panel is half image, half JET colour: a map of 1 is dark red (0, 0, 128), a map of 0
            # dark blue (128, 0, 0), so red minus blue, less the image's half, is +64 or -64 (the score's text
            # moves it a little).
            red_minus_blue = (heat[..., 2] - heat[..., 0]).mean() - (image[..., 2] - image[..., 0]).mean() / 2
            assert (red_minus_blue > 0) == (name == "good/000.png"), (kind, rank, red_minus_blue)
