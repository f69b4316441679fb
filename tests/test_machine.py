"""Tests of tinylm.machine (cache: atomic, reused, refreshed) and the size presets' RAM check."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

import tinylm.machine as machine_mod
import tinylm.util as util_mod
from tinylm.machine import Machine, measure_machine
from tinylm.model import GPT, GPTConfig, count_parameters

FAKE = Machine(
    device="cpu: test", device_type="cpu", threads=2, torch_version=torch.__version__,
    date="2026-01-01T00:00:00+00:00", read_gbps=10.0, copy_gbps=8.0,
    gemv_gbps={"float32": 9.0, "bfloat16": 9.5}, matmul_flops={"float32": 5e10},
    op_overhead_s=3e-6, seconds_to_measure=0.1,
)  # fmt: skip


@pytest.fixture
def counted_measure(monkeypatch):
    calls = []

    def fake(device):
        calls.append(device)
        return replace(FAKE, read_gbps=10.0 + len(calls))

    monkeypatch.setattr(machine_mod, "_measure", fake)
    return calls


def test_cache_is_written_then_reused_then_refreshed(tmp_path, counted_measure):
    first = measure_machine("cpu", cache_directory=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and f"t{torch.get_num_threads()}" in files[0].name
    saved = json.loads(files[0].read_text())
    assert saved["read_gbps"] == first.read_gbps == 11.0 and saved["date"] == FAKE.date
    assert saved["threads"] == 2 and saved["torch_version"] == torch.__version__
    again = measure_machine("cpu", cache_directory=tmp_path)
    assert again == first and len(counted_measure) == 1  # read back, not measured
    fresh = measure_machine("cpu", cache_directory=tmp_path, refresh=True)
    assert fresh.read_gbps == 12.0 and len(counted_measure) == 2
    assert measure_machine("cpu", cache_directory=tmp_path).read_gbps == 12.0


def test_a_failed_write_leaves_the_old_cache_whole(tmp_path, counted_measure, monkeypatch):
    measure_machine("cpu", cache_directory=tmp_path)
    (path,) = tmp_path.iterdir()
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(machine_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        measure_machine("cpu", cache_directory=tmp_path, refresh=True)
    assert path.read_text() == before  # the old file, whole
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_corrupt_cache_is_measured_again(tmp_path, counted_measure):
    path = machine_mod.cache_path("cpu", tmp_path)
    path.write_text("{not json")
    assert measure_machine("cpu", cache_directory=tmp_path).read_gbps == 11.0
    assert json.loads(path.read_text())["read_gbps"] == 11.0


def test_a_real_measurement_gives_plausible_figures(tmp_path):
    m = measure_machine("cpu", cache=False)
    assert not any(tmp_path.iterdir())
    assert 0.1 < m.read_gbps < 5000 and 0.1 < m.copy_gbps < 5000
    assert set(m.gemv_gbps) == {"float32", "bfloat16"} and min(m.gemv_gbps.values()) > 0.01
    assert m.matmul_flops["float32"] > 1e8
    assert 1e-8 < m.op_overhead_s < 1e-2
    assert m.threads == torch.get_num_threads()
    assert "GB/s" in m.summary()


def test_presets_scale_the_same_architecture():
    sizes = {name: count_parameters(GPTConfig.preset(name)) for name in ("default", "100M", "300M")}
    assert sizes["default"] == count_parameters(GPTConfig())
    assert 80e6 < sizes["100M"] < 130e6 and 250e6 < sizes["300M"] < 420e6
    assert GPTConfig.preset("100M", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="choose one of"):
        GPTConfig.preset("7B")


def test_gpt_checks_memory_before_allocating(monkeypatch):
    monkeypatch.setattr(util_mod, "available_memory_bytes", lambda: 200 * 2**20)
    with pytest.raises(MemoryError, match="319M parameters.*only 0.20 GiB.*smaller config"):
        GPT(GPTConfig.preset("300M"))
    GPT(GPTConfig.preset("default"))  # 1M parameters (4 MB) fit in 200 MiB


def test_cache_path_names_the_thread_count(tmp_path):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = machine_mod.cache_path("cpu", tmp_path)
    finally:
        torch.set_num_threads(old)
    assert "-t1-" in one.name and os.path.dirname(one) == str(tmp_path)
