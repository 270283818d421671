"""NDIF's model actor on a CPU (the third shim of ``sage_ndif_shims.py``; used only where no
CUDA device exists: ``local_ndif.py`` points the controller at it with
``NDIF_MODEL_IMPORT_PATH=sage_ndif_cpu.CPUSandboxModelActor``).

ndif 0.1.2's model actor calls ``torch.cuda`` in four methods: ``load_from_disk`` (it places
the weights on the assigned GPUs and checks they landed there), ``cleanup``
(``synchronize``/``empty_cache`` after each request) and ``to_cache``/``from_cache`` (moving
the weights between GPU and CPU memory). These override only those four. Everything a request
meets runs NDIF's code unchanged: the queue, deserialization, the sandbox (a trusted request
runs in the actor, any other in a fresh runner process that holds a meta copy of the model),
the result upload and the error reports.
"""

from __future__ import annotations

import gc

import ray
from nnsight.modeling.huggingface import HuggingFaceModel

from ndif.services.ray.deployments.modeling.base import KILL_REASON_PREEMPTED
from ndif.services.ray.sandbox.model import SandboxModelDeployment


class CPUSandboxModelDeployment(SandboxModelDeployment):
    def load_from_disk(self):
        model = HuggingFaceModel.from_model_key(self.model_key, dispatch=True,
                                                dtype=self.dtype_name, device="cpu",
                                                **self.kwargs)
        model._module.requires_grad_(False)
        return model

    def cleanup(self) -> None:
        # the base's per-request reset, without torch.cuda; the runner goes as in the base
        self.discard_sandbox()
        self.kill_switch.clear()
        self.kill_reason = None
        self.execution_ident = None
        self.model.interleaver.cancel()
        gc.collect()

    async def to_cache(self) -> None:  # the weights already sit in CPU memory
        await self.cancel(KILL_REASON_PREEMPTED)
        self.cached = True

    def from_cache(self, gpu_mem_bytes_by_id) -> None:
        self.gpu_mem_bytes_by_id = gpu_mem_bytes_by_id
        self.cached = False


@ray.remote(num_cpus=1, max_restarts=-1)
class CPUSandboxModelActor(CPUSandboxModelDeployment):
    """What the controller deploys a model as."""
