"""Arabic data pipeline (`dhad prepare`): readers, normalization, filters, dedup, decontamination, packing.

Pure library code with no cluster dependencies; settings come from `dhad_api.data_prep`.
"""

from dhad_trainer.data.readers import DataError, LocalStore, ObjectStore, ReadCounts

__all__ = ["DataError", "LocalStore", "ObjectStore", "ReadCounts"]
