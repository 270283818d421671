"""Run one serialized nnsight request as an NDIF server would (used by FreshProcessBackend).

    python _server.py MODEL_DIR REQUEST RESULT BLOCKED

Runs as a script in a fresh interpreter, never imported by sage_nn. After the server's own
packages are loaded, importing sage_nn or any BLOCKED package (comma-separated) raises
ModuleNotFoundError, as it would on a server that lacks them.
"""

import sys

sys.path.pop(0)  # this file's directory is sage_nn/: keep its modules unimportable by name

import importlib.abc  # noqa: E402
import io  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from nnsight.modeling.transformers import TransformersModel  # noqa: E402
from nnsight.schema.request import RequestModel  # noqa: E402
from nnsight.tracing import tracer as tracing  # noqa: E402

model_dir, request, result, blocked = sys.argv[1:5]
blocked = set(blocked.split(","))


class NotOnServer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)")
        return None


hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
hf.requires_grad_(False)  # as on NDIF: a kernel that needs gradients asks for them
tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
model = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
preloaded = {m.split(".")[0] for m in sys.modules}  # what the server itself needs
blocked -= preloaded
sys.meta_path.insert(0, NotOnServer())

tracer = RequestModel.deserialize(open(request, "rb").read(),
                                  model._remoteable_persistent_objects())
pushed = []  # the outermost block pushes its saved values last
push = tracing.push
tracing.push = lambda frame, values: (pushed.append(dict(values)), push(frame, values))
tracing.inc()
try:
    tracer.execute(tracer.info.code)
finally:
    tracing.dec()
buffer = io.BytesIO()
torch.save(pushed[-1] if pushed else {}, buffer)
open(result, "wb").write(buffer.getvalue())
