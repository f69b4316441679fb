"""The chip catalogue: peak compute, memory and interconnect of datacenter accelerators.

Inference cost is set by a handful of numbers per chip: how many FLOPs it can do per second,
how many bytes per second its memory delivers, how much memory it has, how fast it talks to
its neighbours, how much power it draws and what an hour of it costs. `data/hardware.csv`
holds those numbers for the chips the workbook compares, one figure per row, each with the
page it came from and how much to trust it (a vendor datasheet, an analyst's estimate,
sources that disagree, or an editable assumption for prices).

Conventions (also in the CSV's unit column):

- TFLOPS / TOPS are *dense* peaks. Datasheets often print 2:4-sparsity figures, twice as big.
- GB and GB/s are decimal (1e9). HBM capacities are really GiB, so "80 GB" is a little more.
- link_gbps is the chip-to-chip bandwidth *per direction*, summed over all of the chip's
  links (NVLink, HCCS/UB, or PCIe where there is no fabric). Vendors usually quote the
  bidirectional total: H100's "900 GB/s NVLink" is 450 GB/s each way. A ring all-reduce
  sends and receives at the same time, so its speed is set by the per-direction figure.

The roofline: a kernel that does F FLOPs and moves B bytes takes at least
max(F / peak_flops, B / bandwidth). The two meet at the *ridge point* F/B = peak / bandwidth:
below it (few FLOPs per byte, like batch-1 decode) memory is the limit, above it compute is.

Example:
    >>> chips = load_chips()
    >>> round(ridge_point(chips["H100 SXM"]))  # FLOPs per byte where H100 stops being memory-bound
    295
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.paths import REPO_ROOT
from tinylm.util import is_number

#: The catalogue shipped with the workbook (kept in git, small, meant to be edited).
DEFAULT_HARDWARE_CSV = REPO_ROOT / "data" / "hardware.csv"

#: Name of the placeholder chip whose figures are measured on the learner's machine.
THIS_MACHINE = "this machine"

#: Every numeric field of a Chip and the unit the CSV must state for it.
FIELD_UNITS: dict[str, str] = {
    "bf16_tflops": "TFLOPS",
    "int8_tops": "TOPS",
    "memory_gb": "GB",
    "memory_gbps": "GB/s",
    "link_gbps": "GB/s per direction",
    "watts": "W",
    "usd_per_hour": "USD/h",
}
CSV_COLUMNS = ("chip", "field", "value", "unit", "source", "certainty", "note")

#: Compute precisions a Chip knows a peak for. "int8" stands for any 8-bit tensor-core math
#: (INT8, or FP8 where the chip has it: on Hopper both have the same dense peak).
DTYPES = ("bf16", "fp16", "int8")


@dataclass
class Chip:
    """One accelerator's peak figures. None means unknown (e.g. not measured).

    Units: bf16_tflops in 1e12 FLOP/s (dense; fp16 is taken to run at the same rate),
    int8_tops in 1e12 op/s (dense), memory_gb in 1e9 bytes, memory_gbps and link_gbps in
    1e9 bytes/s (link: per direction, all links together), watts at full load (TDP),
    usd_per_hour a rental-price assumption. `sources`, `certainty` and `notes` map a field
    name to the page it came from, how sure it is, and any caveat.
    """

    name: str
    bf16_tflops: float
    int8_tops: float | None
    memory_gb: float | None
    memory_gbps: float
    link_gbps: float | None = None
    watts: float | None = None
    usd_per_hour: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    certainty: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in FIELD_UNITS:
            value = getattr(self, name)
            required = name in ("bf16_tflops", "memory_gbps")
            if value is None and not required:
                continue
            if not is_number(value):
                raise ValueError(f"Chip {self.name!r}: {name} must be a number, got {value!r}.")
            if not math.isfinite(value) or value < 0 or (required and value == 0):
                raise ValueError(
                    f"Chip {self.name!r}: {name}={value!r} must be a finite number "
                    f"{'> 0' if required else '>= 0'}; fix the figure."
                )

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak in FLOP/s (op/s for int8) for matrix math in `dtype`."""
        if dtype in ("bf16", "fp16"):
            return self.bf16_tflops * 1e12
        if dtype == "int8":
            if self.int8_tops is None:
                raise ValueError(
                    f"Chip {self.name!r} has no int8_tops figure; give one or use dtype='bf16'."
                )
            return self.int8_tops * 1e12
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}.")

    @property
    def memory_bytes_per_s(self) -> float:
        """Peak memory bandwidth in bytes/s."""
        return self.memory_gbps * 1e9

    @property
    def memory_bytes(self) -> float:
        """Memory capacity in bytes (inf when unknown, so nothing is ruled out by size)."""
        return math.inf if self.memory_gb is None else self.memory_gb * 1e9

    @property
    def link_bytes_per_s(self) -> float | None:
        """Chip-to-chip bandwidth per direction in bytes/s, None when unknown."""
        return None if self.link_gbps is None else self.link_gbps * 1e9


def ridge_point(chip: Chip, dtype: str = "bf16") -> float:
    """FLOPs per byte at which `chip` is as slow on compute as on memory: peak / bandwidth.

    A phase with a lower arithmetic intensity (FLOPs per byte moved) is memory-bound on this
    chip; a higher one is compute-bound. H100: 989e12 / 3.35e12 = 295 FLOP/byte. H20:
    148e12 / 4.0e12 = 37: far less compute per byte, which is why it is a decode chip.
    """
    return chip.peak_flops(dtype) / chip.memory_bytes_per_s


def this_machine(
    measured_tflops: float,
    measured_gbps: float,
    memory_gb: float | None = None,
    *,
    int8_tops: float | None = None,
    link_gbps: float | None = None,
    watts: float | None = None,
    usd_per_hour: float | None = None,
    name: str = THIS_MACHINE,
) -> Chip:
    """A Chip for the learner's own machine from measured peaks (see tinylm.profile).

    measured_tflops: best matmul throughput measured in bf16/fp16 (or fp32 on a CPU without
    fast bf16), in 1e12 FLOP/s; measured_gbps: best copy bandwidth in 1e9 bytes/s. The rest
    are optional; unknown figures stay None and the cost model reports NaN for what needs them.
    """
    measured = "measured at run time"
    sources = {"bf16_tflops": "tinylm.profile", "memory_gbps": "tinylm.profile"}
    given = {
        "memory_gb": memory_gb,
        "int8_tops": int8_tops,
        "link_gbps": link_gbps,
        "watts": watts,
        "usd_per_hour": usd_per_hour,
    }
    for key, value in given.items():
        if value is not None:
            sources[key] = "given by the caller"
    return Chip(
        name=name,
        bf16_tflops=measured_tflops,
        int8_tops=int8_tops,
        memory_gb=memory_gb,
        memory_gbps=measured_gbps,
        link_gbps=link_gbps,
        watts=watts,
        usd_per_hour=usd_per_hour,
        sources=sources,
        certainty={key: measured for key in sources},
    )


def load_chips(path: str | Path | None = None) -> dict[str, Chip]:
    """Read the chip catalogue (default: data/hardware.csv) into {name: Chip}, in file order.

    The CSV is long-format: one row per (chip, field) with columns
    chip, field, value, unit, source, certainty, note. A row whose value is "measured" is a
    placeholder filled at run time (the "this machine" chip); such chips are left out here,
    build them with `this_machine()`. Malformed files raise ValueError naming the line and
    column to fix; a missing file raises FileNotFoundError.
    """
    path = Path(path) if path is not None else DEFAULT_HARDWARE_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"chip catalogue {path} not found; pass the path of a hardware CSV "
            f"(the workbook ships one at {DEFAULT_HARDWARE_CSV})."
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; the header must be {','.join(CSV_COLUMNS)}."
            )
        figures: dict[str, dict[str, float]] = {}
        meta: dict[str, dict[str, dict[str, str]]] = {}
        placeholders: set[str] = set()
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            chip, name = (row["chip"] or "").strip(), (row["field"] or "").strip()
            where = f"{path}, line {line}"
            if not chip:
                raise ValueError(f"{where}: empty 'chip' column; name the chip.")
            if name not in FIELD_UNITS:
                raise ValueError(
                    f"{where}: unknown field {name!r} for chip {chip!r}; use one of "
                    f"{sorted(FIELD_UNITS)}."
                )
            unit = (row["unit"] or "").strip()
            if unit != FIELD_UNITS[name]:
                raise ValueError(
                    f"{where}: field {name!r} of {chip!r} has unit {unit!r}, expected "
                    f"{FIELD_UNITS[name]!r}; convert the value and fix the unit column."
                )
            text = (row["value"] or "").strip()
            if text == "measured":
                placeholders.add(chip)
                continue
            try:
                value = float(text)
            except ValueError:
                raise ValueError(
                    f"{where}: column 'value' of {chip!r} / {name} is {text!r}, not a number; "
                    "write a plain number like 989 or 3350 (no units, no thousands separators)."
                ) from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{where}: column 'value' of {chip!r} / {name} is {text!r}; it must be a "
                    "finite number >= 0."
                )
            if name in figures.setdefault(chip, {}):
                raise ValueError(
                    f"{where}: {chip!r} / {name} appears twice; keep one row per figure."
                )
            figures[chip][name] = value
            info = meta.setdefault(chip, {"sources": {}, "certainty": {}, "notes": {}})
            info["sources"][name] = (row["source"] or "").strip()
            info["certainty"][name] = (row["certainty"] or "").strip()
            info["notes"][name] = (row["note"] or "").strip()

    chips: dict[str, Chip] = {}
    for chip, values in figures.items():
        if chip in placeholders:
            continue  # partly measured: only this_machine() can complete it
        absent = [name for name in FIELD_UNITS if name not in values]
        if absent:
            raise ValueError(
                f"{path}: chip {chip!r} has no row for {absent}; add one row per field "
                "(use the source/certainty columns to say when a figure is a guess)."
            )
        try:
            chips[chip] = Chip(name=chip, **values, **meta[chip])
        except ValueError as e:  # e.g. a zero bandwidth
            raise ValueError(f"{path}: {e}") from None
    return chips
