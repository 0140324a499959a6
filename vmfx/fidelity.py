"""Fidelity tables: every tensor a method's official code quantizes, next to what vmfx's presets do.

The official side of a table is a transcription of the official code (each row names the module
and lines it comes from); the vmfx columns are generated from the presets themselves
(:meth:`vmfx.config.QuantConfig.spec_for`, ``scan_state``, ``search``), so the table changes when a
preset does. :func:`kscaled_table` is the k-scaled one; :func:`write_readme` puts it into a file
between the markers ``<!-- fidelity:kscaled -->`` and ``<!-- /fidelity:kscaled -->``::

    python -m vmfx.fidelity README.md

(tests/graph/test_fidelity.py checks that README.md holds the generated table).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .config import KSCALED_OFFICIAL_SOURCE, QuantConfig, preset

__all__ = ["OfficialTensor", "KSCALED_OFFICIAL", "KSCALED_NOTES", "kscaled_table", "vmfx_cell", "generated",
           "write_readme", "MARKERS"]

#: The markers the generated table sits between in a markdown file.
MARKERS = {"kscaled": ("<!-- fidelity:kscaled -->", "<!-- /fidelity:kscaled -->")}


@dataclass(frozen=True)
class OfficialTensor:
    """One tensor the official code quantizes.

    Attributes:
        tensor: what it is, in words.
        official: its granularity, bits and how its scale is chosen there.
        where: the official module and file:line it comes from.
        edge, role, op: the vmfx rule edge and node selectors of the same tensor (``edge="state"``:
            the scan's hidden state, :class:`~vmfx.config.ScanStateConfig`).
    """

    tensor: str
    official: str
    where: str
    edge: str
    role: str
    op: str | None = None


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
    """How the preset picks that tensor's scale: "searched" or "min-max"."""
    if cfg.search is None:
        return "min-max"
    if row.edge == "weight":
        return "searched" if cfg.search.weights and row.role in _linear_roles() else "min-max"
    return "min-max" if row.role in cfg.search.keep_roles else "searched"


def vmfx_cell(cfg: QuantConfig, row: OfficialTensor) -> str:
    """What ``cfg`` does with the tensor of ``row``: its spec and scale choice, or "float"."""
    if row.edge == "state":
        state = cfg.scan_state
        if state is None or not state.quantize:
            return "float"
        search = "exhaustive" if state.exhaustive else "coarse to fine"
        return f"int{state.bits} per-step{' +reparam' if state.reparameterize else ''}, searched ({search})"
    spec = cfg.spec_for(row.edge, row.role, op=row.op)
    if spec is None:
        return "float"
    rule = cfg.rule_for(row.edge, row.role, op=row.op)
    shared = ", one per block (both directions)" if rule is not None and rule.shared == "mixer" else ""
    corrected = "; bias corrected" if row.edge == "weight" and row.role in cfg.bias_correction else ""
    return f"{spec.describe()}{shared}, {_scale_choice(cfg, row)}{corrected}"


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
    if name != "kscaled":
        raise ValueError(f"no fidelity table {name!r}; the tables are: {', '.join(MARKERS)}")
    return kscaled_table()


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
    print("updated" if write_readme(sys.argv[1]) else "unchanged", sys.argv[1])
