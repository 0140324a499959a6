"""Fidelity tables: every tensor a method's official code quantizes, next to what vmfx's presets do.

The official side of a table is a transcription of the official code (each row names the module
and lines it comes from); the vmfx columns are generated from the presets themselves
(:meth:`vmfx.config.QuantConfig.spec_for`, ``scan_state``, ``search``, ``outliers``, ``jlss``), so
the table changes when a preset does. :func:`kscaled_table` is the k-scaled one,
:func:`ouromamba_table` the OuroMamba one; :func:`write_readme` puts a table into a file between
its markers (``<!-- fidelity:kscaled -->`` and ``<!-- /fidelity:kscaled -->``, and the same with
``ouromamba``)::

    python -m vmfx.fidelity README.md      # every table

(tests/graph/test_fidelity.py checks that README.md holds the generated tables).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .config import KSCALED_OFFICIAL_SOURCE, OUROMAMBA_OFFICIAL_SOURCE, QuantConfig, preset

__all__ = ["OfficialTensor", "KSCALED_OFFICIAL", "KSCALED_NOTES", "OUROMAMBA_OFFICIAL", "OUROMAMBA_NOTES",
           "kscaled_table", "ouromamba_table", "vmfx_cell", "generated", "write_readme", "MARKERS"]

#: The markers each generated table sits between in a markdown file.
MARKERS = {name: (f"<!-- fidelity:{name} -->", f"<!-- /fidelity:{name} -->") for name in ("kscaled", "ouromamba")}


@dataclass(frozen=True)
class OfficialTensor:
    """One tensor the official code quantizes.

    Attributes:
        tensor: what it is, in words.
        official: its granularity, bits and how its scale is chosen there.
        where: the official module and file:line it comes from.
        edge, role, op: the vmfx rule edge and node selectors of the same tensor (``edge="state"``:
            the scan's hidden state, :class:`~vmfx.config.ScanStateConfig`).
        also: another (edge, role) of vmfx's graph that holds the same tensor, read where the first
            selects nothing (delta: the scan's ``delta`` operand is ``dt_proj``'s output).
    """

    tensor: str
    official: str
    where: str
    edge: str
    role: str
    op: str | None = None
    also: tuple[str, str] | None = None


_CFG = "src/quant_configs/PTQ4ViM.py"

#: The k-scaled official code's quantized tensors (Vim), in the order of a block's data flow.
#: ``W``/``A``: the weight / activation bits of the setting (the released config has 8 for both;
#: the hidden state keeps 8 at every setting).
KSCALED_OFFICIAL = (
    OfficialTensor("patch embedding conv weight", "W per-tensor, min-max", f"qconv2d, {_CFG}:15-31", "weight",
                   "patch_embed"),
    OfficialTensor("patch embedding output", "A per-tensor, min-max", f"qconv2d, {_CFG}:15-31", "output",
                   "patch_embed"),
    OfficialTensor("RMSNorm weight (blocks, norm_f)", "W per-tensor, min-max", f"qnorm, {_CFG}:384-400", "weight",
                   "norm"),
    OfficialTensor("RMSNorm output", "A per-tensor, min-max", f"qnorm, {_CFG}:384-400", "output", "norm"),
    OfficialTensor("in_proj weight", "W per-tensor, searched", f"qin_proj, {_CFG}:72-111", "weight", "in_proj"),
    OfficialTensor("in_proj output", "A per-tensor, searched", f"qin_proj, {_CFG}:72-111", "output", "in_proj"),
    OfficialTensor("conv1d weight", "W per-tensor, min-max", f"qconv1d w_config, {_CFG}:35-46", "weight", "conv1d"),
    OfficialTensor("conv1d output", "A k-scaled channel-wise k=4, searched (pow2 asked, not applied: "
                   "src/quant_layers/QuantConv1d.py:245-289)", f"qconv1d o_config, {_CFG}:50-67", "output", "conv1d"),
    OfficialTensor("SiLU after conv1d", "A k-scaled channel-wise k=4, searched", f"qact, {_CFG}:332-357", "output",
                   "conv_act"),
    OfficialTensor("x_proj weight", "W per-tensor, searched", f"qx_proj, {_CFG}:112-151", "weight", "x_proj"),
    OfficialTensor("x_proj output", "A per-tensor, searched", f"qx_proj, {_CFG}:112-151", "output", "x_proj"),
    OfficialTensor("dt_proj weight", "W per-tensor, searched; bias corrected", f"qdt_proj, {_CFG}:152-191", "weight",
                   "dt_proj"),
    OfficialTensor("dt_proj output", "A per-tensor, searched", f"qdt_proj, {_CFG}:152-191", "output", "dt_proj"),
    OfficialTensor("softplus output (delta)", "A k-scaled channel-wise k=4, searched", f"qsoftplus, {_CFG}:358-383",
                   "output", "dt_act"),
    OfficialTensor("hidden state h", "8-bit per step, reparameterized, searched", f"qssm h_config, {_CFG}:292-309",
                   "state", "scan"),
    OfficialTensor("SSM output (y' before r_C and D x)", "A k-scaled token-wise k=4 pow2, searched",
                   f"qssm o_config, {_CFG}:310-327", "output", "scan"),
    OfficialTensor("gate SiLU(z) (act_z, one for both directions)", "A k-scaled channel-wise k=4, searched",
                   f"qact, {_CFG}:332-357; src/mamba.py:62,145,170", "output", "gate", "silu"),
    OfficialTensor("out_proj weight", "W per-tensor, searched", f"qout_proj, {_CFG}:192-231", "weight", "out_proj"),
    OfficialTensor("out_proj output", "A k-scaled token-wise k=4 pow2, searched", f"qout_proj, {_CFG}:192-231",
                   "output", "out_proj"),
    OfficialTensor("head weight", "W per-tensor, searched; bias corrected", f"qhead, {_CFG}:232-271", "weight", "head"),
    OfficialTensor("head output", "A per-tensor, searched", f"qhead, {_CFG}:232-271", "output", "head"),
)


def _linear_roles() -> tuple[str, ...]:
    from .annotations import LINEAR_ROLES

    return LINEAR_ROLES + ("head",)


def _scale_choice(cfg: QuantConfig, row: OfficialTensor) -> str:
    """How the preset picks that tensor's scale: "searched", "learned" (JLSS, on top of the
    initial scale), "Lp grid" or "min-max"."""
    if cfg.search is not None:
        if row.edge == "weight":
            return "searched" if cfg.search.weights and row.role in _linear_roles() else "min-max"
        return "min-max" if row.role in cfg.search.keep_roles else "searched"
    init = f"Lp {cfg.init.p:g} grid" if cfg.init.method == "lp" else "min-max"
    jlss = cfg.jlss
    if jlss is not None and not row.edge.startswith("scan."):
        learned = row.role in jlss.learn_roles if row.edge in ("input", "weight") else jlss.learn_outputs
        if learned:
            return f"{init}, learned"
    return init


def _outlier_note(cfg: QuantConfig, row: OfficialTensor) -> str:
    """``" + outliers ..."``: OuroMamba's dynamic outlier channels on a static activation."""
    out = cfg.outliers
    if out is None or row.edge == "weight":
        return ""
    kind = "float" if out.float_outliers else f"int{out.bits}"
    return f" + {kind} outliers ({out.trigger} trigger)"


def vmfx_cell(cfg: QuantConfig, row: OfficialTensor) -> str:
    """What ``cfg`` does with the tensor of ``row``: its spec and scale choice, or "float"."""
    if row.edge == "state":
        state = cfg.scan_state
        if state is None or not state.quantize:
            return "float"
        search = "exhaustive" if state.exhaustive else "coarse to fine"
        return f"int{state.bits} per-step{' +reparam' if state.reparameterize else ''}, searched ({search})"
    spec = cfg.spec_for(row.edge, row.role, op=row.op)
    if spec is None and row.also is not None:
        row = OfficialTensor(row.tensor, row.official, row.where, *row.also)
        spec = cfg.spec_for(row.edge, row.role)
    if spec is None:
        return "float"
    rule = cfg.rule_for(row.edge, row.role, op=row.op)
    shared = ", one per block (both directions)" if rule is not None and rule.shared == "mixer" else ""
    corrected = "; bias corrected" if row.edge == "weight" and row.role in cfg.bias_correction else ""
    outliers = _outlier_note(cfg, row) if not spec.dynamic else ""
    return f"{spec.describe()}{outliers}{shared}, {_scale_choice(cfg, row)}{corrected}"


#: What the vmfx columns do not show: where a vmfx preset differs from the official code although
#: the same tensor is quantized at the same granularity.
KSCALED_NOTES = (
    "softplus output: vmfx's Vim fuses the softplus into the scan (`delta_softplus=True`); `kscaled-*`'s "
    "`dt_act` rule selects nothing there (only dt_proj's output is quantized), `kscaled-official-*` splits "
    "it into a node of its own first (`QuantConfig(split_softplus=True)`).",
    "SSM output: vmfx quantizes the scan's output `y + D u` after the r_C factor is folded back; the official "
    "code quantizes y' before r_C and the D skip (src/quant_layers/QuantSSM.py:604-615).",
    "hidden state: vmfx computes y[t] from the quantized h[t] and searches the state after the output scales; "
    "the official code uses the unquantized h[t] for y[t], quantizes only the carried state "
    "(QuantSSM.py:600-603) and searches it first.",
    "bias correction: the official code computes it on the first batch its quantized model runs (its "
    "first evaluation batch, src/quant_layers/QuantLinear.py:98-106, :352); vmfx on the calibration data.",
)


_OQ = "quant/vim/quantize/ouroquant/quantizer.py"
_OS = "quant/vim/modified/selective_scan_interface.py"
_OM = "quant/vim/modified/mamba_simple.py"
_OL = "quant/vim/quantize/ouroquant/calibrate.py"
_OUTLIERS = "+ per-step outliers (mean + 3 std, list refreshed every 10 steps) at O bits"
_INLIERS = "static per-token inliers, Lp 2.4 grid over 0.99 .. 0.01 of the max"

#: The official OuroMamba-Quant code's quantized tensors (Vim), in the order of a block's data flow.
#: ``W``/``A``/``O``: the weight, inlier and outlier bits of the setting (eval_vim.sh: W4A4O8 and
#: W4A8O16, the 16-bit outliers kept in floating point). Learned: the step sizes the optimizer of
#: ``calibrate.py`` updates (``*proj.s`` and ``*act_func.s``, :36-41), of which only in_proj's and
#: out_proj's get gradients: x_proj and dt_proj run inside the scan's autograd function.
OUROMAMBA_OFFICIAL = (
    OfficialTensor("in_proj input", f"A sym {_INLIERS} {_OUTLIERS}; learned",
                   f"Q_Act, {_OQ}:186-423; quant/vim/modified/quant.py:232-235", "input", "in_proj"),
    OfficialTensor("in_proj weight", "W sym per-channel, Lp 2.4 grid; learned", f"Q_Linear, {_OQ}:106-157",
                   "weight", "in_proj"),
    OfficialTensor("x_proj input (both directions)", f"A sym {_INLIERS} {_OUTLIERS}", f"Q_Act, {_OS}:228",
                   "input", "x_proj"),
    OfficialTensor("x_proj weight", "W sym per-channel, Lp 2.4 grid", f"Q_Linear, {_OQ}:106-157", "weight",
                   "x_proj"),
    OfficialTensor("dt_proj input", f"A sym {_INLIERS} {_OUTLIERS}", f"Q_Act, {_OS}:230", "input", "dt_proj"),
    OfficialTensor("dt_proj weight", "W sym per-channel, Lp 2.4 grid", f"Q_Linear, {_OQ}:106-157", "weight",
                   "dt_proj"),
    OfficialTensor("scan A (d x n, one step)", f"A sym, one scale for all elements {_OUTLIERS}, one per mixer",
                   f"act_funcA, {_OM}:85; {_OS}:276-280", "scan.A", "scan"),
    OfficialTensor("scan B", f"A sym {_INLIERS} {_OUTLIERS}, one per mixer", f"act_funcB, {_OM}:86; {_OS}:282-286",
                   "scan.B", "scan"),
    OfficialTensor("scan C", f"A sym {_INLIERS} {_OUTLIERS}, one per mixer", f"act_funcC, {_OM}:87; {_OS}:288-292",
                   "scan.C", "scan"),
    OfficialTensor("scan D (one step)", f"A sym, one scale for all elements {_OUTLIERS}, one per mixer",
                   f"act_funcD, {_OM}:88; {_OS}:294-297", "scan.D", "scan"),
    OfficialTensor("scan delta (dt_proj's output, before softplus)",
                   f"A asym per-token inliers, Lp 2.4 grid {_OUTLIERS}, one per mixer",
                   f"Q_Act_d, {_OQ}:425-657; act_funcd, {_OM}:89; {_OS}:301-305", "scan.delta", "scan",
                   also=("output", "dt_proj")),
    OfficialTensor("out_proj input", f"A sym {_INLIERS} {_OUTLIERS}; learned", f"Q_Act, {_OQ}:186-423; {_OM}:282",
                   "input", "out_proj"),
    OfficialTensor("out_proj weight", "W sym per-channel, Lp 2.4 grid; learned", f"Q_Linear, {_OQ}:106-157",
                   "weight", "out_proj"),
)

#: What the OuroMamba columns do not show.
OUROMAMBA_NOTES = (
    "not quantized by the official code (nor by either preset): the patch embedding, the norms, conv1d, the gate "
    "SiLU(z), the head and the hidden state (its `scan_intermediates` quantizer's output is never read, "
    f"{_OS}:314-318).",
    "A and D: a per-token spec on these operands is one step holding all their elements in vmfx, as in the "
    "official code; delta: `ouromamba-*` quantizes it at `dt_proj`'s output, one quantizer per direction.",
    "a quantizer shared by both directions: the official one is re-initialised on its second call (the backward "
    "scan), so the forward scan uses the backward scan's per-token scales, indexed by step; vmfx calibrates one "
    "quantizer on both directions' data (`vmfx/passes/scan_operands.py`).",
    "outlier selection: the official code zeroes the window's earlier outliers before the threshold and trigger "
    "of a step; vmfx computes them on the whole step (`vmfx/quant/mixed.py`). The official clipping ratios "
    "of the grid are 0.99 .. 0.01 of the maximum, vmfx's 0.01 .. 1.",
    f"step-size learning ({_OL}:155-230): 10 AdamW steps over one batch of 64 augmented images; the official "
    "backward pass recomputes delta without dt_proj's bias and passes the scan operands' gradients straight "
    "through, vmfx differentiates its scan.",
)


def _levels(bits: str) -> str:
    w, a = bits[1:].split("a")
    o = "16 (floating point)" if a == "8" else str(2 * int(a))
    return f"W = {w} bits, A = {a} bits, O = {o}"


def ouromamba_table(bits: str = "w4a4") -> str:
    """The OuroMamba fidelity table at ``w4a4`` or ``w4a8``: one row per tensor of
    :data:`OUROMAMBA_OFFICIAL`, with ``ouromamba-<bits>`` and ``ouromamba-official-<bits>`` side by side."""
    ours, official = preset(f"ouromamba-{bits}"), preset(f"ouromamba-official-{bits}")
    lines = [
        f"Official: `{OUROMAMBA_OFFICIAL_SOURCE}` ({bits}: {_levels(bits)}). Generated by "
        "`python -m vmfx.fidelity README.md` from the presets.",
        "",
        f"| tensor | official | official source | `ouromamba-{bits}` | `ouromamba-official-{bits}` |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in OUROMAMBA_OFFICIAL:
        lines.append(f"| {row.tensor} | {row.official} | {row.where} | {vmfx_cell(ours, row)} | "
                     f"{vmfx_cell(official, row)} |")
    lines += ["", "Not visible in the columns:", ""] + [f"- {note}" for note in OUROMAMBA_NOTES]
    return "\n".join(lines)


def kscaled_table(bits: str = "w4a8") -> str:
    """The k-scaled fidelity table at one bit setting: one row per tensor of
    :data:`KSCALED_OFFICIAL`, with ``kscaled-<bits>`` and ``kscaled-official-<bits>`` side by side."""
    ours, official = preset(f"kscaled-{bits}"), preset(f"kscaled-official-{bits}")
    w, a = bits[1:].split("a")
    lines = [
        f"Official: `{KSCALED_OFFICIAL_SOURCE}` ({bits}: W = {w} bits, A = {a} bits). Generated by "
        "`python -m vmfx.fidelity README.md` from the presets.",
        "",
        f"| tensor | official | official source | `kscaled-{bits}` | `kscaled-official-{bits}` |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in KSCALED_OFFICIAL:
        lines.append(f"| {row.tensor} | {row.official} | {row.where} | {vmfx_cell(ours, row)} | "
                     f"{vmfx_cell(official, row)} |")
    lines += ["", "Not visible in the columns:", ""] + [f"- {note}" for note in KSCALED_NOTES]
    return "\n".join(lines)


def generated(name: str = "kscaled") -> str:
    """The generated text of table ``name`` (the part between its markers)."""
    tables = {"kscaled": kscaled_table, "ouromamba": ouromamba_table}
    if name not in tables:
        raise ValueError(f"no fidelity table {name!r}; the tables are: {', '.join(MARKERS)}")
    return tables[name]()


def write_readme(path: str, name: str = "kscaled") -> bool:
    """Replace the text between table ``name``'s markers in ``path`` by the generated table;
    returns whether the file changed. A file without both markers is refused (ValueError)."""
    start, end = MARKERS[name]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path} must hold the markers {start} and {end} once each, in that order")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    new = f"{head}{start}\n{generated(name)}\n{end}{tail}"
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vmfx.fidelity README.md")
    for table in MARKERS:
        print(f"{table}:", "updated" if write_readme(sys.argv[1], table) else "unchanged", sys.argv[1])
