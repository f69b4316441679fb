"""Checks for notebook 06, "Quantisation".

Four exercises, from counting to calibrating: what a format really costs per weight, scales
included (warm-up); symmetric int4 round-to-nearest per group, written from scratch (core);
decoding a llama.cpp Q4_0 block from its raw bytes (core); and GPTQ's error compensation for
one weight row (stretch). Each check runs the learner's function on inputs chosen so that the
usual mistakes give a different answer, and the hint names the mistake it recognised: an
off-by-one code range (-8..7 instead of -7..7 in the simple grid), a missing clamp, a scale from the mean
instead of the largest magnitude, one scale per tensor or per row instead of per group, the
wrong nibble order, a forgotten offset, an error pushed the wrong way.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from tinylm.course.exercises.core import (
    Fail,
    call,
    case_seed,
    check_cases,
    exercise,
    expect_close,
    first_matching_hint,
    is_close,
    unseen,
)

# torch is imported inside the functions: listing the exercises of all chapters should not
# pay for importing it.


_close = partial(is_close, abs_tol=1e-12)  # errors of exactly 0 compare as close


def _tensors_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    import torch

    try:
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return False
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------- warm-up


def reference_bytes_per_weight(
    bits: int, group_size: int, scale_bytes: float, zero_bytes: float
) -> float:
    """Bytes per weight of `bits`-bit codes plus one scale (and zero point) per group."""
    return bits / 8 + (scale_bytes + zero_bytes) / group_size


def _bytes_hint(got: Any, expected: Any, args: Any) -> str:
    bits, group, scale_b, zero_b = args
    guesses = [
        (bits / 8, "add the scale: every group of group_size weights also stores one scale "
         "(and zero point), so each weight carries (scale_bytes + zero_bytes) / group_size"),
        (bits / 8 + scale_b / group, "count the zero point too: zero_bytes per group"),
        (bits + (scale_b + zero_b) / group, "the codes cost bits / 8 bytes each (8 bits per byte)"),
        (bits / 8 + 8 * (scale_b + zero_b) / group, "scale_bytes and zero_bytes are already bytes: "
         "do not multiply them by 8"),
        (8 * expected, "return bytes, not bits (divide by 8)"),
        (bits / 8 + (scale_b + zero_b) * group, "the group's scale is shared by group_size "
         "weights: divide its bytes by group_size, do not multiply"),
        ((bits / 8 + scale_b + zero_b) / group, "only the scale and zero point are shared by the "
         "group; every weight has its own code of bits / 8 bytes"),
    ]  # fmt: skip
    return first_matching_hint(got, expected, guesses, _close) or (
        "bytes per weight = bits / 8 + (scale_bytes + zero_bytes) / group_size"
    )


@exercise("ch06.bytes_per_weight", difficulty="warm-up", title="Bytes per weight of a format")
def _check_bytes_per_weight(answer: Any) -> str:
    cases = [
        ((4, 32, 2, 0), 18 / 32),  # llama.cpp Q4_0: 18-byte blocks of 32
        ((8, 32, 2, 0), 34 / 32),  # Q8_0: 34-byte blocks of 32
        ((4, 128, 2, 1), reference_bytes_per_weight(4, 128, 2, 1)),  # asymmetric, groups of 128
        ((4, 4096, 2, 0), reference_bytes_per_weight(4, 4096, 2, 0)),  # per channel, 4096-wide row
        ((3, 64, 2, 1), reference_bytes_per_weight(3, 64, 2, 1)),
        ((8, 128, 4, 0), reference_bytes_per_weight(8, 128, 4, 0)),  # fp32 scales
    ]
    cases += [
        (args, reference_bytes_per_weight(*args))
        for args in unseen(
            lambda r: (
                r.randint(2, 8),
                r.choice((16, 32, 64, 128, 256)),
                r.choice((2, 4)),
                r.randint(0, 1),
            )
        )  # fmt: skip
    ]
    message = check_cases(answer, cases, rel=1e-9, hint=_bytes_hint)
    return f"{message} (Q4_0 = 4.5 bits per weight, Q8_0 = 8.5, scales included)"


# --------------------------------------------------------------------------- core: int4 groups


def reference_quantize_int4_groups(w: Any, group_size: int) -> Any:
    """Symmetric int4 round to nearest, one float32 scale max|group| / 7 per group of a row.

    Returns the dequantised weights (float32, same shape); an all-zero group stays zero.
    This is the simplest symmetric grid (15 levels). tinylm.quant.quantize_tensor(w, 4,
    group_size) refines it with llama.cpp Q4_0's rule (a signed scale, all 16 codes).
    """
    import torch

    w = torch.as_tensor(w).float()
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    s = g.abs().amax(dim=-1, keepdim=True) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(g / s).clamp(-7, 7)
    return (q * s).reshape(rows, cols)


def _int4_variants(w: Any, gs: int) -> list[tuple[Any, str]]:
    """What the typical mistakes compute, each with the hint that names it."""
    import torch

    rows, cols = w.shape
    g = w.reshape(rows, cols // gs, gs)

    def quant(groups: Any, scale: Any, lo: float | None, hi: float | None, rnd=torch.round):
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = rnd(groups / scale)
        if lo is not None:
            q = q.clamp(lo, hi)
        return q * scale

    absmax = g.abs().amax(-1, keepdim=True)
    mean = g.abs().mean(-1, keepdim=True)
    variants = [
        (quant(g, absmax / 8, -8, 7).reshape(rows, cols),
         "this exercise asks for the simple grid, codes -7..7 with s = max|w| / 7: with "
         "s = max|w| / 8 a largest POSITIVE weight needs code +8, which does not exist (-8..7), "
         "and gets clamped (Q4_0 and tinylm.quant avoid that with a signed scale, section 3)"),
        (quant(g, absmax / 8, None, None).reshape(rows, cols),
         "codes -8..8 are 17 values, one more than 4 bits hold: use s = max|w| / 7 and codes "
         "-7..7"),
        (quant(g, mean / 7, -7, 7).reshape(rows, cols),
         "take the scale from the group's largest magnitude (abs max), not its mean: the step "
         "must let the largest weight reach ±7"),
        (quant(g, mean / 7, None, None).reshape(rows, cols),
         "take the scale from the group's largest magnitude (abs max), not its mean, and clamp "
         "the codes to -7..7: yours run past the 16 values 4 bits can hold"),
        (quant(w.reshape(1, 1, -1), w.abs().max().reshape(1, 1, 1) / 7, -7, 7).reshape(rows, cols),
         "one scale per GROUP of group_size consecutive weights of a row, not one for the "
         "whole tensor: reshape to [rows, cols // group_size, group_size] first"),
        (quant(w.reshape(rows, 1, cols), w.abs().amax(1).reshape(rows, 1, 1) / 7, -7, 7)
         .reshape(rows, cols),
         "one scale per GROUP of group_size consecutive weights of a row, not one per row"),
        (quant(g, absmax / 7, -7, 7, torch.trunc).reshape(rows, cols),
         "round to the nearest code (torch.round), not toward zero (int() / torch.trunc)"),
        (quant(g, absmax / 7, -7, 7, torch.floor).reshape(rows, cols),
         "round to the nearest code (torch.round), not down (torch.floor)"),
        (torch.round(g / torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax)))
         .reshape(rows, cols),
         "return the dequantised weights codes * scale, not the integer codes"),
    ]  # fmt: skip
    if rows % gs == 0:  # groups running down the columns instead of along the rows
        wt = w.T.reshape(cols, rows // gs, gs)
        down = quant(wt, wt.abs().amax(-1, keepdim=True) / 7, -7, 7).reshape(cols, rows).T
        variants.append(
            (down, "groups run along the input dimension: consecutive weights of a ROW "
             "(the last axis of w [out, in]), not down a column")
        )  # fmt: skip
    return variants


@exercise(
    "ch06.int4_group_quantize",
    difficulty="core",
    title="Symmetric int4 quantisation per group, from scratch",
)
def _check_int4_group_quantize(answer: Any) -> str:
    import torch

    g = torch.Generator().manual_seed(case_seed(6))
    heavy = torch.randn(64, 64, generator=g) * torch.exp(torch.randn(64, 64, generator=g))
    outliers = torch.randn(4, 256, generator=g) * 0.02
    outliers[1, 7], outliers[3, 200] = 0.5, -0.4  # two big weights in two groups
    zeros = torch.randn(6, 64, generator=g)
    zeros[2, 16:32] = 0.0  # a whole group of zeros
    cases = [
        (torch.randn(8, 64, generator=g) * 0.05, 32, "a [8, 64] Gaussian weight"),
        (heavy, 32, "a heavy-tailed [64, 64] weight"),
        (outliers, 128, "a [4, 256] weight with two outliers"),
        (zeros, 16, "a [6, 64] weight with an all-zero group"),
    ]
    name = getattr(answer, "__name__", "your function")
    worst = 0.0
    for w, gs, label in cases:
        what = f"{name}(w, group_size={gs}) on {label}"
        got = call(answer, w.clone(), gs)
        want = reference_quantize_int4_groups(w, gs)
        try:
            have = torch.as_tensor(got, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            have = None
        if have is not None and have.shape == want.shape:
            if torch.isnan(have).any():
                raise Fail(
                    f"{what} returned NaN",
                    hint="an all-zero group has max |w| = 0, so s = 0 and 0 / 0 = NaN: give "
                    "such a group any positive scale (e.g. torch.where(s > 0, s, 1))"
                    if w.eq(0).any()
                    else "check for a division by zero",
                )
            steps = _nearest_on_grid(have, w, gs)
            if steps is not None:  # a valid rounding (fp32 or fp16 scales): passed
                worst = max(worst, steps)
                continue
        expect_close(got, want, rel=1e-5, abs_tol=1e-7, what=what, hint=_int4_hint, args=(w, gs))
        raise Fail(
            f"{what} is not the nearest int4 grid value of every weight",
            _int4_hint(got, want, (w, gs)),
        )
    return (
        f"all {len(cases)} cases: every value is the nearest point of its group's int4 grid "
        f"(as tinylm.quant); largest error {worst:.4f} steps, within the half-step bound"
    )


def _nearest_on_grid(have: Any, w: Any, gs: int) -> float | None:
    """Largest error in steps if `have` rounds every weight to its group's grid, else None.

    The grid of a group is {-7..7} x s, s = max|group| / 7; a scale stored in fp16 and rounded
    up (tinylm.quant) is up to 2^-10 larger, so codes and the bound get that much slack. On
    the grid and within half a step of w means: the nearest grid point (a tie goes either way).
    """
    import torch

    rows = w.shape[0]
    g = w.double().reshape(rows, -1, gs)
    h = have.reshape(rows, -1, gs)
    s = g.abs().amax(-1, keepdim=True) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = h / s
    err = (h - g).abs() / s
    on_grid = bool(((codes - codes.round()).abs() <= 1e-2).all())
    if on_grid and bool((codes.round().abs() <= 7).all()) and float(err.max()) <= 0.5 * (1 + 2e-3):
        return float(err.max())
    return None


def _int4_hint(got: Any, expected: Any, args: Any) -> str:
    w, gs = args
    variants = _int4_variants(w, gs)
    return first_matching_hint(got, expected, variants, _tensors_close) or (
        "per group of group_size weights of a row: s = max|w| / 7, q = round(w / s) "
        "clamped to -7..7, return q * s"
    )


# --------------------------------------------------------------------------- core: Q4_0 block


def reference_dequantize_q4_0_block(block: Any) -> Any:
    """Decode one llama.cpp Q4_0 block (uint8 [18]) to its 32 float32 weights.

    Bytes 0-1: fp16 scale d (little-endian); byte 2 + j: element j in the low nibble,
    element j + 16 in the high nibble; value = (nibble - 8) * d (ggml's dequantize_row_q4_0).
    """
    import torch

    block = torch.as_tensor(block, dtype=torch.uint8).reshape(18)
    d = block[:2].contiguous().view(torch.float16).float()
    qs = block[2:]
    nibbles = torch.cat((qs & 0x0F, qs >> 4)).float()
    return (nibbles - 8) * d


def _q4_0_variants(block: Any) -> list[tuple[Any, str]]:
    import torch

    d = block[:2].contiguous().view(torch.float16).float()
    d_swapped = block[:2].flip(0).contiguous().view(torch.float16).float()
    qs = block[2:]
    low, high = (qs & 0x0F).float(), (qs >> 4).float()
    right = torch.cat((low, high))
    return [
        (
            (torch.stack((low, high), dim=-1).flatten() - 8) * d,
            "Q4_0 pairs element j (low nibble of byte j) with element j + 16 (high nibble), "
            "not neighbours 2j and 2j + 1: all low nibbles first, then all high nibbles",
        ),
        (
            (torch.cat((high, low)) - 8) * d,
            "the LOW nibble (byte & 0x0F) holds element j, the high nibble (byte >> 4) "
            "element j + 16",
        ),
        (right * d, "the codes are stored with an offset of 8: value = (nibble - 8) * d"),
        ((right - 8) * d_swapped, "the fp16 scale is little-endian: bytes 0-1 in that order"),
        (right - 8, "multiply the codes by the block's scale d (bytes 0-1, fp16)"),
        ((right - 7) * d, "the offset is 8 (nibbles 0..15 stand for -8..7), not 7"),
    ]


def _q4_0_hint(got: Any, expected: Any, args: Any) -> str:
    return first_matching_hint(got, expected, _q4_0_variants(args), _tensors_close) or (
        "d = block[:2].view(torch.float16); for j < 16: element j = ((block[2 + j] & 0x0F) - 8) "
        "* d and element j + 16 = ((block[2 + j] >> 4) - 8) * d"
    )


@exercise(
    "ch06.dequantize_q4_0_block",
    difficulty="core",
    title="Decode a llama.cpp Q4_0 block from its bytes",
)
def _check_dequantize_q4_0_block(answer: Any) -> str:
    import torch

    from tinylm.quant.formats import dequantize_q4_0, quantize_q4_0

    g = torch.Generator().manual_seed(case_seed(40))
    w = torch.randn(4, 32, generator=g) * torch.tensor([[0.02], [1.0], [300.0], [0.001]])
    w[1, 5] = -3.0  # its largest magnitude is negative: d > 0 (d = max / -8)
    blocks = quantize_q4_0(w)  # llama.cpp's reference quantiser, ported
    name = getattr(answer, "__name__", "your function")
    for i, block in enumerate(blocks):
        got = call(answer, block.clone())
        want = dequantize_q4_0(block[None], (32,))
        expect_close(
            got,
            want,
            rel=1e-6,
            abs_tol=0.0,
            what=f"{name}(block {i} of {len(blocks)})",
            hint=_q4_0_hint,
            args=block,
        )
    return f"all {len(blocks)} blocks decode like llama.cpp's dequantize_row_q4_0"


# --------------------------------------------------------------------------- stretch: GPTQ row


def reference_gptq_row(w: Any, H: Any, scale: float) -> Any:
    """GPTQ (optimal brain quantiser form) for one row, int4 codes -8..7 of step `scale`.

    In order i = 0, 1, ...: q_i = clamp(round(w_i / s)) * s; the error (w_i - q_i) / [H^-1]_ii
    times row i of H^-1 is subtracted from the later inputs; input i is then removed from H^-1.
    `scale` may be negative (Q4_0's signed scale: the row's extreme weight / -8).
    Equal to tinylm.quant.calibrate.gptq_quantize (act_order=False, damp=0, per channel).
    """
    import torch

    w = torch.as_tensor(w, dtype=torch.float64).clone()
    h_inv = torch.linalg.inv(torch.as_tensor(H, dtype=torch.float64))
    q = torch.zeros_like(w)
    for i in range(len(w)):
        q[i] = torch.clamp(torch.round(w[i] / scale), -8, 7) * scale
        err = (w[i] - q[i]) / h_inv[i, i]
        w[i + 1 :] -= err * h_inv[i, i + 1 :]
        h_inv = h_inv - torch.outer(h_inv[:, i], h_inv[i, :]) / h_inv[i, i]
    return q


def _gptq_variant(w: Any, H: Any, scale: float, mistake: str) -> Any:
    import torch

    w = w.clone()
    h = H.clone() if mistake == "hessian" else torch.linalg.inv(H)
    q = torch.zeros_like(w)
    for i in range(len(w)):
        q[i] = torch.clamp(torch.round(w[i] / scale), -8, 7) * scale
        err = w[i] - q[i] if mistake == "no_divide" else (w[i] - q[i]) / h[i, i]
        if mistake == "plus":
            w[i + 1 :] += err * h[i, i + 1 :]
        else:
            w[i + 1 :] -= err * h[i, i + 1 :]
        if mistake != "no_downdate":
            h = h - torch.outer(h[:, i], h[i, :]) / h[i, i]
    return q


_GPTQ_HINTS = {
    "plus": "subtract the error from the later weights (w_j -= err * Hinv[i, j]): adding it "
    "doubles the damage instead of cancelling it",
    "no_downdate": "after quantising input i, remove it from the inverse Hessian: "
    "Hinv -= outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]; the later updates need the inverse "
    "of the Hessian of the inputs still free",
    "hessian": "use the INVERSE Hessian (torch.linalg.inv(H)), not H itself",
    "no_divide": "scale the error by 1 / Hinv[i, i]: err = (w_i - q_i) / Hinv[i, i]",
}


def _gptq_cases() -> list[tuple[Any, Any, float, str]]:
    import torch

    g = torch.Generator().manual_seed(case_seed(60))
    cases = []
    for n, tokens, label in ((16, 64, "16 inputs"), (32, 128, "32 inputs"), (48, 256, "48 inputs")):
        mix = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (torch.eye(n) + 2 * mix)
        x[:, 0] *= 4.0  # one input much larger than the others
        H = x.T @ x
        H += 0.01 * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)  # dampened
        w = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
        scale = float(w[w.abs().argmax()]) / -8  # Q4_0 / tinylm.quant: signed, codes -8..7
        cases.append((w, H, scale, f"a row of {label}"))
    return cases


def _row_error(w: Any, w_hat: Any, H: Any) -> float:
    d = w - w_hat
    return float(d @ H @ d)


@exercise("ch06.gptq_row", difficulty="stretch", title="GPTQ error compensation for one row")
def _check_gptq_row(answer: Any) -> str:
    import torch

    name = getattr(answer, "__name__", "your function")
    gains = []
    for w, H, scale, label in _gptq_cases():
        what = f"{name}(w, H, scale) on {label}"
        got = call(answer, w.clone(), H.clone(), scale)
        try:
            have = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise Fail(
                f"{what} returned a {type(got).__name__}; expected a tensor of {len(w)} weights",
                hint="return the quantised row q (a tensor shaped like w)",
            ) from None
        if have.shape != w.shape:
            raise Fail(
                f"{what} has {have.numel()} values; expected {len(w)}",
                hint="return the quantised row q, one value per input",
            )
        codes = have / scale
        on_grid = torch.allclose(codes, codes.round(), atol=1e-6)
        if not on_grid or codes.min() < -8 - 1e-6 or codes.max() > 7 + 1e-6:
            hint = (
                "clamp the codes to -8..7 (round(w_i / scale) may fall outside)"
                if on_grid
                else "return the quantised values q_i = code * scale, not the corrected weights"
            )
            raise Fail(f"{what}: not every value is scale x an integer code in -8..7", hint=hint)
        ref = reference_gptq_row(w, H, scale)
        rtn = torch.clamp(torch.round(w / scale), -8, 7) * scale
        e_got, e_ref, e_rtn = (_row_error(w, v, H) for v in (have, ref, rtn))
        if e_got > e_ref * (1 + 1e-9) + 1e-15:
            hint = None
            if torch.allclose(have, rtn):
                hint = (
                    "that is round to nearest: after rounding input i, push its error onto the "
                    "inputs not yet quantised (w_j -= err * Hinv[i, j] for j > i)"
                )
            for mistake, text in _GPTQ_HINTS.items():
                if hint is None and torch.allclose(have, _gptq_variant(w, H, scale, mistake)):
                    hint = text
            raise Fail(
                f"{what}: output error (w - q) H (w - q)^T = {e_got:.4g}; GPTQ reaches {e_ref:.4g} "
                f"(round to nearest: {e_rtn:.4g})",
                hint=hint
                or "go through the inputs in order: round, err = (w_i - q_i) / Hinv[i, i], "
                "w[i+1:] -= err * Hinv[i, i+1:], then remove input i from Hinv",
            )
        gains.append(1 - e_got / e_rtn)
    return (
        f"all {len(gains)} rows: output error {min(gains):.0%} to {max(gains):.0%} lower than "
        "round to nearest, as low as GPTQ's"
    )
