"""Tests for tinylm.device: picking, describing, seeding, and no stray device names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm import device as dev


def test_auto_picks_an_available_device(monkeypatch):
    monkeypatch.delenv("TINYLM_DEVICE", raising=False)
    picked = dev.pick_device()
    assert picked.type == dev.available_devices()[0]
    assert dev.pick_device("auto") == picked


def test_environment_variable_is_honoured(monkeypatch):
    monkeypatch.setenv("TINYLM_DEVICE", "cpu")
    assert dev.pick_device() == torch.device("cpu")


def test_cpu_is_always_available():
    assert dev.pick_device("cpu") == torch.device("cpu")
    assert "cpu" in dev.available_devices()


def test_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match="cuda, mps, npu, cpu"):
        dev.pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"'cuda' was requested but is not available.*cpu"):
        dev.pick_device("cuda")


def test_describe_mentions_kind_and_torch_version():
    text = dev.describe_device("cpu")
    assert text.startswith("cpu:") and torch.__version__ in text


def test_seed_everything_makes_all_generators_repeat():
    dev.seed_everything(123)
    a = (torch.rand(3), np.random.rand(3))
    dev.seed_everything(123)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="non-negative int"):
        dev.seed_everything(-1)


def test_no_hard_coded_device_strings_outside_device_module():
    """Device-agnostic code: only tinylm.device may name cuda/mps/npu or call .cuda()."""
    lib = Path(dev.__file__).parent
    pattern = re.compile(r"""\.cuda\(|["'](cuda|mps|npu)(:\d+)?["']|torch\.(cuda|mps|npu)\.""")
    offenders = []
    for path in lib.rglob("*.py"):
        if path.name == "device.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(lib)}:{number}: {line.strip()}")
    assert not offenders, "device names outside tinylm.device:\n" + "\n".join(offenders)


def test_cpu_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with dev.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), dev.cpu_threads(1):
        raise RuntimeError("a failing block still restores the count")
    assert torch.get_num_threads() == before
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="whole number of threads"), dev.cpu_threads(bad):
            pass
