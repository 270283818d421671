"""Whether a task can judge SAEs on a model, from its held-out run (``task.json``): what a
suite gates a task out for, and what a single run flags (docs/metrics.md, "When a number is
not a claim").

One sign convention for effects everywhere: an attribute's **effect** is the logit
difference with its counterfactual minus the clean one, ``LD(x'_A) - LD(x)`` (the total
effect discovery normalises by; negative when the counterfactual turns the answer away).
"""

from __future__ import annotations

from collections.abc import Mapping

#: a task whose held-out accuracy is below this is one the model does not do
MIN_ACCURACY = 0.8
#: a task none of whose attributes moves the logit difference this much (logits) has
#: nothing to find (discovery's ``min_effect``)
MIN_EFFECT = 1.0
#: below this mean clean logit difference (logits) the model barely prefers the answer: every
#: share of an effect divides by a small number
MIN_CLEAN_LD = 1.0


def effects(summary: Mapping) -> dict[str, float]:
    """Per attribute, its effect ``LD(counterfactual) - LD(clean)`` from ``task.json``'s mean
    logit differences per condition."""
    ld = summary["mean_logit_diff"]
    return {a: float(v) - float(ld["clean"]) for a, v in ld.items() if a != "clean"}


def task_problems(summary: Mapping, min_accuracy: float = MIN_ACCURACY,
                  min_clean_ld: float = MIN_CLEAN_LD) -> list[str]:
    """What makes a run's task a weak judge: a held-out accuracy below ``min_accuracy``, a
    mean clean logit difference below ``min_clean_ld``."""
    problems = []
    accuracy = float(summary["accuracy"])
    if accuracy < min_accuracy:
        problems.append(f"the model does not do the task well (held-out accuracy "
                        f"{accuracy:.2f} < {min_accuracy:g})")
    clean = float(summary["mean_logit_diff"]["clean"])
    if clean < min_clean_ld:
        problems.append(f"the model barely prefers the answer (mean clean logit difference "
                        f"{clean:.2f} < {min_clean_ld:g})")
    return problems


def task_gate(summary: Mapping, min_accuracy: float = MIN_ACCURACY,
              min_effect: float = MIN_EFFECT, min_clean_ld: float = MIN_CLEAN_LD) -> str | None:
    """Why a task cannot judge SAEs on this model (a suite gates it out), or None: the
    problems of :func:`task_problems`, or no attribute with an effect of ``min_effect``."""
    reasons = task_problems(summary, min_accuracy, min_clean_ld)
    found = effects(summary)
    if found and max(abs(e) for e in found.values()) < min_effect:
        reasons.append(f"no attribute moves the logit difference by {min_effect:g} or more ("
                       + ", ".join(f"{a} {e:+.2f}" for a, e in found.items()) + ")")
    return "; ".join(reasons) or None
