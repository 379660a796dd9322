import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def vc2_dir(tmp_path_factory):
    return tiny.make_vc2(str(tmp_path_factory.mktemp("vc2") / "teacher"))


@pytest.fixture(scope="session")
def animatediff_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ad")
    return tiny.make_animatediff(str(d / "sd15"), str(d / "adapter"))
