import inspect

import torch
import torch.nn.attention as a
import torch.nn.attention.varlen as v

from fastattn.integrations import torch_flash

print("torch", torch.__version__)
print("hook_missing:", torch_flash.hook_missing())
print("present ops:", torch_flash.present_ops())
for n in torch_flash.SCHEMAS:
    print(n, "->", torch_flash.schema_mismatch(n))
    op = getattr(torch.ops.aten, n, None)
    if op is not None:
        print("   ", op.default._schema)
print("varlen exports:", [x for x in dir(v) if not x.startswith("_")])
print("varlen_attn", inspect.signature(v.varlen_attn))
print("attention exports:", [x for x in dir(a) if "flash" in x])
