"""The official k-scaled ViM PTQ code (Shi et al., Access-IC-Lab/PTQ_for_ViM) side by side with vmfx.

    export VMFX_KSCALED_SRC=PATH   # a checkout (or bare git directory) of Access-IC-Lab/PTQ_for_ViM
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kscaled_official.py                   # W8A8, 32 calibration images
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kscaled_official.py --test-n 100 --out OUT   # a trial
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kscaled_official.py --bits w4a4 --sides official,vmfx
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kscaled_official.py --calib-n 256 --sides official \
        --checkpoints .official/checkpoints --out OUT    # hours on a CPU: rerun the same command to resume

Both sides quantize the bundled proxy Vim (``vmfx.data.load_proxy_model``) with the same calibration
images (``benchmarks/accuracy.py``'s ``calibration_images(n, seed)``) and are evaluated on the same
test digits against the same float logits (top-1, top-1 agreement with float, mean
KL(p_float || p_quant), with :mod:`vmfx.data.evaluate`'s ``collect_logits`` / ``compare_logits``).

The official code is read from a local copy of the repository (``$VMFX_KSCALED_SRC``: a checkout or a
bare git directory), materialised into a temporary folder and imported from there; nothing of it is
copied into vmfx. The results name it by repository and commit (``official_source``:
``Access-IC-Lab/PTQ_for_ViM@<commit>``), never by its local path.
What the harness changes to run it on the proxy, on a CPU (all listed in the results file):

* CUDA: ``torch.Tensor.cuda`` / ``nn.Module.cuda`` return their argument and
  ``torch.cuda.empty_cache`` does nothing while the official code runs (its scan, norm and every
  quantizer are plain torch; only the ``.cuda()`` calls tie it to a GPU). ``--device cuda`` leaves
  them alone and runs the official side on the GPU, as released. On this project's CPU its
  calibration grows faster than the calibration set: 102 CPU-s at 4 images, 3,283 at 64 (W4A4,
  one thread), so a 256-image bit setting takes many CPU-hours (its first in_proj search alone took
  245 s at 256 images against about 1 s at 4). ``--checkpoints FOLDER`` checkpoints each calibrated
  module and resumes from there, so such a run can span sessions (or device commands with a time
  limit) and still give the uninterrupted run's model (:class:`CalibrationCheckpoints`); its row's
  CPU-s and wall-s are summed over the sessions. On the device machine the official code travels as
  the ignored folder ``.official/`` (a copy of the bare git directory,
  ``cp -r <mirror> .official/PTQ_for_ViM.git``, so the results still name its commit), with
  ``VMFX_KSCALED_SRC=.official/PTQ_for_ViM.git``; there ``--checkpoints out/kscaled-checkpoints``
  (an ignored folder that is not carried, so it stays on the warm machine between commands) lets a
  command cut by its time limit be rerun to go on. The checkpoints name the device, so a CPU run and
  a GPU run never mix; a resumed run also reuses the x_proj factor files its first session saved
  there (below).
* Model size: its ``VisionMamba`` always builds ``Mamba(d_model)`` with the default ``d_state=16``
  (``create_block`` discards ``ssm_cfg``); the harness binds ``d_state`` to the proxy's (8) through
  ``vision_mamba.Mamba``. The proxy's weights load with ``strict=True`` (same keys as official Vim).
* ``quant_utils/net_wrap.py`` folds precomputed Vim-T factors ``r_D`` into every ``x_proj`` weight
  (rows of B divided, rows of C multiplied: float-exact), read from
  ``reparam_factors/tiny_factor/r_D/{layer}_{f|b}.txt`` with the dt rank hard-coded as 12. For the
  proxy (dt rank 6, d_state 8) the harness (1) replaces ``torch.ones(12)`` by the dt rank read from
  the weight's shape (a one-line text patch of the materialised copy) and (2) writes the proxy's own
  factor files: ``--xproj-rd calibrated`` (default) computes them with the official
  ``QuantSSM._initialize_intervals`` (reparameterization on, its defaults) on the float model's scan
  inputs for the calibration images, as the commented ``np.savetxt`` in ``QuantSSM.py`` shows the
  shipped files were made; ``--xproj-rd ones`` writes ones (the fold becomes a no-op).
* ``--bits`` other than w8a8 overrides the ``bit`` (and ``qmax``) of the weight and output configs
  the released ``PTQ4ViM`` config builds (hard-coded 8 there); the hidden state stays 8-bit.
* The calibration runs as ``quantization.quantization`` does (``wrap_modules_in_net`` then
  ``QuantCalibrator(sequential=False, batch_size=8).batching_quant_calib()``) after seeding torch,
  numpy and random with ``seed + 1`` as ``main.py`` does (its k-means starts from ``torch.randperm``).

The vmfx side runs ``kscaled-w<b>a<b>`` (the paper's Table I setting: linear/conv outputs only) and the
same preset with ``scan_state=ScanStateConfig(bits=8, reparameterize=True)`` (the official default
also quantizes the reparameterized hidden state); ``--vmfx-methods kscaled-official`` runs
``kscaled-official-w<b>a<b>`` (the tensors the official code quantizes) instead or as well.

Writes ``<out>/kscaled_official.json`` (the measured rows) and ``<out>/kscaled_official.md`` (the
table, the settings of both sides, a reading of the agreement and the differences in method found
in the official code). ``--out`` defaults to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import importlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import vmfx  # noqa: E402
from benchmarks.provenance import portable_command  # noqa: E402
from vmfx.config import ScanStateConfig  # noqa: E402
from vmfx.data import load_digits, load_proxy_model  # noqa: E402
from vmfx.data.evaluate import collect_logits, compare_logits  # noqa: E402
from vmfx.data.proxy import PROXY_MODEL_NAME, PROXY_WEIGHTS, proxy_metadata  # noqa: E402

REPOSITORY = "Access-IC-Lab/PTQ_for_ViM"
ENV = "VMFX_KSCALED_SRC"
RESULTS = os.path.join(os.path.dirname(__file__), "results")
#: Top-level module names of the official ``src/`` folder (purged from sys.modules around imports).
OFFICIAL_TOP = ("vision_mamba", "mamba", "layers", "tools", "quant_layers", "quant_configs", "quant_utils", "utils",
                "quantization")
#: The line of ``net_wrap.py`` that hard-codes Vim-T's dt rank, and its replacement.
DT_RANK_LINE = "torch.ones(12),"
DT_RANK_PATCH = "torch.ones(new_m.weight.shape[0] - 2 * r_D_tensor.numel()),"
#: The proxy's constructor options the official VisionMamba hard-codes (anything else is refused).
OFFICIAL_FIXED = {"rms_norm": True, "residual_in_fp32": True, "if_abs_pos_embed": True, "if_rope": False,
                  "bimamba_type": "v2", "if_cls_token": True, "if_divide_out": True, "use_middle_cls_token": True}


class OfficialCodeMissing(RuntimeError):
    """No readable copy of Access-IC-Lab/PTQ_for_ViM (tests skip on this)."""


# -- the official code, materialised and imported ------------------------------------------------


def official_source(src: str | None = None) -> str:
    """The local copy of the official repository: ``src``, else ``$VMFX_KSCALED_SRC``."""
    src = src or os.environ.get(ENV)
    if not src or not os.path.exists(src):
        raise OfficialCodeMissing(f"no copy of {REPOSITORY} at {src!r} (set {ENV} to a checkout)")
    return src


def _git(src: str) -> list[str]:
    return ["git", "-C", src] if os.path.exists(os.path.join(src, ".git")) else ["git", "--git-dir", src]


def official_commit(src: str | None = None) -> str | None:
    """HEAD of the official copy (None for a copy without its git data)."""
    try:
        done = subprocess.run(_git(official_source(src)) + ["rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def official_file(path: str, src: str | None = None) -> str:
    """The text of ``path`` (relative to the repository root) in the official copy, as it is there."""
    src = official_source(src)
    if os.path.isdir(os.path.join(src, "src", "quant_layers")):
        return Path(src, path).read_text()
    try:
        return subprocess.run(_git(src) + ["show", f"HEAD:{path}"], check=True, capture_output=True,
                              text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise OfficialCodeMissing(f"cannot read {path} from the copy of {REPOSITORY}: {exc}") from exc


def materialise(dest: Path, src: str | None = None) -> Path:
    """Copy the official ``src/`` folder into ``dest`` (from a checkout or with ``git archive`` from a
    bare git directory), patch the dt rank of ``net_wrap.py`` (see the module docstring) and return
    the folder to import from. Raises :class:`OfficialCodeMissing` without a copy."""
    src = official_source(src)
    dest = Path(dest)
    if os.path.isdir(os.path.join(src, "src", "quant_layers")):
        shutil.copytree(os.path.join(src, "src"), dest / "src")
    else:
        try:
            archive = subprocess.run(["git", "--git-dir", src, "archive", "HEAD", "src"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise OfficialCodeMissing(f"cannot read the official files of {REPOSITORY} from {src}: {exc}") from exc
    net_wrap = dest / "src" / "quant_utils" / "net_wrap.py"
    text = net_wrap.read_text()
    if text.count(DT_RANK_LINE) != 1:
        raise OfficialCodeMissing(f"src/quant_utils/net_wrap.py of {REPOSITORY} no longer holds exactly one "
                                  f"{DT_RANK_LINE!r}: update the harness")
    net_wrap.write_text(text.replace(DT_RANK_LINE, DT_RANK_PATCH))
    return dest / "src"


#: Where the official code runs: "cpu" (with :func:`cpu_standins`) or "cuda" (as released); set by
#: ``--device``.
DEVICE = "cpu"


@contextlib.contextmanager
def cpu_standins():
    """``.cuda()`` is the identity and ``torch.cuda.empty_cache`` a no-op inside the block (nothing
    changes where :data:`DEVICE` is "cuda": the official code then runs as released)."""
    if DEVICE == "cuda":
        yield
        return
    saved = (torch.Tensor.cuda, nn.Module.cuda, torch.cuda.empty_cache)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.empty_cache = lambda: None
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.cuda.empty_cache = saved


class _OnDevice(nn.Module):
    """``model`` fed from CPU batches: the input moves to :data:`DEVICE` (logits come back through
    ``collect_logits``, which returns them on the CPU)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.to(DEVICE))


@contextlib.contextmanager
def in_dir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _purge_official_modules():
    for name in [n for n in sys.modules if n.split(".")[0] in OFFICIAL_TOP]:
        del sys.modules[name]


def import_official(src_dir: Path) -> dict:
    """Import the official modules from ``src_dir`` (first on ``sys.path``); timm's ``register_model``
    is a no-op meanwhile, so timm's registry keeps vmfx's Vim entry points."""
    import timm.models.registry as timm_registry

    _purge_official_modules()
    sys.path.insert(0, str(src_dir))
    saved = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        mods = {name: importlib.import_module(name) for name in
                ("vision_mamba", "mamba", "layers.ssm", "quant_utils.net_wrap", "quant_utils.quant_calib",
                 "quant_configs.PTQ4ViM", "quant_configs.QuantConfig", "quant_layers.QuantSSM")}
    finally:
        timm_registry.register_model = saved
    return mods


def proxy_dims() -> dict:
    kw = proxy_metadata()["model_kwargs"]
    wrong = {k: kw.get(k) for k, v in OFFICIAL_FIXED.items() if kw.get(k, v) != v}
    if wrong:
        raise ValueError(f"the official VisionMamba hard-codes {OFFICIAL_FIXED}; the proxy has {wrong}")
    return {k: kw[k] for k in ("img_size", "patch_size", "stride", "channels", "num_classes", "embed_dim", "depth",
                               "d_state")}


def build_official(mods: dict, float_model: nn.Module) -> nn.Module:
    """The official ``VisionMamba`` with the proxy's sizes, holding ``float_model``'s weights."""
    dims = proxy_dims()
    d_state = dims.pop("d_state")
    vm = mods["vision_mamba"]
    vm.Mamba = functools.partial(mods["mamba"].Mamba, d_state=d_state)
    with cpu_standins():
        model = vm.VisionMamba(**dims)
    model.load_state_dict(float_model.state_dict(), strict=True)
    return model.to(DEVICE).eval()


def official_logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250):
    """Logits of an official model (float or quantized) over ``images``; large batches amortise its
    Python loop over the 197 scan steps (batch size does not change the result)."""
    with cpu_standins(), torch.no_grad():
        return collect_logits(_OnDevice(model), (images, labels), batch_size=batch_size)


def _ssm_inputs(model: nn.Module, name: str, images: torch.Tensor, batch_size: int = 8):
    """The scan inputs (x, deltaA, deltaB, C, D) of the SequentialSSM ``name`` over ``images``, float."""
    module = dict(model.named_modules())[name]
    seen = []
    hook = module.register_forward_hook(lambda m, inp, out: seen.append([t.detach() for t in inp]))
    try:
        with cpu_standins(), torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i:i + batch_size].to(DEVICE))
    finally:
        hook.remove()
    x, dA, dB, C, D = (torch.cat([s[j] for s in seen]) for j in range(5))
    return x, dA, dB, C, D[0]


def write_xproj_factors(mods: dict, float_model: nn.Module, images: torch.Tensor, src_dir: Path, how: str,
                        cache: Path | None = None) -> dict:
    """Write ``reparam_factors/tiny_factor/r_D/{layer}_{f|b}.txt`` for the proxy (read by the official
    ``net_wrap``): the official QuantSSM's own r_D on the float scan inputs (``calibrated``) or ones.
    Returns {file name: factors}. With ``cache`` (a JSON file, named by the caller after everything
    the factors depend on), the files' texts are written from it when it exists and saved to it when
    computed (a resumed run skips the scans over every calibration image)."""
    out_dir = src_dir / "reparam_factors" / "tiny_factor" / "r_D"
    shutil.rmtree(src_dir / "reparam_factors")
    out_dir.mkdir(parents=True)
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        for fname, entry in saved.items():
            (out_dir / fname).write_text(entry["text"])
        return {fname: entry["values"] for fname, entry in saved.items()}
    official = build_official(mods, float_model)
    qcfg = mods["quant_configs.QuantConfig"]
    d_state = proxy_metadata()["model_kwargs"]["d_state"]
    written = {}
    for name, m in official.named_modules():
        if type(m).__name__ != "SequentialSSM":
            continue
        fname = f"{m.layer_idx}_{m.direction}.txt"
        if how == "ones":
            r_D = torch.ones(d_state)
        else:
            qssm = mods["quant_layers.QuantSSM"].QuantSSM(
                m.layer_idx, m.direction, reparameterization=True,
                h_config=qcfg.QuantConfig(quant=True, bit=8), o_config=qcfg.QuantConfig(quant=True, bit=8))
            x, dA, dB, C, D = _ssm_inputs(official, name, images)
            with cpu_standins(), torch.no_grad():
                qssm._initialize_intervals(x, dA, dB, C, D)
            r_D = qssm.r_D.float().cpu()
        np.savetxt(out_dir / fname, r_D.numpy(), fmt="%10.10f")
        written[fname] = r_D.tolist()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = {f: {"text": (out_dir / f).read_text(), "values": v} for f, v in written.items()}
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.part")  # runs of other bits may share it
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, cache)
    return written


def _override_bits(get_module, wbits: int, abits: int):
    """The released config's ``get_module`` with the weight / output ``bit`` set to ``wbits`` / ``abits``
    (the hidden state's ``h_config`` keeps its 8 bits)."""
    def wrapped(module_type, *args, **kwargs):
        module = get_module(module_type, *args, **kwargs)
        for attr, bits in (("w_config", wbits), ("o_config", abits)):
            cfg = getattr(module, attr, None)
            if cfg is not None and cfg.quant:
                cfg.bit, cfg.qmax = bits, 2 ** (bits - 1)
        return module
    return wrapped


class _ConfigWithBits:
    def __init__(self, cfg, wbits, abits):
        self.get_module = _override_bits(cfg.get_module, wbits, abits)


class CheckpointMismatch(RuntimeError):
    """A checkpoint folder written by a run with other settings (refused: its modules would mix in)."""


class CalibrationCheckpoints:
    """Module-by-module checkpoints of one official calibration, so that a run cut short (the end of a
    session, a device command's time limit) resumes where it stopped and gives the same model.

    Sound because the official calibration runs with ``sequential=False``: each module calibrates on the
    *float* model's activations (every module before it is back in ``raw`` mode), so a module depends on
    the earlier ones only through (1) what their calibration changes in float mode, the bias that
    ``QuantLinear``'s bias correction rewrites (dt_proj, head), and (2) the torch RNG state that their
    k-means starts (``torch.randperm``) consumed. A checkpoint holds both: the calibrated module's whole
    ``__dict__`` (parameters, quantizer configs, clusters, factors) and the RNG states after it. One
    thing differs on resume: the KL targets ``batching_quant_calib`` computes first come from the model
    with the restored biases; they only feed ``raw_grad``, which the released config's metrics (cosine,
    min-max) never read. A resumed calibration gives the uninterrupted one's logits bit for bit
    (``tests/models/test_kscaled_official.py`` checks it on the official code).

    Layout: ``<folder>/run.json`` holds the settings the run must share (``identity``), one entry per
    calibrated module (its name, file, CPU-s and wall-s since the previous entry or the session's
    start, and the session that calibrated it) and ``sessions`` (those that calibrated a module);
    ``<folder>/<index>.pt`` holds one module. Each file is written by an atomic rename, the module's
    before run.json names it, so a run killed mid-write leaves no half entry."""

    def __init__(self, folder: str | os.PathLike, identity: dict):
        self.folder = Path(folder).resolve()  # the official calibration runs inside its own folder
        self.identity = json.loads(json.dumps(identity))
        self.index_path = self.folder / "run.json"
        if self.index_path.exists():
            state = json.loads(self.index_path.read_text())
            if state["identity"] != self.identity:
                diff = {k: (state["identity"].get(k), v) for k, v in self.identity.items()
                        if state["identity"].get(k) != v}
                raise CheckpointMismatch(f"{self.folder} holds the checkpoints of a run with other settings "
                                         f"(recorded, now: {diff}); pass another --checkpoints folder or delete it")
            self.modules = state["modules"]
            self.sessions = state.get("sessions", 0)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.modules, self.sessions = [], 0
        self._clock = None

    def _write(self, path: Path, save):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        save(tmp)
        os.replace(tmp, path)

    def done(self) -> list[str]:
        """Names of the modules already calibrated, in calibration order."""
        return [m["name"] for m in self.modules]

    def begin_session(self):
        """Start this process's clock (its set-up counts towards the first module it calibrates) and its
        session number, and take the folder's lock until :meth:`end_session` (or the process's end): a
        second run into the same folder is refused instead of calibrating the same modules beside it."""
        import fcntl
        self._lock = open(self.folder / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise CheckpointMismatch(f"another run (pid {holder}) is calibrating into {self.folder}; wait for it "
                                     "to end or pass another --checkpoints folder") from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self.sessions += 1
        self._clock = (time.process_time(), time.perf_counter())

    def end_session(self):
        """Release the folder's lock."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def restore(self, wrapped: dict) -> dict:
        """Put the checkpointed modules' states into ``wrapped`` (name -> official module, in calibration
        order; the objects stay the same, so the model holds the restored modules), set the RNG states
        after the last of them, and return the modules still to calibrate (in order)."""
        names = list(wrapped)
        done = self.done()
        if names[:len(done)] != done:
            raise CheckpointMismatch(f"{self.folder}: the checkpointed modules {done[:3]}... are not the first "
                                     f"modules of this model's calibration order {names[:3]}...")
        for entry in self.modules:
            saved = torch.load(self.folder / entry["file"], weights_only=False)
            module = wrapped[entry["name"]]
            module.__dict__.update(saved["state"])
            module.mode = "raw"  # as batching_quant_calib leaves it (sequential=False)
        if self.modules:
            torch.set_rng_state(saved["rng"]["torch"])
            np.random.set_state(saved["rng"]["numpy"])
            random.setstate(saved["rng"]["random"])
        return {n: wrapped[n] for n in names[len(done):]}

    def save(self, name: str, module: nn.Module):
        """Checkpoint ``module`` (just calibrated) and the RNG states after it."""
        cpu, wall = time.process_time(), time.perf_counter()
        file = f"{len(self.modules):03d}.pt"
        payload = {"state": dict(module.__dict__), "rng": {"torch": torch.get_rng_state(),
                                                           "numpy": np.random.get_state(),
                                                           "random": random.getstate()}}
        self._write(self.folder / file, lambda p: torch.save(payload, p))
        self.modules.append({"name": name, "file": file, "cpu_s": round(cpu - self._clock[0], 2),
                             "wall_s": round(wall - self._clock[1], 2), "session": self.sessions})
        self._clock = (time.process_time(), time.perf_counter())
        self._flush()

    def _flush(self):
        text = json.dumps({"identity": self.identity, "sessions": self.sessions, "modules": self.modules}, indent=1)
        self._write(self.index_path, lambda p: p.write_text(text))

    def totals(self) -> dict:
        """CPU-s and wall-s of the whole calibration summed over the sessions that made it."""
        return {"cpu_s": round(sum(m["cpu_s"] for m in self.modules), 1),
                "wall_s": round(sum(m["wall_s"] for m in self.modules), 1), "sessions": self.sessions}


@contextlib.contextmanager
def _checkpoint_each_module(wrapped: dict, checkpoints: CalibrationCheckpoints):
    """Inside the block, each official module class's ``calibration_step2`` checkpoints its module when
    it returns (the classes are restored afterwards)."""
    names = {id(m): n for n, m in wrapped.items()}
    saved = {}
    for cls in {type(m) for m in wrapped.values()}:
        step2 = cls.calibration_step2
        saved[cls] = step2

        def checkpointed(self, *args, _step2=step2, **kwargs):
            out = _step2(self, *args, **kwargs)
            checkpoints.save(names[id(self)], self)
            return out
        cls.calibration_step2 = checkpointed
    try:
        yield
    finally:
        for cls, step2 in saved.items():
            cls.calibration_step2 = step2


def quantize_official(mods: dict, float_model: nn.Module, calib: torch.Tensor, src_dir: Path, seed: int,
                      wbits: int = 8, abits: int = 8,
                      checkpoints: CalibrationCheckpoints | None = None) -> nn.Module:
    """The official PTQ4ViM quantization of a fresh official copy of ``float_model``, as
    ``quantization.quantization`` runs it (CPU stand-ins for ``.cuda()``). With ``checkpoints``, the
    modules calibrated by an earlier run with the same settings are restored instead of calibrated
    again and each newly calibrated module is checkpointed (:class:`CalibrationCheckpoints`)."""
    model = build_official(mods, float_model)
    torch.manual_seed(seed + 1)
    np.random.seed(seed + 1)
    random.seed(seed + 1)
    cfg = mods["quant_configs.PTQ4ViM"]
    if (wbits, abits) != (8, 8):
        cfg = _ConfigWithBits(cfg, wbits, abits)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(calib.shape[0])),
                                         batch_size=calib.shape[0], shuffle=False)
    with cpu_standins(), in_dir(src_dir):
        wrapped = mods["quant_utils.net_wrap"].wrap_modules_in_net(model, cfg)
        if checkpoints is None:
            mods["quant_utils.quant_calib"].QuantCalibrator(model, wrapped, loader, sequential=False,
                                                            batch_size=8).batching_quant_calib()
        else:
            checkpoints.begin_session()
            try:
                todo = checkpoints.restore(wrapped)
                if todo:
                    calibrator = mods["quant_utils.quant_calib"].QuantCalibrator(model, todo, loader,
                                                                                 sequential=False, batch_size=8)
                    with _checkpoint_each_module(todo, checkpoints):
                        calibrator.batching_quant_calib()
            finally:
                checkpoints.end_session()
        for module in wrapped.values():  # as batching_quant_calib finishes (it sets only its own modules)
            module.mode = "quant_forward"
    return model.eval()


# -- the measurement ---------------------------------------------------------------------------


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def _timed(fn):
    load0, w0, c0 = _uptime(), time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1),
                 "load_before": load0, "load_after": _uptime()}


def _digest(value) -> str:
    """sha256 of ``value``'s JSON text (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _row(side, method, bits, res, timing, settings) -> dict:
    """One measured row; ``wrong`` / ``disagree`` / ``kl_images`` (per test image, as in ``accuracy.json``) make
    the paired intervals of the reading."""
    from accuracy_run import sig4
    return {"side": side, "method": method, "bits": bits, "top1": round(res.top1, 2), "agree": round(res.agree, 2),
            "kl": float(f"{res.kl:.4g}"), "wrong": [int(i) for i in (~res.correct).nonzero().flatten()],
            "disagree": [int(i) for i in (~res.agrees).nonzero().flatten()],
            "kl_images": [sig4(v) for v in res.kl_per_image.tolist()], **timing, "settings": settings}


def _quantizer_kinds(q: nn.Module) -> list[str]:
    """The vmfx quantizer modules of ``q`` with layer numbers folded (``layers_N_mixer_in_proj__output``)."""
    import re
    names = [n.split(".", 1)[1] for n, _ in q.named_modules() if n.startswith("vmfx_q.")]
    return sorted({re.sub(r"(?<=_)\d+(?=_)", "N", n) for n in names})


def run(args, save=lambda result: None) -> dict:
    """Measure every requested side and bit setting; ``save(result)`` after each row (an interrupted run
    keeps what it measured)."""
    torch.set_num_threads(args.threads)
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run on the CPU (the default) instead")
    DEVICE = args.device
    from accuracy_run import calibration_images  # the images benchmarks/accuracy.py calibrates on
    calib = calibration_images(args.calib_n, args.seed)
    test_x, test_y = load_digits("test")
    if args.test_n:
        test_x, test_y = test_x[:args.test_n], test_y[:args.test_n]
    float_model = load_proxy_model()
    with torch.no_grad():
        fp_logits, labels = collect_logits(float_model, (test_x, test_y))
    fp = compare_logits(fp_logits, fp_logits, labels)
    result = {"command": "OMP_NUM_THREADS=1 " + portable_command("benchmarks/kscaled_official.py", sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                         + (f", official side on {torch.cuda.get_device_name()}" if DEVICE == "cuda" else ""),
              "official_source": None, "official_commit": None, "calib_images": args.calib_n, "seed": args.seed,
              "test_images": int(test_x.shape[0]), "fp_top1": round(fp.top1, 2), "rows": []}
    sides = args.sides.split(",")
    if "official" in sides or "check" in sides:  # named by repository and commit, not by its local path
        commit = official_commit()
        result["official_commit"] = commit
        result["official_source"] = f"{REPOSITORY}@{commit}" if commit else \
            f"{REPOSITORY} (a copy without git data: commit unknown)"
    with tempfile.TemporaryDirectory(prefix="kscaled-official-") as tmp:
        if "official" in sides or "check" in sides:
            src_dir = materialise(Path(tmp))
            mods = import_official(src_dir)
            off_float = build_official(mods, float_model)
            off_logits, _ = official_logits(off_float, test_x, test_y)
            diff = (off_logits - fp_logits).abs().max().item()
            result["float_check"] = {"max_abs_diff": diff, "max_rel_diff": diff / fp_logits.abs().max().item(),
                                     "official_top1": round(compare_logits(fp_logits, off_logits, labels).top1, 2)}
            print(f"float check: official vs vmfx logits max |diff| {diff:.3g} "
                  f"(relative {result['float_check']['max_rel_diff']:.3g})", flush=True)
            save(result)
            if "official" not in sides:  # "check": the float check only
                _purge_official_modules()
                sys.path.remove(str(src_dir))
                return result
            key = {"official_source": result["official_source"], "calib_images": args.calib_n, "seed": args.seed,
                   "xproj_rd": args.xproj_rd, "device": DEVICE, "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads(),
                   "proxy_sha256": hashlib.sha256(Path(PROXY_WEIGHTS).read_bytes()).hexdigest()}
            cache = Path(args.checkpoints).resolve() / f"xproj_rd_{_digest(key)[:16]}.json" if args.checkpoints else None
            factors, timing_f = _timed(lambda: write_xproj_factors(mods, float_model, calib, src_dir, args.xproj_rd,
                                                                   cache))
            result["xproj_rd"] = {"how": args.xproj_rd, "seconds": timing_f["wall_s"],
                                  "range": [min(min(v) for v in factors.values()),
                                            max(max(v) for v in factors.values())]}
            for bits in args.bits.split(","):
                w, a = int(bits[1]), int(bits[3])
                checkpoints = None
                if args.checkpoints:
                    checkpoints = CalibrationCheckpoints(os.path.join(args.checkpoints, bits), {
                        **key, "bits": bits, "xproj_factors": _digest(factors)})
                    print(f"official {bits}: {len(checkpoints.done())} modules restored from {args.checkpoints}",
                          flush=True)
                q, timing = _timed(lambda: quantize_official(mods, float_model, calib, src_dir, args.seed, w, a,
                                                             checkpoints))
                if checkpoints is not None:  # the calibration's cost over every session that made it
                    timing.update(checkpoints.totals())
                logits, _ = official_logits(q, test_x, test_y)
                res = compare_logits(fp_logits, logits, labels)
                settings = (f"released PTQ4ViM config{'' if (w, a) == (8, 8) else f' with w/o bits {w}/{a}'}; "
                            f"h 8-bit per step, reparameterized; x_proj r_D files: {args.xproj_rd}")
                if timing.get("sessions", 1) > 1:
                    settings += (f"; calibrated in {timing['sessions']} sessions resumed from module checkpoints "
                                 "(CPU-s and wall-s summed over them)")
                result["rows"].append(_row("official", "PTQ4ViM", bits, res, timing, settings))
                save(result)
                print(f"official {bits}: top-1 {res.top1:.2f} agree {res.agree:.2f} KL {res.kl:.4g} "
                      f"({timing['wall_s']} s)", flush=True)
                del q
            _purge_official_modules()
            sys.path.remove(str(src_dir))
    if "vmfx" in sides:
        from accuracy_run import quantize
        for bits in args.bits.split(","):
            variants = {
                "kscaled": (f"kscaled-{bits}", None,
                            "preset as is (linear/conv outputs; the paper's Table I setting)"),
                "kscaled+h8": (f"kscaled-{bits}", ScanStateConfig(bits=8, reparameterize=True),
                               "preset + ScanStateConfig(bits=8, reparameterize=True) (defaults: search_samples 32, "
                               "coarse-to-fine search)"),
                "kscaled-official": (f"kscaled-official-{bits}", None,
                                     "preset as is (the tensors the official code quantizes; search on every "
                                     "calibration image, exhaustive 8-bit state search)"),
            }
            names = {"kscaled": "kscaled", "kscaled+h8": "kscaled + h8 rep", "kscaled-official": "kscaled-official"}
            for key in args.vmfx_methods.split(","):
                if key not in variants:
                    raise SystemExit(f"--vmfx-methods: unknown {key!r}; choose from {', '.join(variants)}")
                preset, scan_state, settings = variants[key]
                method = names[key]
                q, timing = _timed(lambda: quantize(load_proxy_model(), calib, preset, args.seed, scan_state))
                with torch.no_grad():
                    logits, _ = collect_logits(q, (test_x, test_y))
                res = compare_logits(fp_logits, logits, labels)
                result["rows"].append(_row("vmfx", method, bits, res, timing, f"{preset}: {settings}"))
                result["rows"][-1]["quantizers"] = _quantizer_kinds(q)
                save(result)
                print(f"vmfx {method} {bits}: top-1 {res.top1:.2f} agree {res.agree:.2f} KL {res.kl:.4g} "
                      f"({timing['wall_s']} s)", flush=True)
                del q
    return result


# -- the results file --------------------------------------------------------------------------

#: Differences in method between the official code (file:line at commit d6fc957) and vmfx, found by
#: reading it for this comparison.
DIFFERENCES = [
    "**Hidden state used for y.** Official `QuantSSM.quant_forward` (src/quant_layers/QuantSSM.py:600-603) "
    "computes `y[t] = C[t] . h[t]` from the *unquantized* `h[t] = dA[t] Q(h[t-1]) + dBx[t]` and quantizes the "
    "state only when it is carried to the next step; vmfx computes `y[t]` from `Q(h[t])` "
    "(vmfx/quant/state_quantizer.py).",
    "**r_D applied twice.** Official `net_wrap.py:62-80` folds precomputed Vim-T factors r_D (files) into every "
    "x_proj weight (B rows / r_D, C rows * r_D), and `QuantSSM._initialize_intervals` (:160-247) then computes "
    "r_C, r_L, r_D again from the (already folded) scan and applies them inside the scan; the dt rank 12 is "
    "hard-coded (:76) and the files exist only for Vim-T/Vim-S. vmfx computes the factors once from calibration "
    "and folds them into the scan only; x_proj's output quantizer sees unscaled B, C.",
    "**Output scale search of the SSM compares unlike tensors.** `batching_quant_calib` records the SSM output "
    "in `raw` mode (`y + D x`, QuantSSM.py:517-519, quant_calib.py:252-261), but `_search_best_o_interval` "
    "(QuantSSM.py:434-490) scores the quantized `y * r_C` *without* `D x` against it. vmfx scores like with like.",
    "**Scan-state search inputs.** Official `_search_best_h_interval` (QuantSSM.py:354-432) runs on float "
    "upstream inputs (sequential=False: every layer calibrates on raw inputs, quantization.py:28-31, "
    "quant_calib.py:212-215) and on all calibration images, scoring all candidates exhaustively; vmfx's "
    "QuantizeScanStatePass sees the quantized upstream layers' scan inputs, keeps `search_samples` (32) "
    "images and searches coarse to fine by default.",
    "**Which edges are quantized.** Official PTQ4ViM config (src/quant_configs/PTQ4ViM.py) also quantizes the "
    "patch-embedding conv (weight + output, min-max), every RMSNorm (weight + output, min-max), the head "
    "(weight + output), the gate SiLU `act_z` output (k-scaled channel-wise, one module shared by both "
    "directions, mamba.py:62,145,170) and the softplus (delta) output after dt_proj's own output; vmfx's "
    "kscaled preset (vmfx/config.py `kscaled_rules`) quantizes dt_proj's output but not a separate softplus "
    "output (the softplus is fused into the scan), nor (no rule names it) the gate SiLU, nor the patch "
    "embedding or the head (see the quantizer lists above; rows measured before a naming fix show conv1d as `convNd`).",
    "**Power-of-two ratios at conv1d are not applied.** The config asks for them (PTQ4ViM.py:65) but "
    "`QuantConv1d._search_best_o_interval` (QuantConv1d.py:245-289) has no power-of-two step (QuantLinear.py:"
    "278-280 and QuantSSM.py:492-494 have one); vmfx rounds conv1d's clusters to powers of two.",
    "**conv1d weights.** Official quantizes them (per-tensor 8-bit, min-max, not searched: `qmode=\"minmax\"`, "
    "PTQ4ViM.py:37); vmfx's kscaled preset quantizes the weights of the linears only (see the quantizer lists "
    "above).",
    "**Where the SSM output is quantized.** Official quantizes the scan's `y` in the reparameterized domain, "
    "before `r_C` is multiplied back and before the `D x` skip (QuantSSM.py:604-615), then the gate SiLU's "
    "output separately (`act_z`); vmfx's `scan` output quantizer reads the scan's output `y + D u` (vmfx/nn/"
    "mamba.py:187-190: the scan carries D), before the gate `* silu(z)`.",
    "**Candidates.** Official candidate grids hold 101 values but the search loops "
    "`range(0, eq_n, parallel_eq_n)` with `p_ed = min(eq_n, ...)` evaluate only the first 100 (0.01x..1.188x; "
    "1.2x never scored, e.g. QuantLinear.py:201-202); vmfx scores all 101.",
    "**Search order.** Official searches clusters one after another within a round, each seeing those already "
    "updated, and per layer in sequence w then o (QuantLinear.py:341-347); vmfx scores all coordinates of all "
    "quantizers at once per phase.",
    "**k-means.** Official clusters the per-position mean |x| from an unseeded `torch.randperm` start "
    "(tools/kmeans.py:13-16; the harness seeds torch as main.py does); vmfx clusters the per-position absmax "
    "from a seeded k-means++ start.",
    "**Integer range and initial scale.** Official: `[-2^(b-1), 2^(b-1)-1]`, initial scale `max / (2^(b-1) - "
    "0.5)`; vmfx: `[-(2^(b-1)-1), 2^(b-1)-1]`, `max / qmax`.",
    "**Bias correction.** Official `QuantLinear` subtracts the mean weight-quantization error from the bias of "
    "linears that have one (dt_proj, head; QuantLinear.py:98-106, default on); vmfx does not.",
]


def _fmt_rows(result) -> list[str]:
    lines = ["| side | method | bits | top-1 | agree | KL(p_float ‖ p_quant) | calib wall s | calib CPU s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['side']} | {r['method']} | {r['bits']} | {r['top1']:.1f} | {r['agree']:.1f} | "
                     f"{r['kl']:.3g} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return lines


#: ``benchmarks/accuracy.py`` methods whose records (same images) the reading compares with the official rows.
ACCURACY_METHODS = ("kscaled-official", "kscaled", "kscaled-ssm")


def accuracy_rows(result, path: str | None = None) -> list[dict]:
    """``accuracy.json`` records measured on the images of ``result`` (proxy model, real calibration with the
    same seed and number of images, the same test digits) for :data:`ACCURACY_METHODS`, as vmfx rows.

    ``benchmarks/accuracy.py`` quantizes with the same ``calibration_images(n, seed)`` and the same
    ``accuracy_run.quantize`` as this script's vmfx side, so its records pair image by image with the
    official rows here (no need to recalibrate the vmfx presets for the reading)."""
    path = path or os.path.join(RESULTS, "accuracy.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = json.load(f)
    bits = {r["bits"] for r in result["rows"] if r["side"] == "official"}
    return [dict(r, side="vmfx (accuracy.json)") for r in records
            if r["method"] in ACCURACY_METHODS and r["bits"] in bits and r.get("model") == PROXY_MODEL_NAME
            and r.get("calib") == "real" and r.get("seed") == result["seed"]
            and r.get("calib_images") == result["calib_images"] and r.get("test_images") == result["test_images"]]


def _reading(result) -> list[str]:
    """Each vmfx row minus each official row of the same bits: top-1, agreement and KL with 95 % paired
    intervals over the test images (``*``: the interval excludes 0)."""
    from accuracy_stats import record_differences
    n = result["test_images"]
    out = []
    rows = result["rows"]
    vmfx_rows = [r for r in rows if r["side"] == "vmfx"] + accuracy_rows(result)
    for bits in dict.fromkeys(r["bits"] for r in rows):
        for o in (r for r in rows if r["side"] == "official" and r["bits"] == bits):
            for v in (r for r in vmfx_rows if r["bits"] == bits):
                diff = record_differences(dict(v, test_images=n), dict(o, test_images=n))
                kl = diff["kl"].format(scientific=True) if diff["kl"] else "n/a"
                ties = [k for k, d in diff.items() if d is not None and d.low is not None and not d.significant]
                out.append(f"- {bits}, {v['side']} `{v['method']}` − official: top-1 {diff['top1'].format()} points, "
                           f"agreement {diff['agree'].format()} points, KL {kl} (95 % paired intervals; "
                           f"{'0 inside for ' + ', '.join(ties) if ties else '0 outside every interval'}).")
    if not out:
        missing = sorted({"official", "vmfx"} - {r["side"] for r in rows})
        out.append(f"- No comparison yet: no {' and no '.join(missing)} rows with these settings (run the "
                   f"command above with `--sides {','.join(missing)}`; rows of the same calibration / test "
                   "settings are merged).")
    return out


def render(result) -> str:
    fc = result.get("float_check")
    lines = [
        "# The official k-scaled ViM PTQ code side by side with vmfx (proxy Vim)",
        "",
        f"Written by `benchmarks/kscaled_official.py` on {result['date']} ({result['machine']}).",
        "",
        f"    {result['command']}",
        "",
        f"Official code: `{result.get('official_source') or REPOSITORY + ' (commit unknown)'}`, "
        "imported from a temporary copy, run on the CPU "
        "(see the script's docstring for the stand-ins and the one-line dt-rank patch).",
        f"Model: the bundled proxy Vim (`vim-proxy-digits`, FP top-1 {result['fp_top1']:.1f} on these images). "
        f"Calibration: {result['calib_images']} training digits drawn with seed {result['seed']} "
        "(`benchmarks/accuracy.py: calibration_images`), the same for both sides. "
        f"Test: {result['test_images']} test digits; agree and KL against the float vmfx model's logits.",
        "",
    ]
    if fc:
        lines += [f"Float check: the official model with the proxy's weights gives top-1 {fc['official_top1']:.1f}; "
                  f"its logits differ from vmfx's float model's by at most {fc['max_abs_diff']:.2g} "
                  f"(relative to the largest logit: {fc['max_rel_diff']:.2g}).", ""]
    if result.get("xproj_rd"):
        x = result["xproj_rd"]
        lines += [f"x_proj r_D factor files for the proxy: `{x['how']}` (values in [{x['range'][0]:.3g}, "
                  f"{x['range'][1]:.3g}]).", ""]
    lines += _fmt_rows(result) + [""]
    lines += ["Settings:", ""]
    for r in result["rows"]:
        lines.append(f"- {r['side']} {r['method']} {r['bits']}: {r['settings']}. Load before: "
                     f"`{r['load_before']}`; after: `{r['load_after']}`.")
    for r in result["rows"]:
        if r.get("quantizers"):
            lines += ["", f"vmfx {r['method']} {r['bits']} quantizer modules (layer numbers as N): "
                      + ", ".join(f"`{q}`" for q in r["quantizers"]) + "."]
    lines += ["", "## Reading", ""] + _reading(result)
    lines += result.get("notes", [])
    lines += ["", "## Differences in method (official code at commit d6fc957 vs vmfx)", ""]
    lines += [f"{i}. {d}" for i, d in enumerate(DIFFERENCES, 1)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="w8a8", help="comma-separated subset of w8a8, w6a6, w4a8, w4a4")
    p.add_argument("--sides", default="official,vmfx", help="official, vmfx or both; check (alone): the float check only")
    p.add_argument("--calib-n", type=int, default=32, help="calibration images (both sides)")
    p.add_argument("--vmfx-methods", default="kscaled,kscaled+h8",
                   help="vmfx side: comma-separated subset of kscaled, kscaled+h8, kscaled-official")
    p.add_argument("--seed", type=int, default=0, help="calibration draw (and the official k-means seed + 1)")
    p.add_argument("--test-n", type=int, default=None, help="first N test digits only (the results file says how many)")
    p.add_argument("--xproj-rd", choices=("calibrated", "ones"), default="calibrated",
                   help="the proxy's r_D files that the official net_wrap folds into x_proj (see the docstring)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the official side runs: cpu (with the stand-ins for .cuda()) or cuda (as released); "
                        "the vmfx side runs on the CPU either way")
    p.add_argument("--checkpoints", default=None, metavar="FOLDER",
                   help="official side: checkpoint each calibrated module under FOLDER/<bits>/ and resume from "
                        "there (a run cut short goes on where it stopped; same settings only)")
    p.add_argument("--out", default=None, help=f"folder of kscaled_official.json / .md (default {RESULTS})")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="with --render-only: add a line to the results file's reading (kept in the .json)")
    args = p.parse_args(argv)
    out = args.out or RESULTS
    os.makedirs(out, exist_ok=True)
    json_path, md_path = os.path.join(out, "kscaled_official.json"), os.path.join(out, "kscaled_official.md")

    def save(result):
        result = dict(result, rows=list(result["rows"]))
        if os.path.exists(json_path):  # keep the other side's rows of a run with the same settings
            with open(json_path) as f:
                old = json.load(f)
            if all(old.get(k) == result[k] for k in ("calib_images", "seed", "test_images")):
                done = {(r["side"], r["method"], r["bits"]) for r in result["rows"]}
                result["rows"] = [r for r in old["rows"] if (r["side"], r["method"], r["bits"]) not in done] \
                    + result["rows"]
                for k in ("float_check", "xproj_rd", "official_commit", "official_source", "notes"):
                    if result.get(k) is None and old.get(k) is not None:
                        result[k] = old[k]
                if result["command"] not in old.get("command", ""):
                    result["command"] = old["command"] + "\n    " + result["command"]
                elif old.get("command"):
                    result["command"] = old["command"]
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        with open(md_path, "w") as f:
            f.write(render(result))

    if args.render_only:
        with open(json_path) as f:
            result = json.load(f)
        if args.note:
            result["notes"] = result.get("notes", []) + [f"- {n}" for n in args.note]
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
        with open(md_path, "w") as f:
            f.write(render(result))
    else:
        save(run(args, save))
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
