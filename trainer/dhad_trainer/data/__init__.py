"""Data a stage reads: the Arabic pre-training pipeline (`dhad prepare`: readers, normalization, filters,
dedup, decontamination, packing), instruction conversations and prompt sets for SFT and RLAIF, the
ChatML conventions, and vocabulary expansion.

Library code with no cluster dependencies; settings come from `dhad_api`. May import storage/ (the
local store readers default to); never stages/, runtime/, llm/ or evaluation/.
"""

from dhad_trainer.data.readers import DataError, ObjectStore, ReadCounts
from dhad_trainer.storage.local import LocalStore

__all__ = ["DataError", "LocalStore", "ObjectStore", "ReadCounts"]
