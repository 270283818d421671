"""Tasks: declarative specs in ``tasks/*.yaml`` (``spec``) built into prompts, attributes,
named positions and counterfactuals for a model, and checked on it (``datasets``).
"""

from ..common.lazy import lazy_exports

#: each public name and the module that defines it
__getattr__, __dir__ = lazy_exports(__name__, {
    "Attribute": "spec",
    "DroppedValuesWarning": "datasets",
    "Position": "spec",
    "SPLITS": "datasets",
    "Split": "spec",
    "Swap": "spec",
    "TASKS_DIR": "datasets",
    "TaskBuildError": "datasets",
    "TaskDataset": "datasets",
    "TaskSpec": "datasets",
    "TaskSpecError": "spec",
    "TaskSpecModel": "spec",
    "Template": "spec",
    "VocabFile": "spec",
    "available_tasks": "datasets",
    "check_task": "datasets",
    "load_task": "datasets",
    "logit_diffs": "datasets",
    "read_spec": "spec",
})
