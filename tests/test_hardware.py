"""Tests for tinylm.hardware: the chip catalogue, its CSV loader and the roofline ridge point."""

from __future__ import annotations

import csv
import math

import pytest

from tinylm.hardware import (
    CSV_COLUMNS,
    DEFAULT_HARDWARE_CSV,
    FIELD_UNITS,
    THIS_MACHINE,
    Chip,
    load_chips,
    ridge_point,
    this_machine,
)

CATALOGUE = (
    "H100 SXM",
    "H800 SXM",
    "H20",
    "A100 80GB SXM",
    "L20",
    "Ascend 910B",
    "Ascend 910C",
    "Ascend 310P",
)


@pytest.fixture(scope="module")
def chips() -> dict[str, Chip]:
    return load_chips()


def _write_csv(path, rows, header=CSV_COLUMNS):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _toy_rows(chip="Toy", **override):
    """One valid row per field for a made-up chip; override values by field name."""
    values = dict(
        bf16_tflops="2",
        int8_tops="4",
        memory_gb="16",
        memory_gbps="500",
        link_gbps="50",
        watts="100",
        usd_per_hour="1",
    )
    values.update(override)
    return [
        [chip, name, values[name], FIELD_UNITS[name], "made up", "test", ""] for name in FIELD_UNITS
    ]


# ----------------------------------------------------------------------------- the shipped catalogue


def test_catalogue_has_every_chip_with_every_figure_sourced(chips):
    assert tuple(chips) == CATALOGUE  # file order; "this machine" is a placeholder, left out
    for chip in chips.values():
        for name in FIELD_UNITS:
            assert getattr(chip, name) is not None, (chip.name, name)
            assert chip.certainty[name], f"{chip.name} / {name} says nothing about certainty"
            if chip.certainty[name] != "assumption":
                assert chip.sources[name].startswith("http"), (chip.name, name)
        # prices are editable assumptions and say so
        assert chip.certainty["usd_per_hour"] == "assumption"


def test_this_machine_row_is_a_measured_placeholder():
    with DEFAULT_HARDWARE_CSV.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["chip"] == THIS_MACHINE]
    assert {r["field"] for r in rows} >= {"bf16_tflops", "memory_gbps"}
    assert all(r["value"] == "measured" for r in rows)


def test_datasheet_figures_are_dense_and_links_per_direction(chips):
    h100, h800, h20 = chips["H100 SXM"], chips["H800 SXM"], chips["H20"]
    # NVIDIA prints 1,979 TFLOPS BF16 "with sparsity"; the dense peak is half of it.
    assert h100.bf16_tflops == 989 and h100.int8_tops == 1979
    assert (h100.memory_gb, h100.memory_gbps, h100.watts) == (80, 3350, 700)
    # "900 GB/s NVLink" is both directions together: 450 GB/s each way.
    assert h100.link_gbps == 450
    # H800: H100's compute with NVLink cut to 400 GB/s bidirectional.
    assert h800.bf16_tflops == h100.bf16_tflops and h800.link_gbps == 200
    # H20: ~15% of H100's compute but more memory bandwidth: the inference story.
    assert 0.14 < h20.bf16_tflops / h100.bf16_tflops < 0.16
    assert h20.memory_gbps > h100.memory_gbps
    assert h20.memory_gb > h100.memory_gb


def test_disagreeing_sources_are_flagged(chips):
    for name in ("Ascend 910B", "Ascend 910C"):
        assert any("disagree" in c for c in chips[name].certainty.values()), name
    assert chips["Ascend 910C"].certainty["memory_gbps"] == "disagreeing sources"


# ----------------------------------------------------------------------------- Chip and ridge point


def test_ridge_point_by_hand():
    # 2 TFLOPS over 500 GB/s: 2e12 / 5e11 = 4 FLOPs per byte; int8 at 4 TOPS: 8 ops per byte.
    chip = Chip("toy", bf16_tflops=2, int8_tops=4, memory_gb=16, memory_gbps=500)
    assert ridge_point(chip) == pytest.approx(4.0)
    assert ridge_point(chip, "fp16") == pytest.approx(4.0)
    assert ridge_point(chip, "int8") == pytest.approx(8.0)


def test_ridge_points_of_catalogue(chips):
    # H100: 989e12 / 3.35e12 = 295.2; H20: 148e12 / 4.0e12 = 37: a decode-shaped chip.
    assert ridge_point(chips["H100 SXM"]) == pytest.approx(989 / 3.35)
    assert ridge_point(chips["H20"]) == pytest.approx(37.0)
    assert ridge_point(chips["H20"]) < ridge_point(chips["H100 SXM"]) / 7


def test_chip_units_and_errors():
    chip = Chip("toy", bf16_tflops=2, int8_tops=None, memory_gb=16, memory_gbps=500, link_gbps=50)
    assert chip.peak_flops() == 2e12
    assert chip.memory_bytes_per_s == 5e11 and chip.memory_bytes == 16e9
    assert chip.link_bytes_per_s == 5e10
    with pytest.raises(ValueError, match="no int8_tops"):
        chip.peak_flops("int8")
    with pytest.raises(ValueError, match="unknown dtype 'fp4'"):
        chip.peak_flops("fp4")
    with pytest.raises(ValueError, match="memory_gbps"):
        Chip("bad", bf16_tflops=1, int8_tops=None, memory_gb=1, memory_gbps=0)
    with pytest.raises(ValueError, match="watts"):
        Chip("bad", bf16_tflops=1, int8_tops=None, memory_gb=1, memory_gbps=1, watts=-5)


def test_this_machine_builds_a_measured_chip():
    chip = this_machine(0.5, 20.0)
    assert chip.name == THIS_MACHINE
    assert chip.peak_flops() == 0.5e12 and chip.memory_bytes_per_s == 20e9
    assert chip.certainty == {
        "bf16_tflops": "measured at run time",
        "memory_gbps": "measured at run time",
    }
    assert math.isinf(chip.memory_bytes) and chip.usd_per_hour is None
    laptop = this_machine(0.5, 20.0, memory_gb=16, watts=45, name="my laptop")
    assert laptop.name == "my laptop" and laptop.memory_bytes == 16e9
    assert laptop.sources["watts"] == "given by the caller"


# ----------------------------------------------------------------------------- malformed CSVs


def test_load_chips_reads_a_valid_file(tmp_path):
    path = _write_csv(tmp_path / "hw.csv", _toy_rows())
    chip = load_chips(path)["Toy"]
    assert (chip.bf16_tflops, chip.memory_gbps, chip.link_gbps) == (2.0, 500.0, 50.0)
    assert chip.sources["watts"] == "made up"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_chips(tmp_path / "nope.csv")


def test_missing_column_is_named(tmp_path):
    header = [c for c in CSV_COLUMNS if c != "unit"]
    rows = [[r[0], r[1], r[2], r[4], r[5], r[6]] for r in _toy_rows()]
    path = _write_csv(tmp_path / "hw.csv", rows, header=header)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['unit'\]"):
        load_chips(path)


def test_non_numeric_value_names_line_and_column(tmp_path):
    path = _write_csv(tmp_path / "hw.csv", _toy_rows(memory_gbps="3.35 TB/s"))
    # memory_gbps is the 4th field: header is line 1, so its row is line 5
    with pytest.raises(ValueError, match=r"line 5: column 'value' of 'Toy' / memory_gbps"):
        load_chips(path)


def test_bad_rows_are_reported(tmp_path):
    rows = _toy_rows()
    rows[0][1] = "fp64_tflops"
    with pytest.raises(ValueError, match="line 2: unknown field 'fp64_tflops'"):
        load_chips(_write_csv(tmp_path / "a.csv", rows))
    rows = _toy_rows()
    rows[4][3] = "GB/s"  # link_gbps must say it is per direction
    with pytest.raises(ValueError, match="line 6: .*expected 'GB/s per direction'"):
        load_chips(_write_csv(tmp_path / "b.csv", rows))
    with pytest.raises(ValueError, match="appears twice"):
        load_chips(_write_csv(tmp_path / "c.csv", _toy_rows() + _toy_rows()[:1]))
    with pytest.raises(ValueError, match=r"has no row for \['watts'\]"):
        load_chips(_write_csv(tmp_path / "d.csv", [r for r in _toy_rows() if r[1] != "watts"]))
    with pytest.raises(ValueError, match="finite number >= 0"):
        load_chips(_write_csv(tmp_path / "e.csv", _toy_rows(watts="-1")))
    with pytest.raises(ValueError, match="memory_gbps=0.0"):
        load_chips(_write_csv(tmp_path / "f.csv", _toy_rows(memory_gbps="0")))
