# Produced the v1 artifact (format version 1, QuantLinear-based) at commit 28f5970, before quantizers became
# graph nodes; kept so that tests/test_serialize.py checks the migration of old files. Run from the repo root.
import torch, vmfx
from vmfx.config import InitConfig, JLSSConfig, QuantConfig, SmoothingConfig
from vmfx.models import VisionMamba
from vmfx.quant import QuantSpec
torch.manual_seed(0)
model = VisionMamba(img_size=16, patch_size=4, stride=4, embed_dim=32, depth=2, num_classes=5).eval()
images = torch.randn(8, 3, 16, 16)
cfg = QuantConfig(method="ptq4vm", weight=QuantSpec(4, True, "channel"), activation=QuantSpec(8, False, "token"),
                  init=InitConfig("lp", 2.4, 20), smoothing=SmoothingConfig(0.5),
                  jlss=JLSSConfig(steps=4, batch_size=8))
q = vmfx.compile(model, images, cfg)
vmfx.save(q, "tests/data/artifacts/v1_ptq4vm_w4a8_vim16.safetensors")
with torch.no_grad():
    out = q(images)
from safetensors.torch import save_file
save_file({"images": images, "logits": out}, "tests/data/artifacts/v1_ptq4vm_w4a8_vim16.io.safetensors")
print(out[:2])
