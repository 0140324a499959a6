"""The worked example of vmfx/passes/README.md runs, and its pass does what the README says."""

from __future__ import annotations

import os
import re

import torch

import vmfx
from vmfx.quant import FakeQuantize
from vmfx.testing import count_nodes

README = os.path.join(os.path.dirname(vmfx.__file__), "passes", "README.md")


def _example() -> str:
    text = open(README).read()
    match = re.search(r"<!-- example: quantize-outputs -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the worked example is missing from vmfx/passes/README.md"
    return match.group(1)


def test_the_worked_example_runs_saves_and_loads(tmp_path, capsys):
    from vmfx.data import load_digits, load_proxy_model

    images = load_digits("train")[0][:16]
    namespace = {"model": load_proxy_model(), "images": images}
    exec(compile(_example(), README, "exec"), namespace)
    qmodel = namespace["qmodel"]
    plain = vmfx.compile(namespace["model"], images, "minmax-w8a8")
    blocks = vmfx.inspect.summary(plain)["mixers"]
    # one more quantizer per block (after its out_proj), and the printed table shows them
    assert count_nodes(qmodel, {FakeQuantize: 0})[FakeQuantize] == count_nodes(plain, {FakeQuantize: 0})[FakeQuantize] + blocks
    assert "out_proj__output" in capsys.readouterr().out
    with torch.no_grad():
        got, base = qmodel(images), plain(images)
    assert not torch.equal(got, base) and torch.nn.functional.cosine_similarity(got, base).min() > 0.99
    loaded = vmfx.load(vmfx.save(qmodel, str(tmp_path / "q.safetensors")))
    with torch.no_grad():
        assert torch.equal(loaded(images), got)
