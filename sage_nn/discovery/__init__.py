"""Where a task attribute is computed: attribution patching scores every site
(``attribution``), a cross-section is grown by its joint exact patch (``growth``) or
selected and validated (``selection``), plotted (``plots``); ``discover`` runs the stage.
"""

from ..common.lazy import lazy_exports

#: each public name and the module that defines it
__getattr__, __dir__ = lazy_exports(__name__, {
    "AttributionPatching": "attribution",
    "Discovery": "stage",
    "DiscoveryConfig": "stage",
    "RESIDUAL_KINDS": "attribution",
    "SCORES_FORMAT": "attribution",
    "SmallEffectWarning": "attribution",
    "discover": "stage",
    "effect_layers": "selection",
    "effects_table": "attribution",
    "exact_patching": "selection",
    "grow_cross_sections": "growth",
    "head_grid": "selection",
    "load_scores": "attribution",
    "measure_growth": "growth",
    "plot_cross_section": "plots",
    "plot_heatmaps": "plots",
    "ranked": "selection",
    "save_scores": "attribution",
    "select_cross_section": "selection",
    "validate": "selection",
    "validate_all": "selection",
})
