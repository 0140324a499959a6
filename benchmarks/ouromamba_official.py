"""The official OuroMamba-Quant code (georgia-tech-synergy-lab/ICCV-OuroMamba) side by side with vmfx.

    export VMFX_OUROMAMBA_SRC=PATH   # a checkout (or bare git directory) of georgia-tech-synergy-lab/ICCV-OuroMamba
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ouromamba_official.py                        # W4A4O8 and W4A8O16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ouromamba_official.py --bits w4a4 --test-n 500 --out OUT

Both sides quantize the bundled proxy Vim (``vmfx.data.load_proxy_model``) with the same 64
calibration images (the first 64 of ``benchmarks/accuracy.py``'s ``calibration_images(256, seed)``
through :func:`vmfx.data.augment.augment_calibration_images` with ``seed``: the official run reads
one training batch of 64, with the training augmentations) and are evaluated on the same test
digits against the same float logits: top-1, top-1 agreement with float, mean KL(p_float || p_quant),
and their paired differences with 95 % intervals (``benchmarks/accuracy.py``'s statistics).

The official side imports the official files, unchanged, from a temporary copy of the repository
(``$VMFX_OUROMAMBA_SRC``, a checkout or a bare git directory, materialised with ``git archive``):
``quant/vim/quantize/ouroquant/{quantizer,calibrate,utils}.py``, ``tools/models_mamba.py`` and the
repository's mamba-ssm 1.1.1 with its two modified files copied in as its README says
(``modified/mamba_simple.py`` -> ``mamba_ssm/modules/``, ``modified/selective_scan_interface.py`` ->
``mamba_ssm/ops/``). It then runs ``quant.py``'s quantization steps: every ``in_proj`` / ``out_proj``
/ ``x_proj`` / ``dt_proj`` becomes a ``Q.Linear`` with a ``Q.Act`` input quantizer, every module gets
its ``name``, and ``CALIBRATE(model, args, loader, dev, None)`` runs with ``eval_vim.sh``'s
arguments (``--epochs 10 --lr-a 5e-4 --lr-w 5e-4 --batch-size 64 --train-batch 64 --n-lvw 16``,
``--n-lva 16 --n-lva-o 256`` for W4A4O8, ``--n-lva 256 --n-lva-o 65536`` for W4A8O16). Nothing of
it is copied into vmfx. What the harness supplies to run it on a CPU (listed in the results file):

* ``causal_conv1d_cuda``, ``selective_scan_cuda`` and ``causal_conv1d``: CPU stand-ins with the
  extensions' signatures: the depthwise causal convolution (+ SiLU) and its gradients by autograd;
  the selective scan by vmfx's reference scan (:func:`vmfx.ops.selective_scan`) and its gradients
  by autograd, written into the ``dz`` / ``dx`` buffers the official backward passes in (the CUDA
  kernels fill them in place). The scan's ``scan_intermediates`` (only fed to a quantizer whose
  output nothing reads) are a zero tensor.
* ``mamba_ssm.ops.triton.layernorm``: ``RMSNorm`` / ``rms_norm_fn`` / ``layer_norm_fn`` in plain
  torch (the fused residual add and norm, ``prenorm`` and ``residual_in_fp32`` as mamba-ssm 1.1.1);
  ``mamba_ssm.utils.{generation,hf}``, ``selective_state_update`` and ``termcolor`` (log colours) as
  stand-ins that are only imported.
* ``.to('cuda')`` and ``.cuda()`` stay on the CPU, ``torch.cuda.empty_cache`` does nothing and
  ``torch.cuda.max_memory_allocated`` reads 0 while the official code runs; its GradScaler is
  disabled without CUDA (so ``loss.backward()``, clipping and ``optimizer.step()`` run as they are).
* Model size: the official ``VisionMamba`` is built with the proxy's sizes (``d_state=8``, 6 layers,
  197 tokens: ``CALIBRATE`` hard-codes 197) and loads every weight of the proxy (no key left over;
  only the quantizers' step sizes ``*.s`` are missing, as in ``quant.py``'s ``strict=False`` load).
* Seeds: torch is seeded with ``seed`` before the official calibration, as ``quant.py`` does.

The vmfx side runs ``ouromamba-official-w4a4`` / ``-w4a8`` (and, for reference, ``ouromamba-*``,
vmfx's own variant) on the same images. The side ``official-per-direction`` (``--sides``) is a
diagnostic: the official code with each mixer's shared scan-operand quantizers split into one per
direction (:class:`PerDirection`), which measures what the official sharing costs (the shared one
is re-initialised on its second call, so the forward scan runs on the backward scan's scales).

Writes ``<out>/ouromamba_official.json`` (the measured rows) and ``<out>/ouromamba_official.md`` (the
table, the paired comparisons, the settings, the official repository at its commit). ``--out``
defaults to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import io
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import vmfx  # noqa: E402
from vmfx.data import load_digits, load_proxy_model  # noqa: E402
from vmfx.data.augment import augment_calibration_images  # noqa: E402
from vmfx.data.evaluate import collect_logits, compare_logits  # noqa: E402
from vmfx.data.proxy import proxy_metadata  # noqa: E402
from vmfx.ops import selective_scan  # noqa: E402

from accuracy_report import _say_all  # noqa: E402
from accuracy_run import calibration_images, make_record  # noqa: E402

REPOSITORY = "georgia-tech-synergy-lab/ICCV-OuroMamba"
ENV = "VMFX_OUROMAMBA_SRC"
RESULTS = os.path.join(os.path.dirname(__file__), "results")
CALIB_N = 64
#: eval_vim.sh's arguments per bit setting: (n_lvw, n_lva, n_lva_o).
OFFICIAL_LEVELS = {"w4a4": (16, 16, 256), "w4a8": (16, 256, 65536)}
#: Top-level module names the official code brings (purged from sys.modules before importing it).
OFFICIAL_TOP = ("mamba_ssm", "ouroquant", "tools", "causal_conv1d", "causal_conv1d_cuda", "selective_scan_cuda",
                "termcolor")


#: (side, method) pairs a run can measure: the official code as released, the official code with one
#: scan-operand quantizer per direction (:func:`unshare_scan_quantizers`, a diagnostic), vmfx's
#: ``ouromamba-official-*`` and (``--with-variant``) ``ouromamba-*``.
SIDES = (("official", "official"), ("official-per-direction", "per-direction"), ("vmfx", "ouromamba-official"),
         ("vmfx", "ouromamba"))


class OfficialCodeMissing(RuntimeError):
    """No readable copy of georgia-tech-synergy-lab/ICCV-OuroMamba."""


def official_source(src: str | None = None) -> str:
    src = src or os.environ.get(ENV)
    if not src or not os.path.exists(src):
        raise OfficialCodeMissing(f"no copy of {REPOSITORY} at {src!r} (set {ENV} to a checkout or bare git directory)")
    return src


def _git(src: str) -> list[str]:
    return ["git", "-C", src] if os.path.exists(os.path.join(src, ".git")) else ["git", "--git-dir", src]


def official_commit(src: str) -> str | None:
    done = subprocess.run(_git(src) + ["rev-parse", "HEAD"], capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def materialise(dest: Path, src: str) -> Path:
    """``quant/vim/{quantize,modified}`` of the official copy into ``dest``, the two modified mamba
    files copied over the bundled mamba-ssm 1.1.1 (the README's step 4); returns ``quantize/``."""
    archive = subprocess.run(_git(src) + ["archive", "HEAD", "quant/vim/quantize", "quant/vim/modified"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    root = Path(dest, "quant", "vim")
    pkg = root / "quantize" / "mamba-1p1p1" / "mamba_ssm"
    (pkg / "modules" / "mamba_simple.py").write_text((root / "modified" / "mamba_simple.py").read_text())
    (pkg / "ops" / "selective_scan_interface.py").write_text((root / "modified" / "selective_scan_interface.py").read_text())
    return root / "quantize"


# -- CPU stand-ins for the CUDA extensions and the Triton norm ---------------------------------------


def _causal_conv(x, weight, bias, activation):
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=weight.shape[0])[..., :x.shape[-1]]
    return F.silu(y) if activation else y


def _causal_conv1d_cuda() -> types.ModuleType:
    m = types.ModuleType("causal_conv1d_cuda")

    def causal_conv1d_fwd(x, weight, bias, seq_idx, activation):
        return _causal_conv(x, weight, bias, activation)

    def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, dx, activation):
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
            y = _causal_conv(*xs, activation)
            grads = torch.autograd.grad(y, [t for t in xs if t is not None], dout)
        gx, gw = grads[0], grads[1]
        gb = grads[2] if bias is not None else None
        if dx is not None:
            dx.copy_(gx)
            gx = dx
        return gx, gw, gb

    m.causal_conv1d_fwd, m.causal_conv1d_bwd = causal_conv1d_fwd, causal_conv1d_bwd
    return m


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """(out before the gate, out after the gate) by vmfx's reference scan."""
    out = selective_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    return out, (out * F.silu(z) if z is not None else out)


def _selective_scan_cuda() -> types.ModuleType:
    m = types.ModuleType("selective_scan_cuda")

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, out_z = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return out, torch.zeros(u.shape[0], u.shape[1], 1, 2), out_z

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        names = (u, delta, A, B, C, D, z, delta_bias)
        with torch.enable_grad():
            leaves = [t.detach().float().requires_grad_(True) if t is not None else None for t in names]
            _, out_z = _scan(*leaves, delta_softplus)
            wanted = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(out_z, wanted, dout.float()))
        g = [next(grads) if t is not None else None for t in leaves]
        if dz is not None and g[6] is not None:
            dz.copy_(g[6])
            g[6] = dz
        return (g[0], g[1], g[2], g[3], g[4], g[5], g[7], g[6], out_z.detach())

    m.fwd, m.bwd = fwd, bwd
    return m


def _causal_conv1d_pkg() -> types.ModuleType:
    m = types.ModuleType("causal_conv1d")
    m.causal_conv1d_fn = lambda x, weight, bias=None, activation=None, **kw: _causal_conv(x, weight, bias, activation)
    m.causal_conv1d_update = None
    return m


def _norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6, rms=True):
    dtype = x.dtype
    if residual is not None:
        x = x + residual
    residual_out = x.float() if residual_in_fp32 else x
    xf = x.float()
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    else:
        y = F.layer_norm(xf, (xf.shape[-1],), weight.float(), None, eps)
    if bias is not None:
        y = y + bias.float()
    y = y.to(dtype)
    return (y, residual_out) if prenorm else y


class _RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return _norm_fn(x, self.weight, self.bias, residual, prenorm, residual_in_fp32, self.eps)


def _standin_modules(quantize_dir: Path) -> dict[str, types.ModuleType]:
    pkg_dir = quantize_dir / "mamba-1p1p1" / "mamba_ssm"
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(pkg_dir)]  # its submodules load from the files; its __init__ (imports only) is skipped
    layernorm = types.ModuleType("mamba_ssm.ops.triton.layernorm")
    layernorm.RMSNorm = _RMSNorm
    layernorm.rms_norm_fn = lambda *a, **k: _norm_fn(*a, **k, rms=True)
    layernorm.layer_norm_fn = lambda *a, **k: _norm_fn(*a, **k, rms=False)
    state_update = types.ModuleType("mamba_ssm.ops.triton.selective_state_update")
    state_update.selective_state_update = None
    generation = types.ModuleType("mamba_ssm.utils.generation")
    generation.GenerationMixin = type("GenerationMixin", (), {})
    hf = types.ModuleType("mamba_ssm.utils.hf")
    hf.load_config_hf = hf.load_state_dict_hf = None
    termcolor = types.ModuleType("termcolor")  # ouroquant/utils.py colours its log lines with it
    termcolor.colored = lambda text, *a, **k: text
    return {"termcolor": termcolor, "mamba_ssm": pkg, "mamba_ssm.ops.triton.layernorm": layernorm,
            "mamba_ssm.ops.triton.selective_state_update": state_update,
            "mamba_ssm.utils.generation": generation, "mamba_ssm.utils.hf": hf,
            "causal_conv1d": _causal_conv1d_pkg(), "causal_conv1d_cuda": _causal_conv1d_cuda(),
            "selective_scan_cuda": _selective_scan_cuda()}


@contextlib.contextmanager
def cpu_device():
    """``.to('cuda')`` / ``.cuda()`` stay on the CPU; ``empty_cache`` and ``max_memory_allocated`` are no-ops."""
    saved = (torch.Tensor.to, torch.Tensor.cuda, nn.Module.cuda, torch.cuda.empty_cache, torch.cuda.max_memory_allocated)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    try:
        yield
    finally:
        (torch.Tensor.to, torch.Tensor.cuda, nn.Module.cuda, torch.cuda.empty_cache,
         torch.cuda.max_memory_allocated) = saved


def import_official(quantize_dir: Path) -> dict:
    """The official modules, imported from ``quantize_dir`` with the stand-ins in place; timm's
    ``register_model`` is a no-op meanwhile (timm's registry keeps vmfx's Vim names)."""
    import timm.models.registry as timm_registry

    for name in [n for n in sys.modules if n.split(".")[0] in OFFICIAL_TOP]:
        del sys.modules[name]
    sys.modules.update(_standin_modules(quantize_dir))
    sys.path.insert(0, str(quantize_dir))
    saved = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        return {name: importlib.import_module(name) for name in
                ("tools.models_mamba", "ouroquant.quantizer", "ouroquant.calibrate")}
    finally:
        timm_registry.register_model = saved


def build_official(mods: dict, float_model: nn.Module) -> nn.Module:
    """The official ``VisionMamba`` with the proxy's sizes and weights, its linears replaced by
    ``Q.Linear`` as ``quant.py`` does (lines 228-243) and every module named."""
    kw = dict(proxy_metadata()["model_kwargs"])
    kw.pop("drop_path_rate", None)
    model = mods["tools.models_mamba"].VisionMamba(**kw)
    missing, unexpected = model.load_state_dict(float_model.state_dict(), strict=False)
    stray = [k for k in missing if not k.endswith(".s")]  # the quantizers' step sizes are not weights
    if stray or unexpected:
        raise ValueError(f"the proxy's weights do not fit the official VisionMamba: missing {stray}, "
                         f"unexpected {unexpected}")
    Q = mods["ouroquant.quantizer"].QuantOps
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(k in name for k in ("out_proj", "in_proj", "x_proj", "dt_proj")):
            q = Q.Linear(module.in_features, module.out_features, act_func=Q.Act(), bias=module.bias is not None)
            q.weight.data = module.weight.data
            if module.bias is not None:
                q.bias.data = module.bias.data
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q)
    for name, module in model.named_modules():
        module.name = name
    return model.eval()


#: The scan-operand quantizers a Vim mixer of the official code shares between its two directions
#: (quant/vim/modified/mamba_simple.py:85-89, passed to both scans at :252-277).
SHARED_SCAN_QUANTIZERS = ("act_funcA", "act_funcB", "act_funcC", "act_funcD", "act_funcd")


class PerDirection(nn.Module):
    """Two official quantizers used in turn, the forward scan's call then the backward scan's, in
    place of one shared by both: each is initialised (by the official forward hook) and applied on
    its own direction's operands only. A harness substitution for the ``per-direction`` side, which
    measures what the sharing costs; the official code itself is unchanged."""

    def __init__(self, make):
        super().__init__()
        self.directions = nn.ModuleList([make(), make()])
        self.calls = 0

    def forward(self, x):
        out = self.directions[self.calls % 2](x)
        self.calls += 1
        return out


def unshare_scan_quantizers(mods: dict, model: nn.Module) -> int:
    """Give every mixer of the official ``model`` one scan-operand quantizer per direction
    (:class:`PerDirection`); returns how many shared quantizers were replaced."""
    Q = mods["ouroquant.quantizer"].QuantOps
    replaced = 0
    for module in list(model.modules()):
        for name in SHARED_SCAN_QUANTIZERS:
            if isinstance(getattr(module, name, None), (Q.Act, Q.Act_d)):
                setattr(module, name, PerDirection(Q.Act_d if name == "act_funcd" else Q.Act))
                replaced += 1
    for name, module in model.named_modules():
        module.name = name
    return replaced


def quantize_official(mods: dict, float_model: nn.Module, calib: torch.Tensor, bits: str, seed: int,
                      per_direction: bool = False) -> nn.Module:
    """The official calibration of the proxy (``CALIBRATE`` with eval_vim.sh's arguments); with
    ``per_direction``, each mixer's scan-operand quantizers are first split by direction
    (:func:`unshare_scan_quantizers`)."""
    n_lvw, n_lva, n_lva_o = OFFICIAL_LEVELS[bits]
    model = build_official(mods, float_model)
    if per_direction and not unshare_scan_quantizers(mods, model):
        raise RuntimeError("the official model has no shared scan-operand quantizers to split")
    args = argparse.Namespace(batch_size=calib.shape[0], train_batch=calib.shape[0], epochs=10, lr_w=5e-4, lr_a=5e-4,
                              n_lvw=n_lvw, n_lva=n_lva, n_lva_o=n_lva_o)
    loader = [(calib, torch.zeros(calib.shape[0], dtype=torch.long))]
    torch.manual_seed(seed)
    with cpu_device(), contextlib.redirect_stdout(io.StringIO()):
        return mods["ouroquant.calibrate"].CALIBRATE(model, args, loader, torch.device("cpu"), None).eval()


def _logits(model, images, labels):
    with cpu_device(), torch.no_grad():
        return collect_logits(model, (images, labels), batch_size=250)[0]


def run(args, save=lambda result: None) -> dict:
    src = official_source(args.src)
    commit = official_commit(src)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    model = load_proxy_model()
    test_x, test_y = load_digits("test")
    if args.test_n is not None:
        test_x, test_y = test_x[:args.test_n], test_y[:args.test_n]
    fp_logits, labels = collect_logits(model, (test_x, test_y))
    fp = compare_logits(fp_logits, fp_logits, labels)
    calib = augment_calibration_images(calibration_images(256, args.seed)[:CALIB_N], args.seed)
    result = {"official_source": f"{REPOSITORY}@{commit}", "seed": args.seed, "calib_images": CALIB_N,
              "test_images": int(test_x.shape[0]), "machine": machine, "fp_top1": fp.top1,
              "command": "OMP_NUM_THREADS=1 python benchmarks/ouromamba_official.py " + " ".join(args.argv),
              "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        official = any(side.startswith("official") for side in args.sides)
        mods = import_official(materialise(Path(tmp), src)) if official else None
        for bits in args.bits:
            for side, method in SIDES:
                if side not in args.sides or (method == "ouromamba" and not args.with_variant):
                    continue
                start = time.perf_counter()
                if side.startswith("official"):
                    q = quantize_official(mods, model, calib, bits, args.seed, per_direction=side != "official")
                    seconds = time.perf_counter() - start
                    q_logits = _logits(q, test_x, test_y)
                else:
                    q = vmfx.compile(model, calib, f"{method}-{bits}")
                    seconds = time.perf_counter() - start
                    q_logits = collect_logits(q, (test_x, test_y))[0]
                res = compare_logits(fp_logits, q_logits, labels)
                row = make_record(f"{side.split('-')[0]}:{method}", bits, "real+augment", args.seed, CALIB_N, fp.top1, res, seconds,
                                  machine)
                print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
                result["rows"].append(row)
                save(result)
    return result


def render(result) -> str:
    lines = ["# OuroMamba-Quant: the official code beside vmfx's `ouromamba-official-*`", "",
             f"Official code: `{result['official_source']}` (imported unchanged from a temporary copy, CPU stand-ins "
             "for its CUDA extensions and Triton norm: see `benchmarks/ouromamba_official.py`).",
             f"Command: `{result['command']}`; measured {result['measured']} on {result['machine']}.",
             f"Proxy Vim, {result['calib_images']} calibration images (real digits, seed {result['seed']}, through "
             "`augment_calibration_images`), the same for both sides; "
             f"{result['test_images']} test digits; float top-1 {result['fp_top1']:.2f}.", "",
             "| side | bits | top-1 | agree | KL | calib s |", "| --- | --- | --- | --- | --- | --- |"]
    earlier = [r for r in result["rows"] if r.get("command", result["command"]) != result["command"]]
    for r in result["rows"]:
        mark = f" [{earlier.index(r) + 1}]" if r in earlier else ""
        lines.append(f"| {r['method']}{mark} | {r['bits']} | {r['top1']:.2f} | {r['agree']:.2f} | {r['kl']:.3g} | "
                     f"{r['calib_seconds']:.0f} |")
    if earlier:
        lines += [""] + [f"[{i + 1}] measured by another run, `{r['command']}`, {r['run_measured']}, on the same "
                         "images." for i, r in enumerate(earlier)]
    lines += ["", "Paired differences (95 % intervals over the test digits), each side minus the official code "
              "(and vmfx minus the official code with one scan-operand quantizer per direction):", ""]
    by = {(r["method"], r["bits"]): r for r in result["rows"]}
    for (method, bits), r in by.items():
        for base_method in ("official:official", "official:per-direction"):
            base = by.get((base_method, bits))
            if base is None or method.startswith("official") and base_method != "official:official" \
                    or method == base_method:
                continue
            lines.append(f"- {bits}, {method} − {base_method}: {_say_all(r, base)}")
    if any(r["method"] == "official:per-direction" for r in result["rows"]):
        lines += ["", "`official:per-direction` is the official code, unchanged, with each mixer's shared "
                  "scan-operand quantizers (A, B, C, D, delta) replaced by one per direction "
                  "(`PerDirection` in the harness): what the official sharing costs."]
    lines += ["", "Where the two sides still differ in method (vmfx's choices, documented in `vmfx/quant/mixed.py`, "
              "`vmfx/passes/scan_operands.py`, `vmfx/data/augment.py`):", "",
              "- a quantizer shared by both scan directions: the official one is re-initialised on its second call, "
              "so the forward scan's A, B, C, D and delta use the backward scan's scales (per token: indexed by the "
              "backward scan's steps, the tokens reversed); vmfx calibrates it on both directions' data;",
              "- the outlier trigger and threshold of a step: computed with the window's earlier outliers zeroed "
              "(official) or on the whole step (vmfx); during the official initialisation the backward scan's "
              "operands are already quantized with the forward scan's scales;",
              "- the official backward recomputes delta without `dt_proj`'s bias and passes the scan operands' "
              "gradients straight through; vmfx differentiates its scan on the quantized operands;",
              "- the activation grid: the official clipping ratios are 0.99 .. 0 of the maximum, vmfx's 0.01 .. 1;",
              "- RandAugment: torchvision's in vmfx's augmentation (both sides here read the same augmented images)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="w4a4,w4a8", help="comma-separated subset of w4a4, w4a8")
    p.add_argument("--sides", default="official,vmfx",
                   help="comma-separated subset of official, official-per-direction (the official code with one "
                        "scan-operand quantizer per direction: what the sharing costs), vmfx")
    p.add_argument("--with-variant", action="store_true", help="also run vmfx's ouromamba-* (its own variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-n", type=int, default=None, help="first N test digits (default: all)")
    p.add_argument("--src", default=None, help=f"the official copy (default ${ENV})")
    p.add_argument("--out", default=None)
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json in --out")
    args = p.parse_args(argv)
    args.argv = argv
    args.bits = [b for b in args.bits.split(",") if b]
    args.sides = args.sides.split(",")
    unknown = sorted(set(args.sides) - {side for side, _ in SIDES})
    if unknown:
        raise SystemExit(f"unknown sides {unknown}; the sides are {', '.join(dict(SIDES))}")
    bad = [b for b in args.bits if b not in OFFICIAL_LEVELS]
    if bad:
        raise SystemExit(f"unknown bit settings {bad}; the official runs are {', '.join(OFFICIAL_LEVELS)}")
    out = args.out or RESULTS
    os.makedirs(out, exist_ok=True)
    if args.render:
        with open(os.path.join(out, "ouromamba_official.json")) as f:
            result = json.load(f)
        with open(os.path.join(out, "ouromamba_official.md"), "w") as f:
            f.write(render(result))
        return 0

    def save(result):
        with open(os.path.join(out, "ouromamba_official.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "ouromamba_official.md"), "w") as f:
            f.write(render(result))

    save(run(args, save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
