"""Shared fixtures: a tiny MVTec-format dataset with anomaly sources, made once per test session."""
import pytest
import torch

from util.demo_data import DemoDataset, make_demo_dataset


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory) -> DemoDataset:
    """The demo dataset at 64x64: per category 6 train/good, 3 test/good, 2 images per defect type
    (with masks), plus 6 JPEG anomaly sources. Read-only: copy it before changing anything.

    `tiny_mvtec.mvtec_root / category / "train" / "good"` etc.; categories are `tiny_mvtec.categories`.
    """
    return make_demo_dataset(
        tmp_path_factory.mktemp("tiny_demo"), image_size=64, n_train=6, n_test_good=3, n_test_per_defect=2,
        n_sources=6
    )


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: a second OpenMP thread makes them slower, not faster, and one
    thread keeps the float results identical between runs. Use with `pytestmark =
    pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
