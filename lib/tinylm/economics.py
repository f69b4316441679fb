"""What an hour of a chip costs, and what that makes a million tokens cost.

The cost model (`tinylm.costs`) turns a model and a chip into seconds. This module turns
seconds into money and power, with every price an explicit, editable assumption:

- `hourly_cost`: owning a chip, per hour = capital (chip + its share of the server and
  network, paid off over `amortisation_years` at `cost_of_capital`) + electricity (chip TDP
  plus host overhead, times the datacenter's PUE, times the tariff). `data/prices.csv` holds
  the figures with a source column; a figure without a source says "assumption".
- `break_even_usd_per_hour`: the hourly price at which a chip produces tokens as cheaply as a
  reference chip. It turns "the H20 is cheaper per token" into "the H20 is cheaper per token
  as long as an hour of it costs less than $X", so no conclusion hinges on one guessed price.
- `frontier`: throughput per chip against interactivity (tokens/s each user sees), across
  batch sizes and tensor-parallel widths, the way SemiAnalysis's InferenceMAX benchmark
  compares GPUs, with $ per million output tokens and tokens/s per provisioned megawatt; it
  ends at the largest batch whose KV cache still fits.
- `request_cost`: a blended cost per request with prefill included (input tokens are not
  free: on a low-FLOP chip like the H20 they cost several times what they cost on an H100).
- `fleet_tokens_per_day`: the back-of-envelope for a fleet (1 million H20s, say).

Everything is a roofline bound (efficiency 1.0 unless you pass less), so dollar figures are
floors: real serving reaches 30-70% of these throughputs.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.costs import Estimate, ModelShape, estimate
from tinylm.hardware import Chip
from tinylm.paths import REPO_ROOT
from tinylm.util import is_number

#: Price assumptions shipped with the workbook (one row per figure, with a source column).
DEFAULT_PRICES_CSV = REPO_ROOT / "data" / "prices.csv"
HOURS_PER_YEAR = 8760
SECONDS_PER_DAY = 86400

#: Every field of ChipPrice that prices.csv may set, with its unit.
PRICE_UNITS: dict[str, str] = {
    "chip_usd": "USD",
    "system_fraction": "fraction of chip price",
    "amortisation_years": "years",
    "cost_of_capital": "per year",
    "host_power_fraction": "fraction of chip TDP",
    "pue": "ratio",
    "usd_per_kwh": "USD/kWh",
}
PRICE_CSV_COLUMNS = ("chip", "field", "value", "unit", "source", "certainty", "note")
#: The chip name whose rows give every chip's shared assumptions (a chip's own row wins).
DEFAULT_ROW = "default"


# ----------------------------------------------------------------------------- owning a chip


@dataclass(frozen=True)
class ChipPrice:
    """The assumptions that turn one chip into dollars per hour.

    chip_usd: purchase price of one chip. system_fraction: the rest of the server and network
    per chip, as a fraction of chip_usd. amortisation_years and cost_of_capital (annual
    rate): how the capital is paid off. host_power_fraction: host CPUs, NICs and switches per
    chip as a fraction of the chip's TDP. pue: datacenter power usage effectiveness.
    usd_per_kwh: the electricity tariff. sources / certainty: per field, as in prices.csv.
    """

    chip: str
    chip_usd: float
    system_fraction: float = 0.5
    amortisation_years: float = 4.0
    cost_of_capital: float = 0.10
    host_power_fraction: float = 0.8
    pue: float = 1.3
    usd_per_kwh: float = 0.08
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    certainty: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in PRICE_UNITS:
            value = getattr(self, name)
            if not is_number(value):
                raise ValueError(
                    f"ChipPrice {self.chip!r}: {name} must be a number, got {value!r}."
                )
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ChipPrice {self.chip!r}: {name}={value!r} must be >= 0.")
        if self.amortisation_years <= 0:
            raise ValueError(
                f"ChipPrice {self.chip!r}: amortisation_years={self.amortisation_years!r} must "
                "be > 0 (the years over which the hardware is paid off)."
            )
        if self.pue < 1:
            raise ValueError(
                f"ChipPrice {self.chip!r}: pue={self.pue!r} must be >= 1 (1.0 = no cooling or "
                "conversion losses)."
            )


def capital_usd_per_hour(capital_usd: float, years: float, annual_rate: float = 0.0) -> float:
    """Hourly payment that pays off `capital_usd` over `years` at `annual_rate` interest.

    The annuity formula: per year capital * r / (1 - (1 + r)^-years), which is capital / years
    when r = 0. Divided by 8760 hours. 25,000 USD over 4 years at 10%: 7,887 USD a year,
    0.90 USD an hour (at 0%: 0.71 USD an hour).
    """
    if years <= 0:
        raise ValueError(f"years={years!r} must be > 0.")
    if annual_rate < 0:
        raise ValueError(f"annual_rate={annual_rate!r} must be >= 0.")
    if annual_rate == 0:
        per_year = capital_usd / years
    else:
        per_year = capital_usd * annual_rate / (1 - (1 + annual_rate) ** -years)
    return per_year / HOURS_PER_YEAR


def provisioned_watts(chip_watts: float, host_power_fraction: float, pue: float) -> float:
    """Facility power one chip takes: TDP, plus its share of the host, times the PUE.

    This is the power a datacenter must provision per chip, the denominator of "tokens per
    provisioned megawatt". 700 W with 80% host overhead at PUE 1.3: 700 * 1.8 * 1.3 = 1638 W.
    """
    return chip_watts * (1 + host_power_fraction) * pue


@dataclass(frozen=True)
class HourlyCost:
    """An owned chip's cost per hour, split into capital and electricity, and its power."""

    chip: str
    capital_usd_per_hour: float
    power_usd_per_hour: float
    provisioned_watts: float

    @property
    def usd_per_hour(self) -> float:
        """Capital + electricity per hour of one chip (at full power, all hours)."""
        return self.capital_usd_per_hour + self.power_usd_per_hour


def hourly_cost(price: ChipPrice, chip: Chip) -> HourlyCost:
    """Derive one chip's cost per hour from its price assumptions and its TDP.

    capital: chip_usd * (1 + system_fraction), paid off as capital_usd_per_hour();
    electricity: provisioned_watts() / 1000 kW * usd_per_kwh (at full power around the clock,
    an upper bound). H20 with the shipped assumptions: 12,000 * 1.5 = 18,000 USD over 4 years
    at 10% = 0.65 USD/h, plus 400 * 1.8 * 1.3 = 936 W at 0.08 USD/kWh = 0.075 USD/h.
    """
    if chip.watts is None:
        raise ValueError(f"chip {chip.name!r} has no watts figure; give one to price its power.")
    capital = capital_usd_per_hour(
        price.chip_usd * (1 + price.system_fraction),
        price.amortisation_years,
        price.cost_of_capital,
    )
    watts = provisioned_watts(chip.watts, price.host_power_fraction, price.pue)
    return HourlyCost(chip.name, capital, watts / 1000 * price.usd_per_kwh, watts)


def load_prices(path: str | Path | None = None) -> dict[str, ChipPrice]:
    """Read the price assumptions (default: data/prices.csv) into {chip name: ChipPrice}.

    Long format like data/hardware.csv: chip, field, value, unit, source, certainty, note.
    Rows of the chip named "default" give every chip's shared assumptions (amortisation,
    tariff, PUE ...); a chip's own row overrides them. Every chip needs its own chip_usd row.
    """
    path = Path(path) if path is not None else DEFAULT_PRICES_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"price file {path} not found; pass the path of a prices CSV "
            f"(the workbook ships one at {DEFAULT_PRICES_CSV})."
        )
    values: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    certainty: dict[str, dict[str, str]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PRICE_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; the header must be "
                f"{','.join(PRICE_CSV_COLUMNS)}."
            )
        for line, row in enumerate(reader, start=2):
            chip, name = (row["chip"] or "").strip(), (row["field"] or "").strip()
            where = f"{path}, line {line}"
            if not chip:
                raise ValueError(f"{where}: empty 'chip' column; name the chip (or 'default').")
            if name not in PRICE_UNITS:
                raise ValueError(
                    f"{where}: unknown field {name!r}; use one of {sorted(PRICE_UNITS)}."
                )
            unit = (row["unit"] or "").strip()
            if unit != PRICE_UNITS[name]:
                raise ValueError(
                    f"{where}: field {name!r} has unit {unit!r}, expected {PRICE_UNITS[name]!r}."
                )
            text = (row["value"] or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise ValueError(
                    f"{where}: value {text!r} of {chip!r} / {name} is not a number; write a "
                    "plain number like 12000."
                ) from None
            if name in values.setdefault(chip, {}):
                raise ValueError(f"{where}: {chip!r} / {name} appears twice; keep one row.")
            values[chip][name] = value
            sources.setdefault(chip, {})[name] = (row["source"] or "").strip()
            certainty.setdefault(chip, {})[name] = (row["certainty"] or "").strip()
    shared = values.pop(DEFAULT_ROW, {})
    shared_src, shared_cert = sources.pop(DEFAULT_ROW, {}), certainty.pop(DEFAULT_ROW, {})
    prices: dict[str, ChipPrice] = {}
    for chip, own in values.items():
        if "chip_usd" not in own:
            raise ValueError(f"{path}: chip {chip!r} has no chip_usd row; add its price.")
        try:
            prices[chip] = ChipPrice(
                chip=chip,
                **{**shared, **own},
                sources={**shared_src, **sources[chip]},
                certainty={**shared_cert, **certainty[chip]},
            )
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return prices


# ----------------------------------------------------------------------------- break-even


def break_even_usd_per_hour(
    reference_usd_per_hour: float,
    reference_tokens_per_s_per_chip: float,
    tokens_per_s_per_chip: float,
) -> float:
    """The hourly price at which a chip's $ per token equals the reference chip's.

    $ per token = price per second / tokens per second, so equal cost per token means
    price = reference price * (its throughput / the reference's throughput). Below this price
    the chip is the cheaper way to produce tokens; above it, the reference is.
    """
    for name, value in (
        ("reference_usd_per_hour", reference_usd_per_hour),
        ("reference_tokens_per_s_per_chip", reference_tokens_per_s_per_chip),
        ("tokens_per_s_per_chip", tokens_per_s_per_chip),
    ):
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0.")
    return reference_usd_per_hour * tokens_per_s_per_chip / reference_tokens_per_s_per_chip


def usd_per_million(usd_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per million tokens for a machine costing `usd_per_hour` producing tokens_per_s."""
    return usd_per_hour / 3600 / tokens_per_s * 1e6


# ----------------------------------------------------------------------------- the frontier


@dataclass(frozen=True)
class FrontierPoint:
    """One operating point: a batch (and tensor-parallel width) on one chip type.

    tokens_per_s_per_user: the decode speed each user sees (1 / time per output token).
    tokens_per_s_per_chip: the output tokens all users get, divided by the chips serving them.
    usd_per_million_output: decode time only, at usd_per_hour_per_chip.
    tokens_per_s_per_mw: output tokens/s per megawatt of provisioned facility power.
    """

    chip: str
    batch: int
    tp: int
    tokens_per_s_per_user: float
    tokens_per_s_per_chip: float
    usd_per_million_output: float
    tokens_per_s_per_mw: float
    bound: str
    memory_per_chip_gb: float


def _point(est: Estimate, usd_per_hour_per_chip: float, watts_per_chip: float) -> FrontierPoint:
    per_chip = est.tokens_per_second_per_chip
    return FrontierPoint(
        chip=est.chip,
        batch=est.batch,
        tp=est.tp,
        tokens_per_s_per_user=1 / est.decode_seconds_per_token,
        tokens_per_s_per_chip=per_chip,
        usd_per_million_output=usd_per_million(usd_per_hour_per_chip, per_chip),
        tokens_per_s_per_mw=per_chip / watts_per_chip * 1e6,
        bound=est.decode.bound,
        memory_per_chip_gb=est.memory_bytes_per_chip / 1e9,
    )


def batch_sweep(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: 1, 2, 4, ..., max_batch."""
    if max_batch < 1:
        return []
    batches = [2**i for i in range(max_batch.bit_length()) if 2**i < max_batch]
    return batches + [max_batch]


def frontier(
    shape: ModelShape,
    chip: Chip,
    usd_per_hour_per_chip: float,
    watts_per_chip: float,
    prompt_len: int,
    new_tokens: int,
    weight_bits: int = 16,
    kv_bits: int = 16,
    tps: Iterable[int] = (1,),
    **estimate_kwargs,
) -> list[FrontierPoint]:
    """Throughput per chip vs tokens/s per user for every batch that fits, per tp width.

    For each tensor-parallel width in `tps` (widths that do not divide the heads are skipped),
    the batch runs over batch_sweep(max_batch): it ends at the largest batch whose weights and
    KV cache (at the full prompt_len + new_tokens context) fit in memory. A width at which not
    even batch 1 fits contributes no point. watts_per_chip: provisioned power per chip (see
    provisioned_watts). Extra keyword arguments go to tinylm.costs.estimate.
    """
    points = []
    for tp in tps:
        try:
            probe = estimate(
                shape, chip, 1, prompt_len, new_tokens, weight_bits, kv_bits, tp, **estimate_kwargs
            )
        except ValueError:
            continue  # e.g. tp does not divide the heads
        if probe.max_batch is None:
            raise ValueError(f"chip {chip.name!r} has no memory figure: the frontier needs one.")
        for batch in batch_sweep(probe.max_batch):
            est = estimate(
                shape, chip, batch, prompt_len, new_tokens, weight_bits, kv_bits, tp,
                **estimate_kwargs,
            )  # fmt: skip
            assert est.fits, "batch_sweep stays within max_batch"
            points.append(_point(est, usd_per_hour_per_chip, watts_per_chip))
    return points


def pareto(points: Iterable[FrontierPoint]) -> list[FrontierPoint]:
    """The points no other point beats on both axes (per-user speed and per-chip throughput).

    Sorted from the most interactive (fastest per user) to the highest throughput; this is the
    curve InferenceMAX draws for each GPU.
    """
    ordered = sorted(points, key=lambda p: (-p.tokens_per_s_per_user, -p.tokens_per_s_per_chip))
    best, kept = -math.inf, []
    for p in ordered:
        if p.tokens_per_s_per_chip > best:
            kept.append(p)
            best = p.tokens_per_s_per_chip
    return kept


def best_at_interactivity(
    points: Iterable[FrontierPoint], min_tokens_per_s_per_user: float
) -> FrontierPoint | None:
    """The highest-throughput point that still gives each user at least the given speed."""
    ok = [p for p in points if p.tokens_per_s_per_user >= min_tokens_per_s_per_user]
    return max(ok, key=lambda p: p.tokens_per_s_per_chip) if ok else None


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestCost:
    """Chip time and dollars of one request (prompt in, answer out), prefill included."""

    prefill_chip_seconds: float
    decode_chip_seconds: float
    usd: float
    input_tokens: int
    output_tokens: int

    @property
    def chip_seconds(self) -> float:
        """All chip time one request occupies."""
        return self.prefill_chip_seconds + self.decode_chip_seconds

    @property
    def prefill_share(self) -> float:
        """Fraction of the request's cost spent reading the prompt."""
        return self.prefill_chip_seconds / self.chip_seconds

    @property
    def usd_per_million_tokens(self) -> float:
        """Blended price: the request's dollars per million tokens (input + output)."""
        return self.usd / (self.input_tokens + self.output_tokens) * 1e6


def request_cost(est: Estimate, usd_per_hour_per_chip: float) -> RequestCost:
    """Cost of one of the `est.batch` requests of an estimate: its share of prefill and decode.

    The batch's prefill occupies tp chips for prefill_seconds, shared by `batch` requests;
    each decode step occupies them for decode_seconds_per_token, also shared, new_tokens
    times. The input:output ratio is est.prompt_len : est.new_tokens.
    """
    prefill = est.tp * est.prefill_seconds / est.batch
    decode = est.tp * est.new_tokens * est.decode_seconds_per_token / est.batch
    usd = (prefill + decode) * usd_per_hour_per_chip / 3600
    return RequestCost(prefill, decode, usd, est.prompt_len, est.new_tokens)


def fleet_tokens_per_day(n_chips: float, tokens_per_s_per_chip: float, utilisation: float) -> float:
    """Tokens a fleet produces per day: chips * throughput * the fraction of time busy * 86400."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation={utilisation!r} must be in (0, 1].")
    return n_chips * tokens_per_s_per_chip * utilisation * SECONDS_PER_DAY
