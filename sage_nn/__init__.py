"""sage_nn: ground-truth evaluation of sparse autoencoders on real language models."""

from .activations import collect, open_store
from .attribution import AttributionPatching
from .dictionaries import MeanDictionary, MSEDictionary
from .discovery import discover
from .models import DEFAULT_MODEL, load_model, tiny_random_model
from .reconstruction import ResidualReconstruction
from .runs import Run, open_run
from .saes import SparseAutoencoder, load_sae  # imports sae_lens early, before any trace
from .sites import Site, adapter
from .tasks import check_task, load_task

__all__ = ["DEFAULT_MODEL", "AttributionPatching", "MSEDictionary", "MeanDictionary", "Run",
           "Site", "adapter", "check_task", "collect", "discover", "load_model", "load_task",
           "open_run", "open_store", "tiny_random_model", "ResidualReconstruction",
           "SparseAutoencoder", "load_sae"]
