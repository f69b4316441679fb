"""Tests for tinylm.util's argument checks (one home for "is this an integer / a number") and paths."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tinylm.paths import display_path
from tinylm.util import check_int, is_int, is_number


def test_is_int_rejects_bools_floats_and_by_default_numpy_ints():
    assert is_int(3) and is_int(0) and is_int(-2)
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(None)
    assert not is_int(np.int64(3))  # plain int only, unless the caller accepts Integral
    assert is_int(np.int64(3), integral=True)
    assert not is_int(np.bool_(True), integral=True) and not is_int(False, integral=True)


def test_is_number_accepts_int_and_float_and_with_real_any_real():
    assert is_number(2) and is_number(0.5) and not is_number(True) and not is_number("1")
    assert not is_number(Fraction(1, 2)) and is_number(Fraction(1, 2), real=True)
    assert is_number(np.float32(0.5), real=True) and not is_number(True, real=True)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4", None])
def test_check_int_names_the_argument_the_value_and_the_fix(bad):
    with pytest.raises(ValueError) as err:
        check_int("max_batch", bad, 1, fix="e.g. 8")
    assert str(err.value) == f"max_batch must be an integer >= 1, got {bad!r}; e.g. 8."


def test_check_int_default_fix_and_minimum():
    check_int("warmup", 0, minimum=0)
    check_int("n", np.int32(5), integral=True)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got np.int32\(5\)"):
        check_int("n", np.int32(5))
    with pytest.raises(
        ValueError, match=r"warmup must be .* got -1; pass a whole number of at least 0"
    ):
        check_int("warmup", -1, minimum=0)


def test_display_path_names_workbook_files_without_the_machine_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_DATA_DIR", str(tmp_path / "data"))
    inside = tmp_path / "data" / "checkpoints" / "dense"
    assert display_path(inside) == "data/checkpoints/dense"
    elsewhere = Path("/somewhere/else/model.safetensors")
    assert display_path(elsewhere) == str(elsewhere)
