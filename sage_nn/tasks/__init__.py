"""Tasks: declarative specs in ``tasks/*.yaml`` (``spec``) built into prompts, attributes,
named positions and counterfactuals for a model, checked on it (``datasets``), and gated
(``gates``: whether it can judge SAEs on that model).
"""

from ..common.lazy import lazy_exports

#: each public name and the module that defines it
__getattr__, __dir__ = lazy_exports(__name__, {
    "Attribute": "spec",
    "MIN_ACCURACY": "gates",
    "MIN_CLEAN_LD": "gates",
    "MIN_EFFECT": "gates",
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
    "effects": "gates",
    "load_task": "datasets",
    "logit_diffs": "datasets",
    "read_spec": "spec",
    "task_gate": "gates",
    "task_problems": "gates",
})
