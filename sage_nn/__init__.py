"""sage_nn: ground-truth evaluation of sparse autoencoders on real language models."""

from .activations import collect, open_store
from .dictionaries import MeanDictionary, MSEDictionary
from .discovery import AttributionPatching, discover
from .models import DEFAULT_MODEL, load_model, tiny_random_model
from .sites import Site, adapter
from .tasks import check_task, load_task

__all__ = ["AttributionPatching", "discover", "check_task", "load_task", "DEFAULT_MODEL", "MSEDictionary", "MeanDictionary", "Site", "adapter", "collect",
           "load_model", "open_store",
           "tiny_random_model"]
